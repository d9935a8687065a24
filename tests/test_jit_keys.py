"""Each Triton function of the kernel modules is keyed at import, after the functions it calls, so that every
process gives a kernel one cache key (epmoe.kernels.jit_keys). Triton 3.6 keyed `moe_gemm_kernel` one way in a
process that had quantized to FP8 first and another where the GEMM came first, and the tuner's timing process
compiled again every candidate its workers had compiled."""
import importlib
import json
import os
import pkgutil
import subprocess
import sys
import textwrap

import pytest

triton = pytest.importorskip("triton", reason="the kernel modules and their keys are Triton's")


def _kernel_modules() -> list[str]:
    import epmoe.kernels
    return [m.name for m in pkgutil.iter_modules(epmoe.kernels.__path__, "epmoe.kernels.")]


def test_every_triton_function_of_the_kernel_modules_is_keyed_at_import():
    from triton.runtime.jit import JITFunction
    seen = 0
    for name in _kernel_modules():
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if isinstance(value, JITFunction) and value.__module__ == name:
                seen += 1
                assert value.hash is not None, f"{name}.{attr} was not keyed at import"
    assert seen >= 30, seen        # the GEMM, its helpers, quantization, alignment, dispatch, the Gluon GEMM ...


_KEY_AFTER = textwrap.dedent("""
    import importlib, json, sys
    first = sys.argv[1]
    if first:                                   # a process whose first launch is FP8 quantization
        module, name = first.rsplit(".", 1)
        getattr(importlib.import_module(module), name).cache_key
    from epmoe.kernels import fused_moe
    print(json.dumps(fused_moe.moe_gemm_kernel.cache_key))
""")


def test_the_gemm_has_one_key_whatever_a_process_keyed_first():
    keys = set()
    for first in ("", "epmoe.kernels.fp8_quant._fp8_quant_kernel", "epmoe.kernels.fp8_quant.fp8_quantize_groups"):
        run = subprocess.run([sys.executable, "-c", _KEY_AFTER, first], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        keys.add(json.loads(run.stdout.splitlines()[-1]))
    assert len(keys) == 1, keys


def test_callees_are_keyed_before_their_callers(tmp_path, monkeypatch):
    """Functions defined caller first, one calling the next through a module attribute: keyed leaf first."""
    (tmp_path / "chain_kernels.py").write_text(textwrap.dedent("""
        import triton
        import triton.language as tl
        import chain_kernels as me

        SHIFT = tl.constexpr(3)

        @triton.jit
        def top(x):
            return me.mid(x) * 2

        @triton.jit
        def mid(x):
            return leaf(x) + 1

        @triton.jit
        def leaf(x):
            return x + SHIFT
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    chain = importlib.import_module("chain_kernels")
    from epmoe.kernels import jit_keys
    from triton.runtime.jit import JITFunction
    assert [f.__name__ for f in jit_keys._callees(chain.top, JITFunction)] == ["mid"]
    assert [f.__name__ for f in jit_keys._callees(chain.mid, JITFunction)] == ["leaf"]
    order = []
    real = type(chain.top).cache_key

    def recording(self):
        if self.hash is None:
            order.append(self.__name__)
        return real.fget(self)
    monkeypatch.setattr(type(chain.top), "cache_key", property(recording))
    jit_keys.key_callees_first(vars(chain))
    assert order[:3] == ["leaf", "mid", "top"], order
    assert all(f.hash is not None for f in (chain.top, chain.mid, chain.leaf))
    # the caller's key holds its callee's constexpr global: SHIFT, two calls down
    assert ("SHIFT", chain.SHIFT) in [(name, val) for (name, _), (val, _) in chain.top.used_global_vals.items()]


def test_under_the_interpreter_the_kernel_modules_import_and_nothing_is_keyed():
    """Interpreted kernels cannot be keyed (a Gluon kernel calling one made Triton refuse it), and nothing is
    compiled there: every kernel module imports, and no function is keyed."""
    code = textwrap.dedent("""
        import importlib, json, sys
        from triton.runtime.jit import JITFunction
        keyed = []
        for name in sys.argv[1:]:
            module = importlib.import_module(name)
            keyed += [f"{name}.{a}" for a, v in vars(module).items() if isinstance(v, JITFunction) and v.hash]
        print(json.dumps(keyed))
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    run = subprocess.run([sys.executable, "-c", code, *_kernel_modules()], capture_output=True, text=True,
                         timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout.splitlines()[-1]) == []
