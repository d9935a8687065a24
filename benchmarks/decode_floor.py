"""How fast one kernel can read a few hundred MB from HBM, timed as `epmoe bench experts` times (L2
flushed, GPU kept busy while queued, CUDA-graph replay): the floor of the decode points (T = 1), whose
time is the time to read the weights of the experts hit (qwen3-30b-a3b: 75.5 MB, gpt-oss-120b: 199 MB,
deepseek-v3 / mixtral-8x7b: 704 MB).

    PYTHONPATH=. python3 benchmarks/decode_floor.py [--output PATH]

Measures a streaming-read Triton kernel (every byte read once, one float per program written) over
buffers of those sizes, as one kernel and as two back-to-back kernels splitting the bytes 2:1 (what the
decode path does: gate+up, then down), and writes the times and rates as JSON.
"""
from __future__ import annotations

import argparse
import datetime
import json

import torch
import triton
import triton.language as tl

from epmoe.bench.gpu_timing import GpuTimer

SIZES_MB = {"qwen3-30b-a3b": 75.5, "gpt-oss-120b": 199.1, "deepseek-v3 / mixtral-8x7b": 704.6}


@triton.jit
def _read_kernel(x_ptr, out_ptr, n, n_per_program, BLOCK: tl.constexpr, STAGES: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * n_per_program
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in tl.range(0, n_per_program, BLOCK, num_stages=STAGES):
        offs = start + i + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(out_ptr + tl.program_id(0), tl.sum(acc))


def read(buf: torch.Tensor, out: torch.Tensor, programs: int, block: int, stages: int) -> None:
    """Every element of buf read once: `programs` programs, each a contiguous run of blocks."""
    per_program = triton.cdiv(triton.cdiv(buf.numel(), programs), block) * block
    _read_kernel[(programs,)](buf, out, buf.numel(), per_program, BLOCK=block, STAGES=stages, num_warps=4)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", default=None)
    args = p.parse_args()
    dev = torch.device("cuda")
    timer = GpuTimer(dev)
    rows = []
    for name, mb in SIZES_MB.items():
        programs_options = (264, 528, 1056, 2112)
        best = best_two = None
        for programs in programs_options:
            for block, stages in ((2048, 1), (2048, 3), (4096, 3), (8192, 2)):
                n = int(mb * 1e6 / 2)
                buf = torch.randn(n, device=dev).to(torch.bfloat16)
                out = torch.empty(programs, device=dev)
                t = timer.time(lambda: read(buf, out, programs, block, stages), reps=20, warmup=3).median_ms
                cut = 2 * n // 3 // 64 * 64               # 128-byte aligned second piece
                two_a, two_b = buf[:cut], buf[cut:]
                t2 = timer.time(lambda: (read(two_a, out, programs, block, stages),
                                         read(two_b, out, programs, block, stages)), reps=20, warmup=3).median_ms
                row = dict(model=name, mbytes=round(n * 2 / 1e6, 1), programs=programs, block=block, stages=stages,
                           one_kernel_us=round(t * 1e3, 2), one_kernel_tbs=round(n * 2 / (t * 1e-3) / 1e12, 3),
                           two_kernels_us=round(t2 * 1e3, 2),
                           two_kernels_tbs=round((two_a.numel() + two_b.numel()) * 2 / (t2 * 1e-3) / 1e12, 3))
                print(row, flush=True)
                rows.append(row)
                if best is None or row["one_kernel_us"] < best["one_kernel_us"]:
                    best = row
                if best_two is None or row["two_kernels_us"] < best_two["two_kernels_us"]:
                    best_two = row
                del buf
        print("best one kernel", best, flush=True)
        print("best two kernels", best_two, flush=True)
    meta = dict(gpu=torch.cuda.get_device_name(dev), torch=torch.__version__, triton=triton.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
                method="GpuTimer: L2 flushed, GPU kept busy, CUDA graph replay, median of 20")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(dict(meta, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
