"""Triton FP8 quantization: the formula of `epmoe.quant.fp8`, bit for bit, written once for every kernel.

`fp8_quantize_groups` is that formula as a device function (one scale per row of a [N, G] tile of
float32); every kernel that quantizes calls it: the activation quantizer here, the fused experts'
epilogues (`epilogues`), the `alltoall` packing (`alltoall_pack`) and the GPU-initiated dispatch
(`symm_dispatch`).

One program of the activation quantizer quantizes a tile of `GROUPS` consecutive groups of one row (with
`counts`, of each row it walks: `counted_slots`); a partial last group reads zeros past the row's end, which
change no amax.

The formula rounds to the e4m3 grid itself (`_round_to_e4m3`, integer arithmetic on the float32 bits)
before the cast, which is then exact everywhere: Triton's CPU interpreter (3.9) casts to fp8 by rounding
ties up without carrying into the exponent and truncating subnormals (31.2 became 16.0), while the GPU's
`cvt.rn.satfinite` rounds correctly; on an exactly representable value both agree with torch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import fp8_format
from .fp8_format import FP8_DTYPE, check_counts, check_quantize_args
from .jit_keys import key_callees_first

FP8_MAX = tl.constexpr(fp8_format.FP8_MAX)
INV_FP8_MAX = tl.constexpr(1.0 / fp8_format.FP8_MAX)
SCALE_FLOOR = tl.constexpr(fp8_format.SCALE_FLOOR)


@triton.jit
def _round_to_e4m3(y):
    """Round float32 `y` (|y| <= 448) to the nearest e4m3fn value, ties to even, as float32."""
    bits = y.to(tl.int32, bitcast=True)
    mag = bits & 0x7FFFFFFF
    e = (mag >> 23) - 127                                   # unbiased float32 exponent
    sig = tl.where(mag >= 0x00800000, (mag & 0x007FFFFF) | 0x00800000, mag & 0x007FFFFF)
    grid = tl.maximum(e, -6) - 3                            # log2 of the e4m3 spacing at this magnitude
    shift = tl.minimum(grid - (e - 23), 25)                 # significand bits below that spacing
    half = (1 << (shift - 1)) - 1
    r = (sig + half + ((sig >> shift) & 1)) >> shift        # round half to even, in units of 2**grid
    step = ((grid + 127) << 23).to(tl.float32, bitcast=True)
    val = (r.to(tl.float32) * step).to(tl.int32, bitcast=True)
    return (val | (bits ^ mag)).to(tl.float32, bitcast=True)   # the sign bit put back: -0.0 stays -0.0


@triton.jit
def fp8_quantize_groups(x, ROUND: tl.constexpr = True):
    """The one formula on a float32 tile x [N, G], one scale per row (a token, or one group of a token):
    scale = max(amax, 1e-12) * (1/448) (a multiplication: `amax / 448` differs in the last bit for some
    amax), q = clamp(x / scale, -448, 448) with the correctly rounded `div_rn` (Triton's plain `/` is
    approximate on GPUs), rounded to the e4m3 grid. Returns (q [N, G] float32 values that the cast to
    e4m3fn keeps exactly, scale [N] float32). Zeros (masked columns) change no amax. A row holding a NaN or
    an infinity gets a NaN scale (the sum of x * 0: `tl.max` passes over NaN), so q x scale is NaN across
    it, as torch's is (its scale there is NaN or infinite, its q zeros and NaN). Other ways to keep the
    NaN (a NaN-keeping maximum as the reduction's combine, integer maxima of the magnitudes, a NaN flag
    reduced apart) either crawl under the interpreter or make ptxas keep a value of the library's FP8
    gate+up kernel on the stack in its K loop (tests/test_fp8_quantize.py). ROUND=False (GPU-only
    kernels): q not yet rounded, left to the cast to e4m3fn, whose `cvt.rn.satfinite` rounds to the same
    values on the GPU (not in the interpreter), and the division by `_div_rn_by_row`: the same e4m3 values
    in a fraction of the instructions (tests/test_fp8_quantize.py checks them bit for bit on a GPU)."""
    scale = (tl.maximum(tl.max(tl.abs(x), axis=1), SCALE_FLOOR) + tl.sum(x * 0.0, axis=1)) * INV_FP8_MAX
    if ROUND:
        y = _round_to_e4m3(tl.minimum(tl.maximum(tl.math.div_rn(x, scale[:, None]), -FP8_MAX), FP8_MAX))
    else:
        y = tl.minimum(tl.maximum(_div_rn_by_row(x, scale), -FP8_MAX), FP8_MAX)
    return y, scale


@triton.jit
def _div_rn_by_row(x, s):
    """x / s[:, None] for a positive normal s per row (GPU only): the steps of the GPU's correctly rounded
    division (an approximate reciprocal, one Newton step, the quotient and one residual correction), with
    the reciprocal worked out once per row instead of once per element and no slow path. The slow path
    serves quotients or numerators below float32's normal range, which e4m3 rounds to zero either way;
    the sign of x is put back so that those zeros keep it, as x / s does. A row whose s is infinite (it
    holds an infinity) gets x * 0, which is x / s there (signed zeros, NaN for an infinite x), as the
    correctly rounded division gives; a row whose s is NaN gets NaN (the reciprocal of NaN)."""
    r = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [s], dtype=tl.float32, is_pure=True, pack=1)
    r = tl.fma(r, tl.fma(-s, r, 1.0), r)[:, None]
    q0 = x * r
    q = tl.fma(r, tl.fma(-s[:, None], q0, x), q0)
    sign = x.to(tl.int32, bitcast=True) & -0x80000000
    q = ((q.to(tl.int32, bitcast=True) & 0x7FFFFFFF) | sign).to(tl.float32, bitcast=True)
    return tl.where((s == float("inf"))[:, None], x * 0.0, q)


@triton.jit
def _quantize_row_tile(x_ptr, q_ptr, s_ptr, row, n_cols, n_groups, x_row_stride, q_row_stride, s_row_stride,
                       GROUP: tl.constexpr, BLOCK: tl.constexpr, GROUPS: tl.constexpr, ROUND: tl.constexpr):
    """GROUPS consecutive groups of one row, from the program's second grid index on."""
    g0 = tl.program_id(1) * GROUPS
    groups = g0 + tl.arange(0, GROUPS)                       # [GROUPS]
    inner = tl.arange(0, BLOCK)                              # [BLOCK]
    cols = groups[:, None] * GROUP + inner[None, :]          # [GROUPS, BLOCK]
    mask = (inner[None, :] < GROUP) & (cols < n_cols) & (groups[:, None] < n_groups)
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    y, scale = fp8_quantize_groups(x, ROUND)                 # [GROUPS, BLOCK], [GROUPS]
    tl.store(q_ptr + row * q_row_stride + cols, y.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row * s_row_stride + groups, scale, mask=groups < n_groups)


