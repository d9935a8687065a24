"""The copy of the token rows into the Gluon GEMMs' expert layout (`kernels.layout_copy.rows_to_layout`), in
both orders, timed as `epmoe bench experts` times (L2 flushed, CUDA-graph replay, median) and checked bit for
bit against each other and against its PyTorch statement, beside a plain device copy of the same bytes.

    PYTHONPATH=. python3 benchmarks/layout_copy_probe.py [--output PATH] [--reps N] [--once]

--once: each order run once per point, untimed and unchecked, for a profiler to count its memory traffic
(`ncu --metrics dram__bytes_read.sum,dram__bytes_write.sum -k regex:to_layout`).

Points: the deepseek-v3 32-expert shard (H = 7168, k = 8) at T = 4096 and 8192 and mixtral-8x7b (H = 4096,
k = 2) at T = 8192, FP8 (1-byte rows and their scales) and BF16, routing drawn as the benchmark's balanced
one (top-k of Gaussian logits). For each: both orders' times, the bytes a copy must move at least (each
token row read once, each pair's row written once, the scales), and that rate against the device copy's
(`torch.Tensor.copy_` of a buffer of the written size: read + write over its time).
"""
from __future__ import annotations

import argparse
import json

import torch

from epmoe.bench.gpu_timing import GpuTimer
from epmoe.bench.run_env import write_probe_results
from epmoe.kernels.layout_copy import ORDERS, rows_to_layout, rows_to_layout_reference
from epmoe.kernels.moe_align import align_pairs
from epmoe.quant.fp8 import fp8_quantize

POINTS = (("deepseek-v3 shard 32", 32, 7168, 8, 4096), ("deepseek-v3 shard 32", 32, 7168, 8, 8192),
          ("mixtral-8x7b", 8, 4096, 2, 8192))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", default=None)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--once", action="store_true", help="each order once per point, untimed (for a profiler)")
    args = p.parse_args()
    dev = torch.device("cuda")
    timer = GpuTimer(dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    rows_out, ok = [], True
    for name, E, H, k, T in POINTS:
        ids = torch.randn(T, E, generator=gen, device=dev).topk(k, dim=1).indices.to(torch.int32)
        aligned = align_pairs(ids, E, 128)
        used = int(aligned.num_padded.item())
        x32 = torch.randn(T, H, generator=gen, device=dev)
        for fmt in ("fp8_block", "bf16"):
            x, scales = fp8_quantize(x32, 128) if fmt == "fp8_block" else (x32.bfloat16(), None)
            if args.once:
                for order in ORDERS:
                    print(name, T, fmt, order, flush=True)
                    rows_to_layout(x, scales, aligned, k, order)
                torch.cuda.synchronize()
                continue
            want = rows_to_layout_reference(x, scales, aligned, k)
            bits = torch.uint8 if x.element_size() == 1 else torch.int16
            row = dict(shape=name, experts=E, hidden=H, top_k=k, tokens=T, format=fmt, used_rows=used)
            scale_bytes = 0 if scales is None else scales.numel() * 4 * (1 + k)
            least = T * H * x.element_size() + used * H * x.element_size() + scale_bytes
            row["least_bytes"] = least
            for order in ORDERS:
                got = rows_to_layout(x, scales, aligned, k, order)
                same = (torch.equal(got[0][:used].view(bits), want[0][:used].view(bits))
                        and torch.equal(got[2], want[2])
                        and (scales is None or torch.equal(got[1][:, :used], want[1][:, :used])))
                ok &= same
                t = timer.time(lambda: rows_to_layout(x, scales, aligned, k, order), reps=args.reps, warmup=3)
                row[order] = dict(median_us=round(t.median_ms * 1e3, 1), min_us=round(t.min_ms * 1e3, 1),
                                  least_bytes_tbs=round(least / (t.median_ms * 1e-3) / 1e12, 3), bits_as_stated=same)
            src = torch.empty(used * H * x.element_size(), dtype=torch.uint8, device=dev)
            dst = torch.empty_like(src)
            t = timer.time(lambda: dst.copy_(src), reps=args.reps, warmup=3)
            row["device_copy"] = dict(bytes=2 * src.numel(), median_us=round(t.median_ms * 1e3, 1),
                                      tbs=round(2 * src.numel() / (t.median_ms * 1e-3) / 1e12, 3))
            row["rows_over_pairs"] = round(row["rows"]["median_us"] / row["pairs"]["median_us"], 3)
            print(json.dumps(row), flush=True)
            rows_out.append(row)
            del src, dst
    if args.once:
        return 0
    write_probe_results(args.output, dev, rows_out, reps=args.reps, all_bits_as_stated=ok,
                        method="GpuTimer: L2 flushed, GPU kept busy, CUDA graph replay, median")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
