"""`triton`: fused Triton MoE kernels for the flat layout (BF16/FP16/FP32, and FP8 W8A8).

Pairs are grouped by expert on the GPU (no host sync), the gate+up GEMM gathers token rows straight
from the unsorted input and applies the activation in its epilogue, the down GEMM applies the routing
weight in its epilogue, and each token's k outputs are summed in float32 (`epmoe.kernels.fused_moe`).
Tile configurations come from the tuned tables in `epmoe/kernels/configs` (`epmoe tune` writes them).
Where a table entry says `gluon` (tune measured it faster there, end to end), batches of that size run
`triton_ws`'s pipeline instead: the warp-specialized Gluon GEMMs on Hopper, BF16, 128x128 block FP8 and
per-channel FP8, on the same weights; it is set up, and its GEMM checked against its PyTorch statement, when the
layer is built (`gluon_pipeline`), and where it cannot run or is refused, the tiles run (with a warning).

FP8: weights as `Fp8Scheme` stores them (128x128 block scales, or one scale per output row for the
per-channel and per-tensor formats); activations per token-group of 128 or per token, FP8 rows with
their scales (quantized on entry when they arrive in the layer's dtype, as for every backend).
"""
from __future__ import annotations

import warnings
from dataclasses import replace

import torch

from ..contract import TAKES_FP8, ExpertsCaps
from ..layouts import FLAT, ExpertWeights, FlatBatch
from ..registry import register_experts
from .base import Experts

FP8_KINDS = frozenset({"fp8_block", "fp8_channel", "fp8_tensor"})
FP8_GROUP = 128           # the K tile of the FP8 kernels: activation group and weight block


def _available(device_type: str) -> str | None:
    from ..kernels import triton_problem
    return triton_problem(device_type)


def _quant_problem(scheme, device_type: str) -> str | None:
    """FP8 layouts the kernels handle (`scheme`: the layer's quantization scheme): 128x128 weight blocks
    or per-row weight scales, activations per token or per group of 128 columns, on a GPU with FP8 matrix
    units."""
    if scheme.kind == "none":
        return None
    from ..kernels import triton_problem
    why = triton_problem(device_type, need_fp8=True)
    if why:
        return why
    q = scheme.config
    if q.weight_block is not None and tuple(q.weight_block) != (FP8_GROUP, FP8_GROUP):
        return (f"the FP8 kernels take weight blocks of ({FP8_GROUP}, {FP8_GROUP}) or per-row scales, "
                f"not weight_block={q.weight_block}")
    if q.activation_group_size not in (None, FP8_GROUP):
        return (f"the FP8 kernels quantize activations per token or per group of {FP8_GROUP} columns, "
                f"not group_size={q.group_size}")
    return None


