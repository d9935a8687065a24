"""The symmetric-memory workspace of the GPU-initiated dispatchers: like DeepEP's `Buffer`, one narrow
object that owns its memory openly; everything one forward uses of it (its slot) goes into that forward's
handle.

A `SymmWorkspace` is one byte buffer of the same size and layout on every rank of a group, allocated with
`torch.distributed._symmetric_memory` (`empty` + `rendezvous`) when it is created (collectively: every
rank creates it with the same size at the same point), so a kernel on rank r stores into rank s's copy
through `local pointer + deltas[s]` (the byte distance between the two mappings). It holds `SLOTS` copies
of a per-slot layout (two micro-batches, or two layers back to back, each use their own slot); each slot
starts with a control block of the same shape for every layer -- one flag row and one header row per rank
and phase, the expert row counters of the low-latency dispatch, and the collective markers -- followed by
the layer's data regions. Because the control block does not depend on the layer, ranks that call
different layers sharing the workspace still meet on the same flags and see each other's headers (a
mismatch is reported, not a hang); the counters live there so that they read zero whenever no forward
uses them, whichever layer ran last. Beside the buffer: the device forward counter and slot epochs, and
the status word the kernels set.

Sizing: `SymmWorkspace.size_hint(...)` computes the bytes a slot needs for a set of layers; a layer built
on a workspace too small for it raises, naming the size it needs, and nothing grows inside a forward
(CUDA graphs, and no surprise out-of-memory mid-step). A layer given no workspace uses its group's default
(`GroupState.default_workspace`): created at the first such layer's construction and grown, collectively,
when a later layer's construction needs more (what it held before stays allocated until `free()`:
captured graphs may point there). `free()` releases it.

`SymmWorkspace.simulated` builds the same structure over plain tensors of one process (one per simulated
rank): the kernels then run under the Triton interpreter on the CPU, which is how the offsets and the
layout are tested without GPUs. The simulated ranks are driven step by step by a test, or (`threads=True`)
each in a thread of its own through the public dispatch API, meeting at every wait (`Lockstep`).
"""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field

import torch

from ..group import GroupState
from ..sizes import round_up

