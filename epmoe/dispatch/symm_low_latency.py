"""`symm_low_latency`: GPU-initiated dispatch and combine for decode, over torch symmetric memory: fixed
capacity, no host synchronisation, CUDA-graph capturable, rows landing directly in the batched layout.

Dispatch: one Triton program per (token, slot k) claims a row of expert ids[t, k] on its owner (an atomic
add on the owner's per-expert counter, across NVLink) and stores the token there -- FP8 with its scales
when `dispatch_fp8` -- with its origin (rank, token, k) beside it. After a signal per peer, the owner's
`[L, ep * max_tokens_per_rank, H]` receive region *is* the batched layout with `counts [L]`: the
`batched` experts read it in place, no repacking copy. Rows of one expert arrive in no fixed order, but
each row's output depends on that row alone, so results do not.
Combine: each expert row goes back to its origin's `[M, k, H]` region at (token, k); the owner sums the
k rows of each token with their routing weights in float32, in slot order (bit-reproducible), and
casts once. The expert counters are cleared by the combine, after they were read and before any peer can
count into them again.

Two slots alternate (two micro-batches, or two layers, in flight); every wait is bounded by `timeout_s`.
Nothing is read back to the host during a forward except, in eager mode, the status word at the end of
`combine` (so that an overflow, a mismatch or a timeout raises on every rank in the forward that caused
it). In a CUDA graph nothing is read back: the status is checked by the next eager forward or by
`check()`, and the output of a forward that failed on the GPU is NaN. A rank with more than
`max_tokens_per_rank` tokens sends none and every rank raises, naming the setting.
CUDA only; refused elsewhere by the contract.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..contract import DispatcherCaps
from ..registry import register_dispatcher
from ..layouts import BATCHED, BatchedBatch
from ._symm import SymmDispatcher, symm_problem


class SymmLLHandle(NamedTuple):
    num_tokens: int
    slot: int
    ws: object
    header: list                 # this rank's header values
    weights: torch.Tensor        # [T, k] float32 routing weights


@register_dispatcher("symm_low_latency")
class SymmLowLatencyDispatcher(SymmDispatcher):
    CAPS = DispatcherCaps(
        layout=BATCHED, communicates=True, devices=frozenset({"cuda"}), peer_memory=True, host_sync=False, cuda_graph_safe=True,
        needs_max_tokens=True, fp8_dispatch=True, available=symm_problem,
        summary="GPU-initiated, fixed capacity: Triton kernels store each (token, expert) row straight into the "
                "owner's symmetric-memory buffer in the batched layout (read in place by the experts); no host "
                "sync, CUDA-graph capturable; overflow is an error on every rank")

    def __init__(self, plan, placement, group=None, device=None, **kw):
        super().__init__(plan, placement, group, device, **kw)
        M = plan.max_tokens_per_rank
        if isinstance(M, bool) or not isinstance(M, int) or M < 1:
            raise ValueError(f"{self.name} dispatcher: max_tokens_per_rank must be a positive int (the most tokens "
                             f"any rank passes in one forward), got {M!r}")
        self.M = M
        self.capacity = self.ep_size * self.M
        from .symm_workspace import COUNTERS
        if placement.max_local_experts > COUNTERS:
            raise ValueError(f"{self.name} dispatcher: a rank holds {placement.max_local_experts} experts, more than "
                             f"the {COUNTERS} row counters of the workspace; use more ranks")
        self.layout = self.slot_layout()

    def slot_layout(self):
        from .symm_workspace import SlotLayout
        C, Lmax = self.ep_size * self.M, self.placement.max_local_experts
        H, K = self.plan.padded_hidden_size, self.plan.top_k
        layout = SlotLayout(self.ep_size)
        layout.add("rx", self.wire_dtype, (Lmax, C, H))
        if self.fp8:
            layout.add("rxs", torch.float32, (Lmax, C, self.groups))
        layout.add("meta", torch.int32, (Lmax, C))
        layout.add("comb", self.plan.dtype, (self.M, K, H))
        return layout

    def _views(self, ws, slot: int) -> dict:
        """This layer's regions of slot `slot`, and the expert counters of the control block."""
        view = {n: ws.view(slot, r) for n, r in self.layout.regions.items()}
        view["counts"] = ws.control_view(slot, "counters")[:self.placement.max_local_experts]
        return view

    # ------------------------------------------------------------------------------------- dispatch
    def dispatch_steps(self, x, routing, failed: bool = False):
        from ..kernels.symm_dispatch import ll_dispatch_kernel, row_block
        from ..kernels.token_rows import pow2
        T, H = x.shape
        M, C, K, dev = self.M, self.capacity, self.plan.top_k, x.device
        capturing = dev.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if capturing and T > M:
            raise ValueError(f"{self.name} dispatcher: capturing a CUDA graph with {T} tokens, more than "
                             f"max_tokens_per_rank={M}; capture with at most {M} tokens")
        pool = self.pool
        ws = self.workspace(self.layout.nbytes, T, failed)
        slot = pool.next_slot()
        header = self.header_values(T, failed)
        view = self._views(ws, slot)
        n = T if T <= M else 0                      # an overflowing rank sends no token at all
        if n:
            xw, xs = self.wire_rows(x[:n], quantize=self.fp8)
            owner, index, _ = self.placement.tables(dev)
            ll_dispatch_kernel[(n * K,)](
                xw, xs if xs is not None else view["meta"],
                routing.topk_ids[:n].to(torch.int32).contiguous(), owner, index,
                view["rx"], view.get("rxs", view["meta"]), view["counts"], view["meta"], ws.deltas, pool.status,
                self.rank, M, C, H, max(self.groups, 1), K,
                X_ITEM=xw.element_size(), BLOCK_H=row_block(H), G_P2=pow2(max(self.groups, 1)), HAS_SCALES=self.fp8,
                num_warps=4)
        # a failed forward (another layer on a peer, a timeout) hands the experts no rows
        yield from self.exchange(ws, "count", slot, header, max_tokens=M, check_heads=True,
                                 poison=(view["counts"], 0))
        L = self.placement.num_local_experts
        if self.stats is not None:
            self._count(routing, view, x.element_size(), n)
        batch = BatchedBatch(view["rx"][:L], view["counts"][:L], view["rxs"][:L] if self.fp8 else None)
        return batch, SymmLLHandle(T, slot, ws, header, routing.topk_weights.float())

    def _count(self, routing, view, itemsize: int, n: int) -> None:
        """Statistics (host reads: only with `enable_stats()`): pairs per destination and back."""
        ep, H, L = self.ep_size, self.plan.padded_hidden_size, self.placement.num_local_experts
        owner, _ = self.placement.ids_on_owner(routing.topk_ids[:n])
        sent = torch.bincount(owner.reshape(-1).long(), minlength=ep).tolist()
        counts = view["counts"][:L].clamp(max=self.capacity)
        rows = torch.arange(self.capacity, device=counts.device).unsqueeze(0) < counts.unsqueeze(1)
        src = view["meta"][:L][rows].long() // (self.M * self.plan.top_k)
        back = torch.bincount(src, minlength=ep).tolist()
        row_bytes = H * self.wire_dtype.itemsize + 4 * self.groups + 4
        self.stats.forwards += 1
        self.stats.add("dispatch_rows", sent)
        self.stats.add("dispatch_bytes", [p * row_bytes for p in sent])
        self.stats.add("combine_bytes", [p * H * itemsize for p in back])
        self.stats.count_experts(counts.to(torch.int64))

    # -------------------------------------------------------------------------------------- combine
    def combine_steps(self, expert_out, handle: SymmLLHandle):
        from ..kernels.symm_dispatch import ll_combine_kernel, row_block
        from ..kernels.token_rows import gather_sum
        T, slot, ws, header, weights = handle
        M, C, K, H = self.M, self.capacity, self.plan.top_k, self.plan.padded_hidden_size
        L = self.placement.num_local_experts
        if tuple(expert_out.shape) != (L, C, H) or expert_out.dtype != self.plan.dtype:
            raise ValueError(f"{self.name} dispatcher: combine needs the experts' output [{L}, {C}, {H}] "
                             f"{self.plan.dtype}, got {list(expert_out.shape)} {expert_out.dtype}")
        pool = self.pool
        view = self._views(ws, slot)
        y = expert_out.contiguous()
        split = 4
        ll_combine_kernel[(L, split)](y, view["counts"], view["meta"], view["comb"], ws.deltas, pool.status,
                                      M, C, H, K, ITEM=y.element_size(), BLOCK_H=row_block(H), SPLIT=split,
                                      num_warps=4)
        yield from self.exchange(ws, "combine", slot, header, check_heads=False, zero=view["counts"])
        n = T if T <= M else 0
        out = gather_sum(view["comb"].view(M * K, H), None, weights[:n], pool.status, self.plan.dtype, shape=(n, K))
        self.check_at_end(ws, slot, "count", y.device)
        if n < T:   # unreachable in practice: an overflow sets OVERFLOW above on every rank
            raise ValueError(f"{self.name} dispatcher: {T} tokens, more than max_tokens_per_rank={M}")
        return out

