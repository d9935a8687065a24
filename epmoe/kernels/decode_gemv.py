"""The decode path of the flat layout: a few tokens, every (token, expert) pair a matrix-vector product.

At T = 1 (and a few tokens more) the experts' time is the time to read the weights of the experts hit.
The tile kernels of `fused_moe` spend it badly there: a tile of BLOCK_M >= 16 rows holds one real row,
the grid has about as many programs as SMs (qwen3-30b-a3b T = 1: 96 gate+up programs on 132 SMs), and a
third launch sums the k outputs. This path is two launches and no tensor cores:

    gate_up   one program per (pair, BLOCK_N columns of I): gate and up rows of w13 streamed against
              the token's row, float32 sums, bias and activation -> h [pairs, I] (in
              `intermediate_dtype`, as the tile path stores it)
    down_sum  one program per (token, BLOCK_N columns of H): the w2[e] rows of all the token's local
              slots against h[pair], float32 per slot, weighted by the routing weights and summed
              -> out [T, H]

Both loops hold a float32 partial product and reduce it once at the end. Triton pipelines plain loads
only when the loop asks (`tl.range(..., num_stages=)`): with NUM_STAGES > 1 the next K blocks are in
flight (cp.async into shared memory) while this one is summed; with 1, a program waits out the memory
latency once per K block, and only the programs an SM holds hide it. A slot whose expert is not local
(-1) or out of range is skipped by masks (its weights are never read). The sum of a token's slots is a
fixed reduction in one program: deterministic, and one rounding to the output dtype.

PDL (`GemvConfig.pdl`, Hopper and later): the down kernel is launched as a programmatic dependent of
gate_up, which lets it start as soon as every gate_up program has started. Its weights do not depend on
gate_up, so before `griddepcontrol.wait` each program asks L2 to prefetch its w2 rows (it already knows
the experts: the routing was written before gate_up began); it reads h only after the wait. So the
down weights stream in while gate_up finishes, instead of after a kernel boundary.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .epilogues import ACTIVATION_CODES, _fp8_quantize_rows, _gated_activation, intermediate_dtype
from .tuning_table import GemvConfig
from .jit_keys import key_callees_first


@triton.jit
def _prefetch_l2(ptrs):
    """Ask L2 to fetch the line of each address (no value comes back)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit(do_not_specialize=["num_experts"])
