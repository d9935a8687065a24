"""The contract check: what each dispatcher and experts backend can do, and which pairings work.

Backends only *declare* (a `CAPS` attribute on their class); the rules that pair them live here, in one
place, and run when a layer is built. A refused pairing raises `UnsupportedCombination` naming both
parts, the reason, and the pairings that would work. `epmoe info` prints `support_matrix()`, and the
tests enumerate the same matrix.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

import torch

from .errors import UnsupportedCombination
from .layouts import FLAT

# Backend registry: name -> "module:Class". The names are the public, explicit selectors (no hidden
# environment switches choose a backend).
DISPATCHERS: dict[str, str] = {
    "local": "epmoe.dispatch.local:LocalDispatcher",
    "allgather": "epmoe.dispatch.allgather:AllGatherDispatcher",
    "alltoall": "epmoe.dispatch.alltoall:AllToAllDispatcher",
    "low_latency": "epmoe.dispatch.low_latency:LowLatencyDispatcher",
    "symm_high_throughput": "epmoe.dispatch.symm_high_throughput:SymmHighThroughputDispatcher",
    "symm_low_latency": "epmoe.dispatch.symm_low_latency:SymmLowLatencyDispatcher",
}
EXPERTS: dict[str, str] = {
    "reference": "epmoe.experts.reference:ReferenceExperts",
    "grouped_mm": "epmoe.experts.grouped_mm:GroupedMMExperts",
    "batched": "epmoe.experts.batched:BatchedExperts",
    "triton": "epmoe.experts.triton:TritonExperts",
}

# Who quantizes the activations when a layer is FP8 (seed 001): the experts either take FP8 rows with
# their scales from the dispatcher, or take high-precision rows and quantize inside.
TAKES_FP8 = "takes_fp8"
QUANTIZES_INTERNALLY = "quantizes_internally"

# What a built FP8 layer does with its activations (`activation_handoff`); `epmoe info` shows it.
HANDOFF_NONE = "not quantized"
HANDOFF_ON_THE_WIRE = "dispatcher quantizes before the wire"
HANDOFF_AFTER_DISPATCH = "layer quantizes after dispatch"      # the explicit conversion
HANDOFF_IN_EXPERTS = "experts quantize internally"


def _always(_device_type: str) -> str | None:
    return None


def _no_quant_problem(_cfg, _device_type: str) -> str | None:
    return None


@dataclass(frozen=True)
class DispatcherCaps:
    layout: str                         # FLAT or BATCHED: what dispatch() produces
    communicates: bool                  # moves tokens between ranks (False: only valid for one rank)
    devices: frozenset = frozenset({"cpu", "cuda"})
    host_sync: bool = False             # does the forward wait on the host for data-dependent sizes
    cuda_graph_safe: bool = False
    needs_max_tokens: bool = False      # requires max_tokens_per_rank
    takes_max_tokens: bool = False      # uses max_tokens_per_rank when given (fixed buffers, no host read)
    fp8_dispatch: bool = False          # can quantize to FP8 before the wire (scales travel along)
    summary: str = ""
    available: Callable[[str], str | None] = _always

    @property
    def topk_weight_applied_in(self) -> str:
        return "experts" if self.layout == FLAT else "combine"


@dataclass(frozen=True)
class ExpertsCaps:
    layouts: frozenset
    dtypes: frozenset = frozenset({torch.float32, torch.bfloat16, torch.float16})
    quant: frozenset = frozenset({"none"})
    fp8_activations: str = QUANTIZES_INTERNALLY   # for FP8 layers: TAKES_FP8 or QUANTIZES_INTERNALLY
    devices: frozenset = frozenset({"cpu", "cuda"})
    cuda_graph_safe: bool = False
    summary: str = ""
    available: Callable[[str], str | None] = _always
    # for a quantized cfg in `quant`: why these experts cannot run it on this device (None: they can)
    quant_problem: Callable[..., str | None] = _no_quant_problem


# Public names (DESIGN) of backends this version does not provide yet: asking for one is a refusal through
# the contract (UnsupportedCombination with what to use instead), not an "unknown name".
DISPATCHERS_NOT_PROVIDED: dict[str, str] = {
    "nvshmem": "the GPU-initiated dispatcher (torch symmetric memory / NVSHMEM all_to_all_vdev) is not part of "
               "this version of epmoe",
}


def _load(registry: dict[str, str], name: str, kind: str):
    if name not in registry:
        raise ValueError(f"unknown {kind} {name!r}; known: {sorted(registry)}")
    module, cls = registry[name].split(":")
    return getattr(importlib.import_module(module), cls)


def dispatcher_class(name: str):
    if name in DISPATCHERS_NOT_PROVIDED:
        raise UnsupportedCombination(name, "-", DISPATCHERS_NOT_PROVIDED[name],
                                     [f"dispatcher={d!r}" for d in DISPATCHERS])
    return _load(DISPATCHERS, name, "dispatcher")


def experts_class(name: str):
    return _load(EXPERTS, name, "experts backend")


def quant_name(cfg) -> str:
    return "none" if cfg.quant is None else cfg.quant_scheme.kind


def pairing_problem(dispatcher: str, experts: str, cfg, ep_size: int, device_type: str) -> str | None:
    """Why this pairing cannot run `cfg` on `ep_size` ranks of `device_type`; None if it can."""
    d, x = dispatcher_class(dispatcher).CAPS, experts_class(experts).CAPS
    if ep_size > 1 and not d.communicates:
        return (f"the group has {ep_size} ranks but dispatcher {dispatcher!r} does not move tokens between "
                f"ranks: each rank would compute only its own experts and silently lose the others' "
                f"contributions")
    if device_type not in d.devices:
        return f"dispatcher {dispatcher!r} runs on {sorted(d.devices)}, not {device_type}"
    if device_type not in x.devices:
        return f"experts {experts!r} run on {sorted(x.devices)}, not {device_type}"
    for caps, name in ((d, dispatcher), (x, experts)):
        why = caps.available(device_type)
        if why:
            return f"{name!r} is unavailable here: {why}"
    if d.layout not in x.layouts:
        return (f"dispatcher {dispatcher!r} produces the {d.layout!r} layout, experts {experts!r} accept "
                f"{sorted(x.layouts)}")
    if cfg is not None:
        if cfg.dtype not in x.dtypes:
            return f"experts {experts!r} do not support dtype {cfg.dtype}"
        q = quant_name(cfg)
        if q not in x.quant:
            return f"experts {experts!r} support quantization {sorted(x.quant)}, not {q!r}"
        if q != "none":
            why = x.quant_problem(cfg, device_type)
            if why:
                return f"experts {experts!r} cannot run {q} on {device_type}: {why}"
            if x.fp8_activations not in (TAKES_FP8, QUANTIZES_INTERNALLY):
                return (f"experts {experts!r} declare fp8_activations={x.fp8_activations!r}; FP8 experts must "
                        f"declare {TAKES_FP8!r} or {QUANTIZES_INTERNALLY!r}")
            if getattr(cfg.quant, "dispatch_fp8", False) and d.communicates:
                # Seed 001: who quantizes is settled here, at build time, never discovered in a forward.
                if not d.fp8_dispatch:
                    return (f"dispatch_fp8=True but dispatcher {dispatcher!r} cannot send FP8 rows with their "
                            f"scales; set dispatch_fp8=False (BF16 on the wire) or pick an FP8-capable dispatcher")
                if x.fp8_activations != TAKES_FP8:
                    return (f"dispatch_fp8=True sends FP8 rows with scales, but experts {experts!r} quantize their "
                            f"activations internally from high-precision rows; set dispatch_fp8=False or pick "
                            f"experts that take FP8")
    return None


def activation_handoff(dispatcher: str, experts: str, cfg) -> str:
    """Who quantizes the activations of a valid pairing (call after `check_pairing`).

    FP8 on the wire when asked for and the dispatcher can; otherwise experts that take FP8 get their rows
    quantized by the layer right after dispatch (the explicit conversion, same formula, same bits), and
    experts that quantize internally get the high-precision rows.
    """
    if cfg is None or cfg.quant is None:
        return HANDOFF_NONE
    d, x = dispatcher_class(dispatcher).CAPS, experts_class(experts).CAPS
    if getattr(cfg.quant, "dispatch_fp8", False) and d.fp8_dispatch:
        return HANDOFF_ON_THE_WIRE
    return HANDOFF_AFTER_DISPATCH if x.fp8_activations == TAKES_FP8 else HANDOFF_IN_EXPERTS


def check_pairing(dispatcher: str, experts: str, cfg, ep_size: int, device_type: str) -> None:
    """Raise `UnsupportedCombination` (with the working alternatives) unless the pairing is valid."""
    why = pairing_problem(dispatcher, experts, cfg, ep_size, device_type)
    if why is None:
        return
    alternatives = [f"dispatcher={d!r}, experts={x!r}" for d, x in
                    supported_pairings(cfg, ep_size, device_type)]
    raise UnsupportedCombination(dispatcher, experts, why, alternatives)


def supported_pairings(cfg, ep_size: int, device_type: str) -> list[tuple[str, str]]:
    return [(d, x) for d in DISPATCHERS for x in EXPERTS
            if pairing_problem(d, x, cfg, ep_size, device_type) is None]


def resolve_names(dispatcher: str, experts: str, cfg, ep_size: int, device_type: str) -> tuple[str, str]:
    """Turn "auto" into explicit names: local for one rank, alltoall for several; the fastest experts
    backend that accepts that dispatcher's layout on this device."""
    if dispatcher == "auto":
        dispatcher = "local" if ep_size == 1 else "alltoall"
        if dispatcher not in DISPATCHERS:
            raise UnsupportedCombination("auto", experts, f"no communicating dispatcher is installed for "
                                         f"{ep_size} ranks", [])
    if experts == "auto":
        preference = ["triton", "grouped_mm", "batched", "reference"]
        if device_type == "cpu":
            preference = ["grouped_mm", "batched", "reference"]
        for name in preference:
            if name in EXPERTS and pairing_problem(dispatcher, name, cfg, ep_size, device_type) is None:
                return dispatcher, name
        experts = "reference"
    return dispatcher, experts


