"""`alltoall`: the high-throughput dispatcher. Each token travels once to each rank that holds at least
one of its experts (not once per expert), and one row per (token, rank) comes back.

Dispatch:
  1. Each rank finds, per token, the set of destination ranks (owners of its k experts) and counts the
     rows it will send to each; the counts travel in the forward header (one small all-gather, checked
     on the host: see `CommDispatcher.exchange_headers`), and that one host sync sizes everything below.
  2. Rows are ordered destination-major (token order within a destination), each carrying the token's
     hidden vector (FP8 with its scales when the plan quantizes before the wire) and its routing
     *restricted to that destination*: local expert ids on the destination (-1 for slots that live
     elsewhere) and the k weights. One variable-size `all_to_all_single` moves them (uneven splits;
     ranks with nothing to send or receive take part with empty buffers, so nobody waits on them).
  3. The receiver hands them to the experts as a flat batch: each row's output is already the weighted
     sum over its local slots (float32 accumulation, cast to the layer's dtype).
Combine: the reverse all-to-all brings back one row per (token, rank); the owner sums a token's rows in
float32 in a fixed order (rank order, no atomics: bit-reproducible), and casts once.

On CUDA (with Triton) steps 1-3 and the combine's sum are kernels (`epmoe.kernels.alltoall_pack`): one
launch finds each token's destinations and its position among their rows (before the header); after
the header one launch writes every wire row straight from `x` (quantizing in the kernel for FP8 wires,
with the one formula, bit for bit); the received rows reach the experts as typed views of the receive
buffer where the plan's experts declare `reads_strided_rows` (reference, grouped_mm), else as dense fields
unpacked in one launch; the combine sums with one gather kernel (`gather_sum`, shared with
`symm_high_throughput`). Elsewhere (CPU, Gloo) the same steps are PyTorch ops. Both give the same rows
and the same sums, bit for bit (a sum of zeros may differ in the sign of zero). No step but the header
reads anything back to the host; the combine reads nothing.

Bytes on the wire per rank: dispatch = (token, destination) pairs x (H x dtype + 8 k + alignment),
combine = (token, destination) pairs x H x dtype.

Bounded (`max_tokens_per_rank` = M given): nothing reads counts back, so the forward can be captured in a
CUDA graph. Every destination gets a fixed region of M rows (a token goes to a rank at most once, so M
always suffices): the token rows for it first, then rows marked routed nowhere (local ids -1, weights 0),
so the count travels in the data. Two fixed-size all-to-alls move the regions: the hidden vectors as one
dense `[ep * M, Hp]` buffer (the experts' rows as they arrive, nothing to unpack) and, beside it, the rows
of local ids, weights and FP8 scales. The batch spans the whole capacity, `ep * M` rows; the experts'
output goes back by one fixed-size all-to-all and the owner sums a token's rows as above. Overflow (a rank
passing more than M tokens) is caught as in `low_latency`: in eager forwards every rank's T travels in the
forward header (read on the host: headers, never counts) and every rank raises an error naming
max_tokens_per_rank before anything else is exchanged; while a graph is captured each rank checks its own
T (a replay cannot change it). Bytes per rank and direction: ep x M rows, whatever the routing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..contract import DispatcherCaps
from ..layouts import FLAT, FlatBatch, count_pairs
from ..registry import register_dispatcher
from ._comm import CommDispatcher, TokenRows, WireFormat, pack_tokens, unpack_tokens
from .base import Handle, Pending


@dataclass
class AllToAllHandle(Handle):
    send_splits: list = None       # rows sent to each rank (= rows that come back from it)
    recv_splits: list = None       # rows received from each rank (= rows sent back to it)
    back_index: torch.Tensor = None   # PyTorch path: [ep, T] row of the combine buffer holding (token, rank),
    #                                   or the zero row; kernels: [T, ep] that row, or -1
    kernels: bool = False          # dispatched by the CUDA kernels (the combine uses them too)
    bounded: bool = False          # fixed regions of max_tokens_per_rank rows per rank (splits None)


def _nonzero_1d(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the True entries of a 1-D mask whose count the host already knows (no second sync)."""
    try:
        return torch.nonzero_static(mask, size=count).reshape(-1)
    except (AttributeError, NotImplementedError, RuntimeError):   # a torch or device without it
        return mask.nonzero().reshape(-1)


