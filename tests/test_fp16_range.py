"""float16 near the top of its range: act(gate) * up passes 65504 while the layer's output fits. Every
experts backend must keep that intermediate where it cannot overflow (float32, or float16 rows scaled by
a power of two) and match the oracle, not return Inf. CPU backends here (the batched one on its layout
directly; through `low_latency` on two ranks in tests/test_ep_input_policies.py), the Triton kernels
under the interpreter in tests/test_triton_interpreter.py and on a GPU below."""
import pytest
import torch

from epmoe import MoEConfig, MoELayer, reference_moe
from epmoe.experts.base import FP16_ROW_LIMIT, gemm_rows
from epmoe.experts.batched import BatchedExperts
from epmoe.experts.reference import ReferenceExperts
from epmoe.layouts import BatchedBatch
from epmoe.routing import Routing
from epmoe.testing import assert_close, bound_for, fp16_range_case, load_experts

FP16_MAX = 65504.0


def _cfg(activation="silu", E=8, k=2, H=48, I=40):
    return MoEConfig(num_experts=E, top_k=k, hidden_size=H, intermediate_size=I, activation=activation,
                     dtype=torch.float16)


@pytest.mark.parametrize("backend", ["reference", "grouped_mm"])
@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_layer_near_the_top_of_fp16(backend, activation):
    cfg = _cfg(activation)
    x, logits, experts, peak = fp16_range_case(cfg, 33, seed=1)
    assert peak > 4 * FP16_MAX, "the case must push the intermediate past float16's range"
    layer = MoELayer(cfg, experts=backend)
    load_experts(layer, experts)
    ref = reference_moe(x, logits, experts, cfg)
    assert 0.25 * FP16_MAX < ref.abs().max() < FP16_MAX
    for T in (1, 33):
        assert_close(layer(x[:T], logits[:T]), ref[:T], bound_for(torch.float16), context=f"{backend} T={T}")


@pytest.mark.parametrize("backend", [BatchedExperts, ReferenceExperts])
def test_batched_layout_near_the_top_of_fp16(backend):
    """[L, C, H] rows with counts (padding rows NaN): each expert's unweighted output on its rows."""
    cfg = _cfg(E=3, k=1)
    x, _, experts, _ = fp16_range_case(cfg, 3 * 8, seed=2)
    counts = torch.tensor([8, 0, 5])
    rows = x.reshape(3, 8, cfg.hidden_size).clone()
    rows[1:, 5:] = float("nan")
    layer = MoELayer(cfg, experts="reference")
    load_experts(layer, experts)
    out = backend(cfg)(BatchedBatch(rows, counts), layer.expert_weights)
    for e, n in enumerate(counts.tolist()):
        assert (out[e, n:] == 0).all()
        if n:
            one = MoEConfig(num_experts=1, top_k=1, hidden_size=cfg.hidden_size,
                            intermediate_size=cfg.intermediate_size, dtype=torch.float16)
            ref = reference_moe(rows[e, :n], None, [experts[e]], one,
                                routing=Routing(torch.zeros(n, 1, dtype=torch.int32), torch.ones(n, 1)))
            assert_close(out[e, :n], ref, bound_for(torch.float16), context=f"{backend.name} expert {e}")


def test_gemm_rows_scales_by_powers_of_two_only_where_needed():
    t = torch.tensor([[1.5, -200.0, 3.0], [1e5, -3e5, 7.0], [0.0, 0.0, 0.0], [float("nan"), 1.0, 2.0]])
    rows, factor = gemm_rows(t, torch.float16)
    assert rows.dtype == torch.float16 and factor.dtype == torch.float32
    assert factor[0].item() == 1.0 and factor[2].item() == 1.0
    assert torch.equal(rows[0], t[0].half())                        # within the limit: the same bits
    assert factor[1].item() == 2.0 ** 11 and rows[1].abs().max() <= FP16_ROW_LIMIT
    assert torch.allclose(rows[1].float() * factor[1], t[1], rtol=2 ** -11, atol=0)   # float16 rounding only
    assert torch.isnan(factor[3]).all() and torch.isfinite(rows[:3]).all()
    same, none = gemm_rows(t[:3], torch.bfloat16)
    assert none is None and torch.equal(same, t[:3].bfloat16())


_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@_cuda
@pytest.mark.parametrize("backend", ["triton", "grouped_mm"])
def test_gpu_layer_near_the_top_of_fp16(backend):
    cfg = _cfg(E=16, k=4, H=256, I=128)
    x, logits, experts, _ = fp16_range_case(cfg, 300, seed=3)
    layer = MoELayer(cfg, experts=backend, device="cuda")
    load_experts(layer, experts)
    ref = reference_moe(x, logits, experts, cfg)
    for T in (1, 4, 300):          # T = 1 and 4 take the decode path where the tables say so
        out = layer(x[:T].cuda(), logits[:T].cuda())
        assert_close(out, ref[:T], bound_for(torch.float16), context=f"{backend} T={T}")


@pytest.mark.gpu
@_cuda
@pytest.mark.parametrize("path", ["tiles", "gemv"])
def test_gpu_fused_kernels_near_the_top_of_fp16(path):
    """The Triton flat path with the tile kernels and with the decode (matrix-vector) kernels."""
    from epmoe.kernels.fused_moe import fused_experts
    from epmoe.kernels.tuning_table import GemmConfig, GemvConfig, MoEKernelConfig
    config = MoEKernelConfig(16, GemmConfig(64, 64, 1, 4, 3), GemmConfig(64, 64, 1, 4, 3),
                             gemv=GemvConfig(32, 128, 32, 128) if path == "gemv" else None)
    cfg = _cfg(E=8, k=2, H=256, I=128)
    x, _, experts, _ = fp16_range_case(cfg, 6, seed=5)
    g = torch.Generator().manual_seed(6)
    ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(6)]).to(torch.int32)
    w = torch.softmax(torch.randn(6, 2, generator=g), dim=1)
    w13 = torch.stack([torch.cat([gate, up]) for gate, up, _ in experts]).half().cuda()
    w2 = torch.stack([down for _, _, down in experts]).half().cuda()
    out = fused_experts(x.cuda(), ids.cuda(), w.cuda(), w13, w2, "silu", config=config)
    ref = reference_moe(x, None, experts, cfg, routing=Routing(ids, w))
    assert_close(out, ref, bound_for(torch.float16), context=path)


@pytest.mark.gpu
@_cuda
def test_gpu_batched_kernel_near_the_top_of_fp16():
    cfg = _cfg(E=4, k=1, H=256, I=128)
    x, _, experts, _ = fp16_range_case(cfg, 4 * 16, seed=4)
    on_cpu, on_gpu = MoELayer(cfg, experts="reference"), MoELayer(cfg, experts="reference", device="cuda")
    load_experts(on_cpu, experts)
    load_experts(on_gpu, experts)
    rows = x.reshape(4, 16, cfg.hidden_size)
    counts = torch.tensor([16, 3, 0, 9])
    out = BatchedExperts(cfg, torch.device("cuda"))(BatchedBatch(rows.cuda(), counts.cuda()), on_gpu.expert_weights)
    want = BatchedExperts(cfg)(BatchedBatch(rows, counts), on_cpu.expert_weights)     # the PyTorch path
    real = torch.arange(16)[None, :] < counts[:, None]          # rows past each count are unspecified
    assert torch.isfinite(out[real.cuda()]).all()
    assert_close(out[real.cuda()], want[real].double(), bound_for(torch.float16),
                 context="Triton batched kernel vs the PyTorch path")
