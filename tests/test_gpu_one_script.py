"""`benchmarks/gpu_one_h200.sh` on the CPU, with a stand-in for nvidia-smi: ONLY_ON stops the script before any part
runs where the GPU is another, and lets it on where the GPU is the one named (an unknown part then stops it, so
nothing real runs either way)."""
import os
import stat
import subprocess
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_one_h200.sh")


def _run_with_stand_ins(tmp_path, tools: dict, **variables) -> subprocess.CompletedProcess:
    """The script run with stand-ins for the named tools (name -> the body of a shell script) first on PATH, OUT in
    tmp_path, a COMMIT and the variables given (the part variables the tests set, unset unless given)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in tools.items():
        tool = bin_dir / name
        tool.write_text(f"#!/bin/sh\n{body}\n")
        tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", OUT=str(tmp_path / "out"),
               COMMIT="0" * 40)
    for name in ("ONLY_ON", "CUDA_HOME", "DEEPGEMM_SRC", "DEEPGEMM_STEPS", "DEEPGEMM_WHEELS", "DEEPGEMM_NCU",
                 "DEEPGEMM_NCU_OURS", "DEEPGEMM_NO_MULTICAST", "DIAG_ARGS", "TESTS", "TESTS_K",
                 "TUNE_ARGS", "GLUON_TUNE_SETS", "GLUON_TUNE_EXTRA"):
        env.pop(name, None)
    env.update(variables)
    return subprocess.run(["bash", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def _bundled_log(tmp_path) -> str:
    """Every file of the script's bundle (OUT/gpu_one_h200.tar.gz), as text, one after the other."""
    with tarfile.open(tmp_path / "out" / "gpu_one_h200.tar.gz") as bundle:
        return "".join(bundle.extractfile(m).read().decode(errors="replace") for m in bundle.getmembers() if m.isfile())


def _run(tmp_path, gpu_name: str, only_on: str | None):
    extra = {} if only_on is None else {"ONLY_ON": only_on}
    return _run_with_stand_ins(tmp_path, {"nvidia-smi": f"echo '{gpu_name}'"}, PARTS="no_such_part", **extra)


@pytest.mark.skipif(os.name != "posix", reason="a bash script and a stand-in tool with a shebang")
@pytest.mark.parametrize("gpu_name, only_on, code", [("NVIDIA H100 80GB HBM3", "H200", 3),
                                                    ("NVIDIA H200", "H200", 2),
                                                    ("NVIDIA H100 80GB HBM3", None, 2)])
def test_only_on_runs_the_parts_on_the_gpu_it_names_only(tmp_path, gpu_name, only_on, code):
    proc = _run(tmp_path, gpu_name, only_on)
    assert proc.returncode == code, proc.stdout + proc.stderr
    if code == 3:
        assert f"ONLY_ON={only_on}, and this GPU is {gpu_name}: no part run" in proc.stdout
        assert "== no_such_part" not in proc.stdout and not (tmp_path / "out" / "gpu_one_h200").exists()
    else:
        assert "== no_such_part" in proc.stdout and "unknown part no_such_part" in proc.stdout


@pytest.mark.skipif(os.name != "posix", reason="a bash script and stand-in tools with a shebang")
def test_gluon_tune_passes_its_extra_arguments_to_every_tune(tmp_path):
    """Part `gluon_tune` with GLUON_TUNE_EXTRA (e.g. --follow): every `epmoe tune` it starts, the audit's lines
    included, gets those arguments (python3 stood in for by a script that logs its arguments)."""
    calls = tmp_path / "calls.txt"
    proc = _run_with_stand_ins(tmp_path, {
        "nvidia-smi": "echo 'NVIDIA H200'",
        "python3": f"echo \"$*\" >> '{calls}'\n"
                   "case \"$*\" in *tune_audit*) echo '--presets gpt-oss-120b --tokens 8192';; "
                   "*) echo NVIDIA_H200;; esac"},
        PARTS="gluon_tune", GLUON_TUNE_SETS="mixtral audit", GLUON_TUNE_EXTRA="--follow")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tunes = [line for line in calls.read_text().splitlines() if line.startswith("-m epmoe tune")]
    assert tunes == [
        "-m epmoe tune --gluon --presets mixtral-8x7b --formats fp8_block,bf16 --tokens 1024,8192 --follow",
        "-m epmoe tune --gluon --presets gpt-oss-120b --tokens 8192 --follow"]


@pytest.mark.skipif(os.name != "posix", reason="a bash script and stand-in tools with a shebang")
@pytest.mark.parametrize("sources, build_fails", [(None, False), ("src dir;touch${IFS}hit2", False),
                                                 ("src dir;touch${IFS}hit2", True)])
