"""Capturing a forward in a CUDA graph the way torch asks for it (warm-up on a side stream first)."""
from __future__ import annotations

from typing import Any, Callable

import torch


def capture(fn: Callable[[], Any], device=None, warmup: int = 2) -> tuple[Callable[[], None], Any]:
    """Capture `fn()` in a CUDA graph; return (replay, the static output that each replay refreshes).

    On a device that is not CUDA, `replay` re-runs `fn` eagerly into the same output tensor, so the same
    test or script exercises its plumbing on CPU ranks.
    """
    device = torch.device(device) if device is not None else (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"))
    if device.type != "cuda":
        out = fn()
        return (lambda: out.copy_(fn())), out
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    torch.cuda.synchronize(device)
    return graph.replay, out


def recover_from_failed_capture(device=None) -> None:
    """Call after a CUDA graph capture raised (a host read inside it, say): waits for the device and runs
    one trivial capture to its end.

    A capture that fails part-way leaves torch's CUDA random generators marked as capturing (the mark is
    cleared only when a capture ends well), so every later random op outside a graph raises "Offset
    increment outside graph capture encountered unexpectedly"; a capture that completes clears it."""
    device = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    torch.cuda.synchronize(device)
    scratch = torch.zeros(1, device=device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        scratch.add_(1)
    torch.cuda.synchronize(device)
    del graph
