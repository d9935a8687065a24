"""Dispatchers: move each token to the ranks that hold its experts, and bring the results back.

One file per backend; each declares its capabilities in a `CAPS` attribute (see `epmoe.contract`)."""
from .base import Dispatcher

__all__ = ["Dispatcher"]
