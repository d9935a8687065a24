"""Cross-compile the fused MoE kernels for sm_90 without a GPU and print their resource use (from the cubin).

    PYTHONPATH=/path/to/triton-3.6:. python -m epmoe.kernels.xcompile [--ir DIR] [--only RE] [--table JSON]

Uses `triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))` with the pointer arguments
marked 16-byte divisible (what the JIT specializes on a real launch; without it the loads are not
pipelined), except those the kernel does not specialize on alignment, then `cuobjdump -res-usage` on the
cubin. Registers, local memory (spills) and shared memory
per kernel configuration, the local accesses inside its K loops and its SASS length; with --table, every
configuration of a tuning table as well; with --ir, the TTGIR and PTX of each are written there (to check
pipelining and wgmma). `compile_for_hopper` and `resource_usage` do the same for any kernel (the tests use
them).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import fused_moe

# fmt: "bf16", "fp16", "fp8" (128 x 128 weight blocks, activations per 128 columns) or "fp8_channel" (per-token
# activations, per-channel weights: scales applied after the K loop)
# name -> (kernel, H, I, k, fmt, BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, tma, persistent, tile_mode[, promote
#          [, tma_a[, activation[, split_k[, swap_ab[, maxnreg[, stack_gate_up]]]]]]])
CASES = {
    "gu_bf16_deepseek": ("gate_up", 7168, 2048, 8, "bf16", 128, 128, 64, 8, 4, False, False, 0),
    "gu_bf16_deepseek_P": ("gate_up", 7168, 2048, 8, "bf16", 128, 128, 64, 8, 4, False, True, 0),
    "gu_bf16_qwen3_tma": ("gate_up", 2048, 768, 8, "bf16", 128, 128, 64, 8, 4, True, False, 0),
    "gu_bf16_qwen3_tma_P": ("gate_up", 2048, 768, 8, "bf16", 128, 128, 64, 8, 4, True, True, 0),
    "dn_bf16_qwen3": ("down", 2048, 768, 8, "bf16", 128, 256, 64, 8, 4, False, False, 0),
    "dn_bf16_qwen3_P": ("down", 2048, 768, 8, "bf16", 128, 256, 64, 8, 4, False, True, 0),
    "dn_bf16_deepseek_tma": ("down", 7168, 2048, 8, "bf16", 128, 256, 64, 8, 4, True, False, 0),
    "dn_bf16_deepseek_tma_P": ("down", 7168, 2048, 8, "bf16", 128, 256, 64, 8, 4, True, True, 0),
    "dn_bf16_gptoss_list_P": ("down", 2880, 2880, 4, "bf16", 128, 256, 64, 8, 4, True, True, 1),
    "dn_fp16_qwen3": ("down", 2048, 768, 8, "fp16", 128, 128, 64, 8, 3, False, False, 0),    # float32 intermediate
    "dn_fp16_qwen3_tma": ("down", 2048, 768, 8, "fp16", 128, 128, 64, 8, 3, True, False, 0),
    "gu_fp8_deepseek": ("gate_up", 7168, 2048, 8, "fp8", 128, 128, 128, 8, 3, False, False, 0),
    "gu_fp8_deepseek_P": ("gate_up", 7168, 2048, 8, "fp8", 128, 128, 128, 8, 3, False, True, 0),
    "dn_fp8_deepseek": ("down", 7168, 2048, 8, "fp8", 128, 128, 128, 8, 4, False, False, 0),
    "dn_fp8_deepseek_P": ("down", 7168, 2048, 8, "fp8", 128, 128, 128, 8, 4, False, True, 0),
    "dn_fp8_deepseek_tma_a_P": ("down", 7168, 2048, 8, "fp8", 128, 128, 128, 8, 3, True, True, 0, "sync", True),
    "dn_bf16_deepseek_tma_a_P": ("down", 7168, 2048, 8, "bf16", 128, 256, 64, 8, 3, True, True, 0, "sync", True),
    "gu_fp8_deepseek_rescale": ("gate_up", 7168, 2048, 8, "fp8", 128, 128, 128, 8, 3, True, False, 0, "rescale"),
    "gu_fp8_deepseek_rescale_s4": ("gate_up", 7168, 2048, 8, "fp8", 128, 128, 128, 8, 4, False, False, 0, "rescale"),
    "dn_fp8_deepseek_rescale256": ("down", 7168, 2048, 8, "fp8", 128, 256, 128, 8, 3, True, False, 0, "rescale"),
    "dn_fp8_deepseek_rescale128": ("down", 7168, 2048, 8, "fp8", 128, 128, 128, 8, 4, True, False, 0, "rescale"),
    "gu_fp8ch_mixtral": ("gate_up", 4096, 14336, 2, "fp8_channel", 128, 128, 128, 8, 3, False, False, 0),
    "dn_fp8ch_mixtral": ("down", 4096, 14336, 2, "fp8_channel", 128, 128, 128, 8, 4, False, False, 0),
}


def compile_case(kernel, H, I, k, fmt, bm, bn, bk, warps, stages, tma, persistent, tile_mode, promote="sync",
                 tma_a=False, activation=0, split_k=1, swap_ab=False, maxnreg=None, stack_gate_up=False):
    channel = fmt == "fp8_channel"        # per-token activations, one weight scale per output row
    fp8 = fmt == "fp8" or channel
    block_scales = fp8 and not channel
    el = "fp8e4nv" if fp8 else "fp16" if fmt == "fp16" else "bf16"
    out = "fp16" if fmt == "fp16" else "bf16"
    fn = fused_moe.moe_gemm_kernel
    names = fn.arg_names
    n_ptr = names.index("num_pairs")
    sig, attrs = {}, {}
    gate_up = kernel == "gate_up"
    rescale = block_scales and promote == "rescale"
    # pointer element types per argument, in order: a, w, bias, out, out_scale, a_scale, w_scale,
    # topk_weights, sorted_ids, block_expert, num_padded, counts
    if gate_up:
        types = [el, el, "fp32", "fp8e4nv" if block_scales else out, "fp32", "fp32", "fp32", "fp32"]
    else:
        a = "fp8e4nv" if fp8 else "fp32" if fmt == "fp16" else "bf16"     # fused_moe.intermediate_dtype
        types = [a, el, "fp32", out, "fp32", "fp32", "fp32", "fp32"]
    types += ["i32"] * 4
    if tma:
        types[1] = f"tensordesc<{el}[{bn // 2 if rescale and not gate_up else bn}, {bk}]>"
    tma_a = tma_a and not gate_up
    if tma_a:
        types[0] = f"tensordesc<{types[0]}[{bm}, {bk}]>"
    for i, t in enumerate(types):
        sig[names[i]] = t if t.startswith("tensordesc") else "*" + t
        if not t.startswith("tensordesc") and not fn.params[i].do_not_specialize_on_alignment:
            attrs[(i,)] = [["tt.divisibility", 16]]       # as the JIT marks an aligned pointer it specializes
    sig["num_pairs"] = "i32"
    sig["capacity"] = "i32"
    const = dict(GATE_UP=gate_up, H=H, I=I, TOP_K=k, HAS_BIAS=False, BATCHED=False, FP8=fp8,
                 A_SCALE_PER_BLOCK=block_scales, W_SCALE_PER_BLOCK=block_scales, SCALE_BLOCK_N=128,
                 DOT_PRECISION="tf32", W_DESC=tma, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
                 TILE_MODE=tile_mode, W_SCALE_SCALAR=block_scales, PERSISTENT=persistent, RESCALE=rescale,
                 ACTIVATION=activation, OUT_FP8=block_scales and gate_up, APPLY_WEIGHT=not gate_up, A_DESC=tma_a,
                 SPLIT_K=split_k, SWAP_AB=swap_ab, STACK_GU=stack_gate_up)
    for name in names[n_ptr + 2:]:
        sig[name] = "constexpr"
    src = ASTSource(fn, sig, constexprs=const, attrs=attrs)
    options = dict(num_warps=warps, num_stages=stages)
    if maxnreg is not None:
        options["maxnreg"] = maxnreg
    return compile_source_for_hopper(src, options)


class CrossCompileUnavailable(RuntimeError):
    """This Triton build cannot compile for CUDA here (no CUDA backend tools)."""


def compile_for_hopper(fn, types: list[str], const: dict, ints16=("H",), num_warps: int | None = None,
                       unaligned=()):
    """`fn` compiled for sm_90 with argument `types` (Triton signature strings, constexprs left out) and
    the constexpr values `const`; pointers (but those named in `unaligned`), and the integers named in `ints16`,
    marked 16-byte divisible as a real launch specializes them. Returns Triton's compiled kernel
    (`.asm["ptx"]`, `.asm["cubin"]`)."""
    names = fn.arg_names
    sig = {n: t for n, t in zip(names, types)}
    attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(types)
             if t.startswith("*") and names[i] not in unaligned}
    for n in ints16:
        if n in names:
            attrs[(names.index(n),)] = [["tt.divisibility", 16]]
    for name in const:
        sig[name] = "constexpr"
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()}, attrs=attrs)
    return compile_source_for_hopper(src, {} if num_warps is None else {"num_warps": num_warps})


def compile_source_for_hopper(src, options: dict):
    """`triton.compile` of a prepared source (`ASTSource`, Gluon's `GluonASTSource`) for sm_90;
    `CrossCompileUnavailable` where this Triton build has no CUDA tools."""
    try:
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    except RuntimeError as exc:
        if "ptxas" in str(exc) or "backend" in str(exc).lower():
            raise CrossCompileUnavailable(f"this triton cannot cross-compile for CUDA: {exc}") from exc
        raise


def _cuobjdump(compiled, flag: str) -> str | None:
    """`cuobjdump <flag>` of a compiled kernel's cubin (the one Triton ships), or None where it cannot run."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool) or "cubin" not in compiled.asm:
        return None
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        return subprocess.run([tool, flag, path], capture_output=True, text=True).stdout


def resource_usage(compiled) -> dict:
    """{"REG", "STACK", "SHARED", "LOCAL"} of a compiled kernel's cubin (cuobjdump -res-usage), or {} where
    it cannot be read."""
    out = _cuobjdump(compiled, "-res-usage")
    return {} if out is None else {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", out)}


_BRANCH = re.compile(r"\bBRA\s+(?:`\()?(0x[0-9a-fA-F]+)")


def mma_loops(addrs: list[int], code: list[str]) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """In SASS given as instruction addresses and texts: (every loop, the K loops), each as (first, last)
    indices. A loop is a branch back to a lower address that is an instruction's; a K loop is an innermost
    loop whose body issues a GMMA."""
    at = {a: i for i, a in enumerate(addrs)}
    loops = []
    for i, (a, ins) in enumerate(zip(addrs, code)):
        m = _BRANCH.search(ins)
        if m and int(m.group(1), 16) < a and int(m.group(1), 16) in at:
            loops.append((at[int(m.group(1), 16)], i))
    k_loops = [(f, l) for f, l in loops if any("GMMA" in c for c in code[f:l + 1])
               and not any(f <= f2 and l2 <= l and (f2, l2) != (f, l) for f2, l2 in loops)]
    return loops, k_loops


def instructions_in_mma_loops(compiled, opcodes: str) -> int | None:
    """How many instructions whose opcode matches the regular expression `opcodes` (predicated or not) the
    SASS has inside its K loops (`mma_loops`), or None where the SASS cannot be read."""
    sass = _cuobjdump(compiled, "-sass")
    if sass is None:
        return None
    found = re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)
    code = [ins for _, ins in found]
    _, k_loops = mma_loops([int(a, 16) for a, _ in found], code)
    op = re.compile(rf"(@!?U?P\w+\s+)?({opcodes})\b")
    return sum(bool(op.match(c)) for f, l in k_loops for c in code[f:l + 1])


def local_accesses_in_mma_loops(compiled) -> int | None:
    """How many local-memory loads and stores (LDL / STL: spills) the SASS has inside its K loops
    (`mma_loops`), or None where the SASS cannot be read. Values a kernel parks on the stack once per tile,
    outside its K loops, cost nothing next to one spill per K block."""
    return instructions_in_mma_loops(compiled, "LDL|STL")


def table_cases(path: str) -> dict:
    """The FP8-block and BF16 GEMM configurations of a tuning table (`epmoe/kernels/configs/*.json`) as
    `CASES` entries: every T's gate+up and down tile, and its tail tile where it has one."""
    import json
    with open(path) as f:
        entries = json.load(f)["entries"]
    cases = {}
    for key, per_t in entries.items():
        shape = dict(kv.split("=") for kv in key.split(","))
        fmt = {"fp8_block": "fp8", "bfloat16": "bf16"}.get(shape["fmt"])
        if fmt is None:
            continue
        for T, c in per_t.items():
            tiles = [(c["block_m"], 1 if c.get("tail_m") else 0)] + ([(c["tail_m"], 1)] if c.get("tail_m") else [])
            for kernel in ("gate_up", "down"):
                g = c[kernel]
                for bm, mode in tiles:
                    name = f"{key}:T{T}:{kernel}:bm{bm}"
                    cases[name] = (kernel, int(shape["H"]), int(shape["I"]), int(shape["k"]), fmt, bm, g["block_n"],
                                   g["block_k"], g["num_warps"], g["num_stages"], g.get("tma", False),
                                   g.get("persistent", False), mode, g.get("promote", "sync"), g.get("tma_a", False),
                                   0, g.get("split_k", 1), g.get("swap_ab", False), g.get("max_registers") or None,
                                   g.get("stack_gate_up", False))
    return cases


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--ir", default=None, help="write TTGIR and PTX of each case here")
    p.add_argument("--only", default=None, help="regex of case names")
    p.add_argument("--table", default=None, help="also every FP8-block and BF16 configuration of this tuning table "
                                                 "(a JSON of epmoe/kernels/configs)")
    args = p.parse_args()
    print(f"triton {triton.__version__}")
    cases = {**CASES, **(table_cases(args.table) if args.table else {})}
    for name, case in cases.items():
        if args.only and not re.search(args.only, name):
            continue
        try:
            c = compile_case(*case)
        except Exception as exc:
            print(f"{name:28s} FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
            continue
        ptx = c.asm["ptx"]
        ttgir = c.asm["ttgir"]
        wgmma = ptx.count("wgmma.mma_async")
        cp_async = ptx.count("cp.async.cg") + ptx.count("cp.async.ca")
        tma_ld = ptx.count("cp.async.bulk.tensor")
        use = resource_usage(c)
        sass = _cuobjdump(c, "-sass")
        n_sass = "?" if sass is None else len(re.findall(r"/\*[0-9a-f]{4,}\*/\s+[^;]*;", sass))
        print(f"{name:28s} regs {use.get('REG', '?')} local {use.get('LOCAL', '?')} stack {use.get('STACK', '?')} "
              f"smem {c.metadata.shared // 1024} KB  wgmma {wgmma} "
              f"cp.async {cp_async} tma {tma_ld}  K-loop LDL/STL {local_accesses_in_mma_loops(c)}  SASS {n_sass}")
        if args.ir:
            os.makedirs(args.ir, exist_ok=True)
            with open(os.path.join(args.ir, name.replace(":", "_").replace(",", "_") + ".ttgir"), "w") as f:
                f.write(ttgir)
            with open(os.path.join(args.ir, name.replace(":", "_").replace(",", "_") + ".ptx"), "w") as f:
                f.write(ptx)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
