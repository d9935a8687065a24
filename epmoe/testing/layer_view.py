"""The oracle's view of a built layer's experts, so that `reference_moe` checks exactly what it holds."""
from __future__ import annotations

from ..state_dict import expert_tensors


class LayerExperts:
    """Expert e of `layer` as (gate [I, H], up [I, H], down [H, I][, gate_bias, up_bias, down_bias]) at the
    real sizes, made when asked for: the stored FP8 weights dequantized, or slices of the stored
    (possibly padded) weights; the biases when the layer has them. Indexed by global expert id."""

    def __init__(self, layer):
        self.layer = layer

    def __len__(self) -> int:
        return self.layer.cfg.num_experts

    def __getitem__(self, e: int):
        if not 0 <= e < len(self):
            raise IndexError(e)
        layer = self.layer
        t = expert_tensors(layer, e)
        if layer.cfg.quant is not None:
            w = tuple(layer.scheme.dequantized_expert(layer, e))
        else:
            w = (t["gate_proj"], t["up_proj"], t["down_proj"])
        if "gate_bias" in t:
            w = w + (t["gate_bias"], t["up_bias"], t["down_bias"])
        return w
