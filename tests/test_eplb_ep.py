"""Expert-parallel load balancing on 2 and 4 Gloo ranks: replicas and a rebalance against the float64
oracle for every CPU pairing the contract accepts, BF16 and FP8 (scales and padding move with the
weights); a rebalance inside a loop of 100 forwards; the measured max/mean rank load before and after a
rebalance on Zipf-skewed routing (and on a tiny transformers model's router logits); and the refusals.

Each rank count starts its ranks once (a module-scoped fixture runs every case in one `run_on_ranks`
call); a case that fails records its error and the others still run.
"""
from __future__ import annotations

import traceback

import pytest
import torch
import torch.distributed as dist

import epmoe
from epmoe import MoEConfig, MoELayer, RankMismatch, contract, reference_moe
from epmoe.bench.routings import skewed_logits
from epmoe.testing import LayerExperts, bound_for, compare, load_experts, random_experts, random_inputs, run_on_ranks

QUANT = {"bf16": None, "fp8_block": epmoe.Fp8Config(),
         "fp8_channel+fp8_dispatch": epmoe.Fp8Config(weight_block=None, per_channel_weights=True,
                                                     activation="per_token", dispatch_fp8=True)}


def _cfg(quant: str, E: int = 8, k: int = 2, dtype=torch.bfloat16) -> MoEConfig:
    # hidden 40 and intermediate 24: not multiples of 128, so the FP8 layers pad (and the padding moves)
    return MoEConfig(num_experts=E, top_k=k, hidden_size=40, intermediate_size=24, dtype=dtype, quant=QUANT[quant])


def _oracle(cfg, seed: int = 0):
    """The weights every rank's layer holds, as the oracle needs them (a one-rank layer: FP8 quantized the
    same way, dequantized), and the float32 weights they came from."""
    weights = random_experts(cfg, seed=seed)
    whole = MoELayer(cfg)
    load_experts(whole, weights)
    return [tuple(t.clone() for t in w) for w in LayerExperts(whole)], weights


def _check(layer, cfg, oracle, x, logits, what: str) -> float:
    out = layer(x, logits)
    assert tuple(out.shape) == tuple(x.shape), f"{what}: output {list(out.shape)}"
    if x.shape[0] == 0:
        return 0.0
    res = compare(out, reference_moe(x, logits, oracle, cfg))
    bound = bound_for(cfg.dtype, fp8=cfg.quant is not None, hidden_size=cfg.hidden_size)
    assert res.finite and res.rel_err <= bound, f"{what}: differs from the oracle beyond {bound:.0e}\n{res.report}"
    return res.rel_err


def _skewed(cfg, T: int, rank: int, seed: int):
    x, _ = random_inputs(cfg, T, seed=seed + rank)
    return x, skewed_logits(T, cfg.num_experts, 1.2, seed=seed, token_seed=rank)


