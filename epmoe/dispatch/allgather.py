"""`allgather`: every rank gathers all tokens with their routing, runs its local experts on all of them,
and the partial outputs are reduce-scattered back, summed in float32.

The correctness baseline: simple, robust and wasteful by design. Every token travels to every rank
(`ep` rows per token, whatever its routing) and the combine moves float32 partial sums of every token of
the group. Uneven token counts (0 included) are padded to the group's largest, found by one small
all-gather of the counts (a host sync); padding rows route to no expert, and when no rank has a token
nothing else is sent.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..contract import DispatcherCaps
from ..layouts import FLAT, FlatBatch, count_pairs
from ..registry import register_dispatcher
from ._comm import CommDispatcher, pack_tokens, unpack_tokens
from .base import Handle, Pending


@dataclass
class AllGatherHandle(Handle):
    max_tokens: int = 0    # the group's largest count (rows per rank block)


@register_dispatcher("allgather")
class AllGatherDispatcher(CommDispatcher):
    """Global expert ids travel: each receiver converts them to its own local ids."""

    CAPS = DispatcherCaps(
        layout=FLAT, communicates=True, host_sync=True, cuda_graph_safe=False, in_flight=2, keeps_stats=True,
        summary="every rank gathers all tokens and runs its experts on them; partial sums are "
                "reduce-scattered back in float32 (the simple, wasteful baseline)")

    def _start_dispatch(self, x, routing):
        T, H = x.shape
        t_max = max(self.exchange_headers(T, x.device).tokens)   # the forward header: a host sync
        send = self.fmt.empty(t_max, device=x.device)
        pack_tokens(self.fmt, send[:T], x, routing.topk_ids, routing.topk_weights)
        if T < t_max:
            pack_tokens(self.fmt, send[T:], 0, -1, 0.0)          # padding rows: zeros, routed nowhere
        recv = self.fmt.empty(self.ep_size * t_max, device=x.device)
        work = self.comm.all_gather(recv, send, async_op=True) if t_max else None

        def finish():
            rows = unpack_tokens(self.fmt, recv, contiguous=True)
            local_ids = self.placement.local_ids(rows.ids)
            if self.stats is not None:
                self.stats.record([t_max] * self.ep_size, self.fmt.row_bytes, [t_max] * self.ep_size, H * 4,
                                  count_pairs(local_ids, self.placement.num_local_experts))
            return FlatBatch(rows.x, local_ids, rows.weights, rows.scales), AllGatherHandle(T, max_tokens=t_max)
        return Pending([work], finish)

    def _start_combine(self, expert_out, handle: AllGatherHandle):
        T, t_max = handle.num_tokens, handle.max_tokens
        H = expert_out.shape[1]
        out = torch.empty(t_max, H, dtype=torch.float32, device=expert_out.device)
        work = self.comm.reduce_scatter(out, expert_out.float().contiguous(), async_op=True) if t_max else None
        return Pending([work], lambda: out[:T].to(self.plan.dtype))
