"""The build-time handshake: every rank of an EP group must agree on what it is about to compute.

When a layer (or a dispatcher, `epmoe.make_dispatcher`) is built with a group, its ranks exchange one description of the layer (config, padded
sizes, placement, dispatcher and what it puts on the wire, experts backend, capacity, biases, device
type, epmoe version) in one `all_gather_object`, and each rank compares all of them. A disagreement
raises `RankMismatch` on every rank at once, naming the field and each rank's value, instead of a hang
(ranks waiting in collectives of different sizes) or a silently wrong answer later.

A rank whose construction fails before the handshake (a refused pairing, a bad placement, ...) still
takes part in it, announcing its error (`announces_build_failure` on `MoELayer.__init__` and
`make_dispatcher`): its peers
then raise `RankMismatch` naming that rank and its error instead of waiting for it forever, and the
failing rank raises its own error. Either way each rank makes exactly one exchange, so the group stays
usable.

The handshake also gives the dispatcher its index among the group's layers, counted in the group's
`epmoe.group.GroupState` (which the dispatcher holds); each forward's header carries it, see
`epmoe.dispatch.header`. Nothing is kept here.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect

import torch.distributed as dist

from .errors import RankMismatch
from .version import __version__

_REACHED = "_epmoe_handshake_reached"   # set on exceptions raised at or after the exchange


def dispatcher_signature(dispatcher) -> dict:
    """What the ranks running one dispatcher must share: its plan, placement and wire format."""
    plan = dispatcher.plan
    wire = getattr(dispatcher, "wire_signature", None)
    workspace = getattr(dispatcher, "workspace_signature", None)
    return {
        "epmoe version": __version__,
        "dispatcher": plan.dispatcher,
        "plan": {k: repr(v) for k, v in plan.describe().items() if k not in ("dispatcher", "experts")},
        "placement": dispatcher.placement.signature(),
        "wire format": wire() if wire is not None else None,
        "workspace": workspace() if workspace is not None else None,
        "max_tokens_per_rank": plan.max_tokens_per_rank,
        "device_type": plan.device_type,
    }


def layer_signature(layer) -> dict:
    """What the ranks building one `MoELayer` must share: its config, its dispatcher's signature and the
    rest."""
    cfg = layer.cfg
    return {"config": {f.name: repr(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)},
            **dispatcher_signature(layer.dispatcher),
            "max_tokens_per_rank": layer.max_tokens_per_rank,
            "experts": layer.experts_name,
            "activation hand-off": str(layer.plan.handoff),
            "expert_bias": layer.expert_bias,
            "redundant_experts": layer.redundant_experts,
            "expert map (physical -> logical)": layer.expert_map.physical_to_logical,
            "custom router": layer.router is not None,
            "device_type": layer.device.type}


def _exchange(group, payload: dict) -> list[dict]:
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, payload, group=group)
    return everyone


def check_group_agrees(layer) -> None:
    """Raise `RankMismatch` on every rank unless all ranks of `layer.ep_group` built the same layer."""
    _agree(layer.ep_group, layer_signature(layer), layer.dispatcher, "MoELayer")


def agree_on_dispatcher(group, dispatcher) -> None:
    """Raise `RankMismatch` on every rank unless all ranks of `group` built the same dispatcher."""
    _agree(group, dispatcher_signature(dispatcher), dispatcher, "make_dispatcher")


def _agree(group, mine: dict, dispatcher, who: str) -> None:
    try:
        state = getattr(dispatcher, "state", None)
        proposal = (state.layers_built + 1) if state is not None else 0
        everyone = _exchange(group, {"signature": mine, "index": proposal})
        # The layer's index on the group: the largest proposal, adopted by every rank (a rank whose earlier
        # build failed catches up here). It travels with each forward, so ranks that call different layers
        # are caught at the first exchange instead of pairing their collectives wrongly.
        if state is not None:
            dispatcher.layer_index = state.next_layer([p.get("index", 0) for p in everyone])
        failed = {r: p["error"] for r, p in enumerate(everyone) if "error" in p}
        if failed:
            raise RankMismatch(f"{who}: " + "; ".join(
                f"rank {r} could not build the layer ({err})" for r, err in failed.items())
                + f"; this rank (rank {dist.get_rank(group)}) raises too so that no rank waits for it")
        diffs = []
        for name in mine:
            values = [p["signature"].get(name) for p in everyone]
            if all(isinstance(v, dict) for v in values):     # config, plan: name the fields that differ
                fields = [f for f in values[0] if any(v.get(f) != values[0][f] for v in values)]
                diffs += [f"{name} differs in {f} (" + ", ".join(f"rank {r}: {v.get(f)}" for r, v in enumerate(values))
                          + ")" for f in fields]
            elif any(v != values[0] for v in values):
                per_rank = ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(values))
                diffs.append(f"{name} differs ({per_rank})")
        if diffs:
            raise RankMismatch(f"{who}: the ranks of the group disagree on the layer they build: "
                               + "; ".join(diffs))
    except BaseException as exc:
        setattr(exc, _REACHED, True)
        raise


def announce_build_failure(group, exc: BaseException) -> None:
    """Take part in the handshake on behalf of a rank whose construction raised `exc`, so that the other
    ranks raise instead of waiting for it. Never raises itself (the original error is what matters)."""
    if group is None or getattr(exc, _REACHED, False):
        return
    try:
        if not dist.is_available() or not dist.is_initialized():
            return
        _exchange(group, {"error": f"{type(exc).__name__}: {exc}"})
    except Exception:   # a failure to announce must not hide the original error, which the caller raises
        return


def announces_build_failure(init):
    """Decorator for `MoELayer.__init__` and `make_dispatcher` (the group is their `ep_group` or `group`
    argument): an exception raised before the handshake is announced to the
    group (see `announce_build_failure`), then re-raised unchanged."""
    sig = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(*args, **kwargs):
        try:
            return init(*args, **kwargs)
        except Exception as exc:
            try:
                arguments = sig.bind(*args, **kwargs).arguments
                group = arguments.get("ep_group", arguments.get("group"))
            except TypeError:
                group = None
            announce_build_failure(group, exc)
            raise
    return wrapper

