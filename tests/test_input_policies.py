"""What one rank does with inputs it cannot compute on as asked: inputs that require grad are refused
(the layer is for inference only), and NaN/Inf in one token's hidden state, logits or custom-router
weights stay in that token's output row, the same as in `reference_moe`. Two ranks and every dispatcher:
tests/test_ep_input_policies.py."""
import pytest
import torch

from epmoe import MoEConfig, MoELayer, reference_moe
from epmoe.testing import assert_close, bound_for, load_experts, random_experts, random_inputs

ROUTINGS = {"softmax": dict(scoring="softmax", renormalize=True),
            "sigmoid-grouped": dict(scoring="sigmoid", renormalize=True, n_group=4, topk_group=2),
            "custom": dict(scoring="softmax", renormalize=True)}
POISONS = ("hidden_nan", "hidden_inf", "logits_nan", "logits_inf")
POISONED = 3   # the token whose input is poisoned


def logit_router(x, logits):
    """A custom router whose weights follow the logits (NaN logits give NaN weights)."""
    ids = torch.nan_to_num(logits.float(), nan=0.0).topk(2, dim=-1).indices
    return ids, torch.softmax(logits.float().gather(1, ids), dim=-1)


def build(backend, routing="softmax", dtype=torch.bfloat16):
    cfg = MoEConfig(num_experts=8, top_k=2, hidden_size=40, intermediate_size=24, dtype=dtype, **ROUTINGS[routing])
    layer = MoELayer(cfg, experts=backend, router=logit_router if routing == "custom" else None)
    experts = random_experts(cfg, seed=4)
    load_experts(layer, experts)
    return cfg, layer, [tuple(w.to(dtype).float() for w in e) for e in experts]


def poison(x, logits, kind: str, token: int):
    x, logits = x.clone(), logits.clone()
    value = float("nan") if kind.endswith("nan") else float("inf")
    if kind.startswith("hidden"):
        x[token, 5] = value
    else:
        logits[token, 2] = value
    return x, logits


def assert_confined(out, clean, ref, token: int, dtype):
    """Rows other than `token` equal the clean forward's; every row's finiteness is the oracle's, and
    its finite rows match it."""
    others = torch.arange(out.shape[0]) != token
    assert torch.isfinite(out[others]).all(), "a non-finite value spread to other tokens' rows"
    assert_close(out[others], clean[others], 1e-6, context="other tokens, poisoned vs clean forward")
    bad_out, bad_ref = ~torch.isfinite(out).all(dim=1), ~torch.isfinite(ref).all(dim=1)
    assert bad_out.tolist() == bad_ref.tolist(), f"non-finite rows {bad_out.nonzero().tolist()}, oracle's " \
                                                 f"{bad_ref.nonzero().tolist()}"
    assert_close(out[~bad_ref], ref[~bad_ref], bound_for(dtype))


@pytest.mark.parametrize("backend", ["reference", "grouped_mm"])
@pytest.mark.parametrize("routing", list(ROUTINGS))
@pytest.mark.parametrize("kind", POISONS)
def test_nonfinite_input_stays_in_its_row(backend, routing, kind):
    cfg, layer, experts = build(backend, routing)
    x, logits = random_inputs(cfg, 9, seed=7)
    clean = layer(x, logits)
    px, plogits = poison(x, logits, kind, POISONED)
    out = layer(px, plogits)
    routing_in = None
    if routing == "custom":
        from epmoe.routing import Routing
        ids, w = logit_router(px, plogits)
        routing_in = Routing(ids.to(torch.int32), w)
    ref = reference_moe(px, plogits, experts, cfg, routing=routing_in)
    assert_confined(out, clean, ref, POISONED, cfg.dtype)
    if kind.startswith("hidden") or routing == "softmax":   # elsewhere the row may be finite: sigmoid(+Inf) = 1
        assert not torch.isfinite(out[POISONED]).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "grouped_mm"])
@pytest.mark.parametrize("kind", POISONS)
@pytest.mark.parametrize("T", [1, 9, 200])        # T = 1: one pair per tile (or the decode kernels)
@pytest.mark.parametrize("fp8", [False, True])    # FP8: the activations quantized by the Triton formula
def test_gpu_nonfinite_input_stays_in_its_row(backend, kind, T, fp8):
    from epmoe import Fp8Config
    # FP8 block weights with activations per group of 128 (`triton`), per channel with per-token (`grouped_mm`)
    quant = None if not fp8 else Fp8Config() if backend == "triton" else \
        Fp8Config(weight_block=None, per_channel_weights=True, activation="per_token")
    cfg = MoEConfig(num_experts=16, top_k=4, hidden_size=256, intermediate_size=128, dtype=torch.bfloat16,
                    quant=quant)
    layer = MoELayer(cfg, experts=backend, device="cuda")
    experts = random_experts(cfg, seed=4)
    load_experts(layer, experts)
    x, logits = random_inputs(cfg, T, seed=7, device="cuda")
    clean = layer(x, logits)
    token = T // 2
    px, plogits = poison(x, logits, kind, token)
    out = layer(px, plogits)
    others = torch.arange(T, device="cuda") != token
    assert torch.isfinite(out[others]).all(), "a non-finite value spread to other tokens' rows"
    if others.any():     # the poisoned token's new routing may change the tiles: same rows, maybe other kernels
        assert_close(out[others], clean[others].double(), bound_for(cfg.dtype), context="other tokens")
    assert not torch.isfinite(out[token]).all()


def test_oracle_propagates_nan_logits_in_their_row():
    cfg, _, experts = build("reference", dtype=torch.float32)
    x, logits = random_inputs(cfg, 5, seed=2)
    logits[1] = float("nan")
    ref = reference_moe(x, logits, experts, cfg)
    assert torch.isnan(ref[1]).all() and torch.isfinite(ref[[0, 2, 3, 4]]).all()


# ------------------------------------------------------------------------------------------- autograd
@pytest.mark.parametrize("backend", ["reference", "grouped_mm"])
@pytest.mark.parametrize("which", ["hidden_states", "router_logits"])
def test_inputs_requiring_grad_are_refused(backend, which):
    cfg, layer, _ = build(backend, dtype=torch.float32)
    x, logits = random_inputs(cfg, 6, seed=3)
    want = layer(x, logits)
    args = {"hidden_states": x, "router_logits": logits}
    args[which] = args[which].clone().requires_grad_(True)
    with pytest.raises(ValueError, match=rf"{which} requires grad.*inference only.*torch.no_grad\(\).*"
                                         rf"torch.inference_mode\(\).*{which}.detach\(\)"):
        layer(args["hidden_states"], args["router_logits"])
    with torch.no_grad():
        assert torch.equal(layer(args["hidden_states"], args["router_logits"]), want)
    with torch.inference_mode():
        assert torch.equal(layer(args["hidden_states"], args["router_logits"]), want)
    detached = {k: v.detach() for k, v in args.items()}
    out = layer(detached["hidden_states"], detached["router_logits"])
    assert torch.equal(out, want) and not out.requires_grad


def test_custom_router_weights_requiring_grad_are_refused():
    cfg, layer, _ = build("reference", routing="custom", dtype=torch.float32)
    scale = torch.ones((), requires_grad=True)           # a learnable router parameter
    layer.router = lambda x, logits: (logit_router(x, logits)[0], logit_router(x, logits)[1] * scale)
    x, logits = random_inputs(cfg, 4, seed=1)
    with pytest.raises(ValueError, match="custom router's topk_weights requires grad"):
        layer(x, logits)
    with torch.no_grad():
        assert torch.isfinite(layer(x, logits)).all()
