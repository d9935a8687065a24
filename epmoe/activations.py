"""The gated activations, one definition each: act(gate, up) -> [.., I].

Used by the reference oracle (float64), the PyTorch backends and as the spec the Triton kernels follow.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SWIGLUOAI_ALPHA = 1.702
SWIGLUOAI_LIMIT = 7.0


def gated_activation(name: str, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if name == "silu":
        return F.silu(gate) * up
    if name == "gelu":
        return F.gelu(gate, approximate="none") * up
    if name == "swigluoai":
        gate = gate.clamp(max=SWIGLUOAI_LIMIT)
        up = up.clamp(min=-SWIGLUOAI_LIMIT, max=SWIGLUOAI_LIMIT)
        return gate * torch.sigmoid(SWIGLUOAI_ALPHA * gate) * (up + 1)
    raise ValueError(f"unknown activation {name!r}")


def gated_activation_fused(name: str, gate_up: torch.Tensor) -> torch.Tensor:
    """act on the fused [.., 2I] output of the gate+up GEMM (gate first, then up)."""
    i = gate_up.shape[-1] // 2
    return gated_activation(name, gate_up[..., :i], gate_up[..., i:])
