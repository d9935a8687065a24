"""Every Triton function of a kernel module keyed at its import, the functions it calls first.

Triton 3.6 and older fold into a function's cache key the `constexpr` globals of the functions it calls only when
those were keyed before it (a callee's globals are merged before its own key is computed), so one kernel has two
keys, depending on what a process launched first. `moe_gemm_kernel` is keyed one way in a process that quantized
activations to FP8 first (`fp8_quantize_groups`, under the GEMM's epilogue, keyed then) and another in one that
launched the GEMM first; Triton's disk cache misses between them, and `epmoe tune`'s timing process compiled again,
one after another, every candidate its workers had compiled. Keying each function after the functions it calls
gives every process the key newer Tritons give whatever the order. Each kernel module calls
`key_callees_first(globals())` last; the modules it imports have done the same, so their functions are keyed.
"""
from __future__ import annotations

import ast
import textwrap
from types import ModuleType


def _callees(fn, jit_type) -> list:
    """The Triton functions `fn`'s source names: global names and `module.name` attributes, as Triton resolves them
    when it keys `fn`."""
    found = []
    scope = fn.__globals__
    for node in ast.walk(ast.parse(textwrap.dedent(fn.src))):
        value = None
        if isinstance(node, ast.Name):
            value = scope.get(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            owner = scope.get(node.value.id)
            value = getattr(owner, node.attr, None) if isinstance(owner, ModuleType) else None
        if isinstance(value, jit_type) and value is not fn:
            found.append(value)
    return found


def key_callees_first(namespace: dict) -> None:
    """Compute the cache key of every Triton function in `namespace` (a module's globals), each after those it
    calls (depth first). A function already keyed is left as it is. Under the interpreter (`TRITON_INTERPRET=1`)
    nothing is compiled, so nothing is keyed: its kernels are no longer Triton functions Triton can key, and a
    Gluon kernel calling one would fail."""
    from triton import knobs
    if knobs.runtime.interpret:
        return
    try:
        from triton.runtime.jit import JITCallable as jit_type
    except ImportError:                              # a Triton without it: its Triton functions are JITFunctions
        from triton.runtime.jit import JITFunction as jit_type
    done: set[int] = set()

    def visit(fn) -> None:
        if id(fn) in done:
            return
        done.add(id(fn))
        if getattr(fn, "hash", None) is None:
            for callee in _callees(fn, jit_type):
                visit(callee)
        fn.cache_key                                 # the property computes the key and keeps it
    for value in list(namespace.values()):
        if isinstance(value, jit_type):
            visit(value)
