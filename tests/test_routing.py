"""The routing rule against an independent per-token implementation, and the routing validator."""
import math

import pytest
import torch

from epmoe import MoEConfig, MoELayer, route, validate_routing
from epmoe.testing import load_experts, random_experts


def per_token_routing(logits, cfg, bias=None):
    """A deliberately naive float64 implementation of the routing rule, one token at a time."""
    E, k = cfg.num_experts, cfg.top_k
    ids, weights = [], []
    for row in logits.double().tolist():
        if cfg.scoring == "softmax":
            m = max(row)
            ex = [math.exp(v - m) for v in row]
            scores = [v / sum(ex) for v in ex]
        else:
            scores = [1 / (1 + math.exp(-v)) for v in row]
        sel = [s + (bias[e] if bias is not None else 0.0) for e, s in enumerate(scores)]
        eligible = list(range(E))
        if cfg.n_group:
            size = E // cfg.n_group
            gscore = [sum(sorted(sel[g * size:(g + 1) * size], reverse=True)[:2]) for g in range(cfg.n_group)]
            groups = sorted(range(cfg.n_group), key=lambda g: -gscore[g])[:cfg.topk_group]
            eligible = [e for e in range(E) if e // size in groups]
        chosen = sorted(eligible, key=lambda e: -sel[e])[:k]
        w = [scores[e] for e in chosen]
        if cfg.renormalize:
            w = [v / sum(w) for v in w]
        w = [v * cfg.routed_scaling_factor for v in w]
        ids.append(chosen)
        weights.append(w)
    return torch.tensor(ids), torch.tensor(weights, dtype=torch.float64)


CASES = [
    dict(scoring="softmax", renormalize=True),
    dict(scoring="softmax", renormalize=False),
    dict(scoring="softmax", renormalize=True, routed_scaling_factor=1.5),
    dict(scoring="sigmoid", renormalize=True, n_group=4, topk_group=2, routed_scaling_factor=2.5),
    dict(scoring="sigmoid", renormalize=False, n_group=4, topk_group=2, routed_scaling_factor=2.5),
    dict(scoring="sigmoid", renormalize=True),
    dict(scoring="softmax", renormalize=True, n_group=4, topk_group=3),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("with_bias", [False, True])
def test_route_matches_per_token_rule(case, with_bias):
    cfg = MoEConfig(num_experts=16, top_k=4, hidden_size=8, intermediate_size=8, **case)
    g = torch.Generator().manual_seed(3)
    # well-separated logits (a permutation scaled), so float32 vs float64 never flips a choice
    logits = torch.stack([torch.randperm(16, generator=g).float() * 0.37 - 3 for _ in range(50)])
    bias = (torch.randperm(16, generator=g).float() * 0.011) if with_bias else None
    r = route(logits, cfg, bias)
    ids, w = per_token_routing(logits, cfg, None if bias is None else bias.tolist())
    assert r.topk_ids.dtype == torch.int32 and r.topk_weights.dtype == torch.float32
    assert torch.equal(r.topk_ids.long(), ids)
    torch.testing.assert_close(r.topk_weights.double(), w, rtol=1e-6, atol=1e-7)
    validate_routing(r.topk_ids, r.topk_weights, 16)


def test_correction_bias_stays_float32_in_bf16_layer():
    """Two biases 1e-4 apart are equal in bf16 near 1.0; the layer keeps them apart and routes by them."""
    cfg = MoEConfig(num_experts=4, top_k=1, hidden_size=8, intermediate_size=8, scoring="sigmoid",
                    dtype=torch.bfloat16)
    layer = MoELayer(cfg)
    assert layer.score_correction_bias.dtype == torch.float32
    bias = torch.tensor([1.0, 1.0001, 0.5, 0.5])
    assert bias.bfloat16()[0] == bias.bfloat16()[1]
    layer.score_correction_bias.copy_(bias)
    logits = torch.zeros(3, 4)
    r = layer.compute_routing(torch.zeros(3, 8, dtype=torch.bfloat16), logits)
    assert r.topk_ids.flatten().tolist() == [1, 1, 1]


@pytest.mark.parametrize("ids, weights, message", [
    (torch.tensor([[0, 16]]), torch.ones(1, 2), r"in \[0, 16\)"),
    (torch.tensor([[-1, 2]]), torch.ones(1, 2), r"in \[0, 16\)"),
    (torch.tensor([[3, 3]]), torch.ones(1, 2), "same expert twice"),
    (torch.tensor([[1, 2]]), torch.tensor([[1.0, float("nan")]]), "NaN or Inf"),
    (torch.tensor([[1, 2]]), torch.tensor([[float("inf"), 1.0]]), "NaN or Inf"),
    (torch.tensor([1, 2]), torch.ones(2), r"\[T, k\]"),
    (torch.tensor([[1.0, 2.0]]), torch.ones(1, 2), "integer"),
])
def test_validator_rejects(ids, weights, message):
    with pytest.raises((ValueError, TypeError), match=message):
        validate_routing(ids, weights, 16)


def test_custom_router_output_is_validated_not_trusted():
    cfg = MoEConfig(num_experts=8, top_k=2, hidden_size=16, intermediate_size=8, dtype=torch.float32)

    def bad_router(x, logits):
        ids = torch.zeros(x.shape[0], 2, dtype=torch.int64)
        ids[:, 1] = 9
        return ids, torch.ones(x.shape[0], 2)

    layer = MoELayer(cfg, router=bad_router)
    load_experts(layer, random_experts(cfg))
    with pytest.raises(ValueError, match=r"in \[0, 8\)"):
        layer(torch.randn(4, 16), torch.randn(4, 8))
    layer.router = lambda x, logits: (torch.zeros(x.shape[0], 3, dtype=torch.int64), torch.ones(x.shape[0], 3))
    with pytest.raises(ValueError, match="top_k=2"):
        layer(torch.randn(4, 16), torch.randn(4, 8))
    layer.router = lambda x, logits: (torch.tensor([[0, 1]] * x.shape[0]),
                                      torch.ones(x.shape[0], 2, device="meta"))
    with pytest.raises(ValueError, match="topk_weights on meta"):
        layer(torch.randn(4, 16), torch.randn(4, 8))
