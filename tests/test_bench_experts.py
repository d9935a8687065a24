"""`epmoe bench experts`: its command line (help, argument errors), the CPU dry run (shrunk shards, the
CPU backends and the BF16 library anchor on the same rows, each checked against the oracle; CPU times
are not results) and, on a GPU, the three library anchors beside `triton` on a small shard."""
import json
import shutil

import pytest
import torch

from epmoe.bench import expert_anchors
from epmoe.bench import experts as bench_experts
from epmoe.bench.experts import SETTLE_MIN_TOKENS
from epmoe.cli import main as cli_main

SMALL = ["--presets", "qwen3-30b-a3b", "--experts", "16", "--tokens", "5", "--routings", "balanced",
         "--reps", "1", "--warmup", "0", "--no-plot"]


def test_help_names_the_shard_and_anchor_flags(capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["bench", "experts", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--experts", "--anchors", "--dry-run", "--formats"):
        assert flag in out


@pytest.mark.parametrize("bad,flag", [(["--experts", "4"], "--experts"),        # below qwen3's top-k of 8
                                      (["--experts", "999"], "--experts"),      # more than the preset has
                                      (["--anchors", "cublas"], "--anchors"),
                                      (["--formats", "int4"], "--formats"),
                                      (["--tokens", "0"], "--tokens"),
                                      (["--routings", "zipf"], "--routings"),
                                      (["--batched-capacity", "0"], "--batched-capacity"),
                                      (["--batched-capacity", "tight,big"], "--batched-capacity")])
def test_argument_errors_name_the_flag(bad, flag, capsys):
    argv = ["bench", "experts", "--dry-run", "--presets", "qwen3-30b-a3b"] + bad
    assert cli_main(argv) == 2
    assert flag in capsys.readouterr().err


def test_dry_run_times_backends_beside_the_anchor_on_the_same_rows(tmp_path, capsys, monkeypatch):
    path = tmp_path / "experts.json"
    monkeypatch.setenv("EPMOE_COMMIT", "0123abc")        # a copy of the tree names its commit so
    assert cli_main(["bench", "experts", "--dry-run", *SMALL, "--formats", "bf16", "--output", str(path)]) == 0
    data = json.loads(path.read_text())
    env = data["environment"]
    assert env["dry_run"] and data["ceilings"] == {}
    # the provenance every benchmark records (`run_env.provenance`), under the field names it always had
    assert (env["commit"], env["commit_from"]) == ("0123abc", "EPMOE_COMMIT") and len(env["source_sha256"]) == 64
    assert env["command"] and env["when"] and env["date"] and env["torch"] and env["triton"]
    rows = data["results"]
    anchors = {r["backend"]: r for r in rows if r.get("anchor")}
    assert set(anchors) == set(expert_anchors.ANCHORS)
    bf16 = anchors[expert_anchors.GROUPED_BF16]
    assert bf16["ms"] > 0 and bf16["check_rel_err"] < 1e-2 and bf16["experts"] == 16 and bf16["top_k"] == 8
    for name in (expert_anchors.GROUPED_FP8_ROWWISE, expert_anchors.DENSE_FP8_BLOCK):
        assert anchors[name]["error"].startswith("unavailable") and "ms" not in anchors[name]
    backends = [r for r in rows if not r.get("anchor")]
    assert {r["backend"] for r in backends} >= {"grouped_mm", "batched"}
    for r in backends:
        assert r["check_rel_err"] < 1e-2 and r["experts_hit"] <= 16
        assert set(r["vs_anchors"]) == {expert_anchors.GROUPED_BF16}
        assert r["vs_anchors"][expert_anchors.GROUPED_BF16] == pytest.approx(bf16["ms"] / r["ms"])
        assert r["gpu_state"] is None                   # no sampler on the CPU
    out = capsys.readouterr().out
    assert "qwen3-30b-a3b E=16 T=5 balanced: torch._grouped_mm" in out


def test_batched_rows_run_at_each_capacity_asked_with_nan_padding(tmp_path, capsys):
    """`--batched-capacity tight,C`: a batched row on the tightest layout and one on [E, C, H] (as low_latency
    gives it), their padding rows NaN, each checked against the oracle; a point whose largest count is above C is
    a refused row, not a time."""
    path = tmp_path / "experts.json"
    argv = ["bench", "experts", "--dry-run", "--presets", "qwen3-30b-a3b", "--experts", "16", "--tokens", "3,40",
            "--routings", "onehot", "--formats", "bf16", "--backends", "batched", "--anchors", "none",
            "--reps", "1", "--warmup", "0", "--no-plot", "--batched-capacity", "tight,24", "--output", str(path)]
    assert cli_main(argv) == 0
    rows = {(r["T"], r["capacity"]): r for r in json.loads(path.read_text())["results"]}
    assert set(rows) == {(3, 3), (3, 24), (40, 40), (40, 24)}        # onehot: the largest count is T
    for key in ((3, 3), (3, 24), (40, 40)):
        assert rows[key]["ms"] > 0 and rows[key]["check_rel_err"] < 1e-2
    assert "ms" not in rows[40, 24] and "below the largest count 40" in rows[40, 24]["error"]
    out = capsys.readouterr().out
    assert "batched C=24" in out and "batched C=3 " in out
    assert "batched C=24/bf16" in out and "batched/bf16" in out        # the summary tells the capacities apart


def test_batched_inputs_pad_with_nan_past_each_count():
    x = torch.arange(12.0).view(6, 2)
    ids = torch.tensor([[0, 2], [0, 1], [2, 0]])
    xb, counts = bench_experts._batched_inputs(x[:3], ids, 3, capacity=4)
    assert counts.tolist() == [3, 1, 2] and xb.shape == (3, 4, 2)
    assert torch.equal(xb[0, :3], x[:3]) and torch.equal(xb[1, 0], x[1]) and torch.equal(xb[2, :2], x[[0, 2]])
    for e, n in enumerate(counts.tolist()):
        assert xb[e, n:].isnan().all()
    with pytest.raises(ValueError, match="below the largest count 3"):
        bench_experts._batched_inputs(x[:3], ids, 3, capacity=2)
    assert bench_experts._batched_inputs(x[:3], ids, 3)[0].shape == (3, 3, 2)   # default: the tightest


def test_dry_run_settles_each_entry_before_timing_it(tmp_path):
    """`--settle-ms`: every backend and anchor runs back to back for that long before its warm-ups; each row
    records how long it settled, the method says so, and a negative value is an argument error."""
    path = tmp_path / "experts.json"
    assert cli_main(["bench", "experts", "--dry-run", *SMALL, "--formats", "bf16", "--settle-ms", "20",
                     "--output", str(path)]) == 0
    data = json.loads(path.read_text())
    timed = [r for r in data["results"] if "timing" in r]
    assert timed and all(r["timing"]["settle_ms"] >= 20 for r in timed)
    assert "--settle-ms" in data["method"] and data["args"]["settle_ms"] == 20
    for bad in ("-1", "inf", "nan"):          # inf would settle forever
        assert cli_main(["bench", "experts", "--dry-run", *SMALL, "--settle-ms", bad]) == 2
    # by default the dry run does not settle (a GPU does at prefill-sized points: below and the GPU test)
    assert cli_main(["bench", "experts", "--dry-run", *SMALL, "--formats", "bf16", "--output", str(path)]) == 0
    data = json.loads(path.read_text())
    assert data["args"]["settle_ms"] is None and "--settle-ms" not in data["method"]
    assert data["settle"] == {"given_ms": None, "default_ms": 0.0, "default_min_tokens": SETTLE_MIN_TOKENS}
    timed = [r for r in data["results"] if "timing" in r]
    assert timed and all(r["timing"]["settle_ms"] == 0 for r in timed)


def test_each_point_is_settled_as_its_token_count_says(tmp_path, monkeypatch):
    """The benchmark asks `settle_ms_for` at every point and times that point's anchors and backends with it
    (here a rule that settles T >= 64 only: the rows at T = 5 unsettled, those at T = 64 settled)."""
    monkeypatch.setattr(bench_experts, "settle_ms_for", lambda given, T, dry: 3.0 if T >= 64 else 0.0)
    path = tmp_path / "experts.json"
    argv = [a if a != "5" else "5,64" for a in SMALL]
    assert cli_main(["bench", "experts", "--dry-run", *argv, "--formats", "bf16", "--output", str(path)]) == 0
    timed = [r for r in json.loads(path.read_text())["results"] if "timing" in r]
    assert {r["T"] for r in timed} == {5, 64} and any(r.get("anchor") for r in timed if r["T"] == 64)
    for r in timed:
        assert (r["timing"]["settle_ms"] >= 3.0) == (r["T"] == 64), (r["backend"], r["T"])


def test_default_settling_is_for_prefill_sized_points_on_a_gpu():
    """--settle-ms not given: GPU_SETTLE_MS on a GPU at T >= SETTLE_MIN_TOKENS, none below it nor in the dry
    run; given (0 included): that, at every point."""
    from epmoe.bench.experts import GPU_SETTLE_MS, SETTLE_MIN_TOKENS, settle_ms_for
    assert settle_ms_for(None, SETTLE_MIN_TOKENS, dry=False) == GPU_SETTLE_MS > 0
    assert settle_ms_for(None, 8192, dry=False) == GPU_SETTLE_MS
    assert settle_ms_for(None, SETTLE_MIN_TOKENS - 1, dry=False) == 0
    assert settle_ms_for(None, 8192, dry=True) == 0
    assert settle_ms_for(0.0, 8192, dry=False) == 0 and settle_ms_for(20.0, 1, dry=True) == 20


def test_combine_weights_each_tokens_slots():
    """The anchors' check: rows in expert order back to their pairs, weighted and summed per token."""
    ids = torch.tensor([[1, 0], [0, 1], [1, 0]])
    tw = torch.tensor([[0.25, 0.75], [0.5, 0.5], [1.0, 0.0]])
    y_pairs = torch.arange(6, dtype=torch.float32).unsqueeze(1) + 1.0      # pair p has value p + 1
    order = torch.argsort(ids.reshape(-1), stable=True)
    out = expert_anchors.combine(y_pairs[order], order, tw, torch.tensor([0, 2]))
    assert out.reshape(-1).tolist() == [0.25 * 1 + 0.75 * 2, 1.0 * 5]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_anchors_beside_triton(tmp_path):
    path = tmp_path / "experts.json"
    rc = cli_main(["bench", "experts", "--presets", "qwen3-30b-a3b", "--experts", "16", "--tokens", "16,1024",
                   "--routings", "balanced", "--formats", "bf16,fp8_block", "--backends", "triton", "--reps", "2",
                   "--warmup", "1", "--no-plot", "--output", str(path)])
    assert rc == 0
    data = json.loads(path.read_text())
    rows = data["results"]
    anchors = {r["backend"]: r for r in rows if r.get("anchor") and r["T"] == 1024}
    assert set(anchors) == set(expert_anchors.ANCHORS)
    # on a GPU every entry of a prefill-sized point is timed settled by default, anchors and backends alike
    timed = [r for r in rows if "timing" in r]
    assert {r["T"] for r in timed} == {16, 1024}
    for r in timed:
        assert (r["timing"]["settle_ms"] >= bench_experts.GPU_SETTLE_MS) == (r["T"] >= bench_experts.SETTLE_MIN_TOKENS)
    for name, r in anchors.items():
        assert r.get("ms", 0) > 0, (name, r.get("error"))
        assert r["check_rel_err"] < (3e-2 if r["format"].startswith("fp8") else 1e-2), name
    assert anchors[expert_anchors.DENSE_FP8_BLOCK]["gemms_ms"] > 0
    for r in (r for r in rows if r["backend"] == "triton"):
        # the dense block-FP8 anchor bounds prefill only: not at T = 16 (8 rows per expert)
        want = set(expert_anchors.ANCHORS) - ({expert_anchors.DENSE_FP8_BLOCK} if r["T"] == 16 else set())
        assert set(r["vs_anchors"]) == want, r["T"]
        g = r["gpu_state"]                              # nvidia-smi's clocks while it was timed
        if shutil.which("nvidia-smi"):
            assert g is not None and g["samples"] >= 1 and 0 < g["sm_mhz_min"] <= g["sm_mhz_max"], g


def test_provenance_names_the_commit_of_this_checkout_only(monkeypatch, tmp_path):
    """git's HEAD where epmoe's folder is a checkout of its own; None inside another repository's tree or
    outside any (a copy must then be named by EPMOE_COMMIT)."""
    import os
    import subprocess

    from epmoe.bench import run_env
    monkeypatch.delenv("EPMOE_COMMIT", raising=False)
    root = run_env.CHECKOUT
    if not os.path.exists(os.path.join(root, ".git")):
        pytest.skip("not run from a git checkout")
    head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert (run_env.provenance()["commit"], run_env.provenance()["commit_from"]) == (head, "git")
    for elsewhere in (os.path.join(root, "epmoe"), str(tmp_path)):    # inside the repository; in none
        monkeypatch.setattr(run_env, "CHECKOUT", elsewhere)
        p = run_env.provenance()
        assert p["commit"] is None and p["commit_from"] is None and p["tracked_files_modified"] is None


def test_a_probes_results_carry_its_environment_and_provenance(monkeypatch, tmp_path, capsys):
    """`write_probe_results`: the GPU's name, versions, date and commit ahead of the probe's own fields, on
    stdout as one JSON line and in the file beside the points."""
    import json

    from epmoe.bench import run_env
    monkeypatch.setenv("EPMOE_COMMIT", "abc123")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    path = tmp_path / "probe.json"
    meta = run_env.write_probe_results(str(path), torch.device("cpu"), [{"us": 6.1}], same=True)
    written = json.loads(path.read_text())
    assert written == {"meta": meta, "points": [{"us": 6.1}]}
    assert meta["gpu"] == "NVIDIA H100 80GB HBM3" and meta["same"] is True and meta["commit"] == "abc123"
    assert meta["torch"] == torch.__version__ and meta["date"].startswith("20") and "source_sha256" in meta
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == meta
    assert run_env.write_probe_results(None, torch.device("cpu"), [], same=False)["same"] is False


def test_a_rows_line_shows_the_drift_of_its_repeats_and_the_clocks_it_has(capsys):
    """The last quarter of the repeats against the first (a GPU at its power limit drifts), and the clock
    record with a power reading the driver could not give left out rather than failing the print."""
    from epmoe.bench.experts import _print_row, repeat_drift
    assert repeat_drift([1.0] * 7) is None
    assert repeat_drift([1.0, 1.0, 1.1, 1.2, 1.2, 1.3, 1.5, 1.5]) == pytest.approx(0.5)
    row = dict(preset="mixtral-8x7b", experts=8, format="fp8_block", T=8192, routing="balanced", backend="triton",
               ms=6.0, tflops=1000.0, hit_weight_gbps=250.0, check_rel_err=4e-3,
               timing={"method": "graph", "times_ms": [5.6] * 5 + [6.0] * 10 + [6.2] * 5},
               gpu_state={"sm_mhz_min": 1440.0, "sm_mhz_max": 1980.0, "power_w_max": None,
                          "clock_event_reasons": ["sw_power_cap"]})
    _print_row(row)
    out = capsys.readouterr().out
    assert "drift +11%" in out and "sm 1440-1980 MHz sw_power_cap" in out and " W" not in out.split("MHz")[1]
