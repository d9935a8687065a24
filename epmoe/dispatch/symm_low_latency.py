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

Shapes: T tokens here, H padded hidden size, K top-k, M = max_tokens_per_rank, C = ep * M rows per
expert, Lmax the most experts a rank holds (L here), G FP8 scales per row, E experts.

Two slots of the workspace alternate (two micro-batches, or two layers, in flight; the handle says which);
every wait is bounded by `timeout_s`.
Nothing is read back to the host during a forward except, in eager mode, the status word at the end of
`combine` (so that an overflow, a mismatch or a timeout raises on every rank in the forward that caused
it). In a CUDA graph nothing is read back: the status is checked by the next eager forward or by
`check()`, and the output of a forward that failed on the GPU is NaN. A rank with more than
`max_tokens_per_rank` tokens sends none and every rank raises, naming the setting.
CUDA only; refused elsewhere by the contract.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..contract import DispatcherCaps
from ..layouts import BATCHED, BatchedBatch
from ..registry import register_dispatcher
from ._symm import SymmDispatcher, SymmHandle, symm_problem
from .symm_workspace import COUNTERS, SlotLayout, SymmWorkspace


@dataclass
class SymmLLHandle(SymmHandle):
    weights_TK: torch.Tensor = None      # [T, K] float32 routing weights


class LLRegions(NamedTuple):
    """This layer's regions of one slot (views of the workspace, no copy)."""
    rx_LCH: torch.Tensor           # [Lmax, C, H] wire dtype: the batched layout, rows in arrival order
    rxs_LCG: torch.Tensor | None   # [Lmax, C, G] float32 scales (FP8 on the wire)
    meta_LC: torch.Tensor          # [Lmax, C] int32 origin of each row: (source rank * M + token) * K + k
    comb_MKH: torch.Tensor         # [M, K, H] layer dtype: the rows coming back, at (token, k)
    counts_L: torch.Tensor         # [Lmax] int32 rows per local expert (the control block's counters)


