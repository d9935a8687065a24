"""benchmarks/gpu_two_h200.sh --cpu-smoke: the two-GPU script's fair part run on two Gloo ranks with tiny
shapes (its commands, what they write, the bundle), and its CUDA-only parts said to be skipped."""
import json
import os
import subprocess
import sys
import tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_script_runs_the_fair_benchmarks_and_writes_them_whole(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = dict(os.environ, OUT=str(out), WORK=str(work), PARTS="fair symm", PYTHON=sys.executable)
    res = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_two_h200.sh"), "--cpu-smoke"], env=env,
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "symm: skipped in --cpu-smoke (CUDA only)" in res.stdout and "steps failed: 0" in res.stdout
    names = {"dispatch_bf16.json", "dispatch_fp8.json", "layer_2x_bf16.json", "layer_2x_fp8_deepseek.json",
             "layer_2x_eplb_skewed.json"}
    assert names | {"results.tar.gz", "summary.txt"} == set(os.listdir(out))
    commands = (work / "results" / "commands.txt").read_text().splitlines()
    assert len(commands) == 5 and all(" -m epmoe bench " in c for c in commands)
    for name in names:
        report = json.loads((out / name).read_text())
        env = report["environment"]
        assert env["command"] and len(env["source_sha256"]) == 64 and env["backend"] == "gloo"
        assert env["commit"] or not os.path.exists(os.path.join(ROOT, ".git"))   # a checkout names its commit
    fp8 = json.loads((out / "dispatch_fp8.json").read_text())["rows"]
    # allgather cannot send FP8 rows: listed with the reason, not an error
    assert [r["dispatcher"] for r in fp8 if "skipped" in r] == ["allgather"]
    assert all("error" not in r for r in fp8) and any(r["config"] == "default" for r in fp8)
    layer = json.loads((out / "layer_2x_bf16.json").read_text())["rows"]
    assert all(r["pairs_balanced"] for r in layer if r["kind"] == "ep")
    # one micro-batch and two, each against the one-rank baseline
    assert sorted(r["micro_batches"] for r in layer if r["kind"] == "ep") == [1, 2]
    assert all(r["speedup_vs_local"] for r in layer if r["kind"] == "ep")
    eplb = json.loads((out / "layer_2x_eplb_skewed.json").read_text())["rows"]
    assert [(r["routing"], r["eplb"]) for r in eplb] == [("skewed", "before"), ("skewed", "after rebalance")]
    # the summary sets the rebalanced step time beside the balanced one of the layer run
    summary = (out / "summary.txt").read_text()
    assert "after / balanced" in summary and "balanced -;" not in summary, summary
    with tarfile.open(out / "results.tar.gz") as tar:
        members = set(tar.getnames())
    assert {f"results/fair/{n}" for n in names} | {"results/commands.txt", "results/env.txt"} <= members
