"""`epmoe tune`: choose the fused kernels' tile configurations for one shape on this GPU.

For each token count T the candidates of its regime (rows per expert = T * k / L: decode tiles of few
rows that stream weights, up to 128 x 256 tiles for prefill) are compiled ahead, in parallel worker
processes that fill Triton's on-disk cache (a kernel the timing process has to compile again, its key not
found there, is counted, and the part of its key that differs from the workers' is said: `CompileLog`);
then, for each BLOCK_M, the gate+up and the down kernel are timed separately on the same expert layout
(balanced routing, L2 flushed before each run, median), and each BLOCK_M's fastest pair is kept. Then the
whole experts op races end to end (CUDA-graph replays of the
`triton` experts on one random routing, each configuration as the lookup will serve it): each BLOCK_M's best
tiles (the BLOCK_M changes the alignment around the GEMMs, which the kernels' times leave out); for T <= 16 the
decode path (`decode_gemv`: matrix-vector kernels, with and without PDL); where the warp-specialized Gluon GEMMs
can run (Hopper, BF16, 128x128 block and per-channel FP8) and a tile has GLUON_MIN_ROWS rows per expert or more,
`triton_ws`'s pipeline, taken only where it is faster by more than GLUON_MARGIN; and what the lookup served at
T before this tune (an entry at T or near it, or the heuristic), which stays unless beaten by more than
SERVED_MARGIN. A decode or Gluon winner keeps the fastest tiles for the batches those do not take. In the race
each path first runs back to back for --settle-ms, so that on a GPU at its power limit the path timed first
does not start at a higher clock, and each path's time is printed with the GPU's clocks, highest power and
clock-event reasons meanwhile (nvidia-smi's samples, where it runs): two races of one entry that disagree can then be
told apart by what their GPUs ran at. Each winner, with its end-to-end time, is merged into the table of this GPU
(`epmoe/kernels/configs/<GPU>.json` unless --output says otherwise), which `lookup_config` reads, as soon as its T
is decided, the file replaced whole: a tune stopped part way (Ctrl-C, or SIGTERM from a time limit) keeps the T
it finished and a whole table, and says what it did not tune (exit status 130). An entry
serves every batch within a factor TABLE_REACH of its T, so a new one can hand its tiles to batch sizes nobody
timed them at: after writing, the tuner names the powers of two from 1 to 16384 not tuned in this run whose
configuration changed, with the --tokens that would time them.

The quick modes (--refine, --persistent, --gluon) start from the entry the lookup uses for the shape
(this GPU's table, else one of another GPU of the same family) and write into this GPU's table. `--audit` tunes
nothing: it reads the tables and says how each entry was timed, and which batch sizes another GPU's table has
entries for that a shape of this table hides (`tune_audit`).

FP8 block weights are tuned with every K block's product promoted to float32 ("sync": the library's
numerics); `--allow-rescale` adds the faster, less precise "rescale" promotion to the candidates.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import math
import os
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace

import torch
from rich.markup import escape

from ..usage import CsvList, DeprecatedAlias, UsageError, csv_values, token_counts
from .gpu_state import GpuStateSampler, describe_state, nvidia_smi_id
from .gpu_timing import GRAPH
from ..kernels.tuning_table import (CONFIG_DIR, GLUON_MIN_ROWS, SM_SHARED_MEMORY, SMEM_LIMIT, SMEM_RESERVED_PER_PROGRAM,
                                   GemmConfig, GemvConfig, MoEKernelConfig,
                                   TABLE_REACH, _load_table, can_stack_gate_up, device_table_name, fit_to_problem,
                                   lookup_config, shape_key, smem_bytes, table_paths_for_device)

TOKENS = [1, 16, 128, 1024, 8192]

# (block_n, block_k, num_warps, num_stages) per regime; group_m is set by the regime
_DECODE_GATE_UP = [(32, 256, 4, 4), (64, 128, 4, 4), (64, 128, 4, 5), (64, 256, 4, 3), (128, 128, 4, 3),
                   (32, 128, 4, 6), (64, 64, 4, 6)]
_DECODE_DOWN = [(64, 128, 4, 4), (32, 256, 4, 4), (128, 128, 4, 3), (64, 256, 4, 3), (128, 64, 4, 5),
                (64, 128, 4, 6)]
_MID_GATE_UP = [(64, 64, 4, 4), (128, 64, 4, 3), (128, 64, 8, 3), (64, 128, 4, 3), (64, 64, 4, 5)]
_MID_DOWN = [(128, 64, 4, 4), (64, 64, 4, 4), (128, 128, 4, 3), (256, 64, 8, 3), (64, 128, 4, 4)]
_LARGE_GATE_UP = [(128, 64, 8, 3), (128, 64, 8, 4), (64, 64, 4, 4), (64, 128, 8, 3), (128, 128, 8, 2),
                  (64, 64, 8, 4)]
_LARGE_DOWN = [(128, 64, 8, 4), (256, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 4), (256, 64, 8, 4),
               (128, 64, 8, 3)]
_FP8_GATE_UP = [(128, 128, 4, 3), (128, 128, 8, 3), (128, 128, 8, 4), (128, 128, 4, 4), (128, 128, 4, 5),
                (128, 128, 16, 3), (128, 128, 16, 4)]   # 16 warps: half the accumulator registers per thread
_FP8_DOWN = [(128, 128, 8, 3), (128, 128, 8, 4), (256, 128, 8, 3), (64, 128, 4, 4), (128, 128, 4, 5),
             (64, 128, 4, 6)]
# FP8 tiles of 64 rows or more also walk their programs in groups of 32 row blocks (`_swizzle`'s GROUP_M; 8 above):
# on an H200 a fused-MoE kernel with this tile and that group ran gpt-oss-120b's gate+up at T = 2048 and 8192 in
# 0.84 and 0.86 of our entries' time (results/vllm_gemms_H200_2026-12-07_6e4580f.json)
_FP8_GATE_UP_GROUP32 = [(128, 128, 4, 3)]
# FP8 at decode (tiles of <= 32 rows) as well: there few programs stream long K ranges of weights (ncu, mixtral
# T = 1 on an H100: the down GEMM's 128 programs read at 58% of DRAM peak), and a narrow down tile with a deep
# pipeline keeps more bytes in flight; the gate+up N tile stays 128, the group its output is quantized in
_FP8_DECODE_GATE_UP = [(128, 128, 8, 5), (128, 128, 4, 6)]
_FP8_DECODE_DOWN = [(32, 128, 4, 8), (32, 128, 2, 8), (32, 128, 4, 6), (64, 128, 4, 8)]
# and the down GEMM's K range split in 2 or 4 (fused_moe's SPLIT_K): more programs where a few pairs meet a
# long K (mixtral-8x7b at T = 1: 128 programs of 112 K blocks each), each of these tiles with each split
_FP8_DECODE_SPLIT_TILES, _FP8_DECODE_SPLITS = [(64, 128, 4, 6), (32, 128, 4, 8)], (2, 4)
# block-scaled FP8 with --allow-rescale only: (block_n, block_k, num_warps, num_stages, promote);
# "rescale" (fused_moe's RESCALE) holds no product registers, so the down tile can be 256 wide at 8 warps
_FP8_BLOCK_GATE_UP = [(128, 128, 8, 3, "rescale"), (128, 128, 8, 4, "rescale")]
_FP8_BLOCK_DOWN = [(128, 128, 8, 4, "rescale"), (256, 128, 8, 3, "rescale"), (256, 128, 8, 4, "rescale")]


# the decode path (decode_gemv), tried for T <= GEMV_MAX_TOKENS (FP8: the formats it takes, K tiles of
# 128s): (block_n, block_k, warps, stages) of each kernel, timed separately; the best pair then races the
# whole op with the tiles and what was served before (`tune_problem`)
GEMV_MAX_TOKENS = 16
_GEMV_GATE_UP = [(8, 256, 4, 3), (8, 256, 4, 4), (16, 256, 4, 3), (8, 512, 4, 3), (16, 128, 4, 4), (8, 512, 4, 1),
                 (16, 256, 4, 1), (8, 1024, 4, 2), (16, 512, 8, 3)]
_GEMV_DOWN = [(8, 256, 4, 3), (4, 256, 4, 4), (8, 128, 4, 4), (16, 128, 8, 3), (4, 512, 4, 3), (8, 256, 4, 1),
              (4, 512, 4, 1), (8, 512, 8, 3)]


def block_ms_for(rows_per_expert: float) -> list[int]:
    if rows_per_expert <= 4:
        return [16]
    if rows_per_expert <= 16:
        return [16, 32]
    if rows_per_expert <= 64:
        return [32, 64]
    if rows_per_expert <= 256:
        return [64, 128]
    return [128]


def tails_for(block_m: int, rows_per_expert: float) -> list[int]:
    """Tail tile heights worth timing (0: uniform tiles): where experts hold at least half a tile, a
    tail tile of block_m / 2 or / 4 rows replaces most of the padding of the last tile."""
    if block_m >= 64 and rows_per_expert >= block_m / 2:
        return [0, block_m // 2, block_m // 4]
    return [0]


def with_twins(configs: list[GemmConfig], twins) -> list[GemmConfig]:
    """`configs` in order, each followed by its twins (`twins(g)`: the forms of g worth timing beside it, or None
    for none), no configuration twice."""
    out = []
    for g in configs:
        for twin in twins(g):
            if twin is not None and twin not in out:
                out.append(twin)
    return out


def with_tma(g: GemmConfig, on: bool = True, **changes) -> GemmConfig:
    """`g` with its weight tiles through tensor descriptors (TMA) or not; a TMA tile does not stack its
    gate+up products (`stack_gate_up` loads them through one pointer tile)."""
    return replace(g, tma=on, stack_gate_up=g.stack_gate_up and not on, **changes)


def with_tma_twins(configs: list[GemmConfig]) -> list[GemmConfig]:
    """Each configuration as it is and with its weight tiles loaded through tensor descriptors (TMA)."""
    return with_twins(configs, lambda g: (with_tma(g, False), with_tma(g)))


def with_activation_tma_twins(downs: list[GemmConfig]) -> list[GemmConfig]:
    """Down candidates, each whose weight tiles come through TMA also with its activation rows through a
    tensor descriptor (`tma_a`)."""
    return with_twins(downs, lambda g: (g, replace(g, tma_a=True) if g.tma else None))


def with_swap_twins(configs: list[GemmConfig]) -> list[GemmConfig]:
    """Each configuration with plain and with swap-AB products (`swap_ab`; "rescale" promotions plain only)."""
    return with_twins(configs, lambda g: (replace(g, swap_ab=False),
                                          replace(g, swap_ab=True) if g.promote != "rescale" else None))


# tiles of at most this many rows are also timed with swap-AB products: the weight rows on the tensor cores'
# wide side, which 16 or 32 rows cannot fill (Hopper's warpgroup MMA is 64 rows)
SWAP_AB_MAX_BLOCK_M = 32


# two programs of 8 warps share an SM at <= 128 registers a thread (65536 / (2 x 256)): the block-FP8 swap-AB
# gate+up at BM32 compiles to 130 by itself (one program to an SM) and to 128 under this cap without a spill in
# its K loop (epmoe.kernels.xcompile, triton 3.6); the down tiles of few rows need far fewer (48-80)
REGISTER_CAP_8_WARPS = 128


def product_registers(g: GemmConfig, block_m: int) -> int:
    """Float32 registers a thread holds for a gate+up tile's products and sums: gate and up, each a sum and a
    K block's product, 4 x block_n x block_m a program over its threads."""
    return 4 * g.block_n * block_m // (32 * g.num_warps)


