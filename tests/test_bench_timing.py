"""The benchmarks' timing rules, on CPU ranks with a simulated GPU clock: every rank sleeps the same before
each run (so no rank's time includes waiting inside a collective for a peer that started later), a row's
time is its slower rank's, and NCCL is replayed as a CUDA graph exactly where the dispatcher was."""
import pytest
import torch
import torch.distributed as dist

from epmoe.bench import dispatch as bench_dispatch
from epmoe.bench.gpu_timing import EAGER, GRAPH, Timer, sleep_ms_for
from epmoe.testing import run_on_ranks

COLLECTIVE_MS = 0.3     # what the simulated collective costs once every rank has reached it


class FakeEvent:
    def __init__(self, clock):
        self.clock, self.t = clock, None

    def record(self):
        self.t = self.clock.now
        self.clock.log.append("mark")

    def elapsed_time(self, end):
        return end.t - self.t


class FakeGpuClock:
    """A GPU timeline per rank: `now` (ms) advances by the sleeps and by the steps' work; events read it.
    The host takes `host_ms` to queue a run; `capture(steps)` says whether those steps can be captured."""

    eager_method = EAGER

    def __init__(self, host_ms, capture=lambda steps: True):
        self.now, self.host, self.host_ms = 0.0, 0.0, host_ms
        self.capture_ok, self.captured, self.sleeps, self.log = capture, [], [], []

    def host_now(self):
        self.host += self.host_ms / 1e3          # seconds; read before and after queueing one run
        return self.host

    def sleep_for(self, host_ms):
        return sleep_ms_for(host_ms)

    def synchronize(self):
        pass

    def flush(self):
        self.log.append("flush")

    def sleep(self, ms):
        self.sleeps.append(ms)
        self.log.append("sleep")
        self.now += ms

    def event(self):
        return FakeEvent(self)

    def capture(self, steps):
        ok = self.capture_ok(steps)
        self.captured.append(ok)
        if not ok:
            return None

        class Graph:
            def __init__(self, step):
                self.step = step

            def replay(self):
                self.step(None) if self.step is not steps[0] else self.step()
        return [Graph(s) for s in steps]


class FakeRankClock(bench_dispatch.RankClock):
    """Lining the ranks up aligns their simulated GPU timelines (what the all-reduce does on GPUs)."""

    def line_up(self):
        self.timer.clock.now = _max_over_ranks(self.timer.clock.now)
        self.timer.clock.log.append("line_up")


