"""`from_transformers` / `patch_model`: a transformers sparse-MoE block running on an epmoe `MoELayer`.

The block's own router module computes the router logits (so transformers' router-logit capture and
its auxiliary loss keep working), epmoe routes, dispatches and runs the routed experts (split over
`ep_group`), and the shared experts stay the block's own modules, replicated on every rank. Submodule
names are kept (`gate`/`router`, `shared_expert`, ...), so state-dict keys other than the routed experts
are unchanged.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..config import MoEConfig
from ..layer import MoELayer
from ..log import get_logger
from .families import FAMILIES, Family, block_expert, family_of, find_family

log = get_logger("integration")


class EPMoEBlock(nn.Module):
    """Drop-in replacement of a transformers MoE block: `[B, S, H] -> [B, S, H]` (gpt-oss: `(hidden,
    router_scores)`), routed experts in `self.experts` (an `epmoe.MoELayer`)."""

    def __init__(self, family: Family, router: nn.Module, experts: MoELayer, shared: dict[str, nn.Module]):
        super().__init__()
        self.family = family
        self.router_attr = family.router_attr
        self.add_module(family.router_attr, router)
        self.experts = experts
        for name, module in shared.items():
            self.add_module(name, module)
        self.overlap_shared = True      # GPU: shared experts on a side stream, overlapping the dispatch
        self._side_stream = None
        self.sync_routing_state()

    @property
    def router_module(self) -> nn.Module:
        return getattr(self, self.router_attr)

    def sync_routing_state(self) -> None:
        """Copy the router's score-correction bias (DeepSeek-V3 `e_score_correction_bias`) into the layer.

        Called at construction and by the checkpoint loader after the router's tensors are loaded."""
        bias = getattr(self.router_module, "e_score_correction_bias", None)
        if bias is None or self.experts.score_correction_bias is None or bias.is_meta:
            return
        with torch.no_grad():
            self.experts.score_correction_bias.copy_(bias.float())

    def forward(self, hidden_states: torch.Tensor):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        router_out = self.router_module(x)
        logits = router_out[0] if isinstance(router_out, tuple) else router_out
        if self.family.shared_output is None:
            out = self.experts(x, logits.reshape(x.shape[0], -1))
        else:
            out = self._routed_and_shared(x, logits.reshape(x.shape[0], -1))
        out = out.reshape(shape)
        if self.family.returns_router_scores:
            return out, router_out[1]
        return out

    def _routed_and_shared(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Routed experts + shared experts. The layer computes the shared experts while its dispatch is
        in flight; on a GPU they also run on a side stream, so the device overlaps them with the routed
        path's collectives and host syncs, and are joined before the sum."""
        if x.device.type != "cuda" or not self.overlap_shared:
            return self.experts(x, logits, shared_experts=lambda h: self.family.shared_output(self, h))
        main = torch.cuda.current_stream(x.device)
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(x.device)
        side = self._side_stream
        side.wait_stream(main)
        with torch.cuda.stream(side):
            shared = self.family.shared_output(self, x)
        routed = self.experts(x, logits)
        main.wait_stream(side)
        shared.record_stream(main)      # allocated on the side stream, consumed on the main one
        x.record_stream(side)           # read on the side stream, owned by the main one
        return routed + shared

    def extra_repr(self) -> str:
        return f"family={self.family.name}, overlap_shared={self.overlap_shared}"


def _experts_device_dtype(block: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = block.experts.gate_up_proj
    return p.device, p.dtype


def convert_block(block: nn.Module, ep_group=None, load_weights: bool = True, **layer_options) -> EPMoEBlock:
    """`from_transformers`, with `load_weights=False` for the checkpoint loader (experts filled later)."""
    family = family_of(block)
    fields = family.moe_fields(block)
    quant = layer_options.pop("quant", None)
    dtype = layer_options.pop("dtype", None)
    block_device, block_dtype = _experts_device_dtype(block)
    dtype = dtype if dtype is not None else block_dtype
    device = layer_options.pop("device", None)
    if device is None:
        if block_device.type == "meta":
            raise ValueError(f"from_transformers: the {type(block).__name__}'s experts are on the meta device; pass "
                             "device=... (or load a checkpoint with epmoe.integration.load_model)")
        device = block_device
    if load_weights and block_device.type == "meta":
        raise ValueError(f"from_transformers: the {type(block).__name__}'s expert weights are on the meta device and "
                         "cannot be copied; load them from the checkpoint with epmoe.integration.load_model")
    cfg = MoEConfig(**fields, dtype=dtype, quant=quant)
    layer = MoELayer(cfg, ep_group=ep_group, device=device, expert_bias=family.expert_bias, **layer_options)
    if load_weights:
        for e in layer.local_experts:
            layer.load_expert(int(e), **block_expert(family, block, int(e)))
    shared = {name: getattr(block, name) for name in family.shared_attrs}
    return EPMoEBlock(family, getattr(block, family.router_attr), layer, shared)


def from_transformers(block: nn.Module, ep_group=None, **layer_options) -> EPMoEBlock:
    """An epmoe module computing what `block` (a transformers sparse-MoE block) computes, same forward.

    With `ep_group` this rank copies only its own experts; the router and shared experts are the block's
    own modules (shared, not copied). `layer_options` go to `MoELayer` (dispatcher, experts, device,
    max_tokens_per_rank, expert_placement, redundant_experts, router), plus `quant` (an FP8 config for `MoEConfig.quant`)
    and `dtype` (default: the block's expert dtype). The device is fixed here (default: the block's), so
    move the model first and convert after. For inference: the routed experts take no gradients and
    Mixtral's training-time router jitter is not applied.
    """
    return convert_block(block, ep_group, load_weights=True, **layer_options)


def _unsupported_moe(module: nn.Module) -> bool:
    """Looks like an MoE block (routed experts and a router) that no family entry covers."""
    return isinstance(getattr(module, "experts", None), nn.Module) and any(
        isinstance(getattr(module, a, None), nn.Module) for a in ("gate", "router"))


def replace_blocks(model: nn.Module, convert) -> list[str]:
    """Replace every supported MoE block by `convert(block)`; return the replaced module paths."""
    targets: list[tuple[str, nn.Module, str, nn.Module]] = []
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        prefix, module = stack.pop()
        for name, child in module.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if isinstance(child, EPMoEBlock):
                continue
            if find_family(child) is not None:
                targets.append((path, module, name, child))
            elif _unsupported_moe(child):
                raise TypeError(f"{path} is a {type(child).__name__}, an MoE block epmoe does not know; supported: "
                                + ", ".join(c for f in FAMILIES for c in f.block_classes))
            else:
                stack.append((path, child))
    if isinstance(model, EPMoEBlock):
        return []
    if find_family(model) is not None:
        raise TypeError("patch_model takes a model containing MoE blocks; for a single block use from_transformers")
    targets.sort(key=lambda t: t[0])   # the same order on every rank (each MoELayer handshakes its group)
    for path, parent, name, block in targets:
        setattr(parent, name, convert(block))
        _release_experts(block)
    return [t[0] for t in targets]


def _release_experts(block: nn.Module) -> None:
    """Free the replaced block's routed-expert tensors (the new module holds this rank's copy)."""
    experts = getattr(block, "experts", None)
    if isinstance(experts, nn.Module):
        for module in experts.modules():
            for name, p in list(module._parameters.items()):
                if p is not None:
                    module._parameters[name] = nn.Parameter(p.new_empty(0), requires_grad=False)


def patch_model(model: nn.Module, ep_group=None, **layer_options) -> int:
    """Replace, in place, every supported transformers MoE block of `model` by its epmoe module; return
    how many. The replaced blocks' routed-expert weights are freed (each rank keeps its own experts)."""
    n = len(replace_blocks(model, lambda block: from_transformers(block, ep_group, **dict(layer_options))))
    log.info("patch_model: %d MoE blocks of %s now run on epmoe", n, type(model).__name__)
    return n


def moe_blocks(model: nn.Module) -> list[tuple[str, EPMoEBlock]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, EPMoEBlock)]


def expert_memory_bytes(model: nn.Module) -> int:
    """Bytes of routed-expert weights this rank holds (weights, biases and FP8 scales of every MoELayer)."""
    total = 0
    for _, block in moe_blocks(model):
        for t in list(block.experts.parameters(recurse=False)) + [
                b for n, b in block.experts.named_buffers(recurse=False)
                if n not in ("score_correction_bias", "expert_load_counts")]:
            total += t.numel() * t.element_size()
    return total