@register_experts("triton")
class TritonExperts(Experts):
    CAPS = ExpertsCaps(layouts=frozenset({FLAT}), devices=frozenset({"cuda"}),
                       quant=frozenset({"none"}) | FP8_KINDS, fp8_activations=TAKES_FP8,
                       cuda_graph_safe=True, auto_priority=4,
                       summary="fused Triton grouped GEMMs (gather, activation, routing weight fused), BF16/FP8",
                       available=_available, quant_problem=_quant_problem)

    def __init__(self, plan, device: torch.device | None = None):
        super().__init__(plan, device)
        self._configs: dict = {}
        why = _quant_problem(self.plan.scheme, "cuda")
        if why:
            raise ValueError(f"experts 'triton' cannot run this FP8 layer: {why}")
        self.gluon = self._set_up_gluon(self.plan, device)

    def move_to(self, device: torch.device, plan) -> None:
        """The Gluon pipeline set up again for the new device (its tables and self-check are per device),
        and the configurations looked up again."""
        gluon = self._set_up_gluon(plan, device)
        super().move_to(device, plan)
        self.gluon = gluon
        self._configs.clear()

    @staticmethod
    def _set_up_gluon(plan, device):
        """The Gluon pipeline, set up only where a table of this device picks it for this shape and format;
        where one does and it cannot run here, None with a warning (the tiles run those batches)."""
        if device is None or torch.device(device).type != "cuda":
            return None
        from ..kernels.fused_moe import weight_format
        from ..kernels.tuning_table import tables_pick_gluon
        if not tables_pick_gluon(plan.padded_hidden_size, plan.padded_intermediate_size, plan.top_k,
                                 weight_format(plan.dtype, plan.weight_granularity), torch.device(device)):
            return None
        gluon, why = gluon_pipeline(plan, torch.device(device))
        if why:
            warnings.warn(f"experts 'triton': the tuned table runs the Gluon GEMMs for some batch sizes "
                          f"of this shape, but not here ({why}); the tile kernels run those batches",
                          RuntimeWarning, stacklevel=3)
        return gluon

    def kernel_config(self, num_rows: int, weights: ExpertWeights):
        """The configuration used for a batch of `num_rows` rows (tuned table, else heuristic): its tiles, or
        the decode kernels (`gemv`) or the Gluon pipeline (`gluon`, where one is set up) it names."""
        key = (num_rows, tuple(weights.w13.shape), weights.w13.dtype)
        hit = self._configs.get(key)
        if hit is None:
            from ..kernels.fused_moe import weight_format
            from ..kernels.tuning_table import lookup_config
            L, two_i, H = weights.w13.shape
            hit = lookup_config(num_rows, L, H, two_i // 2, self.plan.top_k,
                                weight_format(weights.w13, self.plan.weight_granularity), weights.w13.device)
            if hit[0].gluon and self.gluon is None:        # none set up here: the tiles run
                hit = (replace(hit[0], gluon=False), hit[1])
            if len(self._configs) > 4096:
                self._configs.clear()
            self._configs[key] = hit
        return hit[0]

    def forward_flat(self, batch: FlatBatch, weights: ExpertWeights) -> torch.Tensor:
        from ..kernels.fused_moe import Fp8Operands, fused_experts
        plan = self.plan
        x = batch.x
        config = self.kernel_config(x.shape[0], weights)
        if config.gluon and self.gluon is not None:
            return self.gluon.forward_flat(batch, weights)
        fp8 = None
        if plan.fp8:                 # the rows came with their scales (see `Experts.activations_for`)
            fp8 = Fp8Operands(x_scale=batch.scales.float().contiguous(), w13_scale=weights.w13_scale,
                              w2_scale=weights.w2_scale, act_group=plan.act_group, weight_block=plan.weight_block,
                              granularity=plan.weight_granularity)
        return fused_experts(x.contiguous(), batch.local_ids, batch.weights, weights.w13, weights.w2,
                             plan.activation, b13=weights.b13, b2=weights.b2, out_dtype=plan.dtype,
                             config=config, fp8=fp8, out=batch.out)      # in place where the dispatcher says


def gluon_pipeline(plan, device: torch.device):
    """(`triton_ws`'s experts on this plan and device, None) where its pipeline can run this layer and its
    GEMM passed its self-check here; else (None, why)."""
    from . import triton_ws
    caps = triton_ws.WarpSpecializedExperts.CAPS
    why = caps.available(device.type)
    if why is None and plan.dtype not in caps.dtypes:
        why = f"it runs {sorted(str(d).replace('torch.', '') for d in caps.dtypes)} layers, not {plan.dtype}"
    if why is None and plan.quant not in caps.quant:
        why = f"it runs {sorted(caps.quant)}, not {plan.quant}"
    if why is None and plan.quant != "none":
        why = caps.quant_problem(plan.scheme, device.type)
    if why is None:
        try:
            return triton_ws.WarpSpecializedExperts(plan, device), None
        except RuntimeError as exc:            # refused: its GEMM failed its self-check here
            why = str(exc)
    return None, why
