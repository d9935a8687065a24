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

    num_tokens: this rank's tokens in the forward. stream / done: where the forward's exchange was issued and
    an event recorded after it, for dispatchers that run it beside the caller's stream (None: issued on the
    caller's stream, in order). Each dispatcher's handle adds what its combine needs (a subclass per
    dispatcher; the symmetric-memory ones add the workspace slot the forward uses).
    """

    num_tokens: int
    stream: Any = None       # torch.cuda.Stream
    done: Any = None         # torch.cuda.Event


class Pending:
    """A dispatch or combine that was started and may not have finished yet.

    `wait()` waits for it and returns the result (`(batch, handle)` for a dispatch, `[T, H]` for a combine);
    calling it again returns the same result. `overlaps` says whether work the caller issues before `wait()`
    runs beside the exchange: True for collectives started with `async_op=True` (Gloo, NCCL; on CUDA
    `wait()` then makes the current stream wait for them), False where the exchange was already queued in
    order on the caller's stream or done (work issued before `wait()` then runs after it).
    """

    def __init__(self, works: list, finish: Callable[[], Any], overlaps: bool | None = None):
        self._works = [w for w in works if w is not None]
        self._finish = finish
        self._done = False
        self._result = None
        self.overlaps = bool(self._works) if overlaps is None else overlaps

    def wait(self):
        if not self._done:
            for work in self._works:
                work.wait()
            self._result = self._finish()
            self._done, self._works, self._finish = True, [], None
        return self._result


class Dispatcher(abc.ABC):
    """Moves tokens to the ranks that hold their experts (`dispatch`) and the experts' outputs back to
    the ranks that own the tokens (`combine`). Built from a `MoEPlan` (see `epmoe.make_dispatcher`).

    The batch `dispatch` produces is in the layout the class declares in `CAPS.layout`:
      - flat (`epmoe.layouts.FlatBatch`): `x [N, Hp]` rows (Hp = padded hidden size; FP8 with `scales
        [N, G]` float32 when the plan puts FP8 on the wire), `local_ids [N, k]` int32 (-1: that slot's
        expert is on another rank), `weights [N, k]` float32. The experts must return `[N, Hp]`: each
        row's weighted sum over its local slots.
      - batched (`epmoe.layouts.BatchedBatch`): `x [L, C, Hp]`, `counts [L]` int32 (rows past an
        expert's count are padding), optional `scales [L, C, G]`. The experts must return `[L, C, Hp]`
        unweighted; combine applies the routing weights.
    """

    CAPS: DispatcherCaps
    name: str = ""

    def __init__(self, plan: MoEPlan, placement: Placement, group=None, device: torch.device | None = None):
        self.plan = plan
        self.placement = placement
        self.group = group
        self.device = device

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

    def dispatch_async(self, hidden: torch.Tensor, topk_ids, topk_weights: torch.Tensor | None = None) -> Pending:
        """`dispatch`, returning as soon as the token exchange has been started: `Pending.wait()` gives
        `(batch, handle)`. Where `Pending.overlaps`, work done before waiting (shared experts, another
        micro-batch) runs beside the exchange."""
        x, routing = self._inputs(hidden, topk_ids, topk_weights)
        return self._start_dispatch(x, routing)

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

    def combine_async(self, expert_out: torch.Tensor, handle) -> Pending:
        """`combine`, returning as soon as the exchange has been started: `Pending.wait()` gives [T, H]."""
        pending = self._start_combine(expert_out, handle)
        H = self.plan.hidden_size
        if H == self.plan.padded_hidden_size:
            return pending
        return Pending([pending], lambda: pending.wait()[:, :H].contiguous())

    def abort(self) -> None:
        """Take part in the current forward for a rank that cannot compute it (bad input or routing), so
        its peers raise instead of waiting. Nothing to do without peers."""

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
