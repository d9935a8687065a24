"""Who quantizes the activations is settled when a layer is built: every FP8 cell of the
support matrix either builds and matches the oracle or is refused with UnsupportedCombination naming
both parts, and every hand-off is one of the declared ones."""
import pytest
import torch

from epmoe import Fp8Config, MoEConfig, MoELayer, UnsupportedCombination, contract, reference_moe
from epmoe.contract import (HANDOFF_AFTER_DISPATCH, HANDOFF_IN_EXPERTS, HANDOFF_NONE, HANDOFF_ON_THE_WIRE,
                            QUANTIZES_INTERNALLY, TAKES_FP8)
from epmoe.dispatch.local import LocalDispatcher
from epmoe.experts.reference import ReferenceExperts
from epmoe.layouts import FLAT
from epmoe.contract import example_configs
from epmoe.quant.fp8 import dequantize_weight, quantize_weight
from epmoe.testing import assert_close, bound_for, random_experts, random_inputs

HERE = "cuda" if torch.cuda.is_available() else "cpu"
ROWS = [r for r in contract.support_matrix() if r.quant != "none"]
HANDOFFS = {HANDOFF_ON_THE_WIRE, HANDOFF_AFTER_DISPATCH, HANDOFF_IN_EXPERTS}


# Probe backends: a dispatcher that moves tokens without FP8 support, one with it, and experts that
# quantize internally. Registered only inside the tests that use them.
class WireDispatcherNoFp8(LocalDispatcher):
    CAPS = contract.DispatcherCaps(layout=FLAT, communicates=True, summary="probe")


class WireDispatcherFp8(LocalDispatcher):
    CAPS = contract.DispatcherCaps(layout=FLAT, communicates=True, fp8_dispatch=True, summary="probe")


class SelfQuantizingExperts(ReferenceExperts):
    """Reference arithmetic, but declares that it takes high-precision rows and quantizes them itself."""
    name = "_self_quantizing"
    CAPS = contract.ExpertsCaps(layouts=frozenset({FLAT}), quant=frozenset({"none", "fp8_block", "fp8_channel"}),
                                fp8_activations=QUANTIZES_INTERNALLY, summary="probe")

    def forward_flat(self, batch, weights):
        assert batch.scales is None and batch.x.dtype == self.plan.dtype, "got FP8 rows"
        batch.x, batch.scales = self.plan.quantize(batch.x)
        return super().forward_flat(batch, weights)


@pytest.fixture
def probes(monkeypatch):
    monkeypatch.setitem(contract.DISPATCHERS, "_wire_nofp8", WireDispatcherNoFp8)
    monkeypatch.setitem(contract.DISPATCHERS, "_wire_fp8", WireDispatcherFp8)
    monkeypatch.setitem(contract.EXPERTS, "_self_quantizing", SelfQuantizingExperts)


def _cfg(**quant):
    return MoEConfig(num_experts=8, top_k=2, hidden_size=200, intermediate_size=72, dtype=torch.float32,
                     quant=Fp8Config(**quant))


def _id(r):
    return f"{r.dispatcher}-{r.experts}-{r.device}-{'ep' if r.multi_rank else '1rank'}-{r.quant}"


def test_matrix_has_fp8_columns_and_handoffs():
    quants = {r.quant for r in ROWS}
    assert quants == set(example_configs())
    assert any(r.problem is None for r in ROWS) and any(r.problem is not None for r in ROWS)
    for r in ROWS:
        if r.problem is None:
            assert r.extra["fp8_activations"] in HANDOFFS
        else:
            assert len(r.problem) > 20 and "fp8_activations" not in r.extra


@pytest.mark.parametrize("row", [r for r in ROWS if r.device == HERE and not r.multi_rank], ids=_id)
def test_single_rank_fp8_cells(row):
    cfg = example_configs()[row.quant]
    kwargs = dict(dispatcher=row.dispatcher, experts=row.experts, device=HERE, max_tokens_per_rank=64)
    if row.problem is not None:
        with pytest.raises(UnsupportedCombination) as info:
            MoELayer(cfg, **kwargs)
        assert row.dispatcher in str(info.value) and row.experts in str(info.value)
        return
    layer = MoELayer(cfg, **kwargs)
    assert layer.activation_handoff == row.extra["fp8_activations"]
    experts = random_experts(cfg, seed=1)
    for e, t in enumerate(experts):
        layer.load_expert(e, *t[:3])
    q = cfg.quant
    deq = [tuple(dequantize_weight(*quantize_weight(w, q.weight_granularity, q.weight_block), q.weight_block)
                 for w in t) for t in experts]
    x, logits = random_inputs(cfg, 33, device=HERE)
    # the library's FP8 bound: a backend whose FP8 GEMM writes bf16 (torch._scaled_grouped_mm) measures ~1.5e-2
    assert_close(layer(x, logits), reference_moe(x, logits, deq, cfg), bound_for(cfg.dtype, fp8=True))


