"""Overlap on CPU ranks (Gloo): the communication stream's order of operations, and two micro-batches.

- The communication stream (`epmoe.dispatch.streams`) with a recording stand-in for CUDA's streams and
  events, every torch call and collective logged with the stream it was issued on: an exchange waits for
  the event the caller passes (or one recorded on the caller's stream), every op of it (the collective
  included) is issued on the communication stream, its event is recorded after them, and the caller's
  stream waits for that event only in `wait()`, after the work the caller issued meanwhile; inputs are
  kept alive on the communication stream, outputs on the stream that waits; a host check the exchange
  leaves runs at `wait()`, in the communication stream's order.
- `MoELayer(micro_batches=2)` on 2 and 3 ranks for every dispatcher that moves tokens on the CPU: equal to
  the one-batch forward and to the oracle, with a rank of no tokens, T = 1, every token on one expert and
  a hidden size of 20; the exchanges go A, B, A, B, the shared experts run under the first dispatch.
- A failure in one micro-batch: one rank's experts raise in micro-batch A (that rank raises, its peers get
  NaN exactly in A's tokens routed there and the right values elsewhere), one rank's input is refused
  (every rank raises); the next forward is correct on every rank.
- Ranks building a layer with different micro-batch counts are refused; the README's overlap snippets run
  as written.
"""
from __future__ import annotations

import contextlib
import pathlib
import re

import pytest
import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from epmoe import MoEConfig, MoELayer, RankMismatch, contract, make_dispatcher, reference_moe
from epmoe.dispatch.streams import CommStream, StreamOps
from epmoe.routing import route
from epmoe.testing import assert_close, load_experts, random_experts, random_inputs, run_on_ranks

CFG = dict(num_experts=8, top_k=3, hidden_size=20, intermediate_size=16, dtype=torch.float32)
M = 9          # capacity where a dispatcher needs one


def moving_dispatchers() -> list[str]:
    return [n for n, cls in contract.DISPATCHERS.items()
            if cls.CAPS.communicates and contract.dispatcher_problem(n, None, 2, "cpu") is None]


# ------------------------------------------------------------------------- a recording stream stand-in
class _Stream:
    def __init__(self, name: str):
        self.name = name


class _Event:
    def __init__(self, number: int):
        self.number = number


class RecordingStreams(StreamOps):
    """CUDA's stream operations as entries of `log`: ("record", stream, event), ("wait", stream, event),
    ("keep", stream); the caller's stream is "main", the communication stream "comm"."""

    def __init__(self, log: list):
        super().__init__(torch.device("cpu"))
        self.log, self.stack, self.events = log, [_Stream("main")], 0

    def current(self):
        return self.stack[-1]

    def new_stream(self):
        return _Stream("comm")

    def record(self, stream):
        self.events += 1
        self.log.append(("record", stream.name, self.events))
        return _Event(self.events)

    def wait(self, stream, event) -> None:
        self.log.append(("wait", stream.name, event.number))

    @contextlib.contextmanager
    def use(self, stream):
        self.stack.append(stream)
        try:
            yield
        finally:
            self.stack.pop()

    def keep(self, tensor, stream) -> None:
        self.log.append(("keep", stream.name))


class OpLog(TorchFunctionMode):
    """Every torch call that makes a new tensor, and every collective, as ("op", the stream it was issued on,
    its name) in the streams' log."""

    COLLECTIVES = ("all_to_all_single", "all_gather_single", "all_gather_into_tensor", "reduce_scatter_single",
                   "reduce_scatter_tensor")

    def __init__(self, streams: RecordingStreams):
        super().__init__()
        self.streams = streams

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and not any(out is a for a in args):
            self.streams.log.append(("op", self.streams.current().name, getattr(func, "__name__", str(func))))
        return out

    def __enter__(self):
        self.saved = {n: getattr(dist, n) for n in self.COLLECTIVES if hasattr(dist, n)}
        for name, fn in self.saved.items():
            setattr(dist, name, self._logged(name, fn))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(dist, name, fn)
        return super().__exit__(*exc)

    def _logged(self, name, fn):
        def collective(*args, **kwargs):
            self.streams.log.append(("op", self.streams.current().name, f"c10d.{name}"))
            return fn(*args, **kwargs)
        return collective


def _inputs(cfg, rank: int, T: int, seed: int = 0):
    g = torch.Generator().manual_seed(100 * seed + rank)
    x = torch.randn(T, cfg.hidden_size, generator=g)
    ids = torch.stack([torch.randperm(cfg.num_experts, generator=g)[:cfg.top_k] for _ in range(T)]).to(torch.int32)
    return x, ids, torch.rand(T, cfg.top_k, generator=g)


