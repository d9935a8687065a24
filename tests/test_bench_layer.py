"""`epmoe bench layer` on 2 Gloo CPU ranks with tiny shapes (the plumbing: ranks, the local baseline, the
oracle check, the JSON; CPU times are not results), and `epmoe.bench.scaling` on synthetic JSONs."""
import json
import os
import sys

import pytest

from epmoe.bench import layer as bench_layer
from epmoe.bench import scaling
from epmoe.cli import build_parser
from epmoe.cli import main as cli_main

TINY = ["--device", "cpu", "--ranks", "2", "--experts", "8", "--shrink", "64", "--reps", "2", "--warmup", "1"]


@pytest.fixture(scope="module")
def cpu_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("layer") / "layer.json"
    rc = cli_main(["bench", "layer", *TINY, "--tokens", "3,8", "--fp8-dispatch", "--check-rows", "6",
                   "--output", str(out)])
    return rc, out, json.loads(out.read_text())


def test_bench_layer_writes_a_checked_report(cpu_report):
    rc, out, report = cpu_report
    assert rc == 0
    assert not os.path.exists(str(out) + ".partial.jsonl"), "the partial file goes once the run is complete"
    env = report["environment"]
    assert report["benchmark"] == "moe-layer" and env["ranks"] == env["world_size"] == 2
    assert env["backend"] == "gloo" and env["torch"] and "triton" in env and env["date"]
    assert "python" in env["command"] and len(env["source_sha256"]) == 64 and "commit" in env
    assert report["params"]["routing"] == "balanced"
    rows = report["rows"]
    ep = {(r["preset"], r["format"], r["dispatcher"], r["tokens_per_rank"]): r for r in rows if r["kind"] == "ep"}
    local = {(r["preset"], r["format"], r["tokens_per_rank"]): r for r in rows if r["kind"] == "local"}
    presets, dispatchers = ("deepseek-v3", "qwen3-30b-a3b"), ("allgather", "alltoall", "low_latency")
    assert set(ep) == {(p, f, d, t) for p in presets for f in ("bf16", "fp8-dispatch") for d in dispatchers
                       for t in (3, 8)}
    # the one-rank baseline at T and at ranks x T tokens, checked like the rest
    assert set(local) == {(p, f, t) for p in presets for f in ("bf16", "fp8-dispatch") for t in (3, 6, 8, 16)}
    for r in local.values():
        assert r["dispatcher"] == "local" and r["ms"] > 0 and r["check"]["ok"], r
        # each rank ran the one-rank layer on its own T' tokens: T' * k (token, expert) pairs each
        assert r["pairs_per_rank"] == [r["tokens_per_rank"] * r["top_k"]] * 2, r
    assert report["ceilings"] is None        # no GPU: no copy / matmul rates, no floor
    for (p, f, d, t), r in ep.items():
        if f == "fp8-dispatch" and d == "allgather":       # the contract refuses it: listed, not timed
            assert "dispatch_fp8" in r["skipped"] and "ms" not in r
            continue
        assert "error" not in r and "skipped" not in r, r
        c = r["check"]
        assert c["ok"] and c["max_rel_err"] <= c["bound"] and c["rows_checked"] == 2 * min(t, 6), r
        assert c["bound"] == (3e-2 if f == "fp8-dispatch" else 1e-2)
        assert r["experts"] == {"low_latency": "batched" if f == "bf16" else "reference"}.get(
            d, "grouped_mm" if f == "bf16" else "reference")
        assert len(r["per_rank"]) == 2 and r["step_ms"] >= r["ms"] > 0
        assert r["tokens_per_s_per_rank"] == pytest.approx(t / (r["ms"] * 1e-3))
        assert r["tokens_per_s_total"] == pytest.approx(2 * t / (r["step_ms"] * 1e-3))
        assert r["speedup_vs_local"] == pytest.approx(local[(p, f, 2 * t)]["ms"] / r["step_ms"])
        assert r["scaling_efficiency"] == pytest.approx(r["speedup_vs_local"] / 2)
        assert r["ep_vs_local_same_tokens"] == pytest.approx(r["step_ms"] / local[(p, f, t)]["ms"])
        assert r["method"] == "wall-clock"
        # the group's (token, expert) pairs all land on some rank's experts, none twice; balanced routing
        # gives each rank the same number
        assert r["pairs_per_rank"] == [t * r["top_k"]] * 2 and r["pairs_balanced"] and "floor_ms" not in r
        assert r["routing"] == "balanced" and r["step_ms"] == max(x["median_ms"] for x in r["per_rank"])
        flops = 6 * t * r["top_k"] * r["hidden_size"] * r["intermediate_size"]
        assert r["tflops_per_gpu"] == pytest.approx(flops / (r["step_ms"] * 1e-3) / 1e12)
        assert all(0 <= h <= r["num_experts"] // 2 for h in r["experts_hit_per_rank"])


def test_scaling_report_from_the_cpu_run(cpu_report, tmp_path):
    _, out, _ = cpu_report
    written = scaling.write_report([str(out)], str(tmp_path), stem="s", plot=False)
    md = (tmp_path / "s.md").read_text()
    assert written == [str(tmp_path / "s.md")]
    assert "not performance results" in md                 # Gloo wall-clock times are flagged
    assert "| deepseek-v3 | bf16 | alltoall | grouped_mm | 8 |" in md
    assert "qwen3-30b-a3b fp8-dispatch allgather: dispatch_fp8=True" in md


def test_bench_layer_reports_a_wrong_output(tmp_path, monkeypatch):
    """The oracle check can fail: a layer whose output is off by 5% is reported, and the command fails."""
    from epmoe.layer import MoELayer
    original = MoELayer.forward_routed
    monkeypatch.setattr(MoELayer, "forward_routed", lambda self, x, routing: original(self, x, routing) * 1.05)
    out = tmp_path / "bad.json"
    rc = cli_main(["bench", "layer", *TINY, "--presets", "qwen3-30b-a3b", "--dispatchers", "alltoall",
                   "--tokens", "8", "--no-local", "--output", str(out)])   # ranks are forked: they inherit the patch
    assert rc == 1
    (row,) = json.loads(out.read_text())["rows"]
    assert not row["check"]["ok"] and row["check"]["max_rel_err"] > 0.04 and "rel err" in row["check"]["report"]


def test_bench_layer_arguments(tmp_path, capsys):
    args = build_parser().parse_args(["bench", "layer", "--device", "cpu"])
    assert args.func is bench_layer.main
    for bad in (["--ranks", "1"], ["--ranks", "2,4", "--output", str(tmp_path / "x.json")],
                ["--presets", "nope"], ["--dispatchers", "local"], ["--tokens", "0"], ["--backend", "nope"],
                ["--ranks", "2", "--experts", "1"], ["--formats", "fp4"]):
        assert cli_main(["bench", "layer", "--device", "cpu", *bad]) == 2
    # real sizes do not fit a CPU run
    assert cli_main(["bench", "layer", "--device", "cpu", "--ranks", "2", "--presets", "deepseek-v3"]) == 2
    assert "--experts N and --shrink F" in capsys.readouterr().err
    # balanced routing needs the experts to split evenly over the ranks: said before any rank starts
    assert cli_main(["bench", "layer", "--device", "cpu", "--ranks", "3", "--presets", "qwen3-30b-a3b",
                     "--experts", "16", "--shrink", "64"]) == 2
    assert "--routing balanced with qwen3-30b-a3b on 3 ranks: balanced routing: 16 experts" in capsys.readouterr().err


def test_estimate_grows_with_tokens_and_capacity():
    cfg = bench_layer.layer_config("deepseek-v3", "bf16")
    weights = 32 * 3 * 7168 * 2048 * 2
    assert bench_layer.estimate_bytes(cfg, "flat", 0, 8, 32) == weights
    assert bench_layer.estimate_bytes(cfg, "flat", 4096, 8, 32) > bench_layer.estimate_bytes(cfg, "flat", 128, 8, 32)
    # low_latency holds the whole capacity (ranks x T rows per local expert): tens of GB at T = 4096 on 8 ranks
    big = bench_layer.estimate_bytes(cfg, "batched", 4096, 8, 32, capacity=8 * 4096)
    assert 30 * 2**30 < big < 100 * 2**30
    fp8 = bench_layer.layer_config("deepseek-v3", "fp8-dispatch")
    assert fp8.quant.dispatch_fp8 and bench_layer.estimate_bytes(fp8, "flat", 0, 8, 32) == weights // 2


def test_estimate_counts_two_micro_batches_in_flight():
    """Two micro-batches: the first's rows are held until it is combined, after the second arrived. With a
    capacity each spans all of it (the batched layout: about twice the bytes; flat: twice the rows, half
    the experts' intermediates, one micro-batch's at a time); without one each holds half the tokens (the
    same rows, half the intermediates)."""
    cfg = bench_layer.layer_config("deepseek-v3", "bf16")
    H, I = cfg.padded_hidden_size, cfg.padded_intermediate_size
    weights = bench_layer.estimate_bytes(cfg, "flat", 0, 8, 32)

    def forward_part(layout, mb, capacity):
        return bench_layer.estimate_bytes(cfg, layout, 4096, 8, 32, capacity=capacity, micro_batches=mb) - weights
    one, two = forward_part("batched", 1, 8 * 4096), forward_part("batched", 2, 8 * 4096)
    assert 1.6 * one < two <= 2 * one, (one, two)
    rows, pairs = 8 * 4096 * H * 2 * 3, 2 * 4096 * 8 * (3 * I + H) * 4     # one forward's, as the estimate counts
    assert forward_part("flat", 1, 8 * 4096) == forward_part("flat", 1, 0) == rows + pairs
    assert forward_part("flat", 2, 8 * 4096) == 2 * rows + pairs // 2
    assert forward_part("flat", 2, 0) == rows + pairs // 2


@pytest.mark.parametrize("dispatcher, layout, capacity", [("low_latency", "batched", True),
                                                          ("alltoall", "flat", True),    # built with T as its capacity
                                                          ("allgather", "flat", False)])
def test_a_configuration_is_sized_with_its_micro_batches(dispatcher, layout, capacity):
    """What decides whether a configuration runs counts its micro-batches and its capacity (no rank runs:
    the fit decision is stubbed to refuse, so the row is a skip naming the size)."""
    import torch
    cfg = bench_layer.layer_config("qwen3-30b-a3b", "bf16", experts=8, shrink=64)
    bench = bench_layer._RankBench.__new__(bench_layer._RankBench)
    bench.ws, bench.device, needs, rows = 2, torch.device("cpu"), [], []
    bench.p = {"backend": "auto", "comm_sms": None, "redundant_experts": None, "tokens": [64], "graph": False}
    bench.fits = lambda need: (needs.append(need), (False, f"needs {need}"))[1]
    bench.publish = rows.append
    for mb in (1, 2):
        bench.run_dispatcher(cfg, {}, dispatcher, 4, None, None, None, micro_batches=mb)
    expected = [bench_layer.estimate_bytes(cfg, layout, 64, 2, 4,
                                           capacity=2 * 64 if capacity else 0, micro_batches=mb) for mb in (1, 2)]
    assert needs == expected and expected[0] != expected[1]
    assert [(r["micro_batches"], r["skipped"]) for r in rows] == [(mb, f"needs {n}") for mb, n in zip((1, 2), needs)]


# ------------------------------------------------------------------------------- scaling (synthetic)
def _layer_json(ranks, when, host="gpu-host", speed=1.0):
    rows = []
    for T in (128, 4096):
        for t in (T, ranks * T):
            rows.append(dict(kind="local", preset="deepseek-v3", format="bf16", dispatcher="local", experts="triton",
                             tokens_per_rank=t, ms=0.01 * t, check={"ok": True}))
        ms = (1.0 + 0.001 * T) * (1 + ranks / 16) / speed
        rows.append(dict(kind="ep", preset="deepseek-v3", format="bf16", dispatcher="alltoall", experts="triton",
                         tokens_per_rank=T, ms=ms, step_ms=ms, tokens_per_s_total=ranks * T / (ms * 1e-3),
                         local_ms_all_tokens=0.01 * ranks * T, speedup_vs_local=0.01 * ranks * T / ms,
                         floor_ms=0.5, floor_fraction=0.5 / ms,
                         check={"ok": True, "max_rel_err": 3e-3, "bound": 1e-2}))
        rows.append(dict(kind="ep", preset="deepseek-v3", format="fp8-dispatch", dispatcher="allgather",
                         experts="reference", tokens_per_rank=T, skipped="dispatch_fp8=True but dispatcher 'allgather'"))
    return {"benchmark": "moe-layer", "environment": {"device": "NVIDIA H200", "host": host, "world_size": ranks,
                                                      "ranks": ranks, "when": when, "torch": "2.11", "triton": "3.6",
                                                      "backend": "nccl"}, "rows": rows}


def _dispatch_json(ranks, when):
    rows = [dict(dispatcher=d, tokens_per_rank=T, total_ms=0.1 * ranks + T / 1e4, nccl_total_ms=0.05 * ranks,
                 total_vs_nccl=(0.1 * ranks + T / 1e4) / (0.05 * ranks), dispatch_GBps_to_peers=100.0 + ranks)
            for d in ("alltoall", "low_latency") for T in (128, 4096)]
    rows.append(dict(rows[1], config="default", total_ms=2 * rows[1]["total_ms"]))   # auto, no capacity, eager
    return {"benchmark": "dispatch+combine", "environment": {"device": "NVIDIA H200", "host": "gpu-host",
                                                             "world_size": ranks, "when": when, "torch": "2.11",
                                                             "triton": "3.6", "backend": "nccl"}, "rows": rows}


@pytest.fixture
def synthetic(tmp_path):
    d = tmp_path / "results"
    d.mkdir()
    for k in (2, 4, 8):
        (d / f"layer_{k}x.json").write_text(json.dumps(_layer_json(k, f"2026-12-01T10:0{k}:00+00:00")))
        (d / f"dispatch_{k}x.json").write_text(json.dumps(_dispatch_json(k, f"2026-12-01T09:0{k}:00+00:00")))
    # an older 4-rank layer run (superseded by the newer one) and a JSON of another benchmark (ignored)
    (d / "layer_4x_old.json").write_text(json.dumps(_layer_json(4, "2026-11-30T10:00:00+00:00", speed=0.5)))
    (d / "experts.json").write_text(json.dumps({"environment": {"gpu": "NVIDIA H200"}, "results": []}))
    return d


def test_scaling_table_and_plot(synthetic, tmp_path):
    out = tmp_path / "out"
    assert scaling.main([str(synthetic), "--out-dir", str(out), "--stem", "scaling"]) == 0
    md = (out / "scaling.md").read_text()
    png = (out / "scaling.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    s = scaling.summarize([str(synthetic)])
    assert s["ranks"] == [2, 4, 8] and s["warnings"] == [] and len(s["sources"]) == 6
    # the newest 4-rank file wins: its time is the fast one
    row4 = s["layer"][("deepseek-v3", "bf16", "alltoall", 128)][4]
    assert row4["ms"] == pytest.approx((1.128) * 1.25)
    line = next(x for x in md.splitlines() if x.startswith("| deepseek-v3 | bf16 | alltoall | triton | 128 |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    ms = [float(c) for c in cells[5:8]]
    assert ms == [pytest.approx(1.128 * (1 + k / 16), abs=1e-3) for k in (2, 4, 8)]
    speedups = [float(c) for c in cells[11:14]]
    assert speedups == [pytest.approx(0.01 * k * 128 / (1.128 * (1 + k / 16)), abs=0.01) for k in (2, 4, 8)]
    floors = [float(c) for c in cells[14:17]]
    assert floors == [pytest.approx(0.5 / (1.128 * (1 + k / 16)), abs=0.01) for k in (2, 4, 8)]
    assert cells[-1] == "ok" and len(cells) == 18
    assert "| deepseek-v3 | fp8-dispatch | allgather | reference | 128 | skipped | skipped | skipped |" in md
    assert "deepseek-v3 fp8-dispatch allgather: dispatch_fp8=True" in md
    dline = next(x for x in md.splitlines() if x.startswith("| alltoall | 4096 |"))
    assert [c.strip() for c in dline.strip("|").split("|")][2:5] == ["0.610", "0.810", "1.210"]
    dline = next(x for x in md.splitlines() if x.startswith("| alltoall (default) | 4096 |"))
    assert [c.strip() for c in dline.strip("|").split("|")][2:5] == ["1.219", "1.619", "2.419"]
    assert "layer_4x.json" in md and "layer_4x_old.json" not in md


def test_scaling_combines_runs_split_by_format(synthetic):
    """BF16 and FP8 measured in two calls on the same rank count: both formats' rows are used."""
    fp8 = _layer_json(8, "2026-12-03T00:00:00+00:00")
    fp8["rows"] = [dict(r, format="fp8-dispatch", ms=r["ms"] / 2) if r["kind"] == "ep" and r["format"] == "bf16"
                   else dict(r, format="fp8-dispatch") if r["kind"] == "local" else r for r in fp8["rows"]
                   if r["format"] == "bf16"]
    (synthetic / "layer_8x_fp8.json").write_text(json.dumps(fp8))
    s = scaling.summarize([str(synthetic)])
    assert set(s["layer"][("deepseek-v3", "bf16", "alltoall", 128)]) == {2, 4, 8}
    assert s["layer"][("deepseek-v3", "fp8-dispatch", "alltoall", 128)][8]["ms"] == pytest.approx(1.128 * 1.5 / 2)
    assert s["layer"][("deepseek-v3", "bf16", "alltoall", 128)][8]["ms"] == pytest.approx(1.128 * 1.5)
    assert sorted(os.path.basename(x["path"]) for x in s["sources"] if x["ranks"] == 8 and x["benchmark"] == "layer") \
        == ["layer_8x.json", "layer_8x_fp8.json"]


def test_scaling_keeps_eplb_phases_and_micro_batches_apart(synthetic):
    """A layer measured before and after its rebalance, with two micro-batches, and with its transfer
    kernels' SMs bounded: rows of their own, none overwriting another."""
    rep = _layer_json(2, "2026-12-04T00:00:00+00:00")
    base = next(r for r in rep["rows"] if r["kind"] == "ep" and r["format"] == "bf16" and r["tokens_per_rank"] == 128)
    rep["rows"] = [dict(base, eplb="before", ms=3.0), dict(base, eplb="after rebalance", ms=2.0),
                   dict(base, micro_batches=2, ms=1.5), dict(base, micro_batches=2, comm_sms=24, ms=1.25)]
    (synthetic / "layer_2x_eplb.json").write_text(json.dumps(rep))
    s = scaling.summarize([str(synthetic)])
    ms = {name: s["layer"][("deepseek-v3", "bf16", name, 128)][2]["ms"]
          for name in ("alltoall (eplb before)", "alltoall (eplb after rebalance)", "alltoall (2 micro-batches)",
                       "alltoall (2 micro-batches) (24 comm SMs)")}
    assert ms == {"alltoall (eplb before)": 3.0, "alltoall (eplb after rebalance)": 2.0,
                  "alltoall (2 micro-batches)": 1.5, "alltoall (2 micro-batches) (24 comm SMs)": 1.25}


def test_scaling_warns_about_mixed_machines_and_needs_input(synthetic, tmp_path):
    (synthetic / "layer_8x.json").write_text(json.dumps(_layer_json(8, "2026-12-02T00:00:00+00:00", host="other")))
    s = scaling.summarize([str(synthetic)])
    assert any("more than one device or host" in w for w in s["warnings"])
    assert "more than one device or host" in scaling.markdown(s)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert scaling.main([str(empty), "--out-dir", str(tmp_path)]) == 2


def test_scaling_without_matplotlib(synthetic, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)      # import matplotlib -> ImportError
    assert scaling.main([str(synthetic), "--out-dir", str(tmp_path)]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err
    written = scaling.write_report([str(synthetic)], str(tmp_path), stem="t")   # the bench's path: table only
    assert written == [str(tmp_path / "t.md")] and "no plot" in capsys.readouterr().err
    assert scaling.main([str(synthetic), "--out-dir", str(tmp_path), "--stem", "u", "--no-plot"]) == 0
    assert (tmp_path / "u.md").exists() and not (tmp_path / "u.png").exists()


def test_bench_layer_rebalances_skewed_routing(tmp_path, capsys):
    """--routing skewed --redundant-experts R: a row before and one after the rebalance, both checked
    against the oracle, with the rank loads that give max/mean (printed)."""
    out = tmp_path / "eplb.json"
    assert cli_main(["bench", "layer", *TINY, "--experts", "16", "--presets", "qwen3-30b-a3b", "--dispatchers",
                     "alltoall", "--tokens", "64", "--no-local", "--routing", "skewed", "--redundant-experts", "2",
                     "--output", str(out)]) == 0
    assert "max/mean load" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["params"]["routing"] == "skewed" and report["params"]["zipf_exponent"] == 1.2
    before, after = report["rows"]
    assert (before["eplb"], after["eplb"]) == ("before", "after rebalance")
    assert before["check"]["ok"] and after["check"]["ok"] and after["rebalance"]["changed_slots"] > 0
    for r in (before, after):
        assert sum(r["pairs_per_rank"]) == 2 * 64 * 8                      # every pair on exactly one rank
    assert max(after["pairs_per_rank"]) < max(before["pairs_per_rank"])
    assert cli_main(["bench", "layer", *TINY, "--redundant-experts", "-1"]) == 2
    assert cli_main(["bench", "layer", *TINY, "--redundant-experts", "9"]) == 2
    assert "a rank would hold 9 physical slots" in capsys.readouterr().err
