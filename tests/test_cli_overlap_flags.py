"""`--micro-batches` and `--comm-sms` of `epmoe run` and `epmoe bench layer`: they reach the layer (two Gloo
CPU ranks, checked against the oracle, recorded in the JSON), and a dispatcher that cannot take them (fewer
than two forwards in flight, transfers it cannot bound) is refused by the launching process with the
contract's reason (exit code 2, so no rank started: a rank's failure is exit code 1)."""
import json

import pytest

from epmoe import contract, register_dispatcher
from epmoe.cli import main
from epmoe.dispatch.low_latency import LowLatencyDispatcher
from epmoe.registry import unregister

ONE_IN_FLIGHT, BOUNDED = "_test_one_in_flight", "_test_bounded_sms"
TINY = ["--device", "cpu", "--ranks", "2", "--experts", "8", "--shrink", "64", "--reps", "2", "--warmup", "1",
        "--presets", "qwen3-30b-a3b", "--tokens", "8"]


class _OneInFlight(LowLatencyDispatcher):
    """The low_latency algorithm declaring one forward in flight: two micro-batches are refused."""

    CAPS = contract.DispatcherCaps(layout="batched", communicates=True, cuda_graph_safe=True, needs_max_tokens=True,
                                   in_flight=1, summary="test backend: one forward in flight")


class _BoundedSms(LowLatencyDispatcher):
    """The low_latency algorithm declaring bounded transfer SMs (it launches none on the CPU): --comm-sms is
    taken and reaches the plan."""

    CAPS = contract.DispatcherCaps(layout="batched", communicates=True, cuda_graph_safe=True, needs_max_tokens=True,
                                   in_flight=2, bounded_sms=True, summary="test backend: bounded SMs")


@pytest.fixture
def registered():
    register_dispatcher(ONE_IN_FLIGHT)(_OneInFlight)
    register_dispatcher(BOUNDED)(_BoundedSms)
    try:
        yield
    finally:
        unregister(ONE_IN_FLIGHT)
        unregister(BOUNDED)


def test_run_takes_two_micro_batches_and_records_them(tmp_path, capsys):
    report = tmp_path / "r.json"
    assert main(["run", "--micro-batches", "2", "--tokens", "17", "--iters", "1", "--warmup", "0",
                 "--json", str(report)]) == 0
    assert "micro-batches 2, comm SMs unbounded" in capsys.readouterr().out
    ranks = json.loads(report.read_text())["ranks"]
    assert [(r["micro_batches"], r["comm_sms"]) for r in ranks] == [(2, None)] * 2
    assert all(r["rel_err"] <= r["bound"] for r in ranks)


@pytest.mark.parametrize("argv, message", [
    (["--comm-sms", "8"], "--comm-sms 8 with --dispatcher alltoall: comm_sms=8 bounds the SMs of transfer kernels"),
    (["--comm-sms", "0"], "--comm-sms must be >= 1"),
    (["--dispatcher", ONE_IN_FLIGHT, "--micro-batches", "2"],
     f"--micro-batches 2 with --dispatcher {ONE_IN_FLIGHT}: micro_batches=2 keeps 2 forwards in flight at once, "
     f"dispatcher '{ONE_IN_FLIGHT}' declares 1; use --dispatcher allgather or alltoall or low_latency"),
    (["--model", "nowhere", "--micro-batches", "2"], "act on preset layers"),
])
def test_run_refuses_what_the_dispatcher_cannot_take(registered, argv, message, capsys):
    assert main(["run", "--tokens", "8", "--iters", "1", *argv]) == 2
    assert message in capsys.readouterr().err


def test_run_passes_comm_sms_to_a_dispatcher_that_bounds_them(registered, tmp_path):
    report = tmp_path / "r.json"
    assert main(["run", "--dispatcher", BOUNDED, "--comm-sms", "3", "--micro-batches", "2", "--tokens", "8",
                 "--iters", "1", "--warmup", "0", "--json", str(report)]) == 0
    ranks = json.loads(report.read_text())["ranks"]
    assert [(r["dispatcher"], r["micro_batches"], r["comm_sms"]) for r in ranks] == [(BOUNDED, 2, 3)] * 2


def test_bench_layer_measures_one_and_two_micro_batches_against_the_same_baseline(tmp_path, capsys):
    out = tmp_path / "l.json"
    assert main(["bench", "layer", *TINY, "--dispatchers", "alltoall", "--micro-batches", "1,2",
                 "--output", str(out)]) == 0
    assert " mb " in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["params"]["micro_batches"] == [1, 2] and report["params"]["comm_sms"] is None
    ep = [r for r in report["rows"] if r["kind"] == "ep"]
    assert [r["micro_batches"] for r in ep] == [1, 2]
    for r in ep:
        assert r["check"]["ok"] and r["pairs_balanced"] and r["local_ms_all_tokens"] is not None, r
    assert all(r["micro_batches"] == 1 for r in report["rows"] if r["kind"] == "local")


def test_bench_layer_checks_the_overlap_flags_before_any_rank_starts(registered, tmp_path, capsys):
    assert main(["bench", "layer", *TINY, "--dispatchers", "alltoall", "--comm-sms", "4"]) == 2
    assert "--comm-sms 4 with --dispatcher alltoall" in capsys.readouterr().err
    assert main(["bench", "layer", *TINY, "--dispatchers", ONE_IN_FLIGHT, "--micro-batches", "1,2"]) == 2
    assert f"dispatcher '{ONE_IN_FLIGHT}' declares 1" in capsys.readouterr().err
    for bad in ("3", "1,1", "two"):
        assert main(["bench", "layer", *TINY, "--micro-batches", bad]) == 2
        assert "--micro-batches takes 1, 2 or 1,2" in capsys.readouterr().err
    # the default list leaves out what cannot take the settings, and says so; what can is measured with them
    out = tmp_path / "l.json"
    assert main(["bench", "layer", *TINY, "--no-local", "--micro-batches", "2", "--comm-sms", "4",
                 "--output", str(out)]) == 0
    assert f"note: {ONE_IN_FLIGHT} is not measured" in capsys.readouterr().err
    rows = json.loads(out.read_text())["rows"]
    assert [(r["dispatcher"], r["micro_batches"], r["comm_sms"]) for r in rows] == [(BOUNDED, 2, 4)]
    assert rows[0]["check"]["ok"]


def test_run_records_no_comm_sms_where_nothing_is_bounded(tmp_path, capsys):
    """One rank (`local`): no transfer kernel to bound, so --comm-sms is taken (as the contract takes it)
    and the run records and prints what applied: nothing."""
    report = tmp_path / "r.json"
    assert main(["run", "--ranks", "1", "--comm-sms", "4", "--tokens", "5", "--iters", "1", "--warmup", "0",
                 "--json", str(report)]) == 0
    assert "comm SMs unbounded (--comm-sms 4: dispatcher local has no transfer kernels" in capsys.readouterr().out
    ranks = json.loads(report.read_text())["ranks"]
    assert [(r["dispatcher"], r["comm_sms"]) for r in ranks] == [("local", None)]