def register_cap_pays(g: GemmConfig, block_m: int, elem: int) -> bool:
    """Whether capping a gate+up tile's registers at REGISTER_CAP_8_WARPS can put a second program on an SM: a
    swap-AB tile of 8 warps whose float32 products and sums (`product_registers`) take at least half the cap a
    thread, as BM32's do (64 of its 130; BM16's 32 of 66-80 need no cap), and whose
    pipeline leaves room for two programs in the SM's shared memory."""
    return (g.swap_ab and g.num_warps == 8 and 2 * product_registers(g, block_m) >= REGISTER_CAP_8_WARPS
            and 2 * (smem_bytes(block_m, g, elem, 2) + SMEM_RESERVED_PER_PROGRAM) <= SM_SHARED_MEMORY)


def with_register_caps(gate_ups: list[GemmConfig], block_m: int, elem: int) -> list[GemmConfig]:
    """Each gate+up configuration uncapped, and those where a cap can put two programs on an SM
    (`register_cap_pays`) also capped at REGISTER_CAP_8_WARPS; the timings say whether that pays."""
    def twins(g):
        plain = replace(g, max_registers=0)
        capped = replace(plain, max_registers=REGISTER_CAP_8_WARPS)
        return plain, capped if register_cap_pays(plain, block_m, elem) else None
    return with_twins(gate_ups, twins)


def stack_fits(g: GemmConfig, block_m: int) -> bool:
    """Whether a gate+up configuration can stack its gate and up products (`stack_gate_up`) without spilling:
    weights through pointers, "sync" promotion, uncapped, an N tile within one 128-row scale block, at most 8
    warps (16 are held to 128 registers a thread), and products and sums (`product_registers`) of at most 128 a
    thread (BM32 at 4 warps, BM64 at 8: 192-218 registers; BM64 at 4 warps, BM128 at 8 and at 16 spill in their
    K loops, epmoe.kernels.xcompile with triton 3.6)."""
    return (not g.tma and g.promote == "sync" and not g.max_registers and 128 % g.block_n == 0
            and g.num_warps <= 8 and product_registers(g, block_m) <= 128)


def with_stacked_twins(gate_ups: list[GemmConfig], block_m: int) -> list[GemmConfig]:
    """Each gate+up configuration as it is and, where it fits (`stack_fits`), with its gate and up products
    stacked into one a K block."""
    return with_twins(gate_ups, lambda g: (g, replace(g, stack_gate_up=True) if stack_fits(g, block_m) else None))


def candidates(block_m: int, fp8: bool, tma: bool = True, block_scales: bool = False, rescale: bool = False,
               stack: bool = False) -> tuple[list[GemmConfig], list[GemmConfig]]:
    """(gate_up candidates, down candidates) for tiles of `block_m` rows, those that fit in shared memory,
    each also with TMA weight loads when `tma` and, up to SWAP_AB_MAX_BLOCK_M rows, with swap-AB products (gate+up
    tiles also with their registers capped where that can fit two programs on an SM: `with_register_caps`); with
    `block_scales` (FP8 128x128 weight blocks) and `rescale` also the less precise "rescale" promotion
    (otherwise every candidate promotes "sync"); with `stack` (`tuning_table.can_stack_gate_up`) each gate+up
    candidate that fits also with its gate and up products stacked (`with_stacked_twins`)."""
    if fp8:
        gu, dn, group = _FP8_GATE_UP, _FP8_DOWN, 1 if block_m <= 32 else 8
        if block_m <= 32:
            gu, dn = gu + _FP8_DECODE_GATE_UP, dn + _FP8_DECODE_DOWN
        if block_scales and rescale and block_m >= 64:
            gu, dn = gu + _FP8_BLOCK_GATE_UP, dn + _FP8_BLOCK_DOWN
    elif block_m <= 32:
        gu, dn, group = _DECODE_GATE_UP, _DECODE_DOWN, 1
    elif block_m <= 64:
        gu, dn, group = _MID_GATE_UP, _MID_DOWN, 8
    else:
        gu, dn, group = _LARGE_GATE_UP, _LARGE_DOWN, 8
    elem = 1 if fp8 else 2
    gu_cfgs = [GemmConfig(*c[:2], group, *c[2:4], promote=c[4] if len(c) > 4 else "sync") for c in gu]
    dn_cfgs = [GemmConfig(*c[:2], group, *c[2:4], promote=c[4] if len(c) > 4 else "sync") for c in dn]
    if fp8 and block_m >= 64:
        gu_cfgs += [GemmConfig(*c[:2], 32, *c[2:4]) for c in _FP8_GATE_UP_GROUP32]
    gu_cfgs = [g for g in gu_cfgs if smem_bytes(block_m, g, elem, 2) <= SMEM_LIMIT]
    dn_cfgs = [g for g in dn_cfgs if smem_bytes(block_m, g, elem, 1) <= SMEM_LIMIT]
    if tma:
        gu_cfgs, dn_cfgs = with_tma_twins(gu_cfgs), with_activation_tma_twins(with_tma_twins(dn_cfgs))
    if fp8 and block_m <= 32:
        dn_cfgs += [GemmConfig(*c[:2], group, *c[2:4], tma=tma_on, split_k=split)
                    for c in _FP8_DECODE_SPLIT_TILES for split in _FP8_DECODE_SPLITS
                    for tma_on in ((False, True) if tma else (False,))]
    if block_m <= SWAP_AB_MAX_BLOCK_M:
        gu_cfgs, dn_cfgs = with_register_caps(with_swap_twins(gu_cfgs), block_m, elem), with_swap_twins(dn_cfgs)
    if stack and fp8 and block_scales:
        gu_cfgs = with_stacked_twins(gu_cfgs, block_m)
    return gu_cfgs, dn_cfgs


def regime_plan(tokens: list[int], rows_per_expert, fp8: bool, block_scales: bool = False,
                rescale: bool = False, stack: bool = False) -> dict:
    """Candidates of a full tune: for each T, every BLOCK_M and tail tile of its regime
    (`rows_per_expert(T)`) with the candidates of that BLOCK_M."""
    return {T: {(bm, tail): candidates(bm, fp8, block_scales=block_scales, rescale=rescale, stack=stack)
                for bm in block_ms_for(rows_per_expert(T))
                for tail in tails_for(bm, rows_per_expert(T))} for T in tokens}


def as_sync(cfg: MoEKernelConfig) -> MoEKernelConfig:
    """`cfg` with both GEMMs promoting "sync": what a table entry seeds a refine or persistent run with
    unless "rescale" is allowed."""
    return replace(cfg, gate_up=replace(cfg.gate_up, promote="sync"), down=replace(cfg.down, promote="sync"))


def _entries(table: dict, tokens: list[int], rescale: bool):
    """(T, the table's configuration for T) for the tokens that have one, promoting "sync" unless
    `rescale`: what `--refine` and `--persistent` start from."""
    for T in tokens:
        cfg = table.get(T)
        if cfg is not None:
            yield T, (cfg if rescale else as_sync(cfg))


def refine_plan(table: dict, tokens: list[int], rows_per_expert=None, fp8: bool = False,
                block_scales: bool = False, rescale: bool = False, stack: bool = False) -> dict:
    """Candidates for `--refine`: for each T, the table's configuration and its TMA twin (same BLOCK_M),
    each with the tail tiles worth trying (`rows_per_expert(T)` given), its swap-AB twin (and the gate+up's
    register cap where it can pay, and its uncapped twin: `with_register_caps`) up to
    SWAP_AB_MAX_BLOCK_M rows and, for FP8, with 16 warps; for
    FP8 block weights also down 128 wide, and with `rescale` each gate+up candidate with both promotions
    and down 128 wide with both and 256 wide with "rescale" (without it, "sync" only). Every gate+up candidate is
    timed unstacked; with `stack` (`tuning_table.can_stack_gate_up`) also stacked where it fits (`stack_fits`:
    the entry's own stacking among those)."""
    plan = {}
    for T, cfg in _entries(table, tokens, rescale):
        gus = [cfg.gate_up]
        dns = [cfg.down]
        if fp8 and cfg.block_m >= 64 and cfg.gate_up.num_warps == 8:
            gus.append(replace(cfg.gate_up, num_warps=16))
        if block_scales and cfg.block_m >= 64:    # down 128 wide; with rescale both promotions, 256 wide
            dns.append(replace(cfg.down, block_n=128, promote="sync"))
            if rescale:      # (a swap-AB GEMM promotes "sync" only: its "rescale" twin is the unswapped one)
                gus = list(dict.fromkeys(replace(g, promote=p, swap_ab=g.swap_ab and p == "sync",
                                                 stack_gate_up=g.stack_gate_up and p == "sync")
                                         for g in gus for p in ("sync", "rescale")))
                dns += [replace(cfg.down, block_n=128, promote="rescale"),
                        replace(cfg.down, block_n=256, promote="rescale")]
            dns = list(dict.fromkeys(dns))
        tails = tails_for(cfg.block_m, rows_per_expert(T)) if rows_per_expert else [cfg.tail_m]
        if cfg.tail_m not in tails:
            tails.append(cfg.tail_m)
        if cfg.block_m <= SWAP_AB_MAX_BLOCK_M:
            gus, dns = with_register_caps(with_swap_twins(gus), cfg.block_m, 1 if fp8 else 2), with_swap_twins(dns)
        # each unstacked; with `stack` also stacked where it fits (the entry's own stacking among those)
        gus = with_twins(with_tma_twins(gus), lambda g: (replace(g, stack_gate_up=False),))
        if stack:
            gus = with_stacked_twins(gus, cfg.block_m)
        plan[T] = {(cfg.block_m, t): (gus, with_activation_tma_twins(with_tma_twins(dns))) for t in tails}
    return plan


