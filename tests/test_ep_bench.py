"""`epmoe bench dispatch` on 2 Gloo ranks with tiny shapes: the plumbing (ranks, stats, NCCL-style
baseline, JSON), not the numbers (those come from GPUs, benchmarks/gpu_ep_check.py)."""
import json

from epmoe.cli import main as cli_main


def test_bench_dispatch_writes_a_report(tmp_path, capsys):
    out = tmp_path / "dispatch.json"
    rc = cli_main(["bench", "dispatch", "--ranks", "2", "--comm", "gloo", "--hidden", "64", "--experts", "8",
                   "--top-k", "3", "--tokens", "4,16", "--reps", "2", "--warmup", "1", "--output", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["environment"]["world_size"] == 2 and report["environment"]["torch"]
    rows = {(r["dispatcher"], r["tokens_per_rank"]): r for r in report["rows"]}
    assert set(rows) == {(d, t) for d in ("allgather", "alltoall", "low_latency") for t in (4, 16)}
    for r in rows.values():
        assert "error" not in r, r
        assert r["total_ms"] > 0 and r["nccl_total_ms"] > 0 and r["total_vs_nccl"] > 0
        assert len(r["per_rank"]) == 2
    a2a, ag = rows[("alltoall", 16)], rows[("allgather", 16)]
    # alltoall moves the (token, peer) pairs plus a few bytes of routing per row; allgather every token
    assert a2a["ideal_bytes_to_peers"] <= a2a["dispatch_bytes_to_peers"] <= 1.5 * a2a["ideal_bytes_to_peers"] + 1
    assert a2a["combine_bytes_to_peers"] == a2a["ideal_bytes_to_peers"]
    assert ag["dispatch_bytes_to_peers"] >= a2a["dispatch_bytes_to_peers"]
    assert "alltoall" in capsys.readouterr().out
