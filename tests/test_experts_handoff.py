"""Every experts backend that takes FP8 rows treats a batch of an FP8 layer the same way: rows that come
in the layer's dtype are quantized on entry with the one formula, so they give exactly what the same rows
quantized beforehand give; FP8 rows without scales, and scales on a layer that is not FP8, are refused."""
import pytest
import torch

from epmoe import Fp8Config, MoEConfig, MoELayer, contract
from epmoe.layouts import BatchedBatch, FlatBatch
from epmoe.testing import load_experts, random_experts

HERE = "cuda" if torch.cuda.is_available() else "cpu"


def _cfg(dtype=torch.float32):
    quant = Fp8Config(weight_block=None, per_channel_weights=True, activation="per_token")
    return MoEConfig(num_experts=4, top_k=2, hidden_size=128, intermediate_size=64, dtype=dtype, quant=quant)


def _fp8_backends() -> list[str]:
    cfg = _cfg(torch.bfloat16 if HERE == "cuda" else torch.float32)
    return [x for x, cls in contract.EXPERTS.items()
            if cls.CAPS.fp8_activations == contract.TAKES_FP8 and contract.experts_problem(x, cfg, HERE) is None]


def _batch(layout: str, cfg, device):
    g = torch.Generator().manual_seed(3)
    if layout == "flat":
        x = torch.randn(6, cfg.hidden_size, generator=g).to(cfg.dtype).to(device)
        ids = torch.tensor([[0, 1], [2, -1], [3, 0], [-1, -1], [1, 2], [3, 1]], dtype=torch.int32, device=device)
        return FlatBatch(x, ids, torch.rand(6, 2, generator=g).to(device))
    x = torch.randn(4, 3, cfg.hidden_size, generator=g).to(cfg.dtype).to(device)
    return BatchedBatch(x, torch.tensor([3, 0, 1, 2], dtype=torch.int32, device=device))


def test_there_is_an_fp8_backend_here():
    assert _fp8_backends()


@pytest.mark.parametrize("name", _fp8_backends())
def test_unquantized_rows_are_quantized_on_entry_by_every_backend(name):
    cfg = _cfg(torch.bfloat16 if HERE == "cuda" else torch.float32)
    layout = sorted(contract.experts_class(name).CAPS.layouts)[0]
    dispatcher = "local" if layout == "flat" else "low_latency"
    layer = MoELayer(cfg, dispatcher=dispatcher, experts=name, device=HERE, max_tokens_per_rank=4)
    load_experts(layer, random_experts(cfg, seed=2))
    batch = _batch(layout, cfg, HERE)
    quantized = layer.experts.activations_for(batch)
    assert batch.scales is None and quantized.scales is not None       # the caller's batch is left as it is
    plain = layer.experts(batch, layer.expert_weights)
    assert torch.equal(plain, layer.experts(quantized, layer.expert_weights))
    assert plain.abs().sum() > 0
    with pytest.raises(ValueError, match="without their scales"):
        layer.experts(type(batch)(**{**batch.__dict__, "x": quantized.x, "scales": None}), layer.expert_weights)


def test_scales_on_a_layer_that_is_not_fp8_are_refused():
    cfg = MoEConfig(num_experts=4, top_k=2, hidden_size=128, intermediate_size=64, dtype=torch.float32)
    layer = MoELayer(cfg, dispatcher="local", experts="reference")
    batch = _batch("flat", cfg, "cpu")
    batch.scales = torch.ones(6, 1)
    with pytest.raises(ValueError, match="not FP8"):
        layer.experts(batch, layer.expert_weights)


@pytest.mark.parametrize("layout", ["flat", "batched"])
def test_rows_not_of_the_padded_hidden_size_are_refused(layout):
    """The experts take rows as the dispatcher hands them over, padded to the layer's padded hidden size
    (block FP8 pads H = 200 to 256); rows of the model's own width are refused with the rule said, before any
    backend's own code (the Gluon pipeline's refusal came from deep inside its GEMM's operand check)."""
    cfg = MoEConfig(num_experts=4, top_k=2, hidden_size=200, intermediate_size=128, dtype=torch.float32,
                    quant=Fp8Config(weight_block=(128, 128)))
    assert cfg.padded_hidden_size == 256
    name = "reference"
    layer = MoELayer(cfg, dispatcher="local" if layout == "flat" else "low_latency", experts=name,
                     max_tokens_per_rank=4)
    load_experts(layer, random_experts(cfg, seed=2))
    batch = _batch(layout, cfg, "cpu")           # rows of 200 columns
    with pytest.raises(ValueError, match="padded hidden size is 256"):
        layer.experts(batch, layer.expert_weights)
    padded = torch.nn.functional.pad(batch.x, (0, 56))
    out = layer.experts(type(batch)(**{**batch.__dict__, "x": padded}), layer.expert_weights)
    assert out.shape[-1] == 256 and out.abs().sum() > 0
