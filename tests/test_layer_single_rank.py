"""Every routing x activation x dtype x experts backend against the float64 oracle, on one rank."""
import pytest
import torch

from epmoe import MoEConfig, MoELayer, UnsupportedCombination, reference_moe
from epmoe.testing import assert_close, bound_for, load_experts, random_experts, random_inputs

ROUTINGS = {
    "softmax-renorm": dict(scoring="softmax", renormalize=True),
    "softmax-plain": dict(scoring="softmax", renormalize=False),
    "sigmoid-grouped": dict(scoring="sigmoid", renormalize=True, n_group=4, topk_group=2, routed_scaling_factor=2.5),
    "sigmoid-plain-scaled": dict(scoring="sigmoid", renormalize=False, routed_scaling_factor=1.5),
    "custom": dict(scoring="softmax", renormalize=True),
}
ACTIVATIONS = ["silu", "gelu", "swigluoai"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BACKENDS = ["reference", "grouped_mm"]


def random_router(x, logits):
    """A custom router: distinct random experts per token, random positive weights."""
    g = torch.Generator().manual_seed(x.shape[0])
    ids = torch.stack([torch.randperm(16, generator=g)[:4] for _ in range(x.shape[0])]) if x.shape[0] else \
        torch.zeros(0, 4, dtype=torch.int64)
    w = torch.rand(x.shape[0], 4, generator=g) + 0.1
    return ids, w


def build(routing, activation, dtype, backend, hidden=200, inter=72, seed=0):
    cfg = MoEConfig(num_experts=16, top_k=4, hidden_size=hidden, intermediate_size=inter,
                    activation=activation, dtype=dtype, **ROUTINGS[routing])
    layer = MoELayer(cfg, experts=backend, router=random_router if routing == "custom" else None)
    experts = random_experts(cfg, seed=seed)
    assert load_experts(layer, experts) == 16
    if layer.score_correction_bias is not None:
        layer.score_correction_bias.copy_(torch.randn(16, generator=torch.Generator().manual_seed(5)) * 0.2)
    return cfg, layer, experts


def oracle(layer, cfg, experts, x, logits):
    routing = layer.compute_routing(x, logits) if layer.router is not None else None
    return reference_moe(x, logits, experts, cfg, score_correction_bias=layer.score_correction_bias,
                         routing=routing)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_matches_oracle(routing, activation, dtype, backend):
    cfg, layer, experts = build(routing, activation, dtype, backend)
    for T in (0, 1, 37):
        x, logits = random_inputs(cfg, T, seed=T + 11)
        out = layer(x, logits)
        assert out.shape == (T, cfg.hidden_size) and out.dtype == dtype
        if T:
            assert_close(out, oracle(layer, cfg, experts, x, logits), bound_for(dtype),
                         context=f"{routing} {activation} {dtype} {backend} T={T}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_token_on_one_expert(backend):
    cfg = MoEConfig(num_experts=8, top_k=1, hidden_size=136, intermediate_size=40, dtype=torch.float32)
    layer = MoELayer(cfg, experts=backend)
    experts = random_experts(cfg, seed=2)
    load_experts(layer, experts)
    x, logits = random_inputs(cfg, 64)
    logits[:, 5] += 100.0
    out = layer(x, logits)
    assert (layer.compute_routing(x, logits).topk_ids == 5).all()
    assert_close(out, reference_moe(x, logits, experts, cfg))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("hidden, inter", [(180, 7), (1, 1), (131, 45)])
def test_unaligned_sizes_are_padded_inside(backend, dtype, hidden, inter):
    """Sizes whose rows are not 16-byte aligned (grouped GEMMs need it) work; callers see real sizes."""
    cfg = MoEConfig(num_experts=8, top_k=2, hidden_size=hidden, intermediate_size=inter, dtype=dtype)
    layer = MoELayer(cfg, experts=backend, expert_bias=True)
    experts = random_experts(cfg, seed=4, with_bias=True)
    load_experts(layer, experts)
    x, logits = random_inputs(cfg, 19)
    out = layer(x, logits)
    assert out.shape == (19, hidden) and out.is_contiguous()
    assert_close(out, reference_moe(x, logits, experts, cfg), bound_for(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_expert_biases(backend):
    cfg = MoEConfig(num_experts=8, top_k=4, hidden_size=200, intermediate_size=72, activation="swigluoai",
                    dtype=torch.float32)
    layer = MoELayer(cfg, experts=backend, expert_bias=True)
    experts = random_experts(cfg, with_bias=True)
    load_experts(layer, experts)
    x, logits = random_inputs(cfg, 29)
    assert_close(layer(x, logits), reference_moe(x, logits, experts, cfg))


def test_backends_agree_with_each_other_and_outputs_are_nonzero():
    cfg, ref_layer, experts = build("softmax-renorm", "silu", torch.float32, "reference")
    _, mm_layer, _ = build("softmax-renorm", "silu", torch.float32, "grouped_mm")
    x, logits = random_inputs(cfg, 64)
    a, b = ref_layer(x, logits), mm_layer(x, logits)
    assert a.abs().min() > 0 or a.abs().mean() > 1e-3
    assert_close(a, b.double())


# ------------------------------------------------------------------------------------ bad inputs
@pytest.fixture
def small():
    cfg = MoEConfig(num_experts=8, top_k=2, hidden_size=16, intermediate_size=8, dtype=torch.float32)
    layer = MoELayer(cfg, experts="grouped_mm")
    load_experts(layer, random_experts(cfg))
    return cfg, layer


@pytest.mark.parametrize("x, logits, exc, message", [
    (torch.randn(4, 15), torch.randn(4, 8), ValueError, r"\[T, 16\]"),
    (torch.randn(2, 4, 16), torch.randn(8, 8), ValueError, r"\[T, 16\]"),
    (torch.randn(4, 16).bfloat16(), torch.randn(4, 8), TypeError, "dtype"),
    (torch.randn(4, 16), torch.randn(4, 7), ValueError, r"\[T, E\] = \[4, 8\]"),
    (torch.randn(4, 16), torch.randn(5, 8), ValueError, r"\[T, E\] = \[4, 8\]"),
    (torch.randn(4, 16), torch.ones(4, 8, dtype=torch.int64), TypeError, "floating point"),
    (torch.randn(4, 16), None, ValueError, "router_logits is required"),
    ([[0.0] * 16], torch.randn(1, 8), TypeError, "must be a tensor"),
    (torch.randn(4, 16, device="meta"), torch.randn(4, 8), ValueError, "is on meta"),
    (torch.randn(4, 16), torch.randn(4, 8, device="meta"), ValueError, "is on meta"),
])
def test_bad_inputs(small, x, logits, exc, message):
    _, layer = small
    with pytest.raises(exc, match=message):
        layer(x, logits)


def test_unloaded_experts_refuse_to_run():
    cfg = MoEConfig(num_experts=8, top_k=2, hidden_size=16, intermediate_size=8, dtype=torch.float32)
    layer = MoELayer(cfg)
    experts = random_experts(cfg)
    for e in range(7):
        layer.load_expert(e, *experts[e])
    with pytest.raises(RuntimeError, match=r"1 local experts were never loaded \(global ids 7\)"):
        layer(torch.randn(2, 16), torch.randn(2, 8))
    layer.load_expert(7, *experts[7])
    layer(torch.randn(2, 16), torch.randn(2, 8))
    # a state dict round trip counts as loading
    fresh = MoELayer(cfg)
    fresh.load_state_dict(layer.state_dict())
    x, logits = random_inputs(cfg, 5)
    assert torch.equal(fresh(x, logits), layer(x, logits))


def test_load_expert_checks(small):
    cfg, layer = small
    g, u, d = random_experts(cfg)[0]
    with pytest.raises(ValueError, match=r"gate_proj must have shape \[8, 16\]"):
        layer.load_expert(0, gate_proj=g.T, up_proj=u, down_proj=d)
    with pytest.raises(ValueError, match=r"down_proj must have shape \[16, 8\]"):
        layer.load_expert(0, gate_proj=g, up_proj=u, down_proj=d.T)
    with pytest.raises(ValueError, match=r"expert id must be an int in \[0, 8\)"):
        layer.load_expert(8, gate_proj=g, up_proj=u, down_proj=d)
    with pytest.raises(ValueError, match="expert_bias=False"):
        layer.load_expert(0, gate_proj=g, up_proj=u, down_proj=d, gate_bias=torch.zeros(8))
    with pytest.raises(TypeError, match="must be a tensor"):
        layer.load_expert(0, gate_proj=g.tolist(), up_proj=u, down_proj=d)
    assert layer.load_expert(0, gate_proj=g, up_proj=u, down_proj=d) is True
    assert torch.equal(layer.w13[0, :8], g) and torch.equal(layer.w13[0, 8:], u) and torch.equal(layer.w2[0], d)


def test_layer_construction_errors():
    cfg = MoEConfig(num_experts=8, top_k=2, hidden_size=16, intermediate_size=8)
    with pytest.raises(ValueError, match="unknown experts backend 'cutlass'"):
        MoELayer(cfg, experts="cutlass")
    with pytest.raises(ValueError, match="unknown dispatcher 'magic'"):
        MoELayer(cfg, dispatcher="magic")
    with pytest.raises(TypeError, match="MoEConfig"):
        MoELayer(dict(num_experts=8))
    with pytest.raises(ValueError, match="max_tokens_per_rank"):
        MoELayer(cfg, max_tokens_per_rank=0)
    with pytest.raises(ValueError, match="torch.distributed is not initialized"):
        MoELayer(cfg, ep_group=object())


# ------------------------------------------------------------------ state dicts, dtype, device (review)
def _loaded_layer(cfg=None):
    cfg = cfg or MoEConfig(num_experts=4, top_k=2, hidden_size=16, intermediate_size=8, dtype=torch.float32)
    layer = MoELayer(cfg)
    experts = random_experts(cfg)
    load_experts(layer, experts)
    return cfg, layer, experts


def test_partial_state_dict_does_not_count_as_loaded():
    cfg, layer, _ = _loaded_layer()
    fresh = MoELayer(cfg)
    fresh.load_state_dict({}, strict=False)
    parent = torch.nn.ModuleDict({"moe": MoELayer(cfg), "lin": torch.nn.Linear(3, 3)})
    parent.load_state_dict({"lin.weight": torch.ones(3, 3), "lin.bias": torch.ones(3)}, strict=False)
    x, logits = random_inputs(cfg, 3)
    for module in (fresh, parent["moe"]):
        with pytest.raises(RuntimeError, match="never loaded"):
            module(x, logits)


def test_state_dict_of_other_experts_is_refused():
    cfg, layer, _ = _loaded_layer()
    sd = layer.state_dict()
    # a shard holding an expert this layer does not hold (the keys carry the global expert ids)
    other = {k.replace("experts.3.", "experts.5."): v for k, v in sd.items()}
    fresh = MoELayer(cfg)
    with pytest.raises(ValueError, match="another rank's shard"):
        fresh.load_state_dict(other)
    with pytest.raises(RuntimeError, match="never loaded"):
        fresh(*random_inputs(cfg, 2))
    fresh.load_state_dict(sd)
    x, logits = random_inputs(cfg, 5)
    assert torch.equal(fresh(x, logits), layer(x, logits))


@pytest.mark.parametrize("bad", [torch.int8, torch.int32, torch.float8_e4m3fn])
def test_weights_without_meaning_are_refused(bad):
    cfg, layer, experts = _loaded_layer()
    g, u, d = experts[0]
    with pytest.raises(TypeError, match="floating-point|without their scales"):
        layer.load_expert(0, gate_proj=g.to(bad), up_proj=u, down_proj=d)


def test_dtype_conversion_refused_device_move_kept_consistent():
    cfg, layer, experts = _loaded_layer()
    with pytest.raises(TypeError, match="dtype is fixed by its MoEConfig"):
        layer.half()
    assert layer.w13.dtype == torch.float32
    assert layer.to("cpu") is layer and layer.device == torch.device("cpu")
    x, logits = random_inputs(cfg, 7)
    assert_close(layer(x, logits), reference_moe(x, logits, experts, cfg))
    with pytest.raises(UnsupportedCombination, match="not meta"):
        layer.to("meta")


def test_a_move_the_experts_refuse_leaves_the_layer_where_it_was(monkeypatch):
    """The dispatcher and the experts hear of the new device (and may refuse it) before any tensor moves."""
    from epmoe import contract
    cfg, layer, experts = _loaded_layer()
    told = []

    def refuse(device, plan):
        told.append((device, plan.experts))
        raise RuntimeError("its kernels cannot run there")

    real_build_plan = contract.build_plan
    monkeypatch.setattr(contract, "build_plan", lambda *args, **kw: real_build_plan(*args, **{**kw, "check_device": False}))
    monkeypatch.setattr(layer.experts, "move_to", refuse)
    with pytest.raises(RuntimeError, match="cannot run there"):
        layer.to("meta")
    assert told == [(torch.device("meta"), layer.experts_name)]
    assert layer.w13.device == torch.device("cpu") and layer.device == torch.device("cpu")
    assert layer.dispatcher.device == torch.device("cpu") and layer.experts.device == torch.device("cpu")
    x, logits = random_inputs(cfg, 5)
    assert_close(layer(x, logits), reference_moe(x, logits, experts, cfg))
    # a dispatcher on a process group refuses: its peers and workspace stay where the rank was built
    monkeypatch.undo()
    monkeypatch.setattr(contract, "build_plan", lambda *args, **kw: real_build_plan(*args, **{**kw, "check_device": False}))
    monkeypatch.setattr(layer.dispatcher, "group", "a process group")
    with pytest.raises(ValueError, match="stays on the device it was built on"):
        layer.to("meta")
    assert layer.w13.device == torch.device("cpu") and layer.dispatcher.device == torch.device("cpu")


def test_integer_scaling_factor_is_the_same_config():
    a = MoEConfig(num_experts=4, top_k=2, hidden_size=8, intermediate_size=8, routed_scaling_factor=1)
    b = MoEConfig(num_experts=4, top_k=2, hidden_size=8, intermediate_size=8, routed_scaling_factor=1.0)
    assert a == b and repr(a) == repr(b)
