"""Named MoE layer shapes of real models, for `epmoe run` and the benchmarks.

Each preset is the routed-experts part of one MoE layer of that model (shared experts and attention are
the model's business). `shrink_config` scales one down to fit a small machine while keeping its routing.
"""
from __future__ import annotations

import dataclasses

import torch

from .config import MoEConfig

PRESETS: dict[str, dict] = {
    # small and awkward on purpose: H not a multiple of 128
    "tiny": dict(num_experts=8, top_k=2, hidden_size=200, intermediate_size=96, activation="silu",
                 scoring="softmax", renormalize=True),
    "mixtral-8x7b": dict(num_experts=8, top_k=2, hidden_size=4096, intermediate_size=14336,
                         activation="silu", scoring="softmax", renormalize=True),
    "qwen3-30b-a3b": dict(num_experts=128, top_k=8, hidden_size=2048, intermediate_size=768,
                          activation="silu", scoring="softmax", renormalize=True),
    "deepseek-v3": dict(num_experts=256, top_k=8, hidden_size=7168, intermediate_size=2048,
                        activation="silu", scoring="sigmoid", renormalize=True, n_group=8, topk_group=4,
                        routed_scaling_factor=2.5),
    "gpt-oss-120b": dict(num_experts=128, top_k=4, hidden_size=2880, intermediate_size=2880,
                         activation="swigluoai", scoring="softmax", renormalize=True),
    "olmoe": dict(num_experts=64, top_k=8, hidden_size=2048, intermediate_size=1024, activation="silu",
                  scoring="softmax", renormalize=False),
}


def preset_config(name: str, dtype: torch.dtype = torch.bfloat16, **overrides) -> MoEConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    fields = dict(PRESETS[name])
    fields.update(overrides)
    return MoEConfig(dtype=dtype, **fields)


def shrink_config(cfg: MoEConfig, experts: int | None = None, shrink: int = 1) -> MoEConfig:
    """Fewer experts (`experts`) and/or hidden and intermediate sizes divided by `shrink`.

    top_k and the expert groups are reduced with the expert count so the config stays valid: groups keep
    their number if it still divides E with >= 2 experts each, otherwise grouping is halved until it does.
    """
    changes: dict = {}
    if experts is not None and experts != cfg.num_experts:
        if experts < 1:
            raise ValueError(f"--experts must be >= 1, got {experts}")
        changes["num_experts"] = experts
        top_k = min(cfg.top_k, experts)
        if cfg.grouped:
            n_group = cfg.n_group
            while n_group > 1 and (experts % n_group or experts // n_group < 2):
                n_group //= 2
            if n_group > 1 and experts % n_group == 0 and experts // n_group >= 2:
                topk_group = min(cfg.topk_group, n_group)
                top_k = min(top_k, topk_group * (experts // n_group))
                changes.update(n_group=n_group, topk_group=topk_group)
            else:
                changes.update(n_group=None, topk_group=None)
        changes["top_k"] = top_k
    if shrink != 1:
        if shrink < 1:
            raise ValueError(f"--shrink must be >= 1, got {shrink}")
        changes["hidden_size"] = max(1, cfg.hidden_size // shrink)
        changes["intermediate_size"] = max(1, cfg.intermediate_size // shrink)
    return dataclasses.replace(cfg, **changes) if changes else cfg


def expert_weight_bytes(cfg: MoEConfig, num_experts: int | None = None) -> int:
    e = cfg.num_experts if num_experts is None else num_experts
    itemsize = 1 if cfg.quant is not None else torch.tensor([], dtype=cfg.dtype).element_size()
    return e * 3 * cfg.hidden_size * cfg.intermediate_size * itemsize
