"""The batched layout (`[L, C, H]` rows per local expert + `counts [L]`) through the fused kernels.

The same gate+up and down kernels as the flat path run with BATCHED=True: a tile is (expert, block of
BLOCK_M capacity rows), and the programs of an expert (its slots) run only the blocks below its count, so the
cost follows the real rows, not the capacity: nothing past a count is computed or written. Outputs are
unweighted (the combine applies the routing weights); rows past each count are left as the output buffer
had them (the dispatchers' combines read only the real rows).

The capacity says little about the batch: the low_latency dispatcher's is ranks x max_tokens_per_rank, the
most rows one expert can get. The tiles and the slots per expert follow the tokens behind the batch where the
caller knows them (`num_tokens`: T tokens on each rank routed evenly give an expert T k / L rows), else
that worst case.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import triton

from .fused_moe import (Fp8Operands, fp8_tiles_problem, intermediate_dtype, launch_down, launch_gate_up,
                        weight_format)
from .tuning_table import MoEKernelConfig, lookup_config


def unsplit_down(config: MoEKernelConfig) -> MoEKernelConfig:
    """A table entry's tiles as the batched layout runs them: the down GEMM over its whole K range. The tables
    are tuned on the flat layout, whose down GEMM may split K (`split_k`: float32 partial rows per pair, added by
    its slot sum); the batched layout has no slot sum, and its down tiles write their rows in place."""
    if config.down.split_k == 1:
        return config
    return replace(config, down=replace(config.down, split_k=1))


SLOT_HEADROOM = 2      # slots per expert cover this many times the rows an even routing gives it
SERIAL_BLOCKS = 4      # and at most this many blocks of a full capacity run in turn in one program (a hot expert)


def expected_rows(num_tokens: int | None, num_experts: int, capacity: int, top_k: int) -> int:
    """Rows per expert the tiles are chosen for: T k / L for T tokens routed evenly (`num_tokens`), else the
    capacity (every expert full), never more than the capacity."""
    if num_tokens is None:
        return capacity
    return max(1, min(capacity, triton.cdiv(num_tokens * max(top_k, 1), num_experts)))


def row_slots(rows: int, capacity: int, block_m: int) -> int:
    """Programs an expert gets along M: enough for SLOT_HEADROOM x `rows` rows in one pass of one block each,
    at most a block of the capacity each; an expert with more rows runs them in turn, at most SERIAL_BLOCKS
    in one program (an expert that got the whole capacity is spread over a quarter as many programs as it
    has blocks)."""
    blocks = triton.cdiv(capacity, block_m)
    return max(1, min(blocks, max(triton.cdiv(SLOT_HEADROOM * rows, block_m), triton.cdiv(blocks, SERIAL_BLOCKS))))


def batched_config(num_experts: int, capacity: int, hidden: int, inter: int, top_k: int, fmt: str,
                   num_tokens: int | None, device=None) -> MoEKernelConfig:
    """The tiles `batched_experts` runs without a `config`: the table's (or the heuristic's) for the rows an
    expert gets (`expected_rows`), the down GEMM over its whole K range (`unsplit_down`)."""
    rows = expected_rows(num_tokens, num_experts, capacity, top_k)
    config, _ = lookup_config(max(1, rows * num_experts // max(top_k, 1)), num_experts, hidden, inter, top_k, fmt,
                              device)
    return unsplit_down(config)


def batched_experts(x: torch.Tensor, counts: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                    activation: str, *, top_k: int = 1, b13: torch.Tensor | None = None,
                    b2: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                    config: MoEKernelConfig | None = None, fp8: Fp8Operands | None = None,
                    num_tokens: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [L, C, H] (rows past counts[e] are ignored), counts [L] int (at most C each) -> [L, C, H]: expert e's
    output for its first counts[e] rows; the rows after are not written. `top_k` and `num_tokens` (the tokens
    on each rank behind the batch, e.g. the dispatcher's T) only steer the choice of tiles and the programs per
    expert (`expected_rows`); without `num_tokens`, every expert is taken as full. `config`: the tiles (None:
    the table's or the heuristic's for those rows, its down unsplit: `unsplit_down`). `out`: the output buffer
    ([L, C, H] contiguous, `out_dtype`; None: a new one)."""
    if x.dim() != 3:
        raise ValueError(f"batched_experts: x must be [L, C, H], got {list(x.shape)}")
    L, C, H = x.shape
    if counts.dim() != 1 or counts.shape[0] != L:
        raise ValueError(f"batched_experts: counts must be [L={L}], got {list(counts.shape)}")
    if counts.device != x.device:
        raise ValueError(f"batched_experts: counts on {counts.device}, rows on {x.device}")
    Lw, two_i, Hw = w13.shape
    inter = two_i // 2
    if Lw != L or Hw != H or tuple(w2.shape) != (L, H, inter):
        raise ValueError(f"batched_experts: weights must be w13 [L={L}, 2I, H={H}] and w2 [L, H, I], got "
                         f"{list(w13.shape)} and {list(w2.shape)}")
    for name, t in (("x", x), ("w13", w13), ("w2", w2)):
        if not t.is_contiguous():
            raise ValueError(f"batched_experts: {name} must be contiguous")
    out_dtype = out_dtype or x.dtype
    if num_tokens is not None and num_tokens < 0:
        raise ValueError(f"batched_experts: num_tokens must be >= 0, got {num_tokens}")
    if out is None:
        out = torch.empty(L, C, H, dtype=out_dtype, device=x.device)
    elif tuple(out.shape) != (L, C, H) or out.dtype != out_dtype or out.device != x.device or not out.is_contiguous():
        raise ValueError(f"batched_experts: out must be a contiguous [{L}, {C}, {H}] {out_dtype} tensor on "
                         f"{x.device}, got {list(out.shape)} {out.dtype} on {out.device}")
    if L == 0 or C == 0:
        return out
    if config is None:
        config = batched_config(L, C, H, inter, top_k, weight_format(w13, fp8.granularity if fp8 else None),
                                num_tokens, x.device)
    if fp8 is not None:
        why = fp8_tiles_problem(config, fp8)
        if why:
            raise ValueError(f"batched_experts: tiles {config.describe()} cannot run these FP8 operands: {why}")
    bm = config.block_m
    slots = row_slots(expected_rows(num_tokens, L, C, top_k), C, bm)
    row_blocks = L * slots
    counts = counts.to(torch.int32).contiguous()
    mode1 = mode2 = None
    inter_scale = None
    if fp8 is not None:
        mode1, mode2 = fp8.modes()
        act = torch.empty(L * C, inter,
                          dtype=torch.float8_e4m3fn if mode1.out_fp8 else intermediate_dtype(out_dtype),
                          device=x.device)
        if mode1.out_fp8:
            inter_scale = torch.empty(L * C, triton.cdiv(inter, config.gate_up.block_n), dtype=torch.float32,
                                      device=x.device)
    else:
        act = torch.empty(L * C, inter, dtype=intermediate_dtype(x.dtype), device=x.device)
    common = dict(sorted_ids=None, block_expert=None, num_padded=None, counts=counts, num_pairs=slots,
                  capacity=C, row_blocks=row_blocks, hidden=H, inter=inter, top_k=1, batched=True, block_m=bm)
    launch_gate_up(x, w13, None if b13 is None else b13.float().contiguous(), act, inter_scale,
                   fp8.x_scale if fp8 else None, fp8.w13_scale if fp8 else None, gemm=config.gate_up,
                   activation=activation, fp8=mode1, **common)
    if fp8 is not None and not mode1.out_fp8:
        act, inter_scale = fp8.quantize_intermediate(act, counts)
    launch_down(act, w2, None if b2 is None else b2.float().contiguous(), out, inter_scale,
                fp8.w2_scale if fp8 else None, None, gemm=config.down, fp8=mode2, **common)
    return out
