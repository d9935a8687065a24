"""`benchmarks/gpu_one_h200.sh` on the CPU, with a stand-in for nvidia-smi: ONLY_ON stops the script before any part
runs where the GPU is another, and lets it on where the GPU is the one named (an unknown part then stops it, so
nothing real runs either way)."""
import os
import stat
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_one_h200.sh")


def _run(tmp_path, gpu_name: str, only_on: str | None):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    tool = bin_dir / "nvidia-smi"
    tool.write_text(f"#!/bin/sh\necho '{gpu_name}'\n")
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", OUT=str(tmp_path / "out"),
               PARTS="no_such_part", COMMIT="0" * 40)
    env.pop("ONLY_ON", None)
    if only_on is not None:
        env["ONLY_ON"] = only_on
    return subprocess.run(["bash", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


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
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.txt"
    for name, body in (("nvidia-smi", "echo 'NVIDIA H200'"),
                       ("python3", f"echo \"$*\" >> '{calls}'\n"
                                   "case \"$*\" in *tune_audit*) echo '--presets gpt-oss-120b --tokens 8192';; "
                                   "*) echo NVIDIA_H200;; esac")):
        tool = bin_dir / name
        tool.write_text(f"#!/bin/sh\n{body}\n")
        tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", OUT=str(tmp_path / "out"),
               PARTS="gluon_tune", COMMIT="0" * 40, GLUON_TUNE_SETS="mixtral audit", GLUON_TUNE_EXTRA="--follow")
    env.pop("ONLY_ON", None)
    proc = subprocess.run(["bash", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tunes = [line for line in calls.read_text().splitlines() if line.startswith("-m epmoe tune")]
    assert tunes == [
        "-m epmoe tune --gluon --presets mixtral-8x7b --formats fp8_block,bf16 --tokens 1024,8192 --follow",
        "-m epmoe tune --gluon --presets gpt-oss-120b --tokens 8192 --follow"]


@pytest.mark.skipif(os.name != "posix", reason="a bash script and stand-in tools with a shebang")
@pytest.mark.parametrize("sources", [None, "src dir;touch${IFS}hit2"])
def test_deepgemm_installs_the_wheels_into_a_folder_of_its_own_and_runs_the_probe_from_it(tmp_path, sources):
    """Part `deepgemm`: the wheels DEEPGEMM_WHEELS names (globs, expanded; a name with shell metacharacters stays
    one harmless word) go into a fresh folder, and the probe runs with that folder first on its path and a CUDA_HOME;
    the folder is gone afterwards (python3 stood in for by a script that logs its arguments and environment). With
    DEEPGEMM_SRC, the module is built from those sources into that folder between the install and the probe (the
    folder's name one word, however it is spelt); without it, nothing is built."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.txt"
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "a-1.whl").write_text("")
    for name, body in (("nvidia-smi", "echo 'NVIDIA H200'"),
                       ("python3", f"echo \"$* | PYTHONPATH=$PYTHONPATH CUDA_HOME=$CUDA_HOME\" >> '{calls}'")):
        tool = bin_dir / name
        tool.write_text(f"#!/bin/sh\n{body}\n")
        tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", OUT=str(tmp_path / "out"),
               PARTS="deepgemm", COMMIT="0" * 40, DEEPGEMM_WHEELS=f"{wheels}/*.whl x;touch${{IFS}}{tmp_path}/hit")
    env.pop("ONLY_ON", None)
    env.pop("CUDA_HOME", None)
    env.pop("DEEPGEMM_SRC", None)
    if sources is not None:
        env["DEEPGEMM_SRC"] = sources
    proc = subprocess.run(["bash", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = calls.read_text().splitlines()
    install = next(line for line in lines if line.startswith("-m pip install"))
    probe = next(line for line in lines if line.startswith("benchmarks/deepgemm_probe.py"))
    folder, *named = install.split(" | ")[0].split("--target ")[1].split()
    assert named == [f"{wheels}/a-1.whl", f"x;touch${{IFS}}{tmp_path}/hit"]
    assert f"PYTHONPATH={folder}:." in probe and "CUDA_HOME=/usr/local/cuda" in probe
    assert not os.path.exists(folder) and not (tmp_path / "hit").exists()
    builds = [i for i, line in enumerate(lines) if line.startswith("benchmarks/deepgemm_build.py")]
    if sources is None:
        assert builds == []
    else:
        assert len(builds) == 1 and lines.index(install) < builds[0] < lines.index(probe)
        assert lines[builds[0]].split(" | ")[0] == f"benchmarks/deepgemm_build.py {folder} {sources}"
        assert not (tmp_path / "hit2").exists() and not os.path.exists(os.path.join(ROOT, "hit2"))