def test_block_fp8_refused_by_scaled_grouped_mm_with_alternatives():
    with pytest.raises(UnsupportedCombination) as info:
        MoELayer(_cfg(), dispatcher="local", experts="grouped_mm")
    err = info.value
    assert "fp8_block" in err.reason and "grouped_mm" in str(err)
    assert any("reference" in alt for alt in err.alternatives)


def test_grouped_mm_fp8_needs_cuda_and_per_token_activations():
    cfg = _cfg(weight_block=None, per_channel_weights=True, activation="per_token")
    assert "only on CUDA" in contract.pairing_problem("local", "grouped_mm", cfg, 1, "cpu")
    cfg = _cfg(weight_block=None, per_channel_weights=True, activation="per_token_group")
    why = contract.pairing_problem("local", "grouped_mm", cfg, 1, "cuda")
    assert why is not None and ("per_token" in why or "compute capability" in why)


def test_dispatch_fp8_into_self_quantizing_experts_is_refused(probes):
    """The hand-off in reverse: FP8 on the wire into experts that want high-precision rows."""
    with pytest.raises(UnsupportedCombination) as info:
        contract.check_pairing("_wire_fp8", "_self_quantizing", _cfg(dispatch_fp8=True), 2, "cpu")
    err = info.value
    assert err.dispatcher == "_wire_fp8" and err.experts == "_self_quantizing"
    assert "quantize their activations internally" in err.reason
    assert "dispatcher='_wire_fp8', experts='reference'" in err.alternatives


def test_dispatch_fp8_through_a_dispatcher_without_it_is_refused(probes):
    with pytest.raises(UnsupportedCombination, match="cannot send FP8 rows"):
        contract.check_pairing("_wire_nofp8", "reference", _cfg(dispatch_fp8=True), 2, "cpu")
    # the same pair is fine with BF16 on the wire: the layer quantizes after dispatch
    contract.check_pairing("_wire_nofp8", "reference", _cfg(), 2, "cpu")


@pytest.mark.parametrize("dispatcher,experts,dispatch_fp8,want", [
    ("_wire_fp8", "reference", True, HANDOFF_ON_THE_WIRE),
    ("_wire_fp8", "reference", False, HANDOFF_AFTER_DISPATCH),
    ("_wire_nofp8", "reference", False, HANDOFF_AFTER_DISPATCH),
    ("_wire_nofp8", "_self_quantizing", False, HANDOFF_IN_EXPERTS),
    ("local", "reference", True, HANDOFF_AFTER_DISPATCH),       # no wire on one rank: nothing to send
    ("local", "_self_quantizing", True, HANDOFF_IN_EXPERTS),
])
def test_handoff(probes, dispatcher, experts, dispatch_fp8, want):
    cfg = _cfg(dispatch_fp8=dispatch_fp8)
    assert contract.pairing_problem(dispatcher, experts, cfg, 2 if dispatcher != "local" else 1, "cpu") is None
    assert contract.activation_handoff(dispatcher, experts, cfg) == want


def test_handoff_none_for_unquantized():
    cfg = MoEConfig(num_experts=8, top_k=2, hidden_size=16, intermediate_size=8)
    assert contract.activation_handoff("local", "reference", cfg) == HANDOFF_NONE
    assert MoELayer(cfg, experts="reference").activation_handoff == HANDOFF_NONE


def test_self_quantizing_experts_get_high_precision_rows_and_agree(probes):
    """Both hand-offs compute the same function: the one formula quantizes in either place."""
    cfg = _cfg(dispatch_fp8=True)
    a = MoELayer(cfg, dispatcher="local", experts="_self_quantizing")
    b = MoELayer(cfg, dispatcher="local", experts="reference")
    assert a.activation_handoff == HANDOFF_IN_EXPERTS and b.activation_handoff == HANDOFF_AFTER_DISPATCH
    experts = random_experts(cfg, seed=2)
    for layer in (a, b):
        for e, t in enumerate(experts):
            layer.load_expert(e, *t)
    x, logits = random_inputs(cfg, 17)
    assert torch.equal(a(x, logits), b(x, logits))


def test_experts_must_declare_a_known_fp8_handoff(monkeypatch):
    class Vague(ReferenceExperts):
        CAPS = contract.ExpertsCaps(layouts=frozenset({FLAT}), quant=frozenset({"fp8_block"}),
                                    fp8_activations="whatever")
    globals()["Vague"] = Vague
    monkeypatch.setitem(contract.EXPERTS, "_vague", Vague)
    why = contract.pairing_problem("local", "_vague", _cfg(), 1, "cpu")
    assert TAKES_FP8 in why and QUANTIZES_INTERNALLY in why
