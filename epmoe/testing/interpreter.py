"""Running a test file's Triton kernels under the interpreter, in a child process.

The interpreter must be switched on before Triton is imported, and a GPU test run in the same process
must not be interpreted; so a test file that needs it runs itself again in a child with
TRITON_INTERPRET=1 (and no visible GPU), and the parent only checks the child's result. Such a file
starts with the one header `interpreted_file` gives:

    from epmoe.testing.interpreter import INTERPRETING, interpreted_file

    pytestmark, test_under_the_interpreter = interpreted_file(__file__)

    if INTERPRETING:
        ...   # the file's tests (and its imports of the kernels)
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def interpreted_file(test_file: str):
    """(pytestmark, the parent's test) of a test file whose tests run under the interpreter: the mark skips
    the file where triton is not installed; the test, in the parent process, runs the file again in a child
    under the interpreter (`run_interpreted`), and is None in that child, which runs the file's own tests."""
    import pytest     # only test files call this

    mark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                              reason="triton is not installed (pip install 'epmoe[triton]')")
    if INTERPRETING:
        return mark, None

    def test_under_the_interpreter():
        run_interpreted(test_file)
    return mark, test_under_the_interpreter


def run_interpreted(test_file: str, timeout_s: float = 600, select: str | None = None) -> None:
    """Run `test_file` with pytest under the Triton interpreter (`select`: only the tests that pytest's
    `-k` expression picks); fail with its output unless it passed."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(test_file)))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""),
               CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                           *(["-k", select] if select else []), os.path.abspath(test_file)], env=env, cwd=root,
                          capture_output=True, text=True, timeout=timeout_s)
    assert proc.returncode == 0, f"interpreter tests failed:\n{proc.stdout[-8000:]}\n{proc.stderr[-4000:]}"
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert " passed" in last and "skipped" not in last, proc.stdout[-2000:]
