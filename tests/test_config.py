import pytest
import torch

import epmoe
from epmoe import MoEConfig

BASE = dict(num_experts=16, top_k=4, hidden_size=64, intermediate_size=32)


def test_valid_configs_build():
    MoEConfig(**BASE)
    MoEConfig(**BASE, scoring="sigmoid", n_group=4, topk_group=2, routed_scaling_factor=2.5)
    MoEConfig(**BASE, activation="swigluoai", dtype=torch.float32, renormalize=False)


@pytest.mark.parametrize("changes, field, rule", [
    (dict(top_k=17), "top_k", "<= num_experts"),
    (dict(top_k=0), "top_k", ">= 1"),
    (dict(num_experts=0, top_k=1), "num_experts", ">= 1"),
    (dict(hidden_size=-4), "hidden_size", ">= 1"),
    (dict(intermediate_size=0), "intermediate_size", ">= 1"),
    (dict(hidden_size=64.0), "hidden_size", "must be an int"),
    (dict(top_k=True), "top_k", "must be an int"),
    (dict(activation="relu"), "activation", "one of"),
    (dict(scoring="tanh"), "scoring", "one of"),
    (dict(renormalize="yes"), "renormalize", "bool"),
    (dict(n_group=3, topk_group=1), "num_experts", "divisible by n_group"),
    (dict(n_group=4, topk_group=5), "topk_group", "<= n_group"),
    (dict(n_group=4), "n_group", "go together"),
    (dict(topk_group=2), "topk_group", "go together"),
    (dict(n_group=16, topk_group=2), "n_group", "at least 2"),
    (dict(n_group=4, topk_group=1, top_k=5), "top_k", "topk_group * experts per group"),
    (dict(routed_scaling_factor=0.0), "routed_scaling_factor", "> 0"),
    (dict(routed_scaling_factor=float("nan")), "routed_scaling_factor", "finite"),
    (dict(dtype=torch.int8), "dtype", "one of"),
    (dict(quant="fp8-please"), "quant", "unknown quantization"),
])
def test_invalid_values_name_field_and_rule(changes, field, rule):
    with pytest.raises((ValueError, TypeError)) as info:
        MoEConfig(**{**BASE, **changes})
    assert field in str(info.value) and rule in str(info.value), str(info.value)


def test_unquantized_padding_is_to_16_bytes():
    cfg = MoEConfig(**{**BASE, "hidden_size": 200, "intermediate_size": 72})
    assert (cfg.padded_hidden_size, cfg.padded_intermediate_size) == (200, 72)
    cfg = MoEConfig(**{**BASE, "hidden_size": 180, "intermediate_size": 7})
    assert (cfg.padded_hidden_size, cfg.padded_intermediate_size) == (184, 8)
    cfg = MoEConfig(**{**BASE, "hidden_size": 181, "intermediate_size": 7, "dtype": torch.float32})
    assert (cfg.padded_hidden_size, cfg.padded_intermediate_size) == (184, 8)


def test_presets_are_valid_and_shrinkable():
    from epmoe.presets import PRESETS, preset_config, shrink_config
    for name in PRESETS:
        cfg = preset_config(name)
        small = shrink_config(cfg, experts=6, shrink=8)
        assert small.num_experts == 6 and small.top_k <= 6
        assert small.hidden_size == max(1, cfg.hidden_size // 8)
    ds = shrink_config(preset_config("deepseek-v3"), experts=16)
    assert ds.n_group == 8 and ds.topk_group == 4 and ds.top_k == 8
    with pytest.raises(ValueError, match="unknown preset"):
        preset_config("llama")
    assert epmoe.MoEConfig is MoEConfig


@pytest.mark.parametrize("bad, entry", [([0.9, 1.7, 1, 0], 0), ([0, 1, True, 0], 2), ([0, "1", 1, 0], 1)])
def test_placement_takes_only_integer_ranks(bad, entry):
    with pytest.raises(ValueError, match=f"entry {entry} is"):
        epmoe.Placement(4, 2, 0, expert_to_rank=bad)
    import numpy as np
    assert epmoe.Placement(4, 2, 1, expert_to_rank=np.array([0, 1, 1, 0])).local_experts == (1, 2)
