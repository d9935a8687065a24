"""The build-time handshake: every rank of an EP group must agree on what it is about to compute.

Disagreement (config, placement, backends, capacity) raises `RankMismatch` on every rank at once,
instead of a hang or a silently wrong answer later.
"""
from __future__ import annotations

import hashlib

import torch.distributed as dist

from .errors import RankMismatch


def layer_signature(layer) -> dict:
    cfg = layer.cfg
    return {
        "config": repr(cfg),
        "placement": layer.placement.signature(),
        "dispatcher": layer.dispatcher_name,
        "experts": layer.experts_name,
        "max_tokens_per_rank": layer.max_tokens_per_rank,
        "device_type": layer.device.type,
    }


def check_group_agrees(layer) -> None:
    mine = layer_signature(layer)
    everyone: list = [None] * layer.ep_size
    dist.all_gather_object(everyone, mine, group=layer.ep_group)
    diffs = []
    for key in mine:
        values = [sig[key] for sig in everyone]
        if any(v != values[0] for v in values):
            per_rank = ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(values))
            diffs.append(f"{key} differs ({per_rank})")
    if diffs:
        raise RankMismatch("MoELayer: the ranks of ep_group disagree on the layer they build: " + "; ".join(diffs))


def fingerprint(obj) -> str:
    return hashlib.sha1(repr(obj).encode()).hexdigest()[:12]
