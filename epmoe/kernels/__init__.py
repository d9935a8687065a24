"""Triton kernels for the MoE experts (fused flat path, batched path, pair alignment) and their tuning.

Importing this package does not import Triton; `triton_problem()` says why the kernels cannot run
here (None when they can). The kernel modules themselves import Triton.
"""
from __future__ import annotations

import importlib.util


def triton_problem(device_type: str = "cuda", need_fp8: bool = False) -> str | None:
    """Why the Triton experts kernels cannot run on `device_type` here; None if they can."""
    if device_type != "cuda":
        return f"the Triton kernels run on CUDA GPUs, not {device_type}"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'epmoe[triton]')"
    import torch
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    cap = torch.cuda.get_device_capability()
    if cap < (8, 0):
        return f"the kernels need a GPU of compute capability 8.0 or newer, this one is {cap[0]}.{cap[1]}"
    if need_fp8 and cap < (8, 9):
        return f"FP8 matrix products need compute capability 8.9 or newer, this GPU is {cap[0]}.{cap[1]}"
    return None
