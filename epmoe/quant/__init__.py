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


WEIGHT_FORMATS = ("bf16", "fp8_block", "fp8_channel")


def quant_config_for(fmt: str):
    """The quantization config of a weight format name used by the benchmarks and the tuner: "bf16" ->
    None, "fp8_block" -> 128x128 block scales with per-token-group activations, "fp8_channel" ->
    per-channel weight scales with per-token activations."""
    if fmt == "bf16":
        return None
    if fmt == "fp8_block":
        return Fp8Config(weight_block=(128, 128), activation="per_token_group")
    if fmt == "fp8_channel":
        return Fp8Config(weight_block=None, per_channel_weights=True, activation="per_token")
    raise ValueError(f"unknown format {fmt!r}; known: {', '.join(WEIGHT_FORMATS)}")


__all__ = ["Fp8Config", "Fp8Scheme", "NoQuant", "WEIGHT_FORMATS", "quant_config_for", "fp8_dequantize", "fp8_quantize",
           "scheme_for", "validate_quant_config"]
