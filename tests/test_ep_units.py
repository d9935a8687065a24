"""Single-process tests of the expert-parallel pieces: the wire format, placement conversions, the
`batched` experts backend, the low-latency batched layout and its overflow error, the declared
capabilities, and the host-sync-free low-latency path."""
import pytest
import torch

from epmoe import MoEConfig, MoELayer, Placement, UnsupportedCombination, contract, reference_moe
from epmoe.dispatch._comm import ALIGN, WireFormat, pack_tokens, token_format, unpack_tokens
from epmoe.dispatch.low_latency import LowLatencyDispatcher
from epmoe.experts.batched import BatchedExperts
from epmoe.experts.reference import ReferenceExperts
from epmoe.handshake import layer_signature
from epmoe.layouts import BatchedBatch, ExpertWeights
from epmoe.routing import Routing, route
from epmoe.testing import assert_close, bound_for, load_experts, random_experts, random_inputs


# ------------------------------------------------------------------------------------------ the wire
def test_wire_format_fields_are_aligned_views():
    fmt = WireFormat([("x", torch.bfloat16, 7), ("ids", torch.int32, 3), ("w", torch.float32, 3),
                      ("q", torch.float8_e4m3fn, 5)])
    assert fmt.row_bytes % ALIGN == 0
    assert all(f.offset % ALIGN == 0 for f in fmt.fields.values())
    buf = fmt.empty(4)
    x = torch.randn(4, 7).to(torch.bfloat16)
    fmt.view(buf, "x").copy_(x)
    fmt.view(buf, "ids").copy_(torch.arange(12, dtype=torch.int32).view(4, 3))
    v = fmt.view(buf, "x")
    assert v.data_ptr() - buf.data_ptr() == fmt.fields["x"].offset      # a view, not a copy
    assert torch.equal(v, x)
    assert fmt.view(buf, "ids")[3].tolist() == [9, 10, 11]
    assert fmt.signature()[0] == ("x", "bfloat16", 7)


def test_pack_unpack_round_trip_with_broadcast_and_padding():
    cfg = MoEConfig(num_experts=4, top_k=2, hidden_size=24, intermediate_size=8)
    base = token_format(contract.build_plan("alltoall", "reference", cfg, 2, "cpu"))
    assert base.row_bytes <= 24 * 2 + 8 * 2 + 2 * ALIGN
    fmt = WireFormat([(f.name, f.dtype, f.width) for f in base.fields.values()] + [("header", torch.int32, 4)])
    x = torch.randn(3, 24).to(torch.bfloat16)
    ids = torch.tensor([[[0, -1], [1, 0], [-1, -1]], [[-1, 1], [-1, -1], [0, 1]]], dtype=torch.int32)
    w = torch.rand(3, 2)
    buf = fmt.empty(2, 5)
    pack_tokens(fmt, buf[:, :3], x, ids, w, header=3)      # x and w broadcast over the 2 destinations
    pack_tokens(fmt, buf[:, 3:], 0, -1, 0.0, header=3)     # padding rows
    rows = unpack_tokens(fmt, buf)
    assert torch.equal(rows.x[1, :3], x) and torch.equal(rows.x[0, 3:], torch.zeros(2, 24, dtype=torch.bfloat16))
    assert torch.equal(rows.ids[:, :3], ids) and (rows.ids[:, 3:] == -1).all()
    assert torch.equal(rows.weights[0, :3], w) and (fmt.view(buf, "header") == 3).all() and rows.scales is None
    dense = unpack_tokens(fmt, buf, contiguous=True)
    assert dense.x.is_contiguous() and torch.equal(dense.x, rows.x)


# -------------------------------------------------------------------------------------- placement
def test_placement_conversions_for_other_ranks():
    p = Placement(7, 3, 1)                                   # 3, 2, 2 experts
    assert p.owners == (0, 0, 0, 1, 1, 2, 2) and p.num_local_experts == 2
    ids = torch.tensor([[0, 3], [4, 6], [-1, 3]])
    assert p.local_ids(ids).tolist() == [[-1, 0], [1, -1], [-1, 0]]          # -1 stays -1
    on = p.local_ids_on(ids[:2], torch.arange(3).view(3, 1, 1))
    assert on.tolist() == [[[0, -1], [-1, -1]], [[-1, 0], [1, -1]], [[-1, -1], [-1, 1]]]
    explicit = Placement(4, 2, 0, [1, 0, 1, 0])
    assert explicit.local_ids(torch.tensor([[0, 1, 2, 3]])).tolist() == [[-1, 0, -1, 1]]
    assert explicit.local_ids_on(torch.tensor([[0, 1, 2, 3]]), 1).tolist() == [[0, -1, 1, -1]]


