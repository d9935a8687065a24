"""The two block-FP8 GEMM kernels under Nsight Compute: each promotion variant's gate+up and down kernel
launched once inside an NVTX range named `profiled` (compiled and warmed up outside it), on one balanced
routing of a preset's shard, so that ncu reads the counters of those launches only:

    ncu --clock-control none --nvtx --nvtx-include "profiled/" --section SpeedOfLight \\
        --section ComputeWorkloadAnalysis --section WarpStateStats --section Occupancy \\
        python3 benchmarks/profile_fp8_kernels.py --preset deepseek-v3 --experts 32 --tokens 8192

Without ncu it prints each launch's time (CUDA events, L2 flushed; the tuner's timing) and checks
nothing: the variants' results are checked by the GPU tests and by `epmoe bench experts`.
"""
from __future__ import annotations

import argparse
import sys

# name -> (gate_up GemmConfig fields, down GemmConfig fields): the "sync" tiles of the deepseek-v3 entry
# at T = 8192 and the fastest "rescale" tiles of the 32-expert shard
VARIANTS = {
    "sync": (dict(block_n=128, block_k=128, group_m=8, num_warps=8, num_stages=3, tma=True),
             dict(block_n=128, block_k=128, group_m=8, num_warps=8, num_stages=4, tma=True)),
    "rescale": (dict(block_n=128, block_k=128, group_m=8, num_warps=8, num_stages=3, tma=True, promote="rescale"),
                dict(block_n=256, block_k=128, group_m=8, num_warps=8, num_stages=3, tma=True, promote="rescale")),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="deepseek-v3")
    p.add_argument("--experts", type=int, default=32, help="local experts of the shard (default %(default)s)")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--block-m", type=int, default=128)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated (default: %(default)s)")
    args = p.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("profile_fp8_kernels: needs a CUDA GPU", file=sys.stderr)
        return 2
    from epmoe.bench.experts import bench_config, make_weights
    from epmoe.bench.gpu_timing import GpuTimer
    from epmoe.bench.tune import KernelInputs, Problem
    from epmoe.kernels.tuning_table import GemmConfig
    device = torch.device("cuda", torch.cuda.current_device())
    gen = torch.Generator(device=device).manual_seed(0)
    cfg = bench_config(args.preset, "fp8_block", args.experts)
    weights, _ = make_weights(cfg, device, gen)
    inputs = KernelInputs(Problem(cfg, "fp8_block", weights, True), args.tokens, args.block_m, gen)
    variants = {n: (GemmConfig(**VARIANTS[n][0]), GemmConfig(**VARIANTS[n][1])) for n in args.variants.split(",")}
    for gu, dn in variants.values():      # compile and warm up outside the profiled range
        inputs.gate_up(gu)
        inputs.down(dn)
    torch.cuda.synchronize()
    timer = GpuTimer(device)
    flops = 2.0 * args.tokens * cfg.top_k * cfg.hidden_size * cfg.intermediate_size
    for name, (gu, dn) in variants.items():
        t_gu = timer.time(lambda: inputs.gate_up(gu), reps=10, warmup=2, use_graph=False).median_ms
        t_dn = timer.time(lambda: inputs.down(dn), reps=10, warmup=2, use_graph=False).median_ms
        print(f"{name:8s} gate_up {t_gu:7.3f} ms {2 * flops / t_gu / 1e9:6.0f} TFLOP/s   down {t_dn:7.3f} ms "
              f"{flops / t_dn / 1e9:6.0f} TFLOP/s   [{gu.describe()} | {dn.describe()}]", flush=True)
    torch.cuda.synchronize()
    for name, (gu, dn) in variants.items():
        torch.cuda.nvtx.range_push("profiled")
        inputs.gate_up(gu)
        inputs.down(dn)
        torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
