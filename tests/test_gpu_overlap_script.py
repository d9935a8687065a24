"""benchmarks/gpu_overlap_check.py --cpu-smoke: the overlap check's flow on two Gloo ranks with tiny shapes
(every row measured or skipped with its reason, the checks it records, the environment it writes)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_overlap_check_runs_and_writes_its_rows_whole(tmp_path):
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_overlap_check.py"), "--cpu-smoke",
                          "--ranks", "2", "--tokens", "1,5", "--reps", "1", "--warmup", "0", "--out", str(tmp_path)],
                         env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((tmp_path / "overlap_2x.json").read_text())
    env = report["environment"]
    assert report["smoke"] and env["command"] and len(env["source_sha256"]) == 64 and env["backend"] == "gloo"
    measured = [r for r in report["rows"] if "eager" in r]
    assert {r["dispatcher"] for r in measured} == {"allgather", "alltoall", "low_latency"}
    for row in measured:
        assert len(row["ranks"]) == 2 and "error" not in row
        timing = row["eager"]
        for key in ("routed", "both", "both, in order"):
            for micro in ("1 micro-batch", "2 micro-batches"):
                assert timing[f"{key}, {micro}"]["median_ms"] > 0
        assert row["check"]["oracle_ok"] and row["check"]["two_vs_one_max_abs"] == 0.0
        assert row["check"].get("graph_bit_equal_eager", True)
    assert any("graph_bit_equal_eager" in r["check"] for r in measured)     # low_latency: capturable
    skipped = [r for r in report["rows"] if "skipped" in r]
    assert {r["dispatcher"] for r in skipped} == {"symm_high_throughput", "symm_low_latency"}
    assert all("cuda" in r["skipped"] for r in skipped)
