"""Compiling a Triton kernel for Hopper (sm_90) without a GPU: what tests check in the PTX and the resource
report that the interpreter cannot show (vector widths, memory scopes, registers, local memory)."""
from __future__ import annotations

import os
import re
import subprocess
import tempfile


class CrossCompileUnavailable(RuntimeError):
    """This Triton build cannot compile for CUDA here (no CUDA backend tools)."""


def compile_for_hopper(fn, types: list[str], const: dict, ints16=("H",), num_warps: int | None = None):
    """`fn` compiled for sm_90 with argument `types` (Triton signature strings, constexprs left out) and
    the constexpr values `const`; pointers, and the integers named in `ints16`, marked 16-byte divisible as
    a real launch specializes them. Returns Triton's compiled kernel (`.asm["ptx"]`, `.asm["cubin"]`)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    names = fn.arg_names
    sig = {n: t for n, t in zip(names, types)}
    attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(types) if t.startswith("*")}
    for n in ints16:
        if n in names:
            attrs[(names.index(n),)] = [["tt.divisibility", 16]]
    for name in const:
        sig[name] = "constexpr"
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()}, attrs=attrs)
    options = {} if num_warps is None else {"num_warps": num_warps}
    try:
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    except RuntimeError as exc:
        if "ptxas" in str(exc) or "backend" in str(exc).lower():
            raise CrossCompileUnavailable(f"this triton cannot cross-compile for CUDA: {exc}") from exc
        raise


def resource_usage(compiled) -> dict:
    """{"REG", "STACK", "SHARED", "LOCAL"} of a compiled kernel's cubin (cuobjdump -res-usage, the one
    Triton ships), or {} where it cannot be read."""
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool) or "cubin" not in compiled.asm:
        return {}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        out = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True).stdout
    return {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", out)}
