"""What the GPU-initiated dispatchers share: availability, their workspace, the per-forward header and
handle, bounded waits, and turning the GPU's status word into the same error on every rank.

A forward's header (`header.Header`: layer fingerprint, layer index, the group's forward number, tokens,
failed) travels in the control block of the workspace, next to the flags every phase exchanges anyway, so
checking that the ranks run the same layer's same forward costs no extra exchange. The kernels compare
headers on the GPU and set bits in the workspace's status word; the host reads that word at the one point
where it reads anything, raises the error that the bits name, and clears it, keeping the bits for every
other forward still in flight on the workspace, which raises them when collected (the word is shared).

The workspace (`SymmWorkspace`) is given at construction (`workspace=`), or the group's default one is
taken in `prepare()`, once the ranks agreed on the layer: allocated or grown then, collectively, never in a
forward. Everything one forward uses (its slot, its header) goes into its handle. A rank that timed out,
or read that a peer did, refuses forwards until `resync()` on every rank has put the workspaces back in
step; the CUDA graph replays the host cannot refuse find that in the status word (RESET_PENDING) and send
nothing.

Simulation: built on `SymmWorkspace.simulated` workspaces with a `GroupState` per simulated rank and no
group, a dispatcher runs its kernels on CPU tensors under the Triton interpreter, and its
`dispatch_steps` / `combine_steps` generators stop at every wait, so a test can drive several simulated
ranks in lockstep.
"""
from __future__ import annotations

import abc

import importlib.util
import time
from dataclasses import dataclass

import torch

from ..errors import RankMismatch
from ..group import WRAP, GroupState
from . import header as fh
from ._comm import CommDispatcher
from .base import Handle, Pending
from .symm_workspace import SlotLayout, SymmWorkspace, default_workspace

DEFAULT_TIMEOUT_S = 30.0


def symm_problem(device_type: str) -> str | None:
    """Why the symmetric-memory dispatchers cannot run on `device_type` here; None if they can."""
    if device_type != "cuda":
        return (f"it stores rows straight into the peers' GPU memory (torch symmetric memory), which needs CUDA "
                f"GPUs, not {device_type}")
    if importlib.util.find_spec("triton") is None:
        return "its kernels need triton (pip install 'epmoe[triton]')"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    if importlib.util.find_spec("torch.distributed._symmetric_memory") is None:
        return "this torch has no torch.distributed._symmetric_memory"
    return None