def persistent_plan(table: dict, tokens: list[int], rescale: bool = False) -> dict:
    """Candidates for `--persistent`: for each T, the table's configuration as it is (same BLOCK_M, tail,
    tiles, warps, stages, TMA; its promotion "sync" unless `rescale`) against the same tiles as persistent
    kernels, with the table's weight loads and with their TMA twin (down: also with its activation rows
    through TMA, the pair `benchmarks/ws_probe.py` found fastest); the table keeps whichever is fastest."""
    def twins(g):       # a persistent walk takes no split
        return with_twins([g], lambda g: (g, *(with_tma(g, tma, persistent=True, split_k=1)
                                               for tma in (g.tma, not g.tma))))
    return {T: {(cfg.block_m, cfg.tail_m): (twins(cfg.gate_up), with_activation_tma_twins(twins(cfg.down)))}
            for T, cfg in _entries(table, tokens, rescale)}


# the Gluon pipeline (`triton_ws`: tiles of 128 rows) is tried from GLUON_MIN_ROWS rows per expert (T * k / L;
# the lookup keeps an entry's `gluon` for those batches only), and chosen where it beats the tiles end to
# end by more than GLUON_MARGIN (run-to-run noise: an entry does not flip between two paths that tie)
GLUON_MARGIN = 0.02
# Each path of an end-to-end comparison runs back to back this long before its warm-ups (`Timer.settle_ms`):
# timed in turn unsettled, the path timed first after the kernels' timings starts at a higher clock on a GPU
# at its power limit (benchmarks/notes_kernels.md, twenty-second pass).
END_TO_END_SETTLE_MS = 1000.0


def table_plan(table: dict, tokens: list[int], rows_per_expert, rescale: bool = False) -> dict:
    """Candidates for `--gluon`: for each T with GLUON_MIN_ROWS rows per expert or more
    (`rows_per_expert(T)`), the table's configuration alone (its promotion "sync" unless `rescale`), to
    be timed against the Gluon pipeline."""
    return {T: {(cfg.block_m, cfg.tail_m): ([cfg.gate_up], [cfg.down])} for T, cfg in _entries(table, tokens, rescale)
            if rows_per_expert(T) >= GLUON_MIN_ROWS}


@dataclass
class Problem:
    """One shape to tune, with its weights on the GPU."""
    cfg: object                # MoEConfig
    fmt: str                   # table format name
    weights: object            # ExpertWeights
    fp8: bool

    @property
    def sizes(self) -> tuple[int, int, int, int]:
        L, two_i, H = self.weights.w13.shape
        return L, H, two_i // 2, self.cfg.top_k


# ---------------------------------------------------------------------------------- parallel compile
def _compile_job(job: tuple) -> str | None:
    """Worker: compile one kernel configuration (Triton's warmup: no launch), return an error or None."""
    kind, kwargs = job
    try:
        from ..kernels import fused_moe
        fn = fused_moe.launch_gate_up if kind == "gate_up" else fused_moe.launch_down
        fn(warmup=True, **kwargs)
        return None
    except Exception as exc:  # reported, and the candidate dropped
        return f"{kind} {kwargs.get('gemm')}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"


def _worker_init():
    torch.cuda.init()


# ------------------------------------------------------- the compiles the timing process does again
def _cache_parts(src, metadata: dict) -> dict[str, str]:
    """What Triton's disk cache keys one compile on (`triton.compile`), part by part: the kernel's source key
    and specialization, and the options, target and environment its metadata holds."""
    names = list(getattr(src.fn, "arg_names", []))

    def arg(key) -> str:                 # Triton keys constants and attributes by (argument index,)
        i = key[0] if isinstance(key, tuple) and len(key) == 1 else key
        return names[i] if isinstance(i, int) and 0 <= i < len(names) else str(key)
    parts = {"kernel": str(src.name), "source": str(getattr(src.fn, "cache_key", ""))}
    parts.update({f"type of {k}": str(v) for k, v in src.signature.items()})
    parts.update({f"value of {arg(k)}": str(v) for k, v in src.constants.items()})
    parts.update({f"attributes of {arg(k)}": str(v) for k, v in src.attrs.items()})
    try:                                 # the two parts of the key the metadata leaves out
        from triton.compiler import make_backend
        from triton.runtime.cache import triton_key
        parts["triton key"] = hashlib.sha256(triton_key().encode()).hexdigest()[:16]
        parts["backend key"] = str(make_backend(metadata["target"]).hash())
    except Exception as exc:             # a Triton that keeps them elsewhere: said, not fatal
        parts["triton key"] = f"unreadable: {type(exc).__name__}"
    # as JSON: a compile found in the cache reads its metadata back from JSON (tuples come back as lists)
    parts.update({f"metadata.{k}": json.dumps(v, default=str, sort_keys=True) for k, v in metadata.items()
                  if k != "hash"})
    # not parts of the key but where it is looked up under: the key itself and the cache folder
    parts["key hash"] = str(metadata.get("hash", ""))
    try:
        from triton import knobs
        parts["cache dir"] = str(knobs.cache.dir)
    except (ImportError, AttributeError):
        parts["cache dir"] = os.environ.get("TRITON_CACHE_DIR", "?")
    return parts


_LOOKUP_PARTS = ("key hash", "cache dir")


class CompileLog:
    """Triton's compiles in this process while it is entered (its compilation listener): each compile's name,
    whether Triton's disk cache had it, and the parts its key is made of (`_cache_parts`)."""

    def __init__(self):
        self.compiles: list[tuple[str, bool, dict]] = []

    def __enter__(self):
        try:
            from triton import knobs
            self._knobs, self._before = knobs.compilation, knobs.compilation.listener
        except (ImportError, AttributeError):      # no Triton, or one without the listener: nothing logged
            self._knobs = None
            return self
        self._knobs.listener = self._listen
        return self

    def __exit__(self, *exc):
        if self._knobs is not None:
            self._knobs.listener = self._before

    def _listen(self, src, metadata, metadata_group, times, cache_hit, **_):
        try:
            self.compiles.append((src.name, bool(cache_hit), _cache_parts(src, dict(metadata))))
        except Exception as exc:      # a Triton whose sources or metadata look otherwise: counted, not explained
            self.compiles.append((getattr(src, "name", "?"), bool(cache_hit), {"unreadable": repr(exc)}))

    def missed(self) -> list[tuple[str, dict]]:
        return [(name, parts) for name, hit, parts in self.compiles if not hit]


def _compile_job_logged(job: tuple) -> tuple[str | None, list[dict]]:
    """Worker: `_compile_job`, and the key parts of what it compiled (to say, if the timing process compiles a
    candidate again, how its key differs from the worker's)."""
    log = CompileLog()
    with log:
        err = _compile_job(job)
    return err, [parts for _, _, parts in log.compiles]


def recompiled_report(log: CompileLog, compiled: list[dict]) -> str | None:
    """None when the timing process compiled none of the kernels the workers compiled; else how many it
    compiled again and, for the first, the parts of its key that differ from the nearest worker compile."""
    names = {p.get("kernel") for p in compiled}
    again = [(name, parts) for name, parts in log.missed() if name in names]
    if not again:
        return None
    name, first = again[0]
    head = (f"the timing process compiled {len(again)} {name} kernels again that its workers had compiled (one after "
            f"another); the first")
    same = [p for p in compiled if p.get("kernel") == name]
    twin = next((p for p in same if first.get("key hash") and p.get("key hash") == first.get("key hash")), None)
    if twin is not None:          # the same key: the cache did not give back what a worker stored
        return (f"{head} has the key of a worker compile ({first['key hash'][:16]}), so Triton's cache did not give "
                f"it back: cache dir workers {twin.get('cache dir', '?')}, here {first.get('cache dir', '?')}")
    near = min(same, key=lambda p: sum(p.get(k) != v for k, v in first.items()))
    # the specialization first, then what the compile's metadata holds (options, target, environment, outputs)
    differ = sorted((k for k in set(first) | set(near) if first.get(k) != near.get(k) and k not in _LOOKUP_PARTS),
                    key=lambda k: (k.startswith("metadata."), k))
    said = "; ".join(f"{k}: workers {str(near.get(k, '-'))[:120]}, here {str(first.get(k, '-'))[:120]}"
                     for k in differ[:6])
    return (f"{head} differs from the nearest worker compile in "
            f"{said or 'nothing Triton reports (its own key: its version or ptxas)'}")


def compile_jobs(problem: Problem, block_m: int, gate_ups: list[GemmConfig], downs: list[GemmConfig],
                 tail_m: int = 0) -> list:
    """Warmup arguments mirroring what `fused_experts` passes (dtypes stand in for tensors); with
    `tail_m`, the two listed-tile variants (body tiles of block_m rows, tail tiles of tail_m rows)."""
    if tail_m > 0:
        return compile_jobs(problem, block_m, gate_ups, downs, -1) + compile_jobs(problem, tail_m, gate_ups,
                                                                                     downs, -1)
    tile_mode = 1 if tail_m < 0 else 0
    from ..kernels.fused_moe import Fp8Operands, intermediate_dtype  # noqa: F401  (same module the launch uses)
    L, H, I, k = problem.sizes
    x_dtype = torch.float8_e4m3fn if problem.fp8 else problem.weights.w13.dtype
    out_dtype = problem.cfg.dtype
    mode1 = mode2 = None
    if problem.fp8:
        mode1, mode2 = _fp8_modes(problem)
    act_dtype = (torch.float8_e4m3fn if (mode1 and mode1.out_fp8)
                 else intermediate_dtype(out_dtype if problem.fp8 else x_dtype))
    down_in = torch.float8_e4m3fn if problem.fp8 else act_dtype      # per-token mode quantizes in between
    i32, f32 = torch.int32, torch.float32
    common = dict(sorted_ids=i32, block_expert=i32, num_padded=i32, counts=None, num_pairs=0, capacity=0,
                  row_blocks=1, hidden=H, inter=I, top_k=k, batched=False, block_m=block_m, tile_mode=tile_mode)
    jobs = []
    for g in gate_ups:
        jobs.append(("gate_up", dict(x=x_dtype, w13=problem.weights.w13.dtype,
                                     b13=None if problem.weights.b13 is None else f32, out=act_dtype,
                                     out_scale=f32 if (mode1 and mode1.out_fp8) else None,
                                     x_scale=f32 if problem.fp8 else None, w13_scale=f32 if problem.fp8 else None,
                                     activation=problem.cfg.activation, gemm=g, fp8=mode1, **common)))
    for g in downs:
        jobs.append(("down", dict(a=down_in, w2=problem.weights.w2.dtype,
                                  b2=None if problem.weights.b2 is None else f32,
                                  out=out_dtype if g.split_k == 1 else f32,
                                  a_scale=f32 if problem.fp8 else None, w2_scale=f32 if problem.fp8 else None,
                                  topk_weights=f32, gemm=g, fp8=mode2, **common)))
    return jobs


