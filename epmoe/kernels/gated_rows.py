"""The activation between two expert GEMMs that are not fused with it (the `grouped_mm` backend): rows of
the gate+up output [P, 2I] (gate columns first, then up) -> act(gate + bias, up + bias) [P, I] in one pass,
written in the next GEMM's operand dtype, or quantized to e4m3fn with the one formula (`fp8_quantize_groups`:
one scale per row, or per group of columns of a row).

In PyTorch the same is a float32 copy of the [P, 2I] rows, the bias, the activation's elementwise passes
and, for FP8, a reduction and a quantization pass over a float32 [P, I]; here each row's gate+up values are
read once and only the operand the next GEMM takes is written. Runs on CUDA, and on CPU tensors under the
Triton interpreter (`TRITON_INTERPRET=1`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .epilogues import ACTIVATION_CODES, _gated_activation
from .fp8_format import FP8_DTYPE
from .fp8_quant import fp8_quantize_groups
from .jit_keys import key_callees_first

PLAIN_COLUMNS = 1024      # columns per program when not quantizing (no group to keep together)


@triton.jit
def gated_rows_kernel(h_ptr, bias_ptr, expert_ptr, out_ptr, scale_ptr, I, n_groups,
                      ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, QUANT: tl.constexpr,
                      GROUP: tl.constexpr, BLOCK: tl.constexpr, GROUPS: tl.constexpr):
    """One program: GROUPS consecutive groups of GROUP columns of one row (BLOCK = GROUP rounded up to a
    power of two). QUANT: each group quantized with its own scale (a group of I columns: one per row)."""
    row = tl.program_id(0).to(tl.int64)
    groups = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    inner = tl.arange(0, BLOCK)
    cols = groups[:, None] * GROUP + inner[None, :]                         # [GROUPS, BLOCK]
    mask = (inner[None, :] < GROUP) & (cols < I) & (groups[:, None] < n_groups)
    g = tl.load(h_ptr + row * (2 * I) + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(h_ptr + row * (2 * I) + I + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        e = tl.load(expert_ptr + row).to(tl.int64)
        g += tl.load(bias_ptr + e * (2 * I) + cols, mask=mask, other=0.0)
        u += tl.load(bias_ptr + e * (2 * I) + I + cols, mask=mask, other=0.0)
    a = tl.where(mask, _gated_activation(g, u, ACTIVATION), 0.0)            # masked columns change no amax
    if QUANT:
        a, scale = fp8_quantize_groups(a)
        tl.store(scale_ptr + row * n_groups + groups, scale, mask=groups < n_groups)
    tl.store(out_ptr + row * I + cols, a.to(out_ptr.dtype.element_ty), mask=mask)


def gated_rows(h: torch.Tensor, activation: str, out_dtype: torch.dtype, bias: torch.Tensor | None = None,
               expert_of_row: torch.Tensor | None = None, quant_group: int | None = 0
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """h [P, 2I] (any float dtype, contiguous) -> (act [P, I], scales or None).

    bias [L, 2I] float32 with expert_of_row [P] (the expert of each row, in [0, L)): added to gate and up
    first. quant_group 0: act in `out_dtype`, no scales; else e4m3fn and float32 scales as
    `epmoe.fp8_quantize(act, quant_group)` gives them: None, one per row (scales [P, 1]); g > 0, one per
    group of g columns (scales [P, ceil(I / g)]).
    """
    if h.dim() != 2 or h.shape[1] % 2 or not h.is_contiguous():
        raise ValueError(f"gated_rows: h must be a contiguous [P, 2I] tensor, got {list(h.shape)}")
    if (bias is None) != (expert_of_row is None):
        raise ValueError("gated_rows: bias and expert_of_row go together")
    P, I = h.shape[0], h.shape[1] // 2
    quant = quant_group != 0
    group = (I if quant_group is None else quant_group) if quant else PLAIN_COLUMNS
    n_groups = triton.cdiv(I, group) if I else 0
    out = torch.empty(P, I, dtype=FP8_DTYPE if quant else out_dtype, device=h.device)
    scales = None
    if quant:
        scales = torch.empty((P, n_groups), dtype=torch.float32, device=h.device)
    if P and I:
        block = triton.next_power_of_2(min(group, I))
        group = min(group, I) if not quant or quant_group is None else group
        per_program = max(1, min(triton.next_power_of_2(n_groups), 4096 // block))
        grid = (P, triton.cdiv(n_groups, per_program))
        warps = min(16, max(4, block * per_program // 512))    # a row of 16384 columns: 32 per thread
        gated_rows_kernel[grid](h, h if bias is None else bias.float().contiguous(),
                                h if expert_of_row is None else expert_of_row.contiguous(), out,
                                h if scales is None else scales, I, n_groups,
                                ACTIVATION=ACTIVATION_CODES[activation], HAS_BIAS=bias is not None, QUANT=quant,
                                GROUP=group, BLOCK=block, GROUPS=per_program, num_warps=warps)
    return out, scales


key_callees_first(globals())     # each Triton function keyed after those it calls: one key in every process
