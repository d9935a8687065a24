"""`batched`: experts on the batched layout (`x [L, C, H]` + `counts [L]`), e.g. from `low_latency`.

The pure-PyTorch path is a masked batched matmul: both GEMMs run as `torch.bmm` over every expert's
whole capacity (static shapes, no host sync, CUDA-graph safe; the activation in float32 between them,
biases added in float32; float16 operands scaled per row as `gemm_rows` says), and rows at or past an expert's count are set to exactly zero with a
`torch.where`, so whatever the padding rows held (they are never written by the dispatcher, and may be
NaN) never reaches an output. Outputs are unweighted: the dispatcher's combine applies the routing
weights. The cost is that of the full capacity, whatever the counts; on CUDA with Triton the batched
kernel (`epmoe.kernels.batched_moe`) runs instead: it computes and writes only the rows below each count
(the rows past them are left unwritten: the layout's contract leaves them unspecified, and the combine
reads only the real rows), with tiles chosen for the batch's `num_tokens` where the dispatcher gives it.
This path stays the portable one (and the one it is tested against).

FP8 (W8A8) runs in the Triton kernel only, on a GPU with FP8 matrix units (compute capability 8.9+):
weights as `Fp8Scheme` stores them (128x128 block scales, or one scale per output row for the
per-channel and per-tensor formats), activations per token-group of 128 or per token. The experts take
FP8 rows with their scales (`TAKES_FP8`): FP8 dispatch on `low_latency` hands its rows and per-row scales
straight in, and without it the layer quantizes right after dispatch (the one formula, same bits). The
contract refuses FP8 elsewhere (the CPU, no Triton, an older GPU, other block/group sizes) through
`quant_problem`, so a layer that builds runs the kernel. Nothing is read back to the host on this path
either, and it captures in a CUDA graph.
"""
from __future__ import annotations

import torch

from ..contract import TAKES_FP8, ExpertsCaps
from ..layouts import BATCHED, BatchedBatch, ExpertWeights
from ..registry import register_experts
from ..sizes import scale_groups
from ..activations import gated_activation_fused
from .base import Experts, gemm_rows, scale_back
from .triton import FP8_KINDS
from .triton import _quant_problem as _triton_fp8_problem


def batched_experts_torch(x: torch.Tensor, counts: torch.Tensor, w: ExpertWeights, activation: str,
                          out_dtype: torch.dtype) -> torch.Tensor:
    """[L, C, H] rows, [L] counts -> [L, C, H] unweighted expert outputs, zero past each count."""
    L, C, _ = x.shape
    x_rows, x_factor = gemm_rows(x, x.dtype)
    h = scale_back(torch.bmm(x_rows, w.w13.transpose(1, 2)), x_factor)  # [L, C, 2I] float32
    if w.b13 is not None:
        h = h + w.b13.float().unsqueeze(1)
    a, a_factor = gemm_rows(gated_activation_fused(activation, h), x.dtype)
    y = torch.bmm(a, w.w2.transpose(1, 2))                                # [L, C, H]
    if a_factor is not None:
        y = scale_back(y, a_factor)
    if w.b2 is not None:
        y = y.float() + w.b2.float().unsqueeze(1)
    real = torch.arange(C, device=x.device).unsqueeze(0) < counts.to(x.device).unsqueeze(1)   # [L, C]
    return torch.where(real.unsqueeze(2), y, 0.0).to(out_dtype)


def _quant_problem(scheme, device_type: str) -> str | None:
    """FP8 on the batched layout is the Triton batched kernel: a CUDA GPU with FP8 matrix units, 128x128
    weight blocks or per-row weight scales, activations per token or per group of 128 columns."""
    if scheme.kind == "none":
        return None
    why = _triton_fp8_problem(scheme, device_type)
    if why:
        return f"FP8 on the batched layout runs only in the Triton batched kernel ({why})"
    return None


