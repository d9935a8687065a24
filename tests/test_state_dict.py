"""A layer's state dict: transformers' names, real sizes, saved and loaded through safetensors on one rank and
with expert parallelism (each rank its shard, another rank's shard refused); `load_hf_experts`."""
import pytest
import torch

from epmoe import Fp8Config, MoEConfig, MoELayer, load_hf_experts
from epmoe.testing import LayerExperts, load_experts, random_experts, random_inputs, run_on_ranks

safetensors_torch = pytest.importorskip("safetensors.torch",
                                        reason="saving a state dict needs safetensors (pip install 'epmoe[models]')")

H, I = 200, 72      # both padded by every scheme: the saved tensors must be unpadded


def _layer(quant=None, dtype=torch.float32, bias=False, seed=0, **kw):
    cfg = MoEConfig(num_experts=4, top_k=2, hidden_size=H, intermediate_size=I, quant=quant, dtype=dtype)
    layer = MoELayer(cfg, experts="reference", expert_bias=bias, **kw)
    load_experts(layer, random_experts(cfg, seed=seed, with_bias=bias))
    return cfg, layer


@pytest.mark.parametrize("quant", [None, Fp8Config(), Fp8Config(weight_block=None, per_channel_weights=True),
                                   Fp8Config(weight_block=None)], ids=["none", "fp8_block", "fp8_channel", "fp8_tensor"])
def test_safetensors_round_trip_single_rank(tmp_path, quant):
    cfg, layer = _layer(quant, bias=quant is None)
    sd = layer.state_dict()
    assert not any("extra_state" in k for k in sd)
    assert sd["experts.3.gate_proj.weight"].shape == (I, H) and sd["experts.3.down_proj.weight"].shape == (H, I)
    if quant is None:
        assert sd["experts.1.up_proj.bias"].shape == (I,) and sd["experts.1.down_proj.bias"].shape == (H,)
    else:
        assert sd["experts.0.gate_proj.weight"].dtype == torch.float8_e4m3fn
        scale_shape = {"block": (1, 2), "channel": (I,), "tensor": ()}[quant.weight_granularity]
        assert sd["experts.0.gate_proj.weight_scale_inv"].shape == scale_shape
    path = tmp_path / "layer.safetensors"
    safetensors_torch.save_file(sd, str(path))
    fresh = MoELayer(cfg, experts="reference", expert_bias=quant is None)
    fresh.load_state_dict(safetensors_torch.load_file(str(path)))
    x, logits = random_inputs(cfg, 7)
    assert torch.equal(fresh(x, logits), layer(x, logits))
    assert torch.equal(fresh.w13, layer.w13) and torch.equal(fresh.w2, layer.w2)


def test_missing_expert_in_state_dict_is_reported_and_not_loaded():
    cfg, layer = _layer()
    sd = {k: v for k, v in layer.state_dict().items() if not k.startswith("experts.2.")}
    fresh = MoELayer(cfg, experts="reference")
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*experts\.2\.gate_proj\.weight"):
        fresh.load_state_dict(sd)
    result = MoELayer(cfg, experts="reference")
    missing = result.load_state_dict(sd, strict=False).missing_keys
    assert "experts.2.down_proj.weight" in missing
    with pytest.raises(RuntimeError, match=r"never loaded \(global ids 2\)"):
        result(*random_inputs(cfg, 2))


def test_load_hf_experts_reads_mixtral_and_qwen_names():
    cfg, layer = _layer()
    experts = random_experts(cfg, seed=0)
    mixtral = {f"model.layers.0.block_sparse_moe.experts.{e}.{n}.weight": t
               for e, (g, u, d) in enumerate(experts) for n, t in (("w1", g), ("w3", u), ("w2", d))}
    fresh = MoELayer(cfg, experts="reference")
    assert load_hf_experts(fresh, mixtral, prefix="model.layers.0.block_sparse_moe.") == [0, 1, 2, 3]
    x, logits = random_inputs(cfg, 5)
    assert torch.equal(fresh(x, logits), layer(x, logits))
    qwen = {f"mlp.{k}": v for k, v in layer.state_dict().items()}
    other = MoELayer(cfg, experts="reference")
    assert load_hf_experts(other, qwen, prefix="mlp.") == [0, 1, 2, 3]
    assert torch.equal(other(x, logits), layer(x, logits))
    with pytest.raises(ValueError, match=r"no tensors under 'experts.' for experts 0..3 of this layer \(found experts none\)"):
        load_hf_experts(MoELayer(cfg), qwen)
    with pytest.raises(ValueError, match=r"expert 1 under 'mlp.' lacks \['down_proj.weight'\]"):
        load_hf_experts(MoELayer(cfg), {k: v for k, v in qwen.items() if k != "mlp.experts.1.down_proj.weight"},
                        prefix="mlp.")


def _ep_shards(rank, world, directory):
    import torch.distributed as dist
    cfg = MoEConfig(num_experts=4, top_k=2, hidden_size=H, intermediate_size=I, dtype=torch.float32)
    group = dist.group.WORLD
    layer = MoELayer(cfg, ep_group=group, dispatcher="alltoall", experts="reference")
    load_experts(layer, random_experts(cfg, seed=3))
    sd = layer.state_dict()
    held = sorted({int(k.split(".")[1]) for k in sd if k.startswith("experts.")})
    safetensors_torch.save_file(sd, f"{directory}/rank{rank}.safetensors")
    dist.barrier()
    fresh = MoELayer(cfg, ep_group=group, dispatcher="alltoall", experts="reference")
    try:
        fresh.load_state_dict(safetensors_torch.load_file(f"{directory}/rank{1 - rank}.safetensors"))
        refused = ""
    except ValueError as exc:
        refused = str(exc)
    fresh.load_state_dict(safetensors_torch.load_file(f"{directory}/rank{rank}.safetensors"))
    x, logits = random_inputs(cfg, 6 + rank, seed=rank)
    same = torch.equal(fresh(x, logits), layer(x, logits))
    try:      # the oracle's view of a layer needs every expert: a rank's shard is refused
        LayerExperts(layer)
        return held, refused, same, "no error"
    except ValueError as exc:
        return held, refused, same, str(exc)


def test_safetensors_shards_with_expert_parallelism(tmp_path):
    results = run_on_ranks(_ep_shards, 2, str(tmp_path), backend="gloo")
    assert [r[0] for r in results] == [[0, 1], [2, 3]]
    for rank, (_, refused, same, view) in enumerate(results):
        assert f"rank {rank} of 2" in refused and "another rank's shard" in refused
        assert same
        assert "the layer holds 2 of 4 experts" in view
