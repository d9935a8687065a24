"""FP8 on the `batched` experts backend (the `low_latency` dispatcher's layout).

CPU: the contract decisions (which FP8 cells build, why the others are refused, who quantizes the
activations, what `auto` picks) and the operand wiring. The Triton batched kernel with FP8 operands under
TRITON_INTERPRET=1 (float32, a child process, as in test_triton_interpreter.py), fed by the real
low_latency dispatcher, FP8 dispatch on and off, against the `reference` experts and `reference_moe`.
GPU: MoELayer(dispatcher="low_latency", experts="batched") at a real size (qwen3-30b-a3b) and an awkward
one (H=200), FP8 dispatch on and off, every weight format the backend declares, against the float64 FP8
oracle, and a CUDA-graph replay (the backend declares cuda_graph_safe).
"""
import importlib.util

import pytest
import torch

import epmoe.kernels
from epmoe import (
    Fp8Config,
    MoEConfig,
    MoELayer,
    UnsupportedCombination,
    contract,
    reference_moe,
)
from epmoe.contract import HANDOFF_AFTER_DISPATCH, HANDOFF_ON_THE_WIRE, TAKES_FP8
from epmoe.experts.batched import BatchedExperts
from epmoe.layouts import BatchedBatch, ExpertWeights
from epmoe.contract import example_configs
from epmoe.quant.fp8 import fp8_quantize_torch
from epmoe.testing import LayerExperts, assert_close, bound_for, random_experts, random_inputs
from epmoe.testing.interpreter import INTERPRETING, run_interpreted

HAVE_TRITON = importlib.util.find_spec("triton") is not None
HAVE_CUDA = torch.cuda.is_available()

# (weight granularity, activation group): every FP8 format the batched backend declares
QUANTS = {
    "block": dict(weight_block=(128, 128), activation="per_token_group"),
    "block-token": dict(weight_block=(128, 128), activation="per_token"),
    "channel": dict(weight_block=None, per_channel_weights=True, activation="per_token"),
    "channel-group": dict(weight_block=None, per_channel_weights=True, activation="per_token_group"),
    "tensor": dict(weight_block=None, activation="per_token_group"),
}


def _cfg(kind="block", dispatch_fp8=False, dtype=torch.bfloat16, E=8, k=2, H=200, I=72):
    return MoEConfig(num_experts=E, top_k=k, hidden_size=H, intermediate_size=I, dtype=dtype,
                     quant=Fp8Config(**QUANTS[kind], dispatch_fp8=dispatch_fp8))


@pytest.fixture
def kernels_ready(monkeypatch):
    """Pretend the Triton kernels can run on CUDA here (an FP8-capable GPU): the contract's CUDA cells as a
    GPU machine sees them. Nothing is allocated on a GPU under this fixture."""
    monkeypatch.setattr(epmoe.kernels, "triton_problem", lambda device_type="cuda", need_fp8=False:
                        None if device_type == "cuda" else f"the Triton kernels run on CUDA GPUs, not {device_type}")


# ------------------------------------------------------------------------------ the contract (CPU)
def test_caps_declare_fp8_taking_fp8_rows():
    caps = contract.experts_class("batched").CAPS
    assert {"none", "fp8_block", "fp8_channel", "fp8_tensor"} <= caps.quant
    assert caps.fp8_activations == TAKES_FP8 and caps.cuda_graph_safe
    assert caps.layouts == frozenset({"batched"})


@pytest.mark.parametrize("kind", sorted(QUANTS))
def test_cpu_is_refused_with_the_reason_and_alternatives(kind):
    cfg = _cfg(kind, dtype=torch.float32)
    with pytest.raises(UnsupportedCombination) as info:
        MoELayer(cfg, dispatcher="low_latency", experts="batched", device="cpu", max_tokens_per_rank=8)
    err = info.value
    assert err.dispatcher == "low_latency" and err.experts == "batched"
    assert "Triton batched kernel" in err.reason and "cpu" in err.reason
    assert "dispatcher='low_latency', experts='reference'" in err.alternatives
    # the unquantized layer on the same pairing still builds on the CPU (torch.bmm path)
    MoELayer(MoEConfig(num_experts=8, top_k=2, hidden_size=200, intermediate_size=72, dtype=torch.float32),
             dispatcher="low_latency", experts="batched", device="cpu", max_tokens_per_rank=8)


