"""`reference`: a plain PyTorch loop over local experts, float32 arithmetic, any device and layout.

Slow and obviously right; the in-library counterpart of `epmoe.reference_moe`."""
from __future__ import annotations

import torch

from ..contract import ExpertsCaps
from ..layouts import BATCHED, FLAT, BatchedBatch, ExpertWeights, FlatBatch
from .activations import gated_activation_fused
from .base import Experts


def _expert_forward(x: torch.Tensor, w: ExpertWeights, e: int, activation: str) -> torch.Tensor:
    h = x.float() @ w.w13[e].float().T
    if w.b13 is not None:
        h = h + w.b13[e].float()
    y = gated_activation_fused(activation, h) @ w.w2[e].float().T
    if w.b2 is not None:
        y = y + w.b2[e].float()
    return y


class ReferenceExperts(Experts):
    name = "reference"
    CAPS = ExpertsCaps(layouts=frozenset({FLAT, BATCHED}),
                       summary="PyTorch loop over experts in float32; slow, any device")

    def forward_flat(self, batch: FlatBatch, weights: ExpertWeights) -> torch.Tensor:
        out = torch.zeros(batch.x.shape, dtype=torch.float32, device=batch.x.device)
        for e in range(weights.num_local_experts):
            rows, slots = (batch.local_ids == e).nonzero(as_tuple=True)
            if rows.numel():
                y = _expert_forward(batch.x[rows], weights, e, self.cfg.activation)
                out.index_add_(0, rows, y * batch.weights[rows, slots].unsqueeze(1))
        return out.to(batch.x.dtype)

    def forward_batched(self, batch: BatchedBatch, weights: ExpertWeights) -> torch.Tensor:
        out = torch.zeros_like(batch.x)
        for e, n in enumerate(batch.counts.tolist()):
            if n:
                out[e, :n] = _expert_forward(batch.x[e, :n], weights, e, self.cfg.activation).to(out.dtype)
        return out
