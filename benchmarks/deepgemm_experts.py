"""DeepGEMM's grouped GEMMs inside the `triton_ws` experts' pipeline: a prototype to time and check beside it
(`profile_experts_steps.py --backends triton_ws,deepgemm,deepgemm_down`), not a backend of the library.

DeepGEMM's block-FP8 grouped contiguous GEMM (`m_grouped_fp8_gemm_nt_contiguous`) takes rows grouped by expert in
segments of 128 (the expert of each row in `m_indices`, -1 where no expert's rows are), A's scales per group of
128 columns and B's per 128x128 block, and writes BF16. That is `triton_ws`'s padded layout (tiles of 128 rows,
one expert each), so the pipeline stays `triton_ws`'s but for the GEMMs:
1. the layout and the row copy (`align_pairs`, `rows_to_layout`), as in `triton_ws`;
2. gate+up by DeepGEMM into BF16 [rows, 2I] (A's scales handed over as the K-block-major copy makes them, a
   transposed view: MN-major, as DeepGEMM's SM90 kernels read them);
3. the activation and the FP8 quantization per group of 128 columns in one pass (`gated_rows`), where `triton_ws`
   does both in its gate+up's epilogue from the float32 accumulators (so here BF16 [rows, 2I] is written and read
   once more, over every row of the layout's bound, and gate and up are rounded to BF16 before the activation);
4. down by DeepGEMM (`deepgemm_down`), or by `triton_ws`'s Gluon GEMM (`deepgemm`);
5. the slot sum, as in `triton_ws`.
Block FP8 without expert biases only (DeepGEMM adds none). DeepGEMM does not skip the tiles marked -1: it reads
through them and writes zeros there. `DeepGemmExperts.deep_gemm` is the module: the import of `deep_gemm` unless
a test puts a stand-in there.

Timed on an H100 (`results/experts_steps_deepgemm_H100_2026-12-07_4c62709.json`): neither form's forward is faster
than `triton_ws`'s (0.2-7.1% more kernel time at the deepseek-v3 32-expert shard and mixtral): DeepGEMM's gate+up
plus the separate activation pass takes as long as the fused gate+up or longer, and the error against the oracle
is 3.3-3.6x `triton_ws`'s (likely gate and up rounded to BF16 before the activation). So the library has no
DeepGEMM path; this stays to time DeepGEMM again where it or the pipeline changes.
"""
from __future__ import annotations

import torch

from epmoe.experts.triton_ws import TILE, WarpSpecializedExperts, fp8_form
from epmoe.layouts import ExpertWeights, FlatBatch

DOWNS = ("gluon", "deepgemm")


def problem(cfg, with_bias: bool = False) -> str | None:
    """Why the prototype cannot run this layer; None if it can."""
    if cfg.quant is None or cfg.quant_scheme.kind != "fp8_block":
        return "DeepGEMM's grouped GEMMs here take block FP8 (128x128 weight blocks) only"
    if with_bias:
        return "DeepGEMM's grouped GEMMs add no bias"
    return None


class DeepGemmExperts(WarpSpecializedExperts):
    """`triton_ws`'s pipeline with DeepGEMM's gate+up (and, with down="deepgemm", its down GEMM)."""

    deep_gemm = None
    _aligned_to = None       # the module whose alignment was checked
    # as this prototype was timed (results/experts_steps_deepgemm_H100_2026-12-07_4c62709.json): the fixed walk
    LONG_WALK = False

    def __init__(self, plan, device: torch.device | None = None, down: str = "gluon"):
        if down not in DOWNS:
            raise ValueError(f"DeepGemmExperts: down must be one of {DOWNS}, got {down!r}")
        super().__init__(plan, device)
        self.down = down

    def _deep_gemm(self):
        """The module, its row segments checked once to be our tiles (a wider alignment would put two experts'
        tiles in one segment)."""
        if self.deep_gemm is None:
            import deep_gemm
            type(self).deep_gemm = deep_gemm
        dg = self.deep_gemm
        if self._aligned_to is not dg:
            aligned = dg.get_mk_alignment_for_contiguous_layout()
            if aligned != TILE:
                raise RuntimeError(f"DeepGemmExperts: DeepGEMM groups rows in segments of {aligned}, the layout in "
                                   f"tiles of {TILE}")
            self._aligned_to = dg
        return dg

    def forward_flat(self, batch: FlatBatch, weights: ExpertWeights) -> torch.Tensor:
        from epmoe.kernels.gated_rows import gated_rows
        from epmoe.kernels.layout_copy import rows_to_layout
        if fp8_form(self.plan) != "block" or weights.b13 is not None or weights.b2 is not None:
            raise ValueError("DeepGemmExperts: block FP8 without expert biases only")
        dg = self._deep_gemm()
        x = batch.x
        if x.shape[0] == 0:
            return torch.zeros(x.shape, dtype=self.plan.dtype, device=x.device)
        n, k, H, inter, fp8, aligned, rows, tile_expert, walk = self.padded_layout(batch, weights)
        if rows != tile_expert.numel() * TILE:
            raise AssertionError(f"DeepGemmExperts: {rows} layout rows are not {tile_expert.numel()} tiles of {TILE}")
        a, a_scale_t, row_of_pair = rows_to_layout(x, batch.scales, aligned, k)
        m_indices = tile_expert.repeat_interleave(TILE)          # -1 in the tiles past the used ones
        h = torch.empty(rows, 2 * inter, dtype=torch.bfloat16, device=x.device)
        dg.m_grouped_fp8_gemm_nt_contiguous((a, a_scale_t.t()), (weights.w13, weights.w13_scale), h, m_indices)
        act, act_scale = gated_rows(h, self.plan.activation, torch.bfloat16, quant_group=TILE)
        y = torch.empty(rows, H, dtype=torch.bfloat16, device=x.device)
        if self.down == "deepgemm":
            dg.m_grouped_fp8_gemm_nt_contiguous((act, act_scale), (weights.w2, weights.w2_scale), y, m_indices)
        else:
            self._gemm()(act, weights.w2, tile_expert, y, act_scale.t().contiguous(), weights.w2_scale, None,
                         walk_groups=walk)
        return self.slot_sum(y, row_of_pair, batch)
