"""The bounded `alltoall` (built with `max_tokens_per_rank`): fixed regions of M rows per rank, the count
carried in the data (rows past it routed nowhere), no host read but the forward header, a batch of
ep x M rows. On 2 and 4 Gloo ranks against the oracle and bit for bit against the unbounded `alltoall`
(the same rows reach the same experts in the same order): T = 0, a rank with no tokens, T = 1, every
token on one expert, hidden sizes that are no multiple of 128, FP8 on the wire; overflow raises on every
rank naming the setting, and the next forward is right.

All cases of one process group run in one `run_on_ranks` call (process start costs seconds).
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from epmoe import Fp8Config, MoEConfig, MoELayer, contract, reference_moe
from epmoe.dispatch._comm import CommDispatcher
from epmoe.quant.fp8 import dequantize_weight, quantize_weight
from epmoe.testing import assert_close, load_experts, random_experts, run_on_ranks

# name -> (config kwargs, tokens per rank (ranks past the list: 0), M, expert every token visits or None)
CASES = {
    "no_tokens_on_a_rank": (dict(num_experts=8, top_k=3, hidden_size=20), [5, 0, 1, 4], 5, None),
    "one_expert": (dict(num_experts=10, top_k=2, hidden_size=36), [4, 3, 0, 4], 4, 9),
    "capacity_above_T": (dict(num_experts=6, top_k=2, hidden_size=20), [1, 2, 3, 0], 7, None),
    "no_tokens_anywhere": (dict(num_experts=6, top_k=2, hidden_size=20), [0, 0, 0, 0], 2, None),
    "fp8_wire": (dict(num_experts=6, top_k=3, hidden_size=200, quant=Fp8Config(dispatch_fp8=True)),
                 [3, 5, 0, 2], 5, None),
}


def _cfg(kw):
    return MoEConfig(intermediate_size=24, dtype=torch.float32, **kw)


def _inputs(cfg, tokens, rank, seed, one_expert=None):
    """Every rank's tokens as rows of one global draw."""
    g = torch.Generator().manual_seed(seed)
    total = sum(tokens)
    x = torch.randn(total, cfg.hidden_size, generator=g)
    logits = torch.randn(total, cfg.num_experts, generator=g) * 2
    if one_expert is not None:
        logits[:, one_expert] = 50.0
    lo = sum(tokens[:rank])
    return x[lo:lo + tokens[rank]], logits[lo:lo + tokens[rank]]


def _oracle_experts(cfg, experts):
    if cfg.quant is None:
        return experts
    g, b = cfg.quant.weight_granularity, cfg.quant.weight_block
    return [tuple(dequantize_weight(*quantize_weight(w, g, b), b) for w in t) for t in experts]


class HostReads:
    """Makes every host read of a tensor's value outside the forward header an error (the rule of the
    graph-capturable path, checked on the CPU)."""

    NAMES = ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__", "numpy")

    def __enter__(self):
        self.inside = 0
        self.saved = {n: getattr(torch.Tensor, n) for n in self.NAMES}
        self.saved_headers = CommDispatcher.exchange_headers
        guard = self

        def headers(d, *a, **kw):
            guard.inside += 1
            try:
                return guard.saved_headers(d, *a, **kw)
            finally:
                guard.inside -= 1
        CommDispatcher.exchange_headers = headers
        for n, f in self.saved.items():
            def checked(t, *a, _f=f, _n=n, **kw):
                if not guard.inside:
                    raise AssertionError(f"host read ({_n}) outside the forward header")
                return _f(t, *a, **kw)
            setattr(torch.Tensor, n, checked)
        return self

    def __exit__(self, *exc):
        for n, f in self.saved.items():
            setattr(torch.Tensor, n, f)
        CommDispatcher.exchange_headers = self.saved_headers


def _forward_without_host_reads(layer, x, logits):
    """The layer's forward, its dispatch and combine reading nothing back but the forward header (the
    reference experts and the routing may)."""
    routing = layer.compute_routing(x, logits)
    d = layer.dispatcher
    with HostReads():
        batch, handle = d.dispatch(x, routing)
    y = layer.experts(batch, layer.expert_weights)
    with HostReads():
        return d.combine(y, handle)


