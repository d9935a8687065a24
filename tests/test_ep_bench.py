"""`epmoe bench dispatch` on 2 Gloo ranks with tiny shapes: the plumbing (ranks, stats, the NCCL-style
baseline timed the same way, the default configuration beside the best, balanced routing, the JSON with
its provenance), not the numbers (those come from GPUs; the timing rules are in test_bench_timing.py)."""
import json

from epmoe.cli import main as cli_main


def test_bench_dispatch_writes_a_report(tmp_path, capsys):
    out = tmp_path / "dispatch.json"
    rc = cli_main(["bench", "dispatch", "--ranks", "2", "--comm", "gloo", "--hidden", "64", "--experts", "8",
                   "--top-k", "4", "--tokens", "4,16", "--reps", "2", "--warmup", "1", "--output", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    env = report["environment"]
    assert env["world_size"] == 2 and env["torch"] and env["command"] and len(env["source_sha256"]) == 64
    assert report["params"]["routing"] == "balanced"
    rows = {(r["dispatcher"], r["config"], r["tokens_per_rank"]): r for r in report["rows"]}
    assert set(rows) == {(d, "best", t) for d in ("allgather", "alltoall", "low_latency") for t in (4, 16)} | {
        ("alltoall", "default", t) for t in (4, 16)}          # "auto" on CPU ranks resolves to alltoall
    for r in rows.values():
        assert "error" not in r, r
        assert r["total_ms"] > 0 and r["nccl_total_ms"] > 0 and r["total_vs_nccl"] > 0
        assert len(r["per_rank"]) == 2 and r["total_ms"] == max(r["total_ms_per_rank"])
        assert r["method"] == r["nccl_method"] == "wall-clock" and r["paired"]
        # balanced routing: both ranks' experts receive T * k pairs
        assert r["pairs_per_rank"] == [r["tokens_per_rank"] * 4] * 2
    for t in (4, 16):
        best, default = rows[("alltoall", "best", t)], rows[("alltoall", "default", t)]
        assert default["requested"] == "auto" and default["capacity"] is None
        assert default["vs_best"] == default["total_ms"] / best["total_ms"]
        assert rows[("low_latency", "best", t)]["capacity"] == t
        # best: the bounded alltoall (capacity T), a fixed region of T rows to every rank
        assert best["capacity"] == t and all(r["rows_sent_per_rank"] == [t, t] for r in best["per_rank"])
    a2a, ag = rows[("alltoall", "default", 16)], rows[("allgather", "best", 16)]
    # the unbounded alltoall moves the (token, peer) pairs plus a few bytes of routing per row; allgather
    # every token
    assert a2a["ideal_bytes_to_peers"] <= a2a["dispatch_bytes_to_peers"] <= 1.5 * a2a["ideal_bytes_to_peers"] + 1
    assert a2a["combine_bytes_to_peers"] == a2a["ideal_bytes_to_peers"]
    assert ag["dispatch_bytes_to_peers"] >= a2a["dispatch_bytes_to_peers"]
    printed = capsys.readouterr().out
    assert "alltoall" in printed and "default" in printed and "vs best" in printed


def test_bench_dispatch_refuses_a_routing_it_cannot_balance(capsys):
    assert cli_main(["bench", "dispatch", "--ranks", "3", "--comm", "gloo", "--hidden", "64", "--experts", "8"]) == 2
    assert "--routing balanced: balanced routing: 8 experts do not split evenly over 3 ranks" in capsys.readouterr().err
    assert cli_main(["bench", "dispatch", "--routing", "skewed", "--zipf-exponent", "-1"]) == 2
    assert "--zipf-exponent must be >= 0" in capsys.readouterr().err


def test_bench_dispatch_on_one_rank_says_auto_has_nothing_to_time(tmp_path):
    out = tmp_path / "one.json"
    assert cli_main(["bench", "dispatch", "--ranks", "1", "--comm", "gloo", "--hidden", "64", "--experts", "8",
                     "--top-k", "2", "--tokens", "4", "--reps", "1", "--warmup", "0", "--dispatchers", "alltoall",
                     "--output", str(out)]) == 0
    best, default = json.loads(out.read_text())["rows"]
    assert best["dispatcher"] == "alltoall" and best["total_ms"] > 0 and best["pairs_per_rank"] == [8]
    assert default["dispatcher"] == "local" and "nothing crosses the wire" in default["skipped"]