def _fp8_operands(problem: Problem, x_scale=None, w13_scale=None, w2_scale=None):
    """The problem's FP8 format as the kernels take it (scales given where they are launched)."""
    from ..kernels.fused_moe import Fp8Operands
    q = problem.cfg.quant
    return Fp8Operands(x_scale, w13_scale, w2_scale, q.activation_group_size, q.weight_block, q.weight_granularity)


def _fp8_modes(problem: Problem):
    return _fp8_operands(problem).modes()


# ----------------------------------------------------------------------------------------- timing
class KernelInputs:
    """The operands of the two GEMM kernels on one balanced routing of T tokens, laid out for tiles of
    block_m rows (with tail_m: the split layout), so that each candidate configuration can be launched
    (`gate_up(g)`, `down(g)`) on the same expert layout: what the tuner times and the profiler reads."""

    def __init__(self, problem: Problem, T: int, block_m: int, gen, tail_m: int = 0):
        from ..kernels.fused_moe import intermediate_dtype, tile_launches
        from ..kernels.moe_align import align_pairs
        L, H, I, k = problem.sizes
        dev = problem.weights.w13.device
        self.problem, self.I = problem, I
        logits = torch.randn(T, L, generator=gen, device=dev)
        ids = logits.topk(k, dim=1).indices.to(torch.int32)
        self.tw = torch.softmax(torch.randn(T, k, generator=gen, device=dev), 1).reshape(-1).contiguous()
        x = torch.randn(T, H, generator=gen, device=dev).to(problem.cfg.dtype)
        self.x_scale = None
        self.mode1 = self.mode2 = None
        if problem.fp8:
            x, x_scale = problem.cfg.quant_scheme.quantize_activations(x)
            self.x_scale = x_scale.float().contiguous()
            self.mode1, self.mode2 = _fp8_modes(problem)
        self.x = x
        aligned = align_pairs(ids, L, block_m, tail_m=tail_m)
        self.rows = rows = aligned.max_rows
        out_fp8 = self.mode1 is not None and self.mode1.out_fp8
        act_dtype = torch.float8_e4m3fn if out_fp8 else intermediate_dtype(problem.cfg.dtype)
        self.act = torch.randn(rows, I, generator=gen, device=dev).to(act_dtype)          # gate_up's output
        self.act_in = self.act.to(torch.float8_e4m3fn) if problem.fp8 else self.act      # down's input
        self.act_scale = None
        if problem.fp8:
            groups = -(-I // 128) if self.mode2.a_scale_per_block else 1
            self.act_scale = (torch.rand(rows, groups, generator=gen, device=dev) * 0.01 + 0.001).reshape(
                rows, groups) if groups > 1 else torch.rand(rows, generator=gen, device=dev) * 0.01 + 0.001
        self.y = torch.empty(T * k, H, dtype=problem.cfg.dtype, device=dev)
        self._split_ys: dict = {}          # float32 partial rows of each split of the down GEMM's K range
        self.common = dict(counts=None, num_pairs=T * k, hidden=H, inter=I, top_k=k, batched=False)
        self.launches = tile_launches(aligned, block_m, tail_m)
        self._scales: dict = {}

    def gate_up(self, g: GemmConfig) -> None:
        from ..kernels.fused_moe import launch_gate_up
        p, w = self.problem, self.problem.weights
        scale_out = None
        if self.mode1 and self.mode1.out_fp8:          # one buffer per N tile width, made outside any timing
            scale_out = self._scales.get(g.block_n)
            if scale_out is None:
                scale_out = self._scales[g.block_n] = torch.empty(self.rows, -(-self.I // g.block_n),
                                                                  dtype=torch.float32, device=self.x.device)
        for tiles in self.launches:
            launch_gate_up(self.x, w.w13, w.b13, self.act, scale_out, self.x_scale, w.w13_scale, gemm=g,
                           activation=p.cfg.activation, fp8=self.mode1, **tiles, **self.common)

    def down(self, g: GemmConfig) -> None:
        from ..kernels.fused_moe import launch_down
        w = self.problem.weights
        y = self.y
        if g.split_k > 1:                  # made outside any timing (the first call is untimed)
            y = self._split_ys.get(g.split_k)
            if y is None:
                y = self._split_ys[g.split_k] = torch.empty(g.split_k * self.y.shape[0], self.y.shape[1],
                                                            dtype=torch.float32, device=self.y.device)
        for tiles in self.launches:
            launch_down(self.act_in, w.w2, w.b2, y, self.act_scale, w.w2_scale, self.tw, gemm=g, fp8=self.mode2,
                        **tiles, **self.common)


def _time_candidates(problem: Problem, T: int, block_m: int, gate_ups, downs, timer, reps: int, gen,
                     progress=None, task=None, tail_m: int = 0) -> tuple[dict, dict]:
    """Median ms of each gate_up and each down candidate on one balanced routing of T tokens (with
    `tail_m`: both launches of the split layout, body and tail tiles, timed together)."""
    inputs = KernelInputs(problem, T, block_m, gen, tail_m)
    out_gu, out_dn = {}, {}
    for g in gate_ups:
        out_gu[g] = _safe_time(timer, lambda g=g: inputs.gate_up(g), reps)
        if progress is not None:
            progress.advance(task)
    for g in downs:
        out_dn[g] = _safe_time(timer, lambda g=g: inputs.down(g), reps)
        if progress is not None:
            progress.advance(task)
    return out_gu, out_dn


RESCALE_MARGIN = 0.03     # "rescale" must beat the best "sync" candidate by this much to be chosen


def fastest(times: dict) -> GemmConfig:
    """The fastest candidate, except that "rescale" (less precise: fused_moe; timed only with
    --allow-rescale) is taken only when it beats the fastest "sync" candidate by more than RESCALE_MARGIN
    (the run-to-run noise)."""
    best = min(times, key=times.get)
    sync = [g for g in times if g.promote == "sync"]
    if best.promote != "sync" and sync:
        best_sync = min(sync, key=times.get)
        if times[best_sync] <= times[best] * (1 + RESCALE_MARGIN):
            return best_sync
    return best


def _safe_time(timer, fn, reps, graph: bool = False) -> float:
    """Median ms of `fn` on `timer` (as CUDA-graph replays when `graph`), or inf where it cannot run (this GPU's
    resources) or, asked for graph replays, was timed eagerly (its capture failed: not comparable with the
    paths replayed)."""
    try:
        timing = timer.time(fn, reps=reps, warmup=2, use_graph=graph)
    except Exception as exc:   # a configuration this GPU cannot run (resources): never chosen
        print(f"  candidate failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}", file=sys.stderr)
        return float("inf")
    if graph and timing.method != GRAPH:
        print(f"  candidate not captured in a CUDA graph (timed {timing.method}): not compared", file=sys.stderr)
        return float("inf")
    return timing.median_ms


def tune_problem(problem: Problem, tokens: list[int], reps: int = 10, pool=None, seed: int = 0,
                 console=None, plan: dict | None = None, verbose: bool = False, show_progress: bool = True,
                 rescale: bool = False, gluon: bool = True,
                 before: dict[int, MoEKernelConfig] | None = None,
                 settle_ms: float = END_TO_END_SETTLE_MS,
                 on_best=None, compile_log=None) -> dict[int, tuple[MoEKernelConfig, float]]:
    """Best configuration for each T and its time in ms, the whole experts op end to end. `pool`: a process
    pool that compiles candidates in parallel (None: compile here). `plan`: {T: {(BLOCK_M, tail_m):
    (gate_ups, downs)}} instead of the regime's candidates (`regime_plan`, with "rescale" only when `rescale`).
    For each BLOCK_M the gate+up and down candidates are ranked by their kernels' times; then each BLOCK_M's
    best, the decode kernels (T <= GEMV_MAX_TOKENS), the Gluon pipeline (`gluon`, where it can run) and
    `before` (what the lookup served at T before this tune, by T: `served_at`) race end to end (`_race`),
    and `end_to_end_choice` picks: what was served stays unless something beats it whole.
    `settle_ms`: how long each path of those end-to-end comparisons runs before it is timed. `on_best(T, (config,
    ms))`: called as each T is decided, before the next T is timed (`epmoe tune` writes it to the table then, so a
    tune cut short keeps the batch sizes it finished). `compile_log(record)`: given the workers' compiles (their
    `CompileLog` key parts), then each layout's compiles in this process (`--compile-log`)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from .gpu_timing import GpuTimer, Timer
    L, H, I, k = problem.sizes
    if plan is None:
        plan = regime_plan(tokens, lambda T: T * k / L, problem.fp8, problem.fmt == "fp8_block", rescale,
                           can_stack_gate_up(problem.fmt, I))
    # compile everything first, in parallel
    all_jobs, seen = [], set()
    for T, by_bm in plan.items():
        for (bm, tail), (gus, dns) in by_bm.items():
            for job in compile_jobs(problem, bm, gus, dns, tail):
                key = (job[0], job[1]["block_m"], job[1]["tile_mode"], job[1]["gemm"])
                if key not in seen:
                    seen.add(key)
                    all_jobs.append(job)
    failed: set = set()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, disable=not show_progress) as progress:
        task = progress.add_task(escape(f"compile {problem.fmt} {shape_key(L, H, I, k, problem.fmt)}"),
                                 total=len(all_jobs))
        results = pool.map(_compile_job_logged, all_jobs) if pool is not None else map(_compile_job_logged, all_jobs)
        compiled: list[dict] = []              # the key parts of every worker compile
        for job, (err, parts) in zip(all_jobs, results):
            progress.advance(task)
            compiled += parts
            if err:
                failed.add((job[0], job[1]["block_m"], job[1]["gemm"]))   # any tile mode: dropped
                progress.console.print(f"  compile failed: {escape(str(err))}")
        if compile_log is not None:
            compile_log({"workers": compiled})
        timer = GpuTimer(problem.weights.w13.device)
        ends_timer = Timer(timer.clock, settle_ms)       # the end-to-end comparisons: each path settled
        gen = torch.Generator(device=problem.weights.w13.device).manual_seed(seed)
        total = sum(len(g) + len(d) for by_bm in plan.values() for g, d in by_bm.values())
        task = progress.add_task(f"time {problem.fmt}", total=total)
        best: dict[int, tuple[MoEKernelConfig, float]] = {}
        ws = None
        for T, by_bm in plan.items():
            tiles = []                              # each BLOCK_M's best tiles, by their kernels' time
            for (bm, tail), (gus, dns) in by_bm.items():
                heights = (bm, tail) if tail else (bm,)
                gus = [g for g in gus if all(("gate_up", h, g) not in failed for h in heights)]
                dns = [g for g in dns if all(("down", h, g) not in failed for h in heights)]
                with CompileLog() as log:
                    t_gu, t_dn = _time_candidates(problem, T, bm, gus, dns, timer, reps, gen, progress, task,
                                                  tail_m=tail)
                again = recompiled_report(log, compiled)
                if compile_log is not None:
                    compile_log({"T": T, "block_m": bm, "tail_m": tail, "timing": [
                        {"kernel": name, "cache_hit": hit, "parts": parts} for name, hit, parts in log.compiles]})
                if again:
                    progress.console.print(escape(f"    T={T} BM{bm}+{tail}: {again}"), soft_wrap=True)
                if not t_gu or not t_dn:
                    continue
                if verbose:
                    for kind, times in (("gate_up", t_gu), ("down", t_dn)):
                        for g, ms in times.items():
                            progress.console.print(f"      T={T} BM{bm}+{tail} {kind} {g.describe()}: {ms:.4f} ms",
                                                   soft_wrap=True)
                g_best, d_best = fastest(t_gu), fastest(t_dn)
                ms = t_gu[g_best] + t_dn[d_best]
                progress.console.print(f"    T={T} BM{bm}+{tail}: {ms:.4f} ms (kernels)")
                if ms < float("inf"):
                    tiles.append((ms, MoEKernelConfig(bm, g_best, d_best, tail)))
            if not tiles:
                continue
            # as the lookup will serve them (a small problem's tiles shrunk, stages dropped to fit)
            tiles = [fit_to_problem(cfg, H, I, problem.fmt) for _, cfg in sorted(tiles, key=lambda t: t[0])]
            gemvs, note = _gemv_pair(problem, T, timer, reps, gen) if T <= GEMV_MAX_TOKENS else ([], "")
            if note:
                progress.console.print(escape(f"    T={T} decode kernels{note}"), soft_wrap=True)
            takes_gluon = T * k / L >= GLUON_MIN_ROWS
            if gluon and ws is None and takes_gluon:
                ws, why = _gluon_experts(problem)
                if why:
                    progress.console.print(escape(f"  the Gluon pipeline is not timed: {why}"))
                    gluon = False
            served = (before or {}).get(T)
            if served is not None and not rescale:          # "rescale" is written only where it was allowed
                served = as_sync(served)
            paths = end_to_end_paths(tiles, gemvs, gluon=ws is not None and takes_gluon, before=served)
            sampler = _race_sampler(problem.weights.w13.device)      # sampling for this race only
            with sampler if sampler is not None else contextlib.nullcontext():
                ends = _race(problem, T, paths, ws, ends_timer, reps, gen, progress.console, sampler)
            if sampler is not None and sampler.error:
                progress.console.print(escape(f"    T={T}: no clock record beside the end-to-end times: "
                                              f"{sampler.error}"), soft_wrap=True)
            chosen = end_to_end_choice(ends, paths, served_path(paths, served))
            if chosen is None:
                progress.console.print(f"  T={T:5d}: every configuration failed end to end; no entry written")
                continue
            best[T] = (with_fastest_tiles(chosen, ends, paths), ends[chosen])
            progress.console.print(escape(f"  T={T:5d}: {best[T][0].describe()}  {ends[chosen]:.4f} ms end to "
                                          f"end ({chosen})"), soft_wrap=True)
            if on_best is not None:
                on_best(T, best[T])
    return best


def _routed_tokens(problem: Problem, T: int, gen):
    """One random routing of T tokens (k distinct experts each, softmax weights) and their hidden rows in
    the layer's dtype: the batch the end-to-end comparisons run."""
    L, H, _, k = problem.sizes
    dev = problem.weights.w13.device
    ids = torch.randn(T, L, generator=gen, device=dev).topk(k, dim=1).indices.to(torch.int32)
    tw = torch.softmax(torch.randn(T, k, generator=gen, device=dev), 1)
    return ids, tw, torch.randn(T, H, generator=gen, device=dev).to(problem.cfg.dtype)


def decode_path_takes(problem: Problem) -> bool:
    """Whether the decode kernels (`decode_gemv`) take this problem's format: every unquantized one, and the
    FP8 formats `fp8_supported` names."""
    if not problem.fp8:
        return True
    from ..kernels.decode_gemv import fp8_supported
    _, H, I, _ = problem.sizes
    return fp8_supported(_fp8_operands(problem), H, I)


def _gemv_pair(problem: Problem, T: int, timer, reps: int, gen) -> tuple[list[GemvConfig], str]:
    """The decode kernels' (`decode_gemv`) best pair for T tokens, each kernel's candidates timed alone (eager,
    on `timer`, as the tile kernels are), also with PDL where the GPU has it, and a note of their times; none
    where the decode kernels do not take this format (the note says so) or every candidate failed."""
    from ..kernels.decode_gemv import launch_gemv_down, launch_gemv_gate_up, pdl_available
    if not decode_path_takes(problem):
        return [], " not raced: they do not take this FP8 format"
    L, H, I, k = problem.sizes
    w = problem.weights
    dev = w.w13.device
    ids, tw, x = _routed_tokens(problem, T, gen)
    h = torch.randn(T * k, I, generator=gen, device=dev).to(problem.cfg.dtype)
    out = torch.empty(T, H, dtype=problem.cfg.dtype, device=dev)
    ops = None
    gate_ups, downs = _GEMV_GATE_UP, _GEMV_DOWN
    if problem.fp8:
        x, xs = problem.cfg.quant_scheme.quantize_activations(x)
        ops = _fp8_operands(problem, xs.float().contiguous(), w.w13_scale, w.w2_scale)
        h = h.float()
        gate_ups = [c for c in gate_ups if c[1] % 128 == 0 and 128 % c[0] == 0]
        downs = [c for c in downs if c[1] % 128 == 0 and 128 % c[0] == 0]
    ids_flat, tw_flat = ids.reshape(-1), tw.reshape(-1).contiguous()
    b13 = None if w.b13 is None else w.b13.float().contiguous()
    b2 = None if w.b2 is None else w.b2.float().contiguous()
    t_gu, t_dn = {}, {}
    for n, kb, warps, stages in gate_ups:
        g = GemvConfig(n, kb, 8, 256, gate_up_warps=warps, gate_up_stages=stages)
        t_gu[(n, kb, warps, stages)] = _safe_time(timer, lambda g=g: launch_gemv_gate_up(
            x, w.w13, b13, ids_flat, h, k, problem.cfg.activation, g, ops), reps)
    for n, kb, warps, stages in downs:
        g = GemvConfig(16, 256, n, kb, down_warps=warps, down_stages=stages)
        t_dn[(n, kb, warps, stages)] = _safe_time(timer, lambda g=g: launch_gemv_down(
            h, w.w2, b2, ids_flat, tw_flat, out, k, g, ops), reps)
    if not t_gu or not t_dn:
        return [], ""
    gu, dn = min(t_gu, key=t_gu.get), min(t_dn, key=t_dn.get)
    if not (math.isfinite(t_gu[gu]) and math.isfinite(t_dn[dn])):
        return [], ""
    gemv = GemvConfig(gu[0], gu[1], dn[0], dn[1], gu[2], dn[2], gu[3], dn[3])
    return [gemv] + ([replace(gemv, pdl=True)] if pdl_available(dev) else []), \
        f" ({gemv.describe()}: kernels {t_gu[gu]:.4f} + {t_dn[dn]:.4f})"


def _gluon_experts(problem: Problem):
    """(`triton_ws`'s experts for this problem on its GPU, None), its GEMM self-checked; or (None, why)."""
    from .. import contract
    from ..experts.triton_ws import WarpSpecializedExperts
    why = contract.experts_problem("triton_ws", problem.cfg, "cuda")
    if why:
        return None, why
    try:
        return WarpSpecializedExperts(problem.cfg, problem.weights.w13.device), None
    except RuntimeError as exc:          # refused: its GEMM failed its self-check here
        return None, str(exc)


def end_to_end_paths(tiles: list[MoEKernelConfig], gemvs: list[GemvConfig] = (), gluon: bool = False,
                     before: MoEKernelConfig | None = None) -> dict[str, MoEKernelConfig]:
    """The configurations one end-to-end comparison races, by name: each BLOCK_M's best tiles (`tiles`, the
    fastest by kernel times first; decode and Gluon flags off: the BLOCK_M changes the alignment around the
    GEMMs, which the kernels' times leave out); with the first tiles, the decode kernels (`gemvs`: "gemv", and
    "gemv pdl" for one with PDL) and the Gluon pipeline (`gluon`: it runs in place of any tiles); and `before`, what the
    lookup served at this T before the tune, where it is not one of those (a Gluon entry of before is the
    Gluon path; where that is not raced, it runs its tiles)."""
    plain = [replace(t, gemv=None, gluon=False) for t in tiles]
    paths = {}
    for t in plain:
        paths.setdefault("tiles " + tiles_name(t), t)
    for g in gemvs:
        paths["gemv pdl" if g.pdl else "gemv"] = replace(plain[0], gemv=g)
    if gluon:
        paths["gluon"] = replace(plain[0], gluon=True)
    if before is not None:
        before = _before_as_raced(before, gluon)
        if not before.gluon and before not in paths.values():
            paths = {"table before": before, **paths}       # raced first
    return paths


def _before_as_raced(before: MoEKernelConfig, gluon: bool) -> MoEKernelConfig:
    """What runs the lookup's entry in a race: a Gluon entry is the Gluon path where that is raced (`gluon`),
    else its tiles."""
    return before if before.gluon and gluon else replace(before, gluon=False)


def tiles_name(cfg: MoEKernelConfig) -> str:
    """BLOCK_M (and the tail tiles' height) of a tile configuration, as the tuner's lines name it: BM64, BM128+64."""
    return f"BM{cfg.block_m}" + (f"+{cfg.tail_m}" if cfg.tail_m else "")


def served_path(paths: dict[str, MoEKernelConfig], before: MoEKernelConfig | None) -> str | None:
    """The name of the path that runs what the lookup served before (`end_to_end_paths`' "table before", a new
    path equal to it, or the Gluon path for a Gluon entry of before); None without one."""
    if before is None:
        return None
    before = _before_as_raced(before, "gluon" in paths)
    return "gluon" if before.gluon else next((name for name, cfg in paths.items() if cfg == before), None)


# what the lookup served stays unless a path of the race beats it by more than this (the settled run-to-run noise of
# a whole forward: an entry does not flip on a re-tune between two paths that tie)
SERVED_MARGIN = 0.01


def end_to_end_choice(ends: dict[str, float], paths: dict[str, MoEKernelConfig], served: str | None = None
                      ) -> str | None:
    """The name of the path an entry takes from one race (`ends`: end-to-end ms by name): the fastest path that
    runs tiles or the decode kernels, unless a Gluon path beats it by more than GLUON_MARGIN; and `served` (the
    path of what the lookup served before: `served_path`) unless that choice beats it by more than SERVED_MARGIN
    (run-to-run noise: an entry does not flip between two paths that tie). None where every path of tiles or
    decode kernels failed (inf): a Gluon entry's tiles serve the batches within its reach that the pipeline does
    not take, so they must run."""
    finite = {n: ms for n, ms in ends.items() if math.isfinite(ms)}
    others = [n for n in finite if not paths[n].gluon]
    if not others:
        return None
    choice = min(others, key=finite.get)
    gluons = [n for n in finite if paths[n].gluon]
    if gluons:
        g = min(gluons, key=finite.get)
        if finite[g] * (1 + GLUON_MARGIN) < finite[choice]:
            choice = g
    if served in finite and not finite[choice] * (1 + SERVED_MARGIN) < finite[served]:
        return served
    return choice


def with_fastest_tiles(name: str, ends: dict[str, float], paths: dict[str, MoEKernelConfig]) -> MoEKernelConfig:
    """The configuration of the race's winner `name`; a decode or Gluon winner with the tiles of the fastest path
    that ran tiles (the batches within its reach that the decode kernels or the pipeline do not take run them)."""
    cfg = paths[name]
    if cfg.gemv is None and not cfg.gluon:
        return cfg
    tiles = [n for n in paths if paths[n].gemv is None and not paths[n].gluon and math.isfinite(ends.get(n, math.inf))]
    if not tiles:
        return cfg
    t = paths[min(tiles, key=ends.get)]
    return replace(cfg, block_m=t.block_m, gate_up=t.gate_up, down=t.down, tail_m=t.tail_m)


def _race_sampler(device):
    """The GPU-state sampler of the end-to-end race on `device` (a CUDA GPU; None elsewhere): each path's clocks
    beside its time, so that two races of one entry on two machines can be told apart by what the GPU ran at."""
    if torch.device(device).type != "cuda":
        return None
    return GpuStateSampler(nvidia_smi_id(device))


def _race(problem: Problem, T: int, paths: dict[str, MoEKernelConfig], ws, timer, reps: int, gen,
          console, sampler=None) -> dict[str, float]:
    """Each path end to end, by name: the `triton` experts (`forward_flat`: the alignment, the GEMMs and the
    slot sum; FP8 rows with their scales, as a dispatcher hands them over) on one random routing of T tokens,
    with the Gluon pipeline `ws` where a path says `gluon`, replayed as CUDA graphs as the benchmark and an
    engine run them, on `timer` (the tuner's settles each path first); with `sampler` (`_race_sampler`), the
    clocks of each path's stretch, its settling included, printed beside its time. The kernels' times alone, eager,
    ranked configurations unlike whole forwards at a few tokens and near 64 rows per expert
    (benchmarks/notes_kernels.md, twentieth and twenty-fourth passes)."""
    from ..experts.triton import TritonExperts
    from ..layouts import FlatBatch
    ids, tw, x = _routed_tokens(problem, T, gen)
    scales = None
    if problem.fp8:
        x, scales = problem.cfg.quant_scheme.quantize_activations(x)
    batch = FlatBatch(x, ids, tw, scales=scales)
    experts = TritonExperts(problem.cfg)          # no device: it sets up no Gluon pipeline of its own
    experts.gluon = ws
    ends, states = {}, {}
    for name, cfg in paths.items():
        experts.kernel_config = lambda n, weights, cfg=cfg: cfg
        forward = lambda: experts.forward_flat(batch, problem.weights)      # noqa: E731
        if sampler is not None:       # compiles (seconds at an idle clock) out of the record; a failure that
            # repeats is _safe_time's to report (one that does not is passed over, and the path timed)
            with contextlib.suppress(Exception):
                forward()
                torch.cuda.synchronize(x.device)
        start = time.monotonic()
        ends[name] = _safe_time(timer, forward, reps, graph=True)
        states[name] = describe_state(sampler.since(start)) if sampler is not None else ""
    timed = [f"{n} {ms:.4f} ms" + (f" [{states[n]}]" if states[n] else "") for n, ms in ends.items()]
    console.print(escape(f"    T={T} end to end: " + ", ".join(timed)), soft_wrap=True)
    return ends


# ---------------------------------------------------------------------------------------------- table
def merge_into_table(path: str, key: str, best: dict, extra: dict, seed_from: str | None = None,
                     measured: dict | None = None) -> None:
    """Write `best` ({T: (config, ms)}) into the table at `path` under `key`, beside its other T, each entry's
    ms as `measured_ms` with what was timed (`measured`: {T: label}, default "end_to_end", the whole op as the
    entry runs it). With `seed_from` (another table, where this one has no entry for `key`): that table's
    entry first, each T marked `copied_from`, so that the T not tuned here keep resolving as before (the
    lookup takes the first table that has the key); a `gluon` T is copied as its tiles, `gluon` off: that
    choice is raced on the GPU it serves, and dropping the T instead would send it to a far entry."""
    data = {"entries": {}}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    data.update({k: v for k, v in extra.items()})
    entries = data.setdefault("entries", {})
    if seed_from is not None and key not in entries:
        with open(seed_from) as f:
            seed = json.load(f)["entries"].get(key, {})
        entries[key] = {t: {**{f: v for f, v in c.items() if f != "gluon"}, "copied_from": os.path.basename(seed_from)}
                        for t, c in seed.items()}
    entry = entries.setdefault(key, {})
    for T, (cfg, ms) in best.items():
        entry[str(T)] = dict(cfg.to_dict(), measured_ms=round(ms, 5), measured=(measured or {}).get(T, "end_to_end"))
    write_table(path, data)


def write_table(path: str, data: dict) -> None:
    """A table (`data`: its fields and "entries") written to `path`, each shape's entries in order of T; written
    whole beside it, then moved over it, so a writer killed part way leaves the table as it was."""
    data["entries"] = {key: dict(sorted(entry.items(), key=lambda kv: int(kv[0])))
                       for key, entry in data["entries"].items()}
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# the batch sizes whose configuration `epmoe tune` compares before and after it writes a shape's entries: an entry
# serves every batch within a factor TABLE_REACH of its T, so a new one can take over untimed neighbours (between
# two of these powers of two the lookup may switch too: they are the sizes checked, not every size that changed)
NEIGHBOUR_SIZES = [2 ** i for i in range(15)]      # 1, 2, 4 .. 16384


def lookup_paths(path: str, own: bool, device=None) -> list[str]:
    """The tables a lookup reads with `path` written, those that exist: `path` (this GPU's table when `own`) and
    then its family's; or, for another file (--output), `path` alone, as if it were this GPU's table (the lookup
    stops at the first table that has the shape, so the family's would hide what `path` changes)."""
    paths = [path] + (table_paths_for_device(device) if own else [])
    return [p for p in dict.fromkeys(paths) if os.path.exists(p)]


def configs_served(sizes, L: int, H: int, I: int, k: int, fmt: str, device=None, paths=None) -> dict:
    """{T: (configuration, where it came from)} as the `triton` experts would look each batch size up."""
    return {T: lookup_config(T, L, H, I, k, fmt, device=device, paths=paths) for T in sizes}


def what_runs(cfg: MoEKernelConfig, decode_path: bool):
    """The part of a served configuration that runs a batch: a Gluon entry's pipeline (its tiles where that
    cannot run: the `triton` experts try it first), else its decode kernels where it has them and they take the
    format (`decode_path`), else its tiles (the other parts run nothing)."""
    if cfg.gemv is not None and decode_path and not cfg.gluon:
        return cfg.gemv
    return replace(cfg, gemv=None)


def taken_over(before: dict, after: dict, tuned, decode_path: bool = True) -> list[tuple[int, str, str]]:
    """(T, before, after: each "source: tiles") of the batch sizes not tuned now whose configuration the new
    entries changed: their tiles come from an entry timed at another T (or the heuristic no longer serves them),
    or from the same entry rewritten (the tiles say how). Only what runs counts (`what_runs`: an entry's tiles
    rewritten under decode kernels that take the format change nothing)."""
    return [(T, f"{before[T][1]}: {before[T][0].describe()}", f"{after[T][1]}: {after[T][0].describe()}")
            for T in sorted(after) if T not in tuned and T in before
            and what_runs(before[T][0], decode_path) != what_runs(after[T][0], decode_path)]


def report_taken_over(console, key: str, changed: list[tuple[int, str, str]]) -> None:
    """Say which untimed batch sizes the new entries now configure, and how to time them (or that none)."""
    if not changed:
        console.print(escape(f"  no batch size not timed here ({NEIGHBOUR_SIZES[0]}..{NEIGHBOUR_SIZES[-1]}, powers "
                             f"of two) takes other tiles for {key}"), soft_wrap=True)
        return
    console.print(escape(f"  note: {len(changed)} batch sizes not timed here now take other tiles for {key}; "
                         f"time them too (--tokens {','.join(str(T) for T, _, _ in changed)}) or check them:"))
    for T, was, now in changed:
        console.print(escape(f"    T={T}: {now} (was {was})"), soft_wrap=True)


def tune_following(tune_round, tokens, plan, served: dict, served_now, decode_path: bool, follow: bool,
                   console=None, on_round=None):
    """`tune_round(todo, plan, before)` at `tokens` (with `plan`: a quick mode's, {T: ...}, or None), then, where
    `follow`, again at the batch sizes the entries written so far took over untimed (`taken_over` against
    `served`, what the lookup served before the tune), each such round tuned whole (no plan) against what is
    served there now (the entries of the rounds before included), until no batch size is taken over that was not
    tried already: at most every one of NEIGHBOUR_SIZES. A T of `tokens` the plan leaves out (a quick mode times
    only some) counts as not tried. `served_now()`: `configs_served` over NEIGHBOUR_SIZES as the tables are now;
    `on_round(todo)`: told each follow round's batch sizes before it runs. Returns (each T's best, the batch sizes
    still taken over untimed: `taken_over`'s list)."""
    best_all: dict = {}
    tried: set = set()
    todo, before = list(tokens), served_at(tokens, served)
    while True:
        tried.update(T for T in todo if plan is None or T in plan)
        best_all.update(tune_round(todo, plan, before))
        now = served_now()
        changed = taken_over(served, now, best_all, decode_path)
        todo = [T for T, _, _ in changed if T not in tried]
        if not follow or not todo:
            return best_all, changed
        if console is not None:
            console.print(escape(f"  --follow: T = {','.join(map(str, todo))} now take the new entries' tiles "
                                 "untimed; tuning them whole"), soft_wrap=True)
        if on_round is not None:
            on_round(todo)
        plan, before = None, served_at(todo, now)


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--presets", "--preset", action=CsvList, default=None, metavar="NAMES",
                   help="model presets to tune, comma-separated (may repeat); or give --local-experts/--hidden/"
                        "--inter/--top-k")
    p.add_argument("--local-experts", type=int, metavar="L", help="experts on this GPU, L (with --hidden ...)")
    p.add_argument("--experts", dest="local_experts", type=int, action=DeprecatedAlias, new_flag="--local-experts")
    p.add_argument("--hidden", type=int, help="hidden size H")
    p.add_argument("--inter", type=int, help="intermediate size I")
    p.add_argument("--top-k", type=int, help="experts per token k")
    p.add_argument("--activation", default="silu", choices=["silu", "gelu", "swigluoai"],
                   help="activation of the experts (default: %(default)s)")
    p.add_argument("--formats", "--format", action=CsvList, default=None, metavar="FORMATS",
                   help="weight formats, comma-separated (may repeat): bf16 (default), fp16, fp8_block, fp8_channel")
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)), action=CsvList,
                   help="token counts T, comma-separated (default: %(default)s). At each T the best tiles of "
                        f"each BLOCK_M, the decode kernels (T <= {GEMV_MAX_TOKENS}), the Gluon pipeline (where it "
                        "runs) and what the lookup served there before (an entry at T or near it, or the "
                        "heuristic) run the whole experts op as CUDA graphs, and the fastest is kept (the Gluon "
                        f"pipeline only where faster by {GLUON_MARGIN * 100:.0f}%%, what was served unless beaten by "
                        f"{SERVED_MARGIN * 100:.0f}%%). An entry also serves batches within a factor {TABLE_REACH} of "
                        "its T: after writing, the batch sizes whose configuration the new entries changed untimed "
                        "(powers of two) are named")
    p.add_argument("--reps", type=int, default=10, help="timed repeats per candidate (default: %(default)s)")
    p.add_argument("--jobs", type=int, default=min(16, os.cpu_count() or 1),
                   help="parallel compile processes (default: %(default)s)")
    p.add_argument("--output", default=None,
                   help="table to merge into (default: this GPU's table in the package); each T's entry is "
                        "written as soon as that T is decided")
    p.add_argument("--refine", action="store_true",
                   help="time only the table's configuration for each T against its TMA twin, tail tiles and "
                        "(FP8) 16 warps (quick)")
    p.add_argument("--persistent", action="store_true",
                   help="time only the table's configuration for each T against the same tiles as persistent "
                        "kernels, the down GEMM also with its activation rows through TMA (quick)")
    p.add_argument("--gluon", action="store_true",
                   help="time only the table's configuration (\"sync\" unless --allow-rescale) for each T "
                        f"with {GLUON_MIN_ROWS} rows per expert or more against the warp-specialized Gluon "
                        "GEMMs (Hopper; BF16, 128x128 block and per-channel FP8), both end to end as the `triton` "
                        "experts run them (where no table has an entry at a T, the tiles the lookup serves there); "
                        f"the entry says `gluon` where those are faster by more than "
                        f"{GLUON_MARGIN * 100:.0f}%% (quick)")
    p.add_argument("--follow", action="store_true",
                   help="after writing, tune whole (every candidate, as without a quick mode) the batch sizes the "
                        "new entries took over untimed (those the note after a tune names), each raced against what "
                        "is served there after the entries written so far, then those the entries of that round "
                        "took over, until none is left: one call leaves no batch size (powers of two up to "
                        f"{NEIGHBOUR_SIZES[-1]}) served by an entry timed at another T that it changed. On a shape "
                        "with few entries that can be every one of those batch sizes")
    p.add_argument("--audit", action="store_true",
                   help="tune nothing (no GPU needed): for each table in the package (or --output), how each entry "
                        "was timed, which entries were never raced end to end, which of them the Gluon pipeline "
                        "could serve, and which batch sizes another GPU's table of the family has entries for that "
                        "this table's shapes hide (the lookup reads the first table holding a shape), with the "
                        "command that times each")
    p.add_argument("--no-gluon", action="store_true",
                   help="do not time the Gluon GEMMs (a full tune, --refine and --persistent time them where "
                        "they can run); entries rewritten keep the `gluon` they had")
    p.add_argument("--allow-rescale", action="store_true",
                   help='fp8_block: also time the "rescale" promotion, LESS PRECISE: the tensor cores then '
                        "accumulate the whole K range at their reduced FP8 accumulation precision instead of each "
                        "128-wide K block's product being promoted to float32 (the default, \"sync\"). Measured "
                        "on an H200, whole-op error against the float64 oracle: 3.9e-3 with neither GEMM "
                        "rescaled and 6.1e-3 with the down GEMM rescaled (mixtral-8x7b), 1.5-1.6e-2 with both "
                        "(deepseek-v3 32-expert shard), for a down GEMM 13-16%% faster. Taken only where "
                        'it beats the best "sync" candidate by more than 3%%; without this flag every entry '
                        'written is "sync"')
    p.add_argument("--settle-ms", type=float, default=END_TO_END_SETTLE_MS,
                   help="the end-to-end race at each T (each BLOCK_M's tiles, the decode kernels, the Gluon pipeline, "
                        "what was served before): each path runs back to back this long (ms) before it is timed, so "
                        "that on a GPU at its power limit the path timed first does not start at a higher clock "
                        "(default: %(default)g; 0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    p.add_argument("--compile-log", default=None, metavar="FILE",
                   help="append to FILE, as JSON lines, every Triton compile of the tune: the workers' (one line a "
                        "shape) and the timing process's (one line a layout), each with whether Triton's cache had "
                        "it and the parts of its cache key (to find why a kernel is compiled again)")


