"""The placement algorithm: which logical experts get extra physical slots, and which rank holds each slot.

`balance_experts` is a pure function of the measured load: every rank of a group calls it with the same
numbers and gets the same placement, so the ranks never have to send each other a placement.

The problem: E logical experts with loads `load[e]`, P >= E physical slots spread over ranks
(`slots_per_rank`); give every logical expert c_e >= 1 slots (sum c_e = P), at most one per rank, each
taking load[e] / c_e of its expert's tokens (the layer splits a replicated expert's tokens evenly among its
replicas), so that the most loaded rank is as light as possible. Three steps:

1. Replicate the hottest first: each extra slot goes to the expert whose replicas carry the most load each
   (largest load / c). This minimises the largest per-replica load exactly.
2. Pack the replicas, heaviest first, each onto the least loaded rank that has a free slot and no replica
   of that expert yet (longest processing time first). When no such rank is left, one replica already
   placed moves along a chain of ranks to make room (an augmenting path); when the replica counts cannot be
   placed on distinct ranks at all, the replica goes to the hottest expert that still fits.
3. Improve: swap two replicas between the most loaded rank and another rank while that lowers the larger
   of the two loads.

Hierarchical (`num_groups`, e.g. nodes): the logical experts are first shared out over equal groups of
consecutive ranks by load (each expert lives in one group only, so its tokens stay inside that group's
ranks), then each group is balanced on its own slots.
"""
from __future__ import annotations

import heapq
import math
import operator
from collections import deque
from typing import Sequence

import numpy as np


def balance_experts(load, num_ranks: int, slots_per_rank, *, num_groups: int = 1) -> list[int]:
    """The physical -> logical map that balances `load` over the ranks.

    Args:
        load: E non-negative finite numbers (a sequence or a tensor): the (token, expert) pairs routed to each
            logical expert, e.g. `layer.expert_load()` summed over the ranks.
        num_ranks: ranks of the group.
        slots_per_rank: physical slots each rank holds: one int for all ranks, or one per rank (uneven
            counts allowed). Their sum P must be at least E, and no rank may hold more slots than there are
            logical experts (a rank holds at most one replica of an expert).
        num_groups: split the ranks into this many equal groups of consecutive ranks (e.g. nodes) and give
            each logical expert's replicas to one group only (1: flat).
    Returns:
        P logical expert ids, rank by rank: the first `slots_per_rank[0]` entries are rank 0's slots, and
        so on. Every logical expert appears at least once and at most once per rank. Deterministic: the
        same arguments give the same list on every rank.
    Raises:
        ValueError naming the rule for a bad load, too few slots for the experts, a rank with more slots
        than logical experts, or groups that do not divide the ranks.
    """
    weights = _check_load(load)
    E = len(weights)
    slots = _check_slots(slots_per_rank, num_ranks, E)
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"balance_experts: num_groups must be a positive int, got {num_groups!r}")
    if num_ranks % num_groups:
        raise ValueError(f"balance_experts: num_groups={num_groups} must divide num_ranks={num_ranks} (groups of "
                         "equal size, e.g. nodes of equal GPU count)")
    per_group = num_ranks // num_groups
    group_slots = [slots[g * per_group:(g + 1) * per_group] for g in range(num_groups)]
    share = _even_split(E, num_groups)
    for g, (n_experts, gs) in enumerate(zip(share, group_slots)):
        if sum(gs) < n_experts:
            raise ValueError(f"balance_experts: group {g} (ranks {g * per_group}..{(g + 1) * per_group - 1}) has "
                             f"{sum(gs)} slots for its {n_experts} logical experts: every logical expert needs a "
                             "slot; use fewer groups or more slots")
        if max(gs) > n_experts:
            raise ValueError(f"balance_experts: a rank of group {g} has {max(gs)} slots but the group holds "
                             f"{n_experts} logical experts, and a rank holds at most one replica of each; use "
                             "fewer groups or fewer slots per rank")
    if num_groups == 1:
        members = [list(range(E))]
    else:
        members = _pack_groups(weights, share)
    out: list[int] = []
    for experts, gs in zip(members, group_slots):
        for held in _balance_flat([weights[e] for e in experts], gs):
            out += [experts[i] for i in held]
    return out


