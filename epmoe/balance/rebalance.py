"""Moving a layer's experts to a new placement online, between forwards, with every rank of the group.

`start_rebalance(layer, load)` is collective: the ranks exchange what they are about to do (redundant
slots, slot layout, current map, the load's shape, options) and their loads in one small
`all_gather_object`; disagreeing ranks raise `RankMismatch` on every rank, a rank with a bad argument
raises its `ValueError` and its peers `RankMismatch`. Every rank then sums the loads in rank order and
calls `balance_experts` on the same numbers, so all compute the same placement (checked once more).

The move: each slot whose logical expert changes takes the slot's whole storage -- every per-slot
parameter of the layer: weights, FP8 scales, biases, padding included -- from a slot that holds that
expert now, a local one when the rank has it (a copy), else a peer's (point to point over the group,
spread over the peers that hold it). The bytes travel in pieces of at most `chunk_bytes`, in steps in
which no rank sends or receives more than `chunk_bytes`; they land in a staging buffer (one slot's storage
per changed slot of this rank), so the live weights stay untouched and forwards between steps compute
with the old placement. `finish` runs the remaining steps and switches: the staged slots are copied into
the live weights in place and the map's device tables updated in place (CUDA graphs captured before stay
valid). A forward before the switch returns the old placement's result, one after it the new one's.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.distributed as dist

from ..errors import RankMismatch
from .algorithm import balance_experts, max_over_mean, rank_loads

DEFAULT_CHUNK_BYTES = 64 << 20


@dataclass
class RebalanceResult:
    """What one rebalance did, seen from this rank (bytes of this rank; slot counts of the group)."""

    physical_to_logical: tuple           # the new map (slot order)
    load: list                           # the load it was computed from (summed over the ranks)
    imbalance_before: float              # max / mean rank load of `load` under the old and the new map
    imbalance_after: float               # (a replicated expert's load split evenly over its replicas)
    changed_slots: int                   # slots of the group whose logical expert changed
    bytes_sent: int                      # to peers
    bytes_received: int                  # from peers
    bytes_copied: int                    # between this rank's own slots
    staging_bytes: int                   # the staging buffer this rank held during the move
    steps: int                           # communication steps (each <= chunk_bytes per rank and direction)
    seconds: float = 0.0                 # wall time of the whole rebalance on this rank
    per_step_seconds: list = field(default_factory=list)


class _Piece(NamedTuple):
    src: int           # sending rank
    dst: int           # receiving rank
    src_local: int     # the sender's local slot
    staged: int        # the receiver's staging index
    name: str          # the parameter
    start: int         # byte range of the slot's storage of that parameter
    end: int


def slot_parameters(layer) -> list[tuple[str, torch.Tensor]]:
    """The layer's per-slot storage: every parameter of the layer itself (weights, FP8 scales, biases),
    each with one leading entry per local slot. Buffers (the routing's correction bias) are per logical
    expert, not per slot, and stay."""
    L = layer.num_local_experts
    params = sorted((n, p) for n, p in layer.named_parameters(recurse=False))
    wrong = [n for n, p in params if p.dim() == 0 or p.shape[0] != L]
    if wrong:
        raise RuntimeError(f"rebalance: parameters {wrong} are not per-slot (leading size {L}); cannot move them")
    return params


def _bytes_view(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def _load_values(layer, load) -> tuple[tuple | None, list[float] | None, str | None]:
    """This rank's load as (shape, values, error): the shape whatever it is, the values when it is [E]
    and valid, an error message otherwise."""
    E = layer.expert_map.num_experts
    if load is None:
        load = layer.expert_load()
    if isinstance(load, torch.Tensor):
        shape = tuple(load.shape)
        values = load.detach().double().cpu().reshape(-1).tolist() if load.dim() == 1 else None
    else:
        try:
            values = [float(v) for v in load]
            shape = (len(values),)
        except (TypeError, ValueError):
            return None, None, f"rebalance: load must be a tensor or a sequence of numbers, got {type(load).__name__}"
    if shape != (E,):
        return shape, None, None            # compared across ranks first, then refused
    bad = [e for e, v in enumerate(values) if not math.isfinite(v) or v < 0]
    if bad:
        return shape, None, (f"rebalance: load must be finite and >= 0 (pairs routed to each logical expert); "
                             f"experts {bad[:8]} are {[values[e] for e in bad[:8]]}")
    return shape, values, None


def _check_options(layer, physical_to_logical, num_groups, chunk_bytes) -> list[int] | None:
    if getattr(layer, "_rebalancing", None) is not None:
        raise RuntimeError("rebalance: this layer's previous rebalance is not finished; call its finish() first")
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1:
        raise ValueError(f"rebalance: chunk_bytes must be a positive int, got {chunk_bytes!r}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"rebalance: num_groups must be a positive int, got {num_groups!r}")
    if physical_to_logical is None:
        return None
    return layer.expert_map.check(physical_to_logical)


def _agree(layer, mine: dict) -> list[dict]:
    """Every rank's `mine`; RankMismatch on every rank for ranks that disagree, and the failing rank's
    own error there (RankMismatch on its peers) for a rank whose arguments were refused."""
    group = layer.ep_group
    everyone: list = [None] * layer.ep_size
    dist.all_gather_object(everyone, mine, group=group)
    diffs = []
    for name in ("redundant experts", "slot ranks", "expert map", "load shape", "physical_to_logical",
                 "num_groups", "chunk_bytes"):
        values = [p[name] for p in everyone]
        if any(v != values[0] for v in values):
            shown = ", ".join(f"rank {r}: {_short(v)}" for r, v in enumerate(values))
            diffs.append(f"{name} differs ({shown})")
    if diffs:
        raise RankMismatch("rebalance: the ranks of the group disagree: " + "; ".join(diffs))
    failed = {r: p["error"] for r, p in enumerate(everyone) if p["error"]}
    if failed:
        me = layer.ep_rank
        if me in failed:
            kind, _, message = failed[me].partition(": ")
            raise (RuntimeError if kind == "RuntimeError" else ValueError)(message)
        raise RankMismatch("rebalance: " + "; ".join(f"rank {r} refused it ({err})" for r, err in failed.items())
                           + f"; this rank (rank {me}) raises too and nothing moved")
    return everyone


def _short(v) -> str:
    s = repr(v)
    return s if len(s) <= 80 else s[:77] + "..."


def start_rebalance(layer, load=None, *, physical_to_logical=None, num_groups: int = 1,
                    chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> "Rebalance":
    """Agree on one load and one new placement with the group and prepare the move (see the module
    docstring); the weights start moving at the first `step()` (or `finish()`)."""
    started = time.perf_counter()
    mp = layer.expert_map
    E = mp.num_experts
    error = None
    try:
        explicit = _check_options(layer, physical_to_logical, num_groups, chunk_bytes)
    except (ValueError, RuntimeError) as exc:
        explicit, error = None, f"{type(exc).__name__}: {exc}"
    shape, values, load_error = _load_values(layer, load)
    error = error or (f"ValueError: {load_error}" if load_error else None)
    mine = {"redundant experts": mp.redundant_experts, "slot ranks": mp.placement.owners,
            "expert map": mp.physical_to_logical, "load shape": shape,
            "physical_to_logical": None if physical_to_logical is None else tuple(explicit or ()),
            "num_groups": num_groups, "chunk_bytes": chunk_bytes, "error": error, "load": values}
    if layer.ep_size > 1:
        everyone = _agree(layer, mine)
    else:
        if error:
            kind, _, message = error.partition(": ")
            raise (RuntimeError if kind == "RuntimeError" else ValueError)(message)
        everyone = [mine]
    if shape != (E,):
        raise ValueError(f"rebalance: load must have shape [{E}] (one count per logical expert), got {list(shape or ())}")
    total = [0.0] * E
    for p in everyone:                       # the same order on every rank: the same sums, bit for bit
        total = [a + b for a, b in zip(total, p["load"])]
    if explicit is not None:
        new = explicit
    else:
        by_rank = balance_experts(total, layer.ep_size, list(mp.placement.experts_per_rank), num_groups=num_groups)
        new = mp.from_rank_major(mp.placement, by_rank)
    if layer.ep_size > 1:
        maps: list = [None] * layer.ep_size
        dist.all_gather_object(maps, tuple(new), group=layer.ep_group)
        if any(m != maps[0] for m in maps):
            raise RankMismatch("rebalance: the ranks computed different placements from the same load (different "
                               "library versions?); nothing moved")
    return Rebalance(layer, new, total, chunk_bytes, started)


class Rebalance:
    """A move to a new placement in progress: `step()` moves the next chunk (collective: every rank calls
    it as often as the others), `finish()` moves the rest and switches. Forwards in between compute with
    the old placement."""

    def __init__(self, layer, new_map: list[int], load: list[float], chunk_bytes: int,
                 started: float | None = None):
        self.layer, self.new_map, self.load, self.chunk_bytes = layer, list(new_map), load, chunk_bytes
        mp = layer.expert_map
        self.old_map = list(mp.physical_to_logical)
        owners, local_index = mp.placement.owners, mp.placement.index_on_owner
        me = layer.ep_rank
        self.params = slot_parameters(layer)
        slot_bytes = {n: p[0].numel() * p.element_size() for n, p in self.params}
        changed = [s for s in range(len(owners)) if self.old_map[s] != self.new_map[s]]
        mine = [s for s in changed if owners[s] == me]
        self.dst_local = [local_index[s] for s in mine]
        staged_at = {s: j for j, s in enumerate(mine)}
        self.staging = {n: torch.empty((len(mine),) + tuple(p.shape[1:]), dtype=p.dtype, device=p.device)
                        for n, p in self.params}
        copies, pieces, sent = [], [], [0] * layer.ep_size
        for s in changed:
            d, e = owners[s], self.new_map[s]
            sources = [t for t, x in enumerate(self.old_map) if x == e]
            here = [t for t in sources if owners[t] == d]
            if here:
                if d == me:
                    copies.append((local_index[here[0]], staged_at[s]))
                continue
            src = min(sources, key=lambda t: (sent[owners[t]], t))   # spread the sending over the holders
            sent[owners[src]] += sum(slot_bytes.values())
            for n, _ in self.params:
                for a in range(0, slot_bytes[n], chunk_bytes):
                    pieces.append(_Piece(owners[src], d, local_index[src], staged_at.get(s, -1), n, a,
                                         min(a + chunk_bytes, slot_bytes[n])))
        self.rounds = _rounds(pieces, chunk_bytes, layer.ep_size)
        with torch.no_grad():                 # the local copies now: the live weights do not change until finish
            for src_local, j in copies:
                for n, p in self.params:
                    self.staging[n][j].copy_(p[src_local])
        per_slot = sum(slot_bytes.values())
        self.result = RebalanceResult(
            physical_to_logical=tuple(self.new_map), load=list(load),
            imbalance_before=max_over_mean(rank_loads(load, self.old_map, owners, layer.ep_size)),
            imbalance_after=max_over_mean(rank_loads(load, self.new_map, owners, layer.ep_size)),
            changed_slots=len(changed),
            bytes_sent=sum(p.end - p.start for p in pieces if p.src == me),
            bytes_received=sum(p.end - p.start for p in pieces if p.dst == me),
            bytes_copied=len(copies) * per_slot, staging_bytes=len(mine) * per_slot, steps=len(self.rounds))
        self._next = 0
        self._started = time.perf_counter() if started is None else started
        layer._rebalancing = self

    @property
    def done(self) -> bool:
        return self._next >= len(self.rounds)

    def step(self) -> bool:
        """Move the next chunk (every rank of the group calls this the same number of times); returns
        whether chunks remain."""
        if self.layer._rebalancing is not self:
            raise RuntimeError("rebalance: this move was already finished")
        if not self.done:
            t0 = time.perf_counter()
            self._exchange(self.rounds[self._next])
            self._next += 1
            self.result.per_step_seconds.append(time.perf_counter() - t0)
        return not self.done

    def _exchange(self, pieces: list[_Piece]) -> None:
        layer, me = self.layer, self.layer.ep_rank
        params = dict(self.params)
        ops = []
        for p in pieces:
            if p.src == me:
                buf = _bytes_view(params[p.name].data[p.src_local])[p.start:p.end]
                ops.append(dist.P2POp(dist.isend, buf, dist.get_global_rank(layer.ep_group, p.dst), layer.ep_group))
            elif p.dst == me:
                buf = _bytes_view(self.staging[p.name][p.staged])[p.start:p.end]
                ops.append(dist.P2POp(dist.irecv, buf, dist.get_global_rank(layer.ep_group, p.src), layer.ep_group))
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()

    def finish(self) -> RebalanceResult:
        """Move what is left, then switch to the new placement at once; returns what was done."""
        while self.step():        # each call moves one bounded chunk and says whether any is left
            continue
        layer = self.layer
        with torch.no_grad():
            for j, local in enumerate(self.dst_local):     # in place (FP8 has no index_copy)
                for n, p in self.params:
                    p.data[local].copy_(self.staging[n][j])
            layer.expert_map.switch(self.new_map)
        self.staging = {}
        layer._rebalancing = None
        if layer.device.type == "cuda":
            torch.cuda.synchronize(layer.device)
        self.result.seconds = time.perf_counter() - self._started
        return self.result


def _rounds(pieces: list[_Piece], chunk_bytes: int, ranks: int) -> list[list[_Piece]]:
    """Pieces into steps in which no rank sends, and none receives, more than `chunk_bytes` (each piece is
    at most that); the earliest step with room takes each piece, in the given order."""
    rounds: list[list[_Piece]] = []
    sent: list[list[int]] = []
    received: list[list[int]] = []
    for p in pieces:
        size = p.end - p.start
        i = 0
        while i < len(rounds) and (sent[i][p.src] + size > chunk_bytes or received[i][p.dst] + size > chunk_bytes):
            i += 1
        if i == len(rounds):
            rounds.append([])
            sent.append([0] * ranks)
            received.append([0] * ranks)
        rounds[i].append(p)
        sent[i][p.src] += size
        received[i][p.dst] += size
    return rounds
