"""What travels between a dispatcher and an experts backend.

Two layouts (a dispatcher declares the one it produces, experts declare the ones they accept):

- `flat`: rows of tokens `x [N, H]` with, per row, the local ids of the experts it visits on this rank
  (`local_ids [N, k]`, -1 = that slot's expert lives elsewhere) and their routing weights. The experts
  return `[N, H]`: each row's weighted sum over its local slots, accumulated in float32. A token
  therefore travels once per destination rank, not once per expert.
- `batched`: `x [L, C, H]` (L local experts, capacity C rows each) plus `counts [L]`; rows past an
  expert's count are padding the experts must neither trust nor need. The experts return `[L, C, H]`
  unweighted, the rows past each count unspecified (the Triton kernel does not write them: the capacity is
  the worst case, often many times the rows that arrive); the combine applies the routing weights and reads
  only the real rows. `num_tokens`, where the dispatcher sets it, is its T: the experts choose their tiles
  for the rows an even routing gives (T k / L an expert), not for a full capacity.

FP8 dispatch adds `scales` (float32, one per row or per 128-column group) beside `x`. A flat batch may
name `out` `[N, H]` in the layer's dtype: where its dispatcher's combine reads the experts' output (its
symmetric buffer). Experts that can write their output there do, and return it; any other output is copied
there by the combine, so writing there is a saving, never a condition.
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
    out: torch.Tensor | None = None       # where the combine reads the experts' output (None: anywhere)

    @property
    def num_rows(self) -> int:
        return self.x.shape[0]


@dataclass
class BatchedBatch:
    x: torch.Tensor
    counts: torch.Tensor
    scales: torch.Tensor | None = None
    layout: str = BATCHED
    # tokens on each rank behind the batch (the dispatcher's T; None: not known): the capacity is the most rows
    # an expert can get, this says how many it gets on an even routing (T k / L), which the kernels' tiles follow
    num_tokens: int | None = None

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


def count_pairs(local_ids: torch.Tensor, num_local: int) -> torch.Tensor:
    """(row, local expert) pairs of a flat batch per local expert [L] int64 (`local_ids [N, k]`, -1: not
    here), on the device, without a host sync (`torch.bincount` on CUDA reads its input's maximum back
    to the host; this does not). What dispatchers count for their statistics and experts sort by."""
    ids = local_ids.reshape(-1).long()
    key = torch.where(ids >= 0, ids, num_local)
    counts = torch.zeros(num_local + 1, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    return counts[:num_local]