def rank_loads(load, physical_to_logical: Sequence[int], slot_ranks: Sequence[int], num_ranks: int) -> list[float]:
    """The load each rank receives under a placement when a replicated expert's pairs split evenly over its
    replicas: `load` [E], `physical_to_logical` [P], `slot_ranks` [P] (the rank of each slot)."""
    weights = _check_load(load)
    count = [0] * len(weights)
    for e in physical_to_logical:
        count[e] += 1
    out = [0.0] * num_ranks
    for e, r in zip(physical_to_logical, slot_ranks):
        out[r] += weights[e] / count[e]
    return out


def max_over_mean(loads: Sequence[float]) -> float:
    """The most loaded rank's load over the mean (1.0: perfectly even; nan when nothing was routed)."""
    mean = sum(loads) / len(loads)
    return max(loads) / mean if mean > 0 else float("nan")


# ------------------------------------------------------------------------------------------- checks
def _check_load(load) -> list[float]:
    if hasattr(load, "detach"):                       # a tensor, on any device
        load = load.detach().double().cpu().reshape(-1).tolist() if load.dim() == 1 else load
    if hasattr(load, "dim") or isinstance(load, (str, bytes)) or not hasattr(load, "__len__"):
        shape = list(load.shape) if hasattr(load, "shape") else type(load).__name__
        raise ValueError(f"balance_experts: load must be a 1-D sequence with one number per logical expert, got {shape}")
    try:
        weights = [float(v) for v in load]
    except (TypeError, ValueError):
        raise ValueError("balance_experts: load must hold numbers (pairs routed to each logical expert)") from None
    if not weights:
        raise ValueError("balance_experts: load is empty; it needs one number per logical expert")
    bad = [e for e, w in enumerate(weights) if not math.isfinite(w) or w < 0]
    if bad:
        raise ValueError(f"balance_experts: load must be finite and >= 0; experts {bad[:8]} are "
                         f"{[weights[e] for e in bad[:8]]}")
    return weights


def _check_slots(slots_per_rank, num_ranks: int, E: int) -> list[int]:
    if isinstance(num_ranks, bool) or not isinstance(num_ranks, int) or num_ranks < 1:
        raise ValueError(f"balance_experts: num_ranks must be a positive int, got {num_ranks!r}")
    if isinstance(slots_per_rank, bool):
        raise ValueError(f"balance_experts: slots_per_rank must be an int or one int per rank, got {slots_per_rank!r}")
    try:
        slots = [operator.index(slots_per_rank)] * num_ranks
    except TypeError:
        try:
            slots = [operator.index(s) for s in slots_per_rank]
        except TypeError:
            raise ValueError("balance_experts: slots_per_rank must be an int or one int per rank, got "
                             f"{slots_per_rank!r}") from None
        if len(slots) != num_ranks:
            raise ValueError(f"balance_experts: slots_per_rank has {len(slots)} entries for {num_ranks} ranks")
    if min(slots) < 1:
        raise ValueError(f"balance_experts: every rank needs at least one slot, got {slots}")
    if sum(slots) < E:
        raise ValueError(f"balance_experts: {sum(slots)} slots for {E} logical experts would leave a logical "
                         "expert without a slot; every logical expert needs at least one")
    if max(slots) > E:
        raise ValueError(f"balance_experts: a rank has {max(slots)} slots but there are only {E} logical "
                         "experts, and a rank holds at most one replica of each")
    return slots


