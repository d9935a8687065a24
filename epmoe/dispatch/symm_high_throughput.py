"""`symm_high_throughput`: GPU-initiated dispatch and combine for large batches (prefill), over torch
symmetric memory. Each token travels once to each rank that holds at least one of its experts, stored
by a Triton kernel straight into the receiver's buffer; one row per (token, rank) comes back the same way.

Dispatch:
  1. On the GPU: each token's destination ranks and this rank's row count for each. The counts travel
     with the forward header through the workspace's control block (no NCCL call), and the host reads
     every rank's counts and header once: the one host read of the forward, which sizes the output.
     Headers are checked there (RankMismatch on every rank before any row moves).
  2. Every rank knows the whole count matrix, so a sender knows where its rows start in each receiver's
     buffer (after the rows of lower ranks): a kernel stores each token's row -- FP8 with its scales
     when `dispatch_fp8` -- with its routing restricted to that receiver's experts (local ids, -1 for
     slots held elsewhere) into every destination, then signals.
  3. The receiver's rows are a flat batch in its own buffer, source-major: the experts read them in place.
Combine: each expert rank stores its output row (already the weighted sum over its local slots) into the
owner's buffer, at the position the owner's send order gives that (rank, token) pair; after the signal
the owner sums a token's rows in float32 in rank order (bit-reproducible) and casts once.

Buffers grow (collectively: every rank sees the same counts) when a forward needs more rows than they
hold; give `max_tokens_per_rank` to size them once up front. Two slots alternate, so two micro-batches
can be in flight. CUDA only; refused elsewhere by the contract.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..contract import DispatcherCaps
from ..errors import RankMismatch
from ..layouts import FLAT, FlatBatch
from ..experts.base import count_pairs
from ._symm import SymmDispatcher, symm_problem


class SymmHTHandle(NamedTuple):
    num_tokens: int
    slot: int
    ws: object                   # the workspace generation this forward's rows live in
    head: torch.Tensor           # [HW] int32 this rank's header
    src_of_row: torch.Tensor     # [N] int64 source rank of each received row
    dst_row: torch.Tensor        # [N] int64 its row in the source's combine region
    back_index: torch.Tensor     # [T, ep] int64 row of the combine region holding (token, rank), or -1


def _available(device_type: str) -> str | None:
    return symm_problem(device_type)


class SymmHighThroughputDispatcher(SymmDispatcher):
    name = "symm_high_throughput"
    kind = "ht"
    CAPS = DispatcherCaps(
        layout=FLAT, communicates=True, devices=frozenset({"cuda"}), host_sync=True, cuda_graph_safe=False,
        fp8_dispatch=True, available=_available,
        summary="GPU-initiated: Triton kernels store each token once per destination rank straight into the "
                "peer's symmetric-memory buffer (counts exchanged on the GPU, one host read); rows come back "
                "the same way and the owner sums them in float32")

    def __init__(self, cfg, placement, group=None, max_tokens_per_rank=None, device=None, **kw):
        super().__init__(cfg, placement, group, max_tokens_per_rank, device, **kw)
        q = cfg.quant
        self.fp8 = q is not None and getattr(q, "dispatch_fp8", False)
        self.scheme = cfg.quant_scheme
        H = cfg.padded_hidden_size
        group_size = self.scheme.activation_group_size if self.fp8 else None
        self.groups = (1 if group_size is None else -(-H // group_size)) if self.fp8 else 0
        self.wire_dtype = torch.float8_e4m3fn if self.fp8 else cfg.dtype
        self._head_host = torch.empty(5, dtype=torch.int32, pin_memory=not self.simulated and torch.cuda.is_available())

    def slot_layout(self, rows: int = 1):
        """Regions of one slot for `rows` received rows (rows sent back use the same capacity)."""
        from .symm_workspace import SlotLayout
        cfg = self.cfg
        H, K = cfg.padded_hidden_size, cfg.top_k
        layout = SlotLayout(self.ep_size)
        layout.add("rx", self.wire_dtype, (rows, H))
        if self.fp8:
            layout.add("rxs", torch.float32, (rows, self.groups))
        layout.add("rids", torch.int32, (rows, K))
        layout.add("rw", torch.float32, (rows, K))
        layout.add("comb", cfg.dtype, (rows, H))
        return layout

    def _rows_for(self, needed: int) -> int:
        """Rows a slot must hold for `needed`: ep * max_tokens_per_rank (or 256), doubled until enough."""
        rows = self.ep_size * (self.max_tokens_per_rank or 256)
        while rows < needed:
            rows *= 2
        return rows

    def layout_in(self, ws):
        """This layer's slot layout in workspace `ws`: as many rows as fit (the same on every rank)."""
        cached = getattr(self, "_layout_cache", None)
        if cached is not None and cached[0] is ws:
            return cached[1]
        one = self.slot_layout(1)
        per_row = sum(r.nbytes for n, r in one.regions.items() if not n.startswith(("flags.", "heads.")))
        rows = max((ws.slot_bytes - one.nbytes) // per_row, 1)
        while rows > 1 and self.slot_layout(rows).nbytes > ws.slot_bytes:
            rows -= 1
        layout = self.slot_layout(rows)
        self._layout_cache = (ws, layout)
        return layout

    # ------------------------------------------------------------------------------------- dispatch
    def dispatch(self, x, routing):
        return self.steps(self.dispatch_steps(x, routing))

    def dispatch_steps(self, x, routing):
        from ..kernels.symm_dispatch import ht_dispatch_kernel, row_block
        T, H = x.shape
        ep, me, dev, K = self.ep_size, self.rank, x.device, self.cfg.top_k
        pool = self.pool
        ws = pool.ensure(self.slot_layout(self._rows_for(1)).nbytes) if pool.ws is None else pool.ws
        slot = pool.next_slot()
        epoch = pool.next_epoch("count")
        owner, _ = self.placement.ids_on_owner(routing.topk_ids)                 # [T, k]
        goes = torch.zeros(ep, T, dtype=torch.bool, device=dev)
        if T:
            goes.scatter_(0, owner.t().long(), True)
        counts = goes.sum(1, dtype=torch.int32)
        self._head_host.copy_(torch.tensor(self.header_values(T), dtype=torch.int32))
        head = torch.cat([self._head_host.to(dev, non_blocking=True), counts])
        yield from self.exchange(ws, "count", slot, epoch, head, check_heads=False)
        status = pool.status
        seen = torch.cat([ws.control_view(slot, "heads.count").reshape(-1), status])
        host = seen.tolist()                                                      # the one host read
        bits = host[-1]
        heads = [host[r * head.numel():(r + 1) * head.numel()] for r in range(ep)]
        if bits:
            status.zero_()
            self.raise_for_status(bits, heads)
        self.check_headers([[h[3], h[1], h[2], h[4]] for h in heads])
        fps = {h[0] for h in heads}
        if len(fps) > 1:
            raise RankMismatch(f"{self.name} dispatcher: the ranks exchange rows of different layouts (layer "
                               f"fingerprints {[h[0] for h in heads]}): they run different kinds of layers")
        mtx = [h[5:5 + ep] for h in heads]                                        # mtx[s][d]: rows s -> d
        recv = [mtx[s][me] for s in range(ep)]
        n_recv = sum(recv)
        needed = max(max(sum(mtx[s][d] for s in range(ep)) for d in range(ep)),
                     max(sum(row) for row in mtx))
        if self.layout_in(ws).regions["rx"].shape[0] < needed:               # the same on every rank
            ws = pool.ensure(self.slot_layout(self._rows_for(needed)).nbytes)
        view = {n: ws.view(slot, r) for n, r in self.layout_in(ws).regions.items()}

        # where this rank's rows start in each receiver's buffer, and in its own combine region
        start_in = torch.tensor([sum(mtx[s][d] for s in range(me)) for d in range(ep)], dtype=torch.int64)
        send_off = torch.tensor([sum(mtx[me][:d]) for d in range(ep)], dtype=torch.int64)
        j = torch.cumsum(goes, 1, dtype=torch.int64) - 1                          # [ep, T]
        pos = torch.where(goes, j + start_in.to(dev).unsqueeze(1), -1)
        back_index = torch.where(goes, j + send_off.to(dev).unsqueeze(1), -1).t().contiguous()   # [T, ep]
        ids_on = self.placement.local_ids_on(routing.topk_ids, torch.arange(ep, device=dev).view(ep, 1, 1))
        ids_on = ids_on.to(torch.int32).contiguous()
        if self.fp8:
            xw, xs = self.scheme.quantize_activations(x)
            xs = xs.float().contiguous()
        else:
            xw, xs = x, None
        if T:
            ht_dispatch_kernel[(T,)](
                xw.contiguous(), xs if xs is not None else view["rw"], ids_on, routing.topk_weights.float().contiguous(),
                pos, view["rx"], view.get("rxs", view["rw"]), view["rids"], view["rw"], ws.deltas,
                T, H, max(self.groups, 1), K,
                EP=ep, X_ITEM=xw.element_size(), BLOCK_H=row_block(H), K_P2=_p2(K), G_P2=_p2(max(self.groups, 1)),
                HAS_SCALES=self.fp8, num_warps=4)
        yield from self.exchange(ws, "dispatch", slot, epoch, head, check_heads=False)

        # the combine's bookkeeping: where each received row goes back to
        recv_start = [sum(recv[:s]) for s in range(ep)]
        base_in_src = [sum(mtx[s][:me]) for s in range(ep)]
        src_of_row = torch.repeat_interleave(torch.arange(ep, device=dev), torch.tensor(recv, device=dev),
                                             output_size=n_recv)
        shift = torch.tensor([base_in_src[s] - recv_start[s] for s in range(ep)], dtype=torch.int64, device=dev)
        dst_row = torch.arange(n_recv, device=dev) + shift[src_of_row]
        if self.stats is not None:
            row_bytes = sum(r.nbytes for n, r in self.slot_layout(1).regions.items() if n in ("rx", "rxs", "rids", "rw"))
            self.stats.forwards += 1
            self.stats.add("dispatch_rows", mtx[me])
            self.stats.add("dispatch_bytes", [n * row_bytes for n in mtx[me]])
            self.stats.add("combine_bytes", [n * H * x.element_size() for n in recv])
            self.stats.count_experts(count_pairs(view["rids"][:n_recv], self.placement.num_local_experts))
        batch = FlatBatch(view["rx"][:n_recv], view["rids"][:n_recv], view["rw"][:n_recv],
                          view["rxs"][:n_recv] if self.fp8 else None)
        return batch, SymmHTHandle(T, slot, ws, head, src_of_row, dst_row, back_index)

    # -------------------------------------------------------------------------------------- combine
    def combine(self, expert_out, handle: SymmHTHandle):
        return self.steps(self.combine_steps(expert_out, handle))

    def combine_steps(self, expert_out, handle: SymmHTHandle):
        from ..kernels.symm_dispatch import gather_sum, row_block, rows_to_peers_kernel
        T, slot, ws, head, src_of_row, dst_row, back_index = handle
        n, H = expert_out.shape[0], self.cfg.padded_hidden_size
        if expert_out.shape != (src_of_row.shape[0], H) or expert_out.dtype != self.cfg.dtype:
            raise ValueError(f"{self.name} dispatcher: combine needs the experts' output [{src_of_row.shape[0]}, {H}] "
                             f"{self.cfg.dtype} for this handle, got {list(expert_out.shape)} {expert_out.dtype}")
        pool = self.pool
        epoch = pool.next_epoch("combine")
        comb = ws.view(slot, self.layout_in(ws).regions["comb"])
        if n:
            y = expert_out.contiguous()
            rows_to_peers_kernel[(n,)](y, src_of_row, dst_row, comb, ws.deltas, H,
                                       ITEM=y.element_size(), BLOCK_H=row_block(H), num_warps=4)
        yield from self.exchange(ws, "combine", slot, epoch, head, check_heads=False)
        return gather_sum(comb, back_index, None, pool.status, self.cfg.dtype)

    def empty_expert_output(self, batch) -> torch.Tensor:
        return torch.zeros(batch.x.shape[0], self.cfg.padded_hidden_size, dtype=self.cfg.dtype, device=batch.x.device)


def _p2(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p
