"""Timing GPU work reproducibly: CUDA events, median over repeats after warm-up, the L2
cache flushed before each run, and the GPU kept busy while the run is queued so that Python launch time
does not leak into the number (optionally the run is a CUDA graph replay as well).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

L2_FLUSH_BYTES = 512 << 20      # several times any current L2 (H100 50 MB, H200 60 MB)


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    reps: int
    method: str                 # "graph" or "eager"

    def as_dict(self) -> dict:
        return {"median_ms": self.median_ms, "min_ms": self.min_ms, "max_ms": self.max_ms, "reps": self.reps,
                "method": self.method}


class GpuTimer:
    """Reusable timer: one flush buffer, and the sleep length calibrated to this GPU's clock."""

    def __init__(self, device=None):
        self.device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
        self.flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=self.device)
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

    def time(self, fn: Callable[[], object], reps: int = 20, warmup: int = 5, use_graph: bool = True,
             before_each: Callable[[], object] | None = None) -> Timing:
        """Median time of `fn()` in ms. `before_each` (untimed) can refresh the inputs in place.

        With `use_graph`, fn is captured once in a CUDA graph and the replays are timed; if capture fails
        (fn syncs with the host), fn runs eagerly behind a GPU sleep long enough to cover its launches.
        """
        fn()                                      # compile / allocate outside the timed region
        torch.cuda.synchronize()
        graph = None
        if use_graph:
            try:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    fn()
                graph.replay()
                torch.cuda.synchronize()
            except Exception:                     # a host sync inside fn: time it eagerly
                graph = None
                torch.cuda.synchronize()
        run = graph.replay if graph is not None else fn
        # how long the host takes to queue one run: the sleep must outlast it
        t0 = time.perf_counter()
        run()
        host_ms = (time.perf_counter() - t0) * 1e3
        torch.cuda.synchronize()
        sleep_cycles = int(self.cycles_per_ms * min(max(2.0 * host_ms + 0.05, 0.1), 20.0))
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(warmup + reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(warmup + reps)]
        for i in range(warmup + reps):
            if before_each is not None:
                before_each()
            self.flush.zero_()
            torch.cuda._sleep(sleep_cycles)
            starts[i].record()
            run()
            ends[i].record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in zip(starts[warmup:], ends[warmup:])]
        del graph
        return Timing(statistics.median(times), min(times), max(times), reps, "graph" if run is not fn else "eager")


    def time_split(self, first: Callable[[], object], second: Callable[[object], object], reps: int = 20,
                   warmup: int = 5, use_graph: bool = True, before_each: Callable[[], object] | None = None
                   ) -> tuple[Timing, Timing]:
        """Median times of `a = first()` and of `second(a)` run back to back, each timed by its own events
        inside every repeat (what a dispatch and its combine cost inside one forward, when the second
        consumes what the first produced and neither can be repeated alone).

        With `use_graph`, each is captured in its own CUDA graph (the second on the first's static output)
        and the replays are timed; if capture fails, both run eagerly behind a GPU sleep.
        """
        second(first())
        torch.cuda.synchronize()
        run_a, run_b = first, None
        method = "eager"
        if use_graph:
            try:
                ga, gb = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
                with torch.cuda.graph(ga):
                    static = first()
                with torch.cuda.graph(gb):
                    second(static)
                ga.replay()
                gb.replay()
                torch.cuda.synchronize()
                run_a, run_b, method = ga.replay, (lambda _a: gb.replay()), "graph"
            except Exception:                     # a host sync inside: time it eagerly
                torch.cuda.synchronize()
                run_a, run_b = first, None
        run_b = run_b or second
        t0 = time.perf_counter()
        run_b(run_a())
        host_ms = (time.perf_counter() - t0) * 1e3
        torch.cuda.synchronize()
        sleep_cycles = int(self.cycles_per_ms * min(max(2.0 * host_ms + 0.05, 0.1), 20.0))
        marks = [[torch.cuda.Event(enable_timing=True) for _ in range(3)] for _ in range(warmup + reps)]
        for i in range(warmup + reps):
            if before_each is not None:
                before_each()
            self.flush.zero_()
            torch.cuda._sleep(sleep_cycles)
            marks[i][0].record()
            a = run_a()
            marks[i][1].record()
            run_b(a)
            marks[i][2].record()
        torch.cuda.synchronize()
        ta = [m[0].elapsed_time(m[1]) for m in marks[warmup:]]
        tb = [m[1].elapsed_time(m[2]) for m in marks[warmup:]]
        return (Timing(statistics.median(ta), min(ta), max(ta), reps, method),
                Timing(statistics.median(tb), min(tb), max(tb), reps, method))


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
