"""`triton_ws_down`: the library's fused Triton gate+up, then the warp-specialized Gluon GEMM as the down
GEMM (Hopper, BF16 and 128x128 block FP8).

Experimental, never picked by "auto": a measurement of the better half of each. On one H200 at T = 8192
(benchmarks/notes_kernels.md, eighth pass) the Gluon down GEMM took 0.78-0.81x the library's down kernel
in block FP8, while the Gluon gate+up (after `triton_ws`'s row copy) took 1.05-1.13x the library's
gate+up. As a whole (ninth pass) it ran 0.95-1.05x `triton_ws`, not the sum of those parts. The pipeline:
1. pairs laid out expert by expert in uniform tiles of 128 rows (`align_pairs`, no tail tiles);
2. gate+up: the library's kernel (`fused_moe.launch_gate_up`: it gathers the token rows itself, applies
   the activation and, in FP8, quantizes its output per 128 columns in its epilogue) with the tuned
   table's tiles where the table has them for 128-row tiles (FP8: 128 columns, the scale group of the
   down GEMM's K blocks), else `GATE_UP_TILES`;
3. FP8: the output's scales made K-block-major ([I/128, rows]: one float per 128 columns, small);
4. down: the Gluon GEMM, plain, with the bias, over the rows in layout order (padding rows hold what the
   gate+up left there; each output row depends on its own row only, and those rows are never read back);
5. each token's k rows gathered and summed with their routing weights in float32 (`gather_sum`), into the
   dispatcher's buffer where it gives one.
Same capabilities, self-check and PyTorch statement of the Gluon GEMM as `triton_ws`.
"""
from __future__ import annotations

import functools

import torch

from ..contract import TAKES_FP8, ExpertsCaps
from ..layouts import FLAT, ExpertWeights, FlatBatch
from ..registry import register_experts
from .triton_ws import TILE, WarpSpecializedExperts, _available, _quant_problem


def gate_up_tiles(fp8: bool):
    """The library gate+up's tiles where the table has none for 128-row tiles: those of its tuned H200
    entries at prefill (deepseek-v3 shard, mixtral; BF16 with 64-wide K blocks), before they are fitted
    to the problem (`fit_to_problem`)."""
    from ..kernels.tuning_table import GemmConfig
    return GemmConfig(block_n=128, block_k=128 if fp8 else 64, group_m=8, num_warps=8, num_stages=3, tma=True)


@functools.lru_cache(maxsize=4096)
def gate_up_config_for(n: int, L: int, H: int, inter: int, top_k: int, fp8: bool, fmt: str, device: torch.device):
    """The library gate+up's tiles for n tokens of this shape: the tuned table's (or the heuristic's) where
    they are for tiles of 128 rows, else `gate_up_tiles` fitted to the problem (FP8: N tiles of 128 either
    way, the scale group the down GEMM reads). Cached: a host lookup, once per batch size."""
    from ..kernels.tuning_table import MoEKernelConfig, fit_to_problem, lookup_config
    config, _ = lookup_config(n, L, H, inter, top_k, fmt, device)
    if config.block_m != TILE:
        tiles = gate_up_tiles(fp8)
        config = fit_to_problem(MoEKernelConfig(TILE, tiles, tiles), H, inter, fmt)
    return config.gate_up


@register_experts("triton_ws_down")
class WarpSpecializedDownExperts(WarpSpecializedExperts):
    CAPS = ExpertsCaps(layouts=frozenset({FLAT}), dtypes=frozenset({torch.bfloat16}), devices=frozenset({"cuda"}),
                       quant=frozenset({"none", "fp8_block"}), fp8_activations=TAKES_FP8, cuda_graph_safe=True,
                       auto_priority=0,
                       summary="experimental: the Triton gate+up, then the warp-specialized Gluon GEMM as down "
                               "(Hopper), BF16 and block FP8",
                       available=_available, quant_problem=_quant_problem)
    # the down GEMM alone took 3.3% more cycles with the long-expert walk (`triton_ws.walk_group`)
    LONG_WALK = False

    def gate_up_config(self, n: int, weights: ExpertWeights):
        """The gate+up's tiles for a batch of n tokens (`gate_up_config_for`)."""
        from ..kernels.fused_moe import weight_format
        L, two_i, H = weights.w13.shape
        return gate_up_config_for(n, L, H, two_i // 2, self.plan.top_k, weights.w13_scale is not None,
                                  weight_format(weights.w13, self.plan.weight_granularity), weights.w13.device)

    def forward_flat(self, batch: FlatBatch, weights: ExpertWeights) -> torch.Tensor:
        from ..kernels.fused_moe import Fp8Operands, launch_gate_up
        from ..kernels.layout_copy import rows_to_layout
        plan, gemm = self.plan, self._gemm()
        x = batch.x.contiguous()
        if x.shape[0] == 0:
            return torch.zeros(x.shape, dtype=plan.dtype, device=x.device)
        n, k, H, inter, fp8, aligned, rows, tile_expert, walk = self.padded_layout(batch, weights)
        mode1 = None
        act_scale = None
        if fp8:
            operands = Fp8Operands(x_scale=batch.scales.float().contiguous(), w13_scale=weights.w13_scale,
                                   w2_scale=weights.w2_scale, act_group=plan.act_group,
                                   weight_block=plan.weight_block, granularity=plan.weight_granularity)
            mode1, _ = operands.modes()
            act_scale = torch.empty(rows, -(-inter // TILE), dtype=torch.float32, device=x.device)
        act = torch.empty(rows, inter, dtype=torch.float8_e4m3fn if fp8 else torch.bfloat16, device=x.device)
        b13 = None if weights.b13 is None else weights.b13.float().contiguous()
        b2 = None if weights.b2 is None else weights.b2.float().contiguous()
        launch_gate_up(x, weights.w13, b13, act, act_scale, operands.x_scale if fp8 else None,
                       weights.w13_scale, aligned.sorted_ids, aligned.block_expert, aligned.num_padded, None,
                       num_pairs=n * k, capacity=0, row_blocks=aligned.max_blocks, hidden=H, inter=inter, top_k=k,
                       activation=plan.activation, batched=False, block_m=TILE, gemm=self.gate_up_config(n, weights),
                       fp8=mode1, tile_mode=0)
        act_scale_t = act_scale.t().contiguous() if fp8 else None
        y = torch.empty(rows, H, dtype=torch.bfloat16, device=x.device)
        gemm(act, weights.w2, tile_expert, y, act_scale_t, weights.w2_scale, b2, walk_groups=walk)
        _, _, row_of_pair = rows_to_layout(None, None, aligned, k)
        return self.slot_sum(y, row_of_pair, batch)
