"""Timing work reproducibly: one timing loop for every clock, median over repeats after warm-up.

On a GPU (`CudaClock`): CUDA events, the L2 cache flushed before each run, and the GPU kept busy by a
sleep while the host queues the run, so that Python launch time does not leak into the number; a run
can be a CUDA graph replay. On CPU ranks (`WallClock`): the host's wall clock, no flush, no sleep, no
graphs. Tests drive the same loop with a clock of their own.

Ranks of a group timed together must run alike, or the timing measures the ranks' skew instead of the
work: a rank whose run starts later makes its peer wait inside the collective, and the peer's time
includes that wait. `GroupAgreement` settles, before any timed run, the one sleep every rank uses (the
longest any rank needs to queue its run) and whether every rank captured its CUDA graph (all replay or
none does); the caller's `before_each` lines the ranks up before each run.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

L2_FLUSH_BYTES = 512 << 20      # several times any current L2 (H100 50 MB, H200 60 MB)
GRAPH, EAGER, WALL_CLOCK = "graph", "eager", "wall-clock"


def sleep_ms_for(host_ms: float) -> float:
    """The GPU sleep ahead of each run: twice the host's time to queue one run, within [0.1, 20] ms."""
    return min(max(2.0 * host_ms + 0.05, 0.1), 20.0)


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    reps: int
    method: str                 # GRAPH, EAGER or WALL_CLOCK
    sleep_ms: float = 0.0       # the sleep ahead of each run (the same on every rank of an agreement)
    # every timed repeat in the order it ran (after the warm-ups): a drift from first to last is the GPU's
    # clock falling under sustained load, which the median alone hides
    times_ms: tuple[float, ...] = ()
    settle_ms: float = 0.0      # how long the steps ran back to back before the warm-ups (`Timer.settle_ms`)

    def as_dict(self) -> dict:
        return {"median_ms": self.median_ms, "min_ms": self.min_ms, "max_ms": self.max_ms, "reps": self.reps,
                "method": self.method, "sleep_ms": self.sleep_ms, "times_ms": [round(t, 6) for t in self.times_ms],
                "settle_ms": self.settle_ms}


# ------------------------------------------------------------------------------------------- clocks
class CudaClock:
    """CUDA events on the current stream; a flush buffer; the sleep calibrated to this GPU's clock."""

    eager_method = EAGER

    def __init__(self, device=None):
        self.device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
        self.flush_buffer = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=self.device)
        self.cycles_per_ms = self._calibrate_sleep()

    def _calibrate_sleep(self) -> float:
        torch.cuda._sleep(1000)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        cycles = 2_000_000
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        return cycles / max(start.elapsed_time(end), 1e-3)

    def host_now(self) -> float:
        return time.perf_counter()

    def sleep_for(self, host_ms: float) -> float:
        return sleep_ms_for(host_ms)

    def synchronize(self) -> None:
        torch.cuda.synchronize()

    def flush(self) -> None:
        self.flush_buffer.zero_()

    def sleep(self, ms: float) -> None:
        torch.cuda._sleep(int(self.cycles_per_ms * ms))

    def event(self):
        return torch.cuda.Event(enable_timing=True)

    def capture(self, steps: Sequence[Callable]) -> list | None:
        """Each step in its own CUDA graph (a step on the previous one's static output); the graphs, or
        None where capture fails (a step syncs with the host)."""
        graphs, out = [], None
        try:
            for i, step in enumerate(steps):
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    out = step() if i == 0 else step(out)
                graphs.append(g)
            for g in graphs:
                g.replay()
            torch.cuda.synchronize()
        except Exception:
            from ..testing.graphs import recover_from_failed_capture
            del graphs
            recover_from_failed_capture()
            return None
        return graphs


class _WallEvent:
    def __init__(self):
        self.t = 0.0

    def record(self) -> None:
        self.t = time.perf_counter()

    def elapsed_time(self, end: "_WallEvent") -> float:
        return (end.t - self.t) * 1e3


class WallClock:
    """The host's wall clock (CPU work runs as it is called): no flush, no sleep, no graphs."""

    eager_method = WALL_CLOCK

    def host_now(self) -> float:
        return time.perf_counter()

    def sleep_for(self, host_ms: float) -> float:
        return 0.0                               # the host runs the work as it queues it: nothing to cover

    def synchronize(self) -> None:
        """Nothing to wait for: CPU work is done when its call returns."""

    def flush(self) -> None:
        """No cache to clear between runs on the host."""

    def sleep(self, ms: float) -> None:
        """No queue to hold back: `sleep_for` asks for none."""

    def event(self) -> _WallEvent:
        return _WallEvent()

    def capture(self, steps) -> None:
        return None


