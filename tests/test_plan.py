"""The plan a pairing resolves into, once, when a layer or a dispatcher is built: what it says, that it
cannot be changed afterwards, that the dispatcher's wire format is the plan's, and that the parts read
the plan and never the config."""
import dataclasses
import pathlib
import re

import pytest
import torch

from epmoe import Fp8Config, Handoff, MoEConfig, MoELayer, contract
from epmoe.dispatch._comm import token_format


def _cfg(**quant):
    return MoEConfig(num_experts=8, top_k=2, hidden_size=200, intermediate_size=72, dtype=torch.float32,
                     quant=Fp8Config(**quant) if quant else None)


def test_plan_of_an_unquantized_pairing():
    plan = contract.build_plan("alltoall", "grouped_mm", _cfg(), 2, "cpu")
    assert (plan.layout, plan.handoff, plan.wire_dtype, plan.wire_scales) == ("flat", Handoff.NONE, torch.float32, 0)
    assert not plan.cuda_graph_safe and plan.host_sync and plan.max_tokens_per_rank is None
    assert (plan.hidden_size, plan.padded_hidden_size) == (200, _cfg().padded_hidden_size)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.handoff = Handoff.ON_THE_WIRE


def test_plan_of_fp8_on_the_wire_and_the_format_built_from_it():
    cfg = _cfg(dispatch_fp8=True)                     # block scales, activations per group of 128
    plan = contract.build_plan("low_latency", "reference", cfg, 2, "cpu", max_tokens_per_rank=4)
    groups = -(-cfg.padded_hidden_size // 128)
    assert plan.handoff is Handoff.ON_THE_WIRE and plan.fp8_on_the_wire
    assert (plan.wire_dtype, plan.wire_scales, plan.wire_scale_group) == (torch.float8_e4m3fn, groups, 128)
    assert plan.layout == "batched" and plan.max_tokens_per_rank == 4 and not plan.cuda_graph_safe
    fmt = token_format(plan)
    assert fmt.fields["x"].dtype == torch.float8_e4m3fn and fmt.fields["scales"].width == groups
    assert contract.build_plan("low_latency", "batched", _cfg(), 2, "cpu", max_tokens_per_rank=4).cuda_graph_safe


def test_plan_hand_offs_without_fp8_on_the_wire():
    cfg = _cfg()
    assert contract.build_plan("alltoall", "reference", _cfg(dispatch_fp8=False), 2, "cpu").handoff \
        is Handoff.AFTER_DISPATCH
    assert contract.build_plan("alltoall", None, _cfg(dispatch_fp8=False), 2, "cpu").handoff is Handoff.IN_EXPERTS
    with pytest.raises(ValueError, match="max_tokens_per_rank"):
        contract.build_plan("low_latency", "batched", cfg, 2, "cpu")
    with pytest.raises(contract.UnsupportedCombination, match="cannot send FP8"):
        contract.build_plan("allgather", None, _cfg(dispatch_fp8=True), 2, "cpu")


def test_layer_and_dispatcher_share_one_plan():
    layer = MoELayer(_cfg(), dispatcher="low_latency", experts="batched", max_tokens_per_rank=3)
    assert layer.dispatcher.plan is layer.plan and layer.activation_handoff is layer.plan.handoff
    assert layer.experts.plan is layer.plan                  # experts built from the plan too
    assert not hasattr(layer.dispatcher, "cfg") and not hasattr(layer.experts, "cfg")
    assert layer.dispatcher.fmt.signature() == token_format(layer.plan).signature()
    assert layer.plan.describe()["activation hand-off"] == "not quantized"


def test_a_dispatcher_that_takes_a_capacity_is_capturable_and_host_sync_free_only_with_one():
    """symm_high_throughput's contract: with max_tokens_per_rank fixed buffers, no host read, capturable;
    without it a host read sizes the forward (checked here on a probe class registered for the test)."""
    from epmoe.contract import DispatcherCaps
    from epmoe.dispatch.allgather import AllGatherDispatcher
    from epmoe.layouts import FLAT
    from epmoe.registry import register_dispatcher, unregister

    class Probe(AllGatherDispatcher):
        CAPS = DispatcherCaps(layout=FLAT, communicates=True, host_sync=True, cuda_graph_safe=True,
                              takes_max_tokens=True, summary="test probe")
    register_dispatcher("_test_takes_capacity")(Probe)
    try:
        bounded = contract.build_plan("_test_takes_capacity", "grouped_mm", _cfg(), 2, "cpu", max_tokens_per_rank=16)
        free = contract.build_plan("_test_takes_capacity", "grouped_mm", _cfg(), 2, "cpu")
    finally:
        unregister("_test_takes_capacity")
    assert bounded.max_tokens_per_rank == 16 and not bounded.host_sync
    assert free.max_tokens_per_rank is None and free.host_sync
    assert not free.cuda_graph_safe
    assert bounded.cuda_graph_safe      # grouped_mm is capturable too


def test_plan_holds_what_the_parts_need():
    cfg = MoEConfig(num_experts=8, top_k=2, hidden_size=200, intermediate_size=72, dtype=torch.float32,
                    activation="gelu", quant=Fp8Config(dispatch_fp8=True))
    plan = contract.build_plan("alltoall", "reference", cfg, 2, "cpu")
    assert (plan.dtype, plan.num_experts, plan.top_k, plan.activation) == (torch.float32, 8, 2, "gelu")
    assert (plan.quant, plan.weight_block, plan.weight_granularity, plan.act_group) == ("fp8_block", (128, 128),
                                                                                        "block", 128)
    assert plan.scheme is cfg.quant_scheme and plan.experts_read_strided_rows
    x = torch.randn(3, cfg.padded_hidden_size)
    q, s = plan.quantize(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (3, plan.wire_scales)


def test_experts_on_their_own_get_a_plan_of_their_own():
    """A bare config gives experts their own plan (one rank, no dispatcher): who quantizes is the
    experts' entry."""
    from epmoe.experts.reference import ReferenceExperts
    experts = ReferenceExperts(_cfg(weight_block=None, per_channel_weights=True, activation="per_token"))
    assert experts.plan.dispatcher is None and experts.plan.experts == "reference"
    assert experts.plan.handoff is Handoff.AFTER_DISPATCH and experts.plan.act_group is None
    with pytest.raises(ValueError, match="name a dispatcher"):
        contract.build_plan(None, None, _cfg(), 1, "cpu")


def test_build_plan_is_the_only_constructor_and_the_parts_never_read_the_config():
    """What the plan's docstring promises, held by the source: `MoEPlan(` is called in the contract only,
    and the dispatch and experts folders never name the config."""
    root = pathlib.Path(contract.__file__).parent
    builders = [p.relative_to(root).as_posix() for p in root.rglob("*.py") if "MoEPlan(" in p.read_text()]
    assert builders == ["contract.py"], builders
    reads = [f"{p.relative_to(root).as_posix()}:{i}" for folder in ("dispatch", "experts")
             for p in sorted((root / folder).rglob("*.py"))
             for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"\bcfg\b", line)]
    assert not reads, reads
