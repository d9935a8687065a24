"""from_transformers / patch_model on tiny transformers models of every family, one rank.

Reference: the same transformers model, unpatched. The patched model must give the same logits
(float32 bound), the same router logits (the block's own router computes them), and the same block
outputs (including gpt-oss's router scores) in float32 and bfloat16.
"""
import pytest
import torch

pytest.importorskip("transformers")

import epmoe  # noqa: E402
from epmoe.integration import EPMoEBlock, expert_memory_bytes, from_transformers, patch_model  # noqa: E402
from epmoe.integration.tiny import FAMILY_NAMES, tiny_model  # noqa: E402
from epmoe.testing import assert_close  # noqa: E402


def prompts(seed, batch=2, length=7, vocab=128):
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def moe_block_of(model, layer=0):
    return model.model.layers[layer].mlp


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_patched_model_logits_equal_transformers(family):
    reference, patched = tiny_model(family, seed=11), tiny_model(family, seed=11)
    assert patch_model(patched) == 2
    assert all(isinstance(layer.mlp, EPMoEBlock) for layer in patched.model.layers)
    ids = prompts(0)
    with torch.no_grad():
        want, got = reference(ids).logits, patched(ids).logits
    assert_close(got, want, bound=1e-5, name=f"{family} logits")
    # all experts on the one rank, and the replaced blocks' expert tensors were released
    E = reference.config.num_local_experts if hasattr(reference.config, "num_local_experts") else \
        reference.config.num_experts
    assert sum(b.experts.num_local_experts for b in (layer.mlp for layer in patched.model.layers)) == 2 * E
    assert expert_memory_bytes(patched) > 0


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_forward_matches(family, dtype):
    model = tiny_model(family, seed=5, dtype=dtype)
    block = moe_block_of(model, 1)
    module = from_transformers(block)
    assert module.experts.cfg.dtype == dtype
    x = torch.randn(3, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(2)).to(dtype)
    with torch.no_grad():
        want, got = block(x), module(x)
    if family == "gpt_oss":     # (hidden, router_scores), like the block
        assert isinstance(got, tuple) and len(got) == 2
        torch.testing.assert_close(got[1], want[1])
        want, got = want[0], got[0]
    assert got.shape == want.shape == x.shape and got.dtype == dtype
    assert_close(got, want, bound=1e-5 if dtype == torch.float32 else 1e-2, name=f"{family} block")
    # the module reuses the block's router (and shared experts): no copies
    assert getattr(module, module.router_attr) is getattr(block, module.router_attr)
    for name in module.family.shared_attrs:
        assert getattr(module, name) is getattr(block, name)


def test_routing_config_mapping():
    ds = from_transformers(moe_block_of(tiny_model("deepseek_v3", seed=1)))
    cfg = ds.experts.cfg
    assert (cfg.scoring, cfg.n_group, cfg.topk_group, cfg.routed_scaling_factor, cfg.renormalize) == \
        ("sigmoid", 4, 2, 2.5, True)
    torch.testing.assert_close(ds.experts.score_correction_bias, ds.gate.e_score_correction_bias.float())
    assert ds.experts.score_correction_bias.abs().sum() > 0
    assert from_transformers(moe_block_of(tiny_model("olmoe", seed=1))).experts.cfg.renormalize is False
    assert from_transformers(moe_block_of(tiny_model("qwen3_moe", seed=1))).experts.cfg.renormalize is True
    oss = from_transformers(moe_block_of(tiny_model("gpt_oss", seed=1))).experts
    assert oss.cfg.activation == "swigluoai" and oss.expert_bias


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "olmoe", "gpt_oss"])
def test_router_logits_still_recorded(family):
    reference, patched = tiny_model(family, seed=3), tiny_model(family, seed=3)
    patch_model(patched)
    ids = prompts(1)
    with torch.no_grad():
        want = reference(ids, output_router_logits=True)
        got = patched(ids, output_router_logits=True)
    assert len(got.router_logits) == len(want.router_logits) == 2
    for g, w in zip(got.router_logits, want.router_logits):
        torch.testing.assert_close(g, w)
    torch.testing.assert_close(got.aux_loss, want.aux_loss)


def test_gelu_experts_and_unsupported_activation():
    model = tiny_model("mixtral", seed=2, hidden_act="gelu")
    block = moe_block_of(model)
    module = from_transformers(block)
    assert module.experts.cfg.activation == "gelu"
    x = torch.randn(6, 1, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(module(x), block(x), bound=1e-5)
    tanh_block = moe_block_of(tiny_model("mixtral", seed=2, hidden_act="gelu_pytorch_tanh"))
    with pytest.raises(ValueError, match="tanh approximation"):
        from_transformers(tanh_block)


def test_unsupported_and_misused_blocks():
    with pytest.raises(TypeError, match="supported transformers MoE blocks are .*MixtralSparseMoeBlock"):
        from_transformers(torch.nn.Linear(4, 4))

    class CustomMoE(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = torch.nn.Linear(8, 4)
            self.experts = torch.nn.Linear(8, 8)

    wrapper = torch.nn.Sequential(torch.nn.Linear(8, 8), CustomMoE())
    with pytest.raises(TypeError, match="1 is a CustomMoE, an MoE block epmoe does not know"):
        patch_model(wrapper)
    model = tiny_model("qwen3_moe", seed=0)
    with pytest.raises(TypeError, match="for a single block use from_transformers"):
        patch_model(moe_block_of(model))


def test_patch_model_counts_and_is_idempotent():
    model = tiny_model("qwen2_moe", seed=4, layers=3, mlp_only_layers=[1])
    original = model.model.layers[0].mlp
    shared = original.shared_expert
    assert patch_model(model) == 2
    assert original.experts.gate_up_proj.numel() == 0          # the replaced block's experts are freed
    assert model.model.layers[0].mlp.shared_expert is shared   # shared experts are kept as they are
    assert not isinstance(model.model.layers[1].mlp, EPMoEBlock)
    assert patch_model(model) == 0
    assert epmoe.patch_model is patch_model and epmoe.from_transformers is from_transformers


def test_meta_block_needs_the_checkpoint_loader():
    from transformers import AutoModelForCausalLM

    from epmoe.integration.tiny import tiny_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config("olmoe"))
    with pytest.raises(ValueError, match="meta device"):
        from_transformers(moe_block_of(model))


def test_layer_options_reach_the_layer():
    block = moe_block_of(tiny_model("mixtral", seed=0))
    module = from_transformers(block, experts="reference", dispatcher="local")
    assert module.experts.experts_name == "reference" and module.experts.dispatcher_name == "local"
    with pytest.raises(ValueError, match="unknown experts backend"):
        from_transformers(block, experts="no-such-backend")
