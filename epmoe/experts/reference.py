"""`reference`: a plain PyTorch loop over local experts, float32 arithmetic, any device and layout.

Slow and obviously right; the in-library counterpart of `epmoe.reference_moe`. FP8 layers: it takes
FP8 rows with their scales, dequantizes rows and weights, computes in float32, and quantizes the
intermediate activation with the same formula before the down projection (what FP8 GEMMs do)."""
from __future__ import annotations

import torch

from ..contract import TAKES_FP8, ExpertsCaps
from ..layouts import BATCHED, FLAT, BatchedBatch, ExpertWeights, FlatBatch
from ..quant.fp8 import dequantize_weight
from ..registry import register_experts
from ..activations import gated_activation_fused
from .base import Experts


def _expert_forward(x: torch.Tensor, w: ExpertWeights, e: int, plan) -> torch.Tensor:
    """One expert on rows `x` (float, or FP8 already dequantized by the caller) in float32."""
    fp8 = w.w13_scale is not None
    block = plan.weight_block
    w13 = dequantize_weight(w.w13[e], w.w13_scale[e], block) if fp8 else w.w13[e].float()
    h = x.float() @ w13.T
    if w.b13 is not None:
        h = h + w.b13[e].float()
    a = gated_activation_fused(plan.activation, h)
    if fp8:
        a = plan.dequantize(*plan.quantize(a))
    w2 = dequantize_weight(w.w2[e], w.w2_scale[e], block) if fp8 else w.w2[e].float()
    y = a @ w2.T
    if w.b2 is not None:
        y = y + w.b2[e].float()
    return y


@register_experts("reference")
class ReferenceExperts(Experts):
    CAPS = ExpertsCaps(layouts=frozenset({FLAT, BATCHED}),
                       quant=frozenset({"none", "fp8_block", "fp8_channel", "fp8_tensor"}),
                       fp8_activations=TAKES_FP8, reads_strided_rows=True, auto_priority=1,
                       summary="PyTorch loop over experts in float32; slow, any device")

    def _rows(self, batch) -> torch.Tensor:
        """The batch's rows in float32 (FP8 rows dequantized with their scales, see `activations_for`)."""
        if not self.plan.fp8:
            return batch.x
        return self.plan.dequantize(batch.x, batch.scales)

    def forward_flat(self, batch: FlatBatch, weights: ExpertWeights) -> torch.Tensor:
        x = self._rows(batch)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e in range(weights.num_local_experts):
            rows, slots = (batch.local_ids == e).nonzero(as_tuple=True)
            if rows.numel():
                y = _expert_forward(x[rows], weights, e, self.plan)
                out.index_add_(0, rows, y * batch.weights[rows, slots].unsqueeze(1))
        return out.to(self.plan.dtype)

    def forward_batched(self, batch: BatchedBatch, weights: ExpertWeights) -> torch.Tensor:
        x = self._rows(batch)
        out = torch.zeros(x.shape, dtype=self.plan.dtype, device=x.device)
        for e, n in enumerate(batch.counts.tolist()):
            if n:
                out[e, :n] = _expert_forward(x[e, :n], weights, e, self.plan).to(out.dtype)
        return out
