"""Which rank holds which expert, and the one place where global and local expert ids meet.

Global ids (0..E-1, what the router produces) and local ids (0..L-1, an index into this rank's weight
tensors) are different kinds of value: `GlobalExpertId` / `LocalExpertId` in signatures, and on tensors
only `Placement.local_ids()` turns one into the other.
"""
from __future__ import annotations

import operator
from typing import NewType, Sequence

import torch

GlobalExpertId = NewType("GlobalExpertId", int)
LocalExpertId = NewType("LocalExpertId", int)


class Placement:
    """Expert -> rank map for an expert-parallel group of `ep_size` ranks, seen from `rank`.

    Contiguous by default: ranks get consecutive blocks whose sizes differ by at most one (the first
    E % ep ranks hold one more). `expert_to_rank` gives any other map; every rank must hold >= 1 expert.
    """

    def __init__(self, num_experts: int, ep_size: int = 1, rank: int = 0,
                 expert_to_rank: Sequence[int] | None = None):
        if ep_size < 1 or not 0 <= rank < ep_size:
            raise ValueError(f"placement: rank {rank} is not in an EP group of size {ep_size}")
        if ep_size > num_experts:
            raise ValueError(f"placement: {ep_size} ranks but only {num_experts} experts; every rank must "
                             "hold at least one expert (use fewer ranks for expert parallelism)")
        if expert_to_rank is None:
            base, extra = divmod(num_experts, ep_size)
            owners: list[int] = []
            for r in range(ep_size):
                owners += [r] * (base + (1 if r < extra else 0))
        else:
            owners = []
            for e, r in enumerate(expert_to_rank):
                try:
                    if isinstance(r, bool):
                        raise TypeError
                    owners.append(operator.index(r))   # ints, numpy ints, integer scalar tensors; not floats
                except TypeError:
                    raise ValueError(f"placement: expert_to_rank must hold integer rank numbers; entry {e} is "
                                     f"{r!r}") from None
            if len(owners) != num_experts:
                raise ValueError(f"placement: expert_to_rank has {len(owners)} entries, expected {num_experts}")
            bad = [r for r in owners if not 0 <= r < ep_size]
            if bad:
                raise ValueError(f"placement: expert_to_rank names ranks {sorted(set(bad))} outside [0, {ep_size})")
            empty = sorted(set(range(ep_size)) - set(owners))
            if empty:
                raise ValueError(f"placement: ranks {empty} hold no expert in expert_to_rank")
        self.num_experts = num_experts
        self.ep_size = ep_size
        self.rank = rank
        self.owners: tuple[int, ...] = tuple(owners)
        # index of each expert inside its owner's weight tensors
        counters = [0] * ep_size
        index = []
        for r in owners:
            index.append(counters[r])
            counters[r] += 1
        self.experts_per_rank: tuple[int, ...] = tuple(counters)
        self.index_on_owner: tuple[int, ...] = tuple(index)
        self.local_experts: tuple[GlobalExpertId, ...] = tuple(
            GlobalExpertId(e) for e, r in enumerate(owners) if r == rank)
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @property
    def num_local_experts(self) -> int:
        return len(self.local_experts)

    @property
    def max_local_experts(self) -> int:
        return max(self.experts_per_rank)

    def is_contiguous(self) -> bool:
        return list(self.owners) == sorted(self.owners)

    def owner(self, e: GlobalExpertId) -> int:
        return self.owners[e]

    def to_local(self, e: GlobalExpertId) -> LocalExpertId | None:
        """This rank's local id of global expert `e`, or None if another rank holds it."""
        if not 0 <= e < self.num_experts:
            raise ValueError(f"expert id {e} out of range [0, {self.num_experts})")
        return LocalExpertId(self.index_on_owner[e]) if self.owners[e] == self.rank else None

    def to_global(self, local: LocalExpertId) -> GlobalExpertId:
        return self.local_experts[local]

    def tables(self, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(owner rank [E], index within owner [E], this rank's local id or -1 [E]) as int32 on `device`."""
        device = torch.device(device)
        if device not in self._tables:
            owner = torch.tensor(self.owners, dtype=torch.int32, device=device)
            index = torch.tensor(self.index_on_owner, dtype=torch.int32, device=device)
            mine = torch.where(owner == self.rank, index, torch.full_like(index, -1))
            self._tables[device] = (owner, index, mine)
        return self._tables[device]

    def local_ids(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """Global ids [.., k] -> this rank's local ids (-1 where another rank holds the expert).

        A negative input id (an empty slot, e.g. a padding row on the wire) stays -1."""
        ids = topk_ids.long()
        local = self.tables(topk_ids.device)[2][ids.clamp(min=0)]
        return torch.where(ids >= 0, local, -1)

    def local_ids_on(self, topk_ids: torch.Tensor, ranks) -> torch.Tensor:
        """Global ids [.., k] -> local ids on the rank(s) `ranks` (an int or a tensor broadcasting against
        `topk_ids`), -1 where that rank does not hold the expert. What a sender writes for a destination."""
        owner, index, _ = self.tables(topk_ids.device)
        ids = topk_ids.long()
        return torch.where(owner[ids] == ranks, index[ids], -1)

    def ids_on_owner(self, topk_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Global ids -> (owner rank, local id on that owner), both int32 like the input's shape."""
        owner, index, _ = self.tables(topk_ids.device)
        return owner[topk_ids.long()], index[topk_ids.long()]

    def signature(self) -> tuple:
        return (self.num_experts, self.ep_size, self.owners)

    def __repr__(self) -> str:
        return (f"Placement(E={self.num_experts}, ep={self.ep_size}, rank={self.rank}, "
                f"local={self.num_local_experts}, contiguous={self.is_contiguous()})")