def _max_over_ranks(v):
    t = torch.tensor([v], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _collective(clock):
    """A simulated collective: it ends COLLECTIVE_MS after the last rank reaches it."""
    def step(*_):
        clock.now = _max_over_ranks(clock.now) + COLLECTIVE_MS
    return step


def _time_collective(rank, ws, agree: bool):
    clock = FakeGpuClock(host_ms=0.5 if rank == 0 else 3.0)          # rank 1's host queues slower
    rc = FakeRankClock(torch.device("cpu"), dist.group.WORLD, timer=Timer(clock))
    step = _collective(clock)
    t = rc.timer.time(step, reps=4, warmup=1, use_graph=False, before_each=rc.line_up,
                      agree=rc.agree if agree else None)
    return {"timing": t.as_dict(), "sleeps": clock.sleeps, "log": clock.log}


def test_every_rank_sleeps_the_same_and_no_rank_measures_waiting():
    fair, unfair = [run_on_ranks(_time_collective, 2, agree, backend="gloo", timeout_s=60) for agree in (True, False)]
    longest = sleep_ms_for(3.0)
    for r in fair:                       # one sleep, the longest any rank asked for; the collective alone
        assert set(r["sleeps"]) == {longest} and r["timing"]["sleep_ms"] == longest
        assert r["timing"]["median_ms"] == pytest.approx(COLLECTIVE_MS)
        # each repeat: ranks lined up, L2 flushed, the sleep, then the timed run between its two marks
        assert r["log"] == ["line_up", "flush", "sleep", "mark", "mark"] * 5
    # each rank sizing its own sleep: rank 0 starts earlier and its time includes the wait for rank 1
    assert unfair[0]["timing"]["median_ms"] == pytest.approx(COLLECTIVE_MS + sleep_ms_for(3.0) - sleep_ms_for(0.5))
    assert unfair[1]["timing"]["median_ms"] == pytest.approx(COLLECTIVE_MS)


def test_each_timed_repeat_is_kept_in_the_order_it_ran():
    """The warm-ups are left out; the repeats come back in order, so a slow drift (a clock falling under
    sustained load) shows beside the median."""
    clock = FakeGpuClock(host_ms=0.1)
    runs = []

    def step():
        runs.append(len(runs))
        clock.now += 1.0 + 0.1 * len(runs)      # each run a little slower than the one before
    t = Timer(clock).time(step, reps=4, warmup=2, use_graph=False)
    # one untimed call compiles, one measures the host's queueing, two warm up, four are timed
    assert len(runs) == 8
    assert t.times_ms == pytest.approx((1.5, 1.6, 1.7, 1.8))
    assert t.median_ms == pytest.approx(1.65) and t.as_dict()["times_ms"] == pytest.approx([1.5, 1.6, 1.7, 1.8])


def test_settling_runs_the_steps_back_to_back_before_the_warm_ups():
    """`Timer.settle_ms`: the steps run (each waited for, no flush, no sleep) until that much host time has
    passed, then the warm-ups and the timed repeats as before; the Timing says how long it settled. Ranks
    timed together are refused: each would settle for its own number of runs."""
    clock = FakeGpuClock(host_ms=0.1)
    runs = []

    def step():
        runs.append(clock.log.count("mark"))
        clock.now += 1.0
    t = Timer(clock, settle_ms=1.0).time(step, reps=4, warmup=2, use_graph=False)
    # one call compiles, one measures the host's queueing; settling: 0.1 ms of host time per check, 10 runs
    assert len(runs) == 2 + 10 + 2 + 4 and t.settle_ms == pytest.approx(1.0)
    assert clock.log[:2] == ["flush", "sleep"] and t.times_ms == pytest.approx((1.0,) * 4)
    assert Timer(FakeGpuClock(host_ms=0.1)).time(step, reps=1, warmup=0, use_graph=False).settle_ms == 0.0

    class Agreement:
        def all(self, ok):
            return ok
    before = len(runs)
    with pytest.raises(ValueError, match="cannot settle"):
        Timer(FakeGpuClock(host_ms=0.1), settle_ms=1.0).time(step, reps=1, warmup=0, agree=Agreement())
    assert len(runs) == before          # refused before any step ran (no compile, no capture)
    for bad in (float("inf"), float("nan")):     # would settle forever / not at all
        with pytest.raises(ValueError, match="finite"):
            Timer(FakeGpuClock(host_ms=0.1), settle_ms=bad).time(step, reps=1, warmup=0, use_graph=False)


def _dispatch_steps(clock, host_sync):
    def dispatch():
        clock.now += 0.2
        return "batch"

    def combine(batch):
        assert batch in ("batch", None)         # None: a graph replay, the static output is implied
        clock.now += 0.1
    for f in (dispatch, combine):
        f.host_sync, f.dispatcher = host_sync, True
    return dispatch, combine


CAPTURE = {
    "all": lambda steps: not getattr(steps[0], "host_sync", False),
    "dispatcher_only": lambda steps: getattr(steps[0], "dispatcher", False),
}


def _paired(rank, ws, host_sync, policy):
    clock = FakeGpuClock(host_ms=1.0, capture=CAPTURE[policy])
    rc = bench_dispatch.RankClock(torch.device("cpu"), dist.group.WORLD, timer=Timer(clock))
    first, second = _dispatch_steps(clock, host_sync)
    res = bench_dispatch.time_with_twin(rc, first, second, [64] * ws, [32] * ws, reps=3, warmup=1, use_graph=True)
    return {k: v["method"] for k, v in res.items()} | {"captured": clock.captured,
                                                        "dispatch_ms": res["dispatch"]["median_ms"]}


@pytest.mark.parametrize("host_sync, policy, dispatcher, nccl, attempts", [
    (False, "all", GRAPH, GRAPH, [True, True]),             # replayed dispatcher: NCCL replayed too
    (True, "all", EAGER, EAGER, [False]),                   # eager dispatcher: NCCL eager, never captured
    (False, "dispatcher_only", GRAPH, EAGER, [True, False]),  # NCCL capture failed: reported, unpaired
])
def test_nccl_is_timed_the_way_the_dispatcher_was(host_sync, policy, dispatcher, nccl, attempts):
    for r in run_on_ranks(_paired, 2, host_sync, policy, backend="gloo", timeout_s=60):
        assert r["dispatch"] == r["combine"] == r["total"] == dispatcher
        assert r["nccl_dispatch"] == r["nccl_combine"] == r["nccl_total"] == nccl
        assert r["captured"] == attempts and r["dispatch_ms"] == pytest.approx(0.2)


def _rank_row(rank, scale, method=GRAPH, nccl_method=GRAPH, sleep=0.25):
    t = lambda ms, m=method: {"median_ms": ms * scale, "min_ms": ms, "max_ms": ms, "reps": 3, "method": m,  # noqa: E731
                              "sleep_ms": sleep}
    n = lambda ms: t(ms, nccl_method)  # noqa: E731
    return {"dispatcher": "symm_high_throughput", "config": "best", "requested": "symm_high_throughput",
            "capacity": 64, "tokens_per_rank": 64, "dispatch": t(0.2), "combine": t(0.3), "total": t(0.5),
            "nccl_dispatch": n(0.25), "nccl_combine": n(0.25), "nccl_total": n(0.5),
            "dispatch_bytes_to_peers": 1_000_000 * (1 + rank), "combine_bytes_to_peers": 2_000_000,
            "ideal_bytes_to_peers": 900_000, "pairs_to_rank": [3, 5] if rank == 0 else [5, 3]}


def test_rows_use_the_slower_rank():
    rows = [_rank_row(0, 1.0), _rank_row(1, 1.5)]
    m = bench_dispatch.merge_ranks(rows)
    assert m["dispatch_ms"] == pytest.approx(0.3) and m["dispatch_ms_per_rank"] == pytest.approx([0.2, 0.3])
    assert m["nccl_combine_ms"] == pytest.approx(0.375)
    assert m["dispatch_vs_nccl"] == pytest.approx(0.3 / 0.375) and m["total_vs_nccl"] == pytest.approx(1.0)
    assert m["dispatch_GBps_to_peers"] == pytest.approx(2e6 / 0.3e-3 / 1e9)
    assert m["nccl_dispatch_GBps_to_peers"] == pytest.approx(2e6 / 0.375e-3 / 1e9)
    assert m["paired"] and m["method"] == m["nccl_method"] == GRAPH
    assert m["sleep_ms_per_rank"] == {"dispatcher": [0.25, 0.25], "nccl": [0.25, 0.25]}
    assert m["pairs_per_rank"] == [8, 8]
    unpaired = bench_dispatch.merge_ranks([_rank_row(0, 1.0, nccl_method=EAGER), _rank_row(1, 1.0)])
    assert not unpaired["paired"]


def test_default_rows_are_compared_with_the_best():
    best = [[_rank_row(r, 1.0)] for r in range(2)]
    default = [[dict(_rank_row(r, 2.0, method=EAGER, nccl_method=EAGER), config="default", requested="auto",
                     capacity=None)] for r in range(2)]
    rows = bench_dispatch.merge([b + d for b, d in zip(best, default)])
    assert [r["config"] for r in rows] == ["best", "default"]
    assert rows[1]["vs_best"] == pytest.approx(2.0) and rows[1]["best_total_ms"] == pytest.approx(0.5)
    assert "vs_best" not in rows[0]
    assert bench_dispatch.plan_rows(["a", "b"], [1, 2], True) == [
        ("a", "best", 1), ("a", "best", 2), ("b", "best", 1), ("b", "best", 2), ("auto", "default", 1),
        ("auto", "default", 2)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_gpu_clock_replays_graphs_and_falls_back_to_eager():
    from epmoe.bench.gpu_timing import GpuTimer
    timer = GpuTimer()
    a = torch.randn(1024, 1024, device="cuda")
    first, second = (lambda: a @ a), (lambda b: b @ a)
    d, c, both = timer.time_split(first, second, reps=5, warmup=2)
    assert d.method == c.method == both.method == GRAPH and d.sleep_ms >= 0.1
    assert 0 < d.median_ms and both.median_ms >= max(d.median_ms, c.median_ms)
    # a host read: no graph. Its capture fails, which leaves torch's CUDA random generator marked as
    # capturing unless the timer recovers: run it in a child so that a failure here cannot break the
    # random ops of every later test in this process
    import subprocess
    import sys
    child = """
import torch
from epmoe.bench.gpu_timing import EAGER, GpuTimer
a = torch.randn(256, 256, device="cuda")
synced = GpuTimer().time(lambda: (a @ a).sum().item(), reps=5, warmup=2)
assert synced.method == EAGER and synced.median_ms > 0, synced
torch.randn(4, device="cuda")     # the generator is usable again after the failed capture
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-4000:]
