"""Expert-parallel load balancing on one process: `balance_experts` against brute force, the expert map
(validation, the logical -> physical rule), a layer's load counter, a one-rank rebalance that permutes
the slots, refusals, and the skewed-routing generator. The multi-rank behaviour is in test_eplb_ep.py."""
from __future__ import annotations

import itertools
import random

import pytest
import torch

import epmoe
from epmoe import ExpertMap, MoEConfig, MoELayer, Placement, balance_experts, reference_moe
from epmoe.balance import max_over_mean, rank_loads
from epmoe.bench.routings import skewed_logits, zipf_popularity
from epmoe.testing import LayerExperts, bound_for, compare, load_experts, random_experts, random_inputs


def _slot_ranks(slots):
    return [r for r, s in enumerate(slots) for _ in range(s)]


def _even(P, n):
    base, extra = divmod(P, n)
    return [base + (r < extra) for r in range(n)]


def _check_valid(p2l, load, slots):
    """Every logical expert has a slot, each rank its slot count, no rank two replicas of one expert."""
    assert len(p2l) == sum(slots)
    assert set(p2l) == set(range(len(load)))
    start = 0
    for s in slots:
        mine = p2l[start:start + s]
        assert len(set(mine)) == len(mine), f"two replicas on one rank: {mine}"
        start += s


def _brute_force(load, slots) -> float:
    """The lightest possible most-loaded rank over every valid placement (replica counts included)."""
    E, best = len(load), float("inf")
    for choice in itertools.product(*[itertools.combinations(range(E), s) for s in slots]):
        count = [0] * E
        for held in choice:
            for e in held:
                count[e] += 1
        if 0 in count:
            continue
        best = min(best, max(sum(load[e] / count[e] for e in held) for held in choice))
    return best


def test_balance_experts_against_brute_force():
    rng = random.Random(7)
    ratios = []
    for case in range(160):
        E, n = rng.randint(2, 5), rng.randint(1, 3)
        if case % 2:
            slots = _even(rng.randint(max(E, n), n * E), n)          # what a layer has
        else:
            slots = [rng.randint(1, E) for _ in range(n)]            # any uneven counts
            if sum(slots) < E:
                continue
        load = [rng.choice([0, 1, 2, 5, 10, 100, rng.random() * 10]) for _ in range(E)]
        p2l = balance_experts(load, n, slots)
        _check_valid(p2l, load, slots)
        assert balance_experts(load, n, slots) == p2l                  # deterministic
        got = max(rank_loads(load, p2l, _slot_ranks(slots), n))
        best = _brute_force(load, slots)
        ratios.append(got / best if best > 0 else 1.0)
    assert len(ratios) > 120
    assert max(ratios) <= 1.25, max(ratios)
    optimal = sum(r <= 1 + 1e-9 for r in ratios) / len(ratios)
    assert optimal >= 0.9, f"optimal in only {optimal:.0%} of the cases"


def test_zipf_placement_meets_the_target():
    """Zipf 1.2 over 64 experts on 4 ranks: 2x the mean load on one rank without EPLB; with 8 redundant
    slots the placement's max/mean is within 1.10 (the measured one is in test_eplb_ep.py)."""
    load = zipf_popularity(64, 1.2).tolist()
    before = max_over_mean(rank_loads(load, list(range(64)), _slot_ranks(_even(64, 4)), 4))
    slots = _even(72, 4)
    p2l = balance_experts(load, 4, slots)
    _check_valid(p2l, load, slots)
    after = max_over_mean(rank_loads(load, p2l, _slot_ranks(slots), 4))
    assert before > 1.5 and after <= 1.10, (before, after)
    hottest = max(range(64), key=lambda e: load[e])
    assert p2l.count(hottest) == 4                                      # on every rank


def test_balance_experts_hierarchical_keeps_each_expert_in_one_group():
    load = zipf_popularity(32, 1.0, seed=3).tolist()
    slots = [5] * 8
    p2l = balance_experts(load, 8, slots, num_groups=2)
    _check_valid(p2l, load, slots)
    groups = [set(p2l[:20]), set(p2l[20:])]
    assert not groups[0] & groups[1] and len(groups[0]) == len(groups[1]) == 16
    flat = max_over_mean(rank_loads(load, balance_experts(load, 8, slots), _slot_ranks(slots), 8))
    assert flat <= max_over_mean(rank_loads(load, p2l, _slot_ranks(slots), 8)) + 1e-12


