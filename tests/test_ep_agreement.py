"""Every forward, the ranks of an EP group confirm they run the same layer's same forward and that none
failed; otherwise every rank raises (never a hang, never collectives paired across different layers)."""
import pytest
import torch
import torch.distributed as dist

from epmoe import MoEConfig, MoELayer, RankMismatch, contract, reference_moe
from epmoe.testing import assert_close, load_experts, random_experts, random_inputs, run_on_ranks

# every registered dispatcher that moves tokens on Gloo CPU ranks, with the experts "auto" picks for it
_SMALL = MoEConfig(num_experts=6, top_k=2, hidden_size=24, intermediate_size=16, dtype=torch.float32)
DISPATCHERS = [contract.resolve_names(d, "auto", _SMALL, 2, "cpu") for d, cls in contract.DISPATCHERS.items()
               if cls.CAPS.communicates and contract.dispatcher_problem(d, None, 2, "cpu") is None]


def _layers(dispatcher, experts):
    cfg = MoEConfig(num_experts=6, top_k=2, hidden_size=24, intermediate_size=16, dtype=torch.float32)
    made = []
    for seed in (1, 2):
        layer = MoELayer(cfg, ep_group=dist.group.WORLD, dispatcher=dispatcher, experts=experts,
                         max_tokens_per_rank=16)
        weights = random_experts(cfg, seed=seed)
        load_experts(layer, weights)
        made.append((layer, weights))
    return cfg, made


def _outcome(fn):
    try:
        fn()
        return "ok"
    except RankMismatch as exc:
        return f"RankMismatch: {exc}"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def _different_layers(rank, world, dispatcher, experts):
    cfg, [(a, wa), (b, wb)] = _layers(dispatcher, experts)
    x, logits = random_inputs(cfg, 5 + rank, seed=rank)
    mine = a if rank == 0 else b                      # rank 0 calls layer A, rank 1 layer B: a user bug
    first = _outcome(lambda: mine(x, logits))
    # the group is still usable: both ranks now call A, and the answer is right
    out = a(x, logits)
    assert_close(out, reference_moe(x, logits, wa, cfg))
    return first


def _failing_router(rank, world, dispatcher, experts):
    cfg, [(a, wa), _] = _layers(dispatcher, experts)
    x, logits = random_inputs(cfg, 4, seed=rank)

    def router(h, lg):                                 # rank 1 routes a token to one expert twice
        ids = torch.tensor([[0, 1]] * h.shape[0])
        if rank == 1:
            ids[0] = torch.tensor([2, 2])
        return ids, torch.full((h.shape[0], 2), 0.5)
    a.router = router
    first = _outcome(lambda: a(x, logits))
    a.router = None
    out = a(x, logits)
    assert_close(out, reference_moe(x, logits, wa, cfg))
    return first


@pytest.mark.parametrize("dispatcher, experts", DISPATCHERS)
def test_ranks_calling_different_layers_raise_everywhere(dispatcher, experts):
    results = run_on_ranks(_different_layers, 2, dispatcher, experts, timeout_s=60)
    for r in results:
        assert r.startswith("RankMismatch") and "same layer's same forward" in r, results


@pytest.mark.parametrize("dispatcher, experts", DISPATCHERS)
def test_one_rank_failing_makes_every_rank_raise(dispatcher, experts):
    results = run_on_ranks(_failing_router, 2, dispatcher, experts, timeout_s=60)
    assert results[1].startswith("ValueError") and "same expert twice" in results[1], results
    assert results[0].startswith("RankMismatch") and "rank(s) [1] could not compute" in results[0], results
