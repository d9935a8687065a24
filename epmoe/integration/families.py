"""The table of transformers MoE families epmoe can take over, one `Family` entry each.

An entry says, for one family's sparse-MoE block (transformers 5.x layout, experts fused into 3D
parameters): which submodule computes the router logits, which submodules are shared experts that stay
as they are, how the block's routing maps onto `MoEConfig`, how one expert's weights are laid out (in the
live block and in a checkpoint) and what the block's forward returns. Nothing here runs a forward: the
`EPMoEBlock` in `block.py` does, driven by these entries.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..activations import SWIGLUOAI_ALPHA, SWIGLUOAI_LIMIT

GATE_UP = "gate_up"   # gate_up_proj [E, 2I, H]: rows [0, I) gate, [I, 2I) up; down_proj [E, H, I]
GPT_OSS = "gpt_oss"   # gate_up_proj [E, H, 2I]: columns interleaved gate, up, gate, ...; down_proj [E, I, H]; biases


@dataclass(frozen=True)
class Family:
    """How one transformers family's sparse-MoE block maps onto an epmoe `MoELayer`."""

    name: str
    block_classes: tuple[str, ...]          # class names of the block (matched along the MRO)
    router_attr: str                        # submodule whose forward returns (router_logits, ...)
    moe_fields: Callable[[nn.Module], dict]  # block -> MoEConfig fields other than dtype and quant
    layout: str = GATE_UP
    shared_attrs: tuple[str, ...] = ()      # shared-expert submodules, kept as they are on every rank
    shared_output: Callable | None = None   # (block, x [T, H]) -> what the shared experts add, [T, H]
    returns_router_scores: bool = False     # forward returns (hidden, router_scores) instead of hidden
    checkpoint_block_names: tuple[str, ...] = ("mlp",)  # the block's own name in checkpoints, per layer
    expert_weight_names: tuple[str, str, str] | None = ("gate_proj", "up_proj", "down_proj")  # per-expert keys

    @property
    def expert_bias(self) -> bool:
        return self.layout == GPT_OSS


# ------------------------------------------------------------------------------------- config mapping
def _activation_of(act_fn) -> str:
    """Name the activation by what it computes (transformers' activation classes change names)."""
    x = torch.linspace(-6.0, 6.0, 97, dtype=torch.float64)
    with torch.no_grad():
        y = act_fn(x)
    for name, ref in (("silu", F.silu(x)), ("gelu", F.gelu(x, approximate="none"))):
        if torch.allclose(y, ref, rtol=1e-6, atol=1e-9):
            return name
    raise ValueError(f"expert activation {type(act_fn).__name__} is not one epmoe computes: the gated activations "
                     "are silu, gelu (exact, not the tanh approximation) and swigluoai (gpt-oss)")


def _attr(module: nn.Module, name: str, family: str):
    if not hasattr(module, name):
        raise TypeError(f"{family}: {type(module).__name__} has no attribute {name!r}; this transformers version's "
                        "block layout is not the one epmoe knows (transformers 5.x)")
    return getattr(module, name)