# ------------------------------------------------------------------------------------------- cases
def case_pairing(rank: int, ws: int, dispatcher: str, experts: str, quant: str) -> dict:
    """Replicas (uneven slot counts), then a rebalance in steps from the measured skewed load: outputs
    equal the oracle before, between two steps of the move (old placement) and after it (new one);
    the state dict speaks logical experts and a full one loads into the new placement."""
    cfg = _cfg(quant)
    oracle, weights = _oracle(cfg)
    R = 3 if ws == 2 else 2                                   # 11 slots as 6 + 5, or 10 as 3 + 3 + 2 + 2
    layer = MoELayer(cfg, ep_group=dist.group.WORLD, dispatcher=dispatcher, experts=experts,
                     redundant_experts=R, max_tokens_per_rank=48)
    kept = load_experts(layer, weights)
    assert kept == layer.num_local_experts == len(set(layer.local_experts))
    x, logits = _skewed(cfg, 40 + 2 * rank, rank, seed=11)
    errs = [_check(layer, cfg, oracle, x, logits, "before")]
    old_map = layer.expert_map.physical_to_logical
    move = layer.start_rebalance(chunk_bytes=4096)           # from expert_load(): the forward above
    assert move.step() and not move.done, "the move should take several steps of 4 KiB"
    errs.append(_check(layer, cfg, oracle, x, logits, "during the move"))
    assert layer.expert_map.physical_to_logical == old_map
    result = move.finish()
    assert layer.expert_map.physical_to_logical != old_map and result.changed_slots > 0
    assert result.imbalance_after < result.imbalance_before
    errs.append(_check(layer, cfg, oracle, x, logits, "after"))
    for T in ((1, 0, 2, 0)[rank % 4], 48):                    # a rank with one token, one with none; full
        xt, lt = _skewed(cfg, T, rank, seed=12)
        errs.append(_check(layer, cfg, oracle, xt, lt, f"after, T={T}"))
    sd = layer.state_dict()
    held = sorted({int(k.split(".")[1]) for k in sd})
    assert held == sorted(layer.local_experts), (held, layer.local_experts)
    full = MoELayer(cfg)                                      # every expert, in logical names
    load_experts(full, weights)
    fresh = MoELayer(cfg, ep_group=dist.group.WORLD, dispatcher=dispatcher, experts=experts,
                     redundant_experts=R, max_tokens_per_rank=48)
    fresh.rebalance(physical_to_logical=layer.expert_map.physical_to_logical)
    fresh.load_state_dict(full.state_dict())
    errs.append(_check(fresh, cfg, oracle, x, logits, "a full state dict loaded into the new placement"))
    moved = torch.tensor([result.bytes_received, result.bytes_sent])
    dist.all_reduce(moved)                                     # over the group: what was received was sent
    return {"worst": max(errs), "moved": moved.tolist(), "slot_bytes": _slot_bytes(layer)}


def _slot_bytes(layer) -> int:
    return sum(p[0].numel() * p.element_size() for p in layer.parameters(recurse=False))


def case_loop(rank: int, ws: int) -> dict:
    """A rebalance (in steps, between forwards) inside a loop of 100 forwards changes nothing but speed:
    every output equals the oracle, and the outputs after the switch equal those before it (float32)."""
    cfg = _cfg("bf16", dtype=torch.float32)
    oracle, weights = _oracle(cfg)
    layer = MoELayer(cfg, ep_group=dist.group.WORLD, dispatcher="alltoall", experts="grouped_mm", redundant_experts=2)
    load_experts(layer, weights)
    x, logits = _skewed(cfg, 24, rank, seed=5)
    first, move, worst, drift = None, None, 0.0, 0.0
    for i in range(100):
        out = layer(x, logits)
        if i % 10 == 0:
            worst = max(worst, compare(out, reference_moe(x, logits, oracle, cfg)).rel_err)
        first = out if first is None else first
        drift = max(drift, compare(out, first.double()).rel_err)
        if i == 40:
            move = layer.start_rebalance(chunk_bytes=2048)
        elif move is not None and not move.done:
            move.step()
        elif move is not None:
            result = move.finish()
            move = None
    assert worst <= bound_for(torch.float32), worst
    assert drift <= 1e-6, drift
    return {"worst": worst, "drift": drift, "changed": result.changed_slots, "steps": result.steps}


def _rank_loads(layer, stats) -> list[int]:
    """Pairs each rank's experts received, gathered from every rank's dispatcher statistics."""
    mine = torch.tensor([int(stats.received_per_expert.sum())])
    everyone = [torch.zeros_like(mine) for _ in range(layer.ep_size)]
    dist.all_gather(everyone, mine)
    return [int(t) for t in everyone]


def _measured_balance(rank: int, ws: int, cfg, logits, R: int, num_groups: int = 1) -> dict:
    oracle, weights = _oracle(cfg)
    layer = MoELayer(cfg, ep_group=dist.group.WORLD, dispatcher="alltoall", experts="grouped_mm",
                     redundant_experts=R)
    load_experts(layer, weights)
    stats = layer.enable_stats()
    x, _ = random_inputs(cfg, logits.shape[0], seed=rank)
    _check(layer, cfg, oracle, x, logits, "before")
    before = _rank_loads(layer, stats)
    result = layer.rebalance(num_groups=num_groups)
    stats.received_per_expert.zero_()
    _check(layer, cfg, oracle, x, logits, "after")
    after = _rank_loads(layer, stats)
    ratio = [max(v) / (sum(v) / len(v)) for v in (before, after)]
    return {"before": ratio[0], "after": ratio[1], "predicted": (result.imbalance_before, result.imbalance_after),
            "loads": (before, after)}


