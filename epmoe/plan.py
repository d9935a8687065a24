"""The plan: a dispatcher x experts pairing resolved once, when a layer (or a dispatcher) is built.

`epmoe.contract.build_plan` checks the pairing and writes down everything the parts must agree on; the
dispatcher and the experts are constructed from it and read it, never working any of it out again from
the config: the layout between them, who quantizes the activations and where, what crosses the wire
(dtype, scales), whether the pairing can be captured in a CUDA graph, the capacity, and the real and
padded sizes.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import torch


class Handoff(str, enum.Enum):
    """Who quantizes the activations of an FP8 layer (the value is what `epmoe info` prints)."""

    NONE = "not quantized"
    ON_THE_WIRE = "dispatcher quantizes before the wire"
    AFTER_DISPATCH = "layer quantizes after dispatch"      # on the experts' entry, the one formula
    IN_EXPERTS = "experts quantize internally"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class MoEPlan:
    """One resolved pairing. Built by `epmoe.contract.build_plan`; immutable.

    dispatcher / experts: backend names (`experts` is None for a dispatcher built on its own).
    layout: what dispatch produces ("flat" or "batched").
    handoff: who quantizes the activations (`Handoff`).
    wire_dtype: dtype of the hidden vector on the wire (the layer's dtype, or float8_e4m3fn).
    wire_scales: float32 scales per row on the wire (0: none; 1: one per row; else one per group).
    wire_scale_group: columns per scale (None: one per row, or no scales).
    cuda_graph_safe: both parts declare themselves capturable.
    host_sync: the dispatcher waits on the host for data-dependent sizes.
    max_tokens_per_rank: the capacity of fixed-capacity dispatchers (None elsewhere).
    hidden_size / padded_hidden_size / intermediate_size / padded_intermediate_size: real and padded.
    ep_size / device_type: what the plan was checked for.
    """

    cfg: object
    dispatcher: str
    experts: str | None
    layout: str
    handoff: Handoff
    wire_dtype: torch.dtype
    wire_scales: int
    wire_scale_group: int | None
    cuda_graph_safe: bool
    host_sync: bool
    max_tokens_per_rank: int | None
    hidden_size: int
    padded_hidden_size: int
    intermediate_size: int
    padded_intermediate_size: int
    ep_size: int
    device_type: str

    @property
    def fp8_on_the_wire(self) -> bool:
        return self.handoff is Handoff.ON_THE_WIRE

    def describe(self) -> dict:
        """The plan as plain values (for `epmoe info`, benchmarks' JSON and the build handshake)."""
        return {"dispatcher": self.dispatcher, "experts": self.experts, "layout": self.layout,
                "activation hand-off": self.handoff.value, "wire dtype": str(self.wire_dtype).replace("torch.", ""),
                "wire scales per row": self.wire_scales, "cuda graph safe": self.cuda_graph_safe,
                "host sync": self.host_sync, "max_tokens_per_rank": self.max_tokens_per_rank,
                "sizes (H, Hp, I, Ip)": (self.hidden_size, self.padded_hidden_size, self.intermediate_size,
                                         self.padded_intermediate_size)}
