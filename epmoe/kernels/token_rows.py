"""Kernels that move token rows by destination rank, shared by the dispatchers that send one row per
(token, rank) -- `symm_high_throughput` into the peers' memory, `alltoall` through NCCL:

`route_to_ranks`: which ranks each token goes to and its position among the rows for each (a two-pass
scan in token order: deterministic), and the rows per destination, on the GPU (no host sync).
`gather_sum`: a token's returning rows summed in float32 in a fixed order and cast once (bit-reproducible,
no atomics); the rows may lie in the peers' symmetric buffers (the high-throughput pull combine reads each
rank's row of a token straight from that rank).

Both also run under the Triton interpreter on CPU tensors (`TRITON_INTERPRET=1`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from .jit_keys import key_callees_first


def pow2(n: int) -> int:
    """The smallest power of two >= n (block sizes of the small per-row fields)."""
    return triton.next_power_of_2(max(int(n), 1))


@triton.jit
def route_kernel(ids_ptr, owner_ptr, j_ptr, blocks_ptr, counts_ptr, T, n_blocks,
                    EP: tl.constexpr, EP_P2: tl.constexpr, K: tl.constexpr, BLOCK_T: tl.constexpr,
                    NB_CHUNK: tl.constexpr, PHASE: tl.constexpr):
    """Which ranks each token goes to, and its index among this rank's rows for each: two launches of
    one program per block of BLOCK_T tokens (a scan in two passes, deterministic: token order).

    ids [T, K] global expert ids, owner [E] int32 rank of each expert -> j [EP, T] int64 (the token's
    position among the tokens going to rank d, in token order; -1: it does not go there) and counts
    [EP] int32 rows per destination. blocks [n_blocks, EP] int64: scratch, each block's rows per
    destination. PHASE 0: each block's positions among its own tokens, and its totals; PHASE 1: the
    totals of the blocks before it added, and the last block writes `counts`.
    """
    b = tl.program_id(0)
    d = tl.arange(0, EP_P2)
    dm = d < EP
    t = b * BLOCK_T + tl.arange(0, BLOCK_T)
    tm = t < T
    at = d[None, :].to(tl.int64) * T + t[:, None]
    am = tm[:, None] & dm[None, :]
    if PHASE == 0:
        goes = tl.zeros([BLOCK_T, EP_P2], dtype=tl.int64)
        for k in tl.static_range(K):
            e = tl.load(ids_ptr + t.to(tl.int64) * K + k, mask=tm, other=0)
            o = tl.load(owner_ptr + e, mask=tm, other=-1)
            goes = goes | (o[:, None] == d[None, :]).to(tl.int64)
        goes = goes * tm[:, None].to(tl.int64)
        j = tl.where(goes > 0, tl.cumsum(goes, axis=0) - 1, -1)
        tl.store(j_ptr + at, j, mask=am)
        tl.store(blocks_ptr + b * EP + d, tl.sum(goes, axis=0), mask=dm)
    else:
        before = tl.zeros([EP_P2], dtype=tl.int64)
        for c0 in range(0, b, NB_CHUNK):
            c = c0 + tl.arange(0, NB_CHUNK)
            cnt = tl.load(blocks_ptr + c[:, None] * EP + d[None, :], mask=(c < b)[:, None] & dm[None, :], other=0)
            before += tl.sum(cnt, axis=0)
        j = tl.load(j_ptr + at, mask=am, other=-1)
        tl.store(j_ptr + at, tl.where(j >= 0, j + before[None, :], -1), mask=am)
        if b == n_blocks - 1:
            mine = tl.load(blocks_ptr + b * EP + d, mask=dm, other=0)
            tl.store(counts_ptr + d, (before + mine).to(tl.int32), mask=dm)


def route_to_ranks(ids: torch.Tensor, owner: torch.Tensor, ep: int, block_t: int = 256, num_warps: int = 4):
    """(j [ep, T] int64, counts [ep] int32) of `route_kernel` for ids [T, K] (two launches; none for
    T = 0)."""
    T, K = ids.shape
    j = torch.empty(ep, T, dtype=torch.int64, device=ids.device)
    counts = torch.zeros(ep, dtype=torch.int32, device=ids.device)
    if T:
        block = min(pow2(T), block_t)
        nb = triton.cdiv(T, block)
        blocks = torch.empty(nb, ep, dtype=torch.int64, device=ids.device)
        for phase in (0, 1):
            route_kernel[(nb,)](ids, owner, j, blocks, counts, T, nb, EP=ep, EP_P2=pow2(ep), K=K,
                                   BLOCK_T=block, NB_CHUNK=64, PHASE=phase, num_warps=num_warps)
    return j, counts


@triton.jit
def gather_sum_kernel(src_ptr, index_ptr, weight_ptr, out_ptr, status_ptr, deltas_ptr, T, H, rows,
                      N_TERMS: tl.constexpr, WEIGHTED: tl.constexpr, DIRECT: tl.constexpr, PEERS: tl.constexpr,
                      ITEM: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[t] = sum over j < N_TERMS (in this order, float32) of [weight[t, j] *] src_j[index[t, j]]
    (DIRECT: row t * N_TERMS + j, no index tensor). src_j is src itself, or with PEERS rank j's copy of it:
    `deltas [N_TERMS]` int64 bytes from src (the symmetric-memory peer distances), so the owner of a token
    reads each rank's row of it straight from that rank's buffer.

    index < 0 skips a term (its weight does not count: a NaN weight of an absent term cannot leak in), and
    so does a row past `rows`: no row is read outside the region. A non-zero status word (a timeout or
    mismatch this rank saw) makes the row NaN without reading any term (the rows and the peers' regions
    may then be another layer's): the output of a forward that failed on the GPU is never a
    plausible-looking number.
    """
    ok = tl.load(status_ptr) == 0
    # programs take tokens (axis 0) and column blocks (axis 1) in turn: a grid smaller than the work (the
    # plan's comm_sms, `programs`) still covers it
    for t0 in range(tl.program_id(0), T, tl.num_programs(0)):
        t = tl.cast(t0, tl.int64)
        for hb in range(tl.program_id(1), tl.cdiv(H, BLOCK_H), tl.num_programs(1)):
            offs = hb * BLOCK_H + tl.arange(0, BLOCK_H)
            hm = offs < H
            acc = tl.zeros([BLOCK_H], dtype=tl.float32)
            # masked loads, no branches: every term's load is issued before the first add needs it (the
            # peers' rows cross the link in parallel); a skipped term leaves the sum's bits as they were
            for j in tl.static_range(N_TERMS):
                if DIRECT:
                    i = t * N_TERMS + j
                else:
                    i = tl.load(index_ptr + t * N_TERMS + j)
                use = (i >= 0) & (i < rows) & ok
                base = src_ptr
                if PEERS:
                    base = src_ptr + tl.multiple_of(tl.load(deltas_ptr + j), 16) // ITEM
                row = tl.where(use, i, 0).to(tl.int64)
                v = tl.load(base + row * H + offs, mask=offs < tl.where(use, H, 0), other=0.0).to(tl.float32)
                if WEIGHTED:
                    v = v * tl.load(weight_ptr + t * N_TERMS + j)
                acc = tl.where(use, acc + v, acc)
            acc = tl.where(ok, acc, float("nan"))
            tl.store(out_ptr + t * H + offs, acc.to(out_ptr.dtype.element_ty), mask=hm)


