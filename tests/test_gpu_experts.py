"""GPU: every GPU experts backend at each preset's real sizes, bf16, against the float64 oracle.

Runs only where CUDA is present (the H100/H200 machines); skips cleanly elsewhere."""
import pytest
import torch

from epmoe import MoELayer, contract, reference_moe
from epmoe.main_job import SeededExperts
from epmoe.presets import preset_config
from epmoe.testing import assert_close, bound_for, capture

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PRESETS = ["mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v3", "gpt-oss-120b", "olmoe"]


def gpu_backends():
    return [x for x in contract.EXPERTS
            if contract.pairing_problem("local", x, preset_config("tiny"), 1, "cuda") is None
            and x != "reference"]


@pytest.mark.parametrize("preset", PRESETS)
def test_real_size_bf16(preset):
    cfg = preset_config(preset, dtype=torch.bfloat16)
    source = SeededExperts(cfg, seed=3, device="cuda")
    layers = {}
    for name in gpu_backends():
        layer = MoELayer(cfg, experts=name, device="cuda")
        for e in range(cfg.num_experts):
            layer.load_expert(e, *source[e])
        if layer.score_correction_bias is not None:
            layer.score_correction_bias.copy_(torch.randn(cfg.num_experts, device="cuda") * 0.1)
        layers[name] = layer
        break_after_one = cfg.num_experts * cfg.hidden_size * cfg.intermediate_size > 2e9
        if break_after_one:  # keep one large layer at a time in memory
            _check(cfg, source, {name: layer})
            layers.clear()
            torch.cuda.empty_cache()
    if layers:
        _check(cfg, source, layers)


def _check(cfg, source, layers):
    g = torch.Generator(device="cuda").manual_seed(0)
    for T in (1, 64, 1024):
        x = torch.randn(T, cfg.hidden_size, device="cuda", generator=g).to(cfg.dtype)
        logits = torch.randn(T, cfg.num_experts, device="cuda", generator=g) * 2
        rows = torch.arange(min(T, 48), device="cuda")
        for name, layer in layers.items():
            out = layer(x, logits)
            torch.cuda.synchronize()
            ref = reference_moe(x[rows], logits[rows], source, cfg, layer.score_correction_bias, device="cuda")
            assert_close(out[rows], ref, bound_for(cfg.dtype), context=f"{name} T={T}")


def graph_safe_backends():
    return [x for x in gpu_backends() if contract.experts_class(x).CAPS.cuda_graph_safe]


@pytest.mark.parametrize("backend", graph_safe_backends())
def test_declared_graph_safe_backends_capture_and_replay(backend):
    """A backend that declares cuda_graph_safe must capture (no host sync) and stay correct on replay."""
    cfg = preset_config("qwen3-30b-a3b", dtype=torch.bfloat16)
    source = SeededExperts(cfg, seed=5, device="cuda")
    layer = MoELayer(cfg, experts=backend, device="cuda")
    for e in range(cfg.num_experts):
        layer.load_expert(e, *source[e])
    T = 96
    x = torch.randn(T, cfg.hidden_size, device="cuda").to(cfg.dtype)
    logits = torch.randn(T, cfg.num_experts, device="cuda")
    replay, out = capture(lambda: layer(x, logits))
    for seed in range(3):
        g = torch.Generator(device="cuda").manual_seed(100 + seed)
        x.copy_(torch.randn(T, cfg.hidden_size, device="cuda", generator=g).to(cfg.dtype))
        logits.copy_(torch.randn(T, cfg.num_experts, device="cuda", generator=g) * 2)
        replay()
        torch.cuda.synchronize()
        ref = reference_moe(x, logits, source, cfg, device="cuda")
        assert_close(out, ref, bound_for(cfg.dtype), context=f"{backend} replay {seed}")


def test_low_latency_on_one_gpu_eager_overflow_and_graph():
    """The low_latency GPU path on one rank: headers copied back through pinned memory (eager), the
    overflow error naming the setting, and capture + replay with nothing read back."""
    cfg = preset_config("qwen3-30b-a3b", dtype=torch.bfloat16)
    source = SeededExperts(cfg, seed=9, device="cuda")
    M = 64
    layer = MoELayer(cfg, dispatcher="low_latency", experts="batched", device="cuda", max_tokens_per_rank=M)
    for e in range(cfg.num_experts):
        layer.load_expert(e, *source[e])
    g = torch.Generator(device="cuda").manual_seed(1)
    for T in (1, 17, M, 0, 33):
        x = torch.randn(T, cfg.hidden_size, device="cuda", generator=g).to(cfg.dtype)
        logits = torch.randn(T, cfg.num_experts, device="cuda", generator=g)
        out = layer(x, logits)
        if T:
            assert_close(out, reference_moe(x, logits, source, cfg, device="cuda"), bound_for(cfg.dtype),
                         context=f"eager T={T}")
    with pytest.raises(ValueError, match="max_tokens_per_rank=64"):
        layer(torch.randn(M + 1, cfg.hidden_size, device="cuda").to(cfg.dtype),
              torch.randn(M + 1, cfg.num_experts, device="cuda"))
    T = 48
    x = torch.randn(T, cfg.hidden_size, device="cuda").to(cfg.dtype)
    logits = torch.randn(T, cfg.num_experts, device="cuda")
    replay, out = capture(lambda: layer(x, logits))
    for seed in range(3):
        gg = torch.Generator(device="cuda").manual_seed(50 + seed)
        x.copy_(torch.randn(T, cfg.hidden_size, device="cuda", generator=gg).to(cfg.dtype))
        logits.copy_(torch.randn(T, cfg.num_experts, device="cuda", generator=gg) * 2)
        replay()
        torch.cuda.synchronize()
        assert_close(out, reference_moe(x, logits, source, cfg, device="cuda"), bound_for(cfg.dtype),
                     context=f"replay {seed}")
