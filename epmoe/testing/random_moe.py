"""Random, non-zero MoE weights and inputs at a scale that keeps activations O(1)."""
from __future__ import annotations

import torch


def random_experts(cfg, seed: int = 0, scale: float = 1.0, with_bias: bool = False):
    """One (gate [I, H], up [I, H], down [H, I]) float32 tuple per expert (plus biases if asked)."""
    g = torch.Generator().manual_seed(seed)
    H, I = cfg.hidden_size, cfg.intermediate_size
    out = []
    for _ in range(cfg.num_experts):
        t = [torch.randn(I, H, generator=g) * (scale / H ** 0.5),
             torch.randn(I, H, generator=g) * (scale / H ** 0.5),
             torch.randn(H, I, generator=g) * (scale / I ** 0.5)]
        if with_bias:
            t += [torch.randn(I, generator=g) * 0.1, torch.randn(I, generator=g) * 0.1,
                  torch.randn(H, generator=g) * 0.1]
        out.append(tuple(t))
    return out


class SeededExperts:
    """Expert e's weights, generated on demand from (seed, e): every rank and the oracle see the same
    values without anyone holding all experts in memory."""

    def __init__(self, cfg, seed: int, device="cpu"):
        self.cfg, self.seed, self.device = cfg, seed, torch.device(device)

    def __len__(self) -> int:
        return self.cfg.num_experts

    def __getitem__(self, e: int):
        if not 0 <= e < len(self):
            raise IndexError(e)
        cfg = self.cfg
        g = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + e)
        H, I = cfg.hidden_size, cfg.intermediate_size

        def rand(*shape, fan_in):
            t = torch.randn(*shape, generator=g, device=self.device, dtype=torch.float32)
            return (t * fan_in ** -0.5).to(cfg.dtype)
        return rand(I, H, fan_in=H), rand(I, H, fan_in=H), rand(H, I, fan_in=I)


def random_inputs(cfg, num_tokens: int, seed: int = 1, device="cpu", logit_scale: float = 2.0):
    """hidden [T, H] in cfg.dtype and router logits [T, E] float32, on `device`."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, cfg.hidden_size, generator=g).to(cfg.dtype)
    logits = torch.randn(num_tokens, cfg.num_experts, generator=g) * logit_scale
    return x.to(device), logits.to(device)


def load_experts(layer, experts) -> int:
    """load_expert for every expert; returns how many this rank kept."""
    kept = 0
    for e, t in enumerate(experts):
        biases = dict(zip(("gate_bias", "up_bias", "down_bias"), t[3:]))
        kept += layer.load_expert(e, gate_proj=t[0], up_proj=t[1], down_proj=t[2], **biases)
    return kept


def fp16_range_case(cfg, num_tokens: int, seed: int = 0, peak_out: float = 40000.0):
    """Inputs and experts that take a float16 layer near the top of its range: (x [T, H] float16, logits
    [T, E] float32, experts as float32 tuples holding float16 values, the largest |act(gate) * up|).

    gate and up reach about 1e3, so act(gate) * up passes float16's 65504 by far, while each expert's
    down projection is scaled so that its output on these rows peaks at `peak_out`: any convex mix of
    the k experts (renormalized routing) fits in float16, and a backend that rounds the intermediate to
    float16 gets Inf.
    """
    from ..activations import gated_activation
    x, logits = random_inputs(cfg, num_tokens, seed=seed)
    x = (x.float() * 16).to(torch.float16)
    xs, experts, peak = x.double(), [], 0.0
    for gate, up, down in random_experts(cfg, seed=seed, scale=16.0):
        gate, up, down = (t.to(torch.float16).double() for t in (gate, up, down))
        a = gated_activation(cfg.activation, xs @ gate.T, xs @ up.T)
        peak = max(peak, float(a.abs().max()))
        down = down * (peak_out / float((a @ down.T).abs().max().clamp(min=1e-30)))
        experts.append((gate.float(), up.float(), down.to(torch.float16).float()))
    return x, logits, experts, peak
