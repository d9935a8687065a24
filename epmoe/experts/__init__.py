"""Experts backends: run this rank's experts on the rows a dispatcher produced.

One file per backend; each declares its capabilities in a `CAPS` attribute (see `epmoe.contract`) and
registers itself with `@register_experts(name)` (see `epmoe.registry`). Importing this package
registers the built-in ones.
"""
from . import reference, grouped_mm, batched, triton, triton_ws, triton_ws_down  # noqa: F401,I001  (registers the built-in backends)
from .base import Experts

__all__ = ["Experts"]