def test_cpu_auto_still_picks_reference_for_fp8_on_low_latency():
    assert contract.resolve_names("low_latency", "auto", _cfg(), 2, "cpu") == ("low_latency", "reference")


@pytest.mark.parametrize("kind", sorted(QUANTS))
@pytest.mark.parametrize("dispatch_fp8", [False, True])
def test_cuda_cells_and_handoff(kernels_ready, kind, dispatch_fp8):
    cfg = _cfg(kind, dispatch_fp8)
    for ep in (1, 2):
        assert contract.pairing_problem("low_latency", "batched", cfg, ep, "cuda") is None
    want = HANDOFF_ON_THE_WIRE if dispatch_fp8 else HANDOFF_AFTER_DISPATCH
    assert contract.activation_handoff("low_latency", "batched", cfg) == want
    # auto on a GPU: the batched kernel, no longer the host-syncing reference loop
    assert contract.resolve_names("low_latency", "auto", cfg, 2, "cuda") == ("low_latency", "batched")


@pytest.mark.parametrize("quant,words", [
    (dict(weight_block=(64, 64)), "weight_block=(64, 64)"),
    (dict(weight_block=(128, 128), group_size=64), "group_size=64"),
])
def test_cuda_formats_the_kernel_lacks_are_refused(kernels_ready, quant, words):
    cfg = MoEConfig(num_experts=8, top_k=2, hidden_size=256, intermediate_size=128, quant=Fp8Config(**quant))
    why = contract.pairing_problem("low_latency", "batched", cfg, 1, "cuda")
    assert why is not None and words in why and "Triton batched kernel" in why
    with pytest.raises(UnsupportedCombination):
        contract.check_pairing("low_latency", "batched", cfg, 1, "cuda")


def test_cuda_without_fp8_units_is_refused(monkeypatch):
    monkeypatch.setattr(epmoe.kernels, "triton_problem", lambda device_type="cuda", need_fp8=False:
                        "FP8 matrix products need compute capability 8.9 or newer, this GPU is 8.0" if need_fp8
                        else None)
    why = contract.pairing_problem("low_latency", "batched", _cfg(), 1, "cuda")
    assert why is not None and "8.9" in why
    # BF16 on the same GPU is fine
    assert contract.pairing_problem("low_latency", "batched", MoEConfig(num_experts=8, top_k=2, hidden_size=64,
                                                                        intermediate_size=32), 1, "cuda") is None


def test_matrix_cells_are_what_builds_here():
    """`epmoe info`: every batched FP8 cell for this machine's device is refused exactly when a one-rank
    layer refuses to build (the multi-rank cells get the same verdict)."""
    here = "cuda" if HAVE_CUDA else "cpu"
    rows = [r for r in contract.support_matrix() if r.experts == "batched" and r.quant != "none"]
    assert {r.quant for r in rows} == set(example_configs())
    for r in rows:
        if r.dispatcher != "low_latency":
            assert r.problem is not None     # flat layout (or no communication on two ranks)
            continue
        twin = [s for s in rows if (s.dispatcher, s.device, s.quant) == (r.dispatcher, r.device, r.quant)]
        assert len({s.problem for s in twin}) == 1
        if r.device == "cpu":
            assert r.problem is not None and "Triton batched kernel" in r.problem
        if r.device == here and not r.multi_rank:
            kwargs = dict(dispatcher="low_latency", experts="batched", device=here, max_tokens_per_rank=4)
            if r.problem is None:
                layer = MoELayer(example_configs()[r.quant], **kwargs)
                assert layer.activation_handoff == r.extra["fp8_activations"]
            else:
                with pytest.raises(UnsupportedCombination):
                    MoELayer(example_configs()[r.quant], **kwargs)


