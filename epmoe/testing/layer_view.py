"""The oracle's view of a built layer's experts, so that `reference_moe` checks exactly what it holds."""
from __future__ import annotations

from ..state_dict import expert_tensors


class LayerExperts:
    """The `experts` argument of `reference_moe` for a built layer on one rank (it holds every expert):
    `reference_moe(x, logits, LayerExperts(layer), layer.cfg)` checks the layer against what it holds.

    Expert e of `layer` as (gate [I, H], up [I, H], down [H, I][, gate_bias, up_bias, down_bias]) at the
    real sizes, made when asked for: the stored FP8 weights dequantized (what an FP8 layer computes with;
    the weights it was loaded from differ by the FP8 rounding), or slices of the stored (possibly padded)
    weights; the biases when the layer has them. Indexed by global expert id."""

    def __init__(self, layer):
        if layer.num_local_experts != layer.cfg.num_experts:
            raise ValueError(f"LayerExperts: the layer holds {layer.num_local_experts} of {layer.cfg.num_experts} "
                             "experts (a rank of an EP group); the oracle needs all of them: give it every expert's "
                             "weights (FP8: as stored, dequantized), or use LayerExperts on a one-rank layer")
        self.layer = layer

    def __len__(self) -> int:
        return self.layer.cfg.num_experts

    def __getitem__(self, e: int):
        if not 0 <= e < len(self):
            raise IndexError(e)
        layer = self.layer
        local = layer.expert_map.local_slot(e)
        t = expert_tensors(layer, local)
        if layer.cfg.quant is not None:
            w = tuple(layer.scheme.dequantized_expert(layer, local))
        else:
            w = (t["gate_proj"], t["up_proj"], t["down_proj"])
        if "gate_bias" in t:
            w = w + (t["gate_bias"], t["up_bias"], t["down_bias"])
        return w
