"""Group the (token, slot) pairs of a flat batch by local expert, on the GPU, with no host sync.

The fused GEMMs work on tiles of `block_m` rows that all belong to one expert. This pass lays the pairs
out expert after expert, each expert's segment padded up to a multiple of `block_m`:

    sorted_ids   [max_padded] int32   pair id (row * k + slot) at each padded position; `num_pairs` marks
                                      padding (a position no pair fills)
    block_expert [max_blocks] int32   the expert of each tile of `block_m` positions; -1 past the end
    num_padded   [1]          int32   how many positions are in use (tiles past it have nothing to do)

`max_blocks` is a bound known from the shapes alone (no count is read back on the host), so the launch
sizes are static and the whole forward can be captured in a CUDA graph:
    sum_e ceil(c_e / block_m) <= ceil(P / block_m) + min(L, P)      for P pairs over L experts.
Pairs of one expert land in its segment in no particular order (atomics hand out the slots); that is
harmless because every row of a GEMM is computed independently, so the result does not depend on it.

Split tiles (`tail_m` > 0): an expert whose rows leave a remainder of at most `tail_m` after its full
tiles of `block_m` gets one tail tile of `tail_m` rows for it (its segment padded to
floor(count / block_m) * block_m + tail_m); any other expert is padded to a multiple of block_m as
before. The GEMMs then run body tiles of `block_m` rows and, in a second launch, tail tiles of `tail_m`
rows. At 256 rows per expert and block_m = 128, a quarter of all rows are padding without it; the
experts just past a multiple of block_m lose most of theirs. One tail tile at most: a tile's cost is
mostly its weight tile, so a remainder split over several small tiles costs more than one full tile
(seen on the H200: gpt-oss one-hot T=8192 took 1.4x as long with up to three 32-row tails). The tiles
are listed, not implied by the program id:

    tiles       [max_body + max_tail, 2] int32   (expert, first position) of each body tile, then of each
                                                 tail tile (tail list starts at row max_body)
    tile_counts [2]                      int32   body tiles and tail tiles in use

Small batches (decode) take one program that does everything; large ones take a count pass, a scan
program and a scatter pass.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from .jit_keys import key_callees_first

# Up to this many pairs, one program does the whole alignment (one launch: what decode wants).
SINGLE_PROGRAM_MAX_PAIRS = 4096
_CHUNK = 1024           # pairs handled per step / per program
_BLOCKS_PER_STEP = 16   # tiles whose expert is found per step of the scan


@dataclass
class AlignedPairs:
    sorted_ids: torch.Tensor
    block_expert: torch.Tensor
    num_padded: torch.Tensor
    block_m: int
    num_pairs: int
    max_blocks: int      # tiles the GEMM grids cover (the bound; tiles past num_padded return at once)
    tail_m: int = 0      # split tiles: tail tile height (0: uniform tiles of block_m, `block_expert` is used)
    tiles: torch.Tensor | None = None         # split: [max_body + max_tail, 2] (expert, start)
    tile_counts: torch.Tensor | None = None   # split: [2] body tiles, tail tiles in use
    max_body: int = 0
    max_tail: int = 0
    max_rows: int = 0    # positions the padded layout can use (the bound): rows of the intermediate buffer

    def body_tiles(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(tile list, its count) of the body tiles (split layout)."""
        return self.tiles, self.tile_counts

    def tail_tiles(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(tile list, its count) of the tail tiles: slices of the body's, at addresses that need not be multiples
        of 16 (the GEMM kernel does not specialize on their alignment)."""
        return self.tiles[self.max_body:], self.tile_counts[1:]


def max_blocks_for(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Upper bound on the tiles the padded layout can need (shapes only)."""
    return triton.cdiv(num_pairs, block_m) + min(num_experts, num_pairs)


def split_bounds(num_pairs: int, num_experts: int, block_m: int, tail_m: int) -> tuple[int, int, int]:
    """(max body tiles, max tail tiles, max padded positions) of the split layout, from shapes alone: no
    segment is longer than in the uniform layout, so the uniform bounds hold; one tail tile per expert
    with pairs at most."""
    blocks = max_blocks_for(num_pairs, num_experts, block_m)
    return blocks, min(num_experts, num_pairs), blocks * block_m


@triton.jit
def _describe_split(counts, num_padded_ptr, cursor_ptr, tiles_ptr, tile_counts_ptr, sorted_ids_ptr,
                    num_pairs, max_body, NUM_EXPERTS: tl.constexpr, EXPERTS_P2: tl.constexpr,
                    BLOCK_M: tl.constexpr, TAIL_M: tl.constexpr):
    """Split layout from per-expert counts: segments padded as the module docstring says, each expert's
    start into `cursor`, padding markers, the body and tail tile lists and their counts."""
    experts = tl.arange(0, EXPERTS_P2)
    is_expert = experts < NUM_EXPERTS
    whole = (counts // BLOCK_M) * BLOCK_M
    rem = counts - whole
    use_tail = is_expert & (rem > 0) & (rem <= TAIL_M)
    padded = tl.where(use_tail, whole + TAIL_M, tl.cdiv(counts, BLOCK_M) * BLOCK_M)
    padded = tl.where(is_expert, padded, 0)
    ends = tl.cumsum(padded, 0)
    starts = ends - padded
    tl.store(num_padded_ptr, tl.sum(padded, 0))
    tl.store(cursor_ptr + experts, starts, mask=is_expert)
    marker = tl.full([EXPERTS_P2], 0, tl.int32) + num_pairs
    for c in range(0, BLOCK_M - 1):
        pad_pos = starts + counts + c
        tl.store(sorted_ids_ptr + pad_pos, marker, mask=is_expert & (pad_pos < ends))
    n_body = padded // BLOCK_M
    n_tail = use_tail.to(tl.int32)
    body_first = tl.cumsum(n_body, 0) - n_body
    tail_first = tl.cumsum(n_tail, 0) - n_tail
    tl.store(tile_counts_ptr, tl.sum(n_body, 0))
    tl.store(tile_counts_ptr + 1, tl.sum(n_tail, 0))
    most = tl.max(n_body, 0)
    for j in range(0, most):
        idx = body_first + j
        here = is_expert & (j < n_body)
        tl.store(tiles_ptr + 2 * idx, experts, mask=here)
        tl.store(tiles_ptr + 2 * idx + 1, starts + j * BLOCK_M, mask=here)
    idx = max_body + tail_first
    tl.store(tiles_ptr + 2 * idx, experts, mask=use_tail)
    tl.store(tiles_ptr + 2 * idx + 1, starts + n_body * BLOCK_M, mask=use_tail)


@triton.jit
def _scan_and_describe(counts, num_padded_ptr, cursor_ptr, block_expert_ptr, sorted_ids_ptr, num_pairs,
                       max_blocks, NUM_EXPERTS: tl.constexpr, EXPERTS_P2: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCKS_PER_STEP: tl.constexpr):
    """From per-expert counts [EXPERTS_P2] (zero past NUM_EXPERTS): write each expert's start into
    `cursor`, the total into `num_padded`, every tile's expert, and the padding marker into the padding
    positions (those no pair will fill)."""
    experts = tl.arange(0, EXPERTS_P2)
    is_expert = experts < NUM_EXPERTS
    padded = tl.where(is_expert, tl.cdiv(counts, BLOCK_M) * BLOCK_M, 0)
    ends = tl.cumsum(padded, 0)
    starts = ends - padded
    tl.store(num_padded_ptr, tl.sum(padded, 0))
    tl.store(cursor_ptr + experts, starts, mask=is_expert)
    # padding positions: [start + count, end) of each expert, fewer than BLOCK_M each
    marker = tl.full([EXPERTS_P2], 0, tl.int32) + num_pairs
    for c in range(0, BLOCK_M - 1):
        pad_pos = starts + counts + c
        tl.store(sorted_ids_ptr + pad_pos, marker, mask=is_expert & (pad_pos < ends))
    # tile b belongs to the expert whose segment contains position b * BLOCK_M: the number of segment
    # ends at or before it (ends of non-experts sit at the total, so past the total the answer is -1)
    total = tl.sum(padded, 0)
    for b0 in range(0, max_blocks, BLOCKS_PER_STEP):
        blocks = b0 + tl.arange(0, BLOCKS_PER_STEP)
        pos = blocks * BLOCK_M
        before = tl.sum(((ends[None, :] <= pos[:, None]) & is_expert[None, :]).to(tl.int32), 1)
        expert = tl.where(pos < total, before, -1)
        tl.store(block_expert_ptr + blocks, expert, mask=blocks < max_blocks)


@triton.jit(do_not_specialize=["num_pairs", "max_blocks"])
def _align_single_program_kernel(ids_ptr, num_pairs, sorted_ids_ptr, block_expert_ptr, num_padded_ptr,
                                 cursor_ptr, max_blocks, tile_counts_ptr, NUM_EXPERTS: tl.constexpr,
                                 EXPERTS_P2: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr,
                                 BLOCKS_PER_STEP: tl.constexpr, TAIL_M: tl.constexpr):
    """TAIL_M > 0: the split layout (block_expert_ptr is the tile list, max_blocks the body bound)."""
    counts = tl.zeros([EXPERTS_P2], dtype=tl.int32)
    for p0 in range(0, num_pairs, CHUNK):
        offs = p0 + tl.arange(0, CHUNK)
        e = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=-1)
        valid = (e >= 0) & (e < NUM_EXPERTS)
        counts += tl.histogram(tl.where(valid, e, 0), EXPERTS_P2, mask=valid)
    if TAIL_M > 0:
        _describe_split(counts, num_padded_ptr, cursor_ptr, block_expert_ptr, tile_counts_ptr, sorted_ids_ptr,
                        num_pairs, max_blocks, NUM_EXPERTS, EXPERTS_P2, BLOCK_M, TAIL_M)
    else:
        _scan_and_describe(counts, num_padded_ptr, cursor_ptr, block_expert_ptr, sorted_ids_ptr, num_pairs,
                           max_blocks, NUM_EXPERTS, EXPERTS_P2, BLOCK_M, BLOCKS_PER_STEP)
    tl.debug_barrier()  # the cursors written above are read by the atomics below (same program)
    for p0 in range(0, num_pairs, CHUNK):
        offs = p0 + tl.arange(0, CHUNK)
        e = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=-1)
        valid = (e >= 0) & (e < NUM_EXPERTS)
        pos = tl.atomic_add(cursor_ptr + tl.where(valid, e, 0), 1, mask=valid)
        tl.store(sorted_ids_ptr + pos, offs, mask=valid)


