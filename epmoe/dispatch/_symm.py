"""What the GPU-initiated dispatchers share: availability, the workspace pool, the per-forward header,
bounded waits, and turning the GPU's status word into the same error on every rank.

A forward's header (layer fingerprint, layer index, the group's forward count, tokens, failed) travels in
the control block of the shared workspace, next to the flags every phase exchanges anyway, so checking
that the ranks run the same layer's same forward costs no extra exchange. The kernels compare headers on
the GPU and set bits in a status word; the host reads that word at the one point where it reads
anything, raises the error that the bits name, and clears it.

Simulation: built with `pool=` (a `WorkspacePool` over `simulated_workspaces`) and no group, a
dispatcher runs its kernels on CPU tensors under the Triton interpreter, and its `dispatch_steps` /
`combine_steps` generators stop at every wait, so a test can drive several simulated ranks in lockstep.
"""
from __future__ import annotations

import importlib.util
import zlib

import torch

from ..errors import RankMismatch
from ._comm import Comm, CommDispatcher, token_format
from .base import Dispatcher, Pending

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


class SymmDispatcher(CommDispatcher):
    """Base of the dispatchers on symmetric memory. `timeout_s`: how long a wait for a peer may last
    before every waiting rank reports an error instead of spinning on."""


    def __init__(self, plan, placement, group=None, device=None, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 pool=None):
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
            raise ValueError(f"{self.name} dispatcher: timeout_s must be a positive number of seconds, got "
                             f"{timeout_s!r}")
        self.timeout_s = float(timeout_s)
        self.fp8 = plan.fp8_on_the_wire              # the plan says what crosses the wire
        self.groups = plan.wire_scales
        self.wire_dtype = plan.wire_dtype
        self.simulated = pool is not None
        if self.simulated:      # ranks of one process (tests): no group, the pool's workspaces are the transport
            Dispatcher.__init__(self, plan, placement, None, pool.device)
            self.ep_size, self.rank = placement.ep_size, placement.rank
            self.comm = Comm(None, 1)     # a test that plays a collective peer replaces it
            self.fmt = token_format(plan)
            self.stats = None
            self.layer_index, self.forwards = 0, [0]
            self.pool = pool
            return
        super().__init__(plan, placement, group, device)
        dev = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
        why = symm_problem(dev.type)
        if why:
            raise ValueError(f"{self.name} dispatcher: {why}")
        self.device = dev
        from .symm_workspace import WorkspacePool, pool_for
        self.pool = (pool_for(group, dev, self.rank, self.ep_size) if group is not None
                     else WorkspacePool(None, dev, 0, 1))

    # ------------------------------------------------------------------------- the Dispatcher API
    def _start_dispatch(self, x, routing) -> Pending:
        result = run_steps(self.dispatch_steps(x, routing))
        return Pending([], lambda: result)        # stream-ordered: the caller's next work queues behind it

    def _start_combine(self, expert_out, handle) -> Pending:
        result = run_steps(self.combine_steps(expert_out, handle))
        return Pending([], lambda: result)

    def abort(self) -> None:
        """Take part in the current forward on behalf of a rank whose inputs or routing failed, flagged as
        failed in its header, so that every rank raises instead of waiting."""
        from ..routing import Routing
        k, dev = self.plan.top_k, self.device
        x = torch.zeros(0, self.plan.padded_hidden_size, dtype=self.plan.dtype, device=dev)
        empty = Routing(torch.zeros(0, k, dtype=torch.int32, device=dev),
                        torch.zeros(0, k, dtype=torch.float32, device=dev))
        try:
            batch, handle = run_steps(self.dispatch_steps(x, empty, failed=True))
            run_steps(self.combine_steps(torch.zeros(batch.x.shape, dtype=self.plan.dtype, device=dev), handle))
        except RankMismatch:
            return   # expected: this rank's failed flag ends the forward on every rank, here included

    def wire_rows(self, x: torch.Tensor, quantize: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(rows as the transfer kernel reads them, float32 scales or None): quantized to the wire's FP8
        with the one formula when `quantize` (else the kernel sends `x` as it is, or quantizes it itself)."""
        if not quantize:
            return x.contiguous(), None
        xw, xs = self.plan.quantize(x)
        return xw, xs.float().contiguous()

    # --------------------------------------------------- meeting ranks that run collective dispatchers
    def symm_pool(self):
        return self.pool if self.pool.ws is not None else None

    def workspace(self, slot_bytes: int, num_tokens: int, failed: bool = False):
        """The pool's workspace, holding `slot_bytes` a slot. When that allocates (a rendezvous of the
        group: a layer's first forward, or a larger layer's), every rank first takes part in the collective
        forward header (`CommDispatcher.exchange_headers`), so that a peer running another layer (a
        collective dispatcher, or a symmetric-memory one that needs no allocation) makes every rank
        raise `RankMismatch` instead of pairing the rendezvous with another collective."""
        pool = self.pool
        if pool.needs(slot_bytes) and pool.group is not None and self.ep_size > 1:
            self.exchange_headers(num_tokens, self.device, failed=failed, forward=self.forwards[0] + 1)
        return pool.ensure(slot_bytes)

    def join_collective_peer(self, header: list[int]) -> None:
        """A peer waits in a collective dispatcher's header exchange for this forward (the GPU saw its
        marker: COLLECTIVE_PEER): take part with this layer's header, so every rank raises the same
        `RankMismatch` from the same rows, naming the dispatchers. This rank's workspace state already
        advanced; `symm_step` tells the other ranks to advance theirs (`WorkspacePool.skip_forward`)."""
        forward, tokens = header[2], header[3]
        CommDispatcher.exchange_headers(self, tokens, self.device, failed=bool(header[4]), forward=forward,
                                        symm_step=True)
        raise RuntimeError(f"{self.name} dispatcher: the GPU saw a peer in a collective forward, but that peer's "
                           f"header exchange found every rank on the same layer")    # not reached

    # ------------------------------------------------------------------------------------- headers
    def fingerprint(self) -> int:
        """What two ranks must agree on to exchange rows with this layer (int32)."""
        if getattr(self, "_fingerprint", None) is None:
            self._fingerprint = zlib.crc32(repr(self.wire_signature()).encode()) & 0x7FFFFFFF
        return self._fingerprint

    def header_values(self, num_tokens: int, failed: bool = False) -> list[int]:
        """(fingerprint, layer, the group's forward count, tokens, failed) for the forward being dispatched
        (int32: the kernels compare them on the GPU)."""
        self.forwards[0] = (self.forwards[0] + 1) % (2 ** 62)
        self._last_header = [self.fingerprint(), self.layer_index % 2 ** 31, self.forwards[0] % 2 ** 31, num_tokens,
                             int(failed)]
        return self._last_header

    def check_heads(self, heads: list[list[int]]) -> None:
        """On the host, what the exchange kernel checks on the GPU: a failed rank, another layer or
        another forward on some rank raises `RankMismatch` (the same on every rank: all read the same)."""
        failed = [r for r, h in enumerate(heads) if h[4]]
        if failed:
            raise RankMismatch(f"{self.name} dispatcher: rank(s) {failed} could not compute this forward (their "
                               f"error is raised there); every rank of the group stops this forward")
        if len({tuple(h[:3]) for h in heads}) > 1:
            per_rank = ", ".join(f"rank {r}: layer #{h[1]} forward #{h[2]} layout {h[0]}" for r, h in enumerate(heads))
            raise RankMismatch(f"{self.name} dispatcher: the ranks are not running the same layer's same forward "
                               f"({per_rank}); every rank must call the same EP layers in the same order")

    def exchange(self, ws, phase: str, slot: int, header: list[int], **kw):
        """Publish `header` and the phase's next epoch, and wait for every rank's (one kernel on the GPU;
        in a simulation two, with a stop between them). A generator either way: use `yield from`."""
        from ..kernels.symm_dispatch import exchange_flags
        pool = self.pool
        args = (ws, phase, slot, pool.epochs, header, pool.status, self.timeout_s)
        if not self.simulated:
            exchange_flags(*args, **kw)
            return
        exchange_flags(*args, wait=False, **kw)
        yield
        exchange_flags(*args, publish=False, **kw)

    # -------------------------------------------------------------------------------------- errors
    def read_status(self) -> int:
        """The status bits the kernels set since the last read (a host sync), cleared."""
        bits = int(self.pool.status.item())
        if bits:
            self.pool.status.zero_()
        return bits

    def raise_for_status(self, bits: int, heads: list[list[int]] | None = None) -> None:
        """Raise what the GPU reported: the same on every rank that saw it."""
        from ..kernels import symm_dispatch as k
        if not bits:
            return
        if bits & k.COLLECTIVE_PEER.value:     # before anything else: that peer waits in a collective
            self.join_collective_peer(heads[self.rank] if heads else self._last_header)
        if bits & k.TIMEOUT.value:     # first: with a peer missing, the headers read are stale
            raise RuntimeError(f"{self.name} dispatcher: a peer did not signal within timeout_s={self.timeout_s} s "
                               f"(a rank stalled, died, skipped a forward, or runs a dispatcher that uses collectives); "
                               f"this forward's outputs are invalid (set to NaN)")
        seen = ", ".join(f"rank {r}: layer #{h[1]} forward #{h[2]} {h[3]} tokens{' FAILED' if h[4] else ''}"
                         for r, h in enumerate(heads or []))
        if bits & k.FAILED.value:
            raise RankMismatch(f"{self.name} dispatcher: a rank could not compute this forward (its error is raised "
                               f"there); every rank of the group stops this forward. Headers: {seen}")
        if bits & k.OVERFLOW.value:
            M = self.max_tokens_per_rank
            who = ", ".join(f"rank {r} passed {h[3]} tokens" for r, h in enumerate(heads or []) if h[3] > M)
            raise ValueError(f"{self.name} dispatcher: {who or 'a rank passed too many tokens'}, more than "
                             f"max_tokens_per_rank={M} (raised on every rank of the group; this forward's outputs "
                             f"were discarded, no token was dropped silently). Build the layer with a larger "
                             f"max_tokens_per_rank on every rank, or pass fewer tokens per forward")
        if bits & k.MISMATCH.value:
            raise RankMismatch(f"{self.name} dispatcher: the ranks are not running the same layer's same forward "
                               f"({seen}); every rank must call the same EP layers in the same order")
        if bits & k.SLOT_OVERFLOW.value:
            raise RuntimeError(f"{self.name} dispatcher: more rows arrived for an expert than its capacity: a "
                               f"dispatch whose combine never ran left its counters behind; every dispatch must be "
                               f"followed by its combine")

    def check(self) -> None:
        """Raise now for anything the GPU reported since the last check (after CUDA graph replays, which
        cannot read back themselves)."""
        self.raise_for_status(self.read_status())

    def check_at_end(self, ws, slot: int, phase: str, device) -> None:
        """Eager forwards of the capturable path: read the status word (and the headers, for the message)
        once, at the end of combine, so that what went wrong raises on every rank in the forward that caused
        it. Skipped while a CUDA graph is being captured (nothing can be read back then)."""
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return
        seen = torch.cat([self.pool.status, ws.control_view(slot, f"heads.{phase}").reshape(-1)]).tolist()
        bits = seen[0]
        if bits:
            self.pool.status.zero_()
            hw = (len(seen) - 1) // self.ep_size
            self.raise_for_status(bits, [seen[1 + r * hw:1 + (r + 1) * hw] for r in range(self.ep_size)])

    def wire_signature(self) -> tuple:
        """Name, the slot layout (regions, dtypes, shapes) and the capacity: what peers must agree on."""
        layout = self.slot_layout()
        return (self.name, self.max_tokens_per_rank,
                tuple((n, str(r.dtype), r.shape) for n, r in layout.regions.items()))
