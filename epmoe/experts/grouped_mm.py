"""`grouped_mm`: experts through `torch._grouped_mm` (CUTLASS on Hopper, a loop on the CPU).

Pairs are sorted by expert on the device (no host sync), both GEMMs run grouped over the experts'
segments, the activation runs in float32 between them, and each token's k outputs are summed in
float32 with their routing weights.
"""
from __future__ import annotations

import torch

from ..contract import ExpertsCaps
from ..layouts import FLAT, ExpertWeights, FlatBatch
from .activations import gated_activation_fused
from .base import Experts, sort_pairs_by_expert, weighted_sum_of_slots


def _grouped_mm_problem(device_type: str) -> str | None:
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    if device_type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 0):
        return "torch._grouped_mm needs a GPU of compute capability 8.0 or newer"
    if device_type == "cpu":
        try:
            torch._grouped_mm(torch.ones(2, 8), torch.ones(1, 8, 8), offs=torch.tensor([2], dtype=torch.int32))
        except (RuntimeError, NotImplementedError) as exc:
            return f"torch {torch.__version__} has no CPU torch._grouped_mm ({str(exc).splitlines()[0]})"
    return None


class GroupedMMExperts(Experts):
    name = "grouped_mm"
    CAPS = ExpertsCaps(layouts=frozenset({FLAT}), cuda_graph_safe=True,
                       summary="torch._grouped_mm over expert segments sorted on the device",
                       available=_grouped_mm_problem)

    def forward_flat(self, batch: FlatBatch, weights: ExpertWeights) -> torch.Tensor:
        n, k = batch.local_ids.shape
        if n == 0:
            return batch.x.new_zeros(batch.x.shape)
        order, _counts, offsets = sort_pairs_by_expert(batch.local_ids, weights.num_local_experts)
        x_sorted = batch.x[order // k]
        h = torch._grouped_mm(x_sorted, weights.w13.transpose(1, 2), offs=offsets)
        expert_of_row = None
        if weights.b13 is not None or weights.b2 is not None:
            expert_of_row = batch.local_ids.reshape(-1)[order].long().clamp(min=0)
        h = h.float()
        if weights.b13 is not None:
            h = h + weights.b13[expert_of_row].float()
        a = gated_activation_fused(self.cfg.activation, h).to(batch.x.dtype)
        y = torch._grouped_mm(a, weights.w2.transpose(1, 2), offs=offsets)
        if weights.b2 is not None:
            y = (y.float() + weights.b2[expert_of_row].float()).to(y.dtype)
        y_pairs = torch.empty_like(y)
        y_pairs[order] = y
        return weighted_sum_of_slots(y_pairs, batch, batch.x.dtype)