def _stream_worker(rank, world, name):
    cfg = MoEConfig(**CFG)
    d = make_dispatcher(name, cfg, group=dist.group.WORLD, max_tokens_per_rank=M)
    d.use_comm_stream = True        # the mechanism, also where the default runs in order (host_sync plans)
    x, ids, w = _inputs(cfg, rank, 6)
    log: list = []
    streams = RecordingStreams(log)
    d.comm_stream = CommStream(streams)
    with OpLog(streams):
        log.append(("mark", "dispatch_async"))
        after = streams.record(streams.current())
        pending = d.dispatch_async(x, ids, w, after=after)
        log.append(("mark", "shared"))
        shared = x * 2.0
        log.append(("mark", "wait"))
        batch, handle = pending.wait()
        log.append(("mark", "experts"))
        y = batch.x * (batch.weights * (batch.local_ids >= 0)).sum(1, keepdim=True) if hasattr(batch, "local_ids") \
            else batch.x.clone()
        log.append(("mark", "combine_async"))
        combined = d.combine_async(y, handle)
        log.append(("mark", "combine wait"))
        out = combined.wait()
    assert_close(out, x.double() * w.double().sum(1, keepdim=True), 1e-6)
    assert shared.shape == x.shape
    assert pending.overlaps and combined.overlaps
    return {"log": log, "dispatch event": pending.event.number, "combine event": combined.event.number,
            "handle": (handle.stream.name, handle.done.number)}


def _segments(log: list) -> dict:
    out, name = {}, None
    for entry in log:
        if entry[0] == "mark":
            name = entry[1]
            out[name] = []
        else:
            out[name].append(entry)
    return out


@pytest.mark.parametrize("name", moving_dispatchers())
def test_exchanges_run_on_the_communication_stream_ordered_by_events(name):
    for report in run_on_ranks(_stream_worker, 2, name, timeout_s=90):
        seg = _segments(report["log"])
        d_event, c_event = report["dispatch event"], report["combine event"]
        # dispatch: the caller's event first, then every op on the communication stream, then its event
        first = seg["dispatch_async"]
        assert first[:2] == [("record", "main", 1), ("wait", "comm", 1)], first[:3]
        ops = [e for e in first if e[0] == "op"]
        assert ops and {e[1] for e in ops} == {"comm"}, ops
        assert any("c10d." in e[2] for e in ops), ops
        last_op = max(i for i, e in enumerate(first) if e[0] == "op")
        assert first.index(("record", "comm", d_event)) > last_op
        assert first.count(("keep", "comm")) >= 3          # hidden, ids, weights
        assert report["handle"] == ("comm", d_event)
        # the caller's work meanwhile stays on its stream; it waits for the dispatch only in wait()
        assert {e[1] for e in seg["shared"] if e[0] == "op"} == {"main"}
        assert seg["wait"][0] == ("wait", "main", d_event)
        assert {e[:2] for e in seg["wait"][1:]} == {("keep", "main")}
        assert {e[1] for e in seg["experts"] if e[0] == "op"} == {"main"}
        # combine: waits for what the caller's stream queued (the experts), runs on the communication stream
        comb = seg["combine_async"]
        assert comb[0][:2] == ("record", "main") and comb[1] == ("wait", "comm", comb[0][2])
        ops = [e for e in comb if e[0] == "op"]
        assert {e[1] for e in ops} == {"comm"} and any("c10d." in e[2] for e in ops), ops
        assert comb.index(("record", "comm", c_event)) > max(i for i, e in enumerate(comb) if e[0] == "op")
        assert seg["combine wait"][0] == ("wait", "main", c_event)
        assert not [e for e in seg["combine wait"] if e[0] == "op" and e[1] == "comm"]


def _default_stream_worker(rank, world):
    cfg = MoEConfig(**CFG)
    return {capacity: make_dispatcher("alltoall", cfg, group=dist.group.WORLD,
                                      max_tokens_per_rank=capacity).use_comm_stream for capacity in (None, M)}


def test_plans_that_read_sizes_on_the_host_run_in_order_by_default():
    """Where the host waits inside the exchange anyway (unbounded alltoall reads its counts), a side stream
    hides nothing: the default is in order; with a capacity (no host read) the communication stream."""
    for report in run_on_ranks(_default_stream_worker, 2, timeout_s=90):
        assert report == {None: False, M: True}, report


def test_without_a_communication_stream_exchanges_run_in_order_and_refuse_an_event():
    cfg = MoEConfig(**CFG)
    d = make_dispatcher("local", cfg)
    x, ids, w = _inputs(cfg, 0, 3)
    assert d.comm_stream is None
    pending = d.dispatch_async(x, ids, w)
    assert pending.event is None and not pending.overlaps
    with pytest.raises(ValueError, match="after= orders CUDA streams"):
        d.dispatch_async(x, ids, w, after=object())


