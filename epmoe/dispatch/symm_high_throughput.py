"""`symm_high_throughput`: GPU-initiated dispatch and combine for large batches (prefill), over torch
symmetric memory. Each token travels once to each rank that holds at least one of its experts, stored
by a Triton kernel straight into the receiver's buffer; the owner of a token reads its one row per rank
back straight from the peers' buffers.

Dispatch:
  1. On the GPU (one Triton program): each token's destination ranks, its index among this rank's rows
     for each, and the row counts. The counts travel with the forward header through the workspace's
     control block (no NCCL call), next to the flag each rank publishes.
  2. Every rank then has the whole count matrix on its GPU, so a sender knows where its rows start in
     each receiver's buffer (after the rows of lower ranks): one program per token stores its row --
     FP8 with its scales when the plan puts FP8 on the wire -- with its routing restricted to that
     receiver's experts (local ids, -1 for slots held elsewhere) into every destination, then signals.
  3. The receiver's rows are a flat batch in its own buffer, source-major: the experts read them in place.
Combine (pull): each rank's expert output rows (each already the weighted sum over its local slots) lie in
its own buffer's combine region, in the order the rows arrived -- the batch's `out` says where, so experts
that can write there do, and the combine copies any other output there. After one signal (every rank's rows
are in place) the owner of a token reads its row from each rank that computed one, through the peer
pointers, sums them in float32 in rank order (bit-reproducible, the order of the reference path) and casts
once: the rows cross the link and are summed in the same pass. Nothing more is signalled after the reads: a
rank writes that slot's combine region again only in the forward after next, which its peers enter (their
first exchange) after their reads. `HTLaunch(combine_pull=False)` keeps the push combine for comparison:
each rank stores its rows into the owners' buffers and each owner sums them in a second pass.

With `max_tokens_per_rank` the buffers hold ep x max_tokens_per_rank rows, nothing is read back during
the forward (the batch spans the capacity, rows past what arrived routed nowhere; headers are checked on
the GPU and the verdict read once at the end of combine in eager mode) and the forward can be captured
in a CUDA graph. Without it, the host reads the count matrix once, after the first exchange (headers
checked there, before any row moves); that read sizes the batch, which holds as many rows as the
workspace has room for: a forward that needs more raises on every rank (every rank sees the same
counts), naming the size, and nothing grows inside a forward. Two slots alternate, so two micro-batches
can be in flight (the handle says which). CUDA only; refused elsewhere by the contract.

Shapes: T tokens here, H padded hidden size, K top-k, E experts, R rows a slot holds (received, and sent
back), N rows received in this forward, G FP8 scales per row, HW int32 per header row (the header fields,
then one row count per rank).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..contract import DispatcherCaps
from ..layouts import FLAT, FlatBatch, count_pairs
from ..registry import register_dispatcher
from ..sizes import ceil_div
from . import header as fh
from ._symm import SymmDispatcher, SymmHandle, symm_problem
from .symm_workspace import SlotLayout, SymmWorkspace


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
    combine_pull: bool = True        # False: the push combine (stores into the owners, then a summing pass)

    def column_block(self, H: int, split: int) -> int:
        from ..kernels.symm_dispatch import row_block
        return row_block(ceil_div(H, split))


@dataclass
class SymmHTHandle(SymmHandle):
    mtx_PW: torch.Tensor = None          # [ep, HW] int32 every rank's header and per-destination row counts
    num_rows: int = 0                    # N: rows this rank received
    back_TP: torch.Tensor = None         # [T, ep] int64 row of (token, rank) in a combine region, or -1
    pull: bool = True                    # back_TP rows are on the peers (pull), else in this rank's (push)


class HTRegions(NamedTuple):
    """This layer's regions of one slot (views of the workspace, no copy)."""
    rx_RH: torch.Tensor              # [R, H] wire dtype: received rows, source-major
    rxs_RG: torch.Tensor | None      # [R, G] float32 scales (FP8 on the wire)
    rids_RK: torch.Tensor            # [R, K] int32 local expert ids on this rank, -1: not here
    rw_RK: torch.Tensor              # [R, K] float32 routing weights
    comb_RH: torch.Tensor            # [R, H] layer dtype: pull: this rank's expert output rows, in receive
    #                                  order (the peers read them); push: the rows coming back, in send order


