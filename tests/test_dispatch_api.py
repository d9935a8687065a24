"""The public dispatch/combine API (`epmoe.make_dispatcher`), used without `MoELayer`, on 2 and 4 Gloo
ranks for every registered dispatcher that moves tokens:

- the rows a rank receives, with their local expert ids and weights, are what an independent
  computation of the routing says that rank must receive (every rank can recompute every rank's inputs
  from their seeds);
- combine of identity experts returns each token's input times the sum of its routing weights;
- two micro-batches in flight at once (dispatch A, dispatch B, then combine B, combine A or combine A,
  combine B, all async) are both correct;
- a backend added in a test through the registry alone is picked up by the contract, `MoELayer` and
  the forward header.
"""
import pytest
import torch
import torch.distributed as dist

import epmoe
from epmoe import MoEConfig, MoELayer, RankMismatch, contract, make_dispatcher, reference_moe
from epmoe.dispatch.allgather import AllGatherDispatcher
from epmoe.dispatch.base import Handle
from epmoe.layouts import FlatBatch
from epmoe.registry import unregister
from epmoe.testing import assert_close, load_experts, random_experts, random_inputs, run_on_ranks

H_REAL = 20                        # not a multiple of anything the wire aligns to
CFG = dict(num_experts=8, top_k=3, hidden_size=H_REAL, intermediate_size=16, dtype=torch.float32)
M = 9                              # capacity of the fixed-capacity dispatchers; rank 1 sends none


def moving_dispatchers() -> list[str]:
    return [n for n, cls in contract.DISPATCHERS.items()
            if cls.CAPS.communicates and contract.dispatcher_problem(n, None, 2, "cpu") is None]


def _tokens(rank: int, micro: int) -> int:
    return [M, 0, 1, 5][rank % 4] if micro == 0 else [2, 7, 0, M][rank % 4]


def _inputs(cfg, rank: int, micro: int):
    """Rank `rank`'s tokens of micro-batch `micro`: hidden [T, H], topk ids [T, k] int32, weights [T, k].
    Token 0 of rank 0 visits experts all on one rank; the rest is random."""
    T = _tokens(rank, micro)
    g = torch.Generator().manual_seed(1000 * micro + rank)
    x = torch.randn(T, cfg.hidden_size, generator=g)
    ids = torch.stack([torch.randperm(cfg.num_experts, generator=g)[:cfg.top_k] for _ in range(T)]).to(torch.int32) \
        if T else torch.zeros(0, cfg.top_k, dtype=torch.int32)
    if T and rank == 0:
        ids[0] = torch.arange(cfg.top_k, dtype=torch.int32)
    w = torch.rand(T, cfg.top_k, generator=g)
    return x, ids, w


def _expected_pairs(cfg, placement, world: int, micro: int) -> list[tuple]:
    """Every (token row, local id, weight) this rank's experts must receive, from every rank's inputs."""
    want = []
    for src in range(world):
        x, ids, w = _inputs(cfg, src, micro)
        for t in range(x.shape[0]):
            for s in range(cfg.top_k):
                local = placement.to_local(int(ids[t, s]))
                if local is not None:
                    want.append((tuple(x[t].tolist()), local, float(w[t, s])))
    return sorted(want)


def _received_pairs(batch, plan) -> list[tuple]:
    H = plan.hidden_size
    got = []
    if isinstance(batch, FlatBatch):
        for r in range(batch.x.shape[0]):
            for s in range(batch.local_ids.shape[1]):
                if int(batch.local_ids[r, s]) >= 0:
                    got.append((tuple(batch.x[r, :H].tolist()), int(batch.local_ids[r, s]),
                                float(batch.weights[r, s])))
        return sorted(got)
    return None


def _batched_rows(batch, plan) -> list[tuple]:
    H = plan.hidden_size
    return sorted((tuple(batch.x[e, i, :H].tolist()), e) for e in range(batch.x.shape[0])
                  for i in range(int(batch.counts[e])))


