"""Dispatchers: move each token to the ranks that hold its experts, and bring the results back.

One file per backend; each declares its capabilities in a `CAPS` attribute (see `epmoe.contract`) and
registers itself with `@register_dispatcher(name)` (see `epmoe.registry`). Importing this package
registers the built-in ones.
"""
from . import local, allgather, alltoall, low_latency  # noqa: F401,I001  (registers the built-in dispatchers, in this order)
from . import symm_high_throughput, symm_low_latency  # noqa: F401,I001  (GPU-initiated, on symmetric memory)
from .base import Dispatcher, Handle, Pending
from .symm_workspace import SymmWorkspace

__all__ = ["Dispatcher", "Handle", "Pending", "SymmWorkspace"]