# ------------------------------------------------------------------------------- batched experts
def _weights(cfg, seed=0, bias=False) -> ExpertWeights:
    """Every expert's weights in the fused layout, as a one-rank layer stores them."""
    layer = MoELayer(cfg, dispatcher="local", experts="reference", expert_bias=bias)
    load_experts(layer, random_experts(cfg, seed=seed, with_bias=bias))
    return layer.expert_weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", ["silu", "swigluoai"])
def test_batched_experts_match_the_reference_and_ignore_padding(dtype, bias, activation):
    cfg = MoEConfig(num_experts=4, top_k=2, hidden_size=40, intermediate_size=24, activation=activation,
                    dtype=dtype)
    w = _weights(cfg, bias=bias)
    x = torch.randn(4, 6, 40).to(dtype)
    counts = torch.tensor([6, 0, 3, 1], dtype=torch.int32)
    x[2, 3:] = float("nan")                                    # padding the dispatcher never wrote
    x[3, 1:] = float("inf")
    batch = BatchedBatch(x, counts)
    got = BatchedExperts(cfg)(batch, w)
    want = ReferenceExperts(cfg)(BatchedBatch(x.clone(), counts), w)
    assert got.shape == (4, 6, 40) and got.dtype == dtype
    assert torch.isfinite(got).all()
    assert (got[1] == 0).all() and (got[2, 3:] == 0).all() and (got[3, 1:] == 0).all()
    for e, n in enumerate(counts.tolist()):
        if n:
            assert_close(got[e, :n], want[e, :n], bound_for(dtype), context=f"expert {e}")


def test_batched_experts_refuse_a_wrong_batch():
    cfg = MoEConfig(num_experts=4, top_k=2, hidden_size=16, intermediate_size=8)
    w = _weights(cfg)
    with pytest.raises(ValueError, match="3 experts"):
        BatchedExperts(cfg)(BatchedBatch(torch.zeros(3, 2, 16, dtype=cfg.dtype), torch.zeros(3)), w)


# ------------------------------------------------------------------- low_latency on one rank
def _ll(E=6, k=2, M=5, H=16):
    cfg = MoEConfig(num_experts=E, top_k=k, hidden_size=H, intermediate_size=8, dtype=torch.float32)
    plan = contract.build_plan("low_latency", "batched", cfg, 1, "cpu", max_tokens_per_rank=M)
    return cfg, LowLatencyDispatcher(plan, Placement(E, 1, 0), None, torch.device("cpu"))


def test_low_latency_batched_layout_is_static_and_ordered():
    cfg, d = _ll()
    x = torch.randn(4, 16)
    ids = torch.tensor([[2, 0], [0, 5], [5, 2], [1, 0]], dtype=torch.int32)
    w = torch.rand(4, 2)
    batch, handle = d.dispatch(x, Routing(ids, w))
    assert batch.x.shape == (6, 5, 16)                       # [L, C = ep * M, H], whatever the routing
    assert batch.counts.tolist() == [3, 1, 2, 0, 0, 2]
    for e in range(6):                                       # each expert's rows in token order
        toks = [t for t in range(4) if e in ids[t].tolist()]
        assert torch.equal(batch.x[e, :len(toks)], x[toks])
    y = batch.x * 2                                          # an "expert" doubling its rows
    out = d.combine(torch.where(torch.arange(5).view(1, 5, 1) < batch.counts.view(6, 1, 1), y, 0), handle)
    assert torch.allclose(out, 2 * x * w.sum(1, keepdim=True))


def test_low_latency_overflow_names_the_setting():
    cfg, d = _ll(M=3)
    x = torch.randn(4, 16)
    routing = route(torch.randn(4, 6), cfg)
    with pytest.raises(ValueError, match=r"rank 0 passed 4 tokens, more than max_tokens_per_rank=3"):
        d.combine(*_run_experts(d, x, routing))
    out = d.combine(*_run_experts(d, x[:3], Routing(routing.topk_ids[:3], routing.topk_weights[:3])))
    assert out.shape == (3, 16)                               # usable again at the capacity


def _run_experts(d, x, routing):
    batch, handle = d.dispatch(x, routing)
    return batch.x, handle


