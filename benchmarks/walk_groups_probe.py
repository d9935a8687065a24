"""Building the Gluon GEMMs' walk in groups cut at expert edges (`expert_walk_groups`), as the `triton_ws`
pipeline builds it on every forward where it walks so: its one Triton program (`walk_groups_kernel`) beside the
PyTorch form (a few dozen small kernels), each timed as `epmoe bench experts` times (L2 flushed, CUDA-graph
replay, median) and their groups compared int32 for int32.

    PYTHONPATH=. python3 benchmarks/walk_groups_probe.py [--output PATH] [--reps N]

Points: the m-tiles (tiles of 128 rows, 7 unused ones at the end) of a top-k routing of Gaussian logits (the
benchmark's balanced one) at the shapes where the BF16 pipeline walks in such groups (`walk_group`):
deepseek-v3 (256 experts, top-8) and gpt-oss-120b (128 experts, top-4) at T = 4096 and 8192.
"""
from __future__ import annotations

import argparse

import torch

from epmoe.bench.gpu_timing import GpuTimer
from epmoe.bench.run_env import write_probe_results
from epmoe.kernels.walk_groups import walk_groups_torch, walk_groups_triton

POINTS = (("deepseek-v3", 256, 8, 4096), ("deepseek-v3", 256, 8, 8192), ("gpt-oss-120b", 128, 4, 4096),
          ("gpt-oss-120b", 128, 4, 8192))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", default=None)
    p.add_argument("--reps", type=int, default=50)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("walk_groups_probe: needs a CUDA GPU")
        return 2
    dev = torch.device("cuda")
    timer = GpuTimer(dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    rows_out, ok = [], True
    for name, experts, top_k, T in POINTS:
        ids = torch.randn(T, experts, generator=gen, device=dev).topk(top_k, dim=1).indices
        counts = torch.bincount(ids.flatten(), minlength=experts)
        per_expert = (counts + 127) // 128
        tile_expert = torch.cat([torch.repeat_interleave(torch.arange(experts, device=dev), per_expert),
                                 torch.full((7,), -1, device=dev, dtype=torch.int64)]).to(torch.int32)
        same = torch.equal(walk_groups_triton(tile_expert, 8), walk_groups_torch(tile_expert, 8))
        ok &= same
        t_kernel = timer.time(lambda: walk_groups_triton(tile_expert, 8), reps=args.reps)
        t_torch = timer.time(lambda: walk_groups_torch(tile_expert, 8), reps=args.reps)
        row = dict(shape=name, experts=experts, top_k=top_k, tokens=T, m_tiles=tile_expert.numel(),
                   kernel_us=t_kernel.median_ms * 1e3, torch_us=t_torch.median_ms * 1e3, method=t_kernel.method,
                   same_groups=same)
        rows_out.append(row)
        print(f"{name:13s} T={T:5d} m-tiles {row['m_tiles']:4d}: walk_groups_kernel {row['kernel_us']:6.1f} us, "
              f"PyTorch form {row['torch_us']:6.1f} us, groups {'the same' if same else 'DIFFER'}", flush=True)
    write_probe_results(args.output, dev, rows_out, reps=args.reps, all_groups_the_same=ok,
                        method="GpuTimer: L2 flushed, GPU kept busy, CUDA graph replay, median")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