@pytest.mark.parametrize("args, match", [
    (([1, -1], 2, 1), "finite and >= 0"),
    (([1, float("nan")], 2, 1), "finite and >= 0"),
    (([], 2, 1), "empty"),
    ((torch.ones(2, 2), 2, 2), "1-D"),
    (([1, 1, 1], 2, 1), "leave a logical expert without a slot"),
    (([1, 1], 2, 3), "at most one replica of each"),
    (([1, 1, 1, 1], 2, [2, 2, 2]), "3 entries for 2 ranks"),
    (([1, 1, 1, 1], 3, 2, 2), "must divide num_ranks"),
])
def test_balance_experts_refusals(args, match):
    load, n, slots, *groups = args
    with pytest.raises(ValueError, match=match):
        balance_experts(load, n, slots, num_groups=groups[0] if groups else 1)


# ------------------------------------------------------------------------------------ the expert map
def test_expert_map_defaults_and_rank_major_order():
    plain = ExpertMap.build(8, 0, 2, 1)
    assert plain.is_identity and plain.local_experts == (4, 5, 6, 7)
    assert plain.placement.owners == Placement(8, 2, 1).owners
    m = ExpertMap.build(8, 3, 2, 0)                     # 11 slots: 6 on rank 0, 5 on rank 1 (uneven)
    assert m.placement.experts_per_rank == (6, 5) and not m.is_identity
    assert set(m.physical_to_logical) == set(range(8)) and len(m.local_experts) == 6
    # a non-contiguous slot layout: balance_experts' rank-major list lands on each rank's own slots
    owners = [1, 0, 1, 0, 0, 1]
    p = Placement(6, 2, 0, owners)
    assert ExpertMap.from_rank_major(p, [10, 11, 12, 20, 21, 22]) == [20, 10, 21, 11, 12, 22]


@pytest.mark.parametrize("p2l, match", [
    ([0, 1, 2, 3, 4, 5, 6, 0, 1, 2], "leaves logical experts \\[7\\] without a slot"),
    ([0, 1, 2, 3, 0, 5, 6, 7, 4, 2], "two replicas of logical expert 0 on rank 0"),
    ([0, 1, 2, 3, 4, 5, 6, 7, 9, 2], "outside \\[0, 8\\)"),
    ([0, 1, 2], "one per physical slot \\(10\\)"),
])
def test_expert_map_refuses_bad_placements(p2l, match):
    m = ExpertMap.build(8, 2, 2, 0)
    with pytest.raises(ValueError, match=match):
        m.switch(p2l)


def test_to_physical_splits_a_replicated_expert_evenly_and_switches_in_place():
    m = ExpertMap.build(4, 4, 4, rank=1)                    # 8 slots, 2 per rank
    m.switch([0, 1, 0, 2, 0, 3, 0, 1])                      # expert 0 on every rank, expert 1 twice
    table, counts = m.tables("cpu")
    ids = torch.tensor([[0, 1]] * 8 + [[2, 3]], dtype=torch.int32)
    phys = m.to_physical(ids)
    assert phys.dtype == torch.int32
    assert [m.physical_to_logical[s] for s in phys.reshape(-1).tolist()] == ids.reshape(-1).tolist()
    assert sorted(phys[:8, 0].tolist()) == [0, 0, 2, 2, 4, 4, 6, 6]      # 8 tokens over 4 replicas
    assert sorted(phys[:8, 1].tolist()) == [1] * 4 + [7] * 4
    assert torch.equal(m.to_physical(ids), phys)                          # no random numbers
    m.switch([1, 0, 2, 0, 3, 0, 0, 1])
    assert m.tables("cpu")[0] is table and counts.tolist() == [4, 2, 1, 1]


# ------------------------------------------------------------------------------- a layer on one rank
def _layer(**kw):
    cfg = MoEConfig(num_experts=6, top_k=2, hidden_size=40, intermediate_size=24, dtype=torch.float32, **kw)
    layer = MoELayer(cfg)
    load_experts(layer, random_experts(cfg, seed=2))
    return cfg, layer