# ------------------------------------------------------------ the PyTorch path (CPU, Gloo; the tests' yardstick)
def route_torch(placement, topk_ids: torch.Tensor) -> torch.Tensor:
    """goes_to [ep, T] bool: token t has an expert on rank d."""
    owner, _ = placement.ids_on_owner(topk_ids)                                # [T, k]
    goes_to = torch.zeros(placement.ep_size, topk_ids.shape[0], dtype=torch.bool, device=topk_ids.device)
    goes_to.scatter_(0, owner.t().long(), True)
    return goes_to


def pack_torch(fmt, placement, send: torch.Tensor, x: torch.Tensor, topk_ids: torch.Tensor,
               topk_weights: torch.Tensor, goes_to: torch.Tensor) -> torch.Tensor:
    """Write the wire rows into `send [n_send, row_bytes]` (n_send = goes_to.sum(), known on the host),
    destination-major; returns the (destination * T + token) of each row."""
    T = goes_to.shape[1]
    pair = _nonzero_1d(goes_to.reshape(-1), send.shape[0])                    # destination-major
    dst, tok = pair // T, pair % T
    ids = placement.local_ids_on(topk_ids[tok], dst.unsqueeze(1))
    pack_tokens(fmt, send, x[tok], ids, topk_weights[tok])
    return pair


def back_index_torch(pair: torch.Tensor, ep: int, T: int) -> torch.Tensor:
    """[ep, T]: the combine buffer's row holding (rank, token); row n_send (the zero row) where none."""
    n_send = pair.shape[0]
    back = torch.full((ep, T), n_send, dtype=torch.int64, device=pair.device)
    back.view(-1)[pair] = torch.arange(n_send, device=pair.device)
    return back


def pack_bounded_torch(meta: WireFormat, placement, M: int, x_send: torch.Tensor, meta_send: torch.Tensor,
                       x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                       goes_to: torch.Tensor) -> torch.Tensor:
    """The bounded layout without a host sync: token rows into the fixed regions of `x_send [ep * M + 1,
    Hp]` and `meta_send [ep * M + 1, meta.row_bytes]` (row ep * M: scratch), the other rows of a region
    routed nowhere. Returns [ep, T]: the row of (rank, token), or ep * M where the token does not go."""
    ep, T = goes_to.shape
    dest = torch.where(goes_to, torch.arange(ep, device=x.device).unsqueeze(1) * M + goes_to.cumsum(1) - 1, ep * M)
    scales = None
    if meta.quantize is not None:
        x, scales = meta.quantize(x)
    ids = placement.local_ids_on(topk_ids, torch.arange(ep, device=x.device).view(ep, 1, 1))     # [ep, T, k]
    rows = meta.empty(ep, T, device=x.device)
    meta.view(rows, "ids").copy_(ids)
    meta.view(rows, "weights").copy_(topk_weights.expand(ep, -1, -1))
    meta.view(meta_send, "ids").fill_(-1)
    meta.view(meta_send, "weights").fill_(0.0)
    if scales is not None:
        meta.view(rows, "scales").copy_(scales.float().expand(ep, -1, -1))
        meta.view(meta_send, "scales").fill_(1.0)
    x_send.zero_()
    where = dest.reshape(-1)
    x_send[where] = x.to(x_send.dtype).expand(ep, -1, -1).reshape(ep * T, x_send.shape[1])
    meta_send[where] = rows.reshape(ep * T, meta.row_bytes)
    return dest