def _identity_experts(batch):
    """What experts equal to the identity return: flat rows weighted by their local slots, batched rows
    as they are (combine applies the weights there)."""
    if isinstance(batch, FlatBatch):
        valid = (batch.local_ids >= 0).float()
        return batch.x * (batch.weights * valid).sum(1, keepdim=True)
    return batch.x.clone()


def _check_received(cfg, d, batch, world, micro):
    want = _expected_pairs(cfg, d.placement, world, micro)
    assert want, "the inputs must give every rank something to receive"
    got = _received_pairs(batch, d.plan)
    if got is None:                      # batched: rows per expert, weights stay with the combine
        got = _batched_rows(batch, d.plan)
        want = sorted((row, local) for row, local, _ in want)
        assert batch.x.shape[:2] == (d.placement.num_local_experts, world * M)
    assert got == want, f"{d.name}: received {len(got)} pairs, expected {len(want)}"


def _attributes(d) -> dict:
    """The dispatcher's attributes by identity: a forward must add or replace none (its state lives in
    the handle)."""
    return {k: id(v) for k, v in vars(d).items()}


def _api_worker(rank, world, names):
    cfg = MoEConfig(**CFG)
    report = {}
    for name in names:
        d = make_dispatcher(name, cfg, group=dist.group.WORLD, max_tokens_per_rank=M)
        assert d.plan.dispatcher == name and d.plan.experts is None and d.plan.hidden_size == H_REAL
        before = _attributes(d)
        # one micro-batch, synchronous
        x, ids, w = _inputs(cfg, rank, 0)
        batch, handle = d.dispatch(x, ids, w)
        assert isinstance(handle, Handle) and handle.num_tokens == x.shape[0]
        _check_received(cfg, d, batch, world, 0)
        out = d.combine(_identity_experts(batch), handle)
        assert out.shape == x.shape
        assert_close(out, x.double() * w.double().sum(1, keepdim=True), 1e-6)
        # two micro-batches in flight: dispatch A, dispatch B, then combine B, combine A (A, B, B, A) or
        # combine A, combine B (A, B, A, B)
        (xa, ia, wa), (xb, ib, wb) = _inputs(cfg, rank, 0), _inputs(cfg, rank, 1)
        for order in ("ABBA", "ABAB"):
            pa = d.dispatch_async(xa, ia, wa)
            pb = d.dispatch_async(xb, ib, wb)
            batch_b, handle_b = pb.wait()
            batch_a, handle_a = pa.wait()
            _check_received(cfg, d, batch_a, world, 0)
            _check_received(cfg, d, batch_b, world, 1)
            if order == "ABBA":
                cb = d.combine_async(_identity_experts(batch_b), handle_b)
                ca = d.combine_async(_identity_experts(batch_a), handle_a)
            else:
                ca = d.combine_async(_identity_experts(batch_a), handle_a)
                cb = d.combine_async(_identity_experts(batch_b), handle_b)
            assert_close(cb.wait(), xb.double() * wb.double().sum(1, keepdim=True), 1e-6)
            assert_close(ca.wait(), xa.double() * wa.double().sum(1, keepdim=True), 1e-6)
            assert pa.overlaps and pb.overlaps   # Gloo work started with async_op=True runs beside the caller
        assert _attributes(d) == before, sorted(set(_attributes(d).items()) ^ set(before.items()))
        report[name] = "ok"
    return report


@pytest.mark.parametrize("world", [2, 4])
def test_public_dispatch_and_combine_on_every_dispatcher(world):
    names = moving_dispatchers()
    assert {"allgather", "alltoall", "low_latency"} <= set(names)
    reports = run_on_ranks(_api_worker, world, names, timeout_s=120)
    assert all(r == {n: "ok" for n in names} for r in reports), reports


