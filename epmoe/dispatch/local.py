"""`local`: one rank holds every expert; dispatch is a relabelling, combine returns the experts' sum."""
from __future__ import annotations

from ..contract import DispatcherCaps
from ..layouts import FLAT, FlatBatch
from .base import Dispatcher


class LocalDispatcher(Dispatcher):
    name = "local"
    CAPS = DispatcherCaps(
        layout=FLAT, communicates=False, host_sync=False, cuda_graph_safe=True,
        summary="no expert parallelism: one rank holds every expert")

    def dispatch(self, x, routing):
        local_ids = self.placement.local_ids(routing.topk_ids)
        return FlatBatch(x, local_ids, routing.topk_weights), None

    def combine(self, expert_out, handle):
        return expert_out
