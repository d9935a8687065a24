"""Fused MoE experts in Triton: gate+up GEMM with the activation in its epilogue, down GEMM with the
routing weight in its epilogue, and the k outputs of a token summed in float32.

Pipeline for the flat layout (`fused_experts`), all on the GPU with no host sync:

    align_pairs      (token, slot) pairs laid out expert by expert, padded per expert to BLOCK_M
    gate+up GEMM     tile rows gathered straight from the unsorted input x [N, H] (row = pair // k);
                     two accumulators (gate rows n, up rows I + n of w13 [L, 2I, H]); bias, activation,
                     cast (or FP8 quantization) in the epilogue -> act [padded pairs, I]
    down GEMM        act rows (contiguous) x w2 [L, H, I]; bias, routing weight in the epilogue; each row
                     scattered to its pair -> y [N * k, H]
    sum kernel       out[t] = sum over the token's local slots of y[t * k + j], in float32

A config with `gemv` set sends its batches (a few tokens: decode) to `decode_gemv` instead: two
matrix-vector kernels, no alignment, no padding, the slot sum folded into the second.

Both GEMMs are one kernel, `moe_gemm_kernel` (GATE_UP selects the tile body), so the tile loop (one
program per tile, or a persistent walk over the tiles in use) is written once. The batched layout
([L, C, H] + counts, `batched_moe.py`) runs the same kernel with BATCHED=True: each program runs row blocks
of one expert below its count (the capacity past the counts is neither computed nor written) and no
routing weight is applied.

FP8 (W8A8, e4m3fn): A and B in FP8, float32 accumulation. Scales are either per K-block (activations:
one per token-group of BLOCK_K columns; weights: one per SCALE_BLOCK_N x BLOCK_K block) applied to each
K-block's partial product (promoted to float32 block by block, or "rescale": see moe_gemm_kernel), or
per row (activations: per token; weights: per output channel, a per-tensor scale stored repeated)
applied once in the epilogue, each K-block's product still promoted to float32 (`_product_acc`). The
gate+up epilogue can quantize its output per token-group of BLOCK_N columns with the one formula
(epmoe.quant.fp8).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .epilogues import ACTIVATION_CODES, _fp8_quantize_rows, _gated_activation, intermediate_dtype
from .moe_align import align_pairs
from .tuning_table import GemmConfig, MoEKernelConfig, lookup_config
from .jit_keys import key_callees_first

@triton.jit
def _tile_rows(pid_m, sorted_ids_ptr, block_expert_ptr, counts_ptr, num_pairs, capacity,
               TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BATCHED: tl.constexpr, TILE_MODE: tl.constexpr):
    """For tile row-block `pid_m`: (expert or -1 when the tile has nothing to do, source row of each tile
    row (always in bounds), position of each tile row in the padded layout, row holds real data, pair id).

    Flat layout, TILE_MODE 0: uniform tiles, tile b covers positions [b * BLOCK_M, (b + 1) * BLOCK_M) and
    block_expert[b] is its expert. 1: listed tiles, block_expert_ptr holds (expert, first position) pairs
    (the split layout of moe_align). 2: direct, one pair per tile (a batch of one token: its k experts are
    distinct, so no expert is read twice): tile b is pair b, block_expert_ptr the flat expert ids and
    `capacity` the number of local experts (ids outside [0, capacity) are not here).
    """
    offs = tl.arange(0, BLOCK_M)
    if BATCHED:
        blocks_per_expert = tl.cdiv(capacity, BLOCK_M)
        expert = pid_m // blocks_per_expert
        local = (pid_m % blocks_per_expert) * BLOCK_M + offs
        # at most the capacity's rows: with a larger count (the dispatchers refuse one) the rows of a block that
        # straddles the capacity's end would each store the last row again
        count = tl.minimum(tl.load(counts_ptr + expert), capacity)
        valid = local < count
        pos = expert.to(tl.int64) * capacity + tl.minimum(local, capacity - 1)
        src = pos
        pair = pos
        expert = tl.where((pid_m % blocks_per_expert) * BLOCK_M < count, expert, -1)
    elif TILE_MODE == 2:
        expert = tl.load(block_expert_ptr + pid_m).to(tl.int32)
        expert = tl.where((expert >= 0) & (expert < capacity), expert, -1)
        pos = pid_m.to(tl.int64) * BLOCK_M + offs
        valid = offs == 0
        pair = tl.where(valid, pid_m, num_pairs)
        src = tl.where(valid, pid_m // TOP_K, 0).to(tl.int64)
    else:
        if TILE_MODE == 1:
            expert = tl.load(block_expert_ptr + 2 * pid_m)
            pos = tl.load(block_expert_ptr + 2 * pid_m + 1).to(tl.int64) + offs
        else:
            expert = tl.load(block_expert_ptr + pid_m)
            pos = pid_m.to(tl.int64) * BLOCK_M + offs
        pair = tl.load(sorted_ids_ptr + pos)
        valid = pair < num_pairs
        src = tl.where(valid, pair // TOP_K, 0).to(tl.int64)
    return expert, src, pos, valid, pair


@triton.jit
def _tiles_left(pid_m, num_padded_ptr, BLOCK_M: tl.constexpr, TILE_MODE: tl.constexpr):
    """False for a flat-layout tile past the tiles in use (its program returns at once)."""
    if TILE_MODE == 0:
        return pid_m * BLOCK_M < tl.load(num_padded_ptr)
    elif TILE_MODE == 1:
        return pid_m < tl.load(num_padded_ptr)
    else:
        return True


@triton.jit
def _tiles_in_use(num_padded_ptr, BLOCK_M: tl.constexpr, TILE_MODE: tl.constexpr):
    """Flat layout: how many row tiles are in use (TILE_MODE 0: padded positions / BLOCK_M; 1: listed)."""
    if TILE_MODE == 0:
        return tl.load(num_padded_ptr) // BLOCK_M
    else:
        return tl.load(num_padded_ptr)


@triton.jit
def _swizzle(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Program id -> (pid_m, pid_n), GROUP_M row-blocks at a time, so that neighbouring programs share
    one expert's weight tiles and the same token rows in L2."""
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_size
    pid_n = (pid % in_group) // group_size
    return pid_m, pid_n


# The tile list and its counts are read one int at a time, so their addresses' alignment buys nothing; a split
# layout's tail launch reads slices of both (`tile_launches`) at addresses that are not multiples of 16, which,
# specialized on, would compile a second kernel of every tile configuration, and the tuner's compile workers
# (dtype stand-ins: aligned) would compile the wrong one.
@triton.jit(do_not_specialize=["num_pairs", "capacity"],
            do_not_specialize_on_alignment=["block_expert_ptr", "num_padded_ptr"])
