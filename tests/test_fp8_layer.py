"""FP8 layers against the float64 oracle on the dequantized weights: weights quantized on load and
pre-quantized checkpoints (DeepSeek-V3 `weight_scale_inv`, per channel, per tensor), a hidden size that
needs padding, T = 0 and 1, and the loading errors."""
import pytest
import torch

from epmoe import Fp8Config, MoEConfig, MoELayer, reference_moe
from epmoe.layouts import BatchedBatch, FlatBatch
from epmoe.quant.fp8 import FP8_DTYPE, dequantize_weight, quantize_weight
from epmoe.testing import assert_close, bound_for, compare, random_experts, random_inputs

HERE = "cuda" if torch.cuda.is_available() else "cpu"

QUANTS = {
    "block": Fp8Config(),
    "channel": Fp8Config(weight_block=None, per_channel_weights=True, activation="per_token"),
    "tensor": Fp8Config(weight_block=None),
}
# Against the oracle of the FP8 function (same activation quantization, float64 elsewhere) the only
# differences left are float32 vs float64 arithmetic, the output dtype, and the rare intermediate value
# that float32 and float64 round to neighbouring FP8 values (one flip moves its row by ~1e-3): measured
# 3e-7 without a flip, 1.1e-4 with one (fp32), 1.7e-3 (bf16). 30x tighter than the library's fp8 bound 3e-2.
BOUND = {torch.float32: 1e-3, torch.bfloat16: 1e-2}


def _cfg(quant, dtype=torch.float32, H=200, I=72, E=8, k=2, **kw):
    return MoEConfig(num_experts=E, top_k=k, hidden_size=H, intermediate_size=I, quant=quant, dtype=dtype, **kw)


def _dequantized_online(experts, quant):
    """What a layer that quantized `experts` on load must hold, computed here from the formula."""
    g = quant.weight_granularity
    out = []
    for t in experts:
        out.append(tuple(dequantize_weight(*quantize_weight(w, g, quant.weight_block), quant.weight_block)
                         for w in t[:3]) + tuple(t[3:]))
    return out