def test_a_host_check_the_exchange_leaves_runs_at_wait_in_the_streams_order():
    """The symmetric-memory dispatchers' status read (a host sync) is put off to `wait()`: issuing the
    combine queues it, waiting for it runs it, on the communication stream, after the caller's stream was
    made to wait; `then` (the padded-hidden slice) keeps it for `wait()`."""
    from epmoe.dispatch.base import Pending
    from epmoe.dispatch.local import LocalDispatcher

    log: list = []
    streams = RecordingStreams(log)

    class Checked(LocalDispatcher):
        def _start_combine(self, expert_out, handle):
            return Pending([], lambda: expert_out * 1.0, check=lambda: log.append(("check", streams.current().name)))

    cfg = MoEConfig(**CFG)
    d = Checked(contract.build_plan("local", None, cfg, 1, "cpu"), make_dispatcher("local", cfg).placement,
                device=torch.device("cpu"))
    d.comm_stream = CommStream(streams)
    x, ids, w = _inputs(cfg, 0, 4)
    batch, handle = d.dispatch(x, ids, w)
    log.clear()
    pending = d.combine_async(batch.x, handle)
    assert not [e for e in log if e[0] == "check"]
    out = pending.wait()
    assert log[-2:] == [("keep", "main"), ("check", "comm")] and ("wait", "main", pending.event.number) in log
    assert torch.equal(out, x)
    calls = []
    chained = Pending([], lambda: 1, check=lambda: calls.append("check")).then(lambda v: v + 1)
    assert chained.queued_result() == 2 and calls == []
    assert chained.wait() == 2 and chained.wait() == 2 and calls == ["check"]


# ------------------------------------------------------------------------------- two micro-batches
def _tokens(rank: int) -> int:
    return [5, 0, 1][rank % 3]


def _forward_cases(cfg, rank):
    """(name, hidden, logits): random routing, and every token's first choice on expert 0."""
    x, logits = random_inputs(cfg, _tokens(rank), seed=rank)
    hot = logits.clone()
    hot[:, 0] = 50.0
    return [("random", x, logits), ("one expert", x, hot)]