def case_zipf(rank: int, ws: int) -> dict:
    """Zipf 1.2 over 64 experts, top-4, 4 ranks, 8 redundant slots: measured max/mean rank load."""
    cfg = _cfg("bf16", E=64, k=4, dtype=torch.float32)
    return _measured_balance(rank, ws, cfg, skewed_logits(512, 64, 1.2, seed=1, token_seed=rank), R=8)


def case_hierarchical(rank: int, ws: int) -> dict:
    cfg = _cfg("bf16", E=64, k=4, dtype=torch.float32)
    return _measured_balance(rank, ws, cfg, skewed_logits(512, 64, 1.2, seed=1, token_seed=rank), R=8, num_groups=2)


def case_model_logits(rank: int, ws: int, logits: torch.Tensor) -> dict:
    """The same with a tiny transformers model's router logits (its own tokens per rank)."""
    cfg = _cfg("bf16", E=logits.shape[1], k=4, dtype=torch.float32)
    per = logits.shape[0] // ws
    return _measured_balance(rank, ws, cfg, logits[rank * per:(rank + 1) * per], R=8)


def case_subgroups(rank: int, ws: int) -> dict:
    """Two EP groups of 2 ranks ({0, 1}, {2, 3}), each its own layer with replicas, rebalanced at once:
    the moves address the peers by their group's ranks."""
    group = [dist.new_group([0, 1]), dist.new_group([2, 3])][rank // 2]
    cfg = _cfg("bf16", dtype=torch.float32)
    oracle, weights = _oracle(cfg, seed=rank // 2)
    layer = MoELayer(cfg, ep_group=group, dispatcher="alltoall", experts="reference", redundant_experts=4)
    load_experts(layer, weights)
    x, logits = _skewed(cfg, 30, rank, seed=4 + rank // 2)
    _check(layer, cfg, oracle, x, logits, "before")
    result = layer.rebalance(chunk_bytes=1000)
    _check(layer, cfg, oracle, x, logits, "after")
    return {"received": result.bytes_received, "steps": result.steps}


def case_model(rank: int, ws: int, checkpoint: str) -> dict:
    """A tiny transformers model with its MoE blocks on epmoe with redundant experts (patched, and loaded
    from a checkpoint reading only the experts each rank holds): the same logits as the model itself,
    before and after every block is rebalanced."""
    from epmoe.integration import load_model, moe_blocks, patch_model
    from epmoe.integration.tiny import tiny_model
    reference = tiny_model("qwen3_moe", seed=3)
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():
        want = reference(ids).logits
    patched = tiny_model("qwen3_moe", seed=3)
    patch_model(patched, ep_group=dist.group.WORLD, dispatcher="alltoall", redundant_experts=4)
    loaded = load_model(checkpoint, ep_group=dist.group.WORLD, dispatcher="alltoall", redundant_experts=4,
                        progress=False)
    errs = {}
    with torch.no_grad():
        for name, model in (("patched", patched), ("loaded", loaded)):
            errs[name] = compare(model(ids).logits, want).rel_err
            for _, block in moe_blocks(model):
                block.experts.rebalance()
            errs[name + " rebalanced"] = compare(model(ids).logits, want).rel_err
    return errs


def _expect(fn, kind: type, *words) -> str:
    try:
        fn()
    except Exception as exc:
        assert type(exc) is kind, f"expected {kind.__name__}, got {type(exc).__name__}: {exc}"
        for w in words:
            assert w in str(exc), f"the error should mention {w!r}: {exc}"
        return type(exc).__name__
    raise AssertionError(f"expected {kind.__name__}, nothing was raised")


def case_refusals(rank: int, ws: int) -> dict:
    """Disagreeing ranks raise RankMismatch on every rank; a placement without a slot for an expert a
    ValueError on every rank; a rank with a bad load its ValueError, its peers RankMismatch; the layer
    still computes the oracle afterwards."""
    cfg = _cfg("bf16", dtype=torch.float32)
    oracle, weights = _oracle(cfg)
    world = dist.group.WORLD
    seen = {}
    seen["R differs"] = _expect(lambda: MoELayer(cfg, ep_group=world, dispatcher="alltoall", experts="reference",
                                                 redundant_experts=2 + (rank == 1)), RankMismatch, "redundant_experts")
    layer = MoELayer(cfg, ep_group=world, dispatcher="alltoall", experts="reference", redundant_experts=2)
    load_experts(layer, weights)
    x, logits = _skewed(cfg, 12, rank, seed=3)
    shape = 8 if rank else 9
    seen["load shape"] = _expect(lambda: layer.rebalance(load=torch.ones(shape)), RankMismatch, "load shape differs")
    seen["same bad shape"] = _expect(lambda: layer.rebalance(load=torch.ones(3)), ValueError, "shape [8]")
    p2l = list(layer.expert_map.physical_to_logical)
    other = p2l[::-1] if rank == 0 else p2l
    seen["placement"] = _expect(lambda: layer.rebalance(physical_to_logical=other), RankMismatch,
                                "physical_to_logical differs")
    orphan = [e if e != 7 else 6 for e in p2l]
    seen["no slot"] = _expect(lambda: layer.rebalance(physical_to_logical=orphan), ValueError, "without a slot")
    bad = [1.0] * 8 if rank else [float("nan")] + [1.0] * 7
    seen["bad load"] = _expect(lambda: layer.rebalance(load=bad), ValueError if rank == 0 else RankMismatch,
                               "finite and >= 0")
    assert layer.expert_map.physical_to_logical == tuple(p2l)
    _check(layer, cfg, oracle, x, logits, "after the refusals")
    layer.rebalance()
    _check(layer, cfg, oracle, x, logits, "after a rebalance")
    return seen


def _run_cases(rank: int, ws: int, cases: list, model_logits, checkpoint) -> dict:
    out = {}
    for name, fn, args in cases:
        try:
            if model_logits is None and fn in (case_model_logits, case_model):
                out[name] = ("ok", None)          # transformers is not installed
                continue
            if fn is case_model_logits:
                args = (model_logits,)
            elif fn is case_model:
                args = (checkpoint,)
            out[name] = ("ok", fn(rank, ws, *args))
        except Exception as exc:
            out[name] = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        dist.barrier()
    return out


def _pairings(ws: int) -> list:
    out = []
    for quant in QUANT:
        for d, x in contract.supported_pairings(_cfg(quant), ws, "cpu"):
            out.append((f"{d}/{x}/{quant}", case_pairing, (d, x, quant)))
    return out


def _cases(ws: int) -> list:
    cases = _pairings(ws) + [("refusals", case_refusals, ())]
    if ws == 2:
        cases.append(("loop", case_loop, ()))
    else:
        cases += [("zipf", case_zipf, ()), ("hierarchical", case_hierarchical, ()), ("subgroups", case_subgroups, ()),
                  ("model logits", case_model_logits, ()), ("model", case_model, ())]
    return cases


def _tiny_model_router_logits():
    """Router logits [1024, 64] of the first MoE layer of a tiny Qwen3-MoE model with random weights."""
    try:
        from epmoe.integration.tiny import tiny_model
        model = tiny_model("qwen3_moe", experts=64, top_k=4, layers=1)
    except ImportError:
        return None
    ids = torch.randint(3, 128, (16, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(ids, output_router_logits=True).router_logits[0].float()


@pytest.fixture(scope="module", params=[2, 4], ids=["2 ranks", "4 ranks"])
def results(request, tmp_path_factory):
    ws = request.param
    logits = _tiny_model_router_logits() if ws == 4 else None
    checkpoint = None
    if logits is not None:     # transformers is imported here, once: the forked ranks inherit it
        from epmoe.integration.tiny import save_tiny_checkpoint, tiny_model
        checkpoint = str(save_tiny_checkpoint(tiny_model("qwen3_moe", seed=3), tmp_path_factory.mktemp("eplb"),
                                              with_tokenizer=False))
    res = run_on_ranks(_run_cases, ws, _cases(ws), logits, checkpoint, backend="gloo", timeout_s=300)
    return ws, res, logits


def _ok(results, name: str) -> list:
    ws, res, _ = results
    errors = [f"rank {r}: {out[name][1]}" for r, out in enumerate(res) if out[name][0] != "ok"]
    assert not errors, "\n".join(errors)
    return [out[name][1] for out in res]


def test_every_cpu_pairing_with_replicas_before_during_and_after_a_rebalance(results):
    ws = results[0]
    for name, _, (_, _, quant) in _pairings(ws):
        per_rank = _ok(results, name)
        received, sent = per_rank[0]["moved"]
        assert received == sent and received > 0 and received % per_rank[0]["slot_bytes"] == 0, per_rank[0]


def test_fp8_moves_scales_and_padding(results):
    """An FP8 slot is weights, their scales and the padding to 128: what moved is whole slots of that."""
    ws = results[0]
    per_rank = _ok(results, "alltoall/reference/fp8_block")
    cfg = _cfg("fp8_block")
    Hp, Ip = cfg.padded_hidden_size, cfg.padded_intermediate_size
    assert (Hp, Ip) == (128, 128)
    assert per_rank[0]["slot_bytes"] == 3 * Hp * Ip + 4 * (2 * Ip // 128 * Hp // 128 + Hp // 128 * Ip // 128)


def test_refusals_on_every_rank(results):
    ws = results[0]
    for rank, seen in enumerate(_ok(results, "refusals")):
        assert seen["R differs"] == seen["load shape"] == seen["placement"] == "RankMismatch"
        assert seen["same bad shape"] == seen["no slot"] == "ValueError"
        assert seen["bad load"] == ("ValueError" if rank == 0 else "RankMismatch")


def test_rebalance_in_a_loop_of_100_forwards(results):
    if results[0] != 2:
        pytest.skip("run on 2 ranks")
    for r in _ok(results, "loop"):
        assert r["changed"] > 0 and r["steps"] > 1


def test_zipf_measured_max_over_mean_after_rebalance(results):
    if results[0] != 4:
        pytest.skip("run on 4 ranks")
    r = _ok(results, "zipf")[0]
    print(f"\nZipf 1.2, 64 experts, top-4, 4 ranks, R = 8: measured max/mean rank load {r['before']:.3f} before, "
          f"{r['after']:.3f} after rebalance (placement's prediction {r['predicted'][0]:.3f} -> "
          f"{r['predicted'][1]:.3f}); pairs per rank {r['loads'][0]} -> {r['loads'][1]}")
    assert r["before"] > 1.5 and r["after"] <= 1.10, r
    h = _ok(results, "hierarchical")[0]
    print(f"hierarchical (2 groups of 2 ranks): {h['before']:.3f} -> {h['after']:.3f}")
    assert h["after"] < h["before"]


def test_model_router_logits_max_over_mean_after_rebalance(results):
    if results[0] != 4:
        pytest.skip("run on 4 ranks")
    if results[2] is None:
        pytest.skip("transformers is not installed")
    r = _ok(results, "model logits")[0]
    print(f"\ntiny Qwen3-MoE router logits, 64 experts, top-4, 4 ranks, R = 8: measured max/mean rank load "
          f"{r['before']:.3f} before, {r['after']:.3f} after rebalance; pairs per rank {r['loads'][0]} -> "
          f"{r['loads'][1]}")
    assert r["after"] <= 1.10 and r["after"] < r["before"], r


def test_rebalance_in_subgroups(results):
    if results[0] != 4:
        pytest.skip("run on 4 ranks")
    assert all(r["received"] > 0 and r["steps"] > 1 for r in _ok(results, "subgroups"))


def test_transformers_model_with_redundant_experts(results):
    if results[0] != 4:
        pytest.skip("run on 4 ranks")
    if results[2] is None:
        pytest.skip("transformers is not installed")
    for errs in _ok(results, "model"):
        assert all(v <= 1e-5 for v in errs.values()), errs
