"""Quantization schemes: how weights are stored and loaded, how activations are quantized, and which
padded sizes the kernels need (`roundup_sizes`). A scheme is chosen by `MoEConfig.quant`."""
from __future__ import annotations

from .fp8 import Fp8Config, Fp8Scheme, fp8_dequantize, fp8_quantize
from .none import NoQuant


def scheme_for(cfg):
    """The scheme object for `cfg.quant` (None -> unquantized)."""
    if cfg.quant is None:
        return NoQuant(cfg.dtype)
    if isinstance(cfg.quant, Fp8Config):
        return Fp8Scheme(cfg.quant, cfg.dtype)
    raise TypeError(f"MoEConfig.quant: unknown quantization config {type(cfg.quant).__name__} "
                    f"({cfg.quant!r}); use None or epmoe.Fp8Config(...)")


def validate_quant_config(cfg) -> None:
    """Raise ValueError/TypeError if `cfg.quant` is not a known scheme config or does not fit `cfg`."""
    scheme_for(cfg)


def example_configs() -> dict:
    """Representative FP8 configs for the support matrix (`epmoe info`, the contract tests): quant label ->
    MoEConfig. Block scales (DeepSeek-V3) and per-channel scales, each without and with FP8 dispatch."""
    from ..config import MoEConfig
    base = dict(num_experts=8, top_k=2, hidden_size=256, intermediate_size=256)
    return {
        "fp8_block": MoEConfig(**base, quant=Fp8Config()),
        "fp8_block+fp8_dispatch": MoEConfig(**base, quant=Fp8Config(dispatch_fp8=True)),
        "fp8_channel": MoEConfig(**base, quant=Fp8Config(weight_block=None, per_channel_weights=True,
                                                         activation="per_token")),
        "fp8_channel+fp8_dispatch": MoEConfig(**base, quant=Fp8Config(
            weight_block=None, per_channel_weights=True, activation="per_token", dispatch_fp8=True)),
    }


__all__ = ["Fp8Config", "Fp8Scheme", "NoQuant", "example_configs", "fp8_dequantize", "fp8_quantize",
           "scheme_for", "validate_quant_config"]
