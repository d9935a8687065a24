"""A warp-specialized grouped GEMM for Hopper, written in Gluon: rows laid out expert by expert (every tile
of BLOCK_M rows belongs to one expert), both operands loaded by TMA, block-FP8 or BF16.

Why a second GEMM beside `fused_moe.moe_gemm_kernel`: on sm_90 Triton's automatic pipeline puts a CTA
barrier in every K block and, with block-scaled FP8, drains the tensor cores at each block's promotion to
float32 (the gate+up kernel's tensor pipe at ~49%, its top stall the barrier). `tl.range(warp_specialize=
True)` changes nothing there in Triton 3.6. Gluon states the schedule instead:
- one loader warp issues the TMA loads of the A rows and the expert's weight tile into a ring of
  `STAGES` shared-memory slots, each slot with a "ready" and an "empty" mbarrier (no CTA barrier);
- two math partitions of one warpgroup each (64 rows of the 128-row tile) run the wgmma. In FP8 each
  128-wide K block is multiplied into a fresh product, promoted into the float32 accumulator with the
  row's and the weight block's scales (the library's "sync" numerics: no FP8 accumulation across K
  blocks), and its slot released by each warpgroup's own arrive. While one warpgroup promotes, the
  other's wgmma has the tensor cores: no barrier spans the two (a partition's barriers count its own
  128 threads; `tests/test_ws_grouped_gemm.py` checks the PTX for it);
- registers are moved to the math warps (`maxnreg` and the loader's small budget, `setmaxnreg` in PTX).
The walk is persistent (one program per SM, tiles grouped GROUP_M m-tiles at a time so a weight tile is
read by neighbours while it is in L2); the loader runs ahead into the next tile while the math warps
store the last one.

Operands (`grouped_gemm_ws`): A [M_pad, K] in expert-contiguous, tile-padded rows (`tile_expert[m]` the
expert of m-tile m, -1 for a tile to skip), W [E, N, K], out [M_pad, N] bfloat16. FP8: A e4m3 with
scales `a_scale_t` [ceil(K/128), M_pad] (one per row and 128-wide K block, stored K-block-major so a
tile's scales are one contiguous row), W e4m3 with `w_scale` [E, ceil(N/128), ceil(K/128)].
Gluon is Triton's experimental layer: this runs on CUDA sm_90 only and has no interpreter path; its
compile is checked without a GPU by `compile_ws_gemm_for_hopper`.
"""
from __future__ import annotations

import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

# Triton 3.6 names the TMA load `async_copy_global_to_shared`; later versions `async_load`
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared

SCALE = 128
SCALE_BLOCK = gl.constexpr(SCALE)      # block-FP8 scale granularity along K (activations) and along N and K (weights)