@triton.jit(do_not_specialize=["capacity", "slots"])
def _fp8_quant_kernel(x_ptr, q_ptr, s_ptr, n_cols, n_groups, x_row_stride, q_row_stride, s_row_stride,
                      counts_ptr, capacity, slots,
                      GROUP: tl.constexpr, BLOCK: tl.constexpr, GROUPS: tl.constexpr, ROUND: tl.constexpr,
                      COUNTED: tl.constexpr = False):
    """Program (row, g): GROUPS groups of one row. COUNTED: the rows are [L, capacity] blocks of a batched
    layout; program (e * slots + s, g) quantizes rows s, s + slots, ... of block e below its count (counts_ptr),
    and the rows at or past the count are left as they were."""
    if COUNTED:
        block = tl.program_id(0) // slots
        n = tl.minimum(tl.load(counts_ptr + block), capacity)
        # a while loop, not range(): Triton 3.6's interpreter holds program ids and loaded scalars as arrays of
        # one element, which range() refuses
        j = tl.program_id(0) % slots
        while j < n:
            _quantize_row_tile(x_ptr, q_ptr, s_ptr, block.to(tl.int64) * capacity + j, n_cols, n_groups,
                               x_row_stride, q_row_stride, s_row_stride, GROUP, BLOCK, GROUPS, ROUND)
            j += slots
    else:
        _quantize_row_tile(x_ptr, q_ptr, s_ptr, tl.program_id(0).to(tl.int64), n_cols, n_groups, x_row_stride,
                           q_row_stride, s_row_stride, GROUP, BLOCK, GROUPS, ROUND)