def moe_gemm_kernel(
        a_ptr, w_ptr, bias_ptr, out_ptr, out_scale_ptr, a_scale_ptr, w_scale_ptr, topk_weights_ptr,
        sorted_ids_ptr, block_expert_ptr, num_padded_ptr, counts_ptr,
        num_pairs, capacity,
        GATE_UP: tl.constexpr, H: tl.constexpr, I: tl.constexpr, TOP_K: tl.constexpr,
        ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, BATCHED: tl.constexpr, APPLY_WEIGHT: tl.constexpr,
        FP8: tl.constexpr, A_SCALE_PER_BLOCK: tl.constexpr, W_SCALE_PER_BLOCK: tl.constexpr,
        SCALE_BLOCK_N: tl.constexpr, OUT_FP8: tl.constexpr, DOT_PRECISION: tl.constexpr, W_DESC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        TILE_MODE: tl.constexpr = 0, W_SCALE_SCALAR: tl.constexpr = False, PERSISTENT: tl.constexpr = False,
        RESCALE: tl.constexpr = False, A_DESC: tl.constexpr = False, SPLIT_K: tl.constexpr = 1,
        SWAP_AB: tl.constexpr = False, STACK_GU: tl.constexpr = False):
    """Both expert GEMMs, one BLOCK_M x BLOCK_N output tile at a time (GATE_UP selects which):

    gate+up (GATE_UP): act(rows @ w13[e, :I].T, rows @ w13[e, I:].T), rows gathered from x (a_ptr) by
    pair, bias and activation (and FP8 quantization of the output per BLOCK_N columns) in the epilogue,
    written to the padded position of each row. down: act rows (contiguous) @ w2[e].T, bias and routing
    weight in the epilogue, each row scattered to its pair (flat) or kept in place (batched: rows past the
    count are not written).

    BATCHED: the grid is experts x N tiles x slots (`num_pairs` holds the slots per expert); a program runs
    its expert's row blocks below the count, one slot's share of them, so the capacity past the counts costs
    neither programs nor stores.

    TILE_MODE: how tiles map to rows (`_tile_rows`). W_SCALE_SCALAR (FP8, weight scales per block): the
    rows of each product lie in one scale block, so each K block's weight scale is one number (folded
    into the row scale: one multiply per product element, and no per-column scale registers).

    W_DESC: `w_ptr` is a tensor descriptor of the weights as [L * rows, K] (the TMA engine loads weight
    tiles, zero-filled past the end); tile rows past the expert's rows then hold other rows, whose output
    columns are never stored. A_DESC (down, flat layout): the activation rows come through a tensor
    descriptor too (a tile's rows are consecutive in the padded layout).

    PERSISTENT (flat layout, TILE_MODE 0 or 1): a fixed grid of programs walks the tiles in use (program
    p takes tiles p, p + grid, ...), in a loop nest flattened into one software-pipelined loop, so the
    next tile's first K blocks are loaded while this tile finishes and stores its epilogue.

    FP8 with W_SCALE_SCALAR: each K block's scales (the activations' per row, the weight block's) are
    loaded one K block ahead, so their load latency stays off the loop's critical path. RESCALE (such
    tiles only): a tile is two products per K block (gate and up; down: the two halves of its N tile),
    each accumulator holds its sum in units of the last K block's scale, and a K block is one
    accumulating product, acc = dot(a, b, acc * s_prev / s) (scales floored at PROMOTE_SCALE_FLOOR),
    scaled by the last scale after the loop. The second product's rescale and wgmma overlap the first's
    (Triton leaves it in flight across the K block), but the tensor cores then accumulate the whole K
    range in their FP8 accumulator (about 14 bits kept), where the default promotes every K block's
    product to float32: faster, measurably less precise (benchmarks/notes_kernels.md).

    SPLIT_K (down, flat layout, one program per tile): program (tile, s) of a grid [tiles, SPLIT_K] sums the
    s-th of SPLIT_K consecutive ranges of K blocks and stores its rows at s * num_pairs + pair (out_ptr holds
    SPLIT_K x num_pairs float32 rows; the bias goes into range 0's only); the slot sum adds the ranges.

    SWAP_AB (not with RESCALE): each K block's product is computed transposed, weights x rows^T, and the
    accumulator is [BLOCK_N, BLOCK_M] until the epilogue transposes it once. With few rows per tile (BLOCK_M 16
    or 32) the weight tile's rows then fill the tensor cores' M side (Hopper's warpgroup MMA needs 64) and the
    rows are its narrow N side, where as [rows, weights] a tile of 16 rows cannot use it. The same products and
    sums, in another order.

    STACK_GU (gate+up, block FP8 with W_SCALE_SCALAR, not RESCALE, weights through pointers): the gate and up
    weight rows of a tile are one operand of 2 x BLOCK_N rows, so each K block is one product (one warpgroup
    MMA wait) where it is two, each promoted with its half's weight scale; one accumulator of twice the rows,
    split into gate and up after the loop. The same products and sums. With 8 warps a tile of 32 rows then
    compiles to 128 registers (two programs an SM), where the two products take 130.
    """
    N_OUT: tl.constexpr = I if GATE_UP else H
    num_pid_n: tl.constexpr = (N_OUT + BLOCK_N - 1) // BLOCK_N
    if PERSISTENT:
        tiles_m = _tiles_in_use(num_padded_ptr, BLOCK_M, TILE_MODE)
        for tile in tl.range(tl.program_id(0), tiles_m * num_pid_n, tl.num_programs(0), flatten=True):
            pid_m, pid_n = _swizzle(tile, tiles_m, num_pid_n, GROUP_M)
            _one_tile(a_ptr, w_ptr, bias_ptr, out_ptr, out_scale_ptr, a_scale_ptr, w_scale_ptr, topk_weights_ptr,
                      sorted_ids_ptr, block_expert_ptr, counts_ptr, num_pairs, capacity, pid_m, pid_n,
                      GATE_UP, H, I, TOP_K, ACTIVATION, HAS_BIAS, BATCHED, APPLY_WEIGHT, FP8, A_SCALE_PER_BLOCK,
                      W_SCALE_PER_BLOCK, SCALE_BLOCK_N, OUT_FP8, DOT_PRECISION, W_DESC, BLOCK_M, BLOCK_N,
                      BLOCK_K, TILE_MODE, W_SCALE_SCALAR, RESCALE, A_DESC, False, 0, 1, SWAP_AB, STACK_GU)
    elif BATCHED:
        # program -> (expert, N tile, slot), slots fastest (they share the expert's weight tile): the slot runs its
        # expert's row blocks slot, slot + slots, ... below its count (`num_pairs`: the slots per expert)
        slots = num_pairs
        per_expert = num_pid_n * slots
        expert = tl.program_id(0) // per_expert
        pid_n = (tl.program_id(0) % per_expert) // slots
        blocks_per_expert = tl.cdiv(capacity, BLOCK_M)
        used = tl.cdiv(tl.minimum(tl.load(counts_ptr + expert), capacity), BLOCK_M)
        for block in range(tl.program_id(0) % slots, used, slots):
            _one_tile(a_ptr, w_ptr, bias_ptr, out_ptr, out_scale_ptr, a_scale_ptr, w_scale_ptr, topk_weights_ptr,
                      sorted_ids_ptr, block_expert_ptr, counts_ptr, num_pairs, capacity,
                      expert * blocks_per_expert + block, pid_n,
                      GATE_UP, H, I, TOP_K, ACTIVATION, HAS_BIAS, BATCHED, APPLY_WEIGHT, FP8, A_SCALE_PER_BLOCK,
                      W_SCALE_PER_BLOCK, SCALE_BLOCK_N, OUT_FP8, DOT_PRECISION, W_DESC, BLOCK_M, BLOCK_N,
                      BLOCK_K, TILE_MODE, W_SCALE_SCALAR, RESCALE, A_DESC, False, 0, 1, SWAP_AB, STACK_GU)
    else:
        pid_m, pid_n = _swizzle(tl.program_id(0), tl.num_programs(0) // num_pid_n, num_pid_n, GROUP_M)
        if _tiles_left(pid_m, num_padded_ptr, BLOCK_M, TILE_MODE):
            _one_tile(a_ptr, w_ptr, bias_ptr, out_ptr, out_scale_ptr, a_scale_ptr, w_scale_ptr, topk_weights_ptr,
                      sorted_ids_ptr, block_expert_ptr, counts_ptr, num_pairs, capacity, pid_m, pid_n,
                      GATE_UP, H, I, TOP_K, ACTIVATION, HAS_BIAS, BATCHED, APPLY_WEIGHT, FP8, A_SCALE_PER_BLOCK,
                      W_SCALE_PER_BLOCK, SCALE_BLOCK_N, OUT_FP8, DOT_PRECISION, W_DESC, BLOCK_M, BLOCK_N,
                      BLOCK_K, TILE_MODE, W_SCALE_SCALAR, RESCALE, A_DESC, True, tl.program_id(1), SPLIT_K,
                      SWAP_AB, STACK_GU)


@triton.jit
def _one_tile(a_ptr, w_ptr, bias_ptr, out_ptr, out_scale_ptr, a_scale_ptr, w_scale_ptr, topk_weights_ptr,
              sorted_ids_ptr, block_expert_ptr, counts_ptr, num_pairs, capacity, pid_m, pid_n,
              GATE_UP: tl.constexpr, H: tl.constexpr, I: tl.constexpr, TOP_K: tl.constexpr,
              ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, BATCHED: tl.constexpr, APPLY_WEIGHT: tl.constexpr,
              FP8: tl.constexpr, A_SCALE_PER_BLOCK: tl.constexpr, W_SCALE_PER_BLOCK: tl.constexpr,
              SCALE_BLOCK_N: tl.constexpr, OUT_FP8: tl.constexpr, DOT_PRECISION: tl.constexpr,
              W_DESC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              TILE_MODE: tl.constexpr, W_SCALE_SCALAR: tl.constexpr, RESCALE: tl.constexpr,
              A_DESC: tl.constexpr, CHECK_EXPERT: tl.constexpr, split, SPLIT_K: tl.constexpr,
              SWAP_AB: tl.constexpr, STACK_GU: tl.constexpr):
    """Tile (pid_m, pid_n) of either GEMM. CHECK_EXPERT: the tile may have no expert (one program per
    tile); then it does nothing. split: which of the down GEMM's SPLIT_K ranges of K blocks (0 when it has
    one)."""
    expert, src, pos, valid, pair = _tile_rows(pid_m, sorted_ids_ptr, block_expert_ptr, counts_ptr,
                                               num_pairs, capacity, TOP_K, BLOCK_M, BATCHED, TILE_MODE)
    if GATE_UP:
        if (not CHECK_EXPERT) or expert >= 0:
            _gate_up_tile(a_ptr, w_ptr, bias_ptr, out_ptr, out_scale_ptr, a_scale_ptr, w_scale_ptr,
                          pid_n, expert, src, pos, H, I, ACTIVATION, HAS_BIAS, FP8, A_SCALE_PER_BLOCK,
                          W_SCALE_PER_BLOCK, SCALE_BLOCK_N, OUT_FP8, DOT_PRECISION, W_DESC,
                          BLOCK_M, BLOCK_N, BLOCK_K, W_SCALE_SCALAR, RESCALE, SWAP_AB, STACK_GU)
    elif (not CHECK_EXPERT) or expert >= 0:
        _down_tile(a_ptr, w_ptr, bias_ptr, out_ptr, a_scale_ptr, w_scale_ptr, topk_weights_ptr,
                   pid_n, expert, pos, valid, pair, H, I, HAS_BIAS, BATCHED, APPLY_WEIGHT,
                   FP8, A_SCALE_PER_BLOCK, W_SCALE_PER_BLOCK, SCALE_BLOCK_N, DOT_PRECISION, W_DESC,
                   BLOCK_M, BLOCK_N, BLOCK_K, W_SCALE_SCALAR, RESCALE, A_DESC, split, num_pairs, SPLIT_K,
                   SWAP_AB)


@triton.jit
def _block_scales(row_ptrs, w1_ptrs, w2_ptrs, kb, ROW_PER_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr):
    """K block kb's scales: the rows' activation scales (ones when they are per token, applied in the
    epilogue) and the two products' weight-block scales (one number each)."""
    rows = tl.load(row_ptrs + kb) if ROW_PER_BLOCK else tl.full((BLOCK_M,), 1.0, tl.float32)
    return rows, tl.load(w1_ptrs + kb), tl.load(w2_ptrs + kb)


@triton.jit
def _rescale_step(a, b1, b2, acc1, acc2, s1_prev, s2_prev, s1, s2):
    """One K block of RESCALE (see moe_gemm_kernel): s1 / s2 [BLOCK_M] the products' scales of this K
    block -> (acc1, acc2, s1, s2). The first dot is synchronous (Triton waits for every wgmma in flight
    right after it); the second is left in flight into the next K block."""
    s1 = tl.maximum(s1, PROMOTE_SCALE_FLOOR, propagate_nan=tl.PropagateNan.ALL)    # a NaN scale stays NaN
    s2 = tl.maximum(s2, PROMOTE_SCALE_FLOOR, propagate_nan=tl.PropagateNan.ALL)
    acc1 = tl.dot(a, b1, acc1 * (s1_prev / s1)[:, None])
    acc2 = tl.dot(a, b2, acc2 * (s2_prev / s2)[:, None])
    return acc1, acc2, s1, s2


@triton.jit
def _product(a, b, SWAP_AB: tl.constexpr):
    """a [BLOCK_M, BLOCK_K] @ b [BLOCK_K, N] in float32: [BLOCK_M, N], or with SWAP_AB its transpose [N, BLOCK_M]
    computed as b^T @ a^T (the accumulator layout of SWAP_AB: see moe_gemm_kernel)."""
    if SWAP_AB:
        return tl.dot(tl.trans(b), tl.trans(a))
    else:
        return tl.dot(a, b)


@triton.jit
def _product_acc(a, b, acc, DOT_PRECISION: tl.constexpr, SWAP_AB: tl.constexpr, FP8: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """acc + a @ b (or its transpose, SWAP_AB), accumulated by the dot itself. FP8 (scales per row, applied
    after the loop): each K block's product is added to the float32 accumulator (max_num_imprecise_acc =
    BLOCK_K); Triton's sm_90 default (2^30) lets the warpgroup MMA sum the whole K range at its reduced
    precision (about 14 bits)."""
    IMPRECISE: tl.constexpr = BLOCK_K if FP8 else None       # None: Triton's default (no FP8 operands)
    if SWAP_AB:
        return tl.dot(tl.trans(b), tl.trans(a), acc, input_precision=DOT_PRECISION, max_num_imprecise_acc=IMPRECISE)
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION, max_num_imprecise_acc=IMPRECISE)


@triton.jit
def _per_row(v, SWAP_AB: tl.constexpr):
    """A vector over the tile's rows, shaped to scale a product (or its transpose)."""
    if SWAP_AB:
        return v[None, :]
    else:
        return v[:, None]


@triton.jit
def _per_col(v, SWAP_AB: tl.constexpr):
    """A vector over the tile's output columns, shaped to scale a product (or its transpose)."""
    if SWAP_AB:
        return v[:, None]
    else:
        return v[None, :]


@triton.jit
def _stacked_scale(xs, wg, wu, is_gate, SWAP_AB: tl.constexpr):
    """The scale of each element of a stacked gate+up product: the row's (xs [BLOCK_M]) times the gate's or the
    up's weight block (wg, wu: one number each; is_gate [2 x BLOCK_N] says which), laid out as the product is."""
    w = tl.where(is_gate, wg, wu)
    if SWAP_AB:
        return w[:, None] * xs[None, :]
    else:
        return xs[:, None] * w[None, :]


@triton.jit
def _unstack(acc, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SWAP_AB: tl.constexpr):
    """The gate and up accumulators of a stacked product: [2 x BLOCK_N, BLOCK_M] (SWAP_AB) or
    [BLOCK_M, 2 x BLOCK_N], gate first, into two of [BLOCK_N, BLOCK_M] or [BLOCK_M, BLOCK_N]."""
    if SWAP_AB:
        halves = tl.permute(tl.reshape(acc, (2, BLOCK_N, BLOCK_M)), (1, 2, 0))
    else:
        halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N)), (0, 2, 1))
    return tl.split(halves)