def gather_sum(src: torch.Tensor, index: torch.Tensor | None, weight: torch.Tensor | None, status: torch.Tensor,
               out_dtype: torch.dtype, shape: tuple[int, int] | None = None, deltas: torch.Tensor | None = None,
               block_h: int = 2048, num_warps: int = 4, sms: int | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """[R, H] rows, index [T, J] (row or -1; None: row t * J + j, `shape` = (T, J)), optional weight
    [T, J] -> [T, H] in out_dtype (float32 sum, terms in order). `deltas` [J] int64: term j is read from
    the copy of `src` that many bytes away (rank j's, through the symmetric-memory mapping). `block_h`:
    columns per program (a power of two). `sms`: at most this many programs (`programs`). `out`: written
    in place (a contiguous [T, H] tensor of out_dtype) and returned."""
    T, J = index.shape if index is not None else shape
    R, H = src.shape
    if out is None:
        out = torch.empty(T, H, dtype=out_dtype, device=src.device)
    elif tuple(out.shape) != (T, H) or out.dtype != out_dtype or not out.is_contiguous():
        raise ValueError(f"gather_sum: out must be a contiguous [{T}, {H}] {out_dtype} tensor, got "
                         f"{list(out.shape)} {out.dtype}")
    if T == 0:
        return out
    block = min(triton.next_power_of_2(max(H, 16)), block_h)
    idx = status if index is None else index.contiguous()
    gather_sum_kernel[programs(T, triton.cdiv(H, block), sms)](
        src, idx, idx if weight is None else weight.contiguous(), out, status,
        status if deltas is None else deltas, T, H, R,
        N_TERMS=J, WEIGHTED=weight is not None, DIRECT=index is None, PEERS=deltas is not None,
        ITEM=src.element_size(), BLOCK_H=block, num_warps=num_warps)
    return out


def programs(items: int, split: int, sms: int | None) -> tuple[int, int]:
    """The grid of a transfer kernel with `items` units of work along axis 0 and `split` programs per unit
    along axis 1: one program per unit, or, with `sms` (the plan's comm_sms), at most `sms` programs in all
    (the hardware gives each its own SM while there are SMs enough), each taking units in turn."""
    if sms is None:
        return max(items, 1), split
    split = min(split, sms)
    return max(min(items, sms // split), 1), split


key_callees_first(globals())     # each Triton function keyed after those it calls: one key in every process
