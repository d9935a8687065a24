"""Running a test file's Triton kernels under the interpreter, in a child process.

The interpreter must be switched on before Triton is imported, and a GPU test run in the same process
must not be interpreted; so a test file that needs it runs itself again in a child with
TRITON_INTERPRET=1 (and no visible GPU), and the parent only checks the child's result.
"""
from __future__ import annotations

import os
import subprocess
import sys

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def run_interpreted(test_file: str, timeout_s: float = 600) -> None:
    """Run `test_file` with pytest under the Triton interpreter; fail with its output unless it passed."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(test_file)))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""),
               CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                           os.path.abspath(test_file)], env=env, cwd=root, capture_output=True, text=True,
                          timeout=timeout_s)
    assert proc.returncode == 0, f"interpreter tests failed:\n{proc.stdout[-8000:]}\n{proc.stderr[-4000:]}"
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert " passed" in last and "skipped" not in last, proc.stdout[-2000:]