@register_dispatcher("symm_low_latency")
class SymmLowLatencyDispatcher(SymmDispatcher):
    CAPS = DispatcherCaps(
        layout=BATCHED, communicates=True, devices=frozenset({"cuda"}), peer_memory=True, host_sync=False, cuda_graph_safe=True,
        needs_max_tokens=True, fp8_dispatch=True, available=symm_problem, in_flight=SymmWorkspace.SLOTS,
        bounded_sms=True, keeps_stats=True,
        summary="GPU-initiated, fixed capacity: Triton kernels store each (token, expert) row straight into the "
                "owner's symmetric-memory buffer in the batched layout (read in place by the experts); no host "
                "sync, CUDA-graph capturable; overflow is an error on every rank")

    def __init__(self, plan, placement, group=None, device=None, **kw):
        if placement.max_local_experts > COUNTERS:
            raise ValueError(f"{self.name} dispatcher: a rank holds {placement.max_local_experts} experts, more than "
                             f"the {COUNTERS} row counters of the workspace; use more ranks")
        self.capacity = placement.ep_size * plan.max_tokens_per_rank     # C (the plan checked the capacity)
        super().__init__(plan, placement, group, device, **kw)

    @classmethod
    def slot_layout_for(cls, plan, placement, tokens_per_rank=None) -> SlotLayout:
        M, K, H = plan.max_tokens_per_rank, plan.top_k, plan.padded_hidden_size
        C, Lmax = placement.ep_size * M, placement.max_local_experts
        layout = SlotLayout(placement.ep_size)
        layout.add("rx", plan.wire_dtype, (Lmax, C, H))
        if plan.fp8_on_the_wire:
            layout.add("rxs", torch.float32, (Lmax, C, plan.wire_scales))
        layout.add("meta", torch.int32, (Lmax, C))
        layout.add("comb", plan.dtype, (M, K, H))
        return layout

    def _regions(self, ws, slot: int) -> LLRegions:
        view = {n: ws.view(slot, r) for n, r in self.layout.regions.items()}
        counts_L = ws.control_view(slot, "counters")[:self.placement.max_local_experts]
        return LLRegions(view["rx"], view.get("rxs"), view["meta"], view["comb"], counts_L)

    # ------------------------------------------------------------------------------------- dispatch
    def dispatch_steps(self, x_TH, routing, failed: bool = False):
        from ..kernels.symm_dispatch import ll_dispatch_kernel, programs, row_block
        from ..kernels.token_rows import pow2
        plan = self.plan
        T, H = x_TH.shape
        M, C, K, G = plan.max_tokens_per_rank, self.capacity, plan.top_k, max(plan.wire_scales, 1)
        fp8, dev = plan.fp8_on_the_wire, x_TH.device
        if T > M and dev.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise ValueError(f"{self.name} dispatcher: capturing a CUDA graph with {T} tokens, more than "
                             f"max_tokens_per_rank={M}; capture with at most {M} tokens")
        ws, slot = self.enter_forward()
        header = self.next_header(T, failed)
        rg = self._regions(ws, slot)
        n = T if T <= M else 0                      # an overflowing rank sends no token at all
        if n:
            xw_nH, xs_nG = self.wire_rows(x_TH[:n], quantize=fp8)             # wire dtype; float32 or None
            owner_E, index_E, _ = self.placement.tables(dev)                  # [E] int32 each
            ids_nK = routing.topk_ids[:n].to(torch.int32).contiguous()        # [n, K] global expert ids
            ll_dispatch_kernel[programs(n * K, 1, plan.comm_sms)[:1]](
                xw_nH, xs_nG if xs_nG is not None else rg.meta_LC, ids_nK, owner_E, index_E,
                rg.rx_LCH, rg.rxs_LCG if fp8 else rg.meta_LC, rg.counts_L, rg.meta_LC, ws.deltas, ws.status,
                self.rank, M, C, H, G, K, n * K,
                X_ITEM=xw_nH.element_size(), BLOCK_H=row_block(H), G_P2=pow2(G), HAS_SCALES=fp8, num_warps=4)
        # a failed forward (another layer on a peer, a timeout) hands the experts no rows
        yield from self.exchange(ws, "count", slot, header, max_tokens=M, check_heads=True,
                                 poison=(rg.counts_L, 0))
        L = self.placement.num_local_experts
        if self.stats is not None:
            self._count(routing, rg, x_TH.element_size(), n)
        batch = BatchedBatch(rg.rx_LCH[:L], rg.counts_L[:L], rg.rxs_LCG[:L] if fp8 else None, num_tokens=n)
        handle = self.opened(SymmLLHandle(T, ws=ws, slot=slot, header=header, generation=ws.generation,
                                          weights_TK=routing.topk_weights.float()))
        return batch, handle

    def _count(self, routing, rg: LLRegions, itemsize: int, n: int) -> None:
        """Statistics (host reads: only with `enable_stats()`): pairs per destination and back."""
        ep, H, L, C = self.ep_size, self.plan.padded_hidden_size, self.placement.num_local_experts, self.capacity
        owner_nK, _ = self.placement.ids_on_owner(routing.topk_ids[:n])
        sent = torch.bincount(owner_nK.reshape(-1).long(), minlength=ep).tolist()
        counts_L = rg.counts_L[:L].clamp(max=C)
        arrived_LC = torch.arange(C, device=counts_L.device).unsqueeze(0) < counts_L.unsqueeze(1)
        source = rg.meta_LC[:L][arrived_LC].long() // (self.plan.max_tokens_per_rank * self.plan.top_k)
        back = torch.bincount(source, minlength=ep).tolist()
        row_bytes = H * self.plan.wire_dtype.itemsize + 4 * self.plan.wire_scales + 4
        self.stats.record(sent, row_bytes, back, H * itemsize, counts_L.to(torch.int64))

    # -------------------------------------------------------------------------------------- combine
    def combine_steps(self, y_LCH, handle: SymmLLHandle):
        from ..kernels.symm_dispatch import ll_combine_kernel, programs, row_block
        from ..kernels.token_rows import gather_sum
        self.check_handle(handle)
        plan = self.plan
        T, ws, slot = handle.num_tokens, handle.ws, handle.slot
        M, C, K, H = plan.max_tokens_per_rank, self.capacity, plan.top_k, plan.padded_hidden_size
        L = self.placement.num_local_experts
        if tuple(y_LCH.shape) != (L, C, H) or y_LCH.dtype != plan.dtype:
            raise ValueError(f"{self.name} dispatcher: combine needs the experts' output [{L}, {C}, {H}] "
                             f"{plan.dtype}, got {list(y_LCH.shape)} {y_LCH.dtype}")
        rg = self._regions(ws, slot)
        y_LCH = y_LCH.contiguous()
        grid = programs(L, 4, plan.comm_sms)
        ll_combine_kernel[grid](y_LCH, rg.counts_L, rg.meta_LC, rg.comb_MKH, ws.deltas, ws.status,
                                M, C, H, K, L, ITEM=y_LCH.element_size(), BLOCK_H=row_block(H), SPLIT=grid[1],
                                num_warps=4)
        yield from self.exchange(ws, "combine", slot, handle.header, check_heads=False, zero=rg.counts_L)
        n = T if T <= M else 0
        # out[t] = sum over k of weight[t, k] * comb[t, k] in float32, in slot order; NaN if the forward failed
        out_nH = gather_sum(rg.comb_MKH.view(M * K, H), None, handle.weights_TK[:n], ws.status, plan.dtype,
                            shape=(n, K))
        self.check_at_end(handle, y_LCH.device)
        if n < T:   # unreachable in practice: an overflow sets OVERFLOW above on every rank
            raise ValueError(f"{self.name} dispatcher: {T} tokens, more than max_tokens_per_rank={M}")
        return out_nH
