"""`low_latency`: fixed capacity, static shapes, no data-dependent sizes; capturable in a CUDA graph.

The decode-time dispatcher. Every buffer's shape follows from `max_tokens_per_rank` (M), the group size
(ep) and the layer's shape, never from the routing, so nothing waits for the GPU to learn a size and a
forward can be captured in a CUDA graph and replayed with new inputs.

Dispatch: each rank writes a send buffer `[ep, M, row]`: block d holds all of its tokens (slot t =
token t, so nothing is compacted or reordered), each with its routing *restricted to rank d* (local ids
on d, -1 for slots held elsewhere). One equal-split all-to-all exchanges
the blocks. The receiver scatters the (source, token, slot) pairs that name one of its experts into the
batched layout `x [L, C, H]` + `counts [L]`, capacity C = ep x M (each source sends an expert at most M
tokens, so no expert can overflow and no token is ever dropped); rows past an expert's count are left
unwritten (the experts must not read them). Positions come from a stable sort by expert (order: source
rank, token, slot) and `scatter_add_` counts, both without a host sync.
Combine: the experts' unweighted `[L, C, H]` rows are gathered back per (source, token, slot), weighted
and summed over the slots in float32 (one row per (token, rank)), cast, sent back by the reverse
all-to-all `[ep, M, H]`, and the owner sums its ep rows in float32 and casts once.

Bytes per rank and direction are fixed: ep x M rows (dispatch rows carry H x dtype + 8 k bytes,
aligned), whatever the routing. That is the price of static shapes.

Overflow (T > M on some rank) -- an error naming `max_tokens_per_rank` on every rank, never a hang or a
dropped token. Every rank's T travels in the forward header (`CommDispatcher.exchange_headers`), the
first, fixed-size exchange of the forward, with the layer's fingerprint, its index and the forward
count: each rank reads the headers on the host and all raise at the same point, before anything whose
shape depends on the layer is exchanged, so the group is usable again by the next forward. That host
read is the one wait of the eager GPU path (a few microseconds beside the two all-to-alls; `epmoe bench
dispatch` measures the whole dispatch + combine). With one rank there are no peers: nothing is exchanged
or read back, the rank checks its own T.

During CUDA graph capture nothing can be read back, so no header is exchanged: each rank checks its own
T on the host, which it knows from the input's shape, and a replay cannot change T (the static input
buffers fix it). Capture every rank's graph with a T <= M, on the same layers in the same order: a
captured graph does not detect ranks replaying different layers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..contract import DispatcherCaps
from ..layouts import BATCHED, BatchedBatch
from ..registry import register_dispatcher
from ._comm import CommDispatcher, pack_tokens, unpack_tokens
from .base import Handle, Pending


@dataclass
class LowLatencyHandle(Handle):
    dest: torch.Tensor = None       # [ep*M*k] row of the flattened [L*C, H] batch per (source, token, slot)
    valid: torch.Tensor = None      # [ep*M*k] the slot names one of this rank's experts
    weights: torch.Tensor = None    # [ep*M*k] float32 routing weights


@register_dispatcher("low_latency")
class LowLatencyDispatcher(CommDispatcher):
    CAPS = DispatcherCaps(
        layout=BATCHED, communicates=True, host_sync=False, cuda_graph_safe=True, needs_max_tokens=True, in_flight=2,
        fp8_dispatch=True, keeps_stats=True, summary="fixed capacity from max_tokens_per_rank, static shapes, batched layout [L, ep*M, H]; no "
                "data-dependent sizes, CUDA-graph capturable; overflow is an error on every rank")

    def __init__(self, plan, placement, group=None, device=None, **kw):
        super().__init__(plan, placement, group, device, **kw)
        self.M = plan.max_tokens_per_rank               # checked by the plan: a positive int
        self.capacity = self.ep_size * self.M          # C: rows per local expert in the batched layout

    # ------------------------------------------------------------------------------------- dispatch
    def _start_dispatch(self, x, routing):
        T, H = x.shape
        ep, M, dev = self.ep_size, self.M, x.device
        self.exchange_capacity_header(T, dev)
        send = self.fmt.empty(ep, M, device=dev)
        ranks = torch.arange(ep, device=dev).view(ep, 1, 1)
        pack_tokens(self.fmt, send[:, :T], x, self.placement.local_ids_on(routing.topk_ids, ranks),
                    routing.topk_weights)
        if T < M:
            pack_tokens(self.fmt, send[:, T:], 0, -1, 0.0)
        recv = send if ep == 1 else torch.empty_like(send)
        work = None if ep == 1 else self.comm.all_to_all(recv, send, async_op=True)
        return Pending([work], lambda: self._arrange(unpack_tokens(self.fmt, recv), T, H))

    def _arrange(self, rows, T: int, H: int):
        """Received rows -> the batched layout and the handle (no host sync)."""
        ep, M, k, dev = self.ep_size, self.M, self.plan.top_k, rows.x.device
        L, C = self.placement.num_local_experts, self.capacity

        # (source, token, slot) pairs -> rows of the batched layout, ordered by expert
        P = ep * M * k
        key = rows.ids.reshape(P).long()
        valid = key >= 0
        key = torch.where(valid, key, L)
        order = torch.argsort(key, stable=True)
        counts = torch.zeros(L + 1, dtype=torch.int64, device=dev).scatter_add_(0, key, torch.ones_like(key))
        starts = torch.cumsum(counts, 0) - counts
        key_sorted = key[order]
        pos = torch.arange(P, device=dev) - starts[key_sorted]
        dest = torch.empty_like(key)
        dest[order] = torch.where(key_sorted < L, key_sorted * C + pos, L * C)   # L*C: a scratch row
        xb = torch.empty(L * C + 1, H, dtype=rows.x.dtype, device=dev)
        src = torch.arange(P, device=dev) // k
        xb[dest] = rows.x.reshape(ep * M, H)[src]
        sb = None
        if rows.scales is not None:                  # FP8 dispatch: a row's scales go where the row goes
            G = rows.scales.shape[-1]
            sb = torch.empty(L * C + 1, G, dtype=torch.float32, device=dev)
            sb[dest] = rows.scales.reshape(ep * M, G)[src]
            sb = sb[:L * C].view(L, C, G)
        if self.stats is not None:
            self.stats.record([M] * ep, self.fmt.row_bytes, [M] * ep, H * self.plan.dtype.itemsize, counts[:L])
        batch = BatchedBatch(xb[:L * C].view(L, C, H), counts[:L].to(torch.int32), sb, num_tokens=T)
        return batch, LowLatencyHandle(T, dest=dest, valid=valid, weights=rows.weights.reshape(P).float())

    # -------------------------------------------------------------------------------------- combine
    def _start_combine(self, expert_out, handle: LowLatencyHandle):
        T, dest, valid, weights = handle.num_tokens, handle.dest, handle.valid, handle.weights
        ep, M, k = self.ep_size, self.M, self.plan.top_k
        L, C, H = expert_out.shape
        y = expert_out.reshape(L * C, H)[dest.clamp(max=L * C - 1)].float()          # [P, H]
        y.mul_(weights.unsqueeze(1)).masked_fill_(~valid.unsqueeze(1), 0.0)       # NaN-safe: filled, not scaled
        partial = y.view(ep, M, k, H).sum(2).to(self.plan.dtype)                    # one row per (token, rank)
        back = partial if ep == 1 else torch.empty_like(partial)
        work = None if ep == 1 else self.comm.all_to_all(back, partial, async_op=True)
        return Pending([work], lambda: back[:, :T].float().sum(0).to(self.plan.dtype))
