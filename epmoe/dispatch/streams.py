"""The communication stream: where a dispatcher's exchanges run on a GPU, beside the caller's stream.

`dispatch_async` / `combine_async` issue everything of one exchange (packing, the header, the transfer, the
unpacking) on the communication stream and return at once; the caller's stream keeps computing (the shared
experts, the other micro-batch's experts). The two streams are ordered by CUDA events only:

  - the exchange starts after an event: the one the caller passes (`after=`), else one recorded on the
    caller's stream when it is issued (so it sees the caller's inputs as they are then);
  - an event is recorded after its last work (`Pending.event`); `Pending.wait()` makes the stream that
    waits (the current one then) wait for it before the result is used.

Tensor lifetimes across the two streams: every input is marked as used on the communication stream and
every output as used on the stream that waits (`Tensor.record_stream`), so the caching allocator never
hands their memory to other work before the stream that still reads them is done with it (views of a
symmetric-memory workspace are not the allocator's and are skipped by it).

All exchanges of a group on one device share one communication stream, so they run in the order the host
issued them, as on every rank; the symmetric-memory dispatchers rely on that (their epochs count forwards
in the order the GPU runs them). The stream is created with high priority: the transfer kernels take few
SMs and should not queue behind an experts kernel's blocks.

`StreamOps` is the one place that touches CUDA streams and events; a test passes a recording stand-in to
check the order of operations on CPU.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

import torch

from .base import Handle, Pending


class StreamOps:
    """The CUDA stream and event operations the communication stream uses, on one device."""

    def __init__(self, device: torch.device):
        self.device = device

    def current(self):
        return torch.cuda.current_stream(self.device)

    def new_stream(self):
        return torch.cuda.Stream(self.device, priority=-1)

    def record(self, stream):
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def wait(self, stream, event) -> None:
        stream.wait_event(event)

    def use(self, stream):
        return torch.cuda.stream(stream)

    def keep(self, tensor: torch.Tensor, stream) -> None:
        if tensor.is_cuda:
            tensor.record_stream(stream)


def tensors_in(obj) -> Iterator[torch.Tensor]:
    """The tensors inside a result or an input: tensors, tuples and lists of them, dataclasses (batches,
    handles, routings) one level of fields deep at a time; anything else (a workspace, a header) holds none
    the caller owns."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from tensors_in(item)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from tensors_in(getattr(obj, f.name))


class CommStream:
    """One device's communication stream for the dispatchers of one group (see the module docstring)."""

    def __init__(self, ops: StreamOps):
        self.ops = ops
        self.device = ops.device
        self.stream = ops.new_stream()

    def issue(self, start: Callable[[], Pending], inputs: Any, after=None) -> Pending:
        """Run `start()` (a dispatcher's `_start_dispatch` / `_start_combine`) and its completion on this
        stream after `after` (None: after what the caller's stream has queued so far); return at once a
        `Pending` whose `event` is recorded after the exchange and whose `wait()` makes the waiting stream
        wait for it. A dispatch's handle gets the stream and that event."""
        ops, comm = self.ops, self.stream
        ops.wait(comm, after if after is not None else ops.record(ops.current()))
        with ops.use(comm):
            # queued here, not waited for: a collective's wait() only makes this stream wait for it
            exchange = start()
            result = exchange.queued_result()
            done = ops.record(comm)
        for t in tensors_in(inputs):
            ops.keep(t, comm)
        if isinstance(result, tuple) and result and isinstance(result[-1], Handle):
            result[-1].stream, result[-1].done = comm, done

        def finish():
            consumer = ops.current()
            ops.wait(consumer, done)
            for t in tensors_in(result):
                ops.keep(t, consumer)
            with ops.use(comm):      # a check the exchange left (a host read), in this stream's order
                exchange.wait()
            return result
        return Pending([], finish, overlaps=True, event=done)

    def join(self) -> None:
        """Make the caller's stream wait for everything issued here so far (before a host read of state
        the exchanges write)."""
        self.ops.wait(self.ops.current(), self.ops.record(self.stream))


def comm_stream_for(state, device: torch.device) -> CommStream | None:
    """The communication stream of a group's exchanges on `device` (`GroupState.comm_streams`), created at
    the first dispatcher built there; None off CUDA (exchanges run on the host, in order)."""
    if device is None or device.type != "cuda":
        return None
    if device not in state.comm_streams:
        state.comm_streams[device] = CommStream(StreamOps(device))
    return state.comm_streams[device]
