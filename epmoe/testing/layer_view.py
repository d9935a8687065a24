"""The oracle's view of a built layer's experts, so that `reference_moe` checks exactly what it holds."""
from __future__ import annotations


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
        layer, cfg = self.layer, self.layer.cfg
        H, I = cfg.hidden_size, cfg.intermediate_size
        Ip = layer.w2.shape[2]
        if cfg.quant is not None:
            t = tuple(cfg.quant_scheme.dequantized_expert(layer, e))
        else:
            t = (layer.w13[e, :I, :H], layer.w13[e, Ip:Ip + I, :H], layer.w2[e, :H, :I])
        if getattr(layer, "b13", None) is not None:
            t = t + (layer.b13[e, :I], layer.b13[e, Ip:Ip + I], layer.b2[e, :H])
        return t
