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


def awkward_ids(T: int, E: int, k: int, g: torch.Generator, one_expert: bool = False,
                other_ranks: bool = False) -> torch.Tensor:
    """[T, k] int32 expert ids, k distinct experts per token; one_expert: every token's first slot on expert 2
    (its segment spans several tiles); other_ranks: every other token's second slot on another rank (-1)."""
    rows = []
    for _ in range(T):
        if one_expert:
            others = [e for e in range(E) if e != 2]
            rows.append([2] + [others[i] for i in torch.randperm(E - 1, generator=g)[:k - 1].tolist()])
        else:
            rows.append(torch.randperm(E, generator=g)[:k].tolist())
    ids = torch.tensor(rows, dtype=torch.int32).reshape(T, k)
    if other_ranks:
        ids[::2, 1] = -1
    return ids


def awkward_flat_batches(cfg, padded_hidden: int, g: torch.Generator):
    """(T, FlatBatch) of the shapes every experts backend is checked on: T = 0 and 1, 11 tokens with every other
    token's second slot on another rank, 150 tokens with every first slot on one expert (its segment spans two
    tiles of 128 rows); rows of `padded_hidden` columns, zero past the hidden size, in the layer's dtype."""
    from ..layouts import FlatBatch
    for T, one_expert, other_ranks in ((0, False, False), (1, False, False), (11, False, True), (150, True, False)):
        x = torch.zeros(T, padded_hidden)
        x[:, :cfg.hidden_size] = torch.randn(T, cfg.hidden_size, generator=g)
        ids = awkward_ids(T, cfg.num_experts, cfg.top_k, g, one_expert, other_ranks)
        yield T, FlatBatch(x.to(cfg.dtype), ids, torch.rand(T, cfg.top_k, generator=g))


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