@triton.jit(do_not_specialize=["num_pairs"])
def _count_kernel(ids_ptr, num_pairs, counts_ptr, NUM_EXPERTS: tl.constexpr, EXPERTS_P2: tl.constexpr,
                  CHUNK: tl.constexpr):
    offs = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
    e = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=-1)
    valid = (e >= 0) & (e < NUM_EXPERTS)
    hist = tl.histogram(tl.where(valid, e, 0), EXPERTS_P2, mask=valid)
    experts = tl.arange(0, EXPERTS_P2)
    tl.atomic_add(counts_ptr + experts, hist, mask=(experts < NUM_EXPERTS) & (hist > 0))


@triton.jit(do_not_specialize=["num_pairs", "max_blocks"])
def _scan_kernel(counts_ptr, num_pairs, sorted_ids_ptr, block_expert_ptr, num_padded_ptr, cursor_ptr,
                 max_blocks, tile_counts_ptr, NUM_EXPERTS: tl.constexpr, EXPERTS_P2: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCKS_PER_STEP: tl.constexpr, TAIL_M: tl.constexpr):
    experts = tl.arange(0, EXPERTS_P2)
    counts = tl.load(counts_ptr + experts, mask=experts < NUM_EXPERTS, other=0)
    if TAIL_M > 0:
        _describe_split(counts, num_padded_ptr, cursor_ptr, block_expert_ptr, tile_counts_ptr, sorted_ids_ptr,
                        num_pairs, max_blocks, NUM_EXPERTS, EXPERTS_P2, BLOCK_M, TAIL_M)
    else:
        _scan_and_describe(counts, num_padded_ptr, cursor_ptr, block_expert_ptr, sorted_ids_ptr, num_pairs,
                           max_blocks, NUM_EXPERTS, EXPERTS_P2, BLOCK_M, BLOCKS_PER_STEP)