def test_low_latency_reads_nothing_back_outside_the_overflow_check(monkeypatch):
    """The GPU-path rule, checked on the CPU: dispatch, the batched experts and combine never read a
    tensor's value on the host (no .item/.tolist/nonzero/bool); with peers only the forward header is read
    (and with one rank, as here, nothing at all)."""
    cfg = MoEConfig(num_experts=6, top_k=2, hidden_size=16, intermediate_size=8)
    layer = MoELayer(cfg, dispatcher="low_latency", experts="batched", max_tokens_per_rank=8)
    load_experts(layer, random_experts(cfg))
    x, logits = random_inputs(cfg, 5)
    routing = layer.compute_routing(x, logits)
    want = layer.forward_routed(x, routing)

    def forbidden(*a, **k):
        raise AssertionError("host read on the low-latency path")
    for name in ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__", "numpy", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    monkeypatch.setattr(torch, "nonzero", forbidden)
    monkeypatch.setattr(torch, "bincount", forbidden)
    got = layer.forward_routed(x, routing)
    monkeypatch.undo()
    assert torch.equal(got, want)


def test_low_latency_matches_the_oracle_on_one_rank_at_full_capacity():
    cfg = MoEConfig(num_experts=4, top_k=1, hidden_size=32, intermediate_size=16)
    layer = MoELayer(cfg, dispatcher="low_latency", experts="batched", max_tokens_per_rank=9)
    experts = random_experts(cfg)
    load_experts(layer, experts)
    x, logits = random_inputs(cfg, 9)
    logits[:, 2] += 100                                      # every token to expert 2: exactly full
    assert_close(layer(x, logits), reference_moe(x, logits, experts, cfg), bound_for(cfg.dtype))


# ------------------------------------------------------------------------- contract declarations
def test_declared_capabilities():
    caps = {d: contract.dispatcher_class(d).CAPS for d in ("allgather", "alltoall", "low_latency")}
    assert all(c.communicates for c in caps.values())
    # FP8 dispatch (quantized before the wire, scales along): alltoall and low_latency, not allgather
    assert caps["alltoall"].fp8_dispatch and caps["low_latency"].fp8_dispatch and not caps["allgather"].fp8_dispatch
    # alltoall: host-synchronised without a capacity, capturable with one (the plan decides)
    assert caps["alltoall"].layout == "flat" and caps["alltoall"].host_sync and caps["alltoall"].cuda_graph_safe
    assert caps["alltoall"].takes_max_tokens and not caps["alltoall"].needs_max_tokens
    assert caps["allgather"].layout == "flat" and caps["allgather"].host_sync
    ll = caps["low_latency"]
    assert ll.layout == "batched" and not ll.host_sync and ll.cuda_graph_safe and ll.needs_max_tokens
    b = contract.experts_class("batched").CAPS
    assert b.layouts == frozenset({"batched"}) and b.cuda_graph_safe


def test_pairings_and_auto():
    cfg = MoEConfig(num_experts=8, top_k=2, hidden_size=16, intermediate_size=8)
    with pytest.raises(UnsupportedCombination, match="produces the 'flat' layout"):
        contract.check_pairing("alltoall", "batched", cfg, 2, "cpu")
    with pytest.raises(UnsupportedCombination, match="produces the 'batched' layout"):
        contract.check_pairing("low_latency", "grouped_mm", cfg, 2, "cpu")
    assert contract.resolve_names("auto", "auto", cfg, 2, "cpu")[0] == "alltoall"
    assert contract.resolve_names("low_latency", "auto", cfg, 2, "cpu") == ("low_latency", "batched")
    with pytest.raises(ValueError, match="max_tokens_per_rank"):
        MoELayer(cfg, dispatcher="low_latency", experts="batched")


def test_handshake_signature_covers_what_ranks_must_share():
    cfg = MoEConfig(num_experts=8, top_k=2, hidden_size=16, intermediate_size=8)
    sig = layer_signature(MoELayer(cfg, dispatcher="low_latency", experts="batched", max_tokens_per_rank=4))
    for key in ("config", "plan", "placement", "dispatcher", "wire format", "experts", "max_tokens_per_rank",
                "expert_bias", "device_type"):
        assert key in sig
    assert "sizes (H, Hp, I, Ip)" in sig["plan"]
    assert sig["wire format"][0] == "low_latency" and sig["max_tokens_per_rank"] == 4


def test_stats_hook_counts_rows_and_expert_pairs():
    cfg, d = _ll(E=4, k=2, M=4)
    stats = d.enable_stats()
    x = torch.randn(3, 16)
    d.dispatch(x, Routing(torch.tensor([[0, 1], [1, 2], [3, 1]], dtype=torch.int32), torch.rand(3, 2)))
    assert stats.forwards == 1 and stats.dispatch_rows == [4]
    assert stats.received_per_expert.tolist() == [1, 3, 1, 1]
    assert stats.as_dict()["dispatch_bytes"] == [4 * d.fmt.row_bytes]
