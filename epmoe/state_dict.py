"""A layer's state dict in the names of a transformers checkpoint, one tensor per expert and projection.

The layer stores its experts fused and padded for the kernels (`w13 [L, 2Ip, Hp]`, `w2 [L, Hp, Ip]`, scales,
biases). Its state dict shows them the way a transformers checkpoint does, keyed by global expert id and
at the real sizes:

    experts.{e}.gate_proj.weight [I, H]    experts.{e}.up_proj.weight [I, H]    experts.{e}.down_proj.weight [H, I]
    experts.{e}.{gate,up,down}_proj.weight_scale_inv    (FP8 layers: the checkpoint's scale layout)
    experts.{e}.{gate,up,down}_proj.bias                (layers with expert biases)

Every tensor owns its memory, so `safetensors.torch.save_file(layer.state_dict(), path)` works. Which
experts a state dict holds is in its keys: loading one that lacks experts this layer holds while holding
others (another rank's shard) is refused before anything is written; one that holds all of this layer's
experts loads into any placement. `load_hf_experts` reads the same names (and Mixtral's `w1`/`w3`/`w2`)
from any mapping, e.g. a checkpoint's tensors.
"""
from __future__ import annotations

import re
from typing import Mapping

import torch
import torch.nn as nn

# `load_expert` argument -> the key suffix a transformers checkpoint uses for it
HF_SUFFIX = {
    "gate_proj": "gate_proj.weight", "up_proj": "up_proj.weight", "down_proj": "down_proj.weight",
    "gate_proj_scale": "gate_proj.weight_scale_inv", "up_proj_scale": "up_proj.weight_scale_inv",
    "down_proj_scale": "down_proj.weight_scale_inv",
    "gate_bias": "gate_proj.bias", "up_bias": "up_proj.bias", "down_bias": "down_proj.bias",
}
_ARGUMENT = {suffix: arg for arg, suffix in HF_SUFFIX.items()}
_MIXTRAL = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_KEY = re.compile(r"experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.(weight|weight_scale_inv|bias)")
FUSED_NAMES = ("w13", "w2", "w13_scale", "w2_scale", "b13", "b2")


def expert_tensors(layer, local: int) -> dict[str, torch.Tensor]:
    """Local expert `local` of `layer` as `load_expert` arguments at the real sizes (views, no copy)."""
    out = layer.scheme.expert_tensors(layer, local)
    if getattr(layer, "b13", None) is not None:
        H, I = layer.cfg.hidden_size, layer.cfg.intermediate_size
        Ip = layer.w2.shape[2]
        out.update(gate_bias=layer.b13[local, :I], up_bias=layer.b13[local, Ip:Ip + I], down_bias=layer.b2[local, :H])
    return out


def save_hook(layer, state_dict, prefix: str, local_metadata) -> None:
    """State-dict hook: replace the fused tensors by one tensor per (expert, projection) in HF names.

    With `state_dict(keep_vars=True)` (what loaders that only walk the keys ask for) the values are views;
    otherwise copies, since a file format such as safetensors refuses tensors that share memory."""
    keep_vars = isinstance(state_dict.get(prefix + "w13"), nn.Parameter)
    for name in FUSED_NAMES:
        state_dict.pop(prefix + name, None)
    for local, e in enumerate(layer.local_experts):
        for arg, t in expert_tensors(layer, local).items():
            t = t if keep_vars else t.detach().clone(memory_format=torch.contiguous_format)
            state_dict[f"{prefix}experts.{int(e)}.{HF_SUFFIX[arg]}"] = t


