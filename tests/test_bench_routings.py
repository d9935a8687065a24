"""The benchmarks' balanced routing: through the real routing rule (DeepSeek-V3's grouped sigmoid with a
correction bias, Qwen3's softmax), every rank receives exactly the same number of (token, expert) pairs."""
import dataclasses

import pytest
import torch

from epmoe.bench.routings import balanced_choice, router_logits, routing_problem, zipf_popularity
from epmoe.placement import Placement
from epmoe.presets import preset_config, shrink_config
from epmoe.routing import route


def _pairs_per_rank(cfg, kind, T, ws, bias=None, seed=0):
    owners = torch.tensor(Placement(cfg.num_experts, ws, 0).owners)
    received = torch.zeros(ws, dtype=torch.long)
    for src in range(ws):
        g = torch.Generator().manual_seed(seed + src)
        routing = route(router_logits(kind, cfg, T, src, ws, g), cfg, bias)
        received += torch.bincount(owners[routing.topk_ids.long()].reshape(-1), minlength=ws)
    return received.tolist()


@pytest.mark.parametrize("preset, experts, ws", [
    ("deepseek-v3", None, 2), ("deepseek-v3", None, 4), ("deepseek-v3", None, 8), ("qwen3-30b-a3b", None, 2),
    ("qwen3-30b-a3b", None, 8), ("deepseek-v3", 16, 2), ("deepseek-v3", 8, 2), ("qwen3-30b-a3b", 16, 4)])
@pytest.mark.parametrize("T", [0, 1, 3, 64])
def test_every_rank_receives_the_same_pairs(preset, experts, ws, T):
    cfg = shrink_config(preset_config(preset), experts=experts)
    bias = torch.randn(cfg.num_experts, generator=torch.Generator().manual_seed(7)) * 0.1 \
        if cfg.scoring == "sigmoid" else None
    assert _pairs_per_rank(cfg, "balanced", T, ws, bias) == [T * cfg.top_k] * ws


def test_the_router_picks_the_chosen_experts_and_spreads_each_token():
    cfg = preset_config("deepseek-v3")
    bias = torch.randn(cfg.num_experts, generator=torch.Generator().manual_seed(3)) * 0.1
    ids = balanced_choice(cfg, 32, 1, 2, torch.Generator().manual_seed(5))
    routed = route(router_logits("balanced", cfg, 32, 1, 2, torch.Generator().manual_seed(5)), cfg, bias)
    assert torch.equal(ids.sort(dim=1).values, routed.topk_ids.long().sort(dim=1).values)
    assert (ids.sort(dim=1).values.diff(dim=1) > 0).all()                    # no expert twice per token
    on_rank1 = (ids >= 128).sum(dim=1)
    assert (on_rank1 == 4).all()                   # top-8 on 2 ranks: 4 experts on each, every token
    groups = ids // 32
    assert all(len(set(row.tolist())) <= cfg.topk_group for row in groups)  # within the group limit


def test_random_routing_is_the_rules_own_spread():
    cfg = preset_config("deepseek-v3")
    bias = torch.randn(cfg.num_experts, generator=torch.Generator().manual_seed(1)) * 0.1   # seeded: with the global
    # generator the bias was whatever the tests before had left, and once it split the pairs 2048 / 2048
    pairs = _pairs_per_rank(cfg, "random", 256, 2, bias)
    assert sum(pairs) == 2 * 256 * 8 and pairs[0] != pairs[1]


def test_configs_without_an_exact_balance_are_refused():
    cfg = preset_config("qwen3-30b-a3b")
    with pytest.raises(ValueError, match="do not split evenly over 3 ranks"):
        router_logits("balanced", cfg, 4, 0, 3, torch.Generator())
    ds = preset_config("deepseek-v3")
    with pytest.raises(ValueError, match="spans two ranks"):
        router_logits("balanced", ds, 4, 0, 16, torch.Generator())
    with pytest.raises(ValueError, match="multiple of topk_group"):
        router_logits("balanced", dataclasses.replace(ds, top_k=6, topk_group=4), 4, 0, 2, torch.Generator())
    with pytest.raises(ValueError, match="unknown routing 'zipf'"):
        router_logits("zipf", cfg, 4, 0, 2, torch.Generator())


def test_skewed_routing_has_the_same_zipf_popularity_on_every_rank():
    """The skewed kind: top-1 shares follow zipf_popularity (fixed, so every rank has the same hot
    experts), the exponent shapes it, each rank's tokens draw their own noise."""
    cfg = shrink_config(preset_config("qwen3-30b-a3b"), experts=16)
    p = zipf_popularity(16, 1.5)
    logits = [router_logits("skewed", cfg, 20000, src, 2, torch.Generator().manual_seed(src), 1.5) for src in (0, 1)]
    for lg in logits:
        top1 = torch.bincount(lg.argmax(-1), minlength=16).double() / 20000
        assert float((top1 - p).abs().max()) < 0.015
    assert not torch.equal(logits[0], logits[1])
    assert _pairs_per_rank(cfg, "skewed", 512, 2)[0] != _pairs_per_rank(cfg, "skewed", 512, 2)[1]
    flat = router_logits("skewed", cfg, 20000, 0, 2, torch.Generator(), 0.0)
    assert float((torch.bincount(flat.argmax(-1), minlength=16).double() / 20000 - 1 / 16).abs().max()) < 0.015
    assert "exponent must be >= 0" in routing_problem("skewed", cfg, 2, -1.0)
    assert routing_problem("skewed", cfg, 3) is None              # any rank count