@triton.jit
def _gate_up_tile(x_ptr, w_ptr, bias_ptr, out_ptr, out_scale_ptr, x_scale_ptr, w_scale_ptr,
                  pid_n, expert, src, pos,
                  H: tl.constexpr, I: tl.constexpr, ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr,
                  FP8: tl.constexpr, X_SCALE_PER_BLOCK: tl.constexpr, W_SCALE_PER_BLOCK: tl.constexpr,
                  SCALE_BLOCK_N: tl.constexpr, OUT_FP8: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  W_DESC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  W_SCALE_SCALAR: tl.constexpr, RESCALE: tl.constexpr, SWAP_AB: tl.constexpr,
                  STACK_GU: tl.constexpr):
    """One gate+up tile of an expert (>= 0): K loop, epilogue, store (see moe_gemm_kernel)."""
    tl.static_assert(not (SWAP_AB and RESCALE), "SWAP_AB keeps no RESCALE accumulators")
    num_pid_n: tl.constexpr = (I + BLOCK_N - 1) // BLOCK_N
    K_BLOCKS: tl.constexpr = (H + BLOCK_K - 1) // BLOCK_K
    EVEN_K: tl.constexpr = H % BLOCK_K == 0
    w_row = expert * (2 * I) + pid_n * BLOCK_N     # descriptor row of the gate tile (int32)
    expert = expert.to(tl.int64)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_nw = offs_n % I                     # wrapped: every weight row read exists; extra columns are dropped
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + src[:, None] * H + offs_k[None, :]
    tl.static_assert(not STACK_GU or (FP8 and W_SCALE_SCALAR and not RESCALE and not W_DESC),
                     "STACK_GU: block FP8 promoting each K block's product, weights through pointers")
    if STACK_GU:       # gate and up weight rows as one operand [BLOCK_K, 2 x BLOCK_N]: one product a K block
        offs_2n = tl.arange(0, 2 * BLOCK_N)
        is_gate = offs_2n < BLOCK_N
        rows_2n = (pid_n * BLOCK_N + offs_2n % BLOCK_N) % I + (offs_2n // BLOCK_N) * I
        s_ptrs = w_ptr + expert * (2 * I * H) + rows_2n[None, :] * H + offs_k[:, None]
    elif not W_DESC:
        g_ptrs = w_ptr + expert * (2 * I * H) + offs_nw[None, :] * H + offs_k[:, None]
        u_ptrs = g_ptrs + I * H
    if FP8:
        xs_ptrs = x_scale_ptr + src * K_BLOCKS            # read only when X_SCALE_PER_BLOCK
        if W_SCALE_PER_BLOCK:
            # [L, ceil(2I / SCALE_BLOCK_N), K_BLOCKS]: an expert's scale rows include a partial last block
            W_SCALE_ROWS: tl.constexpr = (2 * I + SCALE_BLOCK_N - 1) // SCALE_BLOCK_N
            if W_SCALE_SCALAR:
                ws_g_ptrs = w_scale_ptr + expert * (W_SCALE_ROWS * K_BLOCKS) \
                    + ((pid_n * BLOCK_N) // SCALE_BLOCK_N) * K_BLOCKS
                ws_u_ptrs = w_scale_ptr + expert * (W_SCALE_ROWS * K_BLOCKS) \
                    + ((pid_n * BLOCK_N + I) // SCALE_BLOCK_N) * K_BLOCKS
            else:
                ws_g_ptrs = w_scale_ptr + expert * (W_SCALE_ROWS * K_BLOCKS) \
                    + (offs_nw // SCALE_BLOCK_N) * K_BLOCKS
                ws_u_ptrs = w_scale_ptr + expert * (W_SCALE_ROWS * K_BLOCKS) \
                    + ((offs_nw + I) // SCALE_BLOCK_N) * K_BLOCKS

    if STACK_GU:
        if SWAP_AB:
            acc = tl.zeros((2 * BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
    elif SWAP_AB:
        acc_g = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FP8 and W_SCALE_SCALAR:   # the next K block's scales, loaded a block ahead
        xs_n, wg_n, wu_n = _block_scales(xs_ptrs, ws_g_ptrs, ws_u_ptrs, 0, X_SCALE_PER_BLOCK, BLOCK_M)
        if RESCALE:
            sg_prev = tl.full((BLOCK_M,), 1.0, tl.float32)
            su_prev = tl.full((BLOCK_M,), 1.0, tl.float32)
    for kb in range(0, K_BLOCKS):
        if EVEN_K:
            a = tl.load(a_ptrs)
        else:
            a = tl.load(a_ptrs, mask=offs_k[None, :] < H - kb * BLOCK_K, other=0.0)
        if STACK_GU:
            if EVEN_K:
                b = tl.load(s_ptrs)
            else:
                b = tl.load(s_ptrs, mask=offs_k[:, None] < H - kb * BLOCK_K, other=0.0)
        elif W_DESC:
            bg = w_ptr.load([w_row, kb * BLOCK_K]).T
            bu = w_ptr.load([w_row + I, kb * BLOCK_K]).T
        elif EVEN_K:
            bg = tl.load(g_ptrs)
            bu = tl.load(u_ptrs)
        else:
            bg = tl.load(g_ptrs, mask=offs_k[:, None] < H - kb * BLOCK_K, other=0.0)
            bu = tl.load(u_ptrs, mask=offs_k[:, None] < H - kb * BLOCK_K, other=0.0)
        if FP8 and W_SCALE_SCALAR:
            xs, wg, wu = xs_n, wg_n, wu_n
            xs_n, wg_n, wu_n = _block_scales(xs_ptrs, ws_g_ptrs, ws_u_ptrs, tl.minimum(kb + 1, K_BLOCKS - 1),
                                             X_SCALE_PER_BLOCK, BLOCK_M)
            if RESCALE:
                acc_g, acc_u, sg_prev, su_prev = _rescale_step(a, bg, bu, acc_g, acc_u, sg_prev, su_prev,
                                                               xs * wg, xs * wu)
            elif STACK_GU:
                acc += _product(a, b, SWAP_AB) * _stacked_scale(xs, wg, wu, is_gate, SWAP_AB)
            else:
                acc_g += _product(a, bg, SWAP_AB) * _per_row(xs * wg, SWAP_AB)
                acc_u += _product(a, bu, SWAP_AB) * _per_row(xs * wu, SWAP_AB)
        elif FP8 and (X_SCALE_PER_BLOCK or W_SCALE_PER_BLOCK):
            pg = _product(a, bg, SWAP_AB)
            pu = _product(a, bu, SWAP_AB)
            if X_SCALE_PER_BLOCK:
                xs = tl.load(xs_ptrs + kb)
                pg = pg * _per_row(xs, SWAP_AB)
                pu = pu * _per_row(xs, SWAP_AB)
            if W_SCALE_PER_BLOCK:
                pg = pg * _per_col(tl.load(ws_g_ptrs + kb), SWAP_AB)
                pu = pu * _per_col(tl.load(ws_u_ptrs + kb), SWAP_AB)
            acc_g += pg
            acc_u += pu
        else:
            acc_g = _product_acc(a, bg, acc_g, DOT_PRECISION, SWAP_AB, FP8, BLOCK_K)
            acc_u = _product_acc(a, bu, acc_u, DOT_PRECISION, SWAP_AB, FP8, BLOCK_K)
        a_ptrs += BLOCK_K
        if STACK_GU:
            s_ptrs += BLOCK_K
        elif not W_DESC:
            g_ptrs += BLOCK_K
            u_ptrs += BLOCK_K
    if STACK_GU:
        acc_g, acc_u = _unstack(acc, BLOCK_M, BLOCK_N, SWAP_AB)
    if RESCALE:
        acc_g = acc_g * sg_prev[:, None]
        acc_u = acc_u * su_prev[:, None]
    if SWAP_AB:                              # [BLOCK_M, BLOCK_N] from here on
        acc_g = tl.trans(acc_g)
        acc_u = tl.trans(acc_u)

    if FP8:
        if not X_SCALE_PER_BLOCK:            # one scale per token, applied once
            xs = tl.load(x_scale_ptr + src)
            acc_g = acc_g * xs[:, None]
            acc_u = acc_u * xs[:, None]
        if not W_SCALE_PER_BLOCK:            # one scale per output channel (or tensor)
            acc_g = acc_g * tl.load(w_scale_ptr + expert * (2 * I) + offs_nw)[None, :]
            acc_u = acc_u * tl.load(w_scale_ptr + expert * (2 * I) + I + offs_nw)[None, :]
    if HAS_BIAS:
        acc_g += tl.load(bias_ptr + expert * (2 * I) + offs_nw)[None, :]
        acc_u += tl.load(bias_ptr + expert * (2 * I) + I + offs_nw)[None, :]
    act = _gated_activation(acc_g, acc_u, ACTIVATION)
    n_mask = offs_n < I
    out_ptrs = out_ptr + pos[:, None] * I + offs_n[None, :]
    if OUT_FP8:                              # this tile's BLOCK_N columns are one quantization group
        q, scale = _fp8_quantize_rows(tl.where(n_mask[None, :], act, 0.0))
        tl.store(out_ptrs, q, mask=n_mask[None, :])
        tl.store(out_scale_ptr + pos * num_pid_n + pid_n, scale)
    else:
        tl.store(out_ptrs, act.to(out_ptr.dtype.element_ty), mask=n_mask[None, :])


@triton.jit
def _down_tile(a_ptr, w_ptr, bias_ptr, out_ptr, a_scale_ptr, w_scale_ptr, topk_weights_ptr,
               pid_n, expert, pos, valid, pair,
               H: tl.constexpr, I: tl.constexpr, HAS_BIAS: tl.constexpr, BATCHED: tl.constexpr,
               APPLY_WEIGHT: tl.constexpr, FP8: tl.constexpr, A_SCALE_PER_BLOCK: tl.constexpr,
               W_SCALE_PER_BLOCK: tl.constexpr, SCALE_BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
               W_DESC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               W_SCALE_SCALAR: tl.constexpr, RESCALE: tl.constexpr, A_DESC: tl.constexpr, split, num_pairs,
               SPLIT_K: tl.constexpr, SWAP_AB: tl.constexpr):
    """One down tile of an expert (>= 0): K loop, epilogue, store (see moe_gemm_kernel); of its K blocks
    the split-th of SPLIT_K ranges, stored at rows split * num_pairs + pair. With RESCALE
    the tile is two products of BLOCK_N / 2 columns each (descriptor blocks of BLOCK_N / 2 rows). A_DESC:
    `a_ptr` is a tensor descriptor of the activation rows [rows, I] (a tile's rows are consecutive, from
    its first position; rows past the end read as zeros, rows of the next expert are never stored)."""
    tl.static_assert(not (SWAP_AB and RESCALE), "SWAP_AB keeps no RESCALE accumulators")
    K_BLOCKS: tl.constexpr = (I + BLOCK_K - 1) // BLOCK_K
    EVEN_K: tl.constexpr = I % BLOCK_K == 0
    HALF: tl.constexpr = BLOCK_N // 2 if RESCALE else BLOCK_N     # columns of one product
    if SPLIT_K == 1:                      # every K block (bounds known at compile time)
        kb_first = 0
        kb_end = K_BLOCKS
        kb_scales = 0
        row_base = 0
    else:                                 # this program's range of K blocks [first, end)
        KB_PER_SPLIT: tl.constexpr = (K_BLOCKS + SPLIT_K - 1) // SPLIT_K
        kb_first = split * KB_PER_SPLIT
        kb_end = tl.minimum(kb_first + KB_PER_SPLIT, K_BLOCKS)
        kb_scales = tl.minimum(kb_first, K_BLOCKS - 1)      # an empty range reads (and uses) no scale
        row_base = split.to(tl.int64) * num_pairs          # its rows in out
    offs_n = pid_n * BLOCK_N + tl.arange(0, HALF)
    w_row = expert * H + pid_n * BLOCK_N     # descriptor row of the weight tile (int32)
    expert = expert.to(tl.int64)

    offs_k = tl.arange(0, BLOCK_K)
    if A_DESC:
        a_row = tl.min(pos, axis=0).to(tl.int32)     # descriptor row of the tile's first activation row
    else:
        a_ptrs = a_ptr + pos[:, None] * I + kb_first * BLOCK_K + offs_k[None, :]
    if not W_DESC:
        b_ptrs = w_ptr + expert * (H * I) + (offs_n % H)[None, :] * I + kb_first * BLOCK_K + offs_k[:, None]
        if RESCALE:
            b2_ptrs = w_ptr + expert * (H * I) + ((offs_n + HALF) % H)[None, :] * I + kb_first * BLOCK_K \
                + offs_k[:, None]
    if FP8:
        as_ptrs = a_scale_ptr + pos * K_BLOCKS             # read only when A_SCALE_PER_BLOCK
        if W_SCALE_PER_BLOCK:
            # [L, ceil(H / SCALE_BLOCK_N), K_BLOCKS]: an expert's scale rows include a partial last block
            ws_base = w_scale_ptr + expert * ((H + SCALE_BLOCK_N - 1) // SCALE_BLOCK_N * K_BLOCKS)
            if W_SCALE_SCALAR:
                ws_ptrs = ws_base + ((pid_n * BLOCK_N) // SCALE_BLOCK_N) * K_BLOCKS
                ws2_ptrs = ws_ptrs         # the second half's block (RESCALE), else never a second product
                if RESCALE:
                    ws2_ptrs = ws_base + ((pid_n * BLOCK_N + HALF) // SCALE_BLOCK_N) * K_BLOCKS
            else:
                ws_ptrs = ws_base + ((offs_n % H) // SCALE_BLOCK_N) * K_BLOCKS

    if SWAP_AB:
        acc = tl.zeros((HALF, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, HALF), dtype=tl.float32)
    if FP8 and W_SCALE_SCALAR:   # the next K block's scales, loaded a block ahead
        s_n, w_n, w2_n = _block_scales(as_ptrs, ws_ptrs, ws2_ptrs, kb_scales, A_SCALE_PER_BLOCK, BLOCK_M)
        if RESCALE:
            acc2 = tl.zeros((BLOCK_M, HALF), dtype=tl.float32)
            s_prev = tl.full((BLOCK_M,), 1.0, tl.float32)
            s2_prev = tl.full((BLOCK_M,), 1.0, tl.float32)
    for kb in range(kb_first, kb_end):
        if A_DESC:
            a = a_ptr.load([a_row, kb * BLOCK_K])
        elif EVEN_K:
            a = tl.load(a_ptrs)
        else:
            a = tl.load(a_ptrs, mask=offs_k[None, :] < I - kb * BLOCK_K, other=0.0)
        if W_DESC:
            b = w_ptr.load([w_row, kb * BLOCK_K]).T
            if RESCALE:
                b2 = w_ptr.load([w_row + HALF, kb * BLOCK_K]).T
        elif EVEN_K:
            b = tl.load(b_ptrs)
            if RESCALE:
                b2 = tl.load(b2_ptrs)
        else:
            b = tl.load(b_ptrs, mask=offs_k[:, None] < I - kb * BLOCK_K, other=0.0)
            if RESCALE:
                b2 = tl.load(b2_ptrs, mask=offs_k[:, None] < I - kb * BLOCK_K, other=0.0)
        if FP8 and W_SCALE_SCALAR:
            s, w, w2 = s_n, w_n, w2_n
            s_n, w_n, w2_n = _block_scales(as_ptrs, ws_ptrs, ws2_ptrs, tl.minimum(kb + 1, kb_end - 1),
                                           A_SCALE_PER_BLOCK, BLOCK_M)
            if RESCALE:
                acc, acc2, s_prev, s2_prev = _rescale_step(a, b, b2, acc, acc2, s_prev, s2_prev, s * w, s * w2)
            else:
                acc += _product(a, b, SWAP_AB) * _per_row(s * w, SWAP_AB)
        elif FP8 and (A_SCALE_PER_BLOCK or W_SCALE_PER_BLOCK):
            p = _product(a, b, SWAP_AB)
            if A_SCALE_PER_BLOCK:
                p = p * _per_row(tl.load(as_ptrs + kb), SWAP_AB)
            if W_SCALE_PER_BLOCK:
                p = p * _per_col(tl.load(ws_ptrs + kb), SWAP_AB)
            acc += p
        else:     # float16 weights meet a float32 intermediate (`intermediate_dtype`): both as float32
            acc = _product_acc(a, b.to(a.dtype), acc, DOT_PRECISION, SWAP_AB, FP8, BLOCK_K)
        if not A_DESC:
            a_ptrs += BLOCK_K
        if not W_DESC:
            b_ptrs += BLOCK_K
            if RESCALE:
                b2_ptrs += BLOCK_K

    if RESCALE:
        acc = acc * s_prev[:, None]
        acc2 = acc2 * s2_prev[:, None]
    if SWAP_AB:
        acc = tl.trans(acc)
    _down_store(acc, offs_n, expert, pos, valid, pair, out_ptr, bias_ptr, a_scale_ptr,
                w_scale_ptr, topk_weights_ptr, H, HAS_BIAS, BATCHED, APPLY_WEIGHT, FP8, A_SCALE_PER_BLOCK,
                W_SCALE_PER_BLOCK, row_base, split, SPLIT_K)
    if RESCALE:
        _down_store(acc2, offs_n + HALF, expert, pos, valid, pair, out_ptr, bias_ptr,
                    a_scale_ptr, w_scale_ptr, topk_weights_ptr, H, HAS_BIAS, BATCHED, APPLY_WEIGHT, FP8,
                    A_SCALE_PER_BLOCK, W_SCALE_PER_BLOCK, row_base, split, SPLIT_K)


@triton.jit
def _down_store(acc, offs_n, expert, pos, valid, pair, out_ptr, bias_ptr, a_scale_ptr,
                w_scale_ptr, topk_weights_ptr, H: tl.constexpr, HAS_BIAS: tl.constexpr, BATCHED: tl.constexpr,
                APPLY_WEIGHT: tl.constexpr, FP8: tl.constexpr, A_SCALE_PER_BLOCK: tl.constexpr,
                W_SCALE_PER_BLOCK: tl.constexpr, row_base, split, SPLIT_K: tl.constexpr):
    """The down epilogue of output columns offs_n: per-row scales, bias (K range 0 only), routing weight,
    store (flat layout: at rows row_base + pair)."""
    n_mask = offs_n < H
    offs_nw = offs_n % H
    if FP8:
        if not A_SCALE_PER_BLOCK:
            acc = acc * tl.load(a_scale_ptr + pos)[:, None]
        if not W_SCALE_PER_BLOCK:
            acc = acc * tl.load(w_scale_ptr + expert * H + offs_nw)[None, :]
    if HAS_BIAS:
        if SPLIT_K == 1:
            acc += tl.load(bias_ptr + expert * H + offs_nw)[None, :]
        else:
            acc += tl.where(split == 0, tl.load(bias_ptr + expert * H + offs_nw), 0.0)[None, :]
    if BATCHED:         # the real rows only: rows past the count are left as they were
        tl.store(out_ptr + pos[:, None] * H + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=valid[:, None] & n_mask[None, :])
    else:
        if APPLY_WEIGHT:
            acc = acc * tl.load(topk_weights_ptr + pair, mask=valid, other=0.0)[:, None]
        tl.store(out_ptr + (row_base + pair.to(tl.int64))[:, None] * H + offs_n[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & n_mask[None, :])


@triton.jit
def sum_slots_kernel(y_ptr, ids_ptr, out_ptr, num_experts, num_pairs, H: tl.constexpr, TOP_K: tl.constexpr,
                     BLOCK_H: tl.constexpr, SPLITS: tl.constexpr = 1):
    """out[t] = sum_j y[t * k + j] over the slots whose expert is local, in [0, num_experts) (float32),
    cast once; with SPLITS K ranges of the down GEMM, y holds SPLITS x num_pairs rows and each slot's are
    summed, in range order. Other ids are not here: the GEMMs never wrote their rows."""
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        expert = tl.load(ids_ptr + t * TOP_K + j)
        limit = tl.where((expert >= 0) & (expert < num_experts), H, 0)
        here = offs < limit
        for s in tl.static_range(SPLITS):
            acc += tl.load(y_ptr + (s * num_pairs + t * TOP_K + j) * H + offs, mask=here, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * H + offs, acc.to(out_ptr.dtype.element_ty), mask=h_mask)


# ------------------------------------------------------------------------------------------ launchers
@dataclass(frozen=True)
class Fp8Mode:
    """How the FP8 operands of one GEMM are scaled (see the module docstring)."""
    a_scale_per_block: bool     # activations: one scale per BLOCK_K group (else per row)
    w_scale_per_block: bool     # weights: one scale per SCALE_BLOCK_N x BLOCK_K block (else per row)
    scale_block_n: int = 128    # rows of a weight scale block
    out_fp8: bool = False       # gate_up only: quantize the output per BLOCK_N group


def _run(kernel, grid, args, meta, warmup: bool):
    """Launch, or (warmup) only compile; `args` may then hold torch dtypes in place of tensors."""
    if warmup:
        kernel.warmup(*args, grid=grid, **meta)
    else:
        kernel[grid](*args, **meta)


def _fp8_meta(fp8: Fp8Mode | None) -> dict:
    if fp8 is None:
        return dict(FP8=False, W_SCALE_PER_BLOCK=False, SCALE_BLOCK_N=128)
    return dict(FP8=True, W_SCALE_PER_BLOCK=fp8.w_scale_per_block, SCALE_BLOCK_N=fp8.scale_block_n)


def _descriptor_operand(w, rows_per_expert: int, cols: int, use: bool, block_k: int, block_rows: int):
    """(the kernel's operand argument, whether it is a descriptor): a tensor descriptor of `w` as
    [w.shape[0] * rows_per_expert, cols] with [block_rows, block_k] blocks when `use` and the layout
    allows it (16-byte aligned rows), else the tensor."""
    dtype = w if isinstance(w, torch.dtype) else w.dtype
    itemsize = torch.empty((), dtype=dtype).element_size()
    if not use or (cols * itemsize) % 16 or block_k * itemsize < 16:
        return w, False
    from triton.tools.tensor_descriptor import TensorDescriptor
    if isinstance(w, torch.dtype):           # compile only (warmup): a stand-in with the dtype
        from triton.runtime.jit import MockTensor
        base, rows = MockTensor(w), rows_per_expert
    else:
        if w.data_ptr() % 16 or not w.is_contiguous():
            return w, False
        base, rows = w, w.shape[0] * rows_per_expert
    return TensorDescriptor(base, [rows, cols], [cols, 1], [block_rows, block_k]), True


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _grid(tiles: int, gemm: GemmConfig, batched: bool, tile_mode: int, device) -> tuple[tuple[int], bool]:
    """(grid, PERSISTENT): one program per tile, or (persistent configs, flat layout with uniform or
    listed tiles) one program per SM, at most one per tile. The grid depends on the shapes alone (CUDA
    graphs); each persistent program reads how many tiles are in use."""
    if gemm.split_k > 1:
        return (tiles, gemm.split_k), False
    if not gemm.persistent or batched or tile_mode not in (0, 1):
        return (tiles,), False
    if isinstance(device, torch.device) and device.type == "cuda":
        sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    else:                                   # interpreter (CPU tensors), or compile only
        sms = PERSISTENT_PROGRAMS_NO_GPU
    return (max(1, min(tiles, sms)),), True


PERSISTENT_PROGRAMS_NO_GPU = 4     # programs of a persistent launch without a GPU (interpreter tests)


def _dot_precision(dtype) -> str:
    # float32 operands: true float32 products (tf32 would miss the 1e-5 bound)
    return "ieee" if dtype == torch.float32 else "tf32"


def _scalar_w_scale(fp8: Fp8Mode | None, block_n: int, rows_per_half: int) -> bool:
    """The weight scale is one number per (product, K block): per-block weight scales whose block holds
    whole products of block_n rows, and halves (gate / up) that start on a block boundary."""
    return bool(fp8 and fp8.w_scale_per_block and fp8.scale_block_n % block_n == 0
                and rows_per_half % fp8.scale_block_n == 0)


PROMOTE_SCALE_FLOOR = tl.constexpr(1e-30)   # RESCALE: a zero scale would make the ratios infinite


def _rescale(gemm: GemmConfig, fp8: Fp8Mode | None, product_n: int, rows_per_half: int) -> bool:
    """RESCALE of a config: its promote == "rescale" where it applies (FP8 block weights whose scale is
    one number per product of product_n rows: the gate and up halves of a gate+up tile, the two halves of
    a down tile)."""
    return gemm.promote == "rescale" and product_n >= 16 and _scalar_w_scale(fp8, product_n, rows_per_half)


def split_k_problem(gemm: GemmConfig, gate_up: bool, batched: bool) -> str | None:
    """Why this GEMM cannot split its K range here (None: it does not split, or can): only the down GEMM of the
    flat layout, one program per tile, writes the float32 partial rows its slot sum adds."""
    if gemm.split_k > 1 and (gate_up or batched or gemm.persistent):
        return (f"split_k={gemm.split_k}: only the down GEMM of the flat layout, one program per tile, splits its "
                f"K range (got {'gate_up' if gate_up else 'down'}, {'batched' if batched else 'flat'}, "
                f"persistent={gemm.persistent})")
    return None


def _launch_gemm(gate_up: bool, args: tuple, a_dtype, w, w_rows: int, w_cols: int, row_blocks: int,
                 n_out: int, rescale: bool, scalar: bool, meta: dict, gemm: GemmConfig, fp8: Fp8Mode | None,
                 block_m: int, batched: bool, tile_mode: int, warmup: bool) -> None:
    """moe_gemm_kernel over `row_blocks` tiles of `block_m` rows and the N tiles of `n_out` columns;
    args: the kernel's pointer and count arguments, the weight in second place (replaced here by its
    descriptor where the config asks for TMA)."""
    why = split_k_problem(gemm, gate_up, batched)
    if why:
        raise ValueError(why)
    grid, persistent = _grid(row_blocks * triton.cdiv(n_out, gemm.block_n), gemm, batched, tile_mode,
                             None if isinstance(args[0], torch.dtype) else args[0].device)
    meta.update(GATE_UP=gate_up, BATCHED=batched, DOT_PRECISION=_dot_precision(a_dtype),
                BLOCK_M=block_m, BLOCK_N=gemm.block_n, BLOCK_K=gemm.block_k, GROUP_M=gemm.group_m,
                TILE_MODE=tile_mode, W_SCALE_SCALAR=scalar, PERSISTENT=persistent, RESCALE=rescale,
                SPLIT_K=gemm.split_k, SWAP_AB=gemm.swap_ab,
                A_SCALE_PER_BLOCK=bool(fp8 and fp8.a_scale_per_block), num_warps=gemm.num_warps,
                num_stages=gemm.num_stages, **_fp8_meta(fp8))
    if gemm.stack_gate_up and not (gate_up and scalar and not rescale):
        raise ValueError(f"stack_gate_up: a gate+up GEMM of FP8 block weights whose scale is one number a product "
                         f"only (got {'gate_up' if gate_up else 'down'}, {gemm.describe()}, {fp8})")
    meta["STACK_GU"] = gemm.stack_gate_up
    if gemm.max_registers:
        meta["maxnreg"] = gemm.max_registers
    block_rows = gemm.block_n // 2 if rescale and not gate_up else gemm.block_n
    w_arg, meta["W_DESC"] = _descriptor_operand(w, w_rows, w_cols, gemm.tma, gemm.block_k, block_rows)
    # the down GEMM's activation rows [rows, I]: consecutive per tile in the flat layout
    a_arg, meta["A_DESC"] = _descriptor_operand(args[0], 1, w_cols, gemm.tma_a and not gate_up and not batched,
                                                gemm.block_k, block_m)
    _run(moe_gemm_kernel, grid, (a_arg, w_arg) + args[2:], meta, warmup)


def _tile_args(sorted_ids, block_expert, num_padded, counts, num_pairs, capacity, unused) -> tuple:
    return (unused if sorted_ids is None else sorted_ids, unused if block_expert is None else block_expert,
            unused if num_padded is None else num_padded, unused if counts is None else counts,
            num_pairs, capacity)


def launch_gate_up(x, w13, b13, out, out_scale, x_scale, w13_scale, sorted_ids, block_expert, num_padded,
                   counts, num_pairs: int, capacity: int, row_blocks: int, hidden: int, inter: int,
                   top_k: int, activation: str, batched: bool, block_m: int, gemm: GemmConfig,
                   fp8: Fp8Mode | None = None, warmup: bool = False, tile_mode: int = 0) -> None:
    """The gate+up GEMM over `row_blocks` tiles of `block_m` rows. Unused pointers may be any tensor.
    tile_mode: 0 uniform tiles (block_expert per tile), 1 listed tiles ((expert, start) pairs in
    block_expert, their count in num_padded), 2 one pair per tile (block_expert = the flat expert ids,
    capacity = local experts)."""
    u = x
    args = (x, w13, u if b13 is None else b13, out, u if out_scale is None else out_scale,
            u if x_scale is None else x_scale, u if w13_scale is None else w13_scale, u) \
        + _tile_args(sorted_ids, block_expert, num_padded, counts, num_pairs, capacity, u)
    meta = dict(H=hidden, I=inter, TOP_K=top_k, ACTIVATION=ACTIVATION_CODES[activation], HAS_BIAS=b13 is not None,
                APPLY_WEIGHT=False, OUT_FP8=bool(fp8 and fp8.out_fp8))
    _launch_gemm(True, args, x if isinstance(x, torch.dtype) else x.dtype, w13, 2 * inter, hidden, row_blocks,
                 inter, _rescale(gemm, fp8, gemm.block_n, inter), _scalar_w_scale(fp8, gemm.block_n, inter), meta,
                 gemm, fp8, block_m, batched, tile_mode, warmup)


def launch_down(a, w2, b2, out, a_scale, w2_scale, topk_weights, sorted_ids, block_expert, num_padded, counts,
                num_pairs: int, capacity: int, row_blocks: int, hidden: int, inter: int, top_k: int,
                batched: bool, block_m: int, gemm: GemmConfig, fp8: Fp8Mode | None = None,
                warmup: bool = False, tile_mode: int = 0) -> None:
    """The down GEMM over `row_blocks` tiles of `block_m` rows. Unused pointers may be any tensor.
    tile_mode: as `launch_gate_up`."""
    u = out
    args = (a, w2, u if b2 is None else b2, out, u, u if a_scale is None else a_scale,
            u if w2_scale is None else w2_scale, u if topk_weights is None else topk_weights) \
        + _tile_args(sorted_ids, block_expert, num_padded, counts, num_pairs, capacity, u)
    meta = dict(H=hidden, I=inter, TOP_K=top_k, ACTIVATION=0, HAS_BIAS=b2 is not None,
                APPLY_WEIGHT=topk_weights is not None, OUT_FP8=False)
    rescale = _rescale(gemm, fp8, gemm.block_n // 2, hidden)
    # float16 weights meet a float32 intermediate: tf32 products (`_dot_precision` of the weights' dtype)
    _launch_gemm(False, args, w2 if isinstance(w2, torch.dtype) else w2.dtype, w2, hidden, inter, row_blocks,
                 hidden, rescale, _scalar_w_scale(fp8, gemm.block_n // 2 if rescale else gemm.block_n, hidden),
                 meta,
                 gemm, fp8, block_m, batched, tile_mode, warmup)


def sum_block(hidden: int) -> int:
    return 1024 if hidden >= 1024 else triton.next_power_of_2(hidden)


def launch_sum(y, local_ids, out, num_rows: int, hidden: int, top_k: int, num_experts: int,
               warmup: bool = False, splits: int = 1) -> None:
    """out [num_rows, hidden] = the slot sum of y (`splits` x num_rows * top_k rows: see sum_slots_kernel)."""
    grid = (num_rows, triton.cdiv(hidden, sum_block(hidden)))
    _run(sum_slots_kernel, grid, (y, local_ids, out, num_experts, num_rows * top_k),
         dict(H=hidden, TOP_K=top_k, BLOCK_H=sum_block(hidden), SPLITS=splits, num_warps=4), warmup)


# ------------------------------------------------------------------------------------ the flat path
def tile_launches(aligned, block_m: int, tail_m: int) -> list[dict]:
    """The tile arguments of each GEMM launch over an alignment (`align_pairs` with the same tail_m):
    uniform tiles of block_m rows (one launch), or the split layout's body tiles and tail tiles (two)."""
    if not tail_m:
        return [dict(sorted_ids=aligned.sorted_ids, block_expert=aligned.block_expert,
                     num_padded=aligned.num_padded, capacity=0, row_blocks=aligned.max_blocks,
                     block_m=block_m, tile_mode=0)]
    (body, body_count), (tail, tail_count) = aligned.body_tiles(), aligned.tail_tiles()
    launches = [dict(sorted_ids=aligned.sorted_ids, block_expert=body, num_padded=body_count,
                     capacity=0, row_blocks=aligned.max_body, block_m=block_m, tile_mode=1),
                dict(sorted_ids=aligned.sorted_ids, block_expert=tail, num_padded=tail_count,
                     capacity=0, row_blocks=aligned.max_tail, block_m=tail_m, tile_mode=1)]
    return [launch for launch in launches if launch["row_blocks"] > 0]


def weight_format(w13: torch.Tensor | torch.dtype, fp8_granularity: str | None) -> str:
    """The tuning-table name of a weight format: the weights (or, unquantized, their dtype) and the FP8
    granularity (None: not FP8)."""
    if fp8_granularity is not None:
        return f"fp8_{fp8_granularity}"
    return str(w13 if isinstance(w13, torch.dtype) else w13.dtype).replace("torch.", "")


def fused_experts(x: torch.Tensor, local_ids: torch.Tensor, topk_weights: torch.Tensor,
                  w13: torch.Tensor, w2: torch.Tensor, activation: str, *,
                  b13: torch.Tensor | None = None, b2: torch.Tensor | None = None,
                  out_dtype: torch.dtype | None = None, config: MoEKernelConfig | None = None,
                  fp8: "Fp8Operands | None" = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The flat-layout MoE experts: out[t] = sum_j w[t, j] * down_e(act(gate_e x_t, up_e x_t)) over the
    slots j whose local expert e = local_ids[t, j] is in [0, L) (-1 marks a slot whose expert is on
    another rank; any id outside [0, L) contributes nothing).

    x [N, H] (bf16/fp16/fp32, or e4m3fn with `fp8`), local_ids [N, k] int, topk_weights [N, k] float32,
    w13 [L, 2I, H], w2 [L, H, I] contiguous; b13 [L, 2I] / b2 [L, H] float32 optional.
    Returns [N, H] in `out_dtype` (default: x's dtype): `out` when given (contiguous [N, H] of that dtype,
    e.g. the dispatcher's buffer its combine reads), written in place.
    """
    if x.dim() != 2 or local_ids.dim() != 2 or local_ids.shape[0] != x.shape[0]:
        raise ValueError(f"fused_experts: x must be [N, H] and local_ids [N, k], got {list(x.shape)} and "
                         f"{list(local_ids.shape)}")
    if tuple(topk_weights.shape) != tuple(local_ids.shape):
        raise ValueError(f"fused_experts: topk_weights {list(topk_weights.shape)} must match local_ids "
                         f"{list(local_ids.shape)}")
    N, H = x.shape
    top_k = local_ids.shape[1]
    L, two_i, Hw = w13.shape
    inter = two_i // 2
    if Hw != H or two_i != 2 * inter or tuple(w2.shape) != (L, H, inter):
        raise ValueError(f"fused_experts: weights must be w13 [L, 2I, H={H}] and w2 [L, H, I], got "
                         f"{list(w13.shape)} and {list(w2.shape)}")
    for name, t in (("x", x), ("w13", w13), ("w2", w2)):
        if not t.is_contiguous():
            raise ValueError(f"fused_experts: {name} must be contiguous (the kernels index it as a dense array)")
    out_dtype = out_dtype or x.dtype
    if out is None:
        out = torch.empty(N, H, dtype=out_dtype, device=x.device)
    elif tuple(out.shape) != (N, H) or out.dtype != out_dtype or not out.is_contiguous() or out.device != x.device:
        raise ValueError(f"fused_experts: out must be a contiguous [{N}, {H}] {out_dtype} tensor on {x.device}, got "
                         f"{list(out.shape)} {out.dtype} on {out.device}")
    if N == 0:
        return out
    if config is None:
        config, _ = lookup_config(N, L, H, inter, top_k, weight_format(w13, fp8.granularity if fp8 else None),
                                  x.device)
    bm = config.block_m
    num_pairs = N * top_k
    ids_flat = local_ids if local_ids.is_contiguous() else local_ids.contiguous()
    weights_flat = topk_weights.reshape(-1).float().contiguous()
    b13 = None if b13 is None else b13.float().contiguous()
    b2 = None if b2 is None else b2.float().contiguous()
    if config.gemv is not None:
        from .decode_gemv import fp8_supported, gemv_experts
        if fp8 is None or fp8_supported(fp8, H, inter):
            return gemv_experts(x, ids_flat.reshape(-1), weights_flat, w13, w2, b13, b2, activation, out, top_k,
                                config.gemv, fp8)
    if fp8 is not None:
        why = fp8_tiles_problem(config, fp8)
        if why:
            raise ValueError(f"fused_experts: tiles {config.describe()} cannot run these FP8 operands: {why}")
    # which tiles: one pair per tile for a single token (no alignment pass: its k experts are distinct),
    # body + tail tiles (split layout) when the config asks, else uniform tiles of BLOCK_M
    if N == 1:
        direct_ids = ids_flat.reshape(-1)
        if direct_ids.dtype != torch.int32:
            direct_ids = direct_ids.to(torch.int32)
        rows = num_pairs * bm
        launches = [dict(sorted_ids=None, block_expert=direct_ids, num_padded=None, capacity=L,
                         row_blocks=num_pairs, block_m=bm, tile_mode=2)]
    else:
        tail = config.tail_m if config.tail_m and config.tail_m < bm else 0
        aligned = align_pairs(local_ids, L, bm, tail_m=tail)
        rows = aligned.max_rows
        launches = tile_launches(aligned, bm, tail)
    rows = max(rows, 1)

    mode1 = mode2 = None
    inter_scale = None
    if fp8 is not None:
        mode1, mode2 = fp8.modes()
        act = torch.empty(rows, inter, device=x.device,
                          dtype=torch.float8_e4m3fn if mode1.out_fp8 else intermediate_dtype(out_dtype))
        if mode1.out_fp8:
            inter_scale = torch.empty(rows, triton.cdiv(inter, config.gate_up.block_n), dtype=torch.float32,
                                      device=x.device)
    else:
        act = torch.empty(rows, inter, dtype=intermediate_dtype(x.dtype), device=x.device)
    common = dict(counts=None, num_pairs=num_pairs, hidden=H, inter=inter, top_k=top_k, batched=False)
    for tiles in launches:
        launch_gate_up(x, w13, b13, act, inter_scale, fp8.x_scale if fp8 else None,
                       fp8.w13_scale if fp8 else None, gemm=config.gate_up, activation=activation, fp8=mode1,
                       **tiles, **common)
    if fp8 is not None and not mode1.out_fp8:
        act, inter_scale = fp8.quantize_intermediate(act)
    splits = config.down.split_k          # K ranges of the down GEMM: float32 partial rows, added by the sum
    y = torch.empty(splits * num_pairs, H, dtype=out_dtype if splits == 1 else torch.float32, device=x.device)
    for tiles in launches:
        launch_down(act, w2, b2, y, inter_scale, fp8.w2_scale if fp8 else None, weights_flat, gemm=config.down,
                    fp8=mode2, **tiles, **common)
    launch_sum(y, ids_flat, out, N, H, top_k, L, splits=splits)
    return out


def fp8_tiles_problem(config: MoEKernelConfig, fp8: "Fp8Operands") -> str | None:
    """Why the tile kernels of `config` would compute these FP8 operands wrongly (None: they would not).
    The kernels read one activation scale and one weight-block scale per K tile, so a K tile must be the
    activation group and the weight block's width; the gate+up quantizes its output per N tile, the groups
    the down GEMM's K tiles read back, so with grouped activations its N tile is the group too. (`fit_to_problem`
    pins every table and heuristic configuration so; a configuration given by hand may not be.)"""
    groups = [("activation group", fp8.act_group)] if fp8.act_group is not None else []
    if fp8.weight_block is not None:
        groups.append(("weight block width", fp8.weight_block[1]))
    for name, size in groups:
        for gemm_name, gemm in (("gate_up", config.gate_up), ("down", config.down)):
            if gemm.block_k != size:
                return f"the {gemm_name} K tile is {gemm.block_k} columns, the {name} {size}"
    if fp8.act_group is not None and config.gate_up.block_n != fp8.act_group:
        return (f"the gate_up N tile is {config.gate_up.block_n} columns, but its output is quantized per N tile "
                f"for the down GEMM, which reads groups of {fp8.act_group}")
    return None


@dataclass
class Fp8Operands:
    """FP8 inputs of the fused path: x already quantized (x_scale), weights with their stored scales.

    act_group: columns per activation scale (the K tile of the GEMMs), or None for one scale per token.
    weight_block: (rows, cols) of a weight scale block, or None for one scale per output row (channel, or
    a per-tensor scale stored repeated).
    """
    x_scale: torch.Tensor
    w13_scale: torch.Tensor
    w2_scale: torch.Tensor
    act_group: int | None
    weight_block: tuple[int, int] | None
    granularity: str

    def modes(self) -> tuple[Fp8Mode, Fp8Mode]:
        per_block_w = self.weight_block is not None
        bn = self.weight_block[0] if per_block_w else 128
        grouped = self.act_group is not None
        return (Fp8Mode(grouped, per_block_w, bn, out_fp8=grouped), Fp8Mode(grouped, per_block_w, bn))

    def quantize_intermediate(self, act: torch.Tensor, counts: torch.Tensor | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token quantization of the gate+up output (the per_token activation mode). `counts` [L]: act holds
        the L x C rows of a batched layout, and only the rows below each count are quantized."""
        from .fp8_quant import fp8_quantize_triton
        rows = act if counts is None else act.view(counts.shape[0], -1, act.shape[-1])
        q, s = fp8_quantize_triton(rows, None, counts=counts)
        return q.reshape(act.shape), s.reshape(-1).contiguous()


key_callees_first(globals())     # each Triton function keyed after those it calls: one key in every process
