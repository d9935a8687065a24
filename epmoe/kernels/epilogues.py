"""Triton device functions the MoE kernels share in their epilogues: the gated activation and the
per-row FP8 quantization (the one formula, `fp8_quant.fp8_quantize_groups`). Their own module, so the
decode kernels (`decode_gemv`) use them without importing the fused kernels (`fused_moe`), which call
the decode kernels."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp8_quant import fp8_quantize_groups
from .jit_keys import key_callees_first

ACTIVATION_CODES = {"silu": 0, "gelu": 1, "swigluoai": 2}
SWIGLUOAI_ALPHA = tl.constexpr(1.702)    # epmoe.activations
SWIGLUOAI_LIMIT = tl.constexpr(7.0)


@triton.jit
def _gated_activation(g, u, ACTIVATION: tl.constexpr):
    """act(gate, up) in float32, as epmoe.activations.gated_activation defines it."""
    if ACTIVATION == 0:      # silu(g) * u
        return g / (1.0 + tl.exp(-g)) * u
    elif ACTIVATION == 1:    # exact gelu(g) * u
        return 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476)) * u
    else:                    # swigluoai: clamped gate and up, NaN kept (as torch.clamp keeps it)
        g = tl.minimum(g, SWIGLUOAI_LIMIT, propagate_nan=tl.PropagateNan.ALL)
        u = tl.minimum(tl.maximum(u, -SWIGLUOAI_LIMIT, propagate_nan=tl.PropagateNan.ALL), SWIGLUOAI_LIMIT,
                       propagate_nan=tl.PropagateNan.ALL)
        return g / (1.0 + tl.exp(g * (-SWIGLUOAI_ALPHA))) * (u + 1.0)


@triton.jit
def _fp8_quantize_rows(v):
    """One e4m3fn scale per row of `v` (float32 [M, N]): the one formula, cast to e4m3fn (exact: the
    values are already on its grid, in the interpreter too)."""
    q, scale = fp8_quantize_groups(v)
    return q.to(tl.float8e4nv), scale


def intermediate_dtype(dtype: torch.dtype) -> torch.dtype:
    """What act(gate) * up is stored in between the two GEMMs of a layer of `dtype`: that dtype, except
    float16, whose 65504 the intermediate can pass while the layer's output still fits: float32 there.
    The down GEMM then reads float32 rows and its float16 weights as float32 (tf32 products: float16's
    10-bit mantissa, float32's range)."""
    return torch.float32 if dtype == torch.float16 else dtype


key_callees_first(globals())     # each Triton function keyed after those it calls: one key in every process