def read_hf_experts(tensors: Mapping[str, torch.Tensor], prefix: str = "") -> tuple[dict[int, dict], list[str]]:
    """The experts in `tensors` under `prefix`: ({global id: load_expert arguments}, the keys used)."""
    found: dict[int, dict] = {}
    used = []
    for key in tensors:
        if not key.startswith(prefix):
            continue
        m = _KEY.fullmatch(key[len(prefix):])
        if m is None:
            continue
        e, proj, kind = int(m.group(1)), _MIXTRAL.get(m.group(2), m.group(2)), m.group(3)
        found.setdefault(e, {})[_ARGUMENT[f"{proj}.{kind}"]] = tensors[key]
        used.append(key)
    for e, args in found.items():
        lacking = [HF_SUFFIX[a] for a in ("gate_proj", "up_proj", "down_proj") if a not in args]
        if lacking:
            raise ValueError(f"expert {e} under {prefix!r} lacks {lacking} (each expert needs gate_proj, up_proj "
                             "and down_proj weights)")
    return found, used


def _describe(ids) -> str:
    ids = sorted(ids)
    if len(ids) > 2 and ids == list(range(ids[0], ids[-1] + 1)):
        return f"{ids[0]}..{ids[-1]}"
    return ", ".join(map(str, ids[:16])) + (" ..." if len(ids) > 16 else "")


def load_hf_experts(layer, tensors: Mapping[str, torch.Tensor], prefix: str = "", strict: bool = True) -> list[int]:
    """Load the experts of `layer` from HF-named tensors, e.g. a transformers checkpoint's
    (`{prefix}experts.{e}.gate_proj.weight` [I, H], `up_proj` [I, H], `down_proj` [H, I], Mixtral's
    `w1`/`w3`/`w2`, FP8 `weight_scale_inv`, biases), through `layer.load_expert`.

    Experts held by other ranks are skipped. Args: layer: an `epmoe.MoELayer`; tensors: any mapping of
    names to tensors (a state dict, `safetensors.torch.load_file(...)`); prefix: what precedes `experts.`;
    strict: raise ValueError if one of this layer's experts is not in `tensors`.
    Returns: the global ids loaded, sorted."""
    found, _ = read_hf_experts(tensors, prefix)
    mine = list(layer.local_experts)
    absent = [e for e in mine if e not in found]
    if strict and absent:
        raise ValueError(f"load_hf_experts: no tensors under {prefix + 'experts.'!r} for experts {_describe(absent)} "
                         f"of this layer (found experts {_describe(found) or 'none'})")
    return sorted(e for e in mine if e in found and layer.load_expert(e, **found[e]))


def load_hook(layer, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs) -> None:
    """Load-state-dict pre-hook: HF-named experts go in through `load_expert` (checked shapes, FP8
    quantized or taken with scales). A state dict that holds every expert this layer holds loads into any
    placement (the others are skipped); one that lacks some of them while holding experts this layer does not
    hold (another rank's shard) is refused."""
    found, used = read_hf_experts(state_dict, prefix)
    params = [(prefix + n, p) for n, p in layer.named_parameters(recurse=False)]
    if not found:
        # the fused tensors themselves: they count as loaded only if all of them are there (a parent's
        # partial or non-strict load must not make zero weights look loaded)
        if params and all(n in state_dict for n, _ in params):
            layer.mark_all_experts_loaded()
        return
    mine = set(layer.local_experts)
    foreign = set(found) - mine
    if foreign and mine - set(found):     # a state dict with every expert this layer holds loads into any placement
        raise ValueError(f"MoELayer.load_state_dict: the state dict holds experts {_describe(foreign)}, which this "
                         f"layer (rank {layer.ep_rank} of {layer.ep_size}, experts {_describe(mine)} of "
                         f"{layer.cfg.num_experts}) does not hold: another rank's shard, or another layer's? "
                         "Load each rank's own state dict, or one that holds every expert")
    layer._loaded = set()
    for e in sorted(found):
        layer.load_expert(e, **found[e])
    missing_keys.extend(f"{prefix}experts.{e}.{HF_SUFFIX[a]}" for e in sorted(mine - set(found))
                        for a in ("gate_proj", "up_proj", "down_proj"))
    for key in used:
        del state_dict[key]
    for name, p in params:     # what load_expert wrote; the default loader's copy is then a no-op
        state_dict[name] = p.detach()