# ------------------------------------------------------------------------------------ the agreement
class GroupAgreement:
    """What the ranks of a group settle before timing, each answer the same on every rank: the sleep
    (the longest any rank asks for) and whether CUDA graphs are used (only if every rank captured); and
    `line_up()`, the ranks lined up before a run."""

    def __init__(self, group, device):
        self.group, self.device = group, torch.device(device)
        self.one = torch.ones(1, device=self.device)

    def line_up(self) -> None:
        """On GPUs an all-reduce of one element lines the ranks' streams up (no host sync): the work queued
        after it starts when every rank got there. On CPUs a barrier lines the hosts up."""
        import torch.distributed as dist
        if self.device.type == "cuda":
            dist.all_reduce(self.one, group=self.group)
        else:
            dist.barrier(group=self.group)

    def _reduce(self, value: float, op) -> float:
        import torch.distributed as dist
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op, group=self.group)
        return float(t.item())

    def sleep_ms(self, ms: float) -> float:
        import torch.distributed as dist
        return self._reduce(ms, dist.ReduceOp.MAX)

    def all(self, ok: bool) -> bool:
        import torch.distributed as dist
        return self._reduce(1.0 if ok else 0.0, dist.ReduceOp.MIN) > 0.5


# ------------------------------------------------------------------------------------------ the loop
def _summary(times: list[float], reps: int, method: str, sleep_ms: float, settle_ms: float = 0.0) -> Timing:
    return Timing(statistics.median(times), min(times), max(times), reps, method, sleep_ms, tuple(times), settle_ms)