def _fused_sizes(block: nn.Module, family: str) -> tuple[int, int, int]:
    """(E, H, I) from the fused expert parameters' shapes (works on the meta device too)."""
    experts = _attr(block, "experts", family)
    if isinstance(experts, nn.ModuleList):
        raise TypeError(f"{family}: the block keeps its experts in an nn.ModuleList (the transformers 4.x layout); "
                        "epmoe reads the fused 3D expert parameters of transformers >= 5")
    gate_up, down = _attr(experts, "gate_up_proj", family), _attr(experts, "down_proj", family)
    E, two_i, H = gate_up.shape
    if tuple(down.shape) != (E, H, two_i // 2):
        raise ValueError(f"{family}: experts.gate_up_proj {list(gate_up.shape)} and down_proj {list(down.shape)} are "
                         "not the [E, 2I, H] / [E, H, I] layout")
    return E, H, two_i // 2


def _softmax_fields(family: str, renormalize: Callable[[nn.Module], bool]):
    def fields(block: nn.Module) -> dict:
        E, H, I = _fused_sizes(block, family)
        gate = _attr(block, "gate", family)
        return dict(num_experts=E, top_k=int(_attr(gate, "top_k", family)), hidden_size=H, intermediate_size=I,
                    activation=_activation_of(_attr(block.experts, "act_fn", family)), scoring="softmax",
                    renormalize=bool(renormalize(gate)))
    return fields


def _deepseek_v3_fields(block: nn.Module) -> dict:
    E, H, I = _fused_sizes(block, "deepseek_v3")
    gate = _attr(block, "gate", "deepseek_v3")
    n_group, topk_group = int(_attr(gate, "num_group", "deepseek_v3")), int(_attr(gate, "topk_group", "deepseek_v3"))
    if n_group == 1:            # one group holding every expert: grouped selection is plain top-k
        n_group = topk_group = None
    return dict(num_experts=E, top_k=int(_attr(gate, "top_k", "deepseek_v3")), hidden_size=H, intermediate_size=I,
                activation=_activation_of(_attr(block.experts, "act_fn", "deepseek_v3")), scoring="sigmoid",
                renormalize=bool(_attr(gate, "norm_topk_prob", "deepseek_v3")), n_group=n_group,
                topk_group=topk_group, routed_scaling_factor=float(_attr(gate, "routed_scaling_factor", "deepseek_v3")))


def _gpt_oss_fields(block: nn.Module) -> dict:
    experts = _attr(block, "experts", "gpt_oss")
    gate_up, down = _attr(experts, "gate_up_proj", "gpt_oss"), _attr(experts, "down_proj", "gpt_oss")
    E, H, two_i = gate_up.shape
    if tuple(down.shape) != (E, two_i // 2, H):
        raise ValueError(f"gpt_oss: experts.gate_up_proj {list(gate_up.shape)} and down_proj {list(down.shape)} are not "
                         "the [E, H, 2I] / [E, I, H] layout")
    alpha, limit = float(getattr(experts, "alpha", SWIGLUOAI_ALPHA)), float(getattr(experts, "limit", SWIGLUOAI_LIMIT))
    if (alpha, limit) != (SWIGLUOAI_ALPHA, SWIGLUOAI_LIMIT):
        raise ValueError(f"gpt_oss: the experts use swiglu alpha={alpha}, limit={limit}; epmoe's swigluoai is defined "
                         f"with alpha={SWIGLUOAI_ALPHA}, limit={SWIGLUOAI_LIMIT}")
    router = _attr(block, "router", "gpt_oss")
    # The router takes the top-k logits and softmaxes them: the same weights as softmax over all experts
    # followed by top-k and renormalization.
    return dict(num_experts=E, top_k=int(_attr(router, "top_k", "gpt_oss")), hidden_size=H,
                intermediate_size=two_i // 2, activation="swigluoai", scoring="softmax", renormalize=True)


# ------------------------------------------------------------------------------------- shared experts
def _qwen2_shared(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Qwen2-MoE: the shared expert's output scaled by its own sigmoid gate."""
    return torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)


def _deepseek_shared(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return block.shared_experts(x)


# ------------------------------------------------------------------------------------- expert layouts
def split_expert(layout: str, gate_up: torch.Tensor, down: torch.Tensor, gate_up_bias: torch.Tensor | None = None,
                 down_bias: torch.Tensor | None = None) -> dict:
    """One expert's fused tensors -> `MoELayer.load_expert` arguments (gate/up [I, H], down [H, I], biases)."""
    if layout == GATE_UP:
        i = gate_up.shape[0] // 2
        return dict(gate_proj=gate_up[:i], up_proj=gate_up[i:], down_proj=down)
    if layout == GPT_OSS:
        return dict(gate_proj=gate_up[:, 0::2].t(), up_proj=gate_up[:, 1::2].t(), down_proj=down.t(),
                    gate_bias=gate_up_bias[0::2], up_bias=gate_up_bias[1::2], down_bias=down_bias)
    raise ValueError(f"unknown expert layout {layout!r}")


def block_expert(family: Family, block: nn.Module, e: int) -> dict:
    """Expert `e` of a live transformers block as `load_expert` arguments (views, nothing copied)."""
    ex = block.experts
    if family.layout == GPT_OSS:
        return split_expert(GPT_OSS, ex.gate_up_proj[e], ex.down_proj[e], ex.gate_up_proj_bias[e], ex.down_proj_bias[e])
    return split_expert(GATE_UP, ex.gate_up_proj[e], ex.down_proj[e])


FAMILIES: tuple[Family, ...] = (
    Family("mixtral", ("MixtralSparseMoeBlock",), "gate", _softmax_fields("mixtral", lambda gate: True),
           checkpoint_block_names=("block_sparse_moe", "mlp"), expert_weight_names=("w1", "w3", "w2")),
    Family("qwen2_moe", ("Qwen2MoeSparseMoeBlock",), "gate",
           _softmax_fields("qwen2_moe", lambda gate: _attr(gate, "norm_topk_prob", "qwen2_moe")),
           shared_attrs=("shared_expert", "shared_expert_gate"), shared_output=_qwen2_shared),
    Family("qwen3_moe", ("Qwen3MoeSparseMoeBlock",), "gate",
           _softmax_fields("qwen3_moe", lambda gate: _attr(gate, "norm_topk_prob", "qwen3_moe"))),
    Family("deepseek_v3", ("DeepseekV3MoE",), "gate", _deepseek_v3_fields,
           shared_attrs=("shared_experts",), shared_output=_deepseek_shared),
    Family("olmoe", ("OlmoeSparseMoeBlock",), "gate",
           _softmax_fields("olmoe", lambda gate: _attr(gate, "norm_topk_prob", "olmoe"))),
    Family("gpt_oss", ("GptOssMLP",), "router", _gpt_oss_fields, layout=GPT_OSS, returns_router_scores=True,
           expert_weight_names=None),
)

SUPPORTED_BLOCKS = tuple(c for f in FAMILIES for c in f.block_classes)


def find_family(block: nn.Module) -> Family | None:
    names = {cls.__name__ for cls in type(block).__mro__}
    for family in FAMILIES:
        if names.intersection(family.block_classes):
            return family
    return None


def family_of(block: nn.Module) -> Family:
    """The family of a transformers sparse-MoE block; TypeError naming the supported blocks otherwise."""
    family = find_family(block)
    if family is None:
        raise TypeError(f"epmoe cannot convert a {type(block).__name__}: supported transformers MoE blocks are "
                        + ", ".join(f"{c} ({f.name})" for f in FAMILIES for c in f.block_classes))
    return family
