"""The FP8 format's constants and argument rule, shared by the PyTorch formula (`epmoe.quant.fp8`) and
the Triton kernels (`epmoe.kernels.fp8_quant`); no Triton here, so the quantization scheme imports it
without the kernels."""
from __future__ import annotations

import torch

from ..sizes import scale_groups

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
SCALE_FLOOR = 1e-12          # amax below this (all-zero groups) still gives a finite, non-zero scale


def check_quantize_args(x, group_size) -> int:
    """Check `fp8_quantize`'s arguments (TypeError/ValueError naming the rule); returns the number of
    scales per row, ceil(H / group_size) (1 for group_size None)."""
    check_group_size(group_size)
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point or x.dim() < 1:
        raise TypeError(f"fp8_quantize: x must be a floating-point tensor [..., H], got "
                        f"{type(x).__name__ if not isinstance(x, torch.Tensor) else (x.dtype, list(x.shape))}")
    if x.dtype == FP8_DTYPE:
        raise TypeError("fp8_quantize: x is already float8_e4m3fn")
    H = x.shape[-1]
    if H == 0:
        raise ValueError("fp8_quantize: the last dimension of x (H) must be >= 1")
    return scale_groups(H, group_size)


def check_counts(x, counts, who: str) -> None:
    """`counts` of a batched layout's rows (None: not one): [L] on the rows' device, the rows x [L, C, H]."""
    if counts is not None and (x.dim() != 3 or tuple(counts.shape) != (x.shape[0],) or counts.device != x.device):
        raise ValueError(f"{who}: counts go with rows [L, C, H] and are [L] on the rows' device, got rows "
                         f"{list(x.shape)} on {x.device} and counts {list(counts.shape)} on {counts.device}")


def check_group_size(group_size) -> None:
    """ValueError unless `group_size` is a positive int or None (one scale per row)."""
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                   or group_size < 1):
        raise ValueError(f"fp8_quantize: group_size must be a positive int or None (one scale per row), "
                         f"got {group_size!r}")
