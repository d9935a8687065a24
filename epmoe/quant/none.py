"""The unquantized scheme: weights and activations in the layer's dtype, no scales.

Rows are padded to 16 bytes: grouped GEMM kernels (CUTLASS behind torch._grouped_mm, TMA loads in Triton)
need 16-byte aligned strides, and a hidden size like 180 in bf16 would otherwise fail inside the forward.
The padding is zeros, changes no result, and callers never see it (the layer pads and slices).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..sizes import round_up


@dataclass(frozen=True)
class NoQuant:
    dtype: torch.dtype
    name: str = "none"
    kind: str = "none"

    @property
    def activation_group_size(self) -> None:
        """No activation scales (nothing is quantized)."""
        return None

    def roundup_sizes(self, hidden_size: int, intermediate_size: int) -> tuple[int, int]:
        multiple = 16 // torch.empty((), dtype=self.dtype).element_size()
        return round_up(hidden_size, multiple), round_up(intermediate_size, multiple)

    def create_weights(self, layer, L: int, H: int, I: int) -> None:
        """w13 [L, 2I, H] (gate rows, then up rows) and w2 [L, H, I] in the layer's dtype, zeros."""
        dt, dev = self.dtype, layer.device
        layer.w13 = nn.Parameter(torch.zeros(L, 2 * I, H, dtype=dt, device=dev), requires_grad=False)
        layer.w2 = nn.Parameter(torch.zeros(L, H, I, dtype=dt, device=dev), requires_grad=False)

    def load_expert(self, layer, local: int, gate_proj, up_proj, down_proj, **extra) -> None:
        """Copy one expert's HF-shaped weights into the layer's fused, padded layout."""
        if extra:
            raise TypeError(f"load_expert: unexpected arguments for an unquantized layer: {sorted(extra)}")
        for name, t in (("gate_proj", gate_proj), ("up_proj", up_proj), ("down_proj", down_proj)):
            if t.element_size() == 1:
                raise TypeError(f"load_expert: {name} is {t.dtype}, but this layer is unquantized: FP8 weights "
                                "mean nothing without their scales. Build the layer with "
                                "quant=epmoe.Fp8Config(...) and pass gate_proj_scale= etc., or dequantize first")
        H, I = layer.cfg.hidden_size, layer.cfg.intermediate_size
        Ip = layer.w2.shape[2]
        with torch.no_grad():
            layer.w13[local, :I, :H].copy_(gate_proj)
            layer.w13[local, Ip:Ip + I, :H].copy_(up_proj)
            layer.w2[local, :H, :I].copy_(down_proj)

    def expert_tensors(self, layer, local: int) -> dict[str, torch.Tensor]:
        """Local expert `local` at its real sizes as `load_expert` arguments (views of the stored weights)."""
        H, I = layer.cfg.hidden_size, layer.cfg.intermediate_size
        Ip = layer.w2.shape[2]
        return {"gate_proj": layer.w13[local, :I, :H], "up_proj": layer.w13[local, Ip:Ip + I, :H],
                "down_proj": layer.w2[local, :H, :I]}
