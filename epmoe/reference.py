"""`reference_moe`: the float64 oracle every backend is tested against.

Plain loops, no fusion, no padding, no parallelism: routing by the one routing rule (float32, as
specified), then every expert in float64 and the weighted sum in float64.

FP8 configs: pass the dequantized weights; the oracle then applies the activation quantization the
FP8 function prescribes, with the one formula (`epmoe.fp8_quantize`, float32): the input rows and the
intermediate activation are quantized and dequantized with the config's granularity, everything else
stays float64. `quantize_activations=False` gives the unquantized function instead.

NaN/Inf in a token's hidden state, logits or routing weights give that token's row whatever the
arithmetic gives (NaN/Inf, or finite where it is: sigmoid(+Inf) = 1), as in the layer; other rows are
untouched.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .activations import gated_activation
from .routing import Routing, route, validate_routing


def reference_moe(hidden_states: torch.Tensor, router_logits: torch.Tensor | None,
                  experts: Sequence[Sequence[torch.Tensor]], cfg,
                  score_correction_bias: torch.Tensor | None = None,
                  routing: Routing | None = None, device=None,
                  quantize_activations: bool | None = None) -> torch.Tensor:
    """The MoE function in float64: out[t] = sum_j w[t,j] * down_e(act(gate_e x_t, up_e x_t)).

    experts: one (gate_proj [I, H], up_proj [I, H], down_proj [H, I]) per global expert, optionally with
    (gate_bias [I], up_bias [I], down_bias [H]) appended. `routing` overrides the routing rule (custom
    routers). Returns float64 [T, H] on the CPU, or on `device` if given (float64 on a GPU makes real-size
    checks fast; the arithmetic is the same). quantize_activations: FP8 activation quantization (default:
    when `cfg.quant` is an FP8 config).

    FP8 layers: `experts` must be the weights the layer holds, dequantized (the high-precision weights it
    was loaded from differ by the weight rounding, ~5e-2 relative): `epmoe.testing.LayerExperts(layer)`
    gives them for a layer on one rank, e.g. `reference_moe(x, logits, LayerExperts(layer), layer.cfg)`.
    """
    dev = torch.device("cpu") if device is None else torch.device(device)
    if len(experts) != cfg.num_experts:
        raise ValueError(f"reference_moe: expected {cfg.num_experts} experts, got {len(experts)}")
    x = hidden_states.detach().to(dev, torch.float64)
    fp8 = None
    if quantize_activations is None:
        quantize_activations = getattr(cfg, "quant", None) is not None
    if quantize_activations:
        from .quant.fp8 import Fp8Config
        if not isinstance(cfg.quant, Fp8Config):
            raise ValueError("reference_moe: quantize_activations=True needs cfg.quant to be an epmoe.Fp8Config")
        fp8 = cfg.quant_scheme

        def fp8_round_trip(t: torch.Tensor) -> torch.Tensor:
            return fp8.dequantize_activations(*fp8.quantize_activations(t.float())).double()
        x = fp8_round_trip(hidden_states.detach().to(dev))
    if routing is None:
        # routed where the logits live: the layer does the same, so float32 near-ties break alike
        bias = None if score_correction_bias is None else score_correction_bias.detach().to(router_logits.device)
        routing = route(router_logits.detach(), cfg, bias)
    routing = validate_routing(routing.topk_ids.cpu(), routing.topk_weights.cpu(), cfg.num_experts,
                               num_tokens=x.shape[0], top_k=cfg.top_k, finite_weights=False)
    out = torch.zeros_like(x)
    ids, weights = routing.topk_ids.long().to(dev), routing.topk_weights.double().to(dev)
    for e in range(cfg.num_experts):
        rows, slots = (ids == e).nonzero(as_tuple=True)
        if rows.numel() == 0:
            continue
        tensors = experts[e]  # indexed only when used: `experts` may be a lazy sequence
        gate, up, down = (t.detach().to(dev, torch.float64) for t in tensors[:3])
        xs = x[rows]
        g, u = xs @ gate.T, xs @ up.T
        if len(tensors) > 3:
            g = g + tensors[3].detach().to(dev, torch.float64)
            u = u + tensors[4].detach().to(dev, torch.float64)
        a = gated_activation(cfg.activation, g, u)
        if fp8 is not None:
            a = fp8_round_trip(a)
        y = a @ down.T
        if len(tensors) > 3:
            y = y + tensors[5].detach().to(dev, torch.float64)
        out.index_add_(0, rows, y * weights[rows, slots].unsqueeze(1))
    return out