ALIGN = 128                      # bytes; every region starts on this boundary
PHASES = ("count", "dispatch", "combine")   # "count": every forward's first exchange (both dispatchers)
COUNTERS = 2048                  # per-expert row counters of the low-latency dispatch (local experts at most)
MIN_SLOT_BYTES = 1 << 20         # slots are whole MiB
HEADER_WIDTH = 5                 # int32 header fields (`epmoe.dispatch.header.FIELDS`), then one row count per rank


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
            hw = HEADER_WIDTH + self.ep
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
    """This rank's copy of a group's symmetric buffer: `SLOTS` slots of `slot_bytes` each (see the module
    docstring).

    `SymmWorkspace(group, slot_bytes, device=None)`: allocate now, collectively (every rank of `group`, the
    same `slot_bytes`, at the same point); `slot_bytes` from `size_hint`, rounded up to whole MiB. With
    `group=None`: one rank, plain device memory. `free()` releases it; a layer built on it must not run
    afterwards.

    Attributes: local (the uint8 buffer), deltas [ep] int64 on its device (peer base minus own base, in
    bytes), epochs [1 + SLOTS] int32 (the device forward counter, then each slot's current epoch), status
    [1] int32 (the kernels' error bits), number (its number on the group: 1, 2, ..., the same on every
    rank), generation (how many times `reset()` ran), needs_reset (this rank, or a peer it heard from,
    gave a forward up on a timeout: its forwards are refused until every rank's `resync()`; `give_up`),
    unread_at_reset (status bits that `reset()` cleared before anyone read them: `check()` raises them,
    unless a forward from before it was collected first), open_forwards (the forwards whose status is
    read when their combine is collected: `open_forward`, `status_read`).
    """

    SLOTS = 2
    # a symm_high_throughput layer without max_tokens_per_rank sizes the group's default workspace for
    # this many tokens per rank (a forward that needs more raises, naming the size)
    DEFAULT_TOKENS_PER_RANK = 4096

    def __init__(self, group, slot_bytes: int, device=None):
        if isinstance(slot_bytes, bool) or not isinstance(slot_bytes, int) or slot_bytes < 1:
            raise ValueError(f"SymmWorkspace: slot_bytes must be a positive int (see SymmWorkspace.size_hint), "
                             f"got {slot_bytes!r}")
        device = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        slot_bytes = round_up(slot_bytes, MIN_SLOT_BYTES)
        self.group, self.device, self.number = group, device, 1
        self._retired: list = []
        self._allocate(slot_bytes)
        self.lockstep = None                 # simulated ranks in threads only
        self._forward_state()
        if group is not None:
            from ..group import group_state
            group_state(group).add_workspace(self)

    def _allocate(self, slot_bytes: int) -> None:
        if self.group is None:
            local = torch.zeros(self.SLOTS * slot_bytes, dtype=torch.uint8, device=self.device)
            self._setup(local, [local.data_ptr()], 0, slot_bytes, local)
        else:
            import torch.distributed as dist
            local, bases, handle = allocate_symmetric(self.SLOTS * slot_bytes, self.group, self.device)
            self._setup(local, bases, dist.get_rank(self.group), slot_bytes, handle)

    def _forward_state(self) -> None:
        """The state forwards step, beside the buffer: the device forward counter and slot epochs, the
        status word, the slot ring; `generation` counts `reset()`s (a handle of an earlier one is refused)
        and `needs_reset` is set when a forward was given up on a timeout (`give_up`)."""
        self.epochs = torch.zeros(1 + self.SLOTS, dtype=torch.int32, device=self.device)
        self.status = torch.zeros(1, dtype=torch.int32, device=self.device)
        self._next_slot = 0
        self.generation = 0
        self.needs_reset = False
        self.unread_at_reset = 0
        self.open_forwards = weakref.WeakValueDictionary()     # token -> handle
        self._opened = 0

    def _setup(self, local: torch.Tensor, bases: list[int], rank: int, slot_bytes: int, keepalive) -> None:
        self.local = local
        self.rank = rank
        self.ep = len(bases)
        self.slot_bytes = slot_bytes
        self.deltas = torch.tensor([b - bases[rank] for b in bases], dtype=torch.int64, device=local.device)
        if any(d % 16 for d in self.deltas.tolist()):
            raise RuntimeError("symmetric workspace: the peers' buffers are not 16-byte aligned relative to each "
                               "other")
        self._keepalive = keepalive
        self.control = SlotLayout(self.ep)          # the same control block starts every layer's slot

    @classmethod
    def simulated(cls, ep: int, slot_bytes: int, device="cpu", states: list[GroupState] | None = None,
                  threads: bool = False) -> list[SymmWorkspace]:
        """`ep` workspaces over plain tensors of this process, each rank's deltas pointing at the others'
        (tests: the kernels under the Triton interpreter). `states`: each simulated rank's `GroupState`,
        where its workspace is registered (as a group's would be). `threads`: each rank will run in a thread
        of its own, its dispatchers meeting the others' at every wait (`Lockstep`); else a test drives
        their `*_steps` generators itself."""
        lockstep = Lockstep(ep) if threads else None
        board: dict = {}                        # what the simulated ranks tell each other when they meet
        bufs = [torch.zeros(cls.SLOTS * slot_bytes + 16, dtype=torch.uint8, device=device) for _ in range(ep)]
        # start each at a 16-byte boundary, as a symmetric allocation would be
        bufs = [b[(-b.data_ptr()) % 16:][:cls.SLOTS * slot_bytes] for b in bufs]
        bases = [b.data_ptr() for b in bufs]
        out = []
        for r in range(ep):
            ws = cls.__new__(cls)
            ws.group, ws.device, ws.number, ws._retired = None, torch.device(device), 1, []
            ws._setup(bufs[r], bases, r, slot_bytes, bufs)
            ws.lockstep = lockstep
            ws.simulated_board = board
            ws._forward_state()
            if states is not None:
                states[r].add_workspace(ws)
            out.append(ws)
        return out

    @staticmethod
    def size_hint(configs, ep_size: int, max_tokens_per_rank: int, dispatchers=None, expert_placement=None,
                  redundant_experts: int = 0) -> int:
        """The bytes a slot needs for layers of these `MoEConfig`s (one, or a list) on `ep_size` ranks, on
        each of `dispatchers` (default: every registered one that stores into the peers' memory), with at most `max_tokens_per_rank` tokens a rank in one forward (a
        symm_high_throughput layer built without max_tokens_per_rank needs it too: its rows are what a rank
        can receive). `expert_placement` and `redundant_experts` as given to the layers (the dispatchers
        serve E + redundant_experts physical slots). Pass the result to `SymmWorkspace(group, ...)`."""
        from ..contract import DISPATCHERS, build_plan, dispatcher_class
        from ..placement import Placement
        if not isinstance(configs, (list, tuple)):
            configs = [configs]
        if dispatchers is None:
            dispatchers = [n for n, cls in DISPATCHERS.items() if cls.CAPS.peer_memory]
        need = 0
        for config in configs:
            placement = Placement(config.num_experts + redundant_experts, ep_size, 0, expert_placement)
            for name in dispatchers:
                plan = build_plan(name, None, config, ep_size, "cuda", max_tokens_per_rank, check_device=False)
                layout = dispatcher_class(name).slot_layout_for(plan, placement, max_tokens_per_rank)
                need = max(need, layout.nbytes)
        return need

    # ------------------------------------------------------------------------------------- views
    def control_view(self, slot: int, name: str) -> torch.Tensor:
        return self.view(slot, self.control.regions[name])

    def view(self, slot: int, region: Region) -> torch.Tensor:
        """The typed view of `region` in slot `slot` of this rank's buffer (no copy)."""
        if self.local is None:
            raise RuntimeError("symmetric workspace: used after free()")
        if not 0 <= slot < self.SLOTS:
            raise IndexError(f"symmetric workspace: slot {slot} of {self.SLOTS}")
        start = slot * self.slot_bytes + region.offset
        if start + region.nbytes > self.local.numel():
            raise ValueError(f"symmetric workspace: region of {region.nbytes} B at {start} does not fit "
                             f"{self.local.numel()} B")
        return self.local[start:start + region.nbytes].view(region.dtype).view(region.shape)

    # ----------------------------------------------------------------------------------- sizing
    def require(self, slot_bytes: int, who: str) -> None:
        """Raise, naming the size needed, unless a slot holds `slot_bytes` (a layer being built on it)."""
        if self.local is None:
            raise RuntimeError(f"{who}: its symmetric workspace was freed")
        if slot_bytes > self.slot_bytes:
            raise ValueError(f"{who}: the symmetric workspace holds {self.slot_bytes} bytes a slot, this layer needs "
                             f"{slot_bytes}; create it with SymmWorkspace(group, SymmWorkspace.size_hint(...)) over "
                             f"every layer that shares it, or at least {slot_bytes}")

    def grow(self, slot_bytes: int) -> None:
        """Reallocate (collectively) so that a slot holds `slot_bytes`: only for a group's default workspace,
        at a layer's construction, never in a forward; the memory held before stays allocated until
        `free()` (a graph captured on it may still point there)."""
        if slot_bytes <= self.slot_bytes:
            return
        # a graph captured before stores through that memory and reads the peer distances of that time
        self._retired.append((self.local, self._keepalive, self.deltas))
        self._allocate(round_up(slot_bytes, MIN_SLOT_BYTES))

    def free(self) -> None:
        """Release the memory (every generation of it). No layer built on this workspace may run afterwards,
        nor a CUDA graph captured on it replay."""
        self.local = self._keepalive = None
        self._retired = []
        if self.group is not None:
            from ..group import group_state
            group_state(self.group).remove_workspace(self)

    # ------------------------------------------------------------------------- forward state
    def next_slot(self) -> int:
        """The slot of the forward being entered (they alternate: two forwards may be in flight)."""
        slot = self._next_slot
        self._next_slot = (slot + 1) % self.SLOTS
        return slot

    def skip_forward(self) -> None:
        """Advance this rank's state as a symmetric-memory forward does (forward counter, slot epoch, slot
        ring; the slot's expert counters cleared): what a rank that ran a collective forward does when its
        peers ran a symmetric-memory one on this workspace in the same step (their first exchange advanced
        theirs), so that every rank's next symmetric-memory forward uses the same slot and epoch."""
        slot = self.next_slot()
        self.epochs[0] += 1
        self.epochs[1 + slot] = self.epochs[0]
        self.control_view(slot, "counters").zero_()

    def reset(self) -> None:
        """Back to the state of a new workspace: every slot's control block (flags, headers, expert counters,
        collective markers) zeroed, in the memory held before a grow as well (graphs captured then replay
        there), the device forward counter, slot epochs and status word zeroed, the slot ring at slot 0.
        Only inside `resync()`, which every rank calls: after every rank's earlier kernels are done (they
        store into this buffer) and before any rank publishes again, so that the ranks' workspaces agree
        whatever forwards each missed. The data regions keep their bytes: a forward writes what it reads
        there. Status bits nobody read yet (async combines not yet waited for, CUDA graph replays not yet
        checked) are kept (a host read: the GPU work is done here anyway) on every open forward, which
        raises them when collected, and in `unread_at_reset` for `check()` (`take_unread_at_reset`)."""
        if self.local is None:
            raise RuntimeError("symmetric workspace: used after free()")
        from ..kernels.symm_dispatch import RESET_PENDING
        unread = int(self.status.item()) & ~RESET_PENDING.value
        self.unread_at_reset |= unread
        for handle in list(self.open_forwards.values()):       # each raises them when collected
            handle.unread |= unread
        # the memory held before a grow too: a graph captured then still waits on its flags
        for local in [self.local] + [held[0] for held in self._retired]:
            slot_bytes = local.numel() // self.SLOTS
            for slot in range(self.SLOTS):
                local[slot * slot_bytes:slot * slot_bytes + self.control.nbytes].zero_()
        self.epochs.zero_()
        self.status.zero_()
        self._next_slot = 0
        self.generation += 1
        self.needs_reset = False

    def give_up(self) -> None:
        """This rank (or a peer it heard from) gave a forward up on a timeout: the ranks' slots and epochs
        may differ until every rank's `resync()`. The host refuses this rank's forwards until then
        (`needs_reset`), and the kernels of any that still run -- CUDA graph replays, which the host never
        sees -- find RESET_PENDING in the status word: they send nothing, publish their headers failed and
        output NaN, and `check()` says so."""
        from ..kernels.symm_dispatch import RESET_PENDING
        self.needs_reset = True
        self.status.bitwise_or_(RESET_PENDING.value)

    def open_forward(self, handle) -> None:
        """Register `handle`, a forward whose status word is read when its combine is collected. The word is
        one for every forward on this workspace, and a bit a forward's kernels set stops (NaN) every
        forward whose kernels run after it until the host clears it: so when the host reads bits for
        another forward, or `check()` does, or `reset()` clears them, they are kept on this handle too
        (`handle.unread`) and it raises them when collected (`close_forward`). Kept weakly: a handle
        dropped uncollected leaves nothing here."""
        self._opened += 1
        handle.token = self._opened
        self.open_forwards[handle.token] = handle

    def close_forward(self, handle) -> int:
        """`handle` collected: the status bits others read while it was open (0 if none)."""
        self.open_forwards.pop(handle.token, None)
        bits, handle.unread = handle.unread, 0
        return bits

    def status_read(self, bits: int, reader=None) -> None:
        """The host read `bits` from the status word (for forward `reader`, or for no forward): cleared
        there (RESET_PENDING stays until `reset()`), and kept on every other open forward (`open_forward`)."""
        from ..kernels.symm_dispatch import RESET_PENDING
        bits &= ~RESET_PENDING.value
        if not bits:
            return
        self.status.bitwise_and_(RESET_PENDING.value)
        for handle in list(self.open_forwards.values()):
            if handle is not reader:
                handle.unread |= bits

    def take_unread_at_reset(self) -> int:
        """The status bits `reset()` cleared unread (0 if none), handed out once."""
        bits, self.unread_at_reset = self.unread_at_reset, 0
        return bits

    def mark_collective(self, forward: int) -> None:
        """Write `forward` as this rank's collective marker into every rank's control block: a peer waiting
        on symmetric-memory flags for that forward stops and joins the collective header exchange instead of
        timing out."""
        from ..kernels.symm_dispatch import mark_collective
        mark_collective(self, forward)

    def __repr__(self) -> str:
        state = "freed" if self.local is None else f"{self.slot_bytes} B x {self.SLOTS} slots"
        return f"SymmWorkspace(#{self.number}, ep={self.ep}, rank={self.rank}, {state}, {self.device})"


