"""A warp-specialized grouped GEMM for Hopper, written in Gluon: rows laid out expert by expert (every tile
of BLOCK_M rows belongs to one expert), both operands loaded by TMA, block-FP8, per-channel FP8 or BF16.

Why a second GEMM beside `fused_moe.moe_gemm_kernel`: on sm_90 Triton's automatic pipeline puts a CTA
barrier in every K block and, with block-scaled FP8, drains the tensor cores at each block's promotion to
float32 (the gate+up kernel's tensor pipe at ~49%, its top stall the barrier). `tl.range(warp_specialize=
True)` changes nothing there in Triton 3.6. Gluon states the schedule instead:
- one loader warp issues the TMA loads of the A rows and the expert's weight tile into a ring of
  `STAGES` shared-memory slots, each slot with a "ready" and an "empty" mbarrier (no CTA barrier); in
  FP8 also the tile's 128 A scales of the K block (`scale_tma`: a source-level profile found the math
  warps waiting on global loads of them);
- two math partitions of one warpgroup each (64 rows of the 128-row tile) run the wgmma. In FP8 each
  128-wide K block is multiplied into a fresh product, promoted into the float32 accumulator with the
  row's and the weight block's scales (the library's "sync" numerics: no FP8 accumulation across K
  blocks), and its slot released by each warpgroup's own arrive. While one warpgroup promotes, the
  other's wgmma has the tensor cores: no barrier spans the two (a partition's barriers count its own
  128 threads; `tests/test_ws_grouped_gemm.py` checks the PTX for it);
- registers are moved to the math warps (`maxnreg` and the loader's small budget, `setmaxnreg` in PTX);
- or (`a_rows`, GATHER) the A rows are read where they are, row r of the layout being A's row
  a_rows[r] (the experts' tokens, no copy into the layout first): TMA cannot gather rows on sm_90, so a
  loader of four warps copies them with `cp.async`, 16 bytes a thread, each copy arriving on the slot's
  "ready" barrier when it lands, and the math warps fence the async proxy before their wgmma reads it.
The walk is persistent (one program per SM, tiles grouped GROUP_M m-tiles at a time so a weight tile is
read by neighbours while it is in L2); the loader runs ahead into the next tile while the math warps
store the last one.
- or (`store_tma`, wherever it applies) each math warpgroup sends its outputs through a shared-memory
  buffer of its own and one TMA store per accumulator, and quantizes a block-FP8 output in the formula's
  GPU form: a source-level profile found the math warps a quarter to a third of their time in the
  epilogue (the gated one: thousands of unrolled instructions stalled on instruction fetch; the plain
  one: scattered 4-byte stores stalled on the store queue), while the tensor cores had nothing queued.

Tiles are 128 rows by 128 or 256 columns (256 unless asked); a 256-wide tile is two weight boxes of 128
rows, each with its own accumulator (the FP8 promotion works box by box), which reads 25% fewer bytes per
FLOP than two 128-wide tiles. In a plain BF16 tile (`wide_mma`) one 64 x 256 product per K step covers both
boxes, split into the two accumulators for the epilogue.

Operands (`grouped_gemm_ws`, checked by `check_operands`): A [M_pad, K] in expert-contiguous, tile-padded
rows (`tile_expert[m]` the expert of m-tile m, -1 for a tile to skip), W [E, N, K], an optional float32
bias [E, N], out [M_pad, N] bfloat16. FP8: A e4m3 with scales `a_scale_t` [ceil(K/128), M_pad] (one per
row and 128-wide K block, stored K-block-major so a tile's scales are one contiguous row), W e4m3 with
`w_scale` [E, ceil(N/128), ceil(K/128)]. The gated form (`activation=`, the experts' gate+up): W holds the
gate rows then the up rows (W [E, 2I, K]); a tile's two boxes are the gate and the up rows of the same 128
outputs, and the epilogue writes act(gate + bias, up + bias) [M_pad, I] in bfloat16, or quantized to
e4m3 with the one formula (`fp8_quantize_groups`, one scale per row and 128 columns, `out_scale_t`
[ceil(I/128), M_pad]): the down GEMM's A operand as it reads it. With `a_rows` (int32 [M_pad]), A is
[rows, K] in any order and `a_scale_t` [ceil(K/128), rows]: layout row r reads A's row a_rows[r].
Per-channel FP8: `w_scale` [E, W rows], one per output row, applied to the accumulators' columns in the
epilogue (before the bias and the activation), with `a_scale_t` per K block as above or [1, rows], one per
row (token), applied there too: each K block's product is then only added into the float32 accumulator (the
same promotion per block of 128, so the tensor cores never sum past one block at their reduced precision).
The gated epilogue quantizes per 128 columns only (a row's scale needs all of its I columns; a tile holds 128):
a layer whose activations are quantized per row has the gate+up write bfloat16 and quantizes it after (the
backend's choice, `triton_ws`).
Gluon is Triton's experimental layer: this runs on CUDA sm_90 only and has no interpreter path; its
compile is checked without a GPU by `compile_ws_gemm_for_hopper`.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (async_copy, fence_async_shared, mbarrier, tma,
                                                               warpgroup_mma, warpgroup_mma_wait)

from .epilogues import ACTIVATION_CODES, _gated_activation
from .fp8_quant import fp8_quantize_groups
from .jit_keys import key_callees_first

# Triton 3.6 names the TMA load and the cp.async copy `async_copy_global_to_shared`; later versions
# `async_load` (3.9 keeps the old cp.async name only to raise)
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_cp_async_load = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
# the TMA store: `async_copy_shared_to_global` in 3.6, `async_store` later (3.9 keeps the old name only to raise)
_tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global

SCALE = 128
SCALE_BLOCK = gl.constexpr(SCALE)      # block-FP8 scale granularity along K (activations) and along N and K (weights)
# a tile's A scales of one K block in shared memory (`scale_tma`): 128 float32 in a row, no swizzle
SCALE_SMEM_LAYOUT = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=1)

# Diagnostic forms of the kernel (`grouped_gemm_ws(diagnostic=...)`, `benchmarks/profile_ws_gemm.py`): each takes
# one part of the work away, so that its time bounds what that part costs. Their outputs are not the GEMM's; the
# backends never launch them.
# - "no_loads": after the ring's first round the loader declares each slot ready without loading it again, so
#   the math runs on real operands without their supply (the tensor cores, the promotion and the stores; block
#   FP8's weight scales, and A's where they are not in the slots, are still loaded from global memory);
# - "no_math": the math warps give each slot back as soon as it is ready (the operands' supply alone, no stores);
# - "no_promote": FP8 through the plain K loop, the tensor cores accumulating across K blocks, one K block in flight
#   (what the promotion of each K block costs: its wait for the product, the FFMAs, the per-block scales; weight
#   scales per column are still applied in the epilogue).
DIAGNOSTICS = {"none": 0, "no_loads": 1, "no_math": 2, "no_promote": 3}
DIAG_NONE = gl.constexpr(0)
DIAG_NO_LOADS = gl.constexpr(1)
DIAG_NO_MATH = gl.constexpr(2)
DIAG_NO_PROMOTE = gl.constexpr(3)


@gluon.jit
def _tile_coords(t, num_m_tiles, num_n_tiles, GROUP_M: gl.constexpr):
    """Tile t of the persistent walk -> (m-tile, n-tile): GROUP_M m-tiles side by side over every n-tile."""
    per_group = GROUP_M * num_n_tiles
    first_m = (t // per_group) * GROUP_M
    rows = gl.minimum(num_m_tiles - first_m, GROUP_M)
    return first_m + (t % per_group) % rows, (t % per_group) // rows


@gluon.jit
def _tile_at(t, num_m_tiles, num_n_tiles, tile_expert_ptr, walk_groups_ptr, GROUP_M: gl.constexpr,
             GROUPED: gl.constexpr):
    """Tile t of the walk -> (m-tile, n-tile, its expert; -1: nothing to do there). GROUPED: the walk's groups
    are walk_groups_ptr's (int32 [num_m_tiles, 2]: row q holds the first m-tile and the length of the group
    that m-tile q lies in), so group (first, rows) holds tiles [first, first + rows) x every n-tile, tile ids
    first * num_n_tiles onwards: no id is left empty, and the programs stay in step as with GROUP_M."""
    if GROUPED:
        q = t // num_n_tiles
        first_m = gl.load(walk_groups_ptr + 2 * q)
        rows = gl.load(walk_groups_ptr + 2 * q + 1)
        local = t - first_m * num_n_tiles
        m = first_m + local % rows
        n = local // rows
    else:
        m, n = _tile_coords(t, num_m_tiles, num_n_tiles, GROUP_M)
    return m, n, gl.load(tile_expert_ptr + m)


@gluon.jit
def _weight_boxes(n, N, SUB_N: gl.constexpr, SPLIT: gl.constexpr, GATED: gl.constexpr):
    """(first weight row of n-tile n within its expert, rows between its SPLIT boxes): plain, the tile's
    consecutive rows; GATED, the gate rows of outputs [n * SUB_N, +SUB_N), then the up rows I = N further."""
    if GATED:
        return n * SUB_N, N
    else:
        return n * (SUB_N * SPLIT), SUB_N


@gluon.jit
def _load_weight_boxes(w_desc, w_buf, bar, w_row, w_step, k, SUB_N: gl.constexpr, SPLIT: gl.constexpr):
    """The SPLIT weight boxes of one K block into one slot's buffer, arriving on its "ready" barrier."""
    for j in gl.static_range(SPLIT):
        _tma_load(w_desc, [w_row + j * w_step, k], bar, w_buf.slice(j * SUB_N, SUB_N))


