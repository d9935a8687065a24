import json
import subprocess
import sys

import pytest

from epmoe.cli import build_parser, main


def test_every_command_has_help(capsys):
    for argv in (["--help"], ["info", "--help"], ["run", "--help"], ["bench", "--help"], ["tune", "--help"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 0
        out = capsys.readouterr().out
        assert "usage: epmoe" in out
    build_parser()


def test_tune_refuses_a_compile_log_it_cannot_write_before_anything_else(tmp_path, capsys):
    """Said at once (before the GPU check and the first shape's compiles), with the path and why."""
    bad = tmp_path / "missing_dir" / "compiles.jsonl"
    assert main(["tune", "--compile-log", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"--compile-log {bad}: No such file or directory" in err, err


def test_info_prints_matrix(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "support matrix" in out and "grouped_mm" in out and "local" in out
    assert "silently lose" in out
    # alltoall takes a capacity: host-synchronised without one, capturable with one
    row = next(line for line in out.splitlines() if "│ alltoall " in line)
    assert "without one" in row and "with one" in row and "takes" in row


def test_run_default_is_expert_parallel_over_two_cpu_ranks(tmp_path, capsys):
    report = tmp_path / "r.json"
    code = main(["run", "--tokens", "32", "--iters", "1", "--warmup", "0", "--json", str(report)])
    assert code == 0
    out = capsys.readouterr().out
    assert "all outputs match the float64 oracle" in out and "ms/pass" in out and "ranks 2" in out
    ranks = json.loads(report.read_text())["ranks"]
    assert [r["local_experts"] for r in ranks] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    for r in ranks:
        assert r["rel_err"] <= r["bound"] and r["checked_tokens"] == 32 and r["dispatcher"] == "alltoall"
    # every (token, expert) pair of both ranks was computed by exactly one rank
    assert sum(sum(r["rows_per_expert"]) for r in ranks) == 2 * 32 * 2


def test_run_without_oracle_check_says_so(capsys):
    assert main(["run", "--ranks", "1", "--tokens", "8", "--iters", "1", "--check-tokens", "0"]) == 0
    out = capsys.readouterr().out
    assert "no output was compared" in out and "all outputs match" not in out


@pytest.mark.parametrize("argv", [
    ["--ranks", "1"],
    ["--ranks", "1", "--dispatcher", "low_latency", "--backend", "batched"],
    ["--ranks", "2", "--dispatcher", "low_latency", "--backend", "batched"],
    ["--ranks", "4", "--dispatcher", "allgather", "--backend", "reference", "--preset", "olmoe",
     "--experts", "6", "--top-k", "6", "--shrink", "16"],
    ["--ranks", "3", "--preset", "deepseek-v3", "--experts", "16", "--shrink", "32", "--dtype", "bf16"],
])
def test_run_variants(argv, tmp_path):
    report = tmp_path / "r.json"
    assert main(["run", "--tokens", "24", "--iters", "1", "--json", str(report), *argv]) == 0
    ranks = json.loads(report.read_text())["ranks"]
    assert len(ranks) == int(argv[1]) and all(r["rel_err"] <= r["bound"] for r in ranks)


def test_run_shrinks_big_presets(capsys):
    assert main(["run", "--preset", "deepseek-v3", "--experts", "16", "--shrink", "32", "--tokens", "16",
                 "--iters", "1"]) == 0
    assert "E=16 top_k=8 H=224 I=64" in capsys.readouterr().out


def test_run_refuses_what_does_not_fit(capsys):
    assert main(["run", "--preset", "deepseek-v3", "--dtype", "fp32", "--device", "cpu"]) == 2
    assert "--experts N" in capsys.readouterr().err


def test_run_bad_arguments(capsys):
    assert main(["run", "--tokens", "0"]) == 2
    assert "--tokens must be >= 1" in capsys.readouterr().err
    assert main(["run", "--iters", "0"]) == 2
    assert "--iters must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", "--preset", "nope"])


def test_module_entry_point_runs_default_job():
    out = subprocess.run([sys.executable, "-m", "epmoe", "run", "--tokens", "8", "--iters", "1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "all outputs match" in out.stdout


def test_run_rebalances_skewed_routing_with_redundant_experts(tmp_path, capsys):
    report = tmp_path / "r.json"
    assert main(["run", "--experts", "16", "--top-k", "2", "--routing", "skewed", "--redundant-experts", "4",
                 "--tokens", "96", "--iters", "1", "--warmup", "0", "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "Zipf-like expert popularity with exponent 1.2; 4 redundant experts" in out
    assert "max/mean rank load" in out and "after rebalance" in out and "all outputs match" in out
    ranks = json.loads(report.read_text())["ranks"]
    assert [len(r["local_experts"]) for r in ranks] == [10, 10]                 # 20 slots for 16 experts
    before = [r["rank_load_before"] for r in ranks]
    after = [r["rank_load_after"] for r in ranks]
    assert sum(before) == sum(after) == 2 * 96 * 2 and max(after) < max(before)


@pytest.mark.parametrize("argv, message", [
    (["--redundant-experts", "2", "--ranks", "1"], "--redundant-experts needs expert parallelism"),
    (["--redundant-experts", "-1"], "--redundant-experts must be >= 0"),
    (["--redundant-experts", "9"], "a rank would hold 9 physical slots but there are only 8 logical experts"),
    (["--zipf-exponent", "-1"], "--zipf-exponent must be >= 0"),
    (["--model", "nowhere", "--routing", "skewed"], "act on preset layers"),
])
def test_run_refuses_bad_eplb_flags(argv, message, capsys):
    assert main(["run", *argv]) == 2
    assert message in capsys.readouterr().err