def _even_split(n: int, parts: int) -> list[int]:
    base, extra = divmod(n, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


# ------------------------------------------------------------------------------------------ the steps
def _replicate(weights: list[float], total_slots: int, max_copies: int) -> list[int]:
    """Replica counts: the extra slots one by one to the expert with the most load per replica."""
    counts = [1] * len(weights)
    heap = [(-w, e) for e, w in enumerate(weights)]
    heapq.heapify(heap)
    for _ in range(total_slots - len(weights)):
        while True:
            _, e = heapq.heappop(heap)
            if counts[e] < max_copies:
                break
        counts[e] += 1
        if counts[e] < max_copies:
            heapq.heappush(heap, (-weights[e] / counts[e], e))
    return counts


class _Packing:
    """Replicas on ranks: `held[r]` the experts rank r holds, `counts[e]` replicas of expert e."""

    def __init__(self, weights: list[float], slots: list[int], counts: list[int]):
        self.weights, self.slots, self.counts = weights, slots, counts
        self.held: list[list[int]] = [[] for _ in slots]

    def load(self, r: int) -> float:
        return sum(self.weights[e] / self.counts[e] for e in self.held[r])

    def free(self, r: int) -> int:
        return self.slots[r] - len(self.held[r])

    def place(self, e: int) -> bool:
        """One replica of e on the least loaded rank with room that lacks e; else by a chain of moves."""
        eligible = [r for r in range(len(self.slots)) if self.free(r) > 0 and e not in self.held[r]]
        if eligible:
            r = min(eligible, key=lambda r: (self.load(r), -self.free(r), r))
            self.held[r].append(e)
            return True
        return self._augment(e)

    def _augment(self, e: int) -> bool:
        """Make room for a replica of e: rank r0 (without e) takes it and hands one of its replicas f to a
        rank r1 without f, and so on until a rank with a free slot takes the last one (breadth first)."""
        n = len(self.slots)
        start = [r for r in range(n) if e not in self.held[r]]
        parent: dict[int, tuple[int | None, int]] = {r: (None, e) for r in start}   # rank -> (from rank, item)
        queue = deque(start)
        while queue:
            r = queue.popleft()
            if self.free(r) > 0:
                while True:              # walk back: each rank takes its item, the previous one gives it up
                    prev, item = parent[r]
                    self.held[r].append(item)
                    if prev is None:
                        return True
                    self.held[prev].remove(item)
                    r = prev
            for f in sorted(self.held[r]):
                for q in range(n):
                    if q not in parent and f not in self.held[q]:
                        parent[q] = (r, f)
                        queue.append(q)
        return False

    def loads(self) -> np.ndarray:
        return np.array([self.load(r) for r in range(len(self.slots))])

    def refine(self, max_rounds: int, recount: bool = True) -> None:
        """Improve until nothing helps: swap two replicas between the most loaded rank and another, or
        (`recount`) give one replica of an expert to another expert (see `_recount`)."""
        for _ in range(max_rounds):
            if not (self._swap() or (recount and self._recount())):
                return

    def _tolerance(self, loads: np.ndarray) -> float:
        return 1e-12 * max(float(loads.sum()), 1.0)

    def _swap(self) -> bool:
        """The best swap of a replica on the most loaded rank with one on another rank, if it lowers the
        larger of the two loads."""
        n, E = len(self.slots), len(self.weights)
        loads = self.loads()
        m = int(np.argmax(loads))
        holds = np.zeros((n, E), dtype=bool)
        for r, es in enumerate(self.held):
            holds[r, es] = True
        a_ids = np.array(self.held[m], dtype=np.int64)
        b_ids = np.array([e for r in range(n) if r != m for e in self.held[r]], dtype=np.int64)
        b_rank = np.array([r for r in range(n) if r != m for _ in self.held[r]], dtype=np.int64)
        if not len(a_ids) or not len(b_ids):
            return False
        per = np.array([self.weights[e] / self.counts[e] for e in range(E)])
        wa, wb = per[a_ids][:, None], per[b_ids][None, :]
        new_max = np.maximum(loads[m] - wa + wb, loads[b_rank][None, :] - wb + wa)
        ok = ~holds[m][b_ids][None, :] & ~holds[b_rank[None, :], a_ids[:, None]]
        new_max = np.where(ok, new_max, np.inf)
        i, j = divmod(int(np.argmin(new_max)), len(b_ids))
        if not new_max[i, j] < loads[m] - self._tolerance(loads):
            return False
        a, b, r = int(a_ids[i]), int(b_ids[j]), int(b_rank[j])
        self.held[m][self.held[m].index(a)] = b
        self.held[r][self.held[r].index(b)] = a
        return True

    def _recount(self) -> bool:
        """The best change of replica counts that touches the most loaded rank m: a replica of x (one of
        several) on some rank becomes a new replica of y, where either that rank is m, or y is on m. Taken
        if the most loaded rank gets lighter (or fewer ranks share the largest load)."""
        n = len(self.slots)
        loads = self.loads()
        m = int(np.argmax(loads))
        tol = self._tolerance(loads)
        top = float(loads[m])
        holders = [[r for r in range(n) if e in self.held[r]] for e in range(len(self.weights))]
        w, c = self.weights, self.counts
        candidates = []      # (rank r, x that leaves r, y that arrives on r)
        for x in self.held[m]:
            if c[x] > 1:
                candidates += [(m, x, y) for y in range(len(w)) if y not in self.held[m]]
        for y in self.held[m]:
            for r in range(n):
                if r != m and y not in self.held[r]:
                    candidates += [(r, x, y) for x in self.held[r] if c[x] > 1]
        best = None
        for r, x, y in candidates:
            new = loads.copy()
            new[holders[x]] += w[x] / (c[x] - 1) - w[x] / c[x]
            new[holders[y]] += w[y] / (c[y] + 1) - w[y] / c[y]
            new[r] += -w[x] / (c[x] - 1) + w[y] / (c[y] + 1)
            peak = float(new.max())
            key = (peak, int((new > peak - tol).sum()))
            if best is None or key < best[0]:
                best = (key, r, x, y)
        if best is None:
            return False
        (peak, at_peak), r, x, y = best
        if not (peak < top - tol or (peak <= top + tol and at_peak < int((loads > top - tol).sum()))):
            return False
        self.held[r][self.held[r].index(x)] = y
        c[x] -= 1
        c[y] += 1
        return True


def _balance_flat(weights: list[float], slots: list[int]) -> list[list[int]]:
    """Each rank's logical experts (indices into `weights`) for one group of ranks."""
    n = len(slots)
    counts = _replicate(weights, sum(slots), n)
    packing = _Packing(weights, slots, counts)
    items = sorted(range(len(weights)), key=lambda e: (-weights[e] / counts[e], e))
    for e in items:
        while sum(e in held for held in packing.held) < packing.counts[e]:
            if not packing.place(e):
                _place_elsewhere(packing, e)     # lowers counts[e] and places another expert's replica
    packing.refine(max_rounds=4 * sum(slots))
    return [sorted(h) for h in packing.held]


def _place_elsewhere(packing: _Packing, e: int) -> None:
    """The replica counts cannot all sit on distinct ranks: this replica of e goes to the expert with the
    most load per replica that a rank with a free slot lacks (a rank with a free slot holds fewer replicas
    than there are experts, so one always fits)."""
    packing.counts[e] -= 1
    n = len(packing.slots)
    best = None
    for r in range(n):
        if packing.free(r) <= 0:
            continue
        for f in range(len(packing.weights)):
            if f not in packing.held[r]:
                key = (-packing.weights[f] / (packing.counts[f] + 1), packing.load(r), f, r)
                best = key if best is None or key < best else best
    _, _, f, r = best
    packing.counts[f] += 1
    packing.held[r].append(f)


def _pack_groups(weights: list[float], share: list[int]) -> list[list[int]]:
    """Logical experts shared out over groups, `share[g]` each, the heaviest first onto the lightest group
    with room, then improved by swaps; each group's experts sorted."""
    groups = _Packing(weights, share, [1] * len(weights))
    for e in sorted(range(len(weights)), key=lambda e: (-weights[e], e)):
        groups.place(e)
    groups.refine(max_rounds=4 * len(weights), recount=False)
    return [sorted(h) for h in groups.held]