def _compile_log_writer(path: str | None, key: str):
    """`compile_log` for `tune_problem`: each record appended to `path` as one JSON line, with its shape."""
    if path is None:
        return None

    def append(record: dict) -> None:
        with open(path, "a") as f:
            f.write(json.dumps({"shape": key, **record}) + "\n")
    return append


def entry_writer(path: str, key: str, extra: dict, seed_from: str | None = None, keep_gluon_of: dict | None = None,
                 console=None, written: list | None = None):
    """`on_best` for `tune_problem`: each T's (config, ms) merged into the table at `path` under `key` as soon as it
    is decided (`merge_into_table`, which replaces the file whole), so a tune stopped part way keeps the T it
    finished. `keep_gluon_of` (--no-gluon: this GPU's entry before the tune, {T: config}): `gluon` kept where it
    had it (`keeping_gluon`). `written`: a list each T is appended to once it is in the table."""
    def write(T: int, result: tuple[MoEKernelConfig, float]) -> None:
        one, measured = keeping_gluon({T: result}, keep_gluon_of) if keep_gluon_of is not None else ({T: result}, {})
        merge_into_table(path, key, one, extra, seed_from=seed_from, measured=measured)
        _load_table.cache_clear()
        if written is not None:
            written.append(T)
        if console is not None:
            console.print(escape(f"    T={T} written to {path}"))
    return write


