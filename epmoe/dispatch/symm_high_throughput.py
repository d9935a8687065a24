"""`symm_high_throughput`: GPU-initiated dispatch and combine for large batches (prefill), over torch
symmetric memory. Each token travels once to each rank that holds at least one of its experts, stored
by a Triton kernel straight into the receiver's buffer; one row per (token, rank) comes back the same way.

Dispatch:
  1. On the GPU (one Triton program): each token's destination ranks, its index among this rank's rows
     for each, and the row counts. The counts travel with the forward header through the workspace's
     control block (no NCCL call), next to the flag each rank publishes.
  2. Every rank then has the whole count matrix on its GPU, so a sender knows where its rows start in
     each receiver's buffer (after the rows of lower ranks): one program per token stores its row --
     FP8 with its scales when the plan puts FP8 on the wire -- with its routing restricted to that
     receiver's experts (local ids, -1 for slots held elsewhere) into every destination, then signals.
  3. The receiver's rows are a flat batch in its own buffer, source-major: the experts read them in place.
Combine: each expert rank stores its output row (already the weighted sum over its local slots) into the
owner's buffer, at the position the owner's send order gives that (rank, token) pair; after the signal
the owner sums a token's rows in float32 in rank order (bit-reproducible) and casts once.

With `max_tokens_per_rank` the buffers hold ep x max_tokens_per_rank rows, nothing is read back during
the forward (the batch spans the capacity, rows past what arrived routed nowhere; headers are checked on
the GPU and the verdict read once at the end of combine in eager mode) and the forward can be captured
in a CUDA graph. Without it, the host reads the count matrix once, after the first exchange (headers
checked there, before any row moves); that read sizes the batch, and the buffers grow (collectively:
every rank sees the same counts) when a forward needs more rows than they hold. Two slots alternate, so
two micro-batches can be in flight. CUDA only; refused elsewhere by the contract.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..contract import DispatcherCaps
from ..registry import register_dispatcher
from ..errors import RankMismatch
from ..layouts import FLAT, FlatBatch, count_pairs
from ._symm import SymmDispatcher, symm_problem
from .symm_workspace import HEADER_FIELDS


class HTLaunch(NamedTuple):
    """How the transfer kernels are launched: programs per row (`split`: each moves every split-th block of
    columns; `quant_split` when the dispatch quantizes rows to FP8 on the way) and warps per program, for
    dispatch and combine; tokens per block of the routing scan. Defaults: the fastest measured on two
    H200s at 4096 tokens (`benchmarks/gpu_symm_check.py --parts variants`)."""
    split: int = 1
    quant_split: int = 8             # FP8 dispatch at 4096 tokens: 110-117 µs against 120-125 for 4, 156-172 for 1
    warps: int = 4
    combine_split: int = 8           # measured on two H200s at 4096 tokens: 222 µs against 242 for 1
    combine_warps: int = 4
    route_block: int = 256
    route_warps: int = 4

    def column_block(self, H: int, split: int) -> int:
        from ..kernels.symm_dispatch import row_block
        return row_block(-(-H // split))


class SymmHTHandle(NamedTuple):
    num_tokens: int
    slot: int
    ws: object                   # the workspace generation this forward's rows live in
    header: list                 # this rank's header values
    mtx: torch.Tensor            # [ep, HW] int32 every rank's header and per-destination row counts
    num_rows: int                # rows this rank received
    back_index: torch.Tensor     # [T, ep] int64 row of the combine region holding (token, rank), or -1


@register_dispatcher("symm_high_throughput")
class SymmHighThroughputDispatcher(SymmDispatcher):
    CAPS = DispatcherCaps(
        layout=FLAT, communicates=True, devices=frozenset({"cuda"}), peer_memory=True, host_sync=True, cuda_graph_safe=True,
        takes_max_tokens=True, fp8_dispatch=True, available=symm_problem,
        summary="GPU-initiated: Triton kernels store each token once per destination rank straight into the "
                "peer's symmetric-memory buffer (counts exchanged on the GPU, one host read); rows come back "
                "the same way and the owner sums them in float32; with max_tokens_per_rank: fixed buffers, no "
                "host read in the forward, CUDA-graph capturable")

    LAUNCH = HTLaunch()

    def __init__(self, plan, placement, group=None, device=None, **kw):
        super().__init__(plan, placement, group, device, **kw)
        self.launch = self.LAUNCH                    # benchmarks try others on an instance

    def slot_layout(self, rows: int = 1):
        """Regions of one slot for `rows` received rows (rows sent back use the same capacity)."""
        from .symm_workspace import SlotLayout
        H, K = self.plan.padded_hidden_size, self.plan.top_k
        layout = SlotLayout(self.ep_size)
        layout.add("rx", self.wire_dtype, (rows, H))
        if self.fp8:
            layout.add("rxs", torch.float32, (rows, self.groups))
        layout.add("rids", torch.int32, (rows, K))
        layout.add("rw", torch.float32, (rows, K))
        layout.add("comb", self.plan.dtype, (rows, H))
        return layout

    def _rows_for(self, needed: int) -> int:
        """Rows a slot must hold for `needed`: ep * max_tokens_per_rank (or 256), doubled until enough."""
        rows = self.ep_size * (self.max_tokens_per_rank or 256)
        while rows < needed:
            rows *= 2
        return rows

    def layout_in(self, ws):
        """This layer's slot layout in workspace `ws` (the same on every rank): as many rows as fit, or
        with max_tokens_per_rank the ep * max_tokens_per_rank rows a forward can receive."""
        cached = getattr(self, "_layout_cache", None)
        if cached is not None and cached[0] is ws:
            return cached[1]
        from .symm_workspace import SlotLayout
        control = SlotLayout(self.ep_size)
        one = self.slot_layout(1)
        per_row = sum(r.nbytes for n, r in one.regions.items() if n not in control.regions)
        rows = max((ws.slot_bytes - control.nbytes) // per_row, 1)
        if self.max_tokens_per_rank is not None:
            # bounded: the batch spans the capacity, so no more rows than the bound needs (the workspace
            # may be far larger: another layer, e.g. a low-latency one, sized it)
            rows = min(rows, self._rows_for(1))
        while rows > 1 and self.slot_layout(rows).nbytes > ws.slot_bytes:
            rows -= 1
        layout = self.slot_layout(rows)
        self._layout_cache = (ws, layout)
        return layout

    # ------------------------------------------------------------------------------------- dispatch
    def dispatch_steps(self, x, routing, failed: bool = False):
        from ..kernels.symm_dispatch import PAD_BLOCK, ht_dispatch_kernel
        from ..kernels.token_rows import pow2, route_to_ranks
        from triton import cdiv as triton_cdiv
        T, H = x.shape
        ep, me, dev, K = self.ep_size, self.rank, x.device, self.plan.top_k
        M = self.max_tokens_per_rank
        bounded = M is not None
        if not bounded and dev.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise ValueError(f"{self.name} dispatcher: capturing a CUDA graph needs max_tokens_per_rank (without it "
                             f"the buffers are sized from the exchanged counts, a host read)")
        if bounded and T > M and dev.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise ValueError(f"{self.name} dispatcher: capturing a CUDA graph with {T} tokens, more than "
                             f"max_tokens_per_rank={M}; capture with at most {M} tokens")
        pool = self.pool
        if getattr(self, "_min_slot_bytes", None) is None:
            self._min_slot_bytes = self.slot_layout(self._rows_for(1)).nbytes
        ws = self.workspace(self._min_slot_bytes, T, failed)        # the first forward of a larger layer grows it everywhere
        slot = pool.next_slot()
        # everything that does not depend on the other ranks, queued before the exchange
        ids = routing.topk_ids.to(torch.int32).contiguous()
        owner, index, _ = self.placement.tables(dev)
        j, counts = route_to_ranks(ids, owner, ep, self.launch.route_block, self.launch.route_warps)
        lc = self.launch
        group = self.plan.wire_scale_group
        # FP8 on the wire: quantized inside the transfer kernel when its column blocks hold whole groups
        split = lc.quant_split if self.fp8 and group is not None else lc.split
        block_h = lc.column_block(H, split)
        fused = self.fp8 and group is not None and block_h % group == 0 and x.dtype != self.wire_dtype
        xw, xs = self.wire_rows(x, quantize=self.fp8 and not fused)
        header = self.header_values(T, failed)
        # bounded: headers checked on the GPU (the host reads the verdict at the end of combine)
        yield from self.exchange(ws, "count", slot, header, counts=counts, check_heads=bounded,
                                 max_tokens=M if bounded else 2 ** 30)
        mtx = ws.control_view(slot, "heads.count").clone()          # every rank's header and counts
        n_recv = None
        if not bounded:                                              # sizes first: the one host read
            mtx_host = self._read_and_check(mtx)
            n_recv = sum(r[me] for r in mtx_host)
            needed = max(max(sum(r[d] for r in mtx_host) for d in range(ep)), max(sum(r) for r in mtx_host))
            if self.layout_in(ws).regions["rx"].shape[0] < needed:   # the same decision on every rank
                ws = pool.ensure(self.slot_layout(self._rows_for(needed)).nbytes)
        view = {n: ws.view(slot, r) for n, r in self.layout_in(ws).regions.items()}
        rows = view["rx"].shape[0]
        back_index = torch.empty(T, ep, dtype=torch.int64, device=dev)
        # bounded: the batch is the whole capacity, rows past what arrives marked as routed nowhere
        pad = triton_cdiv(rows, PAD_BLOCK) if bounded else 0
        if T + pad:
            ht_dispatch_kernel[(T + pad, split)](
                xw, xs if xs is not None else view["rw"], ids, owner, index, routing.topk_weights.float().contiguous(),
                j, mtx, back_index, view["rx"], view.get("rxs", view["rw"]), view["rids"], view["rw"], ws.deltas,
                pool.status, me, T, H, max(self.groups, 1), rows,
                EP=ep, HW=mtx.shape[1], K=K, X_ITEM=view["rx"].element_size(), BLOCK_H=block_h,
                K_P2=pow2(K), G_P2=pow2(max(self.groups, 1)), HAS_SCALES=self.fp8 and not fused, PAD_BLOCK=PAD_BLOCK,
                QUANT=fused, GROUP=group if fused else 1, num_warps=lc.warps)
        # a failed forward (another layer on a peer, a timeout) hands the experts no routed row
        yield from self.exchange(ws, "dispatch", slot, header, check_heads=False, poison=(view["rids"], -1))
        if bounded:
            n_recv = rows
        if self.stats is not None:
            self._count(mtx, view, n_recv, x.element_size())
        batch = FlatBatch(view["rx"][:n_recv], view["rids"][:n_recv], view["rw"][:n_recv],
                          view["rxs"][:n_recv] if self.fp8 else None)
        return batch, SymmHTHandle(T, slot, ws, header, mtx, n_recv, back_index)

    def _count(self, mtx, view, n_rows: int, itemsize: int) -> None:
        """Statistics (a host read: only with `enable_stats()`): rows and bytes per destination and back."""
        mtx_host = [r[HEADER_FIELDS:HEADER_FIELDS + self.ep_size] for r in mtx.tolist()]
        me, H = self.rank, self.plan.padded_hidden_size
        recv = [r[me] for r in mtx_host]
        row_bytes = sum(r.nbytes for n, r in self.slot_layout(1).regions.items() if n in ("rx", "rxs", "rids", "rw"))
        self.stats.forwards += 1
        self.stats.add("dispatch_rows", mtx_host[me])
        self.stats.add("dispatch_bytes", [n * row_bytes for n in mtx_host[me]])
        self.stats.add("combine_bytes", [n * H * itemsize for n in recv])
        self.stats.count_experts(count_pairs(view["rids"][:n_rows], self.placement.num_local_experts))

    def _read_and_check(self, mtx: torch.Tensor) -> list[list[int]]:
        """The one host read: every rank's header and counts, and the status bits; raises (the same on
        every rank) for a failed, overflowing or mismatched rank or a timeout. Returns mtx[s][d]."""
        seen = torch.cat([mtx.reshape(-1), self.pool.status]).tolist()
        bits, hw = seen[-1], mtx.shape[1]
        heads = [seen[r * hw:(r + 1) * hw] for r in range(self.ep_size)]
        if bits:
            self.pool.status.zero_()
        self.raise_for_status(bits, heads)
        self.check_heads(heads)
        return [h[HEADER_FIELDS:HEADER_FIELDS + self.ep_size] for h in heads]

    # -------------------------------------------------------------------------------------- combine
    def combine_steps(self, expert_out, handle: SymmHTHandle):
        from ..kernels.symm_dispatch import ht_combine_kernel
        from ..kernels.token_rows import gather_sum
        T, slot, ws, header, mtx, n, back_index = handle
        H = self.plan.padded_hidden_size
        if tuple(expert_out.shape) != (n, H) or expert_out.dtype != self.plan.dtype:
            raise ValueError(f"{self.name} dispatcher: combine needs the experts' output [{n}, {H}] {self.plan.dtype} "
                             f"for this handle, got {list(expert_out.shape)} {expert_out.dtype}")
        comb = ws.view(slot, self.layout_in(ws).regions["comb"])
        if n:
            y = expert_out.contiguous()
            lc = self.launch
            ht_combine_kernel[(n, lc.combine_split)](
                y, mtx, comb, ws.deltas, self.pool.status, self.rank, H, comb.shape[0], EP=self.ep_size,
                HW=mtx.shape[1], ITEM=y.element_size(),
                BLOCK_H=lc.column_block(H, lc.combine_split), num_warps=lc.combine_warps)
        # the expert row counters of this slot are cleared too: a low-latency peer that ran another layer
        # in this forward (a mismatch) may have counted into them
        yield from self.exchange(ws, "combine", slot, header, check_heads=False,
                                 zero=ws.control_view(slot, "counters"))
        out = gather_sum(comb, back_index, None, self.pool.status, self.plan.dtype)
        if self.max_tokens_per_rank is not None:
            self.check_at_end(ws, slot, "count", expert_out.device)
        return out

    def empty_expert_output(self, batch) -> torch.Tensor:
        return torch.zeros(batch.x.shape[0], self.plan.padded_hidden_size, dtype=self.plan.dtype, device=batch.x.device)

