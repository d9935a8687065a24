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

import functools
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


# A kernel whose loop runs over one of its arguments, as most of the library's kernels loop over a length
_LOOP_PROBE = """
import torch, triton, triton.language as tl
@triton.jit
def loop_over_argument(x_ptr, n, C: tl.constexpr):
    acc = tl.zeros([C], dtype=tl.int32)
    for _ in range(0, n, C):
        acc += 1
    tl.store(x_ptr + tl.arange(0, C), acc)
x = torch.zeros(16, dtype=torch.int32)
loop_over_argument[(1,)](x, 40, C=16)
assert x.tolist() == [3] * 16, x.tolist()
"""


@functools.lru_cache(maxsize=None)
def interpreter_refusal() -> str | None:
    """Why this environment's Triton interpreter cannot run the library's kernels (None: it can). Triton 3.6's
    interpreter hands a kernel's integer argument over as a one-element array, which `range()` cannot take
    under NumPy 2.4 ("only 0-dimensional arrays can be converted to Python scalars"; NumPy 2.3 and Triton 3.9
    run it): a small kernel that loops over an argument is run in a child process, once per test session."""
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    try:
        proc = subprocess.run([sys.executable, "-c", _LOOP_PROBE], env=env, capture_output=True, text=True,
                              timeout=120)
    except subprocess.TimeoutExpired:
        return None          # not the known fault: the file's own run shows what is wrong
    if proc.returncode == 0 or "only 0-dimensional arrays can be converted" not in proc.stderr:
        return None          # it runs, or fails otherwise: the file's own run shows that failure whole
    return (f"this Triton's interpreter (Triton {_installed('triton')}, NumPy {_installed('numpy')}) cannot loop "
            f"over a kernel's integer argument: Triton 3.6's interpreter with NumPy 2.4 fails so; Triton 3.9, or "
            f"NumPy 2.3, runs these tests")


def _installed(package: str) -> str:
    """The installed version of `package` (read from its metadata: nothing imported), or '?'."""
    from importlib import metadata
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "?"


def run_interpreted(test_file: str, timeout_s: float = 600, select: str | None = None) -> None:
    """Run `test_file` with pytest under the Triton interpreter (`select`: only the tests that pytest's
    `-k` expression picks); fail with its output unless it passed; skip where the interpreter cannot run the
    library's kernels at all (`interpreter_refusal`)."""
    import pytest     # only tests call this

    why = interpreter_refusal()
    if why:
        pytest.skip(why)
    root = os.path.dirname(os.path.dirname(os.path.abspath(test_file)))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""),
               CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                           *(["-k", select] if select else []), os.path.abspath(test_file)], env=env, cwd=root,
                          capture_output=True, text=True, timeout=timeout_s)
    assert proc.returncode == 0, f"interpreter tests failed:\n{proc.stdout[-8000:]}\n{proc.stderr[-4000:]}"
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert " passed" in last and "skipped" not in last, proc.stdout[-2000:]