@gluon.jit
def _loader_partition(a_desc, w_desc, s_desc, a_bufs, w_bufs, s_bufs, ready, empty, tile_expert_ptr, walk_groups_ptr,
                      N, W_ROWS, M_pad, num_m_tiles, num_n_tiles, K_BLOCKS, GROUP_M: gl.constexpr,
                      GROUPED: gl.constexpr, GATED: gl.constexpr, SCALE_TMA: gl.constexpr, DIAG: gl.constexpr):
    """The A tile and the SPLIT boxes of SUB_N weight rows of every K block: plain, the tile's consecutive
    rows; GATED, gate rows [n * SUB_N, +SUB_N) then the matching up rows, I = N rows further, into ring
    slot after slot, each behind its "ready" and "empty" barriers. SCALE_TMA (FP8): the tile's 128 A
    scales of each K block too (s_desc: a_scale_t as one vector, K-block-major), so the math warps read
    them from shared memory instead of waiting on global loads. DIAG_NO_LOADS: after the ring's first round, each
    slot is declared ready without a load (`DIAGNOSTICS`)."""
    BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    SUB_N: gl.constexpr = w_desc.block_type.shape[0]
    SPLIT: gl.constexpr = w_bufs.type.shape[1] // SUB_N
    STAGES: gl.constexpr = ready.type.shape[0]
    step = 0
    for t in range(gl.program_id(0), num_m_tiles * num_n_tiles, gl.num_programs(0)):
        m, n, e = _tile_at(t, num_m_tiles, num_n_tiles, tile_expert_ptr, walk_groups_ptr, GROUP_M, GROUPED)
        if e >= 0:
            w_first, w_step = _weight_boxes(n, N, SUB_N, SPLIT, GATED)
            w_row = e * W_ROWS + w_first
            for kb in range(K_BLOCKS):
                slot = step % STAGES
                # a fresh mbarrier counts as having completed the phase before 0: the first round passes
                mbarrier.wait(empty.index(slot), ((step // STAGES) & 1) ^ 1)
                if DIAG == DIAG_NO_LOADS and step >= STAGES:
                    # the slot "ready" as the first round left it: real operands, nothing loaded again
                    mbarrier.arrive(ready.index(slot), count=1)
                else:
                    mbarrier.expect(ready.index(slot), a_desc.block_type.nbytes + SPLIT * w_desc.block_type.nbytes
                                    + SCALE_TMA * s_desc.block_type.nbytes)
                    _tma_load(a_desc, [m * BLOCK_M, kb * BLOCK_K], ready.index(slot), a_bufs.index(slot))
                    if SCALE_TMA:
                        _tma_load(s_desc, [kb * M_pad + m * BLOCK_M], ready.index(slot), s_bufs.index(slot))
                    _load_weight_boxes(w_desc, w_bufs.index(slot), ready.index(slot), w_row, w_step, kb * BLOCK_K,
                                       SUB_N, SPLIT)
                step += 1


@gluon.jit
def _gather_loader_partition(a_ptr, a_rows_ptr, w_desc, a_bufs, w_bufs, ready, empty, tile_expert_ptr, walk_groups_ptr,
                             K, N, W_ROWS, num_m_tiles, num_n_tiles, K_BLOCKS, GROUP_M: gl.constexpr,
                             GROUPED: gl.constexpr, GATED: gl.constexpr):
    """GATHER: the A tile's rows read where they are (row r of the layout is row a_rows[r] of A) by
    `cp.async` from four warps, 16 bytes per thread per copy, each thread's copies arriving on the slot's
    "ready" barrier when they land (no count increment: the barrier counts 1 + 128 arrivals); the weight
    boxes by TMA as in `_loader_partition`. Columns past K are zero-filled."""
    BLOCK_M: gl.constexpr = a_bufs.type.shape[1]
    BLOCK_K: gl.constexpr = a_bufs.type.shape[2]
    SUB_N: gl.constexpr = w_desc.block_type.shape[0]
    SPLIT: gl.constexpr = w_bufs.type.shape[1] // SUB_N
    STAGES: gl.constexpr = ready.type.shape[0]
    VEC: gl.constexpr = 128 // a_bufs.dtype.primitive_bitwidth                 # elements in 16 bytes
    COL_THREADS: gl.constexpr = BLOCK_K // VEC                                  # threads along one row
    rows_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, VEC],
                                                 threads_per_warp=[32 // COL_THREADS, COL_THREADS],
                                                 warps_per_cta=[4, 1], order=[1, 0])
    offs_r = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, rows_layout))
    offs_k = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, rows_layout))
    K_VEC = (K // VEC) * VEC
    step = 0
    for t in range(gl.program_id(0), num_m_tiles * num_n_tiles, gl.num_programs(0)):
        m, n, e = _tile_at(t, num_m_tiles, num_n_tiles, tile_expert_ptr, walk_groups_ptr, GROUP_M, GROUPED)
        if e >= 0:
            w_first, w_step = _weight_boxes(n, N, SUB_N, SPLIT, GATED)
            w_row = e * W_ROWS + w_first
            src = gl.load(a_rows_ptr + m * BLOCK_M + offs_r).to(gl.int64)
            row_ptrs = a_ptr + src[:, None] * K_VEC + offs_k[None, :]
            for kb in range(K_BLOCKS):
                slot = step % STAGES
                mbarrier.wait(empty.index(slot), ((step // STAGES) & 1) ^ 1)
                mbarrier.expect(ready.index(slot), SPLIT * w_desc.block_type.nbytes)
                _load_weight_boxes(w_desc, w_bufs.index(slot), ready.index(slot), w_row, w_step, kb * BLOCK_K, SUB_N,
                                   SPLIT)
                _cp_async_load(a_bufs.index(slot), row_ptrs + kb * BLOCK_K, mask=(kb * BLOCK_K + offs_k < K_VEC)[None, :])
                async_copy.mbarrier_arrive(ready.index(slot), increment_count=False)
                step += 1


@gluon.jit
def _promote(acc, a_tile, w_tile, part, row_scale, empty_bar, release: gl.constexpr, SCALED: gl.constexpr):
    """FP8: one K block's product into a fresh accumulator, then into the float32 one, times the block's
    row_scale where SCALED (its A scales times the weight block's; with per-column weight scales the A scales
    alone; with per-row A scales too, none: both wait for the epilogue) (release: the slot goes back to the
    loader as soon as the product is done)."""
    part = warpgroup_mma(a_tile, w_tile, part, use_acc=False, is_async=True)
    part, _, _ = warpgroup_mma_wait(num_outstanding=0, deps=(part, a_tile, w_tile))
    if release:
        mbarrier.arrive(empty_bar, count=1)
    if SCALED:
        return acc + part * row_scale[:, None], part
    else:
        return acc + part, part


@gluon.jit
def _release_slots(ready, empty, step, K_BLOCKS):
    """DIAG_NO_MATH: one tile's K_BLOCKS slots, each given back as soon as it is ready; the next step."""
    STAGES: gl.constexpr = ready.type.shape[0]
    for kb in range(K_BLOCKS):
        slot = step % STAGES
        mbarrier.wait(ready.index(slot), (step // STAGES) & 1)
        mbarrier.arrive(empty.index(slot), count=1)
        step += 1
    return step


@gluon.jit
def _math_partition(a_bufs, w_bufs, s_bufs, o_desc, o_bufs, ready, empty, go, tile_expert_ptr, walk_groups_ptr,
                    a_rows_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, out_ptr, out_scale_ptr, M_pad, A_ROWS, N, W_ROWS,
                    num_m_tiles, num_n_tiles, K_BLOCKS, GROUP_M: gl.constexpr, GROUPED: gl.constexpr,
                    FP8: gl.constexpr, SPLIT: gl.constexpr, GATED: gl.constexpr, ACTIVATION: gl.constexpr,
                    HAS_BIAS: gl.constexpr, OUT_FP8: gl.constexpr, GATHER: gl.constexpr, SCALE_TMA: gl.constexpr,
                    STORE_TMA: gl.constexpr, STAGGER: gl.constexpr, WIDE: gl.constexpr, COL_SCALE: gl.constexpr,
                    ROW_SCALE: gl.constexpr, HALF: gl.constexpr, DIAG: gl.constexpr):
    """One warpgroup: rows [HALF * 64, HALF * 64 + 64) of every tile, SPLIT accumulators of SUB_N columns
    (plain: consecutive output columns; GATED: gate and up of the same SUB_N outputs). Two of these run
    side by side; each releases a slot with its own arrive (the "empty" barriers count two). GATHER: the A
    rows (and their scales, A_ROWS apart per K block) are A's rows a_rows[r], and the A tile was written by
    `cp.async` (the generic proxy): a proxy fence after the "ready" wait orders it before the wgmma reads.
    SCALE_TMA (FP8): the rows' scales of each K block are read from the slot (the loader brought them
    with the tile) instead of loaded from global memory one block ahead, whose latency the profile found
    the math warps waiting on. STORE_TMA: the tile's output goes out through this warpgroup's shared-memory
    buffer o_bufs[HALF] and a TMA store (`_epilogue`). STAGGER > 0: the second warpgroup starts once the
    first has done STAGGER K blocks (the "go" barrier, one arrive), so that each one's epilogue runs while the
    other still multiplies instead of both at once at every tile's end; the ring holds the lead (both release
    every slot), which STAGGER < STAGES keeps free of deadlock. The arrive is predicated, so the first
    warpgroup meets its own barrier once more per K block (in a branch instead, ptxas spills the FP8 K loop:
    over 100 local accesses in it under Triton 3.6 and 3.9). WIDE (BF16, SPLIT == 2): one product of
    [64, 2 * SUB_N] per K block over both weight boxes (a 64 x 256 wgmma reads the A rows from shared
    memory once where two of 64 x 128 read them twice: 10 instead of 12 KB per 16-deep step), split into
    the two accumulators for the epilogue. COL_SCALE (FP8): one weight scale per output column (w_scale
    [E, W_ROWS]), applied in the epilogue instead of per K block; ROW_SCALE (with COL_SCALE): one A scale per
    row (a_scale [A_ROWS], the same for every K block), applied there too, so that each K block's product is
    only added into the float32 accumulator. DIAG (`DIAGNOSTICS`): DIAG_NO_MATH releases every slot once it is
    ready and computes nothing; DIAG_NO_PROMOTE runs FP8 through the plain K loop (the tensor cores accumulate
    across K blocks, no per-block scales)."""
    BLOCK_M: gl.constexpr = a_bufs.type.shape[1]
    SUB_N: gl.constexpr = w_bufs.type.shape[1] // SPLIT
    STAGES: gl.constexpr = ready.type.shape[0]
    ROWS: gl.constexpr = BLOCK_M // 2
    INSTR_K: gl.constexpr = 256 // a_bufs.dtype.primitive_bitwidth        # 32 for FP8, 16 for BF16
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, SUB_N, INSTR_K])
    row_layout: gl.constexpr = gl.SliceLayout(1, mma_layout)
    col_layout: gl.constexpr = gl.SliceLayout(0, mma_layout)
    w_scale_rows = gl.cdiv(W_ROWS, SCALE_BLOCK)
    if STORE_TMA:
        # K_BLOCKS >= 1 (the host refuses K = 0): without a path that skips the K loop (zero accumulators into
        # the epilogue), ptxas keeps the K loop of the plain FP8 tile of 256 free of spills with the TMA store
        # (Triton 3.6 and 3.9: 190 local accesses in it without). Not for the register stores, whose gated FP8 tile
        # Triton 3.6's ptxas then spills (114): the cross-compiles of `tests/test_ws_grouped_gemm.py` check both.
        gl.assume(K_BLOCKS > 0)
    if STAGGER > 0 and HALF == 1:
        mbarrier.wait(go, 0)
    step = 0
    for t in range(gl.program_id(0), num_m_tiles * num_n_tiles, gl.num_programs(0)):
        m, n, e = _tile_at(t, num_m_tiles, num_n_tiles, tile_expert_ptr, walk_groups_ptr, GROUP_M, GROUPED)
        if DIAG == DIAG_NO_MATH:
            if e >= 0:
                step = _release_slots(ready, empty, step, K_BLOCKS)
        elif e >= 0:
            rows = m * BLOCK_M + HALF * ROWS + gl.arange(0, ROWS, layout=row_layout)
            scale_rows = gl.load(a_rows_ptr + rows) if GATHER else rows        # A's rows (scales: A_ROWS apart)
            w_first, w_step = _weight_boxes(n, N, SUB_N, SPLIT, GATED)
            cols0 = w_first + gl.arange(0, SUB_N, layout=col_layout)            # output columns of accumulator 0
            acc0 = gl.zeros([ROWS, SUB_N], gl.float32, mma_layout)
            acc1 = gl.zeros([ROWS, SUB_N], gl.float32, mma_layout)
            if FP8 and DIAG != DIAG_NO_PROMOTE:
                part = gl.zeros([ROWS, SUB_N], gl.float32, mma_layout)
                if not COL_SCALE:
                    w_scales0 = w_scale_ptr + (e * w_scale_rows + w_first // SCALE_BLOCK) * K_BLOCKS
                    # a second box wholly past N (N mod 256 in (0, 128]) only feeds masked columns: its scale
                    # block is clamped to the last one instead of read past the end
                    w_scales1 = w_scale_ptr + (e * w_scale_rows + gl.minimum((w_first + w_step) // SCALE_BLOCK,
                                                                             w_scale_rows - 1)) * K_BLOCKS
                    w_scale0 = gl.load(w_scales0)
                    w_scale1 = gl.load(w_scales1) if SPLIT == 2 else w_scale0
                if not SCALE_TMA and not ROW_SCALE:
                    a_scale = gl.load(a_scale_ptr + scale_rows)
                for kb in range(K_BLOCKS):
                    slot = step % STAGES
                    mbarrier.wait(ready.index(slot), (step // STAGES) & 1)
                    if GATHER:
                        fence_async_shared()
                    a_tile = a_bufs.index(slot).slice(HALF * ROWS, ROWS)
                    if SCALE_TMA:
                        a_scale_k = s_bufs.index(slot).slice(HALF * ROWS, ROWS).load(row_layout)
                    elif not ROW_SCALE:
                        a_scale_k = a_scale
                    # the next K block's scales (the weights', and without SCALE_TMA the rows') load while the
                    # tensor cores work (the last block reloads its own)
                    nxt = gl.minimum(kb + 1, K_BLOCKS - 1)
                    if not SCALE_TMA and not ROW_SCALE:
                        a_scale_next = gl.load(a_scale_ptr + nxt * A_ROWS + scale_rows)
                    if ROW_SCALE:      # nothing to multiply before the epilogue (`_promote` ignores these)
                        scale0 = part
                        scale1 = part
                    elif COL_SCALE:
                        scale0 = a_scale_k
                        scale1 = a_scale_k
                    else:
                        w_scale0_next = gl.load(w_scales0 + nxt)
                        w_scale1_next = gl.load(w_scales1 + nxt) if SPLIT == 2 else w_scale0_next
                        scale0 = a_scale_k * w_scale0
                        scale1 = a_scale_k * w_scale1
                    # the slot goes back after the block's last product
                    acc0, part = _promote(acc0, a_tile, w_bufs.index(slot).slice(0, SUB_N).permute((1, 0)), part,
                                          scale0, empty.index(slot), SPLIT == 1, not ROW_SCALE)
                    if SPLIT == 2:
                        acc1, part = _promote(acc1, a_tile, w_bufs.index(slot).slice(SUB_N, SUB_N).permute((1, 0)),
                                              part, scale1, empty.index(slot), True, not ROW_SCALE)
                    if not SCALE_TMA and not ROW_SCALE:
                        a_scale = a_scale_next
                    if not COL_SCALE:
                        w_scale0 = w_scale0_next
                        w_scale1 = w_scale1_next
                    step += 1
                    if STAGGER > 0 and HALF == 0:
                        mbarrier.arrive(go, count=1, pred=step == STAGGER)
            else:
                if WIDE:
                    wide_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                                          instr_shape=[16, 2 * SUB_N, INSTR_K])
                    acc = gl.zeros([ROWS, 2 * SUB_N], gl.float32, wide_layout)
                prev_slot = 0
                for kb in range(K_BLOCKS):
                    slot = step % STAGES
                    mbarrier.wait(ready.index(slot), (step // STAGES) & 1)
                    if GATHER:
                        fence_async_shared()
                    a_tile = a_bufs.index(slot).slice(HALF * ROWS, ROWS)
                    if WIDE:        # one product over both weight boxes
                        w_tile = w_bufs.index(slot).permute((1, 0))
                        acc = warpgroup_mma(a_tile, w_tile, acc, is_async=True)
                        acc, _, _ = warpgroup_mma_wait(num_outstanding=1, deps=(acc, a_tile, w_tile))
                    else:
                        w0 = w_bufs.index(slot).slice(0, SUB_N).permute((1, 0))
                        acc0 = warpgroup_mma(a_tile, w0, acc0, is_async=True)
                        if SPLIT == 2:
                            w1 = w_bufs.index(slot).slice(SUB_N, SUB_N).permute((1, 0))
                            acc1 = warpgroup_mma(a_tile, w1, acc1, is_async=True)
                            # this block's two products left in flight: the block before is done
                            acc0, acc1, _, _, _ = warpgroup_mma_wait(num_outstanding=2,
                                                                     deps=(acc0, acc1, a_tile, w0, w1))
                        else:
                            acc0, _, _ = warpgroup_mma_wait(num_outstanding=1, deps=(acc0, a_tile, w0))
                    # the block before this one is done: its slot goes back
                    mbarrier.arrive(empty.index(prev_slot), count=1, pred=kb > 0)
                    prev_slot = slot
                    step += 1
                    if STAGGER > 0 and HALF == 0:
                        mbarrier.arrive(go, count=1, pred=step == STAGGER)
                if WIDE:
                    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
                elif SPLIT == 2:
                    acc0, acc1 = warpgroup_mma_wait(num_outstanding=0, deps=(acc0, acc1))
                else:
                    acc0 = warpgroup_mma_wait(num_outstanding=0, deps=(acc0,))
                mbarrier.arrive(empty.index(prev_slot), count=1)
                if WIDE:
                    # columns [0, SUB_N) and [SUB_N, 2 SUB_N): each thread holds both halves' values of its rows
                    acc0, acc1 = gl.split(acc.reshape([ROWS, 2, SUB_N]).permute((0, 2, 1)))
                    acc0 = gl.convert_layout(acc0, mma_layout)
                    acc1 = gl.convert_layout(acc1, mma_layout)
            if FP8 and COL_SCALE:
                acc0, acc1 = _column_scaled(acc0, acc1, a_scale_ptr, scale_rows, w_scale_ptr + e * W_ROWS, w_first,
                                            N, cols0, SUB_N, SPLIT, GATED, ROW_SCALE)
            _epilogue(acc0, acc1, rows, cols0, e, bias_ptr, out_ptr, out_scale_ptr, o_desc, o_bufs.index(HALF),
                      m * BLOCK_M + HALF * ROWS, w_first, M_pad, N, W_ROWS, n, SUB_N, SPLIT, GATED, ACTIVATION,
                      HAS_BIAS, OUT_FP8, STORE_TMA)
    if STAGGER > 0 and HALF == 0:
        mbarrier.arrive(go, count=1, pred=step < STAGGER)       # fewer K blocks in all: the other still starts
    if STORE_TMA:
        tma.store_wait(0)       # the last tile's stores have read this warpgroup's buffer before the program ends


@gluon.jit
def _store_box(y, out_ptr, rows64, cols, N, o_desc, o_buf, row0, col0, STORE_TMA: gl.constexpr):
    """One accumulator's [64, SUB_N] outputs (already in out's dtype) at rows `rows`, columns `cols`.
    STORE_TMA: through this warpgroup's shared-memory buffer and one TMA store (columns past N are clipped
    by the descriptor), after the buffer's last store has been read; otherwise straight from registers,
    masked."""
    if STORE_TMA:
        tma.store_wait(0)
        o_buf.store(y)
        fence_async_shared()
        _tma_store(o_desc, [row0, col0], o_buf)
    else:
        gl.store(out_ptr + rows64 * N + cols[None, :], y, mask=cols[None, :] < N)


@gluon.jit
def _bias_row(row_ptr, col0, N, like):
    """row_ptr[col0 : col0 + SUB_N] (zero past N) in the layout of `like` (the accumulators' columns): loaded
    one column per thread, then spread through shared memory. Loaded in the accumulators' layout instead,
    each thread holds the pointers of all its columns, and the gated FP8 tile of 256 (192 of 232 registers in
    accumulators) spilled in its K loops: 61 local accesses, 18 in the K loops (sm_90, Triton 3.6), none
    this way; the tile without a bias compiles as before. One column per thread of the math partition's
    four warps (one warpgroup)."""
    SUB_N: gl.constexpr = like.type.shape[0]
    flat: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    cols = col0 + gl.arange(0, SUB_N, layout=flat)
    return gl.convert_layout(gl.load(row_ptr + cols, mask=cols < N, other=0.0), like.type.layout)


@gluon.jit
def _column_scaled(acc0, acc1, a_scale_ptr, scale_rows, w_scale_row, w_first, N, cols0, SUB_N: gl.constexpr,
                   SPLIT: gl.constexpr, GATED: gl.constexpr, ROW_SCALE: gl.constexpr):
    """COL_SCALE: the accumulators times their columns' weight scales (w_scale_row: the expert's [W_ROWS];
    accumulator j holds weight rows w_first + j * N (GATED: the up rows) or w_first + j * SUB_N), and
    (ROW_SCALE) their rows' A scales, before the bias and the activation. The column scales come one per
    thread and through shared memory (`_bias_row`), as the bias does."""
    s0 = _bias_row(w_scale_row, w_first, N, cols0)
    s1 = s0
    if GATED:
        s1 = _bias_row(w_scale_row + N, w_first, N, cols0)
    elif SPLIT == 2:
        s1 = _bias_row(w_scale_row, w_first + SUB_N, N, cols0)
    if ROW_SCALE:
        r = gl.load(a_scale_ptr + scale_rows)
        acc0 = acc0 * r[:, None] * s0[None, :]
        if SPLIT == 2:
            acc1 = acc1 * r[:, None] * s1[None, :]
    else:
        acc0 = acc0 * s0[None, :]
        if SPLIT == 2:
            acc1 = acc1 * s1[None, :]
    return acc0, acc1


@gluon.jit
def _epilogue(acc0, acc1, rows, cols0, e, bias_ptr, out_ptr, out_scale_ptr, o_desc, o_buf, row0, col0, M_pad, N,
              W_ROWS, n, SUB_N: gl.constexpr, SPLIT: gl.constexpr, GATED: gl.constexpr, ACTIVATION: gl.constexpr,
              HAS_BIAS: gl.constexpr, OUT_FP8: gl.constexpr, STORE_TMA: gl.constexpr):
    """GATED: act(gate + bias, up + bias) of the SUB_N outputs, as bfloat16, or (OUT_FP8) quantized with
    the one formula, one scale per row of these SUB_N = 128 columns (stored K-block-major, as the down
    GEMM reads them). Plain: each accumulator (+ bias) as bfloat16. Each box goes out by `_store_box`
    (STORE_TMA: the warpgroup's rows from row0, columns from col0, through shared memory and TMA; and the
    quantization in the formula's GPU form, `fp8_quantize_groups` with ROUND=False)."""
    rows64 = rows.to(gl.int64)[:, None]
    out_ty: gl.constexpr = out_ptr.dtype.element_ty
    if GATED:
        g = acc0
        u = acc1
        if HAS_BIAS:
            g += _bias_row(bias_ptr + e * W_ROWS, col0, N, cols0)[None, :]
            u += _bias_row(bias_ptr + e * W_ROWS + N, col0, N, cols0)[None, :]
        act = gl.where(cols0[None, :] < N, _gated_activation(g, u, ACTIVATION), 0.0)   # no amax from padding
        if OUT_FP8:
            # STORE_TMA: the formula's GPU form (the hardware's rounding cast, one reciprocal per row): the same
            # e4m3 values in a third of the epilogue's instructions
            q, scale = fp8_quantize_groups(act, not STORE_TMA)
            _store_box(q.to(out_ty), out_ptr, rows64, cols0, N, o_desc, o_buf, row0, col0, STORE_TMA)
            gl.store(out_scale_ptr + n * M_pad + rows, scale)
        else:
            _store_box(act.to(out_ty), out_ptr, rows64, cols0, N, o_desc, o_buf, row0, col0, STORE_TMA)
    else:
        y0 = acc0
        if HAS_BIAS:
            y0 += gl.load(bias_ptr + e * W_ROWS + cols0, mask=cols0 < N, other=0.0)[None, :]
        _store_box(y0.to(out_ty), out_ptr, rows64, cols0, N, o_desc, o_buf, row0, col0, STORE_TMA)
        if SPLIT == 2:
            cols1 = cols0 + SUB_N
            y1 = acc1
            if HAS_BIAS:
                y1 += gl.load(bias_ptr + e * W_ROWS + cols1, mask=cols1 < N, other=0.0)[None, :]
            _store_box(y1.to(out_ty), out_ptr, rows64, cols1, N, o_desc, o_buf, row0, col0 + SUB_N, STORE_TMA)


@gluon.jit
def ws_grouped_gemm_kernel(a_desc, w_desc, s_desc, o_desc, a_ptr, a_rows_ptr, tile_expert_ptr, walk_groups_ptr,
                           a_scale_ptr, w_scale_ptr, bias_ptr, out_ptr, out_scale_ptr, M_pad,
                           A_ROWS, K, N, W_ROWS, num_m_tiles, num_n_tiles, K_BLOCKS, GROUP_M: gl.constexpr,
                           GROUPED: gl.constexpr, FP8: gl.constexpr, SPLIT: gl.constexpr, GATED: gl.constexpr,
                           ACTIVATION: gl.constexpr, HAS_BIAS: gl.constexpr, OUT_FP8: gl.constexpr,
                           GATHER: gl.constexpr, STAGES: gl.constexpr, SCALE_TMA: gl.constexpr,
                           STORE_TMA: gl.constexpr, STAGGER: gl.constexpr, WIDE: gl.constexpr,
                           COL_SCALE: gl.constexpr, ROW_SCALE: gl.constexpr, MATH_REGS: gl.constexpr,
                           LOADER_REGS: gl.constexpr, DIAG: gl.constexpr):
    """GATHER: a_ptr is A (a_desc describes it too, for the tile's shared layout) and row r of the layout
    is A's row a_rows[r], copied by the loader's four warps; otherwise A is in layout order, loaded by TMA
    through a_desc (a_ptr and a_rows_ptr unused). SCALE_TMA: s_desc describes a_scale_t as one vector in
    boxes of BLOCK_M (otherwise it is a_desc again, unused). STORE_TMA: o_desc describes out in boxes of
    [BLOCK_M / 2, SUB_N], one per math warpgroup and accumulator (otherwise a_desc, unused). GROUPED: the walk
    goes in walk_groups_ptr's groups (`_tile_at`; otherwise walk_groups_ptr is unused)."""
    # the gather loader copies A rows only: its slots would hold no scales for the math warps to read
    gl.static_assert(not (GATHER and SCALE_TMA), "the A scales by TMA take A in layout order")
    gl.static_assert(not WIDE or (not FP8 and SPLIT == 2), "one wide product per K block: BF16 tiles of two boxes")
    gl.static_assert(not ROW_SCALE or (COL_SCALE and not SCALE_TMA),
                     "A scales per row go with weight scales per column")
    gl.static_assert(DIAG == DIAG_NONE or (STAGGER == 0 and not (GATHER and DIAG == DIAG_NO_LOADS)),
                     "the diagnostic forms run without a stagger, and without loads only from the TMA loader")
    BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
    SUB_N: gl.constexpr = w_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = w_desc.block_type.shape[1]
    # the ring: STAGES slots of one K block each, one "ready" and one "empty" barrier per slot
    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BLOCK_M, BLOCK_K], a_desc.layout)
    w_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES, SPLIT * SUB_N, BLOCK_K], w_desc.layout)
    if SCALE_TMA:
        s_bufs = gl.allocate_shared_memory(s_desc.dtype, [STAGES, BLOCK_M], s_desc.layout)
    else:
        s_bufs = w_bufs        # unused
    if STORE_TMA:
        # each math warpgroup's output buffer: one accumulator's [64, SUB_N] on its way to a TMA store
        o_bufs = gl.allocate_shared_memory(o_desc.dtype, [2] + o_desc.block_type.shape, o_desc.layout)
    else:
        o_bufs = w_bufs        # unused
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    if STAGGER > 0:
        go = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())     # the second may start
        mbarrier.init(go.index(0), count=1)
    else:
        go = empty          # unused
    for i in gl.static_range(STAGES):
        # the loader's expect_tx arrive (GATHER: and one arrive per copying thread, 4 warps)
        mbarrier.init(ready.index(i), count=1 + GATHER * 128)
        mbarrier.init(empty.index(i), count=2)      # one arrive from each math warpgroup
    # the barriers' initialisation (generic proxy) ordered before the TMA unit (async proxy) completes
    # transactions on them; the partitions start after a CTA-wide barrier
    fence_async_shared()
    # the loader: one warp of TMA loads, or (GATHER) four copying the rows; the math partitions' arguments are
    # written out in each entry: a tuple held in a variable loses its constexprs
    LOADER_WARPS: gl.constexpr = 4 if GATHER else 1
    gl.warp_specialize([
        (_math_partition, (a_bufs, w_bufs, s_bufs, o_desc, o_bufs, ready, empty, go.index(0), tile_expert_ptr,
                           walk_groups_ptr, a_rows_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, out_ptr, out_scale_ptr,
                           M_pad, A_ROWS, N, W_ROWS, num_m_tiles, num_n_tiles, K_BLOCKS, GROUP_M, GROUPED, FP8,
                           SPLIT, GATED, ACTIVATION, HAS_BIAS, OUT_FP8, GATHER, SCALE_TMA, STORE_TMA, STAGGER, WIDE,
                           COL_SCALE, ROW_SCALE, 0, DIAG)),
        (_math_partition, (a_bufs, w_bufs, s_bufs, o_desc, o_bufs, ready, empty, go.index(0), tile_expert_ptr,
                           walk_groups_ptr, a_rows_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, out_ptr, out_scale_ptr,
                           M_pad, A_ROWS, N, W_ROWS, num_m_tiles, num_n_tiles, K_BLOCKS, GROUP_M, GROUPED, FP8,
                           SPLIT, GATED, ACTIVATION, HAS_BIAS, OUT_FP8, GATHER, SCALE_TMA, STORE_TMA, STAGGER, WIDE,
                           COL_SCALE, ROW_SCALE, 1, DIAG)),
        (_load_partition, (a_desc, w_desc, s_desc, a_ptr, a_rows_ptr, a_bufs, w_bufs, s_bufs, ready, empty,
                           tile_expert_ptr, walk_groups_ptr, K, N, W_ROWS, M_pad, num_m_tiles, num_n_tiles, K_BLOCKS,
                           GROUP_M, GROUPED, GATED, GATHER, SCALE_TMA, DIAG)),
    ], [4, LOADER_WARPS], [MATH_REGS, LOADER_REGS])


@gluon.jit
def _load_partition(a_desc, w_desc, s_desc, a_ptr, a_rows_ptr, a_bufs, w_bufs, s_bufs, ready, empty, tile_expert_ptr,
                    walk_groups_ptr, K, N, W_ROWS, M_pad, num_m_tiles, num_n_tiles, K_BLOCKS, GROUP_M: gl.constexpr,
                    GROUPED: gl.constexpr, GATED: gl.constexpr, GATHER: gl.constexpr, SCALE_TMA: gl.constexpr,
                    DIAG: gl.constexpr):
    """The loader partition of the kernel: `_gather_loader_partition` (GATHER) or `_loader_partition`."""
    if GATHER:
        _gather_loader_partition(a_ptr, a_rows_ptr, w_desc, a_bufs, w_bufs, ready, empty, tile_expert_ptr,
                                 walk_groups_ptr, K, N, W_ROWS, num_m_tiles, num_n_tiles, K_BLOCKS, GROUP_M, GROUPED,
                                 GATED)
    else:
        _loader_partition(a_desc, w_desc, s_desc, a_bufs, w_bufs, s_bufs, ready, empty, tile_expert_ptr,
                          walk_groups_ptr, N, W_ROWS, M_pad, num_m_tiles, num_n_tiles, K_BLOCKS, GROUP_M, GROUPED,
                          GATED, SCALE_TMA, DIAG)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _gl_dtype(dtype: torch.dtype):
    return {torch.float8_e4m3fn: gl.float8e4nv, torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}[dtype]


@dataclass(frozen=True)
class GemmShape:
    """What `check_operands` found: format, sizes, and the kernel's tiling."""
    fp8: bool
    M_pad: int
    K: int
    E: int
    N: int           # output columns (GATED: I)
    w_rows: int      # weight rows per expert (GATED: 2I)
    gated: bool
    out_fp8: bool
    block_k: int
    sub_n: int       # columns of one accumulator and one weight box
    split: int       # accumulators (weight boxes) per tile: 1 or 2
    a_count: int     # rows of A (M_pad, or the rows `a_rows` picks from)
    gather: bool     # A's rows picked by `a_rows` (copied by the loader) instead of laid out
    col_scale: bool = False   # FP8 weights with one scale per output row (w_scale [E, w_rows]), not 128x128 blocks
    row_scale: bool = False   # FP8 A with one scale per row (a_scale_t [1, rows]), not one per 128-wide K block


def check_operands(a, w, tile_expert, out, a_scale_t=None, w_scale=None, bias=None, activation=None,
                   out_scale_t=None, block_m=128, block_n=None, block_k=None, stages=None, group_m=8,
                   a_rows=None, walk_groups=None) -> GemmShape:
    """The operands' contract (module docstring), refused with a ValueError naming the rule. The values of
    `a_rows` (each below A's row count) and of `walk_groups` (groups that cover the m-tiles once, in order) are
    the caller's promise: reading them would sync the host."""
    if stages is not None and stages < 2:
        raise ValueError(f"grouped_gemm_ws: stages must be at least 2 (BF16 releases a slot one K block late), "
                         f"got {stages}")
    if group_m < 1:
        raise ValueError(f"grouped_gemm_ws: group_m must be at least 1, got {group_m}")
    fp8 = a.dtype == torch.float8_e4m3fn
    gated = activation is not None
    if fp8 != (a_scale_t is not None) or fp8 != (w_scale is not None):
        raise ValueError("grouped_gemm_ws: FP8 operands need a_scale_t and w_scale; BF16 operands take neither")
    col_scale = fp8 and w_scale.dim() == 2
    if a.dim() != 2 or w.dim() != 3 or a.shape[1] != w.shape[2]:
        raise ValueError(f"grouped_gemm_ws: A [M_pad, K] and W [E, N, K] expected, got {list(a.shape)} and "
                         f"{list(w.shape)}")
    if block_m != 128:
        raise ValueError("grouped_gemm_ws: block_m is 128 (two warpgroups of 64 rows)")
    a_count, K = a.shape
    if a_rows is not None and (a_rows.dim() != 1 or a_rows.dtype != torch.int32 or not a_rows.is_contiguous()
                               or a_count == 0 and a_rows.numel()):
        raise ValueError(f"grouped_gemm_ws: a_rows must be a contiguous int32 vector of A's rows, one per row of the "
                         f"layout, got {list(a_rows.shape)} {a_rows.dtype} for {a_count} rows of A")
    M_pad = a_count if a_rows is None else a_rows.numel()
    E, w_rows, _ = w.shape
    if M_pad % block_m or tile_expert.numel() != M_pad // block_m:
        raise ValueError(f"grouped_gemm_ws: {M_pad} rows are not {tile_expert.numel()} tiles of {block_m}")
    if walk_groups is not None and (tuple(walk_groups.shape) != (tile_expert.numel(), 2) or walk_groups.dtype !=
                                    torch.int32 or not walk_groups.is_contiguous() or walk_groups.device != a.device):
        raise ValueError(f"grouped_gemm_ws: walk_groups must be a contiguous int32 [{tile_expert.numel()}, 2] tensor "
                         f"on A's device (per m-tile, its group's first m-tile and length: kernels.walk_groups), got "
                         f"{list(walk_groups.shape)} {walk_groups.dtype} on {walk_groups.device}")
    if gated and (activation not in ACTIVATION_CODES or w_rows % 2):
        raise ValueError(f"grouped_gemm_ws: activation must be one of {sorted(ACTIVATION_CODES)} with W [E, 2I, K] "
                         f"(gate rows, then up rows), got {activation!r} and {list(w.shape)}")
    N = w_rows // 2 if gated else w_rows
    out_fp8 = out.dtype == torch.float8_e4m3fn
    if out.shape != (M_pad, N) or out.dtype not in ((torch.bfloat16, torch.float8_e4m3fn) if gated else
                                                     (torch.bfloat16,)):
        raise ValueError(f"grouped_gemm_ws: out must be a [{M_pad}, {N}] tensor of bfloat16"
                         f"{' or float8_e4m3fn (the activation quantized)' if gated else ''}, got "
                         f"{list(out.shape)} {out.dtype}")
    if out_fp8 != (out_scale_t is not None):
        raise ValueError("grouped_gemm_ws: an FP8 out needs out_scale_t, a bfloat16 out takes none")
    block_k = block_k or (SCALE if fp8 else 64)
    block_n = block_n or 256
    sub_n = min(block_n, SCALE)
    if block_n not in (64, 128, 256) or (gated and block_n != 2 * SCALE):
        raise ValueError(f"grouped_gemm_ws: block_n must be 64, 128 or 256 ({2 * SCALE} with an activation: gate "
                         f"and up of {SCALE} outputs), got {block_n}")
    if fp8 and (block_k != SCALE or SCALE % sub_n or (gated and not col_scale and N % SCALE)):
        raise ValueError(f"grouped_gemm_ws: FP8 needs block_k {SCALE}, weight boxes within a scale block and, "
                         f"with an activation and block-scaled weights, I a multiple of {SCALE}")
    if K == 0:
        raise ValueError("grouped_gemm_ws: K is 0 (nothing to multiply)")
    if not (a.is_contiguous() and w.is_contiguous() and out.is_contiguous()) or (K * a.element_size()) % 16 \
            or a.data_ptr() % 16 or w.data_ptr() % 16:
        raise ValueError("grouped_gemm_ws: A, W and out must be contiguous, A and W 16-byte aligned with rows of a "
                         "multiple of 16 bytes (TMA)")
    if tile_expert.dtype != torch.int32:
        raise ValueError(f"grouped_gemm_ws: tile_expert must be int32, got {tile_expert.dtype}")
    if bias is not None and (tuple(bias.shape) != (E, w_rows) or bias.dtype != torch.float32):
        raise ValueError(f"grouped_gemm_ws: bias must be float32 [{E}, {w_rows}], got {list(bias.shape)} {bias.dtype}")
    kb = triton.cdiv(K, SCALE)
    # A scales per row go with weight scales per column only (both wait for the epilogue); with K <= 128 the
    # two A forms are one
    row_scale = col_scale and a_scale_t.dim() == 2 and a_scale_t.shape[0] == 1
    want = {"a_scale_t": (a_scale_t, (1 if row_scale else kb, a_count)),
            "w_scale": (w_scale, (E, w_rows) if col_scale else (E, triton.cdiv(w_rows, SCALE), kb)),
            "out_scale_t": (out_scale_t, (triton.cdiv(N, SCALE), M_pad))}
    for name, (t, shape) in want.items():
        if t is not None and (tuple(t.shape) != shape or t.dtype != torch.float32 or not t.is_contiguous()):
            raise ValueError(f"grouped_gemm_ws: {name} must be a contiguous float32 {list(shape)} tensor, got "
                             f"{list(t.shape)} {t.dtype}{SCALE_FORMS if name != 'out_scale_t' else ''}")
    return GemmShape(fp8, M_pad, K, E, N, w_rows, gated, out_fp8, block_k, sub_n, block_n // sub_n, a_count,
                     a_rows is not None, col_scale, row_scale)


SCALE_FORMS = (" (FP8 scales: a_scale_t [ceil(K/128), rows] with w_scale [E, ceil(W rows/128), ceil(K/128)] in "
               "128x128 blocks, or with w_scale [E, W rows] one per output row; a_scale_t [1, rows] one per row, "
               "with w_scale one per output row only)")


def grouped_gemm_ws(a: torch.Tensor, w: torch.Tensor, tile_expert: torch.Tensor, out: torch.Tensor,
                    a_scale_t: torch.Tensor | None = None, w_scale: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None, activation: str | None = None,
                    out_scale_t: torch.Tensor | None = None, *, block_m: int = 128, block_n: int | None = None,
                    block_k: int | None = None, stages: int | None = None, group_m: int = 8,
                    num_programs: int | None = None, math_regs: int = 232, loader_regs: int = 40,
                    maxnreg: int = 168, a_rows: torch.Tensor | None = None,
                    scale_tma: bool | None = None, store_tma: bool | None = None, stagger: int = 0,
                    wide_mma: bool | None = None, walk_groups: torch.Tensor | None = None,
                    diagnostic: str = "none") -> torch.Tensor:
    """out[r] = A[r] @ W[tile_expert[r // block_m]].T (+ bias) for every row r of a tile whose expert is
    >= 0 (float32 accumulation, cast once; FP8: each K block of 128 promoted with its scales, or, with weight
    scales per output row (`w_scale` [E, W rows]) and A scales per row (`a_scale_t` [1, rows]), added and
    scaled in the epilogue: module docstring). With
    `activation`: W holds gate rows then up rows (W [E, 2I, K]) and out [M_pad, I] = act(gate, up),
    bfloat16, or float8_e4m3fn with `out_scale_t` [ceil(I/128), M_pad] (the one formula per 128 columns:
    the down GEMM's A operand as it is). `a_rows` (int32 [M_pad]): row r of the layout is A's row
    a_rows[r] (A [rows, K] and `a_scale_t` [ceil(K/128), rows] as they are, e.g. the tokens: no copy into
    the layout), read by the loader's four warps with `cp.async`. `maxnreg` bounds every thread (12 warps
    x 32 x 168 fit one SM's 64K registers: one program per SM); the loader's warpgroup gives up all but
    `loader_regs`. `scale_tma` (FP8, A in layout order; None: wherever it applies): the
    loader brings each K block's 128 A scales into the ring with the tile (TMA, 512 bytes), read by the
    math warps from shared memory instead of from global memory one block ahead. `store_tma` (None: wherever
    it applies, `_store_tma_choice`): each math warpgroup writes its outputs into a shared-memory buffer of
    its own and out of it with one TMA store per accumulator, instead of each thread storing its scattered
    values, and quantizes in the formula's GPU form (a source-level profile found the math warps a quarter
    to a third of their time in the epilogue, stalled on instruction fetch and on the store queue; measured
    on an H200, 1.01-1.20x faster GEMMs, BF16 and FP8). `stagger` (opt-in; 0 <= stagger < stages): the
    second math warpgroup starts that many K blocks behind the first, so their epilogues no longer fall
    together at every tile's end (measured with `store_tma`: -1.3% to +1.6%, so off). `wide_mma` (BF16 tiles of
    256 columns; None: the plain ones, `_wide_mma_choice`): one 64 x 256 product per warpgroup and K step
    instead of one per weight box. `walk_groups` (int32 [M_pad / 128, 2]; the backends pass
    `kernels.walk_groups.expert_walk_groups`): the persistent walk's groups of m-tiles as it gives them instead
    of group_m m-tiles each, so that a group can hold whole experts (an expert's m-tiles share their weight
    boxes in L2 only within one group). Tiles are 256 columns wide unless `block_n` says otherwise.
    `diagnostic` (`DIAGNOSTICS`; benchmarks only): a form with one part of the work taken away, whose outputs are
    not the GEMM's."""
    diag = _check_diagnostic("grouped_gemm_ws", diagnostic, stagger, a_rows is not None)
    shape = check_operands(a, w, tile_expert, out, a_scale_t, w_scale, bias, activation, out_scale_t, block_m,
                           block_n, block_k, stages, group_m, a_rows, walk_groups)
    stages, scale_tma, store_tma, wide_mma = kernel_forms(shape, out, a_scale_t, stages, scale_tma, store_tma,
                                                          wide_mma)
    _check_stagger("grouped_gemm_ws", stagger, stages)
    if shape.M_pad == 0 or shape.N == 0:
        return out
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    el = _gl_dtype(a.dtype)
    bk, sub_n = shape.block_k, shape.sub_n
    a_desc = TensorDescriptor.from_tensor(a, [block_m, bk], gl.NVMMASharedLayout.get_default_for([block_m, bk], el))
    w_desc = TensorDescriptor.from_tensor(w.reshape(shape.E * shape.w_rows, shape.K), [sub_n, bk],
                                          gl.NVMMASharedLayout.get_default_for([sub_n, bk], el))
    s_desc = TensorDescriptor.from_tensor(a_scale_t.reshape(-1), [block_m], SCALE_SMEM_LAYOUT) if scale_tma else a_desc
    o_box = [block_m // 2, sub_n]
    o_desc = TensorDescriptor.from_tensor(out, o_box, gl.NVMMASharedLayout.get_default_for(
        o_box, _gl_dtype(out.dtype))) if store_tma else a_desc
    num_m_tiles = shape.M_pad // block_m
    num_n_tiles = triton.cdiv(shape.N, sub_n if shape.gated else sub_n * shape.split)
    if num_programs is None:
        num_programs = _sm_count(a.device.index if a.device.index is not None else torch.cuda.current_device())
    grid = (max(1, min(num_programs, num_m_tiles * num_n_tiles)),)
    dummy = tile_expert
    ws_grouped_gemm_kernel[grid](a_desc, w_desc, s_desc, o_desc, a, dummy if a_rows is None else a_rows, tile_expert,
                                 dummy if walk_groups is None else walk_groups,
                                 dummy if a_scale_t is None else a_scale_t, dummy if w_scale is None else w_scale,
                                 dummy if bias is None else bias, out, dummy if out_scale_t is None else out_scale_t,
                                 shape.M_pad, shape.a_count, shape.K, shape.N, shape.w_rows, num_m_tiles, num_n_tiles,
                                 triton.cdiv(shape.K, bk), GROUP_M=group_m, GROUPED=walk_groups is not None,
                                 FP8=shape.fp8, SPLIT=shape.split, GATED=shape.gated,
                                 ACTIVATION=ACTIVATION_CODES.get(activation, 0),
                                 HAS_BIAS=bias is not None, OUT_FP8=shape.out_fp8, GATHER=shape.gather,
                                 STAGES=stages, SCALE_TMA=bool(scale_tma), STORE_TMA=bool(store_tma), STAGGER=stagger,
                                 WIDE=wide_mma, COL_SCALE=shape.col_scale, ROW_SCALE=shape.row_scale,
                                 MATH_REGS=math_regs, LOADER_REGS=loader_regs, DIAG=diag, num_warps=4,
                                 maxnreg=maxnreg)
    return out


# shared memory of one SM on sm_90 (227 KB), and what the ring may take of it beside the barriers and the
# epilogue's scratch; RESERVED: the 1 KB ptxas keeps static for these kernels (Triton's launcher takes it
# off the dynamic limit) and 1 KB for the barriers and the gated epilogue's bias-row scratch (`_bias_row`)
SMEM_BYTES = 227 * 1024
RING_BUDGET = 200 * 1024
RESERVED = 2048


def _slot_bytes(shape: GemmShape, scale_tma: bool) -> int:
    """Shared memory of one ring slot: the A tile, the weight boxes and, with `scale_tma`, the 128 A scales."""
    return (128 + shape.sub_n * shape.split) * shape.block_k * (1 if shape.fp8 else 2) + (512 if scale_tma else 0)


def _store_bytes(shape: GemmShape) -> int:
    """Shared memory of the TMA-store epilogue: one [64, sub_n] buffer of out's dtype per math warpgroup."""
    return 2 * 64 * shape.sub_n * (1 if shape.out_fp8 else 2)


def _store_aligned(shape: GemmShape, out: torch.Tensor) -> bool:
    """Whether TMA can store out: 16-byte aligned, with rows of a multiple of 16 bytes."""
    return out.data_ptr() % 16 == 0 and (shape.N * out.element_size()) % 16 == 0


def _fits(shape: GemmShape, stages: int, scale_tma: bool, store_bytes: int) -> bool:
    """Whether a ring of `stages` slots (with the A scales where `scale_tma`) and the epilogue's `store_bytes`
    fit in shared memory beside RESERVED."""
    return stages * _slot_bytes(shape, scale_tma) + store_bytes + RESERVED <= SMEM_BYTES


def _default_stages(shape: GemmShape, store_bytes: int = 0) -> int:
    """As many ring slots as fit in RING_BUDGET (counting the A scales where FP8 can bring them by TMA),
    at most 6, and fewer where the epilogue's `store_bytes` would not fit beside them."""
    slot = _slot_bytes(shape, shape.fp8 and not shape.gather and not shape.row_scale)
    return max(2, min(6, RING_BUDGET // slot, (SMEM_BYTES - RESERVED - store_bytes) // slot))


def _scale_tma_choice(shape: GemmShape, a_scale_t, stages: int, scale_tma: bool | None, store_bytes: int = 0) -> bool:
    """Whether the A scales come by TMA: asked (True / False) or, None, wherever it applies: FP8 A scaled per
    128-wide K block, in layout order, `a_scale_t` 16-byte aligned (TMA), and a ring of `stages` slots that still
    fits in shared memory with them beside the epilogue's `store_bytes` (and RESERVED). Asked where it does not
    apply: a ValueError."""
    applies = (shape.fp8 and not shape.gather and not shape.row_scale and a_scale_t.data_ptr() % 16 == 0
               and _fits(shape, stages, True, store_bytes))
    if scale_tma is None:
        return applies
    if scale_tma and not applies:
        raise ValueError(f"grouped_gemm_ws: scale_tma takes FP8 A scaled per K block, in layout order (no a_rows), "
                         f"a_scale_t 16-byte aligned (TMA) and a ring that fits with the scales ({stages} slots of "
                         f"{_slot_bytes(shape, True)} bytes)")
    return bool(scale_tma)


def _store_tma_choice(shape: GemmShape, out: torch.Tensor, stages: int, scale_tma: bool,
                      store_tma: bool | None) -> bool:
    """Whether the outputs go out by TMA: asked (True / False) or, None, wherever it applies: out aligned for
    TMA (`_store_aligned`) and its buffers fit in shared memory beside a ring of `stages` slots. Asked where
    it does not apply: a ValueError."""
    applies = (_store_aligned(shape, out)
               and _fits(shape, stages, scale_tma, _store_bytes(shape)))
    if store_tma is None:
        return applies
    if store_tma and not applies:
        raise ValueError(f"grouped_gemm_ws: store_tma takes out 16-byte aligned with rows of a multiple of 16 bytes "
                         f"and a ring that fits beside its {_store_bytes(shape)} bytes of buffers ({stages} slots of "
                         f"{_slot_bytes(shape, scale_tma)} bytes)")
    return bool(store_tma)


def kernel_forms(shape: GemmShape, out: torch.Tensor, a_scale_t, stages: int | None, scale_tma: bool | None,
                 store_tma: bool | None, wide_mma: bool | None = None) -> tuple[int, bool, bool, bool]:
    """(ring slots, A scales by TMA, outputs by TMA store, one wide product per K step) for these operands: as
    asked, and where left None the defaults (the TMA store where it applies, the ring sized beside its buffers,
    then the A scales; the wide product in plain BF16 tiles of 256)."""
    epi = _store_bytes(shape) if store_tma or (store_tma is None and _store_aligned(shape, out)) else 0
    stages = stages or _default_stages(shape, epi)
    scale_tma = _scale_tma_choice(shape, a_scale_t, stages, scale_tma, epi)
    return (stages, scale_tma, _store_tma_choice(shape, out, stages, scale_tma, store_tma),
            _wide_mma_choice("grouped_gemm_ws", shape.fp8, shape.split, shape.gated, wide_mma))


def wide_mma_applies(fp8: bool, split: int) -> bool:
    """Whether one 64 x 256 product per K step can run: BF16 tiles of two weight boxes (block FP8's promotion
    needs a product per box, whose registers a 64 x 256 one would double)."""
    return not fp8 and split == 2


def _wide_mma_choice(caller: str, fp8: bool, split: int, gated: bool, wide_mma: bool | None) -> bool:
    """Whether a BF16 tile of two weight boxes runs one 64 x 256 product per K step: asked (True / False) or,
    None, in the plain GEMM (the down GEMM, timed on an H100 at T = 8192: 1.22x faster than the tile of 128
    columns it replaced, 1.12x than two products of 128; ncu finds the same tensor-pipe share either way, so the
    gain is the power the second read of the A rows cost under the power limit), not the gated one (the same
    to 2% slower: its tensor pipe was at 94% already). Asked where it cannot apply (`wide_mma_applies`): a
    ValueError."""
    if wide_mma is None:
        return wide_mma_applies(fp8, split) and not gated
    if wide_mma and not wide_mma_applies(fp8, split):
        raise ValueError(f"{caller}: wide_mma takes BF16 tiles of 256 columns (two weight boxes), not "
                         f"{'block FP8' if fp8 else 'tiles of one box'}")
    return bool(wide_mma)


def _check_stagger(caller: str, stagger: int, stages: int) -> None:
    """ValueError unless 0 <= stagger < stages: the first warpgroup's lead lives in the ring."""
    if not 0 <= stagger < stages:
        raise ValueError(f"{caller}: stagger must be in [0, stages) = [0, {stages}) (the first warpgroup's lead "
                         f"lives in the ring), got {stagger}")


def _check_diagnostic(caller: str, diagnostic: str, stagger: int, gather: bool) -> int:
    """The kernel's DIAG for a `DIAGNOSTICS` name; a ValueError for an unknown one, and for a diagnostic form
    with a stagger or (no_loads) with the gathering loader, which the forms do not cover."""
    if diagnostic not in DIAGNOSTICS:
        raise ValueError(f"{caller}: diagnostic must be one of {', '.join(DIAGNOSTICS)}, got {diagnostic!r}")
    if diagnostic != "none" and stagger:
        raise ValueError(f"{caller}: the diagnostic forms run without a stagger, got stagger={stagger}")
    if diagnostic == "no_loads" and gather:
        raise ValueError(f"{caller}: the no_loads form takes A in layout order (no a_rows)")
    return DIAGNOSTICS[diagnostic]


def compile_ws_gemm_for_hopper(fp8: bool, block_n: int = 128, block_k: int | None = None, stages: int = 4,
                               gated: bool = False, out_fp8: bool = False, has_bias: bool = False,
                               gather: bool = False, scale_tma: bool = False, store_tma: bool = False,
                               stagger: int = 0, math_regs: int = 232, loader_regs: int = 40, maxnreg: int = 168,
                               k_multiple_of_16: bool = True, wide_mma: bool | None = None, grouped: bool = False,
                               col_scale: bool = False, row_scale: bool = False, diagnostic: str = "none"):
    """The kernel compiled for sm_90 without a GPU (Triton's bundled ptxas): for resource checks
    (registers, spills, shared memory) and for reading its PTX (`setmaxnreg`, wgmma, TMA).
    `k_multiple_of_16=False`: K as a launch sees it when K % 16 != 0 (not specialized as divisible).
    `wide_mma` None: as a launch picks it (`_wide_mma_choice`). `grouped`: as launched with `walk_groups`.
    `col_scale` / `row_scale` (FP8): weight scales per output row / A scales per row (`GemmShape`).
    `diagnostic`: one of the diagnostic forms (`DIAGNOSTICS`)."""
    from triton.experimental.gluon._runtime import GluonASTSource
    from .xcompile import compile_source_for_hopper
    _check_stagger("compile_ws_gemm_for_hopper", stagger, stages)
    diag = _check_diagnostic("compile_ws_gemm_for_hopper", diagnostic, stagger, gather)
    block_k = block_k or (128 if fp8 else 64)
    sub_n = min(block_n, SCALE)
    split = block_n // sub_n
    wide_mma = _wide_mma_choice("compile_ws_gemm_for_hopper", fp8, split, gated, wide_mma)
    el = "fp8e4nv" if fp8 else "bf16"
    gl_el = gl.float8e4nv if fp8 else gl.bfloat16

    def desc(rows):
        layout = gl.NVMMASharedLayout.get_default_for([rows, block_k], gl_el)
        return f"tensordesc<{el}[{rows}, {block_k}],{layout!r}>"

    fn = ws_grouped_gemm_kernel
    s_desc = f"tensordesc<fp32[128],{SCALE_SMEM_LAYOUT!r}>" if scale_tma else desc(128)
    out_el, out_gl = ("fp8e4nv", gl.float8e4nv) if out_fp8 else ("bf16", gl.bfloat16)
    o_layout = gl.NVMMASharedLayout.get_default_for([64, sub_n], out_gl)
    o_desc = f"tensordesc<{out_el}[64, {sub_n}],{o_layout!r}>" if store_tma else desc(128)
    types = {"a_desc": desc(128), "w_desc": desc(sub_n), "s_desc": s_desc, "o_desc": o_desc, "a_ptr": f"*{el}",
             "a_rows_ptr": "*i32", "tile_expert_ptr": "*i32", "walk_groups_ptr": "*i32", "a_scale_ptr": "*fp32",
             "w_scale_ptr": "*fp32", "bias_ptr": "*fp32", "out_ptr": "*fp8e4nv" if out_fp8 else "*bf16",
             "out_scale_ptr": "*fp32", "M_pad": "i32", "A_ROWS": "i32", "K": "i32", "N": "i32", "W_ROWS": "i32",
             "num_m_tiles": "i32", "num_n_tiles": "i32", "K_BLOCKS": "i32"}
    const = {"GROUP_M": 8, "GROUPED": grouped, "FP8": fp8, "SPLIT": split, "GATED": gated, "ACTIVATION": 0,
             "HAS_BIAS": has_bias, "OUT_FP8": out_fp8, "GATHER": gather, "STAGES": stages,
             "SCALE_TMA": scale_tma and fp8, "STORE_TMA": store_tma, "STAGGER": stagger, "WIDE": wide_mma,
             "COL_SCALE": col_scale and fp8, "ROW_SCALE": row_scale and fp8,
             "MATH_REGS": math_regs, "LOADER_REGS": loader_regs, "DIAG": diag}
    names = fn.arg_names
    sig = {name: types.get(name, "constexpr") for name in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in ("a_ptr", "a_rows_ptr", "tile_expert_ptr",
                                                                     "walk_groups_ptr",
                                                                     "a_scale_ptr", "w_scale_ptr", "bias_ptr",
                                                                     "out_ptr", "out_scale_ptr", "M_pad", "A_ROWS",
                                                                     "K", "N", "W_ROWS")
             if n != "K" or k_multiple_of_16}
    src = GluonASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in const.items()}, attrs=attrs)
    return compile_source_for_hopper(src, {"num_warps": 4, "maxnreg": maxnreg})


key_callees_first(globals())     # each Triton function keyed after those it calls: one key in every process
