"""Cross-compile the fused MoE kernels for sm_90 without a GPU and print ptxas's resource report.

    PYTHONPATH=/path/to/triton-3.6:. python -m epmoe.kernels.xcompile [--ir DIR]

Uses `triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))` with the pointer arguments
marked 16-byte divisible (what the JIT specializes on a real launch; without it the loads are not
pipelined), then `ptxas -v` on the PTX. Registers, spills and shared memory per kernel configuration;
with --ir, the TTGIR and PTX of each are written there (to check pipelining and wgmma).
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

# name -> (kernel, H, I, k, fmt, BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, tma, persistent, tile_mode[, promote])
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
    "gu_fp8_deepseek_rescale": ("gate_up", 7168, 2048, 8, "fp8", 128, 128, 128, 8, 3, True, False, 0, "rescale"),
    "gu_fp8_deepseek_rescale_s4": ("gate_up", 7168, 2048, 8, "fp8", 128, 128, 128, 8, 4, False, False, 0, "rescale"),
    "dn_fp8_deepseek_rescale256": ("down", 7168, 2048, 8, "fp8", 128, 256, 128, 8, 3, True, False, 0, "rescale"),
    "dn_fp8_deepseek_rescale128": ("down", 7168, 2048, 8, "fp8", 128, 128, 128, 8, 4, True, False, 0, "rescale"),
}


def compile_case(kernel, H, I, k, fmt, bm, bn, bk, warps, stages, tma, persistent, tile_mode, promote="sync"):
    fp8 = fmt == "fp8"
    el = {"fp8": "fp8e4nv", "fp16": "fp16"}.get(fmt, "bf16")
    out = "fp16" if fmt == "fp16" else "bf16"
    fn = fused_moe.moe_gemm_kernel
    names = fn.arg_names
    n_ptr = names.index("num_pairs")
    sig, attrs = {}, {}
    gate_up = kernel == "gate_up"
    rescale = fp8 and promote == "rescale"
    # pointer element types per argument, in order: a, w, bias, out, out_scale, a_scale, w_scale,
    # topk_weights, sorted_ids, block_expert, num_padded, counts
    if gate_up:
        types = [el, el, "fp32", "fp8e4nv" if fp8 else out, "fp32", "fp32", "fp32", "fp32"]
    else:
        a = "fp8e4nv" if fp8 else "fp32" if fmt == "fp16" else "bf16"     # fused_moe.intermediate_dtype
        types = [a, el, "fp32", out, "fp32", "fp32", "fp32", "fp32"]
    types += ["i32"] * 4
    if tma:
        types[1] = f"tensordesc<{el}[{bn // 2 if rescale and not gate_up else bn}, {bk}]>"
    for i, t in enumerate(types):
        sig[names[i]] = t if t.startswith("tensordesc") else "*" + t
        if not t.startswith("tensordesc"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    sig["num_pairs"] = "i32"
    sig["capacity"] = "i32"
    const = dict(GATE_UP=gate_up, H=H, I=I, TOP_K=k, HAS_BIAS=False, BATCHED=False, FP8=fp8,
                 A_SCALE_PER_BLOCK=fp8, W_SCALE_PER_BLOCK=fp8, SCALE_BLOCK_N=128, DOT_PRECISION="tf32",
                 W_DESC=tma, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, TILE_MODE=tile_mode,
                 W_SCALE_SCALAR=fp8, PERSISTENT=persistent, RESCALE=rescale, ACTIVATION=0, OUT_FP8=fp8 and gate_up,
                 APPLY_WEIGHT=not gate_up)
    for name in names[n_ptr + 2:]:
        sig[name] = "constexpr"
    src = ASTSource(fn, sig, constexprs=const, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=warps, num_stages=stages))


def ptxas_report(ptx: str) -> str:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run(["ptxas", "-v", "--gpu-name", "sm_90a", path, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True)
    text = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores", text)
    stack = re.search(r"(\d+) bytes stack frame", text)
    return (f"regs {regs.group(1) if regs else '?'} spill {spill.group(1) if spill else '?'} "
            f"stack {stack.group(1) if stack else '?'}")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--ir", default=None, help="write TTGIR and PTX of each case here")
    p.add_argument("--only", default=None, help="regex of case names")
    args = p.parse_args()
    print(f"triton {triton.__version__}")
    for name, case in CASES.items():
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
        print(f"{name:28s} {ptxas_report(ptx)} smem {c.metadata.shared // 1024} KB  wgmma {wgmma} "
              f"cp.async {cp_async} tma {tma_ld}")
        if args.ir:
            os.makedirs(args.ir, exist_ok=True)
            with open(os.path.join(args.ir, name + ".ttgir"), "w") as f:
                f.write(ttgir)
            with open(os.path.join(args.ir, name + ".ptx"), "w") as f:
                f.write(ptx)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
