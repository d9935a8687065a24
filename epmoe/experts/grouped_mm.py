"""`grouped_mm`: experts through `torch._grouped_mm` (CUTLASS on Hopper, a loop on the CPU).

Pairs are sorted by expert on the device (no host sync), both GEMMs run grouped over the experts'
segments, the activation runs in float32 between them, and each token's k outputs are summed in
float32 with their routing weights. In float16 the GEMM operands are scaled per row by a power of two
(`gemm_rows`), so an intermediate past 65504 does not become Inf.

FP8 layers (CUDA, compute capability 9.0+): both GEMMs through `torch._scaled_grouped_mm`, which takes
row-wise float32 scales only, so it runs per-channel or per-tensor weights with per-token activations
(FP8 rows with their scales in; the intermediate activation quantized per token with the same formula;
BF16 out). Block-scaled weights are refused at build time and run on other experts.

On CUDA two steps between and after the GEMMs are one Triton pass each: the bias, activation and cast
(FP8: quantization) of the gate+up rows (`gated_rows`; float16 layers keep the PyTorch path, whose rows
are scaled to stay in range), and each token's k outputs gathered from the expert-ordered rows and summed
with their routing weights (`gather_sum`: float32, slots in order, absent slots skipped), instead of a
scatter back to pair order followed by the weighted sum's separate passes.
"""
from __future__ import annotations

import torch

from ..contract import TAKES_FP8, ExpertsCaps
from ..layouts import FLAT, ExpertWeights, FlatBatch
from ..registry import register_experts
from ..activations import gated_activation_fused
from .base import Experts, gemm_rows, scale_back, sort_pairs_by_expert, weighted_sum_of_slots


def _grouped_mm_problem(device_type: str) -> str | None:
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    if device_type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 0):
        return "torch._grouped_mm needs a GPU of compute capability 8.0 or newer"
    if device_type == "cpu":
        try:
            torch._grouped_mm(torch.ones(2, 8), torch.ones(1, 8, 8), offs=torch.tensor([2], dtype=torch.int32))
        except (RuntimeError, NotImplementedError) as exc:
            return f"torch {torch.__version__} has no CPU torch._grouped_mm ({str(exc).splitlines()[0]})"
    return None


def _scaled_grouped_mm_problem(scheme, device_type: str) -> str | None:
    """Why `torch._scaled_grouped_mm` cannot run this FP8 scheme here (None: it can)."""
    if device_type != "cuda":
        return "torch._scaled_grouped_mm runs only on CUDA GPUs (compute capability 9.0+)"
    if not hasattr(torch, "_scaled_grouped_mm"):
        return f"torch {torch.__version__} has no torch._scaled_grouped_mm"
    if torch.cuda.is_available() and torch.cuda.get_device_capability() < (9, 0):
        return "torch._scaled_grouped_mm needs compute capability 9.0 or newer"
    if scheme.config.activation != "per_token":
        return ("torch._scaled_grouped_mm scales whole rows: it needs activation='per_token', not "
                f"{scheme.config.activation!r}")
    if scheme.dtype != torch.bfloat16:
        return f"torch._scaled_grouped_mm writes bfloat16 only; the layer's dtype is {scheme.dtype}"
    return None


def sum_sorted_outputs(y_sorted: torch.Tensor, order: torch.Tensor, batch: FlatBatch, num_local: int,
                       out_dtype: torch.dtype, use_kernel: bool) -> torch.Tensor:
    """[N*k, H] outputs in expert order (`order` from `sort_pairs_by_expert`: row i is pair order[i]) ->
    [N, H]: each token's sum over its slots of weight * output, in float32, cast once. Slots whose expert
    is not in [0, num_local) contribute nothing, whatever their rows hold. `use_kernel`: one Triton pass
    reading each pair's row where it lies (`gather_sum`); else a scatter to pair order, then PyTorch."""
    if not use_kernel:
        y_pairs = torch.empty_like(y_sorted)
        y_pairs[order] = y_sorted
        return weighted_sum_of_slots(y_pairs, batch, out_dtype)
    from ..kernels.token_rows import gather_sum
    n, k = batch.local_ids.shape
    position = torch.empty_like(order)           # pair -> its row in expert order
    position[order] = torch.arange(order.numel(), dtype=order.dtype, device=order.device)
    ids = batch.local_ids.reshape(-1)
    index = torch.where((ids >= 0) & (ids < num_local), position, torch.full_like(position, -1)).view(n, k)
    status = torch.zeros(1, dtype=torch.int32, device=y_sorted.device)
    return gather_sum(y_sorted, index, batch.weights.float(), status, out_dtype)


