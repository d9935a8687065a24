"""Probe: the warp-specialized Gluon grouped GEMM (`epmoe.kernels.ws_grouped_gemm`) on one Hopper GPU.

Two stages, each in its own process with a time limit (a wrong mbarrier phase hangs a GPU kernel; the
limit turns that into an error in the JSON instead of a lost device call):
1. check: small awkward problems against a float32 product of the dequantized operands: N and K not
   multiples of the tile, unequal rows per expert, a skipped tile (its rows must keep their sentinel), few
   programs (the persistent walk and the ring wrap around), block FP8 and BF16. rel. error <= 1e-2.
2. time: the deepseek-v3 32-expert shard and mixtral-8x7b at T tokens, each GEMM of the experts as a plain
   grouped GEMM over rows laid out expert by expert (gate+up: N = 2I, then `gated_rows` for the
   activation and the block quantization, timed separately; down: N = H), beside the library's two
   kernels with the tuning table's configuration on the same shapes and rows per expert
   (`ws_probe.library_times`). `triton.testing.do_bench` medians for both; every timed variant checked
   against its float32 product first.

    python3 benchmarks/gluon_gemm_probe.py --output $OUT/gluon_gemm_probe.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

# name -> (local experts, H, I, top_k), as ws_probe.SHAPES
VARIANTS = {   # format: [(block_n, stages)]; block_m 128 (two warpgroups of 64 rows), block_k 128 (FP8) / 64 (BF16)
    "fp8_block": [(128, 3), (128, 4), (128, 5), (128, 6)],
    "bf16": [(128, 4), (128, 6), (256, 3), (256, 4)],
}


def _dequantized(fp8: bool, a, w, gen, dev):
    """(A, W, a_scale_t, w_scale, A_deq, W_deq): FP8 block scales drawn at random, the operands divided by
    them and cast; BF16 operands cast."""
    import torch
    M, K = a.shape
    E, N, _ = w.shape
    if not fp8:
        a16, w16 = a.bfloat16(), w.bfloat16()
        return a16, w16, None, None, a16.float(), w16.float()
    kb, nb = -(-K // 128), -(-N // 128)
    a_scale = torch.rand(M, kb, generator=gen, device=dev) * 0.02 + 0.01
    w_scale = torch.rand(E, nb, kb, generator=gen, device=dev) * 0.02 + 0.01
    a_full = a_scale.repeat_interleave(128, 1)[:, :K]
    w_full = w_scale.repeat_interleave(128, 1).repeat_interleave(128, 2)[:, :N, :K]
    aq = (a / a_full).to(torch.float8_e4m3fn)
    wq = (w / w_full).to(torch.float8_e4m3fn)
    return aq, wq, a_scale.t().contiguous(), w_scale.contiguous(), aq.float() * a_full, wq.float() * w_full


def stage_check() -> list:
    """Small awkward problems, every result checked; returns one record per case."""
    import torch
    from epmoe.kernels.ws_grouped_gemm import grouped_gemm_ws
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(1)
    records = []
    # (fp8, N, K, rows per expert (None: skipped tile), num_programs, block_n, stages)
    cases = [(True, 384, 512, [128, 256, 128], 3, 128, 3), (True, 320, 320, [128, None, 384, 128], 2, 128, 4),
             (True, 256, 7168, [256, 128], 132, 128, 4), (False, 384, 512, [128, 256, 128], 3, 128, 4),
             (False, 320, 200, [128, None, 384, 128], 2, 256, 3), (False, 512, 2048, [256, 128, 128], 5, 256, 4)]
    for fp8, N, K, rows, progs, bn, stages in cases:
        rec = dict(fp8=fp8, N=N, K=K, rows=rows, num_programs=progs, block_n=bn, stages=stages)
        try:
            E = len(rows)
            tile_expert = []
            for e, r in enumerate(rows):
                tile_expert += [e] * (r // 128) if r else [-1]
            M = 128 * len(tile_expert)
            a = torch.randn(M, K, generator=gen, device=dev)
            w = torch.randn(E, N, K, generator=gen, device=dev) * 0.05
            A, W, a_scale_t, w_scale, A_deq, W_deq = _dequantized(fp8, a, w, gen, dev)
            te = torch.tensor(tile_expert, dtype=torch.int32, device=dev)
            out = torch.full((M, N), 7.0, dtype=torch.bfloat16, device=dev)     # sentinel for skipped rows
            grouped_gemm_ws(A, W, te, out, a_scale_t, w_scale, block_n=bn, stages=stages, num_programs=progs)
            torch.cuda.synchronize()
            err, sentinel_kept = 0.0, True
            for t, e in enumerate(tile_expert):
                got = out[t * 128:(t + 1) * 128].float()
                if e < 0:
                    sentinel_kept &= bool((got == 7.0).all())
                    continue
                ref = A_deq[t * 128:(t + 1) * 128] @ W_deq[e].T
                err = max(err, ((got - ref).norm() / ref.norm()).item())
            rec.update(rel_err=err, sentinel_kept=sentinel_kept, ok=err <= 1e-2 and sentinel_kept)
        except Exception as exc:
            rec.update(ok=False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
            traceback.print_exc(limit=3)
        print(json.dumps(rec), flush=True)
        records.append(rec)
    return records


def stage_time(tokens: int, budget_s: float, save) -> dict:
    import torch
    import triton
    import ws_probe
    from epmoe.kernels.gated_rows import gated_rows
    from epmoe.kernels.ws_grouped_gemm import grouped_gemm_ws
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    start = time.time()
    out = dict(library=[], points=[])
    for name, (L, H, I, k) in ws_probe.SHAPES.items():
        rows = -(-tokens * k // L // 128) * 128
        for fmt in ("fp8_block", "bf16"):
            fp8 = fmt != "bf16"
            try:
                lib = ws_probe.library_times(name, L, H, I, k, tokens, fmt, dev, gen)
            except Exception as exc:
                lib = dict(error=f"{type(exc).__name__}: {exc}")
            lib.update(shape=name, format=fmt)
            out["library"].append(lib)
            print(json.dumps(lib), flush=True)
            for gemm, N, K in (("gate_up", 2 * I, H), ("down", H, I)):
                M = rows * L
                a = torch.randn(M, K, generator=gen, device=dev) * 0.5
                w = torch.randn(L, N, K, generator=gen, device=dev) * 0.05
                A, W, a_scale_t, w_scale, A_deq, W_deq = _dequantized(fp8, a, w, gen, dev)
                del a, w
                te = torch.arange(L, dtype=torch.int32, device=dev).repeat_interleave(rows // 128)
                c = torch.zeros(M, N, dtype=torch.bfloat16, device=dev)
                act_ms = None
                if gemm == "gate_up":      # what a plain gate+up GEMM leaves to a second pass
                    act_ms = triton.testing.do_bench(lambda: gated_rows(c, "silu", torch.bfloat16,
                                                                          quant_group=128 if fp8 else 0),
                                                     warmup=20, rep=100, return_mode="median")
                for bn, stages in VARIANTS[fmt]:
                    if time.time() - start > budget_s:
                        break
                    point = dict(shape=name, format=fmt, gemm=gemm, tokens=tokens, M=M, N=N, K=K, block_n=bn,
                                 stages=stages, activation_pass_ms=act_ms)
                    try:
                        def run():
                            grouped_gemm_ws(A, W, te, c, a_scale_t, w_scale, block_n=bn, stages=stages)
                        c.zero_()
                        run()
                        torch.cuda.synchronize()
                        err = 0.0
                        for e in (0, L - 1):
                            ref = A_deq[e * rows:(e + 1) * rows] @ W_deq[e].T
                            err = max(err, ((c[e * rows:(e + 1) * rows].float() - ref).norm() / ref.norm()).item())
                        point["rel_err"] = err
                        ms = triton.testing.do_bench(run, warmup=50, rep=300, return_mode="median")
                        point.update(ms=ms, tflops=2.0 * M * N * K / ms / 1e9)
                    except Exception as exc:
                        point["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
                        traceback.print_exc(limit=2)
                    out["points"].append(point)
                    print(json.dumps(point), flush=True)
                    save(out)
                del A, W, A_deq, W_deq, c
                torch.cuda.empty_cache()
    return out


def _child(stage: str, args) -> dict:
    """Run one stage in a child process under a time limit; its JSON comes back through a file."""
    path = f"{args.output}.{stage}.part"
    cmd = [sys.executable, os.path.abspath(__file__), "--stage", stage, "--output", path,
           "--tokens", str(args.tokens), "--budget-s", str(args.budget_s)]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, timeout=args.stage_timeout_s if stage == "check" else args.budget_s + 60)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    result = dict(returncode=rc, seconds=round(time.time() - t0, 1))
    if os.path.exists(path):
        with open(path) as f:
            result.update(json.load(f))
        os.remove(path)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--budget-s", type=float, default=300.0, help="stop starting new timed variants after this long")
    p.add_argument("--stage-timeout-s", type=float, default=120.0, help="limit of the check stage (a hang ends it)")
    p.add_argument("--stage", choices=("check", "time"), default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    def save(res):     # after every point: a stage cut off by its limit keeps what it measured
        with open(args.output, "w") as f:
            json.dump(res, f, indent=1)

    if args.stage:
        save(dict(cases=stage_check()) if args.stage == "check" else stage_time(args.tokens, args.budget_s, save))
        return 0
    import torch
    import triton
    results = dict(gpu=torch.cuda.get_device_name(0), torch=torch.__version__, triton=triton.__version__,
                   date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   command=" ".join(sys.argv), commit=os.environ.get("EPMOE_COMMIT", "unknown"), tokens=args.tokens)
    results["check"] = _child("check", args)
    save(results)
    if results["check"].get("returncode") == "timeout":
        print("check stage timed out (a hang): no timing", flush=True)
        return 1
    results["time"] = _child("time", args)
    save(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