@dataclass
class MatrixRow:
    dispatcher: str
    experts: str
    device: str
    multi_rank: bool
    quant: str
    problem: str | None = None
    extra: dict = field(default_factory=dict)


def support_matrix(cfgs: dict | None = None) -> list[MatrixRow]:
    """Every dispatcher x experts x device x (1 rank / several) x quantization, with its verdict.

    `cfgs`: quant name -> a representative MoEConfig (defaults: a small bf16 config, and FP8 ones when
    the FP8 scheme is installed).
    """
    from .config import MoEConfig
    if cfgs is None:
        cfgs = {"none": MoEConfig(num_experts=8, top_k=2, hidden_size=256, intermediate_size=256)}
        cfgs.update(_quant_examples())
    rows = []
    for d in DISPATCHERS:
        for x in EXPERTS:
            for device in ("cpu", "cuda"):
                for multi in (False, True):
                    for q, cfg in cfgs.items():
                        problem = pairing_problem(d, x, cfg, 2 if multi else 1, device)
                        extra = {}
                        if problem is None and cfg.quant is not None:
                            extra["fp8_activations"] = activation_handoff(d, x, cfg)
                        rows.append(MatrixRow(d, x, device, multi, q, problem, extra))
    return rows


def _quant_examples() -> dict:
    try:
        from .quant import example_configs
    except ImportError:
        return {}
    return example_configs()
