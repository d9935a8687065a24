"""The FP8 format's constants and argument rule, shared by the PyTorch formula (`epmoe.quant.fp8`) and
the Triton kernels (`epmoe.kernels.fp8_quant`) without either importing the other."""
from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
SCALE_FLOOR = 1e-12          # amax below this (all-zero groups) still gives a finite, non-zero scale


def check_group_size(group_size) -> None:
    """ValueError unless `group_size` is a positive int or None (one scale per row)."""
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                   or group_size < 1):
        raise ValueError(f"fp8_quantize: group_size must be a positive int or None (one scale per row), "
                         f"got {group_size!r}")
