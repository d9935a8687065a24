"""What a new user trips over on the command line: every usage mistake is one or two lines on stderr naming
the flag (exit code 2, no traceback, said once by the launching process); flags have help and mean the
same thing in every command; `epmoe info` prints bracketed text as text; -q / -v; logging."""
import argparse
import dataclasses
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from epmoe import contract
from epmoe.cli import build_parser, main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN_ENV = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "TORCHELASTIC_RUN_ID": "test"}

# (command line after `epmoe`, extra environment, a flag the message must name, a word of the fix)
MISTAKES = [
    (["run", "--dispatcher", "foo"], {}, "--dispatcher", "alltoall"),
    (["run", "--backend", "batched"], {}, "--backend batched", "--dispatcher low_latency"),
    (["run", "--shrink", "0"], {}, "--shrink", ">= 1"),
    (["run", "--experts", "1"], {}, "--experts 1", "--experts 4"),
    (["run", "--preset", "qwen3-30b-a3b", "--experts", "8"], {}, "--experts 8", "--top-k"),
    (["run", "--ranks", "0"], {}, "--ranks", ">= 1"),
    (["run", "--dispatcher", "low_latency", "--tokens", "16", "--max-tokens-per-rank", "8"], {},
     "--max-tokens-per-rank 8", "16 or more"),
    (["run", "--ranks", "2"], TORCHRUN_ENV, "--ranks", "torchrun"),
    (["bench", "dispatch", "--ranks", "2"], TORCHRUN_ENV, "--ranks", "torchrun"),
    (["bench", "layer", "--ranks", "2"], TORCHRUN_ENV, "--ranks", "torchrun"),
    (["run", "--model", "/nonexistent/ckpt"], {}, "--model", "directory"),
] + ([] if torch.cuda.is_available() else [(["run", "--device", "cuda"], {}, "--device cuda", "--device cpu")])


def test_usage_mistakes_are_two_lines_with_exit_code_2():
    """All mistakes at once (each a fresh `python -m epmoe`), so that the test costs one start-up."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [subprocess.Popen([sys.executable, "-m", "epmoe", *argv], env=dict(env, **extra), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for argv, extra, _, _ in MISTAKES]
    for (argv, _, flag, fix), p in zip(MISTAKES, procs):
        out, err = p.communicate(timeout=120)
        lines = err.strip().splitlines()
        assert p.returncode == 2, (argv, out, err)
        assert 1 <= len(lines) <= 2 and "Traceback" not in err, (argv, err)
        assert lines[0].startswith("epmoe " + argv[0]) and flag in err and fix in err, (argv, err)


def test_bench_layer_says_when_every_token_goes_to_every_expert(capsys):
    assert main(["bench", "layer", "--device", "cpu", "--presets", "qwen3-30b-a3b", "--experts", "8",
                 "--formats", "fp4"]) == 2     # stops at the bad format, after the note
    err = capsys.readouterr().err
    assert "note: --experts 8 with qwen3-30b-a3b's top_k 8: every token would go to every expert" in err


def test_a_deprecated_spelling_still_works_with_a_note(capsys):
    args = build_parser().parse_args(["bench", "dispatch", "--backend", "gloo", "--num-experts", "8"])
    assert (args.comm, args.experts) == ("gloo", 8)
    err = capsys.readouterr().err
    assert "--backend is deprecated, use --comm" in err and "--num-experts is deprecated, use --experts" in err
    tune = build_parser().parse_args(["tune", "--preset", "tiny", "--presets", "olmoe,mixtral-8x7b",
                                      "--format", "bf16", "--experts", "4"])
    assert tune.presets == "tiny,olmoe,mixtral-8x7b" and tune.formats == "bf16" and tune.local_experts == 4
    layer = build_parser().parse_args(["bench", "layer", "--presets", "olmoe", "--preset", "tiny", "--tokens", "4,8"])
    assert (layer.presets, layer.tokens, layer.formats) == ("olmoe,tiny", "4,8", "bf16")


def _all_parsers(parser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _all_parsers(sub)


def test_every_flag_has_help_and_top_level_help_lists_every_command(capsys):
    parser = build_parser()
    parsers = list(_all_parsers(parser))
    assert len(parsers) >= 8      # epmoe, info, run, bench, bench experts/dispatch/layer, tune
    for p in parsers:
        for action in p._actions:
            if action.option_strings:
                assert action.help, f"{p.prog} {action.option_strings} has no help"
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    assert "bench layer" in top and "bench dispatch" in top and "tune" in top


def test_info_prints_bracketed_text_as_text(monkeypatch, capsys):
    cls = contract.experts_class("triton")
    monkeypatch.setattr(cls, "CAPS", dataclasses.replace(cls.CAPS, summary="needs pip install 'epmoe[triton]'"))
    assert main(["info"]) == 0
    assert "pip install 'epmoe[triton]'" in capsys.readouterr().out


def test_progress_goes_to_stderr_and_quiet_silences_it(capsys):
    assert main(["run", "--ranks", "1", "--tokens", "8", "--iters", "2", "--check-tokens", "4"]) == 0
    loud = capsys.readouterr()
    assert loud.out.startswith("epmoe run") and "timed passes: 2/2" in loud.err
    assert "checking 4 tokens against the float64 oracle" in loud.err
    assert main(["run", "-q", "--ranks", "1", "--tokens", "8", "--iters", "2", "--check-tokens", "4"]) == 0
    quiet = capsys.readouterr()
    assert quiet.err == "" and "all outputs match" in quiet.out


def test_the_library_never_configures_the_root_logger():
    modules = "epmoe.main_job, epmoe.bench.dispatch"
    if importlib.util.find_spec("safetensors") is not None:     # the checkpoint loader is built on it
        modules += ", epmoe.integration.checkpoint"
    code = ("import logging, epmoe; name = epmoe.testing.assert_close.__name__; "
            f"import {modules}; "
            "assert not logging.getLogger().handlers; "
            "assert any(isinstance(h, logging.NullHandler) for h in logging.getLogger('epmoe').handlers); "
            "print(name)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=REPO))
    assert out.returncode == 0 and out.stdout.strip() == "assert_close", out.stderr


def test_library_messages_reach_the_applications_logging():
    """An engine embedding epmoe gets its messages through its own handlers on the "epmoe" logger."""
    import logging

    import epmoe
    pytest.importorskip("transformers", reason="the tiny model needs transformers (pip install 'epmoe[models]')")
    from epmoe.integration import tiny
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("epmoe")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        assert epmoe.patch_model(tiny.tiny_model("mixtral", seed=1)) == 2
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert [r.getMessage() for r in records if r.name == "epmoe.integration"] == [
        "patch_model: 2 MoE blocks of MixtralForCausalLM now run on epmoe"]


def _rank_one_cannot_start(rank, world, opts):
    if rank == 1:
        raise ValueError("rank one cannot start")
    import time
    time.sleep(60)      # would wait for rank 1 in a collective


def test_a_failing_rank_stops_the_run_within_seconds_with_one_line_per_rank(monkeypatch, capsys):
    import time

    from epmoe import main_job
    monkeypatch.setattr(main_job, "run_rank", _rank_one_cannot_start)     # the forked ranks inherit it
    t0 = time.monotonic()
    assert main(["run", "--tokens", "8", "--iters", "1"]) == 1
    assert time.monotonic() - t0 < 40
    err = capsys.readouterr().err
    assert "rank 1: ValueError: rank one cannot start" in err and "ranks [0] were stopped" in err
    assert "Traceback" not in err and "-v shows the tracebacks" in err