@register_dispatcher("symm_high_throughput")
class SymmHighThroughputDispatcher(SymmDispatcher):
    CAPS = DispatcherCaps(
        layout=FLAT, communicates=True, devices=frozenset({"cuda"}), peer_memory=True, host_sync=True, cuda_graph_safe=True,
        takes_max_tokens=True, fp8_dispatch=True, available=symm_problem, auto_priority=2,
        in_flight=SymmWorkspace.SLOTS, bounded_sms=True, keeps_stats=True,
        summary="GPU-initiated: Triton kernels store each token once per destination rank straight into the "
                "peer's symmetric-memory buffer (counts exchanged on the GPU, one host read); the owner reads its "
                "tokens' result rows from the peers' buffers and sums them in float32 in the same pass; with "
                "max_tokens_per_rank: fixed buffers, no host read in the forward, CUDA-graph capturable")

    LAUNCH = HTLaunch()

    def __init__(self, plan, placement, group=None, device=None, **kw):
        self.launch = self.LAUNCH                    # benchmarks try others on an instance
        super().__init__(plan, placement, group, device, **kw)

    @classmethod
    def slot_layout_for(cls, plan, placement, tokens_per_rank=None, rows: int | None = None) -> SlotLayout:
        """Regions of one slot for `rows` received rows (rows sent back use the same capacity); by default
        what a rank can receive: ep * (max_tokens_per_rank, or else `tokens_per_rank`)."""
        H, K = plan.padded_hidden_size, plan.top_k
        if rows is None:
            rows = placement.ep_size * (plan.max_tokens_per_rank or tokens_per_rank or 1)
        layout = SlotLayout(placement.ep_size)
        layout.add("rx", plan.wire_dtype, (rows, H))
        if plan.fp8_on_the_wire:
            layout.add("rxs", torch.float32, (rows, plan.wire_scales))
        layout.add("rids", torch.int32, (rows, K))
        layout.add("rw", torch.float32, (rows, K))
        layout.add("comb", plan.dtype, (rows, H))
        return layout

    def layout_in(self, ws: SymmWorkspace) -> SlotLayout:
        """This layer's regions in a slot of `ws` (the same on every rank): with max_tokens_per_rank the
        ep * max_tokens_per_rank rows a forward can receive (the workspace may be far larger: another layer
        sized it), without it as many rows as fit."""
        if self.plan.max_tokens_per_rank is not None:
            return self.slot_layout_for(self.plan, self.placement)
        control = SlotLayout(self.ep_size)
        one = self.slot_layout_for(self.plan, self.placement, rows=1)
        per_row = sum(r.nbytes for n, r in one.regions.items() if n not in control.regions)
        rows = max((ws.slot_bytes - control.nbytes) // per_row, 1)
        while rows > 1 and self.slot_layout_for(self.plan, self.placement, rows=rows).nbytes > ws.slot_bytes:
            rows -= 1
        return self.slot_layout_for(self.plan, self.placement, rows=rows)

    def _regions(self, ws, slot: int) -> HTRegions:
        view = {n: ws.view(slot, r) for n, r in self.layout.regions.items()}
        return HTRegions(view["rx"], view.get("rxs"), view["rids"], view["rw"], view["comb"])

    # ------------------------------------------------------------------------------------- dispatch
    def dispatch_steps(self, x_TH, routing, failed: bool = False):
        from ..kernels.symm_dispatch import PAD_BLOCK, ht_dispatch_kernel, programs
        from ..kernels.token_rows import pow2, route_to_ranks
        from triton import cdiv as triton_cdiv
        plan = self.plan
        T, H = x_TH.shape
        ep, me, dev, K = self.ep_size, self.rank, x_TH.device, plan.top_k
        M, G, fp8 = plan.max_tokens_per_rank, max(plan.wire_scales, 1), plan.fp8_on_the_wire
        bounded = M is not None
        capturing = dev.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if not bounded and capturing:
            raise ValueError(f"{self.name} dispatcher: capturing a CUDA graph needs max_tokens_per_rank (without it "
                             f"the batch is sized from the exchanged counts, a host read)")
        if bounded and T > M and capturing:
            raise ValueError(f"{self.name} dispatcher: capturing a CUDA graph with {T} tokens, more than "
                             f"max_tokens_per_rank={M}; capture with at most {M} tokens")
        ws, slot = self.enter_forward()
        rg = self._regions(ws, slot)
        R = rg.rx_RH.shape[0]
        # everything that does not depend on the other ranks, queued before the exchange
        ids_TK = routing.topk_ids.to(torch.int32).contiguous()                   # [T, K] global expert ids
        owner_E, index_E, _ = self.placement.tables(dev)                          # [E] int32 each
        lc = self.launch
        j_PT, counts_P = route_to_ranks(ids_TK, owner_E, ep, lc.route_block, lc.route_warps)   # [ep, T], [ep]
        group = plan.wire_scale_group
        # FP8 on the wire: quantized inside the transfer kernel when its column blocks hold whole groups
        split = lc.quant_split if fp8 and group is not None else lc.split
        block_h = lc.column_block(H, split)
        fused = fp8 and group is not None and block_h % group == 0 and x_TH.dtype != plan.wire_dtype
        xw_TH, xs_TG = self.wire_rows(x_TH, quantize=fp8 and not fused)           # wire dtype; float32 or None
        header = self.next_header(T, failed)
        # bounded: headers checked on the GPU (the host reads the verdict at the end of combine)
        yield from self.exchange(ws, "count", slot, header, counts=counts_P, check_heads=bounded,
                                 max_tokens=M if bounded else 2 ** 30)
        mtx_PW = ws.control_view(slot, "heads.count").clone()          # every rank's header and counts
        n_recv = R
        if not bounded:                                                  # sizes first: the one host read
            counts_PP = self._read_and_check(mtx_PW, header)             # counts_PP[s][d]: rows s sends d
            n_recv = sum(r[me] for r in counts_PP)
            needed = max(max(sum(r[d] for r in counts_PP) for d in range(ep)), max(sum(r) for r in counts_PP))
            if needed > R:                                                # the same decision on every rank
                nbytes = self.slot_layout_for(plan, self.placement, rows=needed).nbytes
                raise ValueError(f"{self.name} dispatcher: this forward needs {needed} rows a slot, the "
                                 f"workspace holds {R} ({ws.slot_bytes} bytes a slot); create it with "
                                 f"SymmWorkspace(group, SymmWorkspace.size_hint(..., max_tokens_per_rank=...)) of "
                                 f"at least {nbytes} bytes, or build the layer with max_tokens_per_rank (raised on "
                                 f"every rank; the group's next forward is unaffected)")
        back_TP = torch.empty(T, ep, dtype=torch.int64, device=dev)
        # bounded: the batch is the whole capacity, rows past what arrives marked as routed nowhere
        pad = triton_cdiv(R, PAD_BLOCK) if bounded else 0
        if T + pad:
            ht_dispatch_kernel[programs(T + pad, split, plan.comm_sms)](
                xw_TH, xs_TG if xs_TG is not None else rg.rw_RK, ids_TK, owner_E, index_E,
                routing.topk_weights.float().contiguous(), j_PT, mtx_PW, back_TP, rg.rx_RH,
                rg.rxs_RG if fp8 else rg.rw_RK, rg.rids_RK, rg.rw_RK, ws.deltas, ws.status, me, T, H, G, R, T + pad,
                EP=ep, HW=mtx_PW.shape[1], K=K, X_ITEM=rg.rx_RH.element_size(), BLOCK_H=block_h,
                K_P2=pow2(K), G_P2=pow2(G), HAS_SCALES=fp8 and not fused, PAD_BLOCK=PAD_BLOCK,
                QUANT=fused, GROUP=group if fused else 1, PULL=lc.combine_pull, num_warps=lc.warps)
        # a failed forward (another layer on a peer, a timeout) hands the experts no routed row
        yield from self.exchange(ws, "dispatch", slot, header, check_heads=False, poison=(rg.rids_RK, -1))
        if self.stats is not None:
            self._count(mtx_PW, rg, n_recv, x_TH.element_size())
        N = n_recv
        # pull: the experts' output goes where the peers read it (experts that can write there do)
        batch = FlatBatch(rg.rx_RH[:N], rg.rids_RK[:N], rg.rw_RK[:N], rg.rxs_RG[:N] if fp8 else None,
                          out=rg.comb_RH[:N] if lc.combine_pull else None)
        handle = self.opened(SymmHTHandle(T, ws=ws, slot=slot, header=header, generation=ws.generation,
                                          mtx_PW=mtx_PW, num_rows=N, back_TP=back_TP, pull=lc.combine_pull))
        return batch, handle

    def _count(self, mtx_PW, rg: HTRegions, n_rows: int, itemsize: int) -> None:
        """Statistics (a host read: only with `enable_stats()`): rows and bytes per destination and back."""
        base = len(fh.FIELDS)
        counts_PP = [r[base:base + self.ep_size] for r in mtx_PW.tolist()]
        me, H = self.rank, self.plan.padded_hidden_size
        received = [r[me] for r in counts_PP]
        row_bytes = sum(r.nbytes for n, r in self.slot_layout_for(self.plan, self.placement, rows=1).regions.items()
                        if n in ("rx", "rxs", "rids", "rw"))
        self.stats.record(counts_PP[me], row_bytes, received, H * itemsize,
                          count_pairs(rg.rids_RK[:n_rows], self.placement.num_local_experts))

    def _read_and_check(self, mtx_PW: torch.Tensor, header: fh.Header) -> list[list[int]]:
        """The one host read: every rank's header and counts, and the status bits; raises (the same on
        every rank) for a failed, overflowing or mismatched rank or a timeout. Returns counts[s][d]."""
        ws = self.workspace
        seen = torch.cat([mtx_PW.reshape(-1), ws.status]).tolist()
        bits, hw = seen[-1], mtx_PW.shape[1]
        heads = [seen[r * hw:(r + 1) * hw] for r in range(self.ep_size)]
        ws.status_read(bits)
        self.raise_for_status(bits, heads, header)
        base = len(fh.FIELDS)
        error = fh.mismatch(f"{self.name} dispatcher", [h[:base] for h in heads])
        if error is not None:
            raise error
        return [h[base:base + self.ep_size] for h in heads]

    # -------------------------------------------------------------------------------------- combine
    def combine_steps(self, y_NH, handle: SymmHTHandle):
        from ..kernels.symm_dispatch import ht_combine_kernel, programs
        from ..kernels.token_rows import gather_sum
        self.check_handle(handle)
        plan = self.plan
        ws, slot, N, mtx_PW = handle.ws, handle.slot, handle.num_rows, handle.mtx_PW
        H = plan.padded_hidden_size
        if tuple(y_NH.shape) != (N, H) or y_NH.dtype != plan.dtype:
            raise ValueError(f"{self.name} dispatcher: combine needs the experts' output [{N}, {H}] {plan.dtype} "
                             f"for this handle, got {list(y_NH.shape)} {y_NH.dtype}")
        comb_RH = self._regions(ws, slot).comb_RH
        lc = self.launch
        block_h = lc.column_block(H, lc.combine_split)
        if handle.pull:
            if N and not _is_view_of(y_NH, comb_RH[:N]):       # experts that wrote elsewhere
                comb_RH[:N].copy_(y_NH)
        elif N:
            y_NH = y_NH.contiguous()
            ht_combine_kernel[programs(N, lc.combine_split, plan.comm_sms)](
                y_NH, mtx_PW, comb_RH, ws.deltas, ws.status, self.rank, H, comb_RH.shape[0], N, EP=self.ep_size,
                HW=mtx_PW.shape[1], ITEM=y_NH.element_size(), BLOCK_H=block_h, num_warps=lc.combine_warps)
        # pull: every rank's rows are in place once this returns; push: they have arrived here. The expert
        # row counters of this slot are cleared too: a low-latency peer that ran another layer in this
        # forward (a mismatch) may have counted into them
        yield from self.exchange(ws, "combine", slot, handle.header, check_heads=False,
                                 zero=ws.control_view(slot, "counters"))
        # out[t] = sum over ranks d in order of row back[t, d] (-1: skipped) of rank d's combine region (pull)
        # or of this rank's (push), in float32; NaN, reading nothing, if the forward failed
        out_TH = gather_sum(comb_RH, handle.back_TP, None, ws.status, plan.dtype,
                            deltas=ws.deltas if handle.pull else None, block_h=block_h,
                            num_warps=lc.combine_warps, sms=plan.comm_sms if handle.pull else None)
        if plan.max_tokens_per_rank is not None:
            self.check_at_end(handle, y_NH.device)
        return out_TH

    def empty_expert_output(self, batch) -> torch.Tensor:
        return torch.zeros(batch.x.shape[0], self.plan.padded_hidden_size, dtype=self.plan.dtype, device=batch.x.device)


def _is_view_of(y: torch.Tensor, region: torch.Tensor) -> bool:
    """Whether `y` is exactly the rows of `region` (the experts wrote their output in place)."""
    return (y.data_ptr() == region.data_ptr() and y.shape == region.shape and y.stride() == region.stride()
            and y.dtype == region.dtype)
