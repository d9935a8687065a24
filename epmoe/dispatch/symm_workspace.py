"""The symmetric buffers behind the GPU-initiated dispatchers, and how every rank reaches its peers' copies.

One `SymmWorkspace` is one byte buffer of the same size and layout on every rank of a group, allocated
with `torch.distributed._symmetric_memory` (`empty` + `rendezvous`), so a kernel on rank r can store
into rank s's copy through `local pointer + deltas[s]` (the byte distance between the two mappings).
The buffer holds `slots` copies of a per-slot layout (two micro-batches, or two layers back to back,
each use their own slot); each slot starts with a control block of the same shape for every layer of
the group -- one flag row and one header row per rank and phase -- followed by the layer's data regions.
Because the control block does not depend on the layer, ranks that call different layers still meet on
the same flags and see each other's headers (a mismatch is reported, not a hang). The per-expert row
counters live there too: layers of different layouts alias each other's data regions, and counters must
read zero whenever no forward is using them, whichever layer ran last.

`WorkspacePool` keeps one workspace per (group, device), shared by both GPU-initiated dispatchers, grown
(collectively: every rank asks for the same size at the same point) when a layer needs more, with the
device forward counter and the status word that the kernels share. Allocation happens at a layer's first forward, never in its
constructor, so a rank that fails to build a layer cannot leave its peers waiting in a rendezvous.

`simulated_workspaces` builds the same structure over plain tensors of one process (one per simulated
rank): the kernels then run under the Triton interpreter on the CPU, which is how the offsets and the
layout are tested without GPUs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..sizes import round_up

ALIGN = 128                      # bytes; every region starts on this boundary
PHASES = ("count", "dispatch", "combine")   # "count": every forward's first exchange (both dispatchers)
COUNTERS = 2048                  # per-expert row counters of the low-latency dispatch (local experts at most)


HEADER_FIELDS = 5               # fingerprint, layer, forward, tokens, failed; then one row count per rank


def header_width(ep: int) -> int:
    """int32 per header row: the header fields, then one row count per rank."""
    return HEADER_FIELDS + ep


@dataclass(frozen=True)
class Region:
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int                  # bytes from the start of the slot

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


@dataclass
class SlotLayout:
    """Named typed regions of one slot, each ALIGN-byte aligned; the control block comes first."""

    ep: int
    regions: dict[str, Region] = field(default_factory=dict)
    nbytes: int = 0

    def __post_init__(self) -> None:
        if not self.regions:
            hw = header_width(self.ep)
            for phase in PHASES:
                self.add(f"flags.{phase}", torch.int32, (self.ep,))
                self.add(f"heads.{phase}", torch.int32, (self.ep, hw))
            self.add("counters", torch.int32, (COUNTERS,))
            # collective[r] (used in slot 0 only): the group's forward number rank r last entered with a
            # dispatcher that uses collectives (`CommDispatcher.exchange_headers` writes it into every
            # peer); a symmetric-memory wait for that same forward number stops on it (COLLECTIVE_PEER)
            self.add("collective", torch.int32, (self.ep,))

    def add(self, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        if name in self.regions:
            raise ValueError(f"symmetric workspace: region {name!r} twice")
        region = Region(dtype, tuple(int(s) for s in shape), self.nbytes)
        self.regions[name] = region
        self.nbytes = round_up(self.nbytes + region.nbytes, ALIGN)


class SymmWorkspace:
    """This rank's copy of a symmetric buffer of `slots` slots of `slot_bytes` each.

    local: the uint8 buffer; deltas [ep] int64 on its device: peer base minus own base, in bytes.
    """

    def __init__(self, local: torch.Tensor, bases: list[int], rank: int, slots: int, slot_bytes: int,
                 keepalive=None):
        self.local = local
        self.rank = rank
        self.ep = len(bases)
        self.slots = slots
        self.slot_bytes = slot_bytes
        self.deltas = torch.tensor([b - bases[rank] for b in bases], dtype=torch.int64, device=local.device)
        if any(d % 16 for d in self.deltas.tolist()):
            raise RuntimeError("symmetric workspace: the peers' buffers are not 16-byte aligned relative to each "
                               "other")
        self._keepalive = keepalive
        self.control = SlotLayout(self.ep)          # the same control block starts every layer's slot

    def control_view(self, slot: int, name: str) -> torch.Tensor:
        return self.view(slot, self.control.regions[name])

    def view(self, slot: int, region: Region) -> torch.Tensor:
        """The typed view of `region` in slot `slot` of this rank's buffer (no copy)."""
        if not 0 <= slot < self.slots:
            raise IndexError(f"symmetric workspace: slot {slot} of {self.slots}")
        start = slot * self.slot_bytes + region.offset
        if start + region.nbytes > self.local.numel():
            raise ValueError(f"symmetric workspace: region of {region.nbytes} B at {start} does not fit "
                             f"{self.local.numel()} B")
        return self.local[start:start + region.nbytes].view(region.dtype).view(region.shape)


