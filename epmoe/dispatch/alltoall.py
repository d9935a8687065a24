"""`alltoall`: the high-throughput dispatcher. Each token travels once to each rank that holds at least
one of its experts (not once per expert), and one row per (token, rank) comes back.

Dispatch:
  1. Each rank finds, per token, the set of destination ranks (owners of its k experts) and counts the
     rows it will send to each; the counts travel in the forward header (one small all-gather, checked
     on the host: see `CommDispatcher.exchange_headers`), and that one host sync sizes everything below.
  2. Rows are ordered destination-major, each carrying the token's hidden vector and its routing
     *restricted to that destination*: local expert ids on the destination (-1 for slots that live
     elsewhere) and the k weights. One variable-size `all_to_all_single` moves them (uneven splits;
     ranks with nothing to send or receive take part with empty buffers, so nobody waits on them).
  3. The receiver hands them to the experts as a flat batch: each row's output is already the weighted
     sum over its local slots (float32 accumulation, cast to the layer's dtype).
Combine: the reverse all-to-all brings back one row per (token, rank); the owner sums a token's rows in
float32 in a fixed order (gather per destination, no atomics: bit-reproducible), and casts once.

Bytes on the wire per rank: dispatch = (token, destination) pairs x (H x dtype + 8 k + alignment),
combine = (token, destination) pairs x H x dtype.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..contract import DispatcherCaps
from ..layouts import FLAT, FlatBatch
from ..experts.base import count_pairs
from ..registry import register_dispatcher
from ._comm import CommDispatcher, pack_tokens, unpack_tokens
from .base import Pending


class AllToAllHandle(NamedTuple):
    num_tokens: int
    send_splits: list[int]       # rows sent to each rank (= rows that come back from it)
    recv_splits: list[int]       # rows received from each rank (= rows sent back to it)
    back_index: torch.Tensor     # [ep, T] row of the combine buffer holding (token, rank), or the zero row


def _nonzero_1d(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the True entries of a 1-D mask whose count the host already knows (no second sync)."""
    try:
        return torch.nonzero_static(mask, size=count).reshape(-1)
    except (AttributeError, NotImplementedError, RuntimeError):   # a torch or device without it
        return mask.nonzero().reshape(-1)


@register_dispatcher("alltoall")
class AllToAllDispatcher(CommDispatcher):
    CAPS = DispatcherCaps(
        layout=FLAT, communicates=True, host_sync=True, cuda_graph_safe=False, fp8_dispatch=True,
        summary="counts exchanged, then each token sent once per destination rank with its routing for "
                "that rank's experts (variable-size all-to-all); one row per (token, rank) comes back")

    def _start_dispatch(self, x, routing):
        T, H = x.shape
        ep, dev = self.ep_size, x.device
        owner, _ = self.placement.ids_on_owner(routing.topk_ids)              # [T, k]
        goes_to = torch.zeros(ep, T, dtype=torch.bool, device=dev)             # [ep, T]
        goes_to.scatter_(0, owner.t().long(), True)
        send_counts = goes_to.sum(1)                                           # [ep]
        heads = self.exchange_headers(T, dev, send_counts)                     # the one host sync
        send_splits = heads.counts[self.rank]
        recv_splits = [heads.counts[r][self.rank] for r in range(ep)]
        n_send, n_recv = sum(send_splits), sum(recv_splits)

        pair = _nonzero_1d(goes_to.reshape(-1), n_send)                        # destination-major
        dst, tok = pair // T, pair % T
        ids = self.placement.local_ids_on(routing.topk_ids[tok], dst.unsqueeze(1))
        send = self.fmt.empty(n_send, device=dev)
        pack_tokens(self.fmt, send, x[tok], ids, routing.topk_weights[tok])
        recv = self.fmt.empty(n_recv, device=dev)
        work = self.comm.all_to_all(recv, send, recv_splits, send_splits, async_op=True)

        def finish():
            rows = unpack_tokens(self.fmt, recv, contiguous=True)
            # where each (rank, token) row will sit in the combine buffer; row n_send stays zero
            back_index = torch.full((ep, T), n_send, dtype=torch.int64, device=dev)
            back_index.view(-1)[pair] = torch.arange(n_send, device=dev)
            if self.stats is not None:
                self.stats.forwards += 1
                self.stats.add("dispatch_rows", send_splits)
                self.stats.add("dispatch_bytes", [n * self.fmt.row_bytes for n in send_splits])
                self.stats.add("combine_bytes", [n * H * x.element_size() for n in recv_splits])
                self.stats.count_experts(count_pairs(rows.ids, self.placement.num_local_experts))
            batch = FlatBatch(rows.x, rows.ids, rows.weights, rows.scales)
            return batch, AllToAllHandle(T, send_splits, recv_splits, back_index)
        return Pending([work], finish)

    def _start_combine(self, expert_out, handle: AllToAllHandle):
        T, send_splits, recv_splits, back_index = handle
        n_send, H = sum(send_splits), expert_out.shape[1]
        back = torch.empty(n_send + 1, H, dtype=expert_out.dtype, device=expert_out.device)
        back[n_send].zero_()
        work = self.comm.all_to_all(back[:n_send], expert_out.contiguous(), send_splits, recv_splits, async_op=True)

        def finish():
            out = back[back_index[0]].float()
            for d in range(1, self.ep_size):
                out += back[back_index[d]]
            return out.to(self.cfg.dtype)
        return Pending([work], finish)