class Timer:
    """The timing loop on a clock. Before each repeat (untimed): `before_each()` (fresh inputs, lining the
    ranks up), the L2 flush and the agreed sleep; then the run, timed by the clock's events.

    `settle_ms` (0: none): before the warm-ups, the steps run back to back (each waited for) until that much
    host time has passed. A GPU at its power limit lowers its clock within tens of milliseconds of sustained
    work and raises it again when idle, so without this an entry timed right after a pause (the first of a
    point, one after a slow host step) runs at a higher clock than the entry timed after it; settled, every
    entry is timed in the state its own sustained work brings the GPU to."""

    def __init__(self, clock, settle_ms: float = 0.0):
        self.clock = clock
        self.settle_ms = settle_ms

    def _settle(self, chain, runs) -> float:
        """`chain(runs)` over and over, each run waited for, until `settle_ms` of host time; the time it took."""
        if not math.isfinite(self.settle_ms):     # inf would never end; NaN would end at once, silently
            raise ValueError(f"Timer.settle_ms must be finite, got {self.settle_ms}")
        if self.settle_ms <= 0:
            return 0.0
        clock = self.clock
        t0 = clock.host_now()
        while True:
            chain(runs)
            clock.synchronize()
            elapsed_ms = (clock.host_now() - t0) * 1e3
            if elapsed_ms >= self.settle_ms:
                return elapsed_ms

    def time_chain(self, steps: Sequence[Callable], reps: int = 20, warmup: int = 5, use_graph: bool = True,
                   before_each: Callable[[], Any] | None = None, agree: GroupAgreement | None = None
                   ) -> list[Timing]:
        """Times of each step of `a = steps[0](); b = steps[1](a); ...` run back to back inside every
        repeat, each between its own events, then the time of the whole chain: len(steps) + 1 Timings.
        (What a dispatch and its combine cost inside one forward, when the second consumes what the first
        produced and neither can be repeated alone.)

        With `use_graph`, each step is captured in its own CUDA graph (a step on the previous one's static
        output) and the replays are timed; where capture fails on any rank of `agree`, every rank runs
        the steps eagerly behind the sleep. `agree` also makes every rank use the same sleep.
        """
        if self.settle_ms > 0 and agree is not None:
            # each rank would settle for its own number of runs, and collectives inside the steps would not pair up
            raise ValueError("Timer.settle_ms is for one process; ranks timed together cannot settle")
        clock = self.clock

        def chain(runs):
            out = None
            for i, run in enumerate(runs):
                out = run() if i == 0 else run(out)
            return out

        chain(steps)                             # compile / allocate outside the timed region
        clock.synchronize()
        graphs = clock.capture(steps) if use_graph else None
        if use_graph and agree is not None and not agree.all(graphs is not None):
            graphs = None                        # a rank could not capture: all run eagerly
        if graphs is not None:
            runs = [lambda *_, g=g: g.replay() for g in graphs]
            method = GRAPH
        else:
            runs, method = list(steps), clock.eager_method
        t0 = clock.host_now()                    # how long the host takes to queue one run
        chain(runs)
        host_ms = (clock.host_now() - t0) * 1e3
        clock.synchronize()
        settled_ms = self._settle(chain, runs)
        sleep_ms = clock.sleep_for(host_ms)
        if agree is not None:
            sleep_ms = agree.sleep_ms(sleep_ms)
        n = len(runs)
        marks = [[clock.event() for _ in range(n + 1)] for _ in range(warmup + reps)]
        for i in range(warmup + reps):
            if before_each is not None:
                before_each()
            clock.flush()
            clock.sleep(sleep_ms)
            marks[i][0].record()
            out = None
            for j, run in enumerate(runs):
                out = run() if j == 0 else run(out)
                marks[i][j + 1].record()
        clock.synchronize()
        timed = marks[warmup:]
        per_step = [[m[j].elapsed_time(m[j + 1]) for m in timed] for j in range(n)]
        whole = [m[0].elapsed_time(m[n]) for m in timed]
        del graphs
        return [_summary(t, reps, method, sleep_ms, settled_ms) for t in per_step] + \
            [_summary(whole, reps, method, sleep_ms, settled_ms)]

    def time(self, fn: Callable[[], object], reps: int = 20, warmup: int = 5, use_graph: bool = True,
             before_each: Callable[[], object] | None = None, agree: GroupAgreement | None = None) -> Timing:
        """Median time of `fn()` in ms. `before_each` (untimed) can refresh the inputs in place.

        With `use_graph`, fn is captured once in a CUDA graph and the replays are timed; if capture fails
        (fn syncs with the host), fn runs eagerly behind a GPU sleep long enough to cover its launches.
        """
        return self.time_chain([fn], reps, warmup, use_graph, before_each, agree)[0]

    def time_split(self, first: Callable[[], object], second: Callable[[object], object], reps: int = 20,
                   warmup: int = 5, use_graph: bool = True, before_each: Callable[[], object] | None = None,
                   agree: GroupAgreement | None = None) -> tuple[Timing, Timing, Timing]:
        """Times of `a = first()`, of `second(a)` and of both, inside every repeat (`time_chain`)."""
        a, b, both = self.time_chain([first, second], reps, warmup, use_graph, before_each, agree)
        return a, b, both


class GpuTimer(Timer):
    """The timing loop on this GPU's clock (one flush buffer, the sleep calibrated to its clock)."""

    def __init__(self, device=None):
        super().__init__(CudaClock(device))
        self.device = self.clock.device


def measure_copy_bandwidth(timer: GpuTimer, nbytes: int = 2 << 30) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written."""
    a = torch.empty(nbytes // 2, dtype=torch.uint8, device=timer.device)
    b = torch.empty_like(a)
    a.random_(0, 255)
    t = timer.time(lambda: b.copy_(a), reps=10, warmup=3, use_graph=False)
    del a, b
    return 2 * (nbytes // 2) / (t.median_ms * 1e-3)


def measure_matmul_rate(timer: GpuTimer, dtype: torch.dtype = torch.bfloat16, n: int = 8192) -> float:
    """Dense n^3 matrix product rate in FLOP/s on random data (bf16 matmul, or FP8 torch._scaled_mm)."""
    g = torch.Generator(device=timer.device).manual_seed(0)
    a = torch.randn(n, n, device=timer.device, generator=g)
    b = torch.randn(n, n, device=timer.device, generator=g)
    if dtype == torch.float8_e4m3fn:
        a8, b8 = a.to(dtype), b.to(dtype).t()          # _scaled_mm wants the second operand column-major
        one = torch.ones((), device=timer.device)
        fn = lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    else:
        a, b = a.to(dtype), b.to(dtype)
        fn = lambda: a @ b
    t = timer.time(fn, reps=10, warmup=3, use_graph=False)
    return 2 * n ** 3 / (t.median_ms * 1e-3)
