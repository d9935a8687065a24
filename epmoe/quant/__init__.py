"""Quantization schemes: how weights are stored and loaded, how activations are quantized, and which
padded sizes the kernels need (`roundup_sizes`). A scheme is chosen by `MoEConfig.quant`."""
from __future__ import annotations

from .none import NoQuant


def scheme_for(cfg):
    """The scheme object for `cfg.quant` (None -> unquantized)."""
    if cfg.quant is None:
        return NoQuant(cfg.dtype)
    raise TypeError(f"MoEConfig.quant: unknown quantization config {type(cfg.quant).__name__}")


def validate_quant_config(cfg) -> None:
    """Raise ValueError if `cfg.quant` is not a known scheme config or does not fit `cfg`."""
    scheme_for(cfg)


__all__ = ["NoQuant", "scheme_for", "validate_quant_config"]