def allocate_symmetric(nbytes: int, group, device: torch.device) -> tuple[torch.Tensor, list[int], object]:
    """Collective: every rank of `group` calls it with the same `nbytes` at the same point.

    Returns (this rank's zeroed uint8 buffer, every rank's buffer address as mapped here, the handle).
    """
    import torch.distributed as dist
    import torch.distributed._symmetric_memory as symm_mem
    buf = symm_mem.empty(nbytes, dtype=torch.uint8, device=device)
    handle = symm_mem.rendezvous(buf, group)
    blocks = [int(p) for p in handle.buffer_ptrs]           # each rank's allocation, as mapped here
    rank = dist.get_rank(group)
    # the tensor may sit at an offset inside its allocation; every rank says where its own sits
    offsets: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(offsets, buf.data_ptr() - blocks[rank], group=group)
    buf.zero_()
    torch.cuda.synchronize(device)
    dist.barrier(group=group)              # no peer writes into this buffer before it is zeroed
    return buf, [b + o for b, o in zip(blocks, offsets)], handle


def simulated_workspaces(ep: int, slots: int, slot_bytes: int, device="cpu") -> list[SymmWorkspace]:
    """`ep` workspaces over plain tensors of this process, each rank's deltas pointing at the others'."""
    bufs = [torch.zeros(slots * slot_bytes + 16, dtype=torch.uint8, device=device) for _ in range(ep)]
    # start each at a 16-byte boundary, as a symmetric allocation would be
    bufs = [b[(-b.data_ptr()) % 16:][:slots * slot_bytes] for b in bufs]
    bases = [b.data_ptr() for b in bufs]
    return [SymmWorkspace(bufs[r], bases, r, slots, slot_bytes, keepalive=bufs) for r in range(ep)]


class WorkspacePool:
    """The workspace the GPU-initiated dispatchers share on one group and device (both kinds: ranks
    running different kinds then meet on the same flags, and the headers tell them apart), with the
    forward counter, the slot ring and the status word the kernels share. Persistent state of the group (like
    the buffers themselves), never of one forward: a forward's slot and epochs go into its handle."""

    SLOTS = 2

    def __init__(self, group, device: torch.device, rank: int, ep: int, workspace: SymmWorkspace | None = None):
        self.group, self.device, self.rank, self.ep = group, device, rank, ep
        self.ws = workspace
        self.retired: list[SymmWorkspace] = []      # kept alive: captured graphs and handles may point there
        # the forward counter, then each slot's current epoch (every forward's first exchange advances it,
        # on the device; its later exchanges reuse it)
        self.epochs = torch.zeros(1 + self.SLOTS, dtype=torch.int32, device=device)
        self.status = torch.zeros(1, dtype=torch.int32, device=device)
        self._next_slot = 0

    def ensure(self, slot_bytes: int) -> SymmWorkspace:
        """The workspace, grown (collectively) so that a slot holds `slot_bytes`."""
        if self.ws is None or self.ws.slot_bytes < slot_bytes:
            size = round_up(max(slot_bytes, 1 << 20), 1 << 20)
            if self.group is None:
                if self.ep != 1:
                    raise RuntimeError(f"symmetric workspace: a simulated workspace holds {self.ws and self.ws.slot_bytes} "
                                       f"bytes a slot, {slot_bytes} are needed (simulations cannot grow)")
                ws = simulated_workspaces(1, self.SLOTS, size, self.device)[0]     # one rank: plain memory
            else:
                buf, bases, handle = allocate_symmetric(self.SLOTS * size, self.group, self.device)
                ws = SymmWorkspace(buf, bases, self.rank, self.SLOTS, size, keepalive=handle)
            if self.ws is not None:
                self.retired.append(self.ws)
            self.ws = ws
        return self.ws

    def next_slot(self) -> int:
        slot = self._next_slot
        self._next_slot = (slot + 1) % self.SLOTS
        return slot

    def needs(self, slot_bytes: int) -> bool:
        """Whether `ensure(slot_bytes)` would allocate (a collective rendezvous on the group)."""
        return self.ws is None or self.ws.slot_bytes < slot_bytes

    def skip_forward(self) -> None:
        """Advance this rank's state as a symmetric-memory forward does (forward counter, slot epoch, slot
        ring; the slot's expert counters cleared): what a rank that ran a collective forward does when its
        peers ran a symmetric-memory one in the same step (their first exchange advanced theirs), so that
        every rank's next symmetric-memory forward uses the same slot and epoch."""
        if self.ws is None:
            return
        slot = self.next_slot()
        self.epochs[0] += 1
        self.epochs[1 + slot] = self.epochs[0]
        self.ws.control_view(slot, "counters").zero_()

    def mark_collective(self, forward: int) -> None:
        """Write `forward` as this rank's collective marker into every rank's control block (see
        `SlotLayout`): a peer waiting on symmetric-memory flags for that forward stops and joins the
        collective header exchange instead of timing out."""
        from ..kernels.symm_dispatch import mark_collective
        if self.ws is not None:
            mark_collective(self.ws, forward)



_POOLS: dict[tuple, WorkspacePool] = {}


def existing_pool(group) -> WorkspacePool | None:
    """The pool of `group` if this process has one with an allocated workspace (it never creates one).
    Costs one dict check when the process has no symmetric-memory layer at all."""
    if not _POOLS or group is None:
        return None
    import torch.distributed as dist
    ranks = tuple(dist.get_process_group_ranks(group))
    for (key, _), pool in _POOLS.items():
        if key == ranks and pool.ws is not None:
            return pool
    return None


def pool_for(group, device: torch.device, rank: int, ep: int) -> WorkspacePool:
    import torch.distributed as dist
    key = (tuple(dist.get_process_group_ranks(group)), str(device))
    pool = _POOLS.get(key)
    if pool is None:
        pool = _POOLS[key] = WorkspacePool(group, device, rank, ep)
    return pool
