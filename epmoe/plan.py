"""The plan: a dispatcher x experts pairing resolved once, when a layer (or a dispatcher) is built.

`epmoe.contract.build_plan` checks the pairing and writes down everything the parts need; the dispatcher
and the experts are constructed from the plan (and the placement) and read nothing else: no part holds
the user's config, so a backend can be understood from these fields alone and each is computed once.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

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
    """One resolved pairing. Built by `epmoe.contract.build_plan`, and only there; immutable.

    The parts:
      dispatcher / experts: backend names (`experts` None: a dispatcher on its own, the caller runs its
        experts; `dispatcher` None: experts on their own).
      layout: what dispatch produces ("flat" or "batched"; None for experts on their own: any they accept).
      ep_size / device_type: what the plan was checked for.
    The function (from the config):
      dtype, num_experts, top_k, activation; hidden_size / padded_hidden_size / intermediate_size /
      padded_intermediate_size: real and padded (the scheme's padding).
    Quantization:
      scheme: the quantization scheme (`epmoe.quant`: weights' format, the one activation formula).
      quant: its kind ("none", "fp8_block", "fp8_channel", "fp8_tensor"); weight_block: (rows, cols) of a
        weight scale block or None; weight_granularity: "block", "channel", "tensor" or None.
      act_group: activation columns per FP8 scale (None: one per row, or not FP8).
      handoff: who quantizes the activations (`Handoff`).
    The wire and the forward:
      wire_dtype: dtype of the hidden vector on the wire (the layer's dtype, or float8_e4m3fn).
      wire_scales: float32 scales per row on the wire (0: none). wire_scale_group: columns per scale.
      experts_read_strided_rows: the experts take flat rows as strided views (fields of a receive buffer).
      cuda_graph_safe: both parts declare themselves capturable (and a capacity where one is needed).
      host_sync: the dispatcher waits on the host for data-dependent sizes.
      max_tokens_per_rank: the capacity of fixed-capacity dispatchers (None elsewhere).
    Overlap:
      micro_batches: a layer's forward runs as this many micro-batches (1 or 2) whose exchanges interleave
        with the other's experts (the dispatcher declares that many forwards in flight).
      comm_sms: the most SMs the dispatcher's transfer kernels use (None: as many as their rows need).
    """

    dispatcher: str | None
    experts: str | None
    layout: str | None
    ep_size: int
    device_type: str
    dtype: torch.dtype
    num_experts: int
    top_k: int
    activation: str
    hidden_size: int
    padded_hidden_size: int
    intermediate_size: int
    padded_intermediate_size: int
    scheme: Any
    quant: str
    weight_block: tuple[int, int] | None
    weight_granularity: str | None
    act_group: int | None
    handoff: Handoff
    wire_dtype: torch.dtype
    wire_scales: int
    wire_scale_group: int | None
    experts_read_strided_rows: bool
    cuda_graph_safe: bool
    host_sync: bool
    max_tokens_per_rank: int | None
    micro_batches: int
    comm_sms: int | None

    @property
    def fp8(self) -> bool:
        """The layer's weights and activations are FP8."""
        return self.quant != "none"

    @property
    def fp8_on_the_wire(self) -> bool:
        return self.handoff is Handoff.ON_THE_WIRE

    def quantize(self, x: torch.Tensor, counts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [..., H] -> (e4m3fn [..., H], float32 scales [..., groups]): the scheme's one formula. `counts` [L]
        with batched rows x [L, C, H]: the rows past each count need not be quantized (they are padding)."""
        return self.scheme.quantize_activations(x, counts=counts)

    def dequantize(self, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return self.scheme.dequantize_activations(q, scales)

    def describe(self) -> dict:
        """The plan as plain values (for `epmoe info`, benchmarks' JSON and the build handshake)."""
        return {"dispatcher": self.dispatcher, "experts": self.experts, "layout": self.layout,
                "dtype": str(self.dtype).replace("torch.", ""), "quant": self.quant,
                "experts, top_k": (self.num_experts, self.top_k), "activation": self.activation,
                "activation hand-off": self.handoff.value, "wire dtype": str(self.wire_dtype).replace("torch.", ""),
                "wire scales per row": self.wire_scales, "cuda graph safe": self.cuda_graph_safe,
                "host sync": self.host_sync, "max_tokens_per_rank": self.max_tokens_per_rank,
                "micro-batches": self.micro_batches, "comm SMs": self.comm_sms,
                "sizes (H, Hp, I, Ip)": (self.hidden_size, self.padded_hidden_size, self.intermediate_size,
                                         self.padded_intermediate_size)}