COUNTED_ROW_PROGRAMS = 2048    # counted rows: programs along the rows, a few waves on an H100 / H200 ...
COUNTED_SERIAL_ROWS = 16       # ... and more where a program would otherwise walk more rows than this


def counted_slots(num_blocks: int, capacity: int) -> int:
    """Programs per block of a batched layout's counted quantization: COUNTED_ROW_PROGRAMS over the blocks, at
    least enough that none walks more than COUNTED_SERIAL_ROWS of a full capacity, at most one per row. One
    program per row of the capacity (ranks x max_tokens_per_rank behind the low-latency dispatchers) launched
    tens of thousands of programs at decode, nearly all of them past their block's count."""
    return max(1, min(capacity, max(triton.cdiv(capacity, COUNTED_SERIAL_ROWS),
                                    triton.cdiv(COUNTED_ROW_PROGRAMS, max(num_blocks, 1)))))


def fp8_quantize_triton(x: torch.Tensor, group_size: int | None = 128, gpu_rounding: bool | None = None,
                        counts: torch.Tensor | None = None,
                        out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton implementation of `epmoe.fp8_quantize`: x [..., H] -> (q e4m3fn [..., H], scale float32
    [..., ceil(H / group_size)]); group_size None = one scale per row. `gpu_rounding`: the formula's
    GPU-only form (`fp8_quantize_groups` with ROUND=False, as the Gluon GEMM's epilogue runs it) or the
    portable one (False: its own rounding and `div_rn`, what the interpreter runs); None: the GPU form on a
    CUDA tensor. Both give the same bits on a GPU (tests/test_fp8_quantize.py holds them to torch's); the
    portable form's per-element division and rounding made this pass compute-bound on an H200 (1.0 TB/s at
    a deepseek-v3 batch of 8192 tokens, `benchmarks/profile_experts_steps.py`), where it should stream.
    `counts` [L] (x [L, C, H], a batched layout): only the first counts[e] rows of each block e are
    quantized; q and the scales of the rows after are left unwritten (the capacity is the most rows an expert
    can get, often many times those that arrive). `out`: (q, scales) to write into, contiguous, of the shapes
    and dtypes returned (None: new ones)."""
    if gpu_rounding is None:
        gpu_rounding = x.device.type == "cuda"
    if gpu_rounding and x.device.type != "cuda":
        raise ValueError("fp8_quantize_triton: gpu_rounding runs on a CUDA GPU only (the interpreter's cast to "
                         "e4m3 does not round)")
    n_groups = check_quantize_args(x, group_size)
    check_counts(x, counts, "fp8_quantize_triton")
    H = x.shape[-1]
    g = H if group_size is None else group_size
    lead = x.shape[:-1]
    x2 = x.reshape(-1, H)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    if out is None:
        q = torch.empty((M, H), dtype=FP8_DTYPE, device=x.device)
        s = torch.empty((M, n_groups), dtype=torch.float32, device=x.device)
    else:
        q, s = out
        want = ((*x.shape[:-1], H), FP8_DTYPE), ((*x.shape[:-1], n_groups), torch.float32)
        for t, (shape, dtype) in zip((q, s), want):
            if tuple(t.shape) != shape or t.dtype != dtype or t.device != x.device or not t.is_contiguous():
                raise ValueError(f"fp8_quantize_triton: out must be contiguous {list(want[0][0])} {FP8_DTYPE} and "
                                 f"{list(want[1][0])} float32 on {x.device}, got {list(t.shape)} {t.dtype}")
        q, s = q.view(M, H), s.view(M, n_groups)
    if M:
        block = triton.next_power_of_2(g)
        groups = max(1, min(triton.next_power_of_2(n_groups), 4096 // block))
        counted = counts is not None
        slots = counted_slots(x.shape[0], x.shape[1]) if counted else 1
        grid = (x.shape[0] * slots if counted else M, triton.cdiv(n_groups, groups))
        _fp8_quant_kernel[grid](x2, q, s, H, n_groups, x2.stride(0), q.stride(0), s.stride(0),
                                counts.to(torch.int32).contiguous() if counted else s, x.shape[1] if counted else 1,
                                slots, GROUP=g, BLOCK=block, GROUPS=groups, ROUND=not gpu_rounding, COUNTED=counted)
    return q.reshape(*lead, H), s.reshape(*lead, n_groups)


key_callees_first(globals())     # each Triton function keyed after those it calls: one key in every process