def _load(layer, experts, scales=None):
    for e, t in enumerate(experts):
        kw = dict(zip(("gate_bias", "up_bias", "down_bias"), t[3:]))
        if scales is not None:
            kw.update(zip(("gate_proj_scale", "up_proj_scale", "down_proj_scale"), scales[e]))
        layer.load_expert(e, gate_proj=t[0], up_proj=t[1], down_proj=t[2], **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("qname", list(QUANTS))
def test_online_quantized_layer_matches_oracle(qname, dtype):
    quant = QUANTS[qname]
    cfg = _cfg(quant, dtype)
    assert cfg.hidden_size == 200 and cfg.padded_hidden_size % 16 == 0 and cfg.padded_hidden_size > 200
    layer = MoELayer(cfg, experts="reference", device=HERE)
    assert layer.w13.dtype == FP8_DTYPE and layer.w13.shape[2] == cfg.padded_hidden_size
    experts = random_experts(cfg, seed=3)
    _load(layer, experts)
    deq = _dequantized_online(experts, quant)
    for e in range(cfg.num_experts):            # the layer holds exactly the formula's weights
        for got, want in zip(layer.scheme.dequantized_expert(layer, e), deq[e]):
            assert torch.equal(got.cpu(), want)
    for T in (0, 1, 41):
        x, logits = random_inputs(cfg, T, seed=T, device=HERE)
        out = layer(x, logits)
        assert out.shape == (T, 200) and out.dtype == dtype
        assert_close(out, reference_moe(x, logits, deq, cfg), BOUND[dtype], context=f"{qname} T={T}")


def test_fp8_error_against_unquantized_function_is_what_fp8_costs():
    """Measured, so the size of FP8's own error stays visible: two activation quantizations (input and
    intermediate, ~2.6% each) cost ~4.4% against the oracle without them, weights ~2.6% more."""
    cfg = _cfg(QUANTS["block"], torch.bfloat16, H=256, I=256)
    layer = MoELayer(cfg, experts="reference")
    experts = random_experts(cfg, seed=5)
    _load(layer, experts)
    x, logits = random_inputs(cfg, 64)
    out = layer(x, logits)
    deq = _dequantized_online(experts, cfg.quant)
    rel_act = compare(out, reference_moe(x, logits, deq, cfg, quantize_activations=False)).rel_err
    rel_all = compare(out, reference_moe(x, logits, experts, cfg, quantize_activations=False)).rel_err
    assert 0.02 < rel_act < 0.06 and rel_act < rel_all < 0.09, (rel_act, rel_all)


def _random_fp8(shape, g):
    """Random finite e4m3fn weights, not produced by our quantizer (an independent checkpoint)."""
    return (torch.randn(*shape, generator=g) * 64).clamp(-448, 448).to(FP8_DTYPE)


def _checkpoint_scales(kind, N, K, g):
    if kind == "block":
        return torch.rand(-(-N // 128), -(-K // 128), generator=g) * 1e-3 + 1e-4
    if kind == "channel":
        return torch.rand(N, 1, generator=g) * 1e-3 + 1e-4          # [N, 1] as checkpoints often store it
    return torch.rand((), generator=g) * 1e-3 + 1e-4


def _dequant_by_hand(kind, q, s):
    N, K = q.shape
    if kind == "block":
        return q.float() * s.repeat_interleave(128, 0)[:N].repeat_interleave(128, 1)[:, :K]
    return q.float() * s


@pytest.mark.parametrize("qname", list(QUANTS))
def test_prequantized_checkpoint_matches_oracle(qname):
    """FP8 tensors with their scales, DeepSeek-V3 layout for blocks: partial edge blocks at H=200, I=72."""
    cfg = _cfg(QUANTS[qname], torch.bfloat16)
    H, I = cfg.hidden_size, cfg.intermediate_size
    g = torch.Generator().manual_seed(11)
    weights, scales, deq = [], [], []
    for _ in range(cfg.num_experts):
        t = (_random_fp8((I, H), g), _random_fp8((I, H), g), _random_fp8((H, I), g))
        s = tuple(_checkpoint_scales(qname, *w.shape, g) for w in t)
        weights.append(t)
        scales.append(s)
        deq.append(tuple(_dequant_by_hand(qname, w, sc) for w, sc in zip(t, s)))
    layer = MoELayer(cfg, experts="reference", device=HERE)
    _load(layer, weights, scales)
    for e in range(cfg.num_experts):
        for got, want in zip(layer.scheme.dequantized_expert(layer, e), deq[e]):
            assert torch.equal(got.cpu(), want)
    for T in (0, 1, 37):
        x, logits = random_inputs(cfg, T, seed=T, device=HERE)
        assert_close(layer(x, logits), reference_moe(x, logits, deq, cfg), BOUND[torch.bfloat16],
                     context=f"{qname} T={T}")


def test_fp8_with_expert_biases_and_sigmoid_routing():
    cfg = _cfg(QUANTS["block"], torch.float32, H=136, I=40, E=8, k=3, scoring="sigmoid", n_group=4, topk_group=2)
    layer = MoELayer(cfg, experts="reference", expert_bias=True)
    experts = random_experts(cfg, seed=2, with_bias=True)
    _load(layer, experts)
    with torch.no_grad():
        layer.score_correction_bias.copy_(torch.randn(cfg.num_experts) * 0.1)
    x, logits = random_inputs(cfg, 29)
    ref = reference_moe(x, logits, _dequantized_online(experts, cfg.quant), cfg,
                        score_correction_bias=layer.score_correction_bias)
    assert_close(layer(x, logits), ref, BOUND[torch.float32])


def test_state_dict_round_trip_keeps_scales():
    cfg = _cfg(QUANTS["block"], torch.bfloat16)
    a = MoELayer(cfg, experts="reference")
    _load(a, random_experts(cfg, seed=4))
    sd = a.state_dict()
    names = {f"experts.0.{p}_proj.{t}" for p in ("gate", "up", "down") for t in ("weight", "weight_scale_inv")}
    assert names <= set(sd) and sd["experts.0.gate_proj.weight_scale_inv"].dtype == torch.float32
    assert sd["experts.0.gate_proj.weight"].dtype == torch.float8_e4m3fn
    b = MoELayer(cfg, experts="reference")
    b.load_state_dict(sd)
    x, logits = random_inputs(cfg, 9)
    assert torch.equal(a(x, logits), b(x, logits))


def test_batched_layout_agrees_with_flat():
    """The reference experts' batched path (used behind low_latency) on FP8 rows with scales."""
    cfg = _cfg(QUANTS["block"], torch.float32)
    layer = MoELayer(cfg, experts="reference")
    _load(layer, random_experts(cfg, seed=6))
    x, logits = random_inputs(cfg, 21)
    x = torch.nn.functional.pad(x, (0, cfg.padded_hidden_size - cfg.hidden_size))
    routing = layer.compute_routing(x[:, :cfg.hidden_size], logits)
    q, s = layer.scheme.quantize_activations(x)
    flat = layer.experts(FlatBatch(q, routing.topk_ids, routing.topk_weights, s), layer.expert_weights)
    L, C = cfg.num_experts, 21
    xb = torch.zeros(L, C, x.shape[1], dtype=FP8_DTYPE)
    sb = torch.ones(L, C, s.shape[1])
    counts = torch.zeros(L, dtype=torch.long)
    where = []
    for t in range(21):
        for j in range(cfg.top_k):
            e = int(routing.topk_ids[t, j])
            xb[e, counts[e]] = q[t]
            sb[e, counts[e]] = s[t]
            where.append((t, j, e, int(counts[e])))
            counts[e] += 1
    yb = layer.experts(BatchedBatch(xb, counts, sb), layer.expert_weights)
    combined = torch.zeros_like(flat)
    for t, j, e, c in where:
        combined[t] += routing.topk_weights[t, j] * yb[e, c]
    assert_close(combined, flat.double(), 1e-6)


# ------------------------------------------------------------------------------------------- errors
def _layer(qname="block", **kw):
    cfg = _cfg(QUANTS[qname], torch.bfloat16, **kw)
    return cfg, MoELayer(cfg, experts="reference")


def test_loading_errors_name_the_argument_and_rule():
    cfg, layer = _layer()
    H, I = cfg.hidden_size, cfg.intermediate_size
    q = lambda *s: torch.zeros(*s, dtype=FP8_DTYPE)   # noqa: E731
    with pytest.raises(ValueError, match="gate_proj_scale.*weight_scale_inv"):
        layer.load_expert(0, gate_proj=q(I, H), up_proj=q(I, H), down_proj=q(H, I))
    with pytest.raises(ValueError, match=r"down_proj_scale must have shape \[2, 1\]"):
        layer.load_expert(0, gate_proj=q(I, H), up_proj=q(I, H), down_proj=q(H, I),
                          gate_proj_scale=torch.ones(1, 2), up_proj_scale=torch.ones(1, 2),
                          down_proj_scale=torch.ones(1, 2))
    with pytest.raises(ValueError, match="all be float8_e4m3fn"):
        layer.load_expert(0, gate_proj=q(I, H), up_proj=torch.zeros(I, H), down_proj=q(H, I))
    with pytest.raises(ValueError, match="scales go with float8_e4m3fn weights only"):
        layer.load_expert(0, gate_proj=torch.zeros(I, H), up_proj=torch.zeros(I, H), down_proj=torch.zeros(H, I),
                          gate_proj_scale=torch.ones(1, 2))
    with pytest.raises(TypeError, match="unexpected arguments for an FP8 layer"):
        layer.load_expert(0, gate_proj=torch.zeros(I, H), up_proj=torch.zeros(I, H), down_proj=torch.zeros(H, I),
                          weight_scale=1.0)
    with pytest.raises(ValueError, match="finite"):
        layer.load_expert(0, gate_proj=q(I, H), up_proj=q(I, H), down_proj=q(H, I),
                          gate_proj_scale=torch.full((1, 2), float("nan")), up_proj_scale=torch.ones(1, 2),
                          down_proj_scale=torch.ones(2, 1))
    with pytest.raises(ValueError, match="shape"):              # callers pass the real, unpadded shape
        layer.load_expert(0, gate_proj=torch.zeros(I, cfg.padded_hidden_size), up_proj=torch.zeros(I, H),
                          down_proj=torch.zeros(H, I))
    with pytest.raises(RuntimeError, match="never loaded"):
        x, logits = random_inputs(cfg, 2)
        layer(x, logits)


@pytest.mark.parametrize("kwargs,field", [
    (dict(weight_block=(128,)), "weight_block"),
    (dict(weight_block=(0, 128)), "weight_block"),
    (dict(weight_block=(128, 128), per_channel_weights=True), "per_channel_weights"),
    (dict(activation="per_tensor"), "activation"),
    (dict(group_size=0), "group_size"),
    (dict(dispatch_fp8="yes"), "dispatch_fp8"),
])
def test_config_errors(kwargs, field):
    with pytest.raises(ValueError, match=f"Fp8Config.{field}"):
        Fp8Config(**kwargs)


@pytest.mark.parametrize("quant,H,I,want", [
    (Fp8Config(), 200, 72, (256, 128)),
    (Fp8Config(), 7168, 2048, (7168, 2048)),
    (Fp8Config(weight_block=None, per_channel_weights=True, activation="per_token"), 200, 72, (208, 80)),
    (Fp8Config(weight_block=(64, 32), activation="per_token"), 100, 40, (128, 64)),
])
def test_padding_is_owned_by_the_scheme(quant, H, I, want):
    cfg = _cfg(quant, H=H, I=I)
    assert (cfg.hidden_size, cfg.intermediate_size) == (H, I)
    assert (cfg.padded_hidden_size, cfg.padded_intermediate_size) == want


# ---------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("qname", ["channel", "tensor_per_token"])
@pytest.mark.parametrize("bias", [False, True])
def test_scaled_grouped_mm_matches_oracle(qname, bias):
    """torch._scaled_grouped_mm writes the gate/up product in bf16 before the activation is quantized
    again, so ~1.5% of intermediate values land on the neighbouring FP8 value: 1.3-1.6e-2 on a batch
    (reproduced bit for bit by a CPU emulation), up to 5e-2 on one lone row. Single tokens are therefore
    run one at a time and judged together."""
    quant = QUANTS["channel"] if qname == "channel" else Fp8Config(weight_block=None, activation="per_token")
    cfg = _cfg(quant, torch.bfloat16, H=200, I=72, E=16, k=4)
    layer = MoELayer(cfg, experts="grouped_mm", device="cuda", expert_bias=bias)
    assert layer.experts_name == "grouped_mm"
    experts = random_experts(cfg, seed=8, with_bias=bias)
    _load(layer, experts)
    deq = _dequantized_online(experts, quant)
    fp8_bound = bound_for(torch.bfloat16, fp8=True)
    for T in (0, 5, 333):
        x, logits = random_inputs(cfg, T, seed=T, device="cuda")
        assert_close(layer(x, logits), reference_moe(x, logits, deq, cfg), fp8_bound,
                     context=f"grouped_mm {qname} T={T}")
    x, logits = random_inputs(cfg, 16, seed=1, device="cuda")
    one_at_a_time = torch.cat([layer(x[t:t + 1], logits[t:t + 1]) for t in range(16)])
    assert_close(one_at_a_time, reference_moe(x, logits, deq, cfg), fp8_bound, context=f"grouped_mm {qname} T=1")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_auto_picks_a_fast_backend_for_row_wise_fp8():
    cfg = _cfg(QUANTS["channel"], torch.bfloat16)
    assert MoELayer(cfg, device="cuda").experts_name != "reference"
    cfg = _cfg(QUANTS["block"], torch.bfloat16)
    assert MoELayer(cfg, device="cuda").experts_name != "grouped_mm"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_reference_block_fp8_matches_oracle():
    cfg = _cfg(QUANTS["block"], torch.bfloat16, H=7168 // 4, I=2048 // 4, E=16, k=4)
    layer = MoELayer(cfg, experts="reference", device="cuda")
    experts = random_experts(cfg, seed=9)
    _load(layer, experts)
    x, logits = random_inputs(cfg, 64, device="cuda")
    deq = _dequantized_online(experts, cfg.quant)
    assert_close(layer(x, logits), reference_moe(x, logits, deq, cfg), BOUND[torch.bfloat16])