def test_deepgemm_installs_the_wheels_into_a_folder_of_its_own_and_runs_the_probe_from_it(tmp_path, sources,
                                                                                          build_fails):
    """Part `deepgemm`: the wheels DEEPGEMM_WHEELS names (globs, expanded; a name with shell metacharacters stays
    one harmless word) go into a fresh folder, and the probe runs with that folder first on its path and a CUDA_HOME;
    the folder is gone afterwards (python3 stood in for by a script that logs its arguments and environment). With
    DEEPGEMM_SRC, the module is built from those sources into that folder between the install and the probe (the
    folder's name one word, however it is spelt), and a build that fails stops the part before the probe; without
    it, nothing is built."""
    calls = tmp_path / "calls.txt"
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "a-1.whl").write_text("")
    proc = _run_with_stand_ins(tmp_path, {
        "nvidia-smi": "echo 'NVIDIA H200'",
        "python3": f"echo \"$* | PYTHONPATH=$PYTHONPATH CUDA_HOME=$CUDA_HOME | $#\" >> '{calls}'\n"
                   f"case \"$1\" in benchmarks/deepgemm_build.py) exit {1 if build_fails else 0};; esac"},
        PARTS="deepgemm", DEEPGEMM_WHEELS=f"{wheels}/*.whl x;touch${{IFS}}{tmp_path}/hit",
        **({} if sources is None else {"DEEPGEMM_SRC": sources}))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = calls.read_text().splitlines()
    install = next(line for line in lines if line.startswith("-m pip install"))
    folder, *named = install.split(" | ")[0].split("--target ")[1].split()
    assert named == [f"{wheels}/a-1.whl", f"x;touch${{IFS}}{tmp_path}/hit"]
    assert not os.path.exists(folder) and not (tmp_path / "hit").exists()
    probes = [i for i, line in enumerate(lines) if line.startswith("benchmarks/deepgemm_probe.py")]
    assert len(probes) == (0 if build_fails else 1)
    if probes:
        probe = lines[probes[0]]
        assert f"PYTHONPATH={folder}:." in probe and "CUDA_HOME=/usr/local/cuda" in probe
    builds = [i for i, line in enumerate(lines) if line.startswith("benchmarks/deepgemm_build.py")]
    if sources is None:
        assert builds == []
    else:
        assert len(builds) == 1 and lines.index(install) < builds[0] < min(probes, default=len(lines))
        command, _, argc = lines[builds[0]].split(" | ")
        assert command == f"benchmarks/deepgemm_build.py {folder} {sources}" and argc == "3"   # the script, 2 words
        assert not (tmp_path / "hit2").exists() and not os.path.exists(os.path.join(ROOT, "hit2"))


@pytest.mark.skipif(os.name != "posix", reason="a bash script and stand-in tools with a shebang")
@pytest.mark.parametrize("audit_fails", [False, True])
def test_tune_shadowed_runs_one_tune_a_line_of_the_audit(tmp_path, audit_fails):
    """Part `tune` with TUNE_ARGS=shadowed: each line `tune_audit --shadowed` prints for this GPU's table is one
    `epmoe tune`, its words split as usual; where the audit fails, no tune runs and the log says why (python3
    stood in for by a script that logs its arguments)."""
    calls = tmp_path / "calls.txt"
    proc = _run_with_stand_ins(tmp_path, {
        "nvidia-smi": "echo 'NVIDIA H200'",
        "python3": f"echo \"$*\" >> '{calls}'\n"
                   "case \"$*\" in *'tune_audit --shadowed'*) "
                   "echo '--presets gpt-oss-120b --formats fp8_block --tokens 2,4,8'; "
                   "echo '--local-experts 32 --hidden 7168 --formats fp8_block --tokens 1024,2048'; "
                   f"exit {2 if audit_fails else 0};; "
                   "*) echo NVIDIA_H200;; esac"},
        PARTS="tune", TUNE_ARGS="shadowed")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tunes = [line for line in calls.read_text().splitlines() if line.startswith("-m epmoe tune")]
    if audit_fails:
        assert tunes == [] and "the audit of epmoe/kernels/configs/NVIDIA_H200.json failed; no tune run" in proc.stdout
        return
    assert tunes == ["-m epmoe tune --presets gpt-oss-120b --formats fp8_block --tokens 2,4,8",
                     "-m epmoe tune --local-experts 32 --hidden 7168 --formats fp8_block --tokens 1024,2048"]
    assert any("tune_audit --shadowed epmoe/kernels/configs/NVIDIA_H200.json" in line
               for line in calls.read_text().splitlines())