def test_operands_take_fp8_rows_as_they_are_and_quantize_others(kernels_ready):
    cfg = _cfg("block", dtype=torch.float32, E=3, H=256, I=128)
    experts = BatchedExperts(cfg)
    L, C, H = 3, 5, 256
    w = ExpertWeights(torch.zeros(L, 256, H, dtype=torch.float8_e4m3fn),
                      torch.zeros(L, H, 128, dtype=torch.float8_e4m3fn),
                      w13_scale=torch.ones(L, 2, 2), w2_scale=torch.ones(L, 2, 1))
    x = torch.randn(L, C, H)
    q, s = fp8_quantize_torch(x, 128)
    xq, ops = experts.fp8_operands(BatchedBatch(q, torch.tensor([1, 0, 5]), s), w)
    assert xq is q and torch.equal(ops.x_scale, s) and ops.act_group == 128 and ops.weight_block == (128, 128)
    assert ops.w13_scale is w.w13_scale and ops.granularity == "block"
    # rows in the layer's dtype: quantized on the experts' entry with the one formula (the one conversion)
    xq2, ops2 = experts.fp8_operands(experts.activations_for(BatchedBatch(x, torch.tensor([1, 0, 5]))), w)
    assert torch.equal(xq2.view(torch.uint8), q.view(torch.uint8)) and torch.equal(ops2.x_scale, s)
    with pytest.raises(ValueError, match="scales"):
        experts.fp8_operands(BatchedBatch(q, torch.tensor([1, 0, 5]), s[..., :1]), w)
    with pytest.raises(ValueError, match="without their scales"):
        experts.activations_for(BatchedBatch(q, torch.tensor([1, 0, 5])))
    with pytest.raises(ValueError, match="without their scales"):
        experts.fp8_operands(BatchedBatch(q, torch.tensor([1, 0, 5])), w)
    with pytest.raises(ValueError, match="only on CUDA"):
        experts(BatchedBatch(q, torch.tensor([1, 0, 5]), s), w)
    plain = BatchedExperts(MoEConfig(num_experts=3, top_k=1, hidden_size=H, intermediate_size=128,
                                     dtype=torch.float32))
    with pytest.raises(ValueError, match="not FP8"):
        plain(BatchedBatch(q, torch.tensor([1, 0, 5]), s), w)


def test_building_fp8_experts_where_the_kernel_cannot_run_raises():
    if HAVE_CUDA:
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="cannot run this FP8 layer"):
        BatchedExperts(_cfg())


# ----------------------------------------------- the kernel's FP8 path under the interpreter (CPU)
if not INTERPRETING:
    @pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
    @pytest.mark.skipif(HAVE_CUDA, reason="the GPU tests below run the kernel itself")
    def test_interpreted_kernel_through_low_latency():
        run_interpreted(__file__, select="interpreted_fp8")