class Lockstep:
    """Simulated ranks of one process, each in a thread, running the dispatchers' step generators: one rank
    runs steps at a time (the Triton interpreter is not thread-safe), and at every wait (a step's `yield`:
    this rank published, it is about to wait for the others) the ranks meet, so each wait finds every
    rank's flag. The ranks must run the same exchanges in the same order (a test that makes them differ
    gets `threading.BrokenBarrierError` after `timeout_s`)."""

    def __init__(self, ep: int, timeout_s: float = 120.0):
        self.lock = threading.Lock()
        self.barrier = threading.Barrier(ep, timeout=timeout_s)

    def run(self, steps):
        with self.lock:
            while True:
                try:
                    next(steps)
                except StopIteration as stop:
                    return stop.value
                self.lock.release()
                try:
                    self.barrier.wait()
                finally:
                    self.lock.acquire()


def default_workspace(state: GroupState, group, slot_bytes: int, device) -> SymmWorkspace:
    """The group's default workspace, holding at least `slot_bytes` a slot: created at the first layer that
    asks (collectively), grown when a later one needs more (at its construction, never in a forward)."""
    ws = state.default_workspace
    if ws is None or ws.local is None:
        ws = state.default_workspace = SymmWorkspace(group, slot_bytes, device)
    else:
        ws.grow(slot_bytes)
    return ws


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