@pytest.mark.skipif(os.name != "posix", reason="a bash script and stand-in tools with a shebang")
@pytest.mark.parametrize("tests_k", [None, "not real_size"])
def test_tests_k_reaches_pytest_as_one_expression(tmp_path, tests_k):
    """Part `tests`: TESTS is split into words (several files), TESTS_K is one -k expression however many spaces it
    has; without TESTS_K no -k is passed (python3 stood in for by a script that logs each argument)."""
    calls = tmp_path / "calls.txt"
    proc = _run_with_stand_ins(tmp_path, {
        "nvidia-smi": "echo 'NVIDIA H200'",
        "python3": f"for a in \"$@\"; do printf '%s|' \"$a\" >> '{calls}'; done; echo >> '{calls}'"},
        PARTS="tests", TESTS="tests/a.py tests/b.py", **({} if tests_k is None else {"TESTS_K": tests_k}))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    pytest_call = next(line for line in calls.read_text().splitlines() if line.startswith("-m|pytest|"))
    args = pytest_call.split("|")
    assert args[2:4] == ["tests/a.py", "tests/b.py"]
    assert (args[4:6] == ["-k", tests_k]) if tests_k else ("-k" not in args)


@pytest.mark.skipif(os.name != "posix", reason="a bash script and stand-in tools with a shebang")
def test_deepgemm_steps_run_after_the_probe_with_the_shapes_as_one_argument(tmp_path):
    """Part `deepgemm` with DEEPGEMM_STEPS: after the probe, profile_experts_steps.py times triton_ws beside the
    DeepGEMM prototypes at those shapes (one argument), with the built folder on the path; without it, not."""
    calls = tmp_path / "calls.txt"
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "a-1.whl").write_text("")
    tools = {"nvidia-smi": "echo 'NVIDIA H200'",
             "python3": f"for a in \"$@\"; do printf '%s|' \"$a\" >> '{calls}'; done; "
                        f"echo \"PYTHONPATH=$PYTHONPATH\" >> '{calls}'"}
    shapes = "deepseek-v3:32:8192,mixtral-8x7b::8192"
    proc = _run_with_stand_ins(tmp_path, tools, PARTS="deepgemm", DEEPGEMM_WHEELS=f"{wheels}/*.whl",
                               DEEPGEMM_STEPS=shapes)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = calls.read_text().splitlines()
    probe = next(i for i, line in enumerate(lines) if line.startswith("benchmarks/deepgemm_probe.py|"))
    steps = [i for i, line in enumerate(lines) if line.startswith("benchmarks/profile_experts_steps.py|")]
    assert len(steps) == 1 and steps[0] > probe
    args = lines[steps[0]].split("|")
    assert args[args.index("--shapes") + 1] == shapes
    assert args[args.index("--backends") + 1] == "triton_ws,deepgemm,deepgemm_down"
    install = next(line.split("|") for line in lines if line.startswith("-m|pip|install|"))
    folder = install[install.index("--target") + 1]
    assert f"PYTHONPATH={folder}:" in lines[steps[0]]
    calls.unlink()
    proc = _run_with_stand_ins(tmp_path, tools, PARTS="deepgemm", DEEPGEMM_WHEELS=f"{wheels}/*.whl")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not any(line.startswith("benchmarks/profile_experts_steps.py") for line in calls.read_text().splitlines())


