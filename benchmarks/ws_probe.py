"""Probe: does Triton's warp specialization on Hopper make the expert GEMMs faster?

A grouped GEMM over rows already laid out expert by expert (each expert's rows contiguous and padded to
BLOCK_M, as the down GEMM reads its input and as gate+up would after a gather pass), both operands loaded
through tensor descriptors (TMA), persistent over the tiles, with the K loop written once and compiled with
`warp_specialize` off and on. BF16, and block FP8 (activations one scale per row and 128 columns, weights
one per 128x128 block, every K block's product promoted to float32 as the library's kernels do).

It times each variant beside the library's own kernels (`epmoe.kernels.fused_moe`, the tuning table's
configuration) on the same shapes and the same number of rows per expert, with `triton.testing.do_bench`
for both, checks every variant against a float32 product of the same (dequantized) operands, and writes
one JSON file. The probe's down store is contiguous (the library's scatters rows to their pairs), so its
down times are a lower bound of what the variant would cost in the library.

    python3 benchmarks/ws_probe.py --output $OUT/ws_probe.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import traceback

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@triton.jit
def grouped_desc_kernel(a_desc, b_desc, c_ptr, a_scale_ptr, w_scale_ptr, block_expert_ptr, tiles_m, N, K,
                        GATE_UP: tl.constexpr, FP8: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr,
                        WS: tl.constexpr, STAGES: tl.constexpr):
    """C[rows of tile m, cols of tile n] = A[rows] @ B[expert rows].T (GATE_UP: silu(gate) * up, the two
    halves of B's expert block, N = I). FP8: A scales [M, K / 128], weight scales [L, 2N or N / 128, K / 128]."""
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    num_tiles = tiles_m * num_pid_n
    KB = tl.cdiv(K, 128)
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_SMS, flatten=True, warp_specialize=WS,
                         num_stages=STAGES):
        in_group = GROUP_M * num_pid_n
        first_m = (tile // in_group) * GROUP_M
        group_size = tl.minimum(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (tile % in_group) % group_size
        pid_n = (tile % in_group) // group_size
        e = tl.load(block_expert_ptr + pid_m)
        off_m = pid_m * BLOCK_M
        rows_b = N * 2 if GATE_UP else N
        b_row = e * rows_b + pid_n * BLOCK_N
        offs_m = off_m + tl.arange(0, BLOCK_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            a = a_desc.load([off_m, ki * BLOCK_K])
            b = b_desc.load([b_row, ki * BLOCK_K])
            if GATE_UP:
                bu = b_desc.load([b_row + N, ki * BLOCK_K])
            if FP8:
                sa = tl.load(a_scale_ptr + offs_m * KB + ki)
                sw = tl.load(w_scale_ptr + (e * (rows_b // 128) + (pid_n * BLOCK_N) // 128) * KB + ki)
                acc += tl.dot(a, b.T) * (sa * sw)[:, None]
                if GATE_UP:
                    swu = tl.load(w_scale_ptr + (e * (rows_b // 128) + (pid_n * BLOCK_N + N) // 128) * KB + ki)
                    acc_u += tl.dot(a, bu.T) * (sa * swu)[:, None]
            else:
                acc = tl.dot(a, b.T, acc)
                if GATE_UP:
                    acc_u = tl.dot(a, bu.T, acc_u)
        if GATE_UP:
            acc = acc / (1.0 + tl.exp(-acc)) * acc_u
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.store(c_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :], acc.to(c_ptr.dtype.element_ty),
                 mask=(offs_n < N)[None, :])


SHAPES = {   # name: (local experts, H, I, top_k)
    "deepseek-v3 shard 32": (32, 7168, 2048, 8),
    "mixtral-8x7b": (8, 4096, 14336, 2),
}

VARIANTS = {  # format: [(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, stages, WS)]; FP8 weight scales need BLOCK_N 128
    "fp8_block": [(128, 128, 128, 8, 3, False), (128, 128, 128, 8, 3, True), (128, 128, 128, 8, 4, False),
                  (128, 128, 128, 8, 4, True), (128, 128, 128, 4, 3, False), (128, 128, 128, 4, 3, True)],
    "bf16": [(128, 128, 64, 8, 3, False), (128, 128, 64, 8, 3, True), (128, 128, 64, 8, 4, False),
             (128, 128, 64, 8, 4, True), (128, 128, 64, 4, 3, False), (128, 128, 64, 4, 3, True),
             (128, 128, 64, 4, 4, True), (128, 256, 64, 8, 3, False), (128, 256, 64, 8, 3, True)],
}


class Operands:
    """One problem (shape, format, gate_up or down) laid out expert by expert, R rows per expert."""

    def __init__(self, L, H, I, rows_per_expert, gate_up, fp8, block_m, gen, dev):
        self.gate_up, self.fp8 = gate_up, fp8
        R = -(-rows_per_expert // block_m) * block_m
        self.M, self.L = L * R, L
        self.N, self.K = (I, H) if gate_up else (H, I)
        rows_b = 2 * I if gate_up else H
        a = torch.randn(self.M, self.K, generator=gen, device=dev) * 0.5
        w = torch.randn(L * rows_b, self.K, generator=gen, device=dev) * 0.05
        self.block_expert = torch.arange(L, device=dev, dtype=torch.int32).repeat_interleave(R // block_m)
        self.block_m = block_m
        self.tiles_m = self.M // block_m
        if fp8:
            kb = -(-self.K // 128)
            self.a_scale = (torch.rand(self.M, kb, generator=gen, device=dev) * 0.02 + 0.01).contiguous()
            self.w_scale = (torch.rand(L, rows_b // 128, kb, generator=gen, device=dev) * 0.02 + 0.01).contiguous()
            self.a = (a / self.a_scale.repeat_interleave(128, 1)[:, :self.K]).to(torch.float8_e4m3fn)
            ws_full = self.w_scale.repeat_interleave(128, 1).repeat_interleave(128, 2)[:, :, :self.K]
            self.w = (w.view(L, rows_b, self.K) / ws_full).to(torch.float8_e4m3fn).view(L * rows_b, self.K)
            self.a_deq = self.a.float() * self.a_scale.repeat_interleave(128, 1)[:, :self.K]
            self.w_deq = (self.w.float().view(L, rows_b, self.K) * ws_full).view(L * rows_b, self.K)
        else:
            self.a, self.w = a.bfloat16(), w.bfloat16()
            self.a_scale = self.w_scale = torch.ones(1, device=dev)
            self.a_deq, self.w_deq = self.a.float(), self.w.float()
        self.c = torch.empty(self.M, self.N, dtype=torch.bfloat16, device=dev)

    def flops(self) -> float:
        return 2.0 * self.M * self.K * self.N * (2 if self.gate_up else 1)

    def reference(self, experts=(0, 1)) -> dict:
        """Float32 product of the dequantized operands for a few experts' rows."""
        out = {}
        R = self.M // self.L
        rows_b = 2 * self.N if self.gate_up else self.N
        for e in experts:
            a = self.a_deq[e * R:(e + 1) * R]
            w = self.w_deq[e * rows_b:(e + 1) * rows_b]
            y = a @ w.T
            if self.gate_up:
                g, u = y[:, :self.N], y[:, self.N:]
                y = torch.nn.functional.silu(g) * u
            out[e] = y
        return out

    def run(self, v, num_sms):
        bm, bn, bk, warps, stages, ws = v
        a_desc = TensorDescriptor(self.a, list(self.a.shape), [self.K, 1], [bm, bk])
        b_desc = TensorDescriptor(self.w, list(self.w.shape), [self.K, 1], [bn, bk])
        tiles = self.tiles_m * triton.cdiv(self.N, bn)
        grid = (min(tiles, num_sms),)
        return grouped_desc_kernel[grid](a_desc, b_desc, self.c, self.a_scale, self.w_scale, self.block_expert,
                                  self.tiles_m, self.N, self.K, GATE_UP=self.gate_up, FP8=self.fp8, BLOCK_M=bm,
                                  BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, NUM_SMS=grid[0], WS=ws, STAGES=stages,
                                  num_warps=warps)


def check(op: Operands) -> float:
    ref = op.reference()
    R = op.M // op.L
    err = 0.0
    for e, y in ref.items():
        got = op.c[e * R:(e + 1) * R].float()
        err = max(err, ((got - y).norm() / y.norm()).item())
    return err


def library_times(name, L, H, I, k, T, fmt, dev, gen) -> dict:
    """The library's two kernels with the tuning table's configuration for T tokens (ms each)."""
    from epmoe.bench.experts import make_weights
    from epmoe.bench.tune import KernelInputs, Problem
    from epmoe.config import MoEConfig
    from epmoe.kernels.fused_moe import weight_format
    from epmoe.kernels.tuning_table import lookup_config
    from epmoe.quant import quant_config_for
    quant = None if fmt == "bf16" else quant_config_for(fmt)
    cfg = MoEConfig(num_experts=L, top_k=k, hidden_size=H, intermediate_size=I, activation="silu",
                    dtype=torch.bfloat16, quant=quant)
    weights, _ = make_weights(cfg, dev, gen)
    gran = quant.weight_granularity if quant else None
    problem = Problem(cfg, weight_format(weights.w13, gran), weights, quant is not None)
    kcfg, source = lookup_config(T, L, H, I, k, problem.fmt, dev)
    inputs = KernelInputs(problem, T, kcfg.block_m, gen, kcfg.tail_m if kcfg.tail_m and kcfg.tail_m < kcfg.block_m
                          else 0)
    gu = triton.testing.do_bench(lambda: inputs.gate_up(kcfg.gate_up), warmup=50, rep=300, return_mode="median")
    dn = triton.testing.do_bench(lambda: inputs.down(kcfg.down), warmup=50, rep=300, return_mode="median")
    del weights, inputs
    return dict(gate_up_ms=gu, down_ms=dn, config=str(kcfg), source=str(source), rows=T * k)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--budget-s", type=float, default=420.0, help="stop starting new variants after this long")
    args = p.parse_args()
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    num_sms = torch.cuda.get_device_properties(dev).multi_processor_count
    start = time.time()
    results = dict(gpu=torch.cuda.get_device_name(dev), torch=torch.__version__, triton=triton.__version__,
                   date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   command=" ".join(sys.argv), commit=os.environ.get("EPMOE_COMMIT", "unknown"),
                   tokens=args.tokens, points=[], library=[])

    def save():
        with open(args.output, "w") as f:
            json.dump(results, f, indent=1)

    for name, (L, H, I, k) in SHAPES.items():
        for fmt in ("fp8_block", "bf16"):
            try:
                lib = library_times(name, L, H, I, k, args.tokens, fmt, dev, gen)
            except Exception as exc:
                lib = dict(error=f"{type(exc).__name__}: {exc}")
            lib.update(shape=name, format=fmt)
            results["library"].append(lib)
            print(json.dumps(lib), flush=True)
            save()
            for gate_up in (True, False):
                op = Operands(L, H, I, args.tokens * k // L, gate_up, fmt != "bf16", 128, gen, dev)
                for v in VARIANTS[fmt]:
                    if time.time() - start > args.budget_s:
                        break
                    if gate_up and v[1] == 256:
                        continue
                    point = dict(shape=name, format=fmt, gemm="gate_up" if gate_up else "down",
                                 block_m=v[0], block_n=v[1], block_k=v[2], num_warps=v[3], stages=v[4], ws=v[5])
                    try:
                        op.c.zero_()
                        compiled = op.run(v, num_sms)
                        torch.cuda.synchronize()
                        # whether the compiler really split the loop into producer and consumer warps
                        point["ws_in_ttgir"] = "warp_specialize" in compiled.asm.get("ttgir", "")
                        point["setmaxnreg_in_ptx"] = compiled.asm.get("ptx", "").count("setmaxnreg")
                        point["registers"] = getattr(compiled, "n_regs", None)
                        point["spills"] = getattr(compiled, "n_spills", None)
                        point["rel_err"] = check(op)
                        ms = triton.testing.do_bench(lambda: op.run(v, num_sms), warmup=50, rep=300,
                                                     return_mode="median")
                        point["ms"] = ms
                        point["tflops"] = op.flops() / ms / 1e9
                    except Exception as exc:
                        point["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
                        traceback.print_exc(limit=2)
                    results["points"].append(point)
                    print(json.dumps(point), flush=True)
                    save()
                del op
                torch.cuda.empty_cache()
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