@register_experts("grouped_mm")
class GroupedMMExperts(Experts):
    CAPS = ExpertsCaps(layouts=frozenset({FLAT}), cuda_graph_safe=True, reads_strided_rows=True, auto_priority=3,
                       quant=frozenset({"none", "fp8_channel", "fp8_tensor"}), fp8_activations=TAKES_FP8,
                       summary="torch._grouped_mm over expert segments sorted on the device "
                               "(FP8: torch._scaled_grouped_mm, row-wise scales)",
                       available=_grouped_mm_problem, quant_problem=_scaled_grouped_mm_problem)

    # None: the slot sum in one Triton pass on CUDA where Triton runs, PyTorch ops elsewhere; True/False
    # force a path (tests run the kernel on CPU tensors under TRITON_INTERPRET=1)
    use_kernels: bool | None = None

    _triton_on_cuda: bool | None = None     # whether Triton runs on this machine's GPUs (asked once)

    def _kernels_for(self, t: torch.Tensor) -> bool:
        if self.use_kernels is not None:
            return self.use_kernels
        if not t.is_cuda:
            return False
        if self._triton_on_cuda is None:
            from ..kernels import triton_problem
            self._triton_on_cuda = triton_problem("cuda") is None
        return self._triton_on_cuda

    def _sum_outputs(self, y_sorted, order, batch, num_local, out_dtype):
        return sum_sorted_outputs(y_sorted, order, batch, num_local, out_dtype, self._kernels_for(y_sorted))

    def forward_flat(self, batch: FlatBatch, weights: ExpertWeights) -> torch.Tensor:
        n, k = batch.local_ids.shape
        if n == 0:
            return torch.zeros(batch.x.shape, dtype=self.plan.dtype, device=batch.x.device)
        if weights.w13_scale is not None:
            return self._forward_flat_fp8(batch, weights)
        order, _counts, offsets = sort_pairs_by_expert(batch.local_ids, weights.num_local_experts)
        dtype = batch.x.dtype
        x_sorted, x_factor = gemm_rows(batch.x[order // k], dtype)
        h = torch._grouped_mm(x_sorted, weights.w13.transpose(1, 2), offs=offsets)
        expert_of_row = None
        if weights.b13 is not None or weights.b2 is not None:
            expert_of_row = batch.local_ids.reshape(-1)[order].long().clamp(min=0)
        if x_factor is None and self._kernels_for(h):
            # bias, activation and the cast to the down GEMM's operand in one pass over h
            from ..kernels.gated_rows import gated_rows
            a, a_factor = gated_rows(h.contiguous(), self.plan.activation, dtype, weights.b13,
                                     None if weights.b13 is None else expert_of_row)[0], None
        else:
            h = scale_back(h, x_factor)
            if weights.b13 is not None:
                h = h + weights.b13[expert_of_row].float()
            a, a_factor = gemm_rows(gated_activation_fused(self.plan.activation, h), dtype)
        y = torch._grouped_mm(a, weights.w2.transpose(1, 2), offs=offsets)
        if a_factor is not None:          # float16: stays float32 up to the slot sum
            y = scale_back(y, a_factor)
        if weights.b2 is not None:
            y = (y.float() + weights.b2[expert_of_row].float()).to(y.dtype)
        return self._sum_outputs(y, order, batch, weights.num_local_experts, batch.x.dtype)

    def _forward_flat_fp8(self, batch: FlatBatch, weights: ExpertWeights) -> torch.Tensor:
        n, k = batch.local_ids.shape
        order, _counts, offsets = sort_pairs_by_expert(batch.local_ids, weights.num_local_experts)
        src = order // k
        x_sorted = batch.x[src]
        x_scale = batch.scales.reshape(n)[src].contiguous()
        h = torch._scaled_grouped_mm(x_sorted, weights.w13.transpose(1, 2), x_scale, weights.w13_scale,
                                     offs=offsets, out_dtype=torch.bfloat16)
        expert_of_row = None
        if weights.b13 is not None or weights.b2 is not None:
            expert_of_row = batch.local_ids.reshape(-1)[order].long().clamp(min=0)
        if self._kernels_for(h):
            # bias, activation and the per-token quantization (the one formula) in one pass over h
            from ..kernels.gated_rows import gated_rows
            a_q, a_scale = gated_rows(h.contiguous(), self.plan.activation, self.plan.dtype, weights.b13,
                                      None if weights.b13 is None else expert_of_row,
                                      quant_group=self.plan.scheme.activation_group_size)
        else:
            h = h.float()
            if weights.b13 is not None:
                h = h + weights.b13[expert_of_row].float()
            a_q, a_scale = self.plan.quantize(gated_activation_fused(self.plan.activation, h))
        y = torch._scaled_grouped_mm(a_q, weights.w2.transpose(1, 2), a_scale.reshape(-1), weights.w2_scale,
                                     offs=offsets, out_dtype=torch.bfloat16)
        if weights.b2 is not None:
            y = (y.float() + weights.b2[expert_of_row].float()).to(y.dtype)
        return self._sum_outputs(y, order, batch, weights.num_local_experts, self.plan.dtype)
