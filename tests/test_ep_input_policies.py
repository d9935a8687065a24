"""The input policies with expert parallelism, on 2 Gloo ranks and every EP dispatcher x CPU experts
backend: inputs requiring grad are refused on every rank (the rank whose input requires grad raises
ValueError, its peer RankMismatch, never a hang), and the next forward is correct; NaN/Inf in some
tokens' hidden states or logits stay in those tokens' rows, on both ranks; float16 near the top of its
range matches the oracle; bf16 rows of H = 8 stay within their bound. All cases run in one `run_on_ranks` call (process start costs seconds)."""
import traceback

import pytest
import torch
import torch.distributed as dist

from epmoe import MoEConfig, MoELayer, RankMismatch, contract, reference_moe
from epmoe.testing import assert_close, bound_for, fp16_range_case, load_experts, random_experts, random_inputs
from epmoe.testing import run_on_ranks

EP_DISPATCHERS = ("allgather", "alltoall", "low_latency")
COUNTS = (5, 4)          # tokens of rank 0 and rank 1
# (rank, token, what): hidden NaN on a token sent to both ranks' experts; +Inf and NaN logits
POISONS = ((0, 1, "hidden_nan"), (0, 3, "logits_inf"), (1, 0, "logits_nan"))


def _pairs() -> list[tuple[str, str]]:
    cfg = MoEConfig(num_experts=8, top_k=2, hidden_size=24, intermediate_size=16)
    return [(d, x) for d in EP_DISPATCHERS for x in contract.EXPERTS
            if contract.pairing_problem(d, x, cfg, 2, "cpu") is None]


def _layer(cfg, dispatcher, experts, weights):
    layer = MoELayer(cfg, ep_group=dist.group.WORLD, dispatcher=dispatcher, experts=experts,
                     max_tokens_per_rank=max(COUNTS))
    load_experts(layer, weights)
    return layer


def _mine(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t[sum(COUNTS[:rank]):sum(COUNTS[:rank + 1])]


def _nonfinite_case(rank, dispatcher, experts):
    cfg = MoEConfig(num_experts=8, top_k=2, hidden_size=24, intermediate_size=16, dtype=torch.bfloat16)
    weights = random_experts(cfg, seed=3)
    layer = _layer(cfg, dispatcher, experts, weights)
    x, logits = random_inputs(cfg, sum(COUNTS), seed=8)
    logits[1, 0] = logits[1, 7] = 20.0                 # token 1 of rank 0 visits both ranks' experts
    x, logits = _mine(x, rank), _mine(logits, rank)
    clean = layer(x, logits)
    px, plogits = x.clone(), logits.clone()
    poisoned = [t for r, t, _ in POISONS if r == rank]
    for r, t, what in POISONS:
        if r == rank:
            value = float("nan") if what.endswith("nan") else float("inf")
            if what.startswith("hidden"):
                px[t, 4] = value
            else:
                plogits[t, 6] = value
    out = layer(px, plogits)
    others = [t for t in range(x.shape[0]) if t not in poisoned]
    assert torch.isfinite(out[others]).all(), f"rank {rank}: a non-finite value spread to other tokens"
    assert_close(out[others], clean[others], 1e-6, context=f"rank {rank}: other tokens, poisoned vs clean")
    for t in poisoned:                                  # softmax routing: NaN/Inf logits give NaN weights
        assert not torch.isfinite(out[t]).any(), f"rank {rank} token {t}: {out[t]}"


def _autograd_case(rank, dispatcher, experts):
    cfg = MoEConfig(num_experts=8, top_k=2, hidden_size=24, intermediate_size=16, dtype=torch.float32)
    weights = random_experts(cfg, seed=5)
    layer = _layer(cfg, dispatcher, experts, weights)
    x, logits = random_inputs(cfg, sum(COUNTS), seed=2)
    x, logits = _mine(x, rank), _mine(logits, rank)
    want = reference_moe(x, logits, weights, cfg)
    for grad_on in ({0}, {1}, {0, 1}):                  # one rank's input requires grad, or both
        which = "hidden_states" if 0 in grad_on and len(grad_on) == 1 else "router_logits"
        args = {"hidden_states": x.clone(), "router_logits": logits.clone()}
        if rank in grad_on:
            args[which].requires_grad_(True)
            with pytest.raises(ValueError, match=f"{which} requires grad.*inference only"):
                layer(args["hidden_states"], args["router_logits"])
        else:
            with pytest.raises(RankMismatch):
                layer(args["hidden_states"], args["router_logits"])
        assert_close(layer(x, logits), want, bound_for(cfg.dtype), context=f"after grad_on={grad_on}")
        with torch.no_grad():                            # the way around it
            assert_close(layer(args["hidden_states"], args["router_logits"]), want, bound_for(cfg.dtype))


def _fp16_case(rank, dispatcher, experts):
    cfg = MoEConfig(num_experts=8, top_k=2, hidden_size=24, intermediate_size=16, dtype=torch.float16)
    x, logits, weights, peak = fp16_range_case(cfg, sum(COUNTS), seed=4)
    assert peak > 65504
    layer = _layer(cfg, dispatcher, experts, weights)
    want = reference_moe(x, logits, weights, cfg)
    assert_close(layer(_mine(x, rank), _mine(logits, rank)), _mine(want, rank), bound_for(cfg.dtype))


def _short_rows_case(rank, dispatcher, experts):
    """bf16 with H = 8: within `bound_for(dtype, hidden_size=8)` (EP adds the partial sums' rounding)."""
    cfg = MoEConfig(num_experts=8, top_k=4, hidden_size=8, intermediate_size=128, dtype=torch.bfloat16)
    for seed in range(3):
        weights = random_experts(cfg, seed=seed)
        layer = _layer(cfg, dispatcher, experts, weights)
        weights = [tuple(w.to(cfg.dtype).float() for w in e) for e in weights]
        x, logits = random_inputs(cfg, sum(COUNTS), seed=10 + seed)
        want = reference_moe(x, logits, weights, cfg)
        assert_close(layer(_mine(x, rank), _mine(logits, rank)), _mine(want, rank),
                     bound_for(cfg.dtype, hidden_size=cfg.hidden_size), context=f"seed {seed}")


CASES = {"nonfinite": _nonfinite_case, "autograd": _autograd_case, "fp16": _fp16_case,
         "short_rows": _short_rows_case}


def _all_cases(rank, world_size):
    torch.manual_seed(0)
    results = {}
    for kind, fn in CASES.items():
        for dispatcher, experts in _pairs():
            name = f"{kind}-{dispatcher}-{experts}"
            try:
                fn(rank, dispatcher, experts)
                results[name] = None
            except (Exception, pytest.fail.Exception):
                results[name] = traceback.format_exc()
            dist.barrier()   # every case starts aligned (a case that strands a peer in a collective times out)
    return results


@pytest.fixture(scope="module")
def results():
    return run_on_ranks(_all_cases, 2, backend="gloo", timeout_s=240)


@pytest.mark.parametrize("name", [f"{k}-{d}-{x}" for k in CASES for d, x in _pairs()])
def test_two_ranks(results, name):
    errors = [f"rank {r}:\n{res[name]}" for r, res in enumerate(results) if res[name]]
    assert not errors, "\n".join(errors)


def test_every_ep_dispatcher_is_covered():
    assert {d for d, _ in _pairs()} == set(EP_DISPATCHERS)
    assert ("low_latency", "batched") in _pairs()