@gluon.jit
def _tile_coords(t, num_m_tiles, num_n_tiles, GROUP_M: gl.constexpr):
    """Tile t of the persistent walk -> (m-tile, n-tile): GROUP_M m-tiles side by side over every n-tile."""
    per_group = GROUP_M * num_n_tiles
    first_m = (t // per_group) * GROUP_M
    rows = gl.minimum(num_m_tiles - first_m, GROUP_M)
    return first_m + (t % per_group) % rows, (t % per_group) // rows


@gluon.jit
def _loader_partition(a_desc, w_desc, a_bufs, w_bufs, ready, empty, tile_expert_ptr, N, num_m_tiles,
                      num_n_tiles, K_BLOCKS, GROUP_M: gl.constexpr):
    BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
    STAGES: gl.constexpr = a_bufs.type.shape[0]
    step = 0
    for t in range(gl.program_id(0), num_m_tiles * num_n_tiles, gl.num_programs(0)):
        m, n = _tile_coords(t, num_m_tiles, num_n_tiles, GROUP_M)
        e = gl.load(tile_expert_ptr + m)
        if e >= 0:
            for kb in range(K_BLOCKS):
                slot = step % STAGES
                # a fresh mbarrier counts as having completed the phase before 0: the first round passes
                mbarrier.wait(empty.index(slot), ((step // STAGES) & 1) ^ 1)
                mbarrier.expect(ready.index(slot), a_desc.block_type.nbytes + w_desc.block_type.nbytes)
                _tma_load(a_desc, [m * BLOCK_M, kb * BLOCK_K], ready.index(slot), a_bufs.index(slot))
                _tma_load(w_desc, [e * N + n * BLOCK_N, kb * BLOCK_K], ready.index(slot), w_bufs.index(slot))
                step += 1


@gluon.jit
def _math_partition(a_bufs, w_bufs, ready, empty, tile_expert_ptr, a_scale_ptr, w_scale_ptr, out_ptr, M_pad, N,
                    num_m_tiles, num_n_tiles, K_BLOCKS, GROUP_M: gl.constexpr, FP8: gl.constexpr,
                    HALF: gl.constexpr):
    """One warpgroup: rows [HALF * 64, HALF * 64 + 64) of every tile. Two of these run side by side; each
    releases a slot with its own arrive (the "empty" barriers count two)."""
    BLOCK_M: gl.constexpr = a_bufs.type.shape[1]
    BLOCK_K: gl.constexpr = a_bufs.type.shape[2]
    BLOCK_N: gl.constexpr = w_bufs.type.shape[1]
    STAGES: gl.constexpr = a_bufs.type.shape[0]
    ROWS: gl.constexpr = BLOCK_M // 2
    INSTR_K: gl.constexpr = 256 // a_bufs.dtype.primitive_bitwidth        # 32 for FP8, 16 for BF16
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, BLOCK_N, INSTR_K])
    row_layout: gl.constexpr = gl.SliceLayout(1, mma_layout)
    col_layout: gl.constexpr = gl.SliceLayout(0, mma_layout)
    n_scale_blocks = gl.cdiv(N, SCALE_BLOCK)
    step = 0
    for t in range(gl.program_id(0), num_m_tiles * num_n_tiles, gl.num_programs(0)):
        m, n = _tile_coords(t, num_m_tiles, num_n_tiles, GROUP_M)
        e = gl.load(tile_expert_ptr + m)
        if e >= 0:
            rows = m * BLOCK_M + HALF * ROWS + gl.arange(0, ROWS, layout=row_layout)
            cols = n * BLOCK_N + gl.arange(0, BLOCK_N, layout=col_layout)
            acc = gl.zeros([ROWS, BLOCK_N], gl.float32, mma_layout)
            if FP8:
                part = gl.zeros([ROWS, BLOCK_N], gl.float32, mma_layout)
                w_scales = w_scale_ptr + (e * n_scale_blocks + (n * BLOCK_N) // SCALE_BLOCK) * K_BLOCKS
                a_scale = gl.load(a_scale_ptr + rows)
                w_scale = gl.load(w_scales)
                for kb in range(K_BLOCKS):
                    slot = step % STAGES
                    mbarrier.wait(ready.index(slot), (step // STAGES) & 1)
                    a_tile = a_bufs.index(slot).slice(HALF * ROWS, ROWS)
                    w_tile = w_bufs.index(slot).permute((1, 0))
                    part = warpgroup_mma(a_tile, w_tile, part, use_acc=False, is_async=True)
                    # the next K block's scales load while the tensor cores work (the last block reloads its own)
                    nxt = gl.minimum(kb + 1, K_BLOCKS - 1)
                    a_scale_next = gl.load(a_scale_ptr + nxt * M_pad + rows)
                    w_scale_next = gl.load(w_scales + nxt)
                    part, _, _ = warpgroup_mma_wait(num_outstanding=0, deps=(part, a_tile, w_tile))
                    mbarrier.arrive(empty.index(slot), count=1)
                    acc += part * (a_scale * w_scale)[:, None]
                    a_scale = a_scale_next
                    w_scale = w_scale_next
                    step += 1
            else:
                prev_slot = 0
                for kb in range(K_BLOCKS):
                    slot = step % STAGES
                    mbarrier.wait(ready.index(slot), (step // STAGES) & 1)
                    a_tile = a_bufs.index(slot).slice(HALF * ROWS, ROWS)
                    w_tile = w_bufs.index(slot).permute((1, 0))
                    acc = warpgroup_mma(a_tile, w_tile, acc, is_async=True)
                    # one product left in flight: the one before it is done, its slot goes back to the loader
                    acc, _, _ = warpgroup_mma_wait(num_outstanding=1, deps=(acc, a_tile, w_tile))
                    mbarrier.arrive(empty.index(prev_slot), count=1, pred=kb > 0)
                    prev_slot = slot
                    step += 1
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
                mbarrier.arrive(empty.index(prev_slot), count=1)
            offs = rows.to(gl.int64)[:, None] * N + cols[None, :]
            gl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=cols[None, :] < N)


@gluon.jit
def ws_grouped_gemm_kernel(a_desc, w_desc, tile_expert_ptr, a_scale_ptr, w_scale_ptr, out_ptr, M_pad, N,
                           num_m_tiles, num_n_tiles, K_BLOCKS, GROUP_M: gl.constexpr, FP8: gl.constexpr,
                           STAGES: gl.constexpr, MATH_REGS: gl.constexpr, LOADER_REGS: gl.constexpr):
    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES] + a_desc.block_type.shape, a_desc.layout)
    w_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES] + w_desc.block_type.shape, w_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)      # one arrive from each math warpgroup
    gl.warp_specialize([
        (_math_partition, (a_bufs, w_bufs, ready, empty, tile_expert_ptr, a_scale_ptr, w_scale_ptr, out_ptr, M_pad, N,
                           num_m_tiles, num_n_tiles, K_BLOCKS, GROUP_M, FP8, 0)),
        (_math_partition, (a_bufs, w_bufs, ready, empty, tile_expert_ptr, a_scale_ptr, w_scale_ptr, out_ptr, M_pad, N,
                           num_m_tiles, num_n_tiles, K_BLOCKS, GROUP_M, FP8, 1)),
        (_loader_partition, (a_desc, w_desc, a_bufs, w_bufs, ready, empty, tile_expert_ptr, N, num_m_tiles,
                             num_n_tiles, K_BLOCKS, GROUP_M)),
    ], [4, 1], [MATH_REGS, LOADER_REGS])


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _gl_dtype(dtype: torch.dtype):
    return {torch.float8_e4m3fn: gl.float8e4nv, torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}[dtype]


def check_operands(a, w, tile_expert, out, a_scale_t, w_scale, block_m=128, block_n=128, block_k=None):
    """The operands' contract (module docstring), refused with a ValueError naming the rule; returns
    (fp8, M_pad, K, E, N, block_k)."""
    fp8 = a.dtype == torch.float8_e4m3fn
    if fp8 != (a_scale_t is not None) or fp8 != (w_scale is not None):
        raise ValueError("grouped_gemm_ws: FP8 operands need a_scale_t and w_scale; BF16 operands take neither")
    if a.dim() != 2 or w.dim() != 3 or a.shape[1] != w.shape[2]:
        raise ValueError(f"grouped_gemm_ws: A [M_pad, K] and W [E, N, K] expected, got {list(a.shape)} and "
                         f"{list(w.shape)}")
    if block_m != 128:
        raise ValueError("grouped_gemm_ws: block_m is 128 (two warpgroups of 64 rows)")
    M_pad, K = a.shape
    E, N, _ = w.shape
    if M_pad % block_m or tile_expert.numel() != M_pad // block_m:
        raise ValueError(f"grouped_gemm_ws: {M_pad} rows are not {tile_expert.numel()} tiles of {block_m}")
    if out.shape != (M_pad, N) or out.dtype != torch.bfloat16:
        raise ValueError(f"grouped_gemm_ws: out must be a bfloat16 [{M_pad}, {N}] tensor")
    block_k = block_k or (128 if fp8 else 64)
    if fp8 and (block_k != SCALE or SCALE % block_n):
        raise ValueError(f"grouped_gemm_ws: block-FP8 needs block_k {SCALE} and block_n dividing it")
    if not (a.is_contiguous() and w.is_contiguous()) or (K * a.element_size()) % 16:
        raise ValueError("grouped_gemm_ws: A and W must be contiguous with rows of a multiple of 16 bytes (TMA)")
    if tile_expert.dtype != torch.int32:
        raise ValueError(f"grouped_gemm_ws: tile_expert must be int32, got {tile_expert.dtype}")
    if fp8:
        kb, nb = triton.cdiv(K, SCALE), triton.cdiv(N, SCALE)
        if a_scale_t.shape != (kb, M_pad) or w_scale.shape != (E, nb, kb) or a_scale_t.dtype != torch.float32 \
                or w_scale.dtype != torch.float32 or not (a_scale_t.is_contiguous() and w_scale.is_contiguous()):
            raise ValueError(f"grouped_gemm_ws: scales must be contiguous float32 a_scale_t [{kb}, {M_pad}] and "
                             f"w_scale [{E}, {nb}, {kb}], got {list(a_scale_t.shape)} {a_scale_t.dtype} and "
                             f"{list(w_scale.shape)} {w_scale.dtype}")
    return fp8, M_pad, K, E, N, block_k


def grouped_gemm_reference(a, w, tile_expert, out, a_scale_t=None, w_scale=None, *, block_m: int = 128,
                           **_tiles) -> torch.Tensor:
    """What `grouped_gemm_ws` computes, in PyTorch (any device): float32 products, in FP8 each 128-wide K
    block promoted with its activation and weight scales, cast to bfloat16 once. Rows of skipped tiles
    are left as they are. The experts backend runs it on the CPU (tests) in place of the kernel."""
    fp8, M_pad, K, E, N, _ = check_operands(a, w, tile_expert, out, a_scale_t, w_scale, block_m)
    for m, e in enumerate(tile_expert.tolist()):
        if e < 0:
            continue
        rows = slice(m * block_m, (m + 1) * block_m)
        x, wt = a[rows].float(), w[e].float()
        if not fp8:
            out[rows] = (x @ wt.T).to(out.dtype)
            continue
        acc = torch.zeros(block_m, N, dtype=torch.float32, device=a.device)
        w_col_scale = w_scale[e].repeat_interleave(SCALE, 0)[:N]          # [N, K blocks]
        for kb in range(triton.cdiv(K, SCALE)):
            cols = slice(kb * SCALE, (kb + 1) * SCALE)
            acc += (x[:, cols] @ wt[:, cols].T) * a_scale_t[kb, rows][:, None] * w_col_scale[:, kb][None, :]
        out[rows] = acc.to(out.dtype)
    return out


def grouped_gemm_ws(a: torch.Tensor, w: torch.Tensor, tile_expert: torch.Tensor, out: torch.Tensor,
                    a_scale_t: torch.Tensor | None = None, w_scale: torch.Tensor | None = None, *,
                    block_m: int = 128, block_n: int = 128, block_k: int | None = None, stages: int = 4,
                    group_m: int = 8, num_programs: int | None = None, math_regs: int = 232,
                    loader_regs: int = 40, maxnreg: int = 168) -> torch.Tensor:
    """out[r] = A[r] @ W[tile_expert[r // block_m]].T for every row r of a tile whose expert is >= 0
    (float32 accumulation, cast once; FP8: each K block of 128 promoted with its scales). See the module
    docstring for the layouts. `maxnreg` bounds every thread (12 warps x 32 x 168 fit one SM's 64K
    registers: one program per SM); the loader's warpgroup gives up all but `loader_regs`."""
    fp8, M_pad, K, E, N, block_k = check_operands(a, w, tile_expert, out, a_scale_t, w_scale, block_m, block_n,
                                                  block_k)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    el = _gl_dtype(a.dtype)
    a_desc = TensorDescriptor.from_tensor(a, [block_m, block_k],
                                          gl.NVMMASharedLayout.get_default_for([block_m, block_k], el))
    w2 = w.reshape(E * N, K)
    w_desc = TensorDescriptor.from_tensor(w2, [block_n, block_k],
                                          gl.NVMMASharedLayout.get_default_for([block_n, block_k], el))
    num_m_tiles, num_n_tiles = M_pad // block_m, triton.cdiv(N, block_n)
    if num_programs is None:
        num_programs = _sm_count(a.device.index if a.device.index is not None else torch.cuda.current_device())
    grid = (max(1, min(num_programs, num_m_tiles * num_n_tiles)),)
    dummy = out
    ws_grouped_gemm_kernel[grid](a_desc, w_desc, tile_expert, a_scale_t if fp8 else dummy,
                                 w_scale if fp8 else dummy, out, M_pad, N, num_m_tiles, num_n_tiles,
                                 triton.cdiv(K, block_k), GROUP_M=group_m, FP8=fp8, STAGES=stages,
                                 MATH_REGS=math_regs, LOADER_REGS=loader_regs, num_warps=4, maxnreg=maxnreg)
    return out


def compile_ws_gemm_for_hopper(fp8: bool, block_m: int = 128, block_n: int = 128, block_k: int | None = None,
                               stages: int = 4, math_regs: int = 232, loader_regs: int = 40, maxnreg: int = 168):
    """The kernel compiled for sm_90 without a GPU (Triton's bundled ptxas): for resource checks
    (registers, spills, shared memory) and for reading its PTX (`setmaxnreg`, wgmma, TMA)."""
    from triton.experimental.gluon._runtime import GluonASTSource
    from .xcompile import compile_source_for_hopper
    block_k = block_k or (128 if fp8 else 64)
    el = "fp8e4nv" if fp8 else "bf16"
    fn = ws_grouped_gemm_kernel
    gl_el = gl.float8e4nv if fp8 else gl.bfloat16

    def desc(rows):
        layout = gl.NVMMASharedLayout.get_default_for([rows, block_k], gl_el)
        return f"tensordesc<{el}[{rows}, {block_k}],{layout!r}>"

    types = {"a_desc": desc(block_m), "w_desc": desc(block_n),
             "tile_expert_ptr": "*i32", "a_scale_ptr": "*fp32", "w_scale_ptr": "*fp32", "out_ptr": "*bf16",
             "M_pad": "i32", "N": "i32", "num_m_tiles": "i32", "num_n_tiles": "i32", "K_BLOCKS": "i32"}
    const = {"GROUP_M": 8, "FP8": fp8, "STAGES": stages, "MATH_REGS": math_regs, "LOADER_REGS": loader_regs}
    names = fn.arg_names
    sig = {name: types.get(name, "constexpr") for name in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in ("tile_expert_ptr", "a_scale_ptr", "w_scale_ptr",
                                                                     "out_ptr", "M_pad", "N")}
    src = GluonASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in const.items()}, attrs=attrs)
    return compile_source_for_hopper(src, {"num_warps": 4, "maxnreg": maxnreg})
