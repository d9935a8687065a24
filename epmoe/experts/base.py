"""The experts interface and the pieces the PyTorch backends share."""
from __future__ import annotations

import abc
import dataclasses

import torch

from ..contract import ExpertsCaps
from ..layouts import BatchedBatch, ExpertWeights, FlatBatch, count_pairs
from ..plan import Handoff, MoEPlan


class Experts(abc.ABC):
    """Computes this rank's experts on a batch in a layout it declared in `CAPS.layouts`.

    Call: `experts(batch, weights) -> out`.
    Args:
        batch: `FlatBatch` (`x [N, Hp]`, `local_ids [N, k]` int32, -1 = expert elsewhere, `weights [N, k]`
            float32) or `BatchedBatch` (`x [L, C, Hp]`, `counts [L]` int32); FP8 layers: `x` float8_e4m3fn
            with `scales` float32 ([N, G] or [L, C, G]), or rows in the layer's dtype (quantized here).
        weights: this rank's `ExpertWeights` (`w13 [L, 2Ip, Hp]`, `w2 [L, Hp, Ip]`, ...).
    Returns:
        flat: `[N, Hp]`, each row's routing-weighted sum over its local slots (float32 accumulation);
        batched: `[L, C, Hp]`, unweighted, rows past `counts` unspecified (not written by the Triton
        kernel). In the layer's dtype.

    The activations of an FP8 layer are converted here and nowhere else (`activations_for`, reading the
    plan's hand-off): rows that arrive with their scales are used as they are; rows in the layer's dtype
    are quantized on entry with the one formula (what "the layer quantizes after dispatch" does: same bits
    as FP8 on the wire). A batch with scales on a layer that is not FP8, or FP8 rows without scales, is
    refused.
    """

    CAPS: ExpertsCaps
    name: str = ""

    def __init__(self, plan, device: torch.device | None = None):
        """`plan`: the layer's `MoEPlan` (what `MoELayer` passes: hand-off, sizes, scheme resolved once), or
        a bare `MoEConfig` for experts used on their own (tests, benchmarks): their plan is then built from
        it (`contract.build_plan(None, name, config, ...)`, not checked against this device)."""
        if not isinstance(plan, MoEPlan):
            from ..contract import build_plan
            device_type = torch.device(device).type if device is not None else "cpu"
            plan = build_plan(None, self.name, plan, 1, device_type, check_device=False)
        self.plan = plan
        self.device = device

    def move_to(self, device: torch.device, plan: MoEPlan) -> None:
        """Take the layer's new device and its plan there (`MoELayer.to()`, before its tensors move: a
        refusal raised here leaves the layer where it was). Backends with set-up tied to a device (a
        kernel's self-check, a pipeline a table picks) redo it here."""
        self.plan = plan
        self.device = device

    def __call__(self, batch, weights: ExpertWeights) -> torch.Tensor:
        Hp = self.plan.padded_hidden_size
        if batch.x.shape[-1] != Hp:
            raise ValueError(f"experts {self.name!r}: rows of {batch.x.shape[-1]} columns, but the layer's padded hidden "
                             f"size is {Hp} (hidden {self.plan.hidden_size}): the experts take rows as the dispatcher "
                             f"hands them over, padded with zeros to it (torch.nn.functional.pad(x, (0, Hp - H)))")
        batch = self.activations_for(batch)
        if isinstance(batch, FlatBatch):
            return self.forward_flat(batch, weights)
        if isinstance(batch, BatchedBatch):
            return self.forward_batched(batch, weights)
        raise TypeError(f"experts {self.name!r}: unknown batch type {type(batch).__name__}")

    def activations_for(self, batch):
        """The batch as this layer's experts take it, by the plan's hand-off: FP8 rows with scales on an FP8
        layer whose experts take FP8 (rows in the layer's dtype quantized with the one formula: the one
        conversion after dispatch), rows as they are otherwise."""
        handoff = self.plan.handoff
        if handoff is Handoff.NONE:
            if batch.scales is not None:
                raise ValueError(f"experts {self.name!r}: the batch carries FP8 scales but the layer is not FP8")
            return batch
        if batch.scales is not None or handoff is Handoff.IN_EXPERTS:
            return batch                 # already FP8, or experts that quantize internally
        if batch.x.dtype == torch.float8_e4m3fn:
            raise ValueError(f"experts {self.name!r}: FP8 rows came without their scales")
        x, scales = self.plan.quantize(batch.x, counts=batch.counts if isinstance(batch, BatchedBatch) else None)
        return dataclasses.replace(batch, x=x, scales=scales)

    def forward_flat(self, batch: FlatBatch, weights: ExpertWeights) -> torch.Tensor:
        """Flat batch -> [N, Hp] (see the class docstring); backends that accept the flat layout override it."""
        raise TypeError(f"experts {self.name!r} do not accept the flat layout")

    def forward_batched(self, batch: BatchedBatch, weights: ExpertWeights) -> torch.Tensor:
        """Batched batch -> [L, C, Hp] (see the class docstring); batched-layout backends override it."""
        raise TypeError(f"experts {self.name!r} do not accept the batched layout")