@pytest.mark.skipif(os.name != "posix", reason="a bash script and stand-in tools with a shebang")
@pytest.mark.parametrize("ours", [None, "--shape 'deepseek-v3 shard 32' --tokens 4096"])
def test_deepgemm_ncu_profiles_the_named_calls_then_ours_instead_of_the_probe(tmp_path, ours):
    """Part `deepgemm` with DEEPGEMM_NCU: ncu runs deepgemm_probe.py --profile with the names as one argument, then
    profile_ws_gemm.py with DEEPGEMM_NCU_OURS (shell words; default: the deepseek-v3 shard at T = 8192), a quoted
    shape kept one word; the timed probe and the steps do not run, and the log is named for ncu."""
    calls = tmp_path / "calls.txt"
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "a-1.whl").write_text("")
    log = f"for a in \"$@\"; do printf '%s|' \"$a\" >> '{calls}'; done; echo >> '{calls}'"
    tools = {"nvidia-smi": "echo 'NVIDIA H200'", "python3": log, "ncu": f"printf 'ncu|' >> '{calls}'; {log}"}
    names = "ds32 T=8192 gate_up,ds32 T=8192 down"
    extra = {} if ours is None else {"DEEPGEMM_NCU_OURS": ours}
    proc = _run_with_stand_ins(tmp_path, tools, PARTS="deepgemm", DEEPGEMM_WHEELS=f"{wheels}/*.whl",
                               DEEPGEMM_NCU=names, DEEPGEMM_STEPS="deepseek-v3:32:8192", **extra)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    profiled = [line.split("|") for line in calls.read_text().splitlines() if line.startswith("ncu|")]
    assert len(profiled) == 2
    dg, mine = profiled
    assert dg[dg.index("python3") + 1:dg.index("python3") + 4] == ["benchmarks/deepgemm_probe.py", "--profile", names]
    assert mine[mine.index("python3") + 1] == "benchmarks/profile_ws_gemm.py"
    assert mine[mine.index("--shape") + 1] == "deepseek-v3 shard 32"          # one word, quoted or by default
    assert mine[mine.index("--tokens") + 1] == ("4096" if ours else "8192")
    for args in profiled:
        assert args[args.index("--nvtx-include") + 1] == "profiled/" and "SpeedOfLight" in args
    others = [line for line in calls.read_text().splitlines() if line and not line.startswith(("ncu|", "-m|pip|"))]
    assert not [line for line in others if "deepgemm_probe.py" in line or "profile_experts_steps.py" in line]
    with tarfile.open(tmp_path / "out" / "gpu_one_h200.tar.gz") as bundle:
        logs = [os.path.basename(n) for n in bundle.getnames() if os.path.basename(n).startswith("deepgemm_")]
    assert len(logs) == 1 and logs[0].startswith("deepgemm_ncu_"), logs


@pytest.mark.skipif(os.name != "posix", reason="a bash script and a stand-in tool with a shebang")
def test_diagnostics_times_both_shapes_then_profiles_the_shard_and_tabulates_it(tmp_path):
    """Part `diagnostics`: profile_ws_gemm.py with every diagnostic form at the deepseek-v3 shard and mixtral (a
    shape one word each), then under ncu at the shard with DIAG_ARGS, then ncu_details_table.py on that run's log,
    whose table lands in the same log."""
    calls = tmp_path / "calls.txt"
    log = f"for a in \"$@\"; do printf '%s|' \"$a\" >> '{calls}'; done; echo >> '{calls}'; echo '| a table row |'"
    tools = {"nvidia-smi": "echo 'NVIDIA H100 80GB HBM3'", "python3": log, "ncu": f"printf 'ncu|' >> '{calls}'; {log}"}
    proc = _run_with_stand_ins(tmp_path, tools, PARTS="diagnostics", DIAG_ARGS="--walk fixed,experts")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line.split("|") for line in calls.read_text().splitlines() if line]
    timed = [args for args in lines if args[0] == "benchmarks/profile_ws_gemm.py"]
    assert [args[args.index("--shape") + 1] for args in timed] == ["deepseek-v3 shard 32", "mixtral-8x7b"]
    forms = "none,no_loads,no_math,no_promote"
    assert all(args[args.index("--diagnostic") + 1] == forms for args in timed)
    profiled = [args for args in lines if args[0] == "ncu"]
    assert len(profiled) == 1
    mine = profiled[0]
    assert mine[mine.index("--shape") + 1] == "deepseek-v3 shard 32" and mine[mine.index("--diagnostic") + 1] == forms
    assert mine[mine.index("--walk") + 1] == "fixed,experts" and "SpeedOfLight" in mine
    table = [args for args in lines if args[0] == "benchmarks/ncu_details_table.py"]
    assert len(table) == 1 and os.path.basename(table[0][1]).startswith("ncu_diagnostics_")
    with tarfile.open(tmp_path / "out" / "gpu_one_h200.tar.gz") as bundle:
        member = next(n for n in bundle.getnames() if os.path.basename(n).startswith("ncu_diagnostics_"))
        text = bundle.extractfile(member).read().decode()
    assert "## the profiled kernels" in text and "| a table row |" in text