def sum_back_torch(back: torch.Tensor, back_index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """out[t] = sum over ranks d, in order, of back[back_index[d, t]] in float32, cast once."""
    out = back[back_index[0]].float()
    for d in range(1, back_index.shape[0]):
        out += back[back_index[d]]
    return out.to(dtype)


@register_dispatcher("alltoall")
class AllToAllDispatcher(CommDispatcher):
    CAPS = DispatcherCaps(
        layout=FLAT, communicates=True, host_sync=True, cuda_graph_safe=True, takes_max_tokens=True,
        fp8_dispatch=True, auto_priority=1, in_flight=2, keeps_stats=True,
        summary="counts exchanged, then each token sent once per destination rank with its routing for "
                "that rank's experts (variable-size all-to-all); one row per (token, rank) comes back; with "
                "max_tokens_per_rank: fixed regions per rank, counts in the data, no host read of counts, "
                "CUDA-graph capturable")

    # None: the Triton kernels on CUDA where Triton can run them, PyTorch ops elsewhere; True/False force
    # a path (tests run the kernels on CPU tensors under TRITON_INTERPRET=1)
    use_kernels: bool | None = None

    def __init__(self, plan, placement, group=None, device=None, **kw):
        super().__init__(plan, placement, group, device, **kw)
        from ..kernels import triton_problem
        quant = self.fmt.quantize is not None
        # whether the kernels can run this wire format on this machine's GPUs (decided once)
        self._kernels_ok = (triton_problem("cuda", need_fp8=quant) is None
                            and (quant or self.fmt.fields["x"].dtype == plan.dtype))
        self._zero_status_by_device: dict = {}
        if device is not None:        # made now, outside any CUDA graph capture
            self._zero_status(device)
        # bounded: the rows beside the dense hidden vectors (local ids, weights, FP8 scales)
        self.meta = WireFormat([(f.name, f.dtype, f.width) for f in self.fmt.fields.values() if f.name != "x"],
                               self.fmt.quantize)

    def _kernels_for(self, x: torch.Tensor) -> bool:
        if self.use_kernels is not None:
            return self.use_kernels
        return x.is_cuda and self._kernels_ok

    def _start_dispatch(self, x, routing):
        if self.plan.max_tokens_per_rank is not None:
            return self._start_bounded_dispatch(x, routing)
        T, H = x.shape
        ep, dev = self.ep_size, x.device
        kernels = self._kernels_for(x)
        if kernels:
            from ..kernels.alltoall_pack import route_rows
            owner, index, _ = self.placement.tables(dev)
            j, send_counts = route_rows(routing.topk_ids, owner, ep)        # [ep, T], [ep]: one launch
        else:
            goes_to = route_torch(self.placement, routing.topk_ids)            # [ep, T]
            send_counts = goes_to.sum(1)                                       # [ep]
        heads = self.exchange_headers(T, dev, send_counts)                     # the one host sync
        send_splits = heads.counts[self.rank]
        recv_splits = [heads.counts[r][self.rank] for r in range(ep)]
        n_send, n_recv = sum(send_splits), sum(recv_splits)

        send = self.fmt.empty(n_send, device=dev)
        if kernels:
            from ..kernels.alltoall_pack import pack_rows
            back_index = pack_rows(self.fmt, send, x, routing.topk_ids, routing.topk_weights, owner, index, j,
                                   send_counts, self.plan.wire_scale_group)   # [T, ep]: one launch
        else:
            pair = pack_torch(self.fmt, self.placement, send, x, routing.topk_ids, routing.topk_weights, goes_to)
        recv = self.fmt.empty(n_recv, device=dev)
        work = self.comm.all_to_all(recv, send, recv_splits, send_splits, async_op=True)

        def finish():
            if kernels:
                rows = self._received(recv)
                back = back_index
            else:
                rows = unpack_tokens(self.fmt, recv, contiguous=True)
                back = back_index_torch(pair, ep, T)       # row n_send of the combine buffer stays zero
            if self.stats is not None:
                self.stats.record(send_splits, self.fmt.row_bytes, recv_splits, H * x.element_size(),
                                  count_pairs(rows.ids, self.placement.num_local_experts))
            batch = FlatBatch(rows.x, rows.ids, rows.weights, rows.scales)
            return batch, AllToAllHandle(T, send_splits=send_splits, recv_splits=recv_splits, back_index=back,
                                         kernels=kernels)
        return Pending([work], finish)

    def _received(self, recv: torch.Tensor, fmt: WireFormat | None = None, kernels: bool = True) -> TokenRows:
        """The received rows as the plan's experts read them: typed views of the receive buffer (no copy)
        for backends that read strided rows, else dense fields unpacked in one launch (`kernels`) or by
        PyTorch."""
        fmt = fmt or self.fmt
        if self.plan.experts_read_strided_rows:
            return unpack_tokens(fmt, recv)
        if not kernels:
            return unpack_tokens(fmt, recv, contiguous=True)
        from ..kernels.alltoall_pack import unpack_rows
        return TokenRows(*unpack_rows(fmt, recv))

    def _start_bounded_dispatch(self, x, routing):
        """Fixed regions of M rows per destination, counts in the data (rows past them routed nowhere), two
        fixed-size all-to-alls: the dense hidden vectors, and the rows of ids, weights and scales."""
        T, H = x.shape
        ep, M, dev, meta = self.ep_size, self.plan.max_tokens_per_rank, x.device, self.meta
        kernels = self._kernels_for(x)
        self.exchange_capacity_header(T, dev)          # eager: every rank's T read back and checked
        rows = ep * M
        if kernels:
            from ..kernels.alltoall_pack import pack_rows, route_rows
            owner, index, _ = self.placement.tables(dev)
            j, counts = route_rows(routing.topk_ids, owner, ep)
            x_send = torch.empty(rows, H, dtype=self.plan.wire_dtype, device=dev)
            meta_send = meta.empty(rows, device=dev)
            back_index = pack_rows(meta, meta_send, x, routing.topk_ids, routing.topk_weights, owner, index, j,
                                   counts, self.plan.wire_scale_group, x_send=x_send, region=M)   # [T, ep]
        else:           # a scratch row past the regions takes the pairs that are not sent
            x_send = torch.empty(rows + 1, H, dtype=self.plan.wire_dtype, device=dev)
            meta_send = meta.empty(rows + 1, device=dev)
            back_index = pack_bounded_torch(meta, self.placement, M, x_send, meta_send, x, routing.topk_ids,
                                            routing.topk_weights, route_torch(self.placement, routing.topk_ids))
            x_send, meta_send = x_send[:rows], meta_send[:rows]
        x_recv, meta_recv = (x_send, meta_send) if ep == 1 else (torch.empty_like(x_send), torch.empty_like(meta_send))
        works = [] if ep == 1 else [self.comm.all_to_all(_bytes(x_recv), _bytes(x_send), async_op=True),
                                    self.comm.all_to_all(meta_recv, meta_send, async_op=True)]

        def finish():
            fields = self._received(meta_recv, meta, kernels)
            if self.stats is not None:
                self.stats.record([M] * ep, H * x_send.element_size() + meta.row_bytes, [M] * ep,
                                  H * x.element_size(), count_pairs(fields.ids, self.placement.num_local_experts))
            batch = FlatBatch(x_recv, fields.ids, fields.weights, fields.scales)
            return batch, AllToAllHandle(T, back_index=back_index, kernels=kernels, bounded=True)
        return Pending(works, finish)

    def _zero_status(self, device) -> torch.Tensor:
        """A zero int32 word for `gather_sum` (its status input: never set on this dispatcher)."""
        cache = self._zero_status_by_device
        device = torch.device(device)
        if device not in cache:
            cache[device] = torch.zeros(1, dtype=torch.int32, device=device)
        return cache[device]

    def _start_combine(self, expert_out, handle: AllToAllHandle):
        send_splits, recv_splits = handle.send_splits, handle.recv_splits
        back_index, kernels = handle.back_index, handle.kernels
        if handle.bounded:           # every region of M rows goes back to its rank whole
            M = self.plan.max_tokens_per_rank
            send_splits = recv_splits = [M] * self.ep_size
        n_send, H = sum(send_splits), expert_out.shape[1]
        dev = expert_out.device
        if kernels:
            back = torch.empty(n_send, H, dtype=expert_out.dtype, device=dev)
            work = self.comm.all_to_all(back, expert_out.contiguous(), send_splits, recv_splits, async_op=True)

            def finish_kernels():
                from ..kernels.token_rows import gather_sum
                # out[t] = sum over ranks d in order of back[back_index[t, d]] (-1: skipped), float32
                return gather_sum(back, back_index, None, self._zero_status(dev), self.plan.dtype)
            return Pending([work], finish_kernels)

        back = torch.empty(n_send + 1, H, dtype=expert_out.dtype, device=dev)
        back[n_send].zero_()
        work = self.comm.all_to_all(back[:n_send], expert_out.contiguous(), send_splits, recv_splits, async_op=True)

        def finish():
            return sum_back_torch(back, back_index, self.plan.dtype)
        return Pending([work], finish)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's rows as uint8 (FP8 rows travel as bytes: Gloo has no float8)."""
    return t.view(torch.uint8)