def test_public_dispatch_checks_its_arguments():
    cfg = MoEConfig(**CFG)
    d = make_dispatcher("local", cfg)
    x, ids, w = _inputs(cfg, 0, 0)
    with pytest.raises(ValueError, match=r"hidden must be \[T, 20\]"):
        d.dispatch(x[:, :5], ids, w)
    with pytest.raises(TypeError, match="topk_weights must be float32"):
        d.dispatch(x, ids, w.double())
    with pytest.raises(ValueError, match=r"topk_ids must be \[T, top_k\]"):
        d.dispatch(x, ids[:, :2], w)
    with pytest.raises(ValueError, match="max_tokens_per_rank"):
        make_dispatcher("low_latency", cfg)
    with pytest.raises(epmoe.UnsupportedCombination, match="nvshmem"):
        make_dispatcher("nvshmem", cfg)


# ------------------------------------------------------------------- a backend through the registry
class _Echo(AllGatherDispatcher):
    """A test backend: the all-gather algorithm under another name and declaration."""

    CAPS = contract.DispatcherCaps(layout="flat", communicates=True, host_sync=True,
                                   summary="test backend registered through the registry alone")


def _fake_worker(rank, world):
    cfg = MoEConfig(**CFG)
    weights = random_experts(cfg, seed=4)
    layer = MoELayer(cfg, ep_group=dist.group.WORLD, dispatcher="_test_echo", experts="grouped_mm")
    load_experts(layer, weights)
    x, logits = random_inputs(cfg, 3 + rank, seed=rank)
    assert_close(layer(x, logits), reference_moe(x, logits, weights, cfg))
    other = MoELayer(cfg, ep_group=dist.group.WORLD, dispatcher="allgather", experts="grouped_mm")
    load_experts(other, weights)
    try:                                  # ranks calling it and a built-in one in the same step
        (layer if rank == 0 else other)(x, logits)
        return "no error"
    except RankMismatch as exc:
        return str(exc)


def test_a_backend_added_through_the_registry_alone():
    epmoe.register_dispatcher("_test_echo")(_Echo)
    try:
        assert ("_test_echo", "grouped_mm") in contract.supported_pairings(MoEConfig(**CFG), 2, "cpu")
        assert any(r.dispatcher == "_test_echo" for r in contract.support_matrix())
        assert "_test_echo" in moving_dispatchers()
        with pytest.raises(ValueError, match="already registered"):
            epmoe.register_dispatcher("_test_echo")(AllGatherDispatcher)
        errors = run_on_ranks(_fake_worker, 2, timeout_s=60)
        assert all("dispatcher differs (rank 0: '_test_echo', rank 1: 'allgather')" in e for e in errors), errors
    finally:
        unregister("_test_echo")
    assert "_test_echo" not in contract.DISPATCHERS


# ----------------------------------------------------------------------- shared experts in MoELayer
def _shared_worker(rank, world):
    cfg = MoEConfig(**CFG)
    layer = MoELayer(cfg, ep_group=dist.group.WORLD, dispatcher="alltoall", experts="grouped_mm")
    load_experts(layer, random_experts(cfg, seed=5))
    x, logits = random_inputs(cfg, 4 + rank, seed=rank)
    events = []
    start = layer.dispatcher.dispatch_async

    def dispatch_async(*args):
        pending = start(*args)
        events.append("dispatch started")
        wait = pending.wait
        pending.wait = lambda: (events.append("dispatch waited"), wait())[1]
        return pending
    layer.dispatcher.dispatch_async = dispatch_async
    shared_weight = torch.randn(cfg.hidden_size, cfg.hidden_size, generator=torch.Generator().manual_seed(9))

    def shared(h):
        events.append("shared experts")
        return h @ shared_weight
    routed = layer(x, logits)
    events.clear()
    both = layer(x, logits, shared_experts=shared)
    assert events == ["dispatch started", "shared experts", "dispatch waited"], events
    assert_close(both, routed.double() + (x @ shared_weight).double(), 1e-5)
    return "ok"


def test_moe_layer_computes_shared_experts_while_its_dispatch_is_in_flight():
    assert run_on_ranks(_shared_worker, 2, timeout_s=60) == ["ok", "ok"]