def _micro_worker(rank, world, names):
    cfg = MoEConfig(**CFG)
    experts = random_experts(cfg, seed=7)
    shared_w = torch.randn(cfg.hidden_size, cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    for name in names:
        cap = M if contract.needs_capacity(name) else None
        one = MoELayer(cfg, ep_group=dist.group.WORLD, dispatcher=name, max_tokens_per_rank=cap)
        two = MoELayer(cfg, ep_group=dist.group.WORLD, dispatcher=name, max_tokens_per_rank=cap, micro_batches=2)
        assert two.plan.micro_batches == 2
        for layer in (one, two):
            load_experts(layer, experts)
        calls = []
        d = two.dispatcher
        dispatch_async, combine_async = d.dispatch_async, d.combine_async
        d.dispatch_async = lambda x, r, **kw: (calls.append(("dispatch", x.shape[0])), dispatch_async(x, r, **kw))[1]
        d.combine_async = lambda y, h, **kw: (calls.append(("combine", h.num_tokens)), combine_async(y, h, **kw))[1]

        def shared(h):
            calls.append(("shared", h.shape[0]))
            return h @ shared_w
        for case, x, logits in _forward_cases(cfg, rank):
            calls.clear()
            ref = reference_moe(x, logits, experts, cfg)
            out_one, out_two = one(x, logits), two(x, logits)
            T = x.shape[0]
            a, b = (T + 1) // 2, T // 2
            assert calls == [("dispatch", a), ("dispatch", b), ("combine", a), ("combine", b)], (name, case, calls)
            torch.testing.assert_close(out_two, out_one, rtol=1e-6, atol=1e-6)
            assert_close(out_two, ref, 1e-5, context=f"{name} {case} rank {rank}")
            calls.clear()
            both = two(x, logits, shared_experts=shared)
            assert calls[:2] == [("dispatch", a), ("shared", T)], calls
            assert_close(both, ref + (x @ shared_w).double(), 1e-5)
    return "ok"


@pytest.mark.parametrize("world", [2, 3])
def test_two_micro_batches_equal_one_batch_and_the_oracle(world):
    names = moving_dispatchers()
    assert {"allgather", "alltoall", "low_latency"} <= set(names)
    assert run_on_ranks(_micro_worker, world, names, timeout_s=180) == ["ok"] * world


def test_two_micro_batches_on_one_rank():
    cfg = MoEConfig(**CFG)
    experts = random_experts(cfg, seed=2)
    layer = MoELayer(cfg, micro_batches=2)
    load_experts(layer, experts)
    for T in (0, 1, 4):
        x, logits = random_inputs(cfg, T, seed=T)
        assert_close(layer(x, logits), reference_moe(x, logits, experts, cfg), 1e-5)


def test_micro_batches_are_checked_against_what_the_dispatcher_declares():
    cfg = MoEConfig(**CFG)
    for bad in (0, 3, True, 1.5):
        with pytest.raises(ValueError, match="micro_batches must be 1 or 2"):
            MoELayer(cfg, micro_batches=bad)
    with pytest.raises(ValueError, match="comm_sms must be None or a positive int"):
        MoELayer(cfg, comm_sms=0)
    for name in ("alltoall", "allgather"):       # NCCL/Gloo collectives: their SMs are the process group's
        with pytest.raises(contract.UnsupportedCombination, match="comm_sms=8 bounds the SMs") as info:
            contract.build_plan(name, None, cfg, 2, "cpu", comm_sms=8)
        assert "comm_sms=None" in info.value.alternatives
    # nothing to bound: taken, and what applies is recorded (nothing)
    assert contract.build_plan("local", None, cfg, 1, "cpu", comm_sms=8).comm_sms is None
    assert MoELayer(cfg, dispatcher="local", device="cpu", comm_sms=8).comm_sms is None


# --------------------------------------------------------------------------- a failure in one micro-batch
class _FailingOnce:
    """Experts that raise on their first call (micro-batch A of the first forward), then compute."""

    def __init__(self, experts):
        self.experts, self.calls = experts, 0

    def __call__(self, batch, weights):
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("experts failed on purpose")
        return self.experts(batch, weights)


def _failure_worker(rank, world, name):
    cfg = MoEConfig(**CFG)
    experts = random_experts(cfg, seed=11)
    cap = M if contract.needs_capacity(name) else None
    layer = MoELayer(cfg, ep_group=dist.group.WORLD, dispatcher=name, max_tokens_per_rank=cap, micro_batches=2)
    load_experts(layer, experts)
    report = {}
    # 1. rank 0's experts raise in micro-batch A
    if rank == 0:
        layer.experts = _FailingOnce(layer.experts)
    x, logits = random_inputs(cfg, 6, seed=20 + rank)
    try:
        out = layer(x, logits)
        ref = reference_moe(x, logits, experts, cfg)
        owner = route(logits, cfg).topk_ids.long() // (cfg.num_experts // world)
        lost = torch.zeros(6, dtype=torch.bool)
        lost[:3] = (owner[:3] == 0).any(1)                       # A's tokens that rank 0's experts owed
        assert lost.any() and not lost.all()
        assert torch.isnan(out[lost]).all() and not torch.isnan(out[~lost]).any()
        assert_close(out[~lost], ref[~lost], 1e-5)
        report["experts"] = "NaN where rank 0 owed rows"
    except RuntimeError as exc:
        report["experts"] = str(exc)
    # 2. rank 0's input is refused before dispatch: it takes part in both micro-batches' dispatches, flagged
    x, logits = random_inputs(cfg, 4, seed=30 + rank)
    try:
        layer(x, logits[:, :5] if rank == 0 else logits)
        report["input"] = "no error"
    except (ValueError, RankMismatch) as exc:
        report["input"] = type(exc).__name__
    # 3. the next forwards are aligned and correct
    for seed in (40, 50):
        x, logits = random_inputs(cfg, 3 + rank, seed=seed + rank)
        assert_close(layer(x, logits), reference_moe(x, logits, experts, cfg), 1e-5)
    report["next"] = "ok"
    return report


@pytest.mark.parametrize("name", moving_dispatchers())
def test_a_failure_in_one_micro_batch_and_the_next_forward(name):
    reports = run_on_ranks(_failure_worker, 2, name, timeout_s=120)
    assert reports[0] == {"experts": "experts failed on purpose", "input": "ValueError", "next": "ok"}, reports
    assert reports[1] == {"experts": "NaN where rank 0 owed rows", "input": "RankMismatch", "next": "ok"}, reports


def test_the_readme_overlap_snippets_run():
    """The README's overlap section: the layer with two micro-batches and the engine driving the same
    interleave, as written there (one CPU rank), each checking itself against the oracle."""
    text = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    section = text[text.index("### Overlap"):]
    section = section[:section.index("\n### ")]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2
    scope: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), scope)
    assert scope["out"].shape == (9, 64)


def _disagree_worker(rank, world):
    try:
        MoELayer(MoEConfig(**CFG), ep_group=dist.group.WORLD, dispatcher="alltoall", micro_batches=1 + rank % 2)
        return "built"
    except RankMismatch as exc:
        return str(exc)


def test_ranks_that_split_their_forwards_differently_are_refused_when_built():
    for message in run_on_ranks(_disagree_worker, 2, timeout_s=60):
        assert "micro-batches" in message and "rank 0: 1, rank 1: 2" in message, message
