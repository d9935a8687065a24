"""The dispatcher role: dispatch -> (the caller's experts) -> combine, usable without `MoELayer`.

An engine that runs its own experts builds a dispatcher for its group with `epmoe.make_dispatcher` and
drives it itself; `MoELayer` is built on exactly this interface. Everything one forward needs between
dispatch and combine lives in the handle `dispatch` returns, never on the dispatcher, so several
forwards (micro-batches) may be in flight at once, in the same order on every rank.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..contract import DispatcherCaps
from ..placement import Placement
from ..plan import MoEPlan
from ..routing import Routing


@dataclass
class Handle:
    """What one forward's dispatch leaves for its combine, and the only place it is kept (never on the
    dispatcher): several forwards (micro-batches) may be in flight at once.

    num_tokens: this rank's tokens in the forward. stream / done: the communication stream the dispatch ran on
    and the event recorded after it (`epmoe.dispatch.streams`; None: it ran in order on the caller's
    stream, or on the host). Each dispatcher's handle adds what its combine needs (a subclass per
    dispatcher; the symmetric-memory ones add the workspace slot the forward uses).
    """

    num_tokens: int
    stream: Any = None       # torch.cuda.Stream
    done: Any = None         # torch.cuda.Event


class Pending:
    """A dispatch or combine that was started and may not have finished yet.

    `wait()` waits for it and returns the result (`(batch, handle)` for a dispatch, `[T, H]` for a combine);
    calling it again returns the same result. On a GPU the exchange runs on the communication stream
    (`epmoe.dispatch.streams`): `wait()` then blocks nothing on the host, it makes the current stream wait
    for `event`, the CUDA event recorded after the exchange (pass it as `after=` to order a later exchange
    behind it without waiting; None where the exchange ran in order on the caller's stream or on the host).
    `overlaps` says whether work the caller issues before `wait()` runs beside the exchange: True on the
    communication stream and for collectives started with `async_op=True` on the host (Gloo), False where
    the exchange was queued in order on the caller's stream or done (work issued before `wait()` then runs
    after it). `check`: what the exchange leaves to be verified on the host once its result is queued (the
    symmetric-memory dispatchers' status word: a host sync, so it is put off until `wait()`).
    """

    def __init__(self, works: list, finish: Callable[[], Any], overlaps: bool | None = None, event=None,
                 check: Callable[[], None] | None = None):
        self._works = [w for w in works if w is not None]
        self._finish = finish
        self._done = False
        self._result = None
        self._check = check
        self.overlaps = bool(self._works) if overlaps is None else overlaps
        self.event = event

    def queued_result(self):
        """The result, once the collectives are waited for (on a GPU: the current stream made to wait) and
        what follows them queued; the host-side check is left to `wait()`."""
        if not self._done:
            for work in self._works:
                work.wait()
            self._result = self._finish()
            self._done, self._works, self._finish = True, [], None
        return self._result

    def wait(self):
        result = self.queued_result()
        check, self._check = self._check, None
        if check is not None:
            check()
        return result

    def then(self, fn: Callable[[Any], Any]) -> Pending:
        """This pending's result passed through `fn` (more queued work), its check still left to `wait()`."""
        return Pending([], lambda: fn(self.queued_result()), self.overlaps, self.event, check=self.wait)


class Dispatcher(abc.ABC):
    """Moves tokens to the ranks that hold their experts (`dispatch`) and the experts' outputs back to
    the ranks that own the tokens (`combine`). Built from a `MoEPlan` (see `epmoe.make_dispatcher`).

    The batch `dispatch` produces is in the layout the class declares in `CAPS.layout`:
      - flat (`epmoe.layouts.FlatBatch`): `x [N, Hp]` rows (Hp = padded hidden size; FP8 with `scales
        [N, G]` float32 when the plan puts FP8 on the wire), `local_ids [N, k]` int32 (-1: that slot's
        expert is on another rank), `weights [N, k]` float32. The experts must return `[N, Hp]`: each
        row's weighted sum over its local slots.
      - batched (`epmoe.layouts.BatchedBatch`): `x [L, C, Hp]`, `counts [L]` int32 (rows past an
        expert's count are padding), optional `scales [L, C, G]`, `num_tokens` (this rank's T). The experts
        must return `[L, C, Hp]` unweighted, rows past each count unspecified; combine applies the routing
        weights and reads only the rows below each count.
    """

    CAPS: DispatcherCaps
    name: str = ""
    def __init__(self, plan: MoEPlan, placement: Placement, group=None, device: torch.device | None = None):
        # False: exchanges run in order on the caller's stream instead of the communication stream (what the
        # overlap gains is measured against; see `epmoe.dispatch.streams`). Off by default where the plan
        # reads sizes back on the host: the host waits inside such an exchange anyway, so a side stream
        # hides nothing and only adds its synchronisation (measured on one H200, eager: symm_high_throughput
        # without a capacity 3.59 ms against 2.51 in order at 4096 tokens, alltoall 2.46 against 2.04)
        self.use_comm_stream = not plan.host_sync
        self.plan = plan
        self.placement = placement
        self.group = group
        self.device = device
        self.comm_stream = None      # `CommStream` where this dispatcher's exchanges run (None: in order)

    def check_move_to(self, device: torch.device) -> None:
        """Refuse a move of the layer to `device` (`MoELayer.to()`, before anything moves) where this dispatcher
        cannot follow: on a process group, its rank's group, streams and workspace were set up on the device
        it was built on, and its peers were not asked."""
        if self.group is not None and device != self.device:
            raise ValueError(f"{self.name} dispatcher: a layer on a process group stays on the device it was built on "
                             f"({self.device}); build the layer on {device} instead (MoELayer(..., device=...))")

    def prepare(self) -> None:
        """Called once the group's ranks agreed on the layer (after the build handshake), before its first
        forward: what needs the peers at construction (a symmetric workspace) is set up here."""

    # ------------------------------------------------------------------------------ the public API
    def dispatch(self, hidden: torch.Tensor, topk_ids, topk_weights: torch.Tensor | None = None):
        """Send this rank's tokens to their experts' ranks and receive the rows for this rank's experts.

        Args:
            hidden: [T, H] (or already padded [T, Hp]) in the layer's dtype, on the dispatcher's device.
            topk_ids: [T, k] int32 global expert ids (or a `Routing`, then `topk_weights` is omitted).
            topk_weights: [T, k] float32 routing weights.
        Returns:
            (batch, handle): the rows for this rank's experts in the declared layout, and the handle that
            `combine` needs. Every rank of the group must call it, in the same order of forwards.
        """
        return self.dispatch_async(hidden, topk_ids, topk_weights).wait()

    def dispatch_async(self, hidden: torch.Tensor, topk_ids, topk_weights: torch.Tensor | None = None, *,
                       after=None) -> Pending:
        """`dispatch`, returning as soon as the token exchange has been issued: `Pending.wait()` gives
        `(batch, handle)`. Where `Pending.overlaps`, work done before waiting (shared experts, another
        micro-batch) runs beside the exchange. `after`: a CUDA event the exchange waits for before it
        reads `hidden` and the routing (None: what the current stream has queued when this is called)."""
        x, routing = self._inputs(hidden, topk_ids, topk_weights)
        return self._issue(lambda: self._start_dispatch(x, routing), (x, routing), after)

    def combine(self, expert_out: torch.Tensor, handle) -> torch.Tensor:
        """Bring the experts' outputs back to the ranks that own the tokens and sum each token's
        contributions in float32.

        Args:
            expert_out: the experts' outputs for `dispatch`'s batch: `[N, Hp]` (flat) or `[L, C, Hp]`
                (batched), in the layer's dtype.
            handle: what `dispatch` returned with that batch.
        Returns:
            [T, H] in the layer's dtype, this rank's tokens in their order.
        """
        return self.combine_async(expert_out, handle).wait()

    def combine_async(self, expert_out: torch.Tensor, handle, *, after=None) -> Pending:
        """`combine`, returning as soon as the exchange has been issued: `Pending.wait()` gives [T, H].
        `after`: a CUDA event the exchange waits for before it reads `expert_out` (None: what the current
        stream has queued when this is called, i.e. the experts that wrote it)."""
        H = self.plan.hidden_size

        def start():
            pending = self._start_combine(expert_out, handle)
            if H == self.plan.padded_hidden_size:
                return pending
            return pending.then(lambda out: out[:, :H].contiguous())
        return self._issue(start, (expert_out,), after)

    def _issue(self, start: Callable[[], Pending], inputs, after) -> Pending:
        """Issue an exchange on the communication stream where this dispatcher has one (a GPU), else in
        order where the caller is (`after` then orders the caller's stream; on the host there is nothing
        to order)."""
        streams = self.comm_stream if self.use_comm_stream else None
        if streams is not None and streams.device == self.device:     # (a layer moved to another device: in order)
            return streams.issue(start, inputs, after)
        if after is not None:
            if not (self.device is not None and self.device.type == "cuda"):
                raise ValueError(f"{self.name} dispatcher: after= orders CUDA streams; on {self.device} every "
                                 f"exchange runs in order on the host (pass after=None)")
            torch.cuda.current_stream(self.device).wait_event(after)
        return start()

    def abort(self) -> None:
        """Take part in the current forward for a rank that cannot compute it (bad input or routing), so
        its peers raise instead of waiting. Nothing to do without peers."""

    def resync(self) -> None:
        """Put what the group's ranks keep in step back in step after a rank gave a forward up (a
        collective: every rank calls it, between forwards). Nothing to do without peers."""

    # ------------------------------------------------------------------------- what backends write
    @abc.abstractmethod
    def _start_dispatch(self, x: torch.Tensor, routing: Routing) -> Pending:
        """Start dispatching `x [T, Hp]` routed by `routing`; the `Pending` gives (batch, handle)."""

    @abc.abstractmethod
    def _start_combine(self, expert_out: torch.Tensor, handle) -> Pending:
        """Start combining; the `Pending` gives [T, Hp] in the layer's dtype."""

    # ---------------------------------------------------------------------------------- the checks
    def _inputs(self, hidden, topk_ids, topk_weights) -> tuple[torch.Tensor, Routing]:
        """Check the public arguments' types and shapes (no host sync) and pad hidden to Hp."""
        if isinstance(topk_ids, Routing):
            if topk_weights is not None:
                raise TypeError(f"{self.name} dispatch: pass either a Routing or topk_ids and topk_weights")
            topk_ids, topk_weights = topk_ids.topk_ids, topk_ids.topk_weights
        plan = self.plan
        H, Hp, k = plan.hidden_size, plan.padded_hidden_size, plan.top_k
        for name, t in (("hidden", hidden), ("topk_ids", topk_ids), ("topk_weights", topk_weights)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{self.name} dispatch: {name} must be a tensor, got {type(t).__name__}")
        if hidden.dim() != 2 or hidden.shape[1] not in (H, Hp):
            raise ValueError(f"{self.name} dispatch: hidden must be [T, {H}], got {list(hidden.shape)}")
        if hidden.dtype != plan.dtype:
            raise TypeError(f"{self.name} dispatch: hidden must be {plan.dtype}, got {hidden.dtype}")
        T = hidden.shape[0]
        for name, t in (("topk_ids", topk_ids), ("topk_weights", topk_weights)):
            if tuple(t.shape) != (T, k):
                raise ValueError(f"{self.name} dispatch: {name} must be [T, top_k] = [{T}, {k}], got {list(t.shape)}")
            if t.device != hidden.device:
                raise ValueError(f"{self.name} dispatch: {name} is on {t.device}, hidden on {hidden.device}")
        if topk_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{self.name} dispatch: topk_ids must be int32 (or int64), got {topk_ids.dtype}")
        if topk_weights.dtype != torch.float32:
            raise TypeError(f"{self.name} dispatch: topk_weights must be float32, got {topk_weights.dtype}")
        x = hidden if hidden.shape[1] == Hp else F.pad(hidden, (0, Hp - H))
        return x, Routing(topk_ids.to(torch.int32), topk_weights)
