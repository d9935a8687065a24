"""The support matrix `epmoe info` prints is the one the layer enforces: every 'ok' cell builds and
matches the oracle, every refused cell raises UnsupportedCombination naming both parts."""
import dataclasses

import pytest
import torch

from epmoe import MoEConfig, MoELayer, UnsupportedCombination, contract, reference_moe
from epmoe.testing import assert_close, bound_for, load_experts, random_experts, random_inputs

ROWS = contract.support_matrix()
HERE = "cuda" if torch.cuda.is_available() else "cpu"


def _id(r):
    return f"{r.dispatcher}-{r.experts}-{r.device}-{'ep' if r.multi_rank else '1rank'}-{r.quant}"


SINGLE_RANK_HERE = [r for r in ROWS if r.device == HERE and not r.multi_rank and r.quant == "none"]


@pytest.mark.parametrize("row", SINGLE_RANK_HERE, ids=_id)
def test_single_rank_cells(row):
    cfg = MoEConfig(num_experts=8, top_k=2, hidden_size=200, intermediate_size=72, dtype=torch.float32)
    kwargs = dict(dispatcher=row.dispatcher, experts=row.experts, device=HERE, max_tokens_per_rank=64)
    if row.problem is not None:
        with pytest.raises(UnsupportedCombination) as info:
            MoELayer(cfg, **kwargs)
        assert row.dispatcher in str(info.value) and row.experts in str(info.value)
        return
    layer = MoELayer(cfg, **kwargs)
    experts = random_experts(cfg)
    load_experts(layer, experts)
    x, logits = random_inputs(cfg, 33, device=HERE)
    assert_close(layer(x, logits), reference_moe(x, logits, experts, cfg), bound_for(cfg.dtype))


def test_local_dispatcher_refused_for_several_ranks():
    """EP with a dispatcher that does not communicate must be refused, never run."""
    cfg = MoEConfig(num_experts=8, top_k=2, hidden_size=16, intermediate_size=8)
    with pytest.raises(UnsupportedCombination) as info:
        contract.check_pairing("local", "grouped_mm", cfg, ep_size=8, device_type="cpu")
    err = info.value
    assert err.dispatcher == "local" and err.experts == "grouped_mm"
    assert "silently lose" in err.reason
    assert all("local" not in alt.split(",")[0] for alt in err.alternatives)
    assert isinstance(err, ValueError)


def test_every_refusal_has_a_reason_and_every_cell_is_listed():
    names = {(r.dispatcher, r.experts) for r in ROWS}
    assert names == {(d, x) for d in contract.DISPATCHERS for x in contract.EXPERTS}
    for r in ROWS:
        if r.problem is not None:
            assert len(r.problem) > 20
    assert any(r.problem is None for r in ROWS)


def test_layout_mismatch_is_refused():
    class BatchedOnly:
        CAPS = contract.ExpertsCaps(layouts=frozenset({"batched"}))
    contract.EXPERTS["_batched_only_probe"] = BatchedOnly
    globals()["BatchedOnly"] = BatchedOnly
    try:
        cfg = MoEConfig(num_experts=8, top_k=2, hidden_size=16, intermediate_size=8)
        with pytest.raises(UnsupportedCombination, match="produces the 'flat' layout"):
            MoELayer(cfg, dispatcher="local", experts="_batched_only_probe")
    finally:
        del contract.EXPERTS["_batched_only_probe"]


def test_auto_picks_explicit_names():
    cfg = MoEConfig(num_experts=8, top_k=2, hidden_size=16, intermediate_size=8)
    layer = MoELayer(cfg)
    assert layer.dispatcher_name == "local"
    assert layer.experts_name in contract.EXPERTS and layer.experts_name != "auto"
    assert "dispatcher=local" in repr(layer)


def test_public_names_not_provided_are_refused_through_the_contract():
    cfg = MoEConfig(num_experts=8, top_k=2, hidden_size=16, intermediate_size=8)
    with pytest.raises(UnsupportedCombination, match="nvshmem.*all_to_all_vdev transport is not provided") as info:
        MoELayer(cfg, dispatcher="nvshmem")
    peer = [d for d, cls in contract.DISPATCHERS.items() if cls.CAPS.peer_memory]    # what is there instead
    assert peer and all(f"dispatcher={d!r}" in info.value.alternatives for d in peer)
    assert str(peer) in str(info.value)


def test_statistics_are_a_declared_capability(monkeypatch):
    """`MoELayer.enable_stats` goes by what the dispatcher declares (`keeps_stats`), and every built-in
    dispatcher declares it exactly when it can count."""
    for name, cls in contract.DISPATCHERS.items():
        assert cls.CAPS.keeps_stats == callable(getattr(cls, "enable_stats", None)), name
    cfg = MoEConfig(num_experts=4, top_k=2, hidden_size=16, intermediate_size=8, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"dispatcher 'local' keeps no statistics .*these do: allgather, alltoall"):
        MoELayer(cfg).enable_stats()
    layer = MoELayer(cfg, dispatcher="alltoall")
    load_experts(layer, random_experts(cfg, seed=3))
    stats = layer.enable_stats()
    x, logits = random_inputs(cfg, 5, seed=4)
    layer(x, logits)
    assert int(stats.received_per_expert.sum()) == 5 * 2
    cls = contract.dispatcher_class("alltoall")           # a dispatcher that can count but does not declare it
    monkeypatch.setattr(cls, "CAPS", dataclasses.replace(cls.CAPS, keeps_stats=False))
    with pytest.raises(ValueError, match="dispatcher 'alltoall' keeps no statistics"):
        layer.enable_stats()