def stopped_report(path: str, tokens: list[int], begun: list[tuple[str, list[int]]], shapes: int) -> str:
    """What `epmoe tune` says when stopped part way (Ctrl-C, or SIGTERM from a time limit): the entries written
    before it, which stay in the table, and what was not tuned (`begun`: each shape begun, with its T written;
    `tokens`: the T asked for the last one, --follow's rounds included)."""
    lines = [f"epmoe tune: stopped. The entries written before it stay in {path}:"]
    for key, written in begun:
        lines.append(f"  {key}: " + (f"T = {', '.join(map(str, sorted(written)))} written" if written
                                      else "nothing written"))
    if begun:
        key, written = begun[-1]
        rest = [T for T in tokens if T not in written]
        if rest:
            lines.append(f"  not tuned: {key} at --tokens {','.join(map(str, rest))}")
    if shapes > len(begun):
        lines.append(f"  not begun: {shapes - len(begun)} of the {shapes} shape/format pairs asked for")
    return "\n".join(lines)


def _sigterm_as_interrupt():
    """SIGTERM (what `timeout` sends) raised as KeyboardInterrupt in the main thread, so a tune stopped by a time
    limit reports what it wrote and shuts its compile workers down; the handler it replaced (None off the main
    thread, where none is installed)."""
    import threading
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum, frame):
        raise KeyboardInterrupt
    return signal.signal(signal.SIGTERM, interrupt)


