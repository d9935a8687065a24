"""What travels between a dispatcher and an experts backend.

Two layouts (a dispatcher declares the one it produces, experts declare the ones they accept):

- `flat`: rows of tokens `x [N, H]` with, per row, the local ids of the experts it visits on this rank
  (`local_ids [N, k]`, -1 = that slot's expert lives elsewhere) and their routing weights. The experts
  return `[N, H]`: each row's weighted sum over its local slots, accumulated in float32. A token
  therefore travels once per destination rank, not once per expert.
- `batched`: `x [L, C, H]` (L local experts, capacity C rows each) plus `counts [L]`; rows past an
  expert's count are padding the experts must neither trust nor need. The experts return `[L, C, H]`
  unweighted; the combine applies the routing weights.

FP8 dispatch adds `scales` (float32, one per row or per 128-column group) beside `x`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

FLAT = "flat"
BATCHED = "batched"
LAYOUTS = (FLAT, BATCHED)


@dataclass
class FlatBatch:
    x: torch.Tensor
    local_ids: torch.Tensor
    weights: torch.Tensor
    scales: torch.Tensor | None = None
    layout: str = FLAT

    @property
    def num_rows(self) -> int:
        return self.x.shape[0]


@dataclass
class BatchedBatch:
    x: torch.Tensor
    counts: torch.Tensor
    scales: torch.Tensor | None = None
    layout: str = BATCHED

    @property
    def capacity(self) -> int:
        return self.x.shape[1]


@dataclass
class ExpertWeights:
    """One rank's expert weights in the fused layout.

    w13: [L, 2I, H] (gate rows then up rows), w2: [L, H, I]; optional biases b13 [L, 2I], b2 [L, H];
    optional FP8 dequantization scales beside them (set by the quantization scheme).
    """

    w13: torch.Tensor
    w2: torch.Tensor
    b13: torch.Tensor | None = None
    b2: torch.Tensor | None = None
    w13_scale: torch.Tensor | None = None
    w2_scale: torch.Tensor | None = None

    @property
    def num_local_experts(self) -> int:
        return self.w13.shape[0]