else:
    class _KernelOnCpu:
        """The batched backend's FP8 operands and the Triton batched kernel, run by the interpreter on CPU
        tensors (the backend itself runs FP8 on CUDA only), into an output of NaN: the rows it does not write
        (past each count) stay NaN, so a combine that read one would show it."""

        def __init__(self, cfg):
            self.experts = BatchedExperts(cfg)
            self.cfg = cfg
            self.batches = []

        def __call__(self, batch, weights):
            from epmoe.kernels.batched_moe import batched_experts
            batch = self.experts.activations_for(batch)   # the conversion the backend's entry makes
            self.batches.append(batch)
            x, ops = self.experts.fp8_operands(batch, weights)
            out = torch.full(x.shape, float("nan"), dtype=self.cfg.dtype)
            return batched_experts(x.contiguous(), batch.counts, weights.w13, weights.w2, self.cfg.activation,
                                   top_k=self.cfg.top_k, out_dtype=self.cfg.dtype, fp8=ops,
                                   num_tokens=batch.num_tokens, out=out)

    @pytest.mark.parametrize("kind", sorted(QUANTS))
    @pytest.mark.parametrize("dispatch_fp8", [False, True])
    def test_interpreted_fp8_low_latency_layer(kernels_ready, kind, dispatch_fp8):
        cfg = _cfg(kind, dispatch_fp8, dtype=torch.float32, E=8, k=2, H=200, I=72)
        M = 16
        layer = MoELayer(cfg, dispatcher="low_latency", experts="reference", device="cpu", max_tokens_per_rank=M)
        for e, t in enumerate(random_experts(cfg, seed=3)):
            layer.load_expert(e, *t)
        kernel = _KernelOnCpu(cfg)
        x, logits = random_inputs(cfg, 13, seed=5)
        logits[:5, 2] = 50.0                          # a hot expert beside near-empty ones
        want = layer(x, logits)                       # reference experts on the same batch
        layer.experts = kernel
        got = layer(x, logits)
        batch = kernel.batches[-1]
        assert batch.x.dtype == torch.float8_e4m3fn and batch.scales is not None
        assert batch.scales.shape[:2] == batch.x.shape[:2]
        oracle = reference_moe(x, logits, LayerExperts(layer), cfg)
        # measured <= 3e-7 in float32 (same FP8 bits in, float32 sums in another order); the library's bound is 3e-2
        assert_close(got, want.double(), 1e-5, context=f"{kind} dispatch_fp8={dispatch_fp8} vs reference experts")
        assert_close(got, oracle, 1e-5, context=f"{kind} dispatch_fp8={dispatch_fp8} vs reference_moe")
        # the rows past each count were not written (NaN as the output held them), and the layer's output,
        # checked above, never read one; the dispatcher named its T
        assert batch.num_tokens == 13
        y = kernel(batch, layer.expert_weights)
        past = torch.arange(y.shape[1])[None, :] >= batch.counts[:, None]
        assert past.any() and y[past].isnan().all() and not y[~past].isnan().any()


