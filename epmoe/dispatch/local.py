"""`local`: one rank holds every expert; dispatch is a relabelling, combine returns the experts' sum."""
from __future__ import annotations

from ..contract import DispatcherCaps
from ..layouts import FLAT, FlatBatch
from ..registry import register_dispatcher
from .base import Dispatcher, Handle, Pending


@register_dispatcher("local")
class LocalDispatcher(Dispatcher):
    CAPS = DispatcherCaps(
        layout=FLAT, communicates=False, host_sync=False, cuda_graph_safe=True, auto_priority=1, in_flight=2,
        summary="no expert parallelism: one rank holds every expert")

    def _start_dispatch(self, x, routing):
        local_ids = self.placement.local_ids(routing.topk_ids)
        return Pending([], lambda: (FlatBatch(x, local_ids, routing.topk_weights), Handle(x.shape[0])))

    def _start_combine(self, expert_out, handle):
        return Pending([], lambda: expert_out)
