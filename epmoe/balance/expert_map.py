"""Logical experts (the router's ids) in physical slots (what the ranks hold), seen from one rank.

A layer with `redundant_experts=R` holds its E logical experts in P = E + R physical slots spread over the
ranks; a logical expert may have several slots (replicas) on different ranks. The dispatchers and the
experts backends only ever see physical slots: `ExpertMap.placement` is the ordinary `Placement` of the P
slots (slot -> rank, fixed for the layer's life), and `to_physical` turns the router's logical ids into
slot ids before dispatch. What changes online (`switch`) is only which logical expert each slot holds.
"""
from __future__ import annotations

import operator
from typing import Sequence

import torch

from ..placement import Placement
from .algorithm import balance_experts


def _ints(values, what: str) -> list[int]:
    out = []
    for i, v in enumerate(values):
        try:
            if isinstance(v, bool):
                raise TypeError
            out.append(operator.index(v))
        except TypeError:
            raise ValueError(f"{what} must hold integers; entry {i} is {v!r}") from None
    return out


class ExpertMap:
    """Which logical expert each physical slot holds, for a group of `ep_size` ranks seen from `rank`.

    placement: the `Placement` of the P slots over the ranks (what the dispatcher is built with).
    physical_to_logical: P logical ids, one per slot (in slot order).
    local_experts: the logical expert of each of this rank's slots (its weight tensors' order).

    A rank holds at most one replica of a logical expert, so a logical expert has at most one local slot.
    """

    def __init__(self, num_experts: int, placement: Placement, physical_to_logical: Sequence[int]):
        self.num_experts = num_experts
        self.placement = placement
        self.ep_size, self.rank = placement.ep_size, placement.rank
        self.num_slots = placement.num_experts
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._set(self.check(physical_to_logical))

    # ------------------------------------------------------------------------------------ building
    @classmethod
    def build(cls, num_experts: int, redundant_experts: int, ep_size: int, rank: int,
              expert_placement: Sequence[int] | None = None) -> "ExpertMap":
        """The map a layer starts with. `expert_placement`: the rank of each physical slot (E + R entries;
        with R = 0 the slots are the logical experts, so it is the familiar expert -> rank list); contiguous
        blocks by default. With R = 0 slot e holds logical expert e; with R > 0 the replicas come from
        `balance_experts` on a uniform load (the hottest-first rule then replicates the lowest ids)."""
        R = redundant_experts
        if isinstance(R, bool) or not isinstance(R, int) or R < 0:
            raise ValueError(f"redundant_experts must be an int >= 0 (extra physical slots for replicas of hot "
                             f"experts), got {R!r}")
        P = num_experts + R
        if R and ep_size == 1:
            raise ValueError(f"redundant_experts={R} on one rank: a rank holds at most one replica of each expert, "
                             "so replicas need an expert-parallel group of several ranks")
        if expert_placement is not None and len(expert_placement) != P:
            what = "experts" if R == 0 else f"physical slots (E + redundant_experts = {num_experts} + {R})"
            raise ValueError(f"placement: expert_placement has {len(expert_placement)} entries, expected {P}: "
                             f"the rank of each of the {P} {what}")
        placement = Placement(P, ep_size, rank, expert_placement)
        most = max(placement.experts_per_rank)
        if most > num_experts:
            raise ValueError(f"redundant_experts={R}: a rank would hold {most} physical slots but there are only "
                             f"{num_experts} logical experts, and a rank holds at most one replica of each "
                             f"(at most {num_experts * ep_size - num_experts} redundant experts on {ep_size} ranks)")
        if R == 0:
            physical = list(range(num_experts))
        else:
            by_rank = balance_experts([1.0] * num_experts, ep_size, list(placement.experts_per_rank))
            physical = cls.from_rank_major(placement, by_rank)
        return cls(num_experts, placement, physical)

    @staticmethod
    def from_rank_major(placement: Placement, by_rank: Sequence[int]) -> list[int]:
        """`balance_experts`' output (rank 0's slots first, then rank 1's, ...) in slot order: each rank's
        slots, in increasing slot id, take that rank's entries in turn."""
        cursor = [sum(placement.experts_per_rank[:r]) for r in range(placement.ep_size)]
        out = []
        for r in placement.owners:
            out.append(by_rank[cursor[r]])
            cursor[r] += 1
        return out

    def check(self, physical_to_logical: Sequence[int]) -> list[int]:
        """Validate a physical -> logical map for this layer's slots (ValueError naming the rule)."""
        E, P = self.num_experts, self.num_slots
        p2l = _ints(physical_to_logical, "physical_to_logical")
        if len(p2l) != P:
            raise ValueError(f"physical_to_logical has {len(p2l)} entries, expected one per physical slot ({P})")
        bad = sorted({e for e in p2l if not 0 <= e < E})
        if bad:
            raise ValueError(f"physical_to_logical names logical experts {bad[:8]} outside [0, {E})")
        missing = sorted(set(range(E)) - set(p2l))
        if missing:
            raise ValueError(f"physical_to_logical leaves logical experts {missing[:8]}"
                             f"{' ...' if len(missing) > 8 else ''} without a slot; every logical expert needs one")
        seen: set[tuple[int, int]] = set()
        for s, e in enumerate(p2l):
            r = self.placement.owners[s]
            if (r, e) in seen:
                raise ValueError(f"physical_to_logical puts two replicas of logical expert {e} on rank {r}; a rank "
                                 "holds at most one replica of each logical expert")
            seen.add((r, e))
        return p2l

    def _set(self, p2l: list[int]) -> None:
        self.physical_to_logical: tuple[int, ...] = tuple(p2l)
        self.replicas: tuple[tuple[int, ...], ...] = tuple(
            tuple(s for s, e in enumerate(p2l) if e == x) for x in range(self.num_experts))
        self.local_experts: tuple[int, ...] = tuple(p2l[s] for s in self.placement.local_experts)
        self._local_slot = {e: i for i, e in enumerate(self.local_experts)}
        self.is_identity = self.physical_to_logical == tuple(range(self.num_experts))
        for device, (table, counts) in self._tables.items():
            new_table, new_counts = self._host_tables()
            table.copy_(new_table.to(device))      # in place: captured CUDA graphs read the new map
            counts.copy_(new_counts.to(device))

    # ------------------------------------------------------------------------------------- queries
    @property
    def redundant_experts(self) -> int:
        return self.num_slots - self.num_experts

    def local_slot(self, e: int) -> int | None:
        """This rank's local slot holding logical expert `e` (an index into its weights), or None."""
        if not 0 <= e < self.num_experts:
            raise ValueError(f"expert id {e} out of range [0, {self.num_experts})")
        return self._local_slot.get(e)

    def signature(self) -> tuple:
        return (self.num_experts, self.num_slots, self.physical_to_logical)

    def __repr__(self) -> str:
        return (f"ExpertMap(E={self.num_experts}, slots={self.num_slots}, ep={self.ep_size}, rank={self.rank}, "
                f"local={list(self.local_experts)})")

    # --------------------------------------------------------------------------- on the device
    def _host_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        width = self.ep_size         # at most one replica per rank
        table = torch.zeros(self.num_experts, width, dtype=torch.int64)
        counts = torch.zeros(self.num_experts, dtype=torch.int64)
        for e, slots in enumerate(self.replicas):
            table[e, :len(slots)] = torch.tensor(slots, dtype=torch.int64)
            counts[e] = len(slots)
        return table, counts

    def tables(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(replica slots [E, ep] int64, padded with 0; replica counts [E] int64) on `device`. Built once
        per device and updated in place by `switch`."""
        device = torch.device(device)
        if device not in self._tables:
            table, counts = self._host_tables()
            self._tables[device] = (table.to(device), counts.to(device))
        return self._tables[device]

    def to_physical(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """Logical ids [T, k] -> physical slot ids [T, k] int32, on the device, without a host sync.

        A replicated expert's pairs are split over its replicas by the token's position: token t of rank
        `rank` takes replica (t + rank) mod c. Deterministic, no random numbers, the same shapes every
        call (CUDA-graph safe), and even: consecutive tokens, or the same token index on different ranks,
        go to different replicas."""
        table, counts = self.tables(topk_ids.device)
        ids = topk_ids.long()
        T = ids.shape[0]
        pos = torch.arange(T, device=ids.device).unsqueeze(1) + self.rank
        replica = torch.remainder(pos, counts[ids])
        return table[ids, replica].to(torch.int32)

    # ----------------------------------------------------------------------------------- switching
    def switch(self, physical_to_logical: Sequence[int]) -> None:
        """Make `physical_to_logical` the map (validated first); the device tables change in place."""
        self._set(self.check(physical_to_logical))