def keeping_gluon(best: dict, own: dict) -> tuple[dict, dict]:
    """`best` ({T: (config, ms)}, tuned with the Gluon GEMMs left out) with `gluon` kept where this GPU's
    table entry (`own`: {T: config}) had it: --no-gluon leaves the comparison out, it does not undo it. Also
    {T: "end_to_end_tiles"} for those entries: their time is their tiles', the pipeline they run was not timed."""
    kept = {T for T, (c, _) in best.items() if T in own and own[T].gluon}
    return ({T: (replace(c, gluon=True) if T in kept else c, ms) for T, (c, ms) in best.items()},
            {T: "end_to_end_tiles" for T in kept})


def check_mode_flags(args) -> None:
    """`UsageError` for flags that contradict each other (one quick mode at a time, and --gluon with
    --no-gluon) or take no such value (a negative or infinite --settle-ms)."""
    if not (math.isfinite(args.settle_ms) and args.settle_ms >= 0):
        raise UsageError(f"--settle-ms must be a finite number >= 0, got {args.settle_ms}")
    modes = [flag for flag, on in (("--refine", args.refine), ("--persistent", args.persistent),
                                   ("--gluon", args.gluon), ("--audit", args.audit)) if on]
    if len(modes) > 1:
        raise UsageError(f"{' and '.join(modes)} are separate modes (the quick modes and --audit); give one")
    if args.audit and args.follow:
        raise UsageError("--audit tunes nothing, --follow tunes more; give one")
    if args.gluon and args.no_gluon:
        raise UsageError("--gluon times the Gluon GEMMs, --no-gluon leaves them out; give one")


