"""The token rows copied into the expert layout of `align_pairs`, and each pair's row in it.

The Gluon GEMMs (`ws_grouped_gemm`) read A by TMA, a box of rows at a time, so the gate+up's rows must lie in
layout order: layout row r holds the token of the pair at position r (`sorted_ids[r] // top_k`; token 0 at a
padding position: each output row depends on its own A row only, and padding rows are never read back).
Two kernels do what took a PyTorch index copy, a transposed copy of the scales and a dozen small passes:
- `rows_to_layout_kernel`, over layout rows: `row_of_pair` [N * top_k] (the layout row of each pair, -1 where
  its expert is not here: the slot sum reads each token's rows there); FP8: the rows' scales [N, H/128]
  K-block-major, [H/128, rows] (the GEMM reads a tile's scales of one K block as one contiguous run), or
  one per row [N, 1] as [1, rows]; the
  padding rows; only up to the layout's used length (`num_padded`, read on the GPU: rows past it belong to
  tiles the GEMMs skip, and are left unwritten);
- `pairs_to_layout_kernel`, over pairs in token order: each pair's token row into its layout row, 16-byte
  vectors. A token's k pairs are neighbours, so its row is read from memory once and from L2 k - 1 times.
  Copying over layout rows instead (`order="rows"`, one kernel) reads a token's row once per expert segment
  it is in, far apart in time: once x outgrows L2 (the deepseek-v3 shard in FP8 at T = 8192: 59 MB, k = 8),
  k times from memory.

`rows_to_layout_reference` states the same in PyTorch; the tests hold both orders to it bit for bit (the
kernels only move bytes). They run under the Triton interpreter on CPU tensors too (`TRITON_INTERPRET=1`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from .jit_keys import key_callees_first

ROWS_PER_PROGRAM = 8
PAIRS_PER_PROGRAM = 8
CHUNK_BYTES = 2048          # bytes of a row moved per step (16-byte vectors, 4 warps)
ORDERS = ("pairs", "rows")


@triton.jit
def _copy_rows(x_ptr, a_ptr, src_row, dst_row, ok, H, h_end, BLOCK_H: tl.constexpr):
    """x[src_row] -> a[dst_row] for the rows where `ok`, columns [0, h_end) of H (int64 row indices), in
    steps of BLOCK_H words."""
    for h0 in range(0, h_end, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        m = ok[:, None] & (cols < H)[None, :]
        v = tl.load(x_ptr + src_row[:, None] * H + cols[None, :], mask=m)
        tl.store(a_ptr + dst_row[:, None] * H + cols[None, :], v, mask=m)


@triton.jit(do_not_specialize=["rows", "num_pairs"])
def rows_to_layout_kernel(x_ptr, scales_ptr, sorted_ids_ptr, num_padded_ptr, a_ptr, a_scale_ptr, row_of_pair_ptr,
                          H, KB, rows, num_pairs, TOP_K: tl.constexpr, COPY: tl.constexpr, HAS_SCALES: tl.constexpr,
                          PAD_ONLY: tl.constexpr, ROWS: tl.constexpr, BLOCK_H: tl.constexpr, KB_P2: tl.constexpr):
    """Program p: layout rows [p * ROWS, p * ROWS + ROWS). x [N, H] and a [rows, H] as raw words (the copy
    moves bits); scales [N, KB] float32 -> a_scale [KB, rows]; row_of_pair [num_pairs] (pre-filled with -1).
    PAD_ONLY: of the rows, only the padding rows (`pairs_to_layout_kernel` copies the pairs' rows)."""
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    live = r < tl.minimum(tl.load(num_padded_ptr), rows)
    pair = tl.load(sorted_ids_ptr + r, mask=live, other=num_pairs)
    is_pair = live & (pair >= 0) & (pair < num_pairs)
    tl.store(row_of_pair_ptr + tl.where(is_pair, pair, 0), r, mask=is_pair)
    if COPY:
        token = tl.where(is_pair, pair // TOP_K, 0).to(tl.int64)
        r64 = r.to(tl.int64)
        copied = live & (is_pair == 0) if PAD_ONLY else live
        # a program with no row to copy (PAD_ONLY: most) skips the loop: its masked steps cost more than the rest
        h_end = tl.where(tl.max(copied.to(tl.int32), 0) > 0, H, 0)
        _copy_rows(x_ptr, a_ptr, token, r64, copied, H, h_end, BLOCK_H)
        if HAS_SCALES:
            kb = tl.arange(0, KB_P2)
            m = live[:, None] & (kb < KB)[None, :]
            s = tl.load(scales_ptr + token[:, None] * KB + kb[None, :], mask=m)
            tl.store(a_scale_ptr + kb[None, :].to(tl.int64) * rows + r64[:, None], s, mask=m)


@triton.jit(do_not_specialize=["num_pairs"])
def pairs_to_layout_kernel(x_ptr, row_of_pair_ptr, a_ptr, H, num_pairs, TOP_K: tl.constexpr, PAIRS: tl.constexpr,
                           BLOCK_H: tl.constexpr):
    """Program p: pairs [p * PAIRS, p * PAIRS + PAIRS), each token's row x[pair // TOP_K] into its layout row
    row_of_pair[pair] (none where that is -1). x [N, H] and a [rows, H] as raw words."""
    pair = tl.program_id(0) * PAIRS + tl.arange(0, PAIRS)
    row = tl.load(row_of_pair_ptr + pair, mask=pair < num_pairs, other=-1)
    here = row >= 0
    token = (pair // TOP_K).to(tl.int64)
    _copy_rows(x_ptr, a_ptr, token, tl.where(here, row, 0).to(tl.int64), here, H, H, BLOCK_H)


def _raw(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bits as integers of its width (the copy moves bits; FP8 and bfloat16 alike)."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def rows_to_layout(x: torch.Tensor | None, scales: torch.Tensor | None, aligned, top_k: int,
                   order: str = "pairs"):
    """(a [rows, H] in layout order or None without x, a_scale_t [H/128, rows] float32 or None, row_of_pair
    [N, top_k] int32) for the pairs of `aligned` (`align_pairs` in uniform tiles) of N tokens with top_k
    slots each. x [N, H] (any dtype of 1, 2 or 4 bytes) and scales [N, ceil(H/128)] float32 (or [N, 1], one
    per row: a_scale_t [1, rows]); with x None only
    `row_of_pair` is made. Rows past the layout's used length are left unwritten. `order`: "pairs" copies
    the rows pair by pair in token order (each token's row read once from memory), "rows" layout row by
    layout row in the kernel that makes `row_of_pair` (one launch; the module docstring says when it reads
    more); the results are the same bits."""
    if order not in ORDERS:
        raise ValueError(f"rows_to_layout: order must be one of {ORDERS}, got {order!r}")
    if aligned.tail_m:
        raise ValueError("rows_to_layout: the split-tile layout (tail_m > 0) is not supported")
    num_pairs, rows = aligned.num_pairs, aligned.max_rows
    if num_pairs % top_k:
        raise ValueError(f"rows_to_layout: {num_pairs} pairs are not N tokens of top_k={top_k} slots")
    device = aligned.sorted_ids.device
    row_of_pair = torch.full((num_pairs,), -1, dtype=torch.int32, device=device)
    copy = x is not None
    a = a_scale_t = None
    H = KB = 0
    if copy:
        N, H = x.shape
        if N * top_k != num_pairs:
            raise ValueError(f"rows_to_layout: x has {N} rows, the layout {num_pairs} pairs of {top_k} slots")
        x = x.contiguous()
        a = torch.empty(rows, H, dtype=x.dtype, device=device)
        if scales is not None:
            KB = -(-H // 128)
            if tuple(scales.shape) == (N, 1):
                KB = 1          # one per row (FP8 per token)
            if tuple(scales.shape) != (N, KB):
                raise ValueError(f"rows_to_layout: scales must be [{N}, {KB}] (one per group of 128 columns) or "
                                 f"[{N}, 1] (one per row), got {list(scales.shape)}")
            scales = scales.float().contiguous()
            a_scale_t = torch.empty(KB, rows, dtype=torch.float32, device=device)
    if rows and num_pairs:
        src, dst = (_raw(x), _raw(a)) if copy else (row_of_pair, row_of_pair)
        block_h = triton.next_power_of_2(max(min(H, CHUNK_BYTES // max(src.element_size(), 1)), 16))
        by_pairs = copy and order == "pairs"
        rows_to_layout_kernel[(triton.cdiv(rows, ROWS_PER_PROGRAM),)](
            src, scales if scales is not None and copy else row_of_pair, aligned.sorted_ids, aligned.num_padded, dst,
            a_scale_t if a_scale_t is not None else row_of_pair, row_of_pair, H, KB, rows, num_pairs,
            TOP_K=top_k, COPY=copy, HAS_SCALES=a_scale_t is not None, PAD_ONLY=by_pairs, ROWS=ROWS_PER_PROGRAM,
            BLOCK_H=block_h, KB_P2=triton.next_power_of_2(max(KB, 1)), num_warps=4)
        if by_pairs:      # after row_of_pair is complete (same stream)
            pairs_to_layout_kernel[(triton.cdiv(num_pairs, PAIRS_PER_PROGRAM),)](
                src, row_of_pair, dst, H, num_pairs, TOP_K=top_k, PAIRS=PAIRS_PER_PROGRAM, BLOCK_H=block_h,
                num_warps=4)
    return a, a_scale_t, row_of_pair.view(-1, top_k)


def layout_pairs(aligned) -> tuple[torch.Tensor, torch.Tensor]:
    """In PyTorch (no host sync): the pair at each of the layout's `max_rows` rows (int64) and whether it is
    one (False at padding and past the used length, where `sorted_ids` holds a marker or nothing)."""
    rows = aligned.max_rows
    pair = aligned.sorted_ids[:rows].long()
    position = torch.arange(rows, device=pair.device)
    return pair, (position < aligned.num_padded.long()) & (pair >= 0) & (pair < aligned.num_pairs)


def layout_tokens(aligned, top_k: int) -> torch.Tensor:
    """The token of each layout row, int32 [max_rows] (token 0 where `layout_pairs` finds no pair): the
    `a_rows` of the Gluon GEMM's gathered form, and what `rows_to_layout` copies."""
    pair, is_pair = layout_pairs(aligned)
    return torch.where(is_pair, pair // top_k, torch.zeros_like(pair)).to(torch.int32)


def rows_to_layout_reference(x: torch.Tensor | None, scales: torch.Tensor | None, aligned, top_k: int):
    """What `rows_to_layout` computes, in PyTorch, with every row past the used length zero (the kernel
    leaves those unwritten: compare the first `num_padded` rows)."""
    num_pairs, rows = aligned.num_pairs, aligned.max_rows
    device = aligned.sorted_ids.device
    used = min(int(aligned.num_padded.item()), rows)
    pair, is_pair = layout_pairs(aligned)
    token = layout_tokens(aligned, top_k)[:used].long()
    row_of_pair = torch.full((num_pairs + 1,), -1, dtype=torch.int32, device=device)
    row_of_pair[torch.where(is_pair, pair, torch.full_like(pair, num_pairs))] = torch.arange(
        rows, dtype=torch.int32, device=device)
    a = a_scale_t = None
    if x is not None:
        a = torch.zeros(rows, x.shape[1], dtype=x.dtype, device=device)
        a[:used] = x[token]
        if scales is not None:
            a_scale_t = torch.zeros(scales.shape[1], rows, dtype=torch.float32, device=device)
            a_scale_t[:, :used] = scales.float()[token].t()
    return a, a_scale_t, row_of_pair[:num_pairs].view(-1, top_k)


key_callees_first(globals())     # each Triton function keyed after those it calls: one key in every process