def sort_pairs_by_expert(local_ids: torch.Tensor, num_local: int):
    """Order the (row, slot) pairs of a flat batch by local expert, without a host sync.

    Returns (order [N*k] pair indices sorted by expert, pairs of other ranks last; counts [L] int64;
    offsets [L] int32 = cumulative counts, the end of each expert's segment).
    """
    flat = local_ids.reshape(-1).long()
    key = torch.where(flat >= 0, flat, torch.full_like(flat, num_local))
    order = torch.argsort(key, stable=True)
    counts = count_pairs(local_ids, num_local)
    offsets = torch.cumsum(counts, 0).to(torch.int32)
    return order, counts, offsets


FP16_ROW_LIMIT = 256.0
"""float16 GEMM operands: the largest magnitude a row keeps (see `gemm_rows`)."""


def gemm_rows(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows `t [..., K]` (any float dtype) as the operand of a GEMM in `dtype`, and the float32 factor
    [..., 1] to multiply that GEMM's output by (None: no factor, the rows were only cast).

    float16 tops out at 65504: a row of act(gate) * up (float32) can pass it while the layer's output
    still fits, and a cast would make it Inf. So in float16 each row is divided by a power of two that
    brings its largest magnitude to at most FP16_ROW_LIMIT (rows already within keep factor 1 and their
    exact bits; dividing by a power of two is exact), and the output is scaled back in float32. A GEMM
    output then overflows only where a weight row's absolute sum exceeds 65504 / FP16_ROW_LIMIT. A row
    holding NaN or Inf gets a NaN or Inf factor: it stays in its own row.
    """
    if dtype != torch.float16:
        return t.to(dtype), None
    amax = t.detach().abs().amax(dim=-1, keepdim=True).float()
    factor = torch.exp2(torch.ceil(torch.log2(amax / FP16_ROW_LIMIT))).clamp(min=1.0)
    return (t.float() / factor).to(torch.float16), factor


def scale_back(y: torch.Tensor, factor: torch.Tensor | None) -> torch.Tensor:
    """The output of a GEMM on `gemm_rows` operands, in float32 with the rows' factor applied."""
    return y.float() if factor is None else y.float() * factor


def weighted_sum_of_slots(y_pairs: torch.Tensor, batch: FlatBatch, out_dtype: torch.dtype) -> torch.Tensor:
    """[N*k, H] per-pair outputs (pair order) -> [N, H]: sum over slots of weight * y, in float32.

    Pairs whose expert is on another rank contribute exactly zero, whatever their row holds.
    """
    n, k = batch.local_ids.shape
    valid = (batch.local_ids >= 0).reshape(n, k, 1)
    y = y_pairs.reshape(n, k, -1).float()
    y = torch.where(valid, y * batch.weights.reshape(n, k, 1), torch.zeros((), device=y.device))
    return y.sum(dim=1).to(out_dtype)