@pytest.mark.skipif(os.name != "posix", reason="a bash script and a stand-in tool with a shebang")
def test_deepgemm_ncu_without_multicast_profiles_a_patched_second_build(tmp_path):
    """Part `deepgemm` with DEEPGEMM_NCU and DEEPGEMM_NO_MULTICAST: after DeepGEMM's calls and ours, a second build
    from a copy of the sources whose SM90 heuristic disables multicast, and DeepGEMM's calls again under ncu from
    it (first on the path); the sources sent stay as they were. Without DEEPGEMM_SRC the part fails and says so."""
    calls = tmp_path / "calls.txt"
    src = tmp_path / "dgsrc"
    (src / "csrc" / "jit_kernels" / "heuristics").mkdir(parents=True)
    header = src / "csrc" / "jit_kernels" / "heuristics" / "sm90.hpp"
    header.write_text("        const bool disable_multicast =\n            (x > 4);\n")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "a-1.whl").write_text("")
    log = (f"for a in \"$@\"; do printf '%s|' \"$a\" >> '{calls}'; done; echo >> '{calls}'; "
           f"if [ \"$1\" = benchmarks/deepgemm_build.py ]; then "
           f"grep -h 'disable_multicast' \"$3/csrc/jit_kernels/heuristics/sm90.hpp\" >> '{calls}'; fi")
    path_log = f"echo \"PYTHONPATH=$PYTHONPATH\" >> '{calls}'"
    tools = {"nvidia-smi": "echo 'NVIDIA H100 80GB HBM3'", "python3": log,
             "ncu": f"{path_log}; printf 'ncu|' >> '{calls}'; {log}"}
    proc = _run_with_stand_ins(tmp_path, tools, PARTS="deepgemm", DEEPGEMM_WHEELS=f"{wheels}/*.whl",
                               DEEPGEMM_SRC=str(src), DEEPGEMM_NCU="ds32 T=8192 gate_up", DEEPGEMM_NO_MULTICAST="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = calls.read_text()
    builds = [line.split("|") for line in text.splitlines() if line.startswith("benchmarks/deepgemm_build.py")]
    assert len(builds) == 2 and builds[0][2] == str(src) and builds[1][2] != str(src)
    assert "const bool disable_multicast = true or" in text                   # the second build's copy, patched
    assert header.read_text().startswith("        const bool disable_multicast =\n")      # the sources sent: as sent
    profiled = [line for line in text.splitlines() if line.startswith("ncu|")]
    assert len(profiled) == 3 and "deepgemm_probe.py" in profiled[2] and "profile_ws_gemm.py" in profiled[1]
    paths = [line for line in text.splitlines() if line.startswith("PYTHONPATH=")]
    assert paths[2].split("=", 1)[1].split(":")[0] == builds[1][1]          # the patched build first on the path
    calls.unlink()
    proc = _run_with_stand_ins(tmp_path, tools, PARTS="deepgemm", DEEPGEMM_WHEELS=f"{wheels}/*.whl",
                               DEEPGEMM_NCU="ds32 T=8192 gate_up", DEEPGEMM_NO_MULTICAST="1")
    assert "DEEPGEMM_NO_MULTICAST takes DEEPGEMM_SRC" in proc.stdout + proc.stderr + _bundled_log(tmp_path)


@pytest.mark.skipif(os.name != "posix", reason="a bash script and a stand-in tool with a shebang")
def test_deepgemm_without_multicast_needs_the_calls_to_profile_and_zero_leaves_it_off(tmp_path):
    """DEEPGEMM_NO_MULTICAST without DEEPGEMM_NCU stops the part before anything runs, saying why; set to 0 it is
    off (one build, two ncu runs)."""
    calls = tmp_path / "calls.txt"
    log = f"for a in \"$@\"; do printf '%s|' \"$a\" >> '{calls}'; done; echo >> '{calls}'"
    tools = {"nvidia-smi": "echo 'NVIDIA H100 80GB HBM3'", "python3": log, "ncu": f"printf 'ncu|' >> '{calls}'; {log}"}
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "a-1.whl").write_text("")
    proc = _run_with_stand_ins(tmp_path, tools, PARTS="deepgemm", DEEPGEMM_WHEELS=f"{wheels}/*.whl",
                               DEEPGEMM_SRC=str(tmp_path), DEEPGEMM_NO_MULTICAST="1")
    assert proc.returncode == 2 and "DEEPGEMM_NO_MULTICAST takes DEEPGEMM_NCU" in proc.stdout
    assert not calls.exists()
    proc = _run_with_stand_ins(tmp_path, tools, PARTS="deepgemm", DEEPGEMM_WHEELS=f"{wheels}/*.whl",
                               DEEPGEMM_SRC=str(tmp_path), DEEPGEMM_NCU="ds32 T=8192 gate_up", DEEPGEMM_NO_MULTICAST="0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = calls.read_text().splitlines()
    assert sum(line.startswith("benchmarks/deepgemm_build.py") for line in lines) == 1
    assert sum(line.startswith("ncu|") for line in lines) == 2