def _problem_configs(args) -> list:
    from ..config import MoEConfig
    from ..presets import preset_config
    from ..quant import quant_config_for
    formats = csv_values(args.formats) or ["bf16"]
    out = []
    shapes = []
    if args.presets:
        shapes = [("preset", p) for p in csv_values(args.presets)]
    elif None not in (args.local_experts, args.hidden, args.inter, args.top_k):
        shapes = [("explicit", None)]
    else:
        raise UsageError("give --presets NAMES, or all of --local-experts, --hidden, --inter, --top-k")
    for fmt in formats:
        dtype = torch.float16 if fmt == "fp16" else torch.bfloat16
        quant = None if fmt in ("bf16", "fp16") else quant_config_for(fmt)
        for kind, name in shapes:
            if kind == "preset":
                cfg = preset_config(name, dtype=dtype, quant=quant)
            else:
                cfg = MoEConfig(num_experts=args.local_experts, top_k=args.top_k, hidden_size=args.hidden,
                                intermediate_size=args.inter, activation=args.activation, dtype=dtype, quant=quant)
            out.append((fmt, cfg))
    return out


def gluon_race_entries(table: dict, tokens, served: dict, console=None) -> dict:
    """`--gluon`'s starting entries: the table's, and at each T it has none, the tiles the lookup serves there
    now (`served`: an entry within reach or the heuristic), said so: a race against what runs today, where no
    table has been written for the shape (the per-channel FP8 shapes when the Gluon GEMMs took that format)."""
    out = dict(table)
    for T in tokens:
        if T not in out and T in served:
            cfg, where = served[T]
            out[T] = replace(cfg, gemv=None, gluon=False)
            if console is not None:
                console.print(escape(f"  T={T}: no entry; racing the tiles the lookup serves ({where})"))
    return out


def served_at(tokens, served: dict) -> dict[int, MoEKernelConfig]:
    """What a tune must beat end to end at each of its T: the configuration the lookup serves that T now
    (`served`, from `configs_served`: an entry at T, or one within reach of it, or the heuristic, fitted as the
    lookup fits it). An entry at another T counts: a new entry at T = 1 replaces T = 16's tiles there, which
    may be faster."""
    return {T: served[T][0] for T in tokens}


def main(args) -> int:
    check_mode_flags(args)
    if args.audit:
        from rich.console import Console
        from .tune_audit import package_tables, report
        if args.output and not os.path.exists(args.output):
            print(f"epmoe tune: --audit: no table at {args.output}", file=sys.stderr)
            return 2
        report(Console(), [args.output] if args.output else package_tables(), verbose=args.verbosity > 0)
        return 0
    if args.compile_log:
        try:                                       # said now, not after the first shape's compiles
            open(args.compile_log, "a").close()
        except OSError as exc:
            print(f"epmoe tune: --compile-log {args.compile_log}: {exc.strerror}", file=sys.stderr)
            return 2
    if not torch.cuda.is_available():
        print("epmoe tune: needs a CUDA GPU (none is visible)", file=sys.stderr)
        return 2
    import triton
    from rich.console import Console
    from .experts import make_weights
    from ..kernels.fused_moe import weight_format
    console = Console()
    device = torch.device("cuda", torch.cuda.current_device())
    gpu = torch.cuda.get_device_name(device)
    own_path = os.path.join(CONFIG_DIR, device_table_name(gpu) + ".json")
    path = args.output or own_path
    own_table = os.path.abspath(path) == os.path.abspath(own_path)
    console.print(f"epmoe tune on {gpu}, torch {torch.__version__}, triton {triton.__version__}, "
                  f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; end-to-end paths settled "
                  f"{args.settle_ms:g} ms")
    tokens = token_counts(args.tokens)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    problems = _problem_configs(args)
    begun: list[tuple[str, list[int]]] = []         # each shape begun, with the T written for it so far
    asked: list[int] = list(tokens)                 # the T asked for the shape being tuned (--follow adds to them)
    pool = None
    if args.jobs > 1:
        import multiprocessing as mp
        pool = ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn"),
                                   initializer=_worker_init)
    sigterm = _sigterm_as_interrupt()
    try:
        for fmt, cfg in problems:
            weights, _ = make_weights(cfg, device, gen)
            fp8 = cfg.quant is not None
            gran = cfg.quant.weight_granularity if fp8 else None
            problem = Problem(cfg, weight_format(weights.w13, gran), weights, fp8)
            L, H, I, k = problem.sizes
            key = shape_key(L, H, I, k, problem.fmt)
            console.print(f"[bold]{escape(str(key))}[/bold] on {escape(gpu)}")
            written: list[int] = []
            begun.append((key, written))
            asked = list(tokens)
            plan = None
            quick = args.refine or args.persistent or args.gluon
            source = path
            # what the lookup serves before this tune: each T's rival end to end, and the neighbours' before
            served = configs_served(sorted(set(NEIGHBOUR_SIZES) | set(tokens)), L, H, I, k, problem.fmt,
                                    paths=lookup_paths(path, own_table, device))
            if quick:
                # the entry the lookup uses: this GPU's table, else one of another GPU of its family
                source = next((p for p in [path] + table_paths_for_device(device)
                               if os.path.exists(p) and key in _load_table(p)), path)
                table = _load_table(source).get(key, {}) if os.path.exists(source) else {}
                if source != path and table:
                    console.print(escape(f"  starting from {source}'s entry (this GPU's table has none)"))
                if args.gluon:
                    table = gluon_race_entries(table, tokens, served, console)
                plan = persistent_plan(table, tokens, args.allow_rescale) if args.persistent else \
                    table_plan(table, tokens, lambda T: T * k / L, args.allow_rescale) if args.gluon else \
                    refine_plan(table, tokens, lambda T: T * k / L, fp8, problem.fmt == "fp8_block",
                                args.allow_rescale, can_stack_gate_up(problem.fmt, I))
                if not plan:
                    console.print(escape(f"  nothing to time for {key}: " + (
                        f"no T with {GLUON_MIN_ROWS} rows per expert or more" if args.gluon else
                        "no entry at these T in the tables of this GPU's family") + "; skipped"))
                    continue
            # this GPU's entry before the tune: --no-gluon keeps its `gluon` marks
            own = (_load_table(path).get(key, {}) if os.path.exists(path) else {}) if args.no_gluon else None
            write = entry_writer(path, key, {
                "device": gpu, "torch": torch.__version__, "triton": triton.__version__,
                "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
                "method": "each BLOCK_M's gate_up and down candidates ranked by their kernels' times (median, "
                          "L2 flushed, balanced routing); then each BLOCK_M's best, the decode kernels, the Gluon "
                          "pipeline and what the lookup served before raced as the whole experts op (CUDA-graph "
                          f"replays, random routing, each path first run back to back for {args.settle_ms:g} ms): "
                          "measured_ms of an entry with measured=end_to_end (end_to_end_tiles: its tiles' time, "
                          "a gluon entry rewritten by --no-gluon). Entries without that mark were written "
                          "before: gate_up + down kernel time, or end to end where they have gemv or gluon"},
                seed_from=source if quick and source != path else None, keep_gluon_of=own, console=console,
                written=written)

            def tune_round(todo, round_plan, before):
                return tune_problem(problem, todo, reps=args.reps, pool=pool, seed=args.seed, console=console,
                                    plan=round_plan, verbose=args.verbosity > 0,
                                    show_progress=args.verbosity >= 0, rescale=args.allow_rescale,
                                    gluon=not args.no_gluon, before=before, settle_ms=args.settle_ms,
                                    on_best=write, compile_log=_compile_log_writer(args.compile_log, key))

            def served_now():      # looked up again after each write (the table may exist only now)
                return configs_served(NEIGHBOUR_SIZES, L, H, I, k, problem.fmt,
                                      paths=lookup_paths(path, own_table, device))

            best, changed = tune_following(tune_round, tokens, plan, served, served_now,
                                           decode_path_takes(problem), args.follow, console, on_round=asked.extend)
            console.print(escape(f"wrote {len(best)} configurations for {key} to {path}"))
            report_taken_over(console, key, changed)
            del weights
            torch.cuda.empty_cache()
    except KeyboardInterrupt:
        console.print(escape(stopped_report(path, asked, begun, len(problems))), soft_wrap=True)
        return 130
    finally:
        if sigterm is not None:
            signal.signal(signal.SIGTERM, sigterm)
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return 0
