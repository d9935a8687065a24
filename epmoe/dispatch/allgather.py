"""`allgather`: every rank gathers all tokens with their routing, runs its local experts on all of them,
and the partial outputs are reduce-scattered back, summed in float32.

The correctness baseline: simple, robust and wasteful by design. Every token travels to every rank
(`ep` rows per token, whatever its routing) and the combine moves float32 partial sums of every token of
the group. Uneven token counts (0 included) are padded to the group's largest, found by one small
all-gather of the counts (a host sync); padding rows route to no expert, and when no rank has a token
nothing else is sent.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..contract import DispatcherCaps
from ..layouts import FLAT, FlatBatch, count_pairs
from ..registry import register_dispatcher
from ._comm import CommDispatcher, pack_tokens, unpack_tokens
from .base import Pending


class AllGatherHandle(NamedTuple):
    num_tokens: int        # this rank's tokens
    max_tokens: int        # the group's largest count (rows per rank block)


@register_dispatcher("allgather")
class AllGatherDispatcher(CommDispatcher):
    """Global expert ids travel: each receiver converts them to its own local ids."""

    CAPS = DispatcherCaps(
        layout=FLAT, communicates=True, host_sync=True, cuda_graph_safe=False,
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
                self.stats.forwards += 1
                self.stats.add("dispatch_rows", [t_max] * self.ep_size)
                self.stats.add("dispatch_bytes", [t_max * self.fmt.row_bytes] * self.ep_size)
                self.stats.add("combine_bytes", [t_max * H * 4] * self.ep_size)
                self.stats.count_experts(count_pairs(local_ids, self.placement.num_local_experts))
            return FlatBatch(rows.x, local_ids, rows.weights, rows.scales), AllGatherHandle(T, t_max)
        return Pending([work], finish)

    def _start_combine(self, expert_out, handle: AllGatherHandle):
        T, t_max = handle
        H = expert_out.shape[1]
        out = torch.empty(t_max, H, dtype=torch.float32, device=expert_out.device)
        work = self.comm.reduce_scatter(out, expert_out.float().contiguous(), async_op=True) if t_max else None
        return Pending([work], lambda: out[:T].to(self.plan.dtype))