@register_experts("batched")
class BatchedExperts(Experts):
    CAPS = ExpertsCaps(layouts=frozenset({BATCHED}), quant=frozenset({"none"}) | FP8_KINDS,
                       fp8_activations=TAKES_FP8, cuda_graph_safe=True, auto_priority=2,
                       summary="masked batched matmul over each expert's capacity on the batched layout (Triton "
                               "kernel skipping the padding on CUDA, torch.bmm elsewhere); FP8 W8A8 in the Triton "
                               "kernel on CUDA only; static shapes, CUDA-graph safe",
                       quant_problem=_quant_problem)

    def __init__(self, plan, device: torch.device | None = None):
        super().__init__(plan, device)
        why = _quant_problem(self.plan.scheme, "cuda")
        if why:
            raise ValueError(f"experts 'batched' cannot run this FP8 layer: {why}")

    def forward_batched(self, batch: BatchedBatch, weights: ExpertWeights) -> torch.Tensor:
        plan = self.plan
        if weights.num_local_experts != batch.x.shape[0]:
            raise ValueError(f"experts 'batched': the batch has {batch.x.shape[0]} experts, the weights "
                             f"{weights.num_local_experts}")
        if plan.fp8:
            return self._forward_fp8(batch, weights)
        if batch.x.is_cuda and _triton_kernel_ready():   # the Triton kernel skips the empty capacity rows
            from ..kernels.batched_moe import batched_experts
            return batched_experts(batch.x.contiguous(), batch.counts, weights.w13, weights.w2, plan.activation,
                                   top_k=plan.top_k, b13=weights.b13, b2=weights.b2, out_dtype=plan.dtype,
                                   num_tokens=batch.num_tokens)
        return batched_experts_torch(batch.x, batch.counts, weights, plan.activation, plan.dtype)

    def fp8_operands(self, batch: BatchedBatch, weights: ExpertWeights):
        """(FP8 rows [L, C, H], the kernel's `Fp8Operands`) for a batch of an FP8 layer as the experts take
        it (`activations_for`: FP8 rows with their scales [L, C, groups] float32, from FP8 dispatch or the
        conversion after dispatch; the rows past each count and their scales may hold anything, NaN included:
        the kernel never lets one reach an output)."""
        from ..kernels.fused_moe import Fp8Operands
        plan = self.plan
        if weights.w13_scale is None or weights.w2_scale is None:
            raise ValueError("experts 'batched': an FP8 layer needs w13_scale and w2_scale beside its weights")
        x, x_scale = batch.x, batch.scales
        if x.dtype != torch.float8_e4m3fn or x_scale is None:
            raise ValueError(f"experts 'batched': FP8 operands need float8_e4m3fn rows with their scales (the "
                             f"batch as `activations_for` gives it), got {x.dtype} rows"
                             f"{' without their scales' if x_scale is None else ''}")
        L, C, H = x.shape
        groups = scale_groups(H, plan.act_group)
        if tuple(x_scale.shape) != (L, C, groups):
            raise ValueError(f"experts 'batched': FP8 rows [{L}, {C}, {H}] need scales [{L}, {C}, {groups}] "
                             f"({plan.scheme.name}), got {list(x_scale.shape)}")
        return x, Fp8Operands(x_scale=x_scale.float().contiguous(), w13_scale=weights.w13_scale,
                              w2_scale=weights.w2_scale, act_group=plan.act_group, weight_block=plan.weight_block,
                              granularity=plan.weight_granularity)

    def _forward_fp8(self, batch: BatchedBatch, weights: ExpertWeights) -> torch.Tensor:
        if not batch.x.is_cuda:
            raise ValueError(f"experts 'batched' run FP8 only on CUDA (the Triton batched kernel), got rows on "
                             f"{batch.x.device}")
        from ..kernels.batched_moe import batched_experts
        plan = self.plan
        x, fp8 = self.fp8_operands(batch, weights)
        return batched_experts(x.contiguous(), batch.counts, weights.w13, weights.w2, plan.activation,
                               top_k=plan.top_k, b13=weights.b13, b2=weights.b2, out_dtype=plan.dtype, fp8=fp8,
                               num_tokens=batch.num_tokens)


def _triton_kernel_ready() -> bool:
    from ..kernels import triton_problem
    return triton_problem("cuda") is None
