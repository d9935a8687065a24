"""Experts backends: run this rank's experts on the rows a dispatcher produced.

One file per backend; each declares its capabilities in a `CAPS` attribute (see `epmoe.contract`)."""
from .base import Experts

__all__ = ["Experts"]
