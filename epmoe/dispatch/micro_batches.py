"""Two micro-batches: a forward's tokens split in two whose exchanges interleave with the other's experts.

`run_micro_batches` is the schedule `MoELayer(micro_batches=2)` runs, written on the public dispatch API
only (an engine can run it, or its own order, the same way). For micro-batches A and B:

    dispatch A  ─┐                     (communication stream)
    shared experts, A's experts       (caller's stream, once A has arrived)
    dispatch B  ─┐  beside A's experts
    combine A   ─┐  beside B's experts
    combine B
    out = [A's rows; B's rows] (+ shared experts)

Two forwards are in flight at once (A combined after B was dispatched): the dispatcher declares it
(`in_flight`), and a symmetric-memory dispatcher gives each its own workspace slot. B's dispatch is issued
after A's experts were queued, so that a dispatcher that reads counts back on the host (waiting there for
its exchange) does so while the GPU runs A's experts.

Every rank issues both dispatches, and the combine of every dispatch that returned, in this order, whatever
fails on the way (an empty micro-batch, one T=0 or T=1 makes, is exchanged like the others):

- an error of an exchange (a rank that failed its input or routing, a mismatch, an overflow) is raised by
  every rank at the same exchange, so every rank carries on alike to the other micro-batch, and the group's
  exchanges stay paired (a rank that could not route its tokens takes part in both dispatches:
  `MoELayer.forward` calls `abort()` once a micro-batch);
- an error of this rank's experts (or its shared experts) is this rank's alone: its rows go back as NaN
  (`failed_output`) so that no peer waits for them, and the tokens routed there come out NaN on their
  ranks, never as a wrong number;
then the first error is raised. The group's next forward is aligned and correct.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..layouts import FlatBatch
from ..routing import Routing


def failed_output(batch, dtype: torch.dtype) -> torch.Tensor:
    """What a rank whose experts raised sends back for `batch`: NaN in every row routed to one of its
    experts, zeros in flat rows routed nowhere (a token none of this rank's experts hold stays right;
    batched rows past an expert's count are never read)."""
    out = torch.full(batch.x.shape, float("nan"), dtype=dtype, device=batch.x.device)
    if isinstance(batch, FlatBatch):
        out[~(batch.local_ids >= 0).any(dim=1)] = 0
    return out


def split_tokens(num_tokens: int, parts: int) -> list[tuple[int, int]]:
    """[start, end) of each micro-batch: the first ones one token larger where T does not divide."""
    bounds, start = [], 0
    for i in range(parts):
        size = num_tokens // parts + (1 if i < num_tokens % parts else 0)
        bounds.append((start, start + size))
        start += size
    return bounds


def run_micro_batches(dispatcher, experts: Callable, hidden: torch.Tensor, routing: Routing, parts: int = 2,
                      shared_experts: Callable | None = None) -> torch.Tensor:
    """`hidden [T, H]` routed by `routing` -> `[T, H]`: dispatch, `experts(batch) -> expert output` and
    combine in `parts` micro-batches on the schedule of the module docstring; `shared_experts(hidden)`,
    if given, runs while the first dispatch is in flight and is added to the output."""
    errors: list[BaseException] = []

    def attempt(fn):
        try:
            return fn()
        except Exception as exc:       # kept: the other micro-batch still runs its exchanges (docstring)
            errors.append(exc)
            return None

    def dispatch(i: int):
        a, b = bounds[i]
        return attempt(lambda: dispatcher.dispatch_async(hidden[a:b], Routing(routing.topk_ids[a:b],
                                                                              routing.topk_weights[a:b])))

    bounds = split_tokens(hidden.shape[0], parts)
    dispatches = [dispatch(0)] + [None] * (parts - 1)
    shared = attempt(lambda: shared_experts(hidden)) if shared_experts is not None else None
    combines = [None] * parts
    for i in range(parts):
        arrived = attempt(dispatches[i].wait) if dispatches[i] is not None else None
        if arrived is not None:
            batch, handle = arrived
            expert_out = attempt(lambda: experts(batch))
            if expert_out is None:
                expert_out = failed_output(batch, dispatcher.plan.dtype)
        if i + 1 < parts:
            dispatches[i + 1] = dispatch(i + 1)
        if arrived is not None:
            combines[i] = attempt(lambda: dispatcher.combine_async(expert_out, handle))
    outs = [attempt(c.wait) if c is not None else None for c in combines]
    if errors:
        raise errors[0]
    out = outs[0] if parts == 1 else torch.cat(outs)
    return out if shared is None else out + shared
