"""`batched`: experts on the batched layout (`x [L, C, H]` + `counts [L]`), e.g. from `low_latency`.

The pure-PyTorch path is a masked batched matmul: both GEMMs run as `torch.bmm` over every expert's
whole capacity (static shapes, no host sync, CUDA-graph safe; the activation in float32 between them,
biases added in float32), and rows at or past an expert's count are set to exactly zero with a
`torch.where`, so whatever the padding rows held (they are never written by the dispatcher, and may be
NaN) never reaches an output. Outputs are unweighted: the dispatcher's combine applies the routing
weights. The cost is that of the full capacity, whatever the counts; a GPU kernel that skips the
padding rows plugs in at `BatchedExperts.forward_batched` for CUDA tensors, and this path stays the
portable one (and the one it is tested against).
"""
from __future__ import annotations

import torch

from ..contract import ExpertsCaps
from ..layouts import BATCHED, BatchedBatch, ExpertWeights
from .activations import gated_activation_fused
from .base import Experts


def batched_experts_torch(x: torch.Tensor, counts: torch.Tensor, w: ExpertWeights, activation: str,
                          out_dtype: torch.dtype) -> torch.Tensor:
    """[L, C, H] rows, [L] counts -> [L, C, H] unweighted expert outputs, zero past each count."""
    L, C, _ = x.shape
    h = torch.bmm(x, w.w13.transpose(1, 2)).float()                      # [L, C, 2I]
    if w.b13 is not None:
        h = h + w.b13.float().unsqueeze(1)
    a = gated_activation_fused(activation, h).to(x.dtype)
    y = torch.bmm(a, w.w2.transpose(1, 2))                                # [L, C, H]
    if w.b2 is not None:
        y = y.float() + w.b2.float().unsqueeze(1)
    real = torch.arange(C, device=x.device).unsqueeze(0) < counts.to(x.device).unsqueeze(1)   # [L, C]
    return torch.where(real.unsqueeze(2), y, 0.0).to(out_dtype)


class BatchedExperts(Experts):
    name = "batched"
    CAPS = ExpertsCaps(layouts=frozenset({BATCHED}), cuda_graph_safe=True,
                       summary="masked batched matmul (torch.bmm) over each expert's capacity on the batched "
                               "layout; static shapes, CUDA-graph safe")

    def forward_batched(self, batch: BatchedBatch, weights: ExpertWeights) -> torch.Tensor:
        if batch.scales is not None:
            raise ValueError("experts 'batched' take rows in the layer's dtype, got FP8 rows with scales")
        if weights.num_local_experts != batch.x.shape[0]:
            raise ValueError(f"experts 'batched': the batch has {batch.x.shape[0]} experts, the weights "
                             f"{weights.num_local_experts}")
        if batch.x.is_cuda and _triton_kernel_ready():   # the Triton kernel skips the empty capacity rows
            from ..kernels.batched_moe import batched_experts
            return batched_experts(batch.x.contiguous(), batch.counts, weights.w13, weights.w2, self.cfg.activation,
                                   top_k=self.cfg.top_k, b13=weights.b13, b2=weights.b2, out_dtype=self.cfg.dtype)
        return batched_experts_torch(batch.x, batch.counts, weights, self.cfg.activation, self.cfg.dtype)


def _triton_kernel_ready() -> bool:
    from ..kernels import triton_problem
    return triton_problem("cuda") is None