@triton.jit(do_not_specialize=["num_pairs"])
def _scatter_kernel(ids_ptr, num_pairs, sorted_ids_ptr, cursor_ptr, NUM_EXPERTS: tl.constexpr,
                    CHUNK: tl.constexpr):
    offs = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
    e = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=-1)
    valid = (e >= 0) & (e < NUM_EXPERTS)
    pos = tl.atomic_add(cursor_ptr + tl.where(valid, e, 0), 1, mask=valid)
    tl.store(sorted_ids_ptr + pos, offs, mask=valid)


def align_pairs(local_ids: torch.Tensor, num_experts: int, block_m: int,
                single_program_max_pairs: int = SINGLE_PROGRAM_MAX_PAIRS, tail_m: int = 0) -> AlignedPairs:
    """Lay out the pairs of `local_ids [N, k]` (int, -1 = not on this rank) expert by expert.

    Ids outside [0, num_experts) are treated as "not here" (never read out of bounds). `tail_m` > 0 (a
    power of two below block_m): the split layout (module docstring).
    """
    if tail_m and (tail_m < 1 or tail_m & (tail_m - 1) or tail_m >= block_m):
        raise ValueError(f"align_pairs: tail_m must be a power of two below block_m={block_m}, got {tail_m}")
    if local_ids.dim() != 2:
        raise ValueError(f"align_pairs: local_ids must be [N, k], got {list(local_ids.shape)}")
    if block_m < 1 or block_m & (block_m - 1):
        raise ValueError(f"align_pairs: block_m must be a power of two, got {block_m}")
    ids = local_ids.reshape(-1)
    if ids.dtype != torch.int32:
        ids = ids.to(torch.int32)
    ids = ids.contiguous()
    device = ids.device
    num_pairs = ids.numel()
    num_padded = torch.empty(1, dtype=torch.int32, device=device)
    cursor = torch.empty(num_experts, dtype=torch.int32, device=device)
    experts_p2 = max(16, triton.next_power_of_2(num_experts))
    meta = dict(NUM_EXPERTS=num_experts, EXPERTS_P2=experts_p2, BLOCK_M=block_m, TAIL_M=tail_m)
    if tail_m:
        max_body, max_tail, max_rows = split_bounds(num_pairs, num_experts, block_m, tail_m)
        sorted_ids = torch.empty(max(max_rows, 1), dtype=torch.int32, device=device)
        tiles = torch.empty(max(max_body + max_tail, 1), 2, dtype=torch.int32, device=device)
        tile_counts = torch.empty(2, dtype=torch.int32, device=device)
        table, bound = tiles, max_body
    else:
        max_blocks = max_blocks_for(num_pairs, num_experts, block_m)
        max_rows = max_blocks * block_m
        sorted_ids = torch.empty(max(max_rows, 1), dtype=torch.int32, device=device)
        block_expert = torch.empty(max(max_blocks, 1), dtype=torch.int32, device=device)
        table, bound, tile_counts = block_expert, max_blocks, num_padded
    if num_pairs <= single_program_max_pairs:
        chunk = min(_CHUNK, triton.next_power_of_2(max(num_pairs, 16)))
        _align_single_program_kernel[(1,)](ids, num_pairs, sorted_ids, table, num_padded, cursor,
                                           bound, tile_counts, CHUNK=chunk, BLOCKS_PER_STEP=_BLOCKS_PER_STEP,
                                           num_warps=4, **meta)
    else:
        counts = torch.zeros(num_experts, dtype=torch.int32, device=device)
        grid = (triton.cdiv(num_pairs, _CHUNK),)
        _count_kernel[grid](ids, num_pairs, counts, NUM_EXPERTS=num_experts, EXPERTS_P2=experts_p2,
                            CHUNK=_CHUNK, num_warps=4)
        _scan_kernel[(1,)](counts, num_pairs, sorted_ids, table, num_padded, cursor, bound, tile_counts,
                           BLOCKS_PER_STEP=_BLOCKS_PER_STEP, num_warps=4, **meta)
        _scatter_kernel[grid](ids, num_pairs, sorted_ids, cursor, NUM_EXPERTS=num_experts, CHUNK=_CHUNK,
                              num_warps=4)
    if tail_m:
        return AlignedPairs(sorted_ids, tiles, num_padded, block_m, num_pairs, max_body + max_tail, tail_m,
                            tiles, tile_counts, max_body, max_tail, max_rows)
    return AlignedPairs(sorted_ids, block_expert, num_padded, block_m, num_pairs, max_blocks, max_rows=max_rows)


key_callees_first(globals())     # each Triton function keyed after those it calls: one key in every process