def gemv_gate_up_kernel(x_ptr, w_ptr, bias_ptr, ids_ptr, h_ptr, x_scale_ptr, w_scale_ptr, num_experts,
                        H: tl.constexpr, I: tl.constexpr, TOP_K: tl.constexpr, ACTIVATION: tl.constexpr,
                        HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        NUM_STAGES: tl.constexpr, USE_PDL: tl.constexpr,
                        FP8: tl.constexpr = False, W_SCALE_PER_BLOCK: tl.constexpr = False):
    """h[pair, n] = act(w13[e, n] . x[token], w13[e, I + n] . x[token]) for BLOCK_N columns n.

    FP8 (x and w13 in e4m3, H and I multiples of 128, BLOCK_N dividing 128): x scaled per group of 128
    columns, w13 per 128x128 block (W_SCALE_PER_BLOCK: folded into the x vector, one factor per column
    of each half) or per output row (applied to the sums); h is written in float32 for the down kernel
    to quantize per group, as the tile path's epilogue does."""
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()     # the down kernel may start (it waits before reading h)
    pair = tl.program_id(0)
    expert = tl.load(ids_ptr + pair).to(tl.int32)
    if (expert < 0) | (expert >= num_experts):
        return
    token = (pair // TOP_K).to(tl.int64)
    EVEN_K: tl.constexpr = H % BLOCK_K == 0
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < I
    offs_nw = tl.minimum(offs_n, I - 1)          # rows past I read row I - 1 (dropped at the store)
    offs_k = tl.arange(0, BLOCK_K)
    g_ptrs = w_ptr + expert.to(tl.int64) * (2 * I * H) + offs_nw[:, None] * H + offs_k[None, :]
    x_ptrs = x_ptr + token * H + offs_k
    if FP8:
        GROUPS: tl.constexpr = H // 128       # exact: the decode path takes FP8 only where H and I are multiples of 128
        xs_ptrs = x_scale_ptr + token * GROUPS + offs_k // 128
        if W_SCALE_PER_BLOCK:     # [L, 2I / 128, H / 128]: this tile's gate rows and up rows are one block each
            ws_g_ptrs = w_scale_ptr + expert.to(tl.int64) * (2 * I // 128 * GROUPS) \
                + (tl.program_id(1) * BLOCK_N // 128) * GROUPS + offs_k // 128
            ws_u_ptrs = ws_g_ptrs + (I // 128) * GROUPS
    acc_g = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for kb in tl.range(0, tl.cdiv(H, BLOCK_K), num_stages=NUM_STAGES):
        if EVEN_K:
            xv = tl.load(x_ptrs).to(tl.float32)
            wg = tl.load(g_ptrs)
            wu = tl.load(g_ptrs + I * H)
        else:
            k_in = offs_k < H - kb * BLOCK_K
            xv = tl.load(x_ptrs, mask=k_in, other=0.0).to(tl.float32)
            wg = tl.load(g_ptrs, mask=k_in[None, :], other=0.0)
            wu = tl.load(g_ptrs + I * H, mask=k_in[None, :], other=0.0)
        xg = xv
        xu = xv
        if FP8:       # scales of the columns past H are never read (they lie past the scale rows)
            s_in = offs_k < H - kb * BLOCK_K
            xg = xv * tl.load(xs_ptrs + kb * (BLOCK_K // 128), mask=s_in, other=0.0)
            xu = xg
            if W_SCALE_PER_BLOCK:
                xu = xg * tl.load(ws_u_ptrs + kb * (BLOCK_K // 128), mask=s_in, other=0.0)
                xg = xg * tl.load(ws_g_ptrs + kb * (BLOCK_K // 128), mask=s_in, other=0.0)
        acc_g += wg.to(tl.float32) * xg[None, :]
        acc_u += wu.to(tl.float32) * xu[None, :]
        x_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
    g = tl.sum(acc_g, axis=1)
    u = tl.sum(acc_u, axis=1)
    if FP8 and not W_SCALE_PER_BLOCK:     # one scale per output row (channel, or a tensor scale repeated)
        g = g * tl.load(w_scale_ptr + expert * (2 * I) + offs_nw)
        u = u * tl.load(w_scale_ptr + expert * (2 * I) + I + offs_nw)
    if HAS_BIAS:
        g += tl.load(bias_ptr + expert * (2 * I) + offs_nw)
        u += tl.load(bias_ptr + expert * (2 * I) + I + offs_nw)
    act = _gated_activation(g, u, ACTIVATION)
    tl.store(h_ptr + pair.to(tl.int64) * I + offs_n, act.to(h_ptr.dtype.element_ty), mask=n_mask)


@triton.jit(do_not_specialize=["num_experts"])
def gemv_down_sum_kernel(h_ptr, w_ptr, bias_ptr, ids_ptr, weights_ptr, out_ptr, w_scale_ptr, num_experts,
                         H: tl.constexpr, I: tl.constexpr, TOP_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
                         USE_PDL: tl.constexpr, PREFETCH_LINES: tl.constexpr, LINE_ELEMS: tl.constexpr,
                         FP8: tl.constexpr = False, W_SCALE_PER_BLOCK: tl.constexpr = False):
    """out[t, n] = sum over the token's local slots j of weight[j] * (w2[e_j, n] . h[pair_j] + b2[e_j, n]).

    All k slots are loaded together ([slots, BLOCK_N, BLOCK_K] per K block): k times the bytes in flight
    of a slot-by-slot loop, which a kernel with H / BLOCK_N programs needs to keep HBM busy.

    FP8 (w2 in e4m3, BLOCK_K a multiple of 128): h arrives in float32 and is quantized here per group of
    128 columns with the one formula (what the tile path's gate+up epilogue stores), then dequantized
    into the vector the weights are streamed against; w2's block scales are folded in the same way."""
    t = tl.program_id(0).to(tl.int64)
    SLOTS: tl.constexpr = triton.next_power_of_2(TOP_K)
    offs_s = tl.arange(0, SLOTS)
    pairs = t * TOP_K + tl.minimum(offs_s, TOP_K - 1)
    experts = tl.load(ids_ptr + pairs).to(tl.int32)
    here = (offs_s < TOP_K) & (experts >= 0) & (experts < num_experts)
    k_limit = tl.where(here, I, 0)                 # a slot not here reads nothing
    experts = tl.where(here, experts, 0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_nw = tl.minimum(offs_n, H - 1)
    offs_k = tl.arange(0, BLOCK_K)
    h_ptrs = h_ptr + pairs[:, None] * I + offs_k[None, :]
    w_ptrs = w_ptr + experts[:, None, None] * (H * I) + offs_nw[None, :, None] * I + offs_k[None, None, :]
    if USE_PDL:
        if PREFETCH_LINES > 0:    # this program's w2 rows into L2 (one address per 128-byte line)
            line = tl.minimum(tl.arange(0, PREFETCH_LINES) * LINE_ELEMS, I - 1)
            rows = w_ptr + experts[:, None, None] * (H * I) + offs_nw[None, :, None] * I + line[None, None, :]
            _prefetch_l2(tl.where(here[:, None, None], rows, w_ptr))
        tl.extra.cuda.gdc_wait()                  # gate_up has finished: h is complete
    if FP8 and W_SCALE_PER_BLOCK:     # [L, H / 128, I / 128]: this tile's rows are one block
        ws_ptrs = w_scale_ptr + experts[:, None] * ((H // 128) * (I // 128)) \
            + (tl.program_id(1) * BLOCK_N // 128) * (I // 128) + offs_k[None, :] // 128
    acc = tl.zeros((SLOTS, BLOCK_N), dtype=tl.float32)
    for kb in tl.range(0, tl.cdiv(I, BLOCK_K), num_stages=NUM_STAGES):
        k_in = offs_k[None, :] < (k_limit - kb * BLOCK_K)[:, None]
        hv = tl.load(h_ptrs, mask=k_in, other=0.0).to(tl.float32)
        if FP8:
            q, scale = _fp8_quantize_rows(tl.reshape(hv, (SLOTS * (BLOCK_K // 128), 128)))
            hv = tl.reshape(q.to(tl.float32) * scale[:, None], (SLOTS, BLOCK_K))
            if W_SCALE_PER_BLOCK:
                hv = hv * tl.load(ws_ptrs + kb * (BLOCK_K // 128), mask=k_in, other=0.0)
        w = tl.load(w_ptrs, mask=k_in[:, None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * hv[:, None, :], axis=2)
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if FP8 and not W_SCALE_PER_BLOCK:
        acc = acc * tl.load(w_scale_ptr + experts[:, None] * H + offs_nw[None, :])
    if HAS_BIAS:
        acc += tl.load(bias_ptr + experts[:, None] * H + offs_nw[None, :],
                       mask=offs_n[None, :] < tl.where(here, H, 0)[:, None], other=0.0)
    weight = tl.where(here, tl.load(weights_ptr + pairs), 0.0)
    out = tl.sum(acc * weight[:, None], axis=0)
    tl.store(out_ptr + t * H + offs_n, out.to(out_ptr.dtype.element_ty), mask=offs_n < H)


def pdl_available(device: torch.device) -> bool:
    """Programmatic dependent launch: a CUDA GPU of compute capability 9.0 or later (not the interpreter)."""
    return (device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1"
            and torch.cuda.get_device_capability(device)[0] >= 9)


def fp8_supported(fp8, hidden: int, inter: int) -> bool:
    """The FP8 formats the decode path takes: activations per group of 128 (DeepSeek-V3 style), weights
    per 128x128 block or per output row, H and I multiples of 128. Others run the tile kernels."""
    return (fp8.act_group == 128 and fp8.weight_block in (None, (128, 128))
            and hidden % 128 == 0 and inter % 128 == 0)


def _fp8_meta(fp8, gemv: GemvConfig) -> dict:
    if fp8 is None:
        return {"FP8": False, "W_SCALE_PER_BLOCK": False}
    if gemv.gate_up_k % 128 or gemv.down_k % 128 or 128 % gemv.gate_up_n or 128 % gemv.down_n:
        raise ValueError(f"decode path, FP8: K tiles must be multiples of 128 and N tiles divide 128, got "
                         f"{gemv.describe()}")
    return {"FP8": True, "W_SCALE_PER_BLOCK": fp8.weight_block is not None}


def launch_gemv_gate_up(x, w13, b13, ids_flat, h, top_k: int, activation: str, gemv: GemvConfig,
                        fp8=None) -> None:
    """h [N * k, I] from x [N, H] and w13 [L, 2I, H] (x's dtype; float32 with `fp8`, an Fp8Operands);
    rows of slots not here left unwritten."""
    L, two_i, H = w13.shape
    inter = two_i // 2
    gemv_gate_up_kernel[(ids_flat.numel(), triton.cdiv(inter, gemv.gate_up_n))](
        x, w13, x if b13 is None else b13, ids_flat, h, x if fp8 is None else fp8.x_scale,
        x if fp8 is None else fp8.w13_scale, L,
        H=H, I=inter, TOP_K=top_k, ACTIVATION=ACTIVATION_CODES[activation], HAS_BIAS=b13 is not None,
        BLOCK_N=gemv.gate_up_n, BLOCK_K=gemv.gate_up_k, NUM_STAGES=gemv.gate_up_stages,
        USE_PDL=gemv.pdl and pdl_available(x.device), num_warps=gemv.gate_up_warps, **_fp8_meta(fp8, gemv))


def launch_gemv_down(h, w2, b2, ids_flat, weights_flat, out, top_k: int, gemv: GemvConfig, fp8=None) -> None:
    """out [N, H] from h [N * k, I], w2 [L, H, I] and the routing weights [N * k] (float32)."""
    L, H, inter = w2.shape
    pdl = gemv.pdl and pdl_available(h.device)
    line_elems = 128 // w2.element_size()
    extra = {"launch_pdl": True} if pdl else {}
    gemv_down_sum_kernel[(out.shape[0], triton.cdiv(H, gemv.down_n))](
        h, w2, out if b2 is None else b2, ids_flat, weights_flat, out, out if fp8 is None else fp8.w2_scale, L,
        H=H, I=inter, TOP_K=top_k, HAS_BIAS=b2 is not None,
        BLOCK_N=gemv.down_n, BLOCK_K=gemv.down_k, NUM_STAGES=gemv.down_stages, USE_PDL=pdl,
        PREFETCH_LINES=triton.next_power_of_2(triton.cdiv(inter, line_elems)) if pdl else 0,
        LINE_ELEMS=line_elems, num_warps=gemv.down_warps, **_fp8_meta(fp8, gemv), **extra)


def gemv_experts(x: torch.Tensor, ids_flat: torch.Tensor, weights_flat: torch.Tensor, w13: torch.Tensor,
                 w2: torch.Tensor, b13: torch.Tensor | None, b2: torch.Tensor | None, activation: str,
                 out: torch.Tensor, top_k: int, gemv: GemvConfig, fp8=None) -> torch.Tensor:
    """The decode path into `out` [N, H]: x [N, H], ids_flat [N * k] local expert ids (-1: not here),
    weights_flat [N * k] float32, w13 [L, 2I, H], w2 [L, H, I], biases float32 or None; `fp8` (an
    Fp8Operands that `fp8_supported` accepts): x and the weights in e4m3 with their scales."""
    h = torch.empty(ids_flat.numel(), w13.shape[1] // 2,
                    dtype=intermediate_dtype(x.dtype) if fp8 is None else torch.float32, device=x.device)
    launch_gemv_gate_up(x, w13, b13, ids_flat, h, top_k, activation, gemv, fp8)
    launch_gemv_down(h, w2, b2, ids_flat, weights_flat, out, top_k, gemv, fp8)
    return out


key_callees_first(globals())     # each Triton function keyed after those it calls: one key in every process