def _bounded_cases(rank, world):
    report = {}
    for name, (kw, tokens, M, one) in CASES.items():
        tokens = (tokens + [0] * world)[:world]
        try:
            cfg = _cfg(kw)
            experts = random_experts(cfg, seed=len(name))
            bounded = MoELayer(cfg, ep_group=dist.group.WORLD, dispatcher="alltoall", experts="reference",
                               max_tokens_per_rank=M)
            packed = MoELayer(cfg, ep_group=dist.group.WORLD, dispatcher="alltoall", experts="reference")
            assert bounded.plan.max_tokens_per_rank == M and not bounded.plan.host_sync
            assert packed.plan.max_tokens_per_rank is None and packed.plan.host_sync
            for layer in (bounded, packed):
                load_experts(layer, experts)
            for step in range(2):                 # twice: nothing of the first forward is left over
                x, logits = _inputs(cfg, tokens, rank, seed=10 * step + world, one_expert=one)
                with torch.no_grad():
                    out = _forward_without_host_reads(bounded, x, logits)
                    want = packed(x, logits)
                assert out.shape == x.shape and torch.equal(out, want), "bounded differs from unbounded"
                if x.shape[0]:
                    assert_close(out, reference_moe(x, logits, _oracle_experts(cfg, experts), cfg),
                                 1e-3 if cfg.quant is not None else 1e-5, context=name)
            # the batch: ep x M rows whatever the routing, every (token, local expert) pair exactly once
            x, logits = _inputs(cfg, tokens, rank, seed=3, one_expert=one)
            routing = bounded.compute_routing(x, logits)
            batch, handle = bounded.dispatcher.dispatch(x, routing)
            assert batch.x.shape[0] == world * M and batch.x.is_contiguous()
            want_pairs = 0
            for src in range(world):
                xs, ls = _inputs(cfg, tokens, src, seed=3, one_expert=one)
                ids = packed.compute_routing(xs, ls).topk_ids
                want_pairs += sum(1 for e in ids.reshape(-1).tolist() if bounded.placement.to_local(e) is not None)
            assert int((batch.local_ids >= 0).sum()) == want_pairs and (want_pairs > 0) == (sum(tokens) > 0)
            bounded.dispatcher.combine(torch.zeros(batch.x.shape[0], cfg.padded_hidden_size), handle)
            report[name] = "ok"
        except Exception as exc:      # record and go on: the other cases still run
            report[name] = f"{type(exc).__name__}: {exc}"
    # overflow: an error naming the setting on every rank, then the group is usable again
    cfg = _cfg(dict(num_experts=8, top_k=2, hidden_size=20))
    layer = MoELayer(cfg, ep_group=dist.group.WORLD, dispatcher="alltoall", experts="reference",
                     max_tokens_per_rank=3)
    experts = random_experts(cfg, seed=5)
    load_experts(layer, experts)
    tokens = [2] * world
    tokens[world - 1] = 4
    x, logits = _inputs(cfg, tokens, rank, seed=6)
    try:
        with torch.no_grad():
            layer(x, logits)
        report["overflow"] = "no error"
    except ValueError as exc:
        report["overflow"] = str(exc)
    x, logits = _inputs(cfg, [3] * world, rank, seed=7)
    with torch.no_grad():
        assert_close(layer(x, logits), reference_moe(x, logits, experts, cfg), 1e-5)
    return report


@pytest.fixture(scope="module", params=[2, 4], ids=["2_ranks", "4_ranks"])
def reports(request):
    return request.param, run_on_ranks(_bounded_cases, request.param, backend="gloo", timeout_s=200)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bounded_alltoall_matches_unbounded_and_the_oracle(reports, name):
    world, per_rank = reports
    for rank, report in enumerate(per_rank):
        assert report[name] == "ok", f"{world} ranks, rank {rank}: {report[name]}"


def test_bounded_alltoall_overflow_names_the_setting_on_every_rank(reports):
    world, per_rank = reports
    for rank, report in enumerate(per_rank):
        msg = report["overflow"]
        assert f"rank {world - 1} passed 4 tokens, more than max_tokens_per_rank=3" in msg, f"rank {rank}: {msg}"


def test_bounded_alltoall_is_declared_graph_safe_with_a_capacity():
    """With a capacity the plan is capturable and reads nothing back (the contract and `epmoe info` say
    so); without one it is the host-synchronised packed path."""
    cfg = _cfg(dict(num_experts=8, top_k=2, hidden_size=20))
    caps = contract.dispatcher_class("alltoall").CAPS
    assert caps.takes_max_tokens and caps.cuda_graph_safe and not caps.needs_max_tokens
    bounded = contract.build_plan("alltoall", "grouped_mm", cfg, 2, "cpu", max_tokens_per_rank=16)
    packed = contract.build_plan("alltoall", "grouped_mm", cfg, 2, "cpu")
    assert bounded.cuda_graph_safe and not bounded.host_sync and bounded.max_tokens_per_rank == 16
    assert not packed.cuda_graph_safe and packed.host_sync and packed.max_tokens_per_rank is None