# --------------------------------------------------------------------------------------- GPU
def gpu(test):
    return pytest.mark.gpu(pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA GPU")(test))


def _gpu_layer(cfg, source, M):
    layer = MoELayer(cfg, dispatcher="low_latency", experts="batched", device="cuda", max_tokens_per_rank=M)
    for e in range(cfg.num_experts):
        layer.load_expert(e, *source[e])
    return layer


def _count_kernel_calls(monkeypatch):
    import epmoe.kernels.batched_moe as kernel_module
    calls = []
    real = kernel_module.batched_experts
    monkeypatch.setattr(kernel_module, "batched_experts",
                        lambda *a, **kw: calls.append(kw.get("fp8") is not None) or real(*a, **kw))
    return calls


def _sizes():
    from epmoe.presets import preset_config
    real = preset_config("qwen3-30b-a3b", dtype=torch.bfloat16)
    assert (real.num_experts, real.hidden_size, real.intermediate_size, real.top_k) == (128, 2048, 768, 8)
    awkward = MoEConfig(num_experts=16, top_k=4, hidden_size=200, intermediate_size=136, dtype=torch.bfloat16)
    return {"qwen3-30b-a3b": real, "H200": awkward}


def _source(base, seed):
    from epmoe.main_job import SeededExperts
    return SeededExperts(base, seed=seed, device="cuda")


@gpu
@pytest.mark.parametrize("size,kind", [("qwen3-30b-a3b", "block"), ("qwen3-30b-a3b", "channel"),
                                       ("H200", "block"), ("H200", "channel"), ("H200", "tensor"),
                                       ("H200", "block-token")])
@pytest.mark.parametrize("dispatch_fp8", [False, True])
def test_gpu_low_latency_fp8(monkeypatch, size, kind, dispatch_fp8):
    pytest.importorskip("triton")
    from dataclasses import replace
    base = _sizes()[size]
    cfg = replace(base, quant=Fp8Config(**QUANTS[kind], dispatch_fp8=dispatch_fp8))
    M = 64
    layer = _gpu_layer(cfg, _source(base, 7), M)
    assert layer.experts_name == "batched"
    assert layer.activation_handoff == (HANDOFF_ON_THE_WIRE if dispatch_fp8 else HANDOFF_AFTER_DISPATCH)
    calls = _count_kernel_calls(monkeypatch)
    oracle = LayerExperts(layer)
    g = torch.Generator(device="cuda").manual_seed(11)
    for T, onehot in ((1, False), (37, False), (M, False), (M, True)):
        x = torch.randn(T, cfg.hidden_size, device="cuda", generator=g).to(cfg.dtype)
        logits = torch.randn(T, cfg.num_experts, device="cuda", generator=g) * 2
        if onehot:
            logits[:, 3] = 100.0                      # every token on expert 3: its count is the capacity
        out = layer(x, logits)
        torch.cuda.synchronize()
        ref = reference_moe(x, logits, oracle, cfg, device="cuda")
        assert_close(out, ref, bound_for(cfg.dtype, fp8=True),
                     context=f"{size} {kind} dispatch_fp8={dispatch_fp8} T={T} onehot={onehot}")
    assert calls and all(calls), "the FP8 layer did not run the Triton batched kernel with FP8 operands"


@gpu
@pytest.mark.parametrize("size,kind", [("qwen3-30b-a3b", "block"), ("H200", "channel")])
def test_gpu_fp8_dispatch_on_and_off_agree(size, kind):
    """FP8 on the wire or FP8 after dispatch: the same formula on the same rows, so the same function."""
    pytest.importorskip("triton")
    from dataclasses import replace
    base = _sizes()[size]
    src = _source(base, 8)
    on = _gpu_layer(replace(base, quant=Fp8Config(**QUANTS[kind], dispatch_fp8=True)), src, 32)
    off = _gpu_layer(replace(base, quant=Fp8Config(**QUANTS[kind], dispatch_fp8=False)), src, 32)
    g = torch.Generator(device="cuda").manual_seed(12)
    x = torch.randn(29, base.hidden_size, device="cuda", generator=g).to(base.dtype)
    logits = torch.randn(29, base.num_experts, device="cuda", generator=g) * 2
    a, b = on(x, logits), off(x, logits)
    torch.cuda.synchronize()
    assert_close(a, b.double(), 1e-6, context=f"{size} {kind}: FP8 dispatch on vs off")


@gpu
@pytest.mark.parametrize("dispatch_fp8", [False, True])
def test_gpu_fp8_cuda_graph_replay(dispatch_fp8):
    pytest.importorskip("triton")
    from dataclasses import replace

    from epmoe.testing.graphs import capture
    assert contract.experts_class("batched").CAPS.cuda_graph_safe
    base = _sizes()["qwen3-30b-a3b"]
    cfg = replace(base, quant=Fp8Config(**QUANTS["block"], dispatch_fp8=dispatch_fp8))
    layer = _gpu_layer(cfg, _source(base, 9), 64)
    oracle = LayerExperts(layer)
    T = 48
    x = torch.randn(T, cfg.hidden_size, device="cuda").to(cfg.dtype)
    logits = torch.randn(T, cfg.num_experts, device="cuda")
    replay, out = capture(lambda: layer(x, logits))
    for seed in range(2):
        g = torch.Generator(device="cuda").manual_seed(60 + seed)
        x.copy_(torch.randn(T, cfg.hidden_size, device="cuda", generator=g).to(cfg.dtype))
        logits.copy_(torch.randn(T, cfg.num_experts, device="cuda", generator=g) * 2)
        replay()
        torch.cuda.synchronize()
        assert_close(out, reference_moe(x, logits, oracle, cfg, device="cuda"), bound_for(cfg.dtype, fp8=True),
                     context=f"graph replay {seed} dispatch_fp8={dispatch_fp8}")