def test_expert_load_counts_pairs_on_the_device_and_resets():
    cfg, layer = _layer()
    x, logits = random_inputs(cfg, 9, seed=3)
    with torch.inference_mode():
        layer(x, logits)
        layer(x[:0], logits[:0])                               # T = 0 counts nothing
    ids = epmoe.route(logits, cfg).topk_ids
    expected = torch.bincount(ids.reshape(-1).long(), minlength=6)
    load = layer.expert_load()
    assert load.dtype == torch.int64 and torch.equal(load, expected) and int(load.sum()) == 18
    layer.reset_expert_load()
    assert int(layer.expert_load().sum()) == 0 and int(load.sum()) == 18      # a copy was returned
    assert "expert_load_counts" not in layer.state_dict()


@pytest.mark.parametrize("quant", [None, epmoe.Fp8Config()])
def test_one_rank_rebalance_permutes_slots_with_weights_and_scales(quant):
    cfg, layer = _layer(quant=quant)
    oracle = [tuple(t.clone() for t in w) for w in LayerExperts(layer)]
    x, logits = random_inputs(cfg, 11, seed=4)
    before = layer(x, logits)
    result = layer.rebalance(physical_to_logical=[2, 0, 1, 5, 3, 4], chunk_bytes=512)   # two 3-cycles: local copies
    assert layer.local_experts == (2, 0, 1, 5, 3, 4) and result.changed_slots == 6
    assert result.bytes_sent == result.bytes_received == 0 and result.bytes_copied > 0
    ref = reference_moe(x, logits, oracle, cfg)
    after = layer(x, logits)
    assert compare(after, ref).rel_err <= bound_for(cfg.dtype, fp8=quant is not None)
    assert torch.equal(after, before)                           # same rows, same order of work per expert
    # the state dict speaks logical experts whatever the placement, and loads into another placement
    sd = layer.state_dict()
    fresh = MoELayer(cfg)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh(x, logits), before)
    assert layer.rebalance().changed_slots == 6                # back to what balance_experts gives on one rank


def test_layer_refusals():
    cfg = MoEConfig(num_experts=6, top_k=2, hidden_size=40, intermediate_size=24, dtype=torch.float32)
    with pytest.raises(ValueError, match="redundant_experts must be an int >= 0"):
        MoELayer(cfg, redundant_experts=-1)
    with pytest.raises(ValueError, match="replicas need an expert-parallel group"):
        MoELayer(cfg, redundant_experts=2)
    _, layer = _layer()
    with pytest.raises(ValueError, match=r"load must have shape \[6\]"):
        layer.rebalance(load=torch.ones(5))
    with pytest.raises(ValueError, match="finite and >= 0"):
        layer.rebalance(load=[1, 2, 3, 4, 5, float("inf")])
    with pytest.raises(ValueError, match="leaves logical experts \\[5\\] without a slot"):
        layer.rebalance(physical_to_logical=[0, 1, 2, 3, 4, 4])
    with pytest.raises(ValueError, match="chunk_bytes must be a positive int"):
        layer.rebalance(chunk_bytes=0)
    move = layer.start_rebalance(physical_to_logical=[1, 0, 2, 3, 4, 5])
    with pytest.raises(RuntimeError, match="previous rebalance is not finished"):
        layer.rebalance()
    with pytest.raises(RuntimeError, match="rebalance of this layer is in progress"):
        load_experts(layer, random_experts(layer.cfg, seed=2))
    move.finish()
    assert layer.local_experts[:2] == (1, 0)
    with pytest.raises(ValueError, match="keeps no statistics"):
        layer.enable_stats()


# --------------------------------------------------------------------------------- skewed routing
def test_skewed_logits_follow_the_zipf_popularity():
    p = zipf_popularity(16, 1.2, seed=5)
    assert abs(float(p.sum()) - 1) < 1e-12 and float(p.max()) / float(p.min()) == pytest.approx(16 ** 1.2)
    logits = skewed_logits(20000, 16, 1.2, seed=5, token_seed=1)
    top1 = torch.bincount(logits.argmax(-1), minlength=16).double() / 20000
    assert float((top1 - p).abs().max()) < 0.015
    assert not torch.equal(logits, skewed_logits(20000, 16, 1.2, seed=5, token_seed=2))
    flat = torch.bincount(skewed_logits(20000, 16, 0.0).argmax(-1), minlength=16).double() / 20000
    assert float((flat - 1 / 16).abs().max()) < 0.015
    with pytest.raises(ValueError, match="exponent must be >= 0"):
        zipf_popularity(16, -1)