def run_steps(steps):
    """Drive a `*_steps` generator to its end and return its value (on GPUs every wait is on the device,
    so nothing stops there)."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value


@dataclass
class SymmHandle(Handle):
    """A symmetric-memory forward: the workspace and slot its rows live in, and the header it sent."""

    ws: SymmWorkspace = None
    slot: int = 0
    header: fh.Header = None
    check_on_wait: bool = False     # combine's status read put off until its Pending is waited for
    generation: int = 0             # the workspace's `generation` at dispatch (a `resync()` since: refused)
    token: int = 0                  # its number among the workspace's open forwards (0: not one)
    unread: int = 0                 # status bits read for others while it was open (`SymmWorkspace.open_forward`)


class SymmDispatcher(CommDispatcher):
    """Base of the dispatchers on symmetric memory. `timeout_s`: how long a wait for a peer may last
    before every waiting rank reports an error instead of spinning on. `workspace`: the `SymmWorkspace`
    to use (None: the group's default, taken in `prepare()`)."""

    def __init__(self, plan, placement, group=None, device=None, *, state: GroupState | None = None,
                 workspace: SymmWorkspace | None = None, timeout_s: float = DEFAULT_TIMEOUT_S):
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
            raise ValueError(f"{self.name} dispatcher: timeout_s must be a positive number of seconds, got "
                             f"{timeout_s!r}")
        # simulated ranks of one process (tests): no group, the workspaces over plain tensors are the transport
        self.simulated = workspace is not None and workspace.group is None and workspace.ep > 1
        if self.simulated:
            device = workspace.device
        else:
            device = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
            why = symm_problem(device.type)
            if why:
                raise ValueError(f"{self.name} dispatcher: {why}")
        super().__init__(plan, placement, group, device, state=state)
        self.timeout_s = float(timeout_s)
        self.workspace = None
        if workspace is not None:
            self._attach(workspace)

    # --------------------------------------------------------------------------------- the workspace
    @classmethod
    @abc.abstractmethod
    def slot_layout_for(cls, plan, placement, tokens_per_rank: int | None = None) -> SlotLayout:
        """The regions of one slot for a layer of `plan` (`tokens_per_rank`: what a rank passes at most,
        where the plan has no capacity): each symmetric-memory dispatcher lays out its own."""

    def slot_bytes_needed(self) -> int:
        """The least a slot must hold for this layer (a smaller workspace is refused when the layer is
        built): its whole capacity, or one token a rank where the plan has no capacity."""
        return self.slot_layout_for(self.plan, self.placement, 1).nbytes

    def slot_bytes_wanted(self) -> int:
        """What this layer sizes its group's default workspace for: its capacity, or
        `SymmWorkspace.DEFAULT_TOKENS_PER_RANK` tokens a rank where the plan has none."""
        return self.slot_layout_for(self.plan, self.placement, SymmWorkspace.DEFAULT_TOKENS_PER_RANK).nbytes

    def prepare(self) -> None:
        """Take the group's default workspace when none was given: created (collectively, sized for this
        layer) at the first such layer, grown when this one wants more; the ranks agreed on the layer
        before, so they all allocate alike."""
        if self.workspace is None:
            self._attach(default_workspace(self.state, self.group, self.slot_bytes_wanted(), self.device))

    def _attach(self, ws: SymmWorkspace) -> None:
        ws.require(self.slot_bytes_needed(), f"{self.name} dispatcher")
        if ws.ep != self.ep_size or ws.rank != self.rank:
            raise ValueError(f"{self.name} dispatcher: the workspace is rank {ws.rank} of {ws.ep}, this layer's "
                             f"placement rank {self.rank} of {self.ep_size}")
        self.workspace = ws
        self.layout = self.layout_in(ws)

    def layout_in(self, ws: SymmWorkspace) -> SlotLayout:
        """This layer's regions in a slot of `ws` (the same on every rank)."""
        return self.slot_layout_for(self.plan, self.placement)

    def _workspace(self) -> SymmWorkspace:
        if self.workspace is None:
            raise RuntimeError(f"{self.name} dispatcher: no workspace yet; call prepare() once the group agreed "
                               f"on the layer (MoELayer and make_dispatcher do)")
        return self.workspace

    def enter_forward(self) -> tuple[SymmWorkspace, int]:
        """(workspace, slot) of the forward being dispatched; refused on a rank that gave a forward up on a
        timeout, or heard a peer did, until every rank's `resync()` (the slots and epochs may differ)."""
        ws = self._workspace()
        if ws.needs_reset:
            raise RuntimeError(f"{self.name} dispatcher: a forward was given up on a timeout (by this rank, or by "
                               f"a peer whose failed header this rank read), so the ranks' workspace slots and epochs "
                               f"may differ; call resync() on every rank of the group (layer.resync(), between "
                               f"forwards) before the next forward")
        return ws, ws.next_slot()

    def opened(self, handle: SymmHandle) -> SymmHandle:
        """`handle`, registered with its workspace where its combine reads the status word when collected
        (with a capacity, outside CUDA graph capture): bits read for other forwards meanwhile are kept for
        it (`SymmWorkspace.open_forward`)."""
        dev = handle.ws.device
        if self.plan.max_tokens_per_rank is not None and not (dev.type == "cuda"
                                                              and torch.cuda.is_current_stream_capturing()):
            handle.ws.open_forward(handle)
        return handle

    def check_handle(self, handle: SymmHandle) -> None:
        """Refuse to combine a forward dispatched before a `resync()` (its slot's state was reset)."""
        if handle.generation != handle.ws.generation:
            raise RuntimeError(f"{self.name} dispatcher: this handle's forward was dispatched before resync(); "
                               f"dispatch it again")

    # ------------------------------------------------------------------------- the Dispatcher API
    def _start_dispatch(self, x, routing) -> Pending:
        # every step is queued before this returns (the host waits only where a step reads back), on the
        # communication stream where there is one (`_issue`): work the caller's stream does meanwhile runs
        # beside it
        result = self.run_steps(self.dispatch_steps(x, routing))
        return Pending([], lambda: result, overlaps=False)

    def _start_combine(self, expert_out, handle) -> Pending:
        # with a capacity the status word is read at the end of the combine: when it is waited for, not when
        # it is issued, so that issuing it does not wait for the exchange on the host (the other
        # micro-batch's experts are queued meanwhile)
        bounded = self.plan.max_tokens_per_rank is not None
        handle.check_on_wait = bounded
        result = self.run_steps(self.combine_steps(expert_out, handle))

        def check():
            handle.check_on_wait = False
            self.check_at_end(handle, result.device)
        return Pending([], lambda: result, overlaps=False, check=check if bounded else None)

    def run_steps(self, steps):
        """Drive a `*_steps` generator to its end: at once on GPUs; on simulated ranks that run in threads
        (`SymmWorkspace.simulated(..., threads=True)`), meeting the other ranks at every wait."""
        lockstep = self._workspace().lockstep
        return run_steps(steps) if lockstep is None else lockstep.run(steps)

    def _start_abort(self) -> Pending:
        """`abort`: the forward's dispatch and combine on no token, flagged as failed in its header, so that
        every rank raises instead of waiting."""
        from ..routing import Routing
        if self._workspace().needs_reset:
            # this rank's forwards are refused until resync(); its peers, if they entered this forward,
            # raise at once on the failed header it left when it gave the last forward up
            return Pending([], lambda: None, overlaps=False)
        k, dev = self.plan.top_k, self.device
        x = torch.zeros(0, self.plan.padded_hidden_size, dtype=self.plan.dtype, device=dev)
        empty = Routing(torch.zeros(0, k, dtype=torch.int32, device=dev),
                        torch.zeros(0, k, dtype=torch.float32, device=dev))
        try:
            batch, handle = self.run_steps(self.dispatch_steps(x, empty, failed=True))
            self.run_steps(self.combine_steps(torch.zeros(batch.x.shape, dtype=self.plan.dtype, device=dev), handle))
        except RankMismatch:
            pass   # expected: this rank's failed flag ends the forward on every rank, here included
        return Pending([], lambda: None, overlaps=False)

    def wire_rows(self, x: torch.Tensor, quantize: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(rows as the transfer kernel reads them, float32 scales or None): quantized to the wire's FP8
        with the one formula when `quantize` (else the kernel sends `x` as it is, or quantizes it itself)."""
        if not quantize:
            return x.contiguous(), None
        xw, xs = self.plan.quantize(x)
        return xw, xs.float().contiguous()

    # ------------------------------------------------------------------------------------- resync
    def resync(self) -> None:
        """`CommDispatcher.resync` (a collective: every rank, between forwards), driven as this
        dispatcher's exchanges are: simulated ranks in threads meet at each of its stops."""
        self.run_steps(self.resync_steps())

    def group_workspaces(self) -> list:
        own = [self.workspace] if self.workspace is not None else []
        return list(self.state.workspaces) + [ws for ws in own if ws not in self.state.workspaces]

    def meet_steps(self, value: int = 0):
        """Simulated ranks meet at a stop (their kernels ran to the end already), `value` passed through
        their workspaces' shared board; real ones as every communicating dispatcher does
        (`CommDispatcher.meet_steps`). Returns the largest `value` of any rank."""
        if not self.simulated:
            return (yield from super().meet_steps(value))
        board = self._workspace().simulated_board
        board[self.rank] = value
        yield                                    # every rank has written
        largest = max(board.values())
        yield                                    # every rank has read before any writes again
        return largest

    def next_header(self, num_tokens: int, failed: bool = False) -> fh.Header:
        """This layer's header for the forward being dispatched (the group's next forward number)."""
        return fh.Header(self.fingerprint, self.layer_index, self.state.next_forward(), num_tokens, failed)

    # --------------------------------------------------- meeting ranks that run collective dispatchers
    def join_collective_peer(self, header: fh.Header) -> None:
        """A peer waits in a collective dispatcher's header exchange for this forward (the GPU saw its
        marker: COLLECTIVE_PEER): take part with this layer's header, so every rank raises the same
        `RankMismatch` from the same rows, naming the dispatchers. This rank's workspace already stepped;
        `symm_step` tells the other ranks to step theirs (`SymmWorkspace.skip_forward`)."""
        CommDispatcher.exchange_headers(self, header.tokens, self.device, header=header,
                                        symm_step=self._workspace().number)
        raise RuntimeError(f"{self.name} dispatcher: the GPU saw a peer in a collective forward, but that peer's "
                           f"header exchange found every rank on the same layer")    # not reached

    def settle_mismatch(self, rows: list[list[int]], symm_step: int) -> None:
        # this rank's own workspace stepped already (its forward's first exchange did); its forward count
        # never goes back: a later forward of this rank (the other micro-batch) may have taken a number since
        largest = max(h[fh.FIELDS.index("forward")] for h in rows)
        if (largest - self.state.forwards) % WRAP < WRAP // 2:
            self.state.adopt_forward(largest)

    def meet_collective_peer(self, handle: SymmHandle) -> None:
        """A forward whose kernels were stopped by another forward's COLLECTIVE_PEER (the status bit is one
        per workspace, so they never looked for a marker of their own forward number): the peer may run a
        collective exchange of this forward's number too (its next micro-batch, or its next layer), and
        waits there for this rank. Wait on the host for what that forward's kernels would have waited for:
        a peer's marker of this forward number (then join that exchange: `join_collective_peer` raises
        the same `RankMismatch` as there), or every peer's flags of this forward's first exchange (they run
        a symmetric-memory forward of this number: nothing to join), for at most `timeout_s`."""
        ws, forward = handle.ws, handle.header.forward
        peers = [r for r in range(self.ep_size) if r != self.rank]
        markers = ws.control_view(0, "collective")
        flags = ws.control_view(handle.slot, "flags.count")
        deadline = time.monotonic() + self.timeout_s
        while True:
            seen = torch.cat([markers, flags, ws.epochs[1 + handle.slot:2 + handle.slot]]).tolist()
            if any(seen[r] == forward for r in peers):
                self.join_collective_peer(handle.header)
            epoch = seen[-1]
            if all(seen[self.ep_size + r] == epoch for r in peers) or time.monotonic() > deadline:
                return
            time.sleep(1e-3)

    def exchange(self, ws: SymmWorkspace, phase: str, slot: int, header: fh.Header, **kw):
        """Publish `header` and the phase's next epoch, and wait for every rank's (one kernel on the GPU;
        in a simulation two, with a stop between them). A generator either way: use `yield from`."""
        from ..kernels.symm_dispatch import exchange_flags
        args = (ws, phase, slot, header.values(), self.timeout_s)
        if not self.simulated:
            exchange_flags(*args, **kw)
            return
        exchange_flags(*args, wait=False, **kw)
        yield
        exchange_flags(*args, publish=False, **kw)

    # -------------------------------------------------------------------------------------- errors
    def read_status(self) -> int:
        """The status bits the kernels set since the last read (a host sync), cleared."""
        ws = self._workspace()
        bits = int(ws.status.item())
        ws.status_read(bits)
        return bits

    def raise_for_status(self, bits: int, heads: list[list[int]] | None = None,
                         header: fh.Header | None = None) -> None:
        """Raise what the GPU reported: the same on every rank that saw it. `heads`: every rank's header row
        as read (for the message); `header`: this rank's header of the forward (to join a collective peer)."""
        from ..kernels import symm_dispatch as k
        bits &= ~k.RESET_PENDING.value            # not an error: the host knows it (`needs_reset`)
        if not bits:
            return
        who = f"{self.name} dispatcher"
        resync_now = (f"call resync() on every rank of the group (layer.resync()) before the group's next "
                      f"forward; this rank refuses forwards until then")
        if bits & k.COLLECTIVE_PEER.value:     # before anything else: that peer waits in a collective
            if header is None:
                raise RuntimeError(f"{who}: a peer was in a collective forward while this rank ran a replayed "
                                   f"graph of this layer; the group's ranks are out of step")
            self.join_collective_peer(header)
        if bits & k.TIMEOUT.value:     # first: with a peer missing, the headers read are stale
            self._workspace().give_up()
            raise RuntimeError(f"{who}: a peer did not signal within timeout_s={self.timeout_s} s "
                               f"(a rank stalled, died, skipped a forward, or runs a dispatcher that uses collectives); "
                               f"this forward's outputs are invalid (set to NaN). This rank gave the forward up: "
                               f"{resync_now}; a dead rank needs a new group")
        if bits & k.REFUSED.value:
            raise RuntimeError(f"{who}: this rank ran a forward's kernels while it waited for resync() after a "
                               f"forward was given up on a timeout (an eager combine issued since, or CUDA graph "
                               f"replays): they sent nothing to the peers and their outputs are NaN; {resync_now}")
        seen = ", ".join(f"rank {r}: layer #{h[1]} forward #{h[2]} {h[3]} tokens{' FAILED' if h[4] else ''}"
                         for r, h in enumerate(heads or []))
        error = fh.mismatch(who, [h[:len(fh.FIELDS)] for h in heads]) if heads else None
        if bits & k.PEER_GAVE_UP.value:
            # the ranks' slots and epochs may differ now (that peer refuses forwards until resync()): waiting
            # for it in the next forward would only time out, so this rank refuses it too
            self._workspace().give_up()
            gone = [r for r, h in enumerate(heads or []) if h[fh.FAILED] == k.GAVE_UP.value]
            raise RankMismatch(f"{who}: {f'rank(s) {gone}' if gone else 'a rank'} gave this forward up on a timeout "
                               f"(a peer stalled, skipped a forward or came late); every rank stops this forward, "
                               f"its outputs are NaN. Every rank must call resync() now (layer.resync()), before "
                               f"the group's next forward; this rank refuses forwards until then. Headers: {seen}")
        if bits & k.FAILED.value:
            if error is None or "could not compute" not in str(error):
                error = RankMismatch(f"{who}: a rank could not compute this forward (its error is raised there); "
                                     f"every rank of the group stops this forward. Headers: {seen}")
            raise error
        if bits & k.OVERFLOW.value:
            M = self.plan.max_tokens_per_rank
            who_over = ", ".join(f"rank {r} passed {h[3]} tokens" for r, h in enumerate(heads or []) if h[3] > M)
            raise ValueError(f"{who}: {who_over or 'a rank passed too many tokens'}, more than "
                             f"max_tokens_per_rank={M} (raised on every rank of the group; this forward's outputs "
                             f"were discarded, no token was dropped silently). Build the layer with a larger "
                             f"max_tokens_per_rank on every rank, or pass fewer tokens per forward")
        if bits & k.MISMATCH.value:
            raise error or RankMismatch(f"{who}: the ranks are not running the same layer's same forward ({seen}); "
                                        f"every rank must call the same EP layers in the same order")
        if bits & k.SLOT_OVERFLOW.value:
            raise RuntimeError(f"{who}: more rows arrived for an expert than its capacity: a "
                               f"dispatch whose combine never ran left its counters behind; every dispatch must be "
                               f"followed by its combine")

    def raise_read_elsewhere(self, bits: int, before_resync: bool) -> None:
        """Raise for status bits a forward did not read itself: kept by `reset()` (`before_resync`: a forward
        issued before `resync()`; the ranks are in step again), or read for another forward in flight beside
        it, whose kernels ran beside its own (`SymmWorkspace.open_forward`): its output is not to be used.
        Told as such; whoever read them first did what they ask (a resync() is needed, a collective peer
        was joined)."""
        from ..kernels import symm_dispatch as k
        if not bits:
            return
        M = self.plan.max_tokens_per_rank
        meanings = [   # (bit, what the kernels saw, the error a forward raises for it)
            (k.COLLECTIVE_PEER, "a peer was in a collective dispatcher's forward", RankMismatch),
            (k.TIMEOUT, f"a peer did not signal within timeout_s={self.timeout_s} s", RuntimeError),
            (k.REFUSED, "this rank ran its kernels (a combine issued, or a CUDA graph replayed) while it waited "
                         "for resync(): it sent nothing", RuntimeError),
            (k.FAILED, "a rank could not compute the forward or gave it up", RankMismatch),
            (k.OVERFLOW, f"a rank passed more than max_tokens_per_rank={M} tokens", ValueError),
            (k.MISMATCH, "the ranks ran different layers or forwards", RankMismatch),
            (k.SLOT_OVERFLOW, "more rows arrived for an expert than its capacity", RuntimeError)]
        found = [(what, kind) for bit, what, kind in meanings if bits & bit.value]
        kind = next((kind for _, kind in found if kind is not RuntimeError), RuntimeError)
        what = "; ".join(what for what, _ in found)
        if before_resync:
            raise kind(f"{self.name} dispatcher: a forward issued before resync() failed on the GPU ({what}); its "
                       f"output is NaN. Its status is read only now: resync() has put the ranks back in step since, "
                       f"so the group's next forward needs nothing more")
        raise kind(f"{self.name} dispatcher: a forward in flight beside it (or this one) failed on the GPU "
                   f"({what}), raised already where another forward or check() read it; the status word that says "
                   f"so is one per workspace, so this forward's kernels stopped on it or ran on what that one left: "
                   f"its output is not to be used (NaN)")

    def check(self) -> None:
        """Raise now for anything the GPU reported since the last check (after CUDA graph replays, which
        cannot read back themselves), once the exchanges issued so far are done: first what a `resync()`
        since found unread (replays before it), then what came after."""
        if self.comm_stream is not None:
            self.comm_stream.join()
        self.raise_read_elsewhere(self._workspace().take_unread_at_reset(), before_resync=True)
        self.raise_for_status(self.read_status())

    def check_at_end(self, handle: SymmHandle, device) -> None:
        """Eager forwards of the capturable path: read the status word (and the headers, for the message)
        once, at the end of combine, so that what went wrong raises on every rank in the forward that caused
        it (where the combine runs through `combine_async`, when it is waited for). Skipped while a CUDA
        graph is being captured (nothing can be read back then)."""
        if handle.check_on_wait or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            return
        ws = handle.ws
        if handle.generation != ws.generation:
            # a combine issued before resync(), waited for after it: the status word is a later forward's
            # now; what this one left was kept by the reset (on it, and for check())
            self.raise_read_elsewhere(ws.close_forward(handle) | ws.take_unread_at_reset(), before_resync=True)
            return
        seen = torch.cat([ws.status, ws.control_view(handle.slot, "heads.count").reshape(-1)]).tolist()
        bits = seen[0]
        ws.status_read(bits, handle)
        kept = ws.close_forward(handle)
        from ..kernels.symm_dispatch import COLLECTIVE_PEER
        if kept & COLLECTIVE_PEER.value and not bits & COLLECTIVE_PEER.value:
            self.meet_collective_peer(handle)    # first: that peer may wait for this forward in its exchange
        if bits:
            hw = (len(seen) - 1) // self.ep_size
            self.raise_for_status(bits, [seen[1 + r * hw:1 + (r + 1) * hw] for r in range(self.ep_size)],
                                  handle.header)
        self.raise_read_elsewhere(kept, before_resync=False)

    def workspace_signature(self) -> tuple:
        """The workspace every rank builds this layer on (the build handshake compares it: a rank on the
        group's default and a rank on its own would allocate apart)."""
        ws = self.workspace
        return ("the group's default",) if ws is None else (f"workspace #{ws.number}", ws.slot_bytes)

    def wire_signature(self) -> tuple:
        """Name, the slot layout (regions, dtypes, shapes) and the capacity: what peers must agree on."""
        layout = self.slot_layout_for(self.plan, self.placement, 1)
        return (self.name, self.plan.max_tokens_per_rank,
                tuple((n, str(r.dtype), r.shape) for n, r in layout.regions.items()))
