"""Decode (a few tokens) in the `triton` experts: the whole forward beside the time one kernel takes to read
the same weight bytes, timed as `epmoe bench experts` times (L2 flushed, GPU kept busy while queued, CUDA-graph
replay), each forward checked against the float64 oracle of its format.

    PYTHONPATH=. python3 benchmarks/decode_probe.py --shapes mixtral-8x7b:1,deepseek-v3:1 --formats fp8_block
    ncu -k regex:moe_gemm python3 benchmarks/decode_probe.py --once ...      # one forward per point

Each shape is PRESET:T (the preset's own experts; PRESET:L:T a shard of L of them at the preset's top-k; a balanced
routing, the rows and weights the benchmark makes). The hit bytes are the weights of the experts the routing hits
(3 * H * I each, in the format's element size; scales not counted). `--configs` times other kernel configurations
of the table's format beside the table's own (JSON list of `MoEKernelConfig.to_dict()` forms), and `--swap-ab` the
table's tiles with plain and swap-AB products, through the same backend, and the table's own again after them. Each
shape's first timing is a warm-up, not reported. Compare a variant with the entry timed again, not with the entry
timed first: timed first, the entry ran 10-16% slower than timed again after the variants at gpt-oss-120b (T = 1,
16) and deepseek-v3 T = 1 (166 us, then 146, which `epmoe bench experts` agrees with); the warm-up removed the gap
at gpt-oss-120b T = 1 but not at deepseek-v3 T = 1 (benchmarks/notes_kernels.md, twenty-first pass).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def read_floor_ms(timer, nbytes: int) -> float:
    """The fastest of a few grids of `decode_floor`'s streaming-read kernel over `nbytes` (as one kernel)."""
    import torch
    from decode_floor import read
    buf = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=timer.device).normal_()
    best = None
    for programs in (264, 528, 1056):
        out = torch.empty(programs, device=timer.device)
        for block, stages in ((2048, 3), (4096, 3), (8192, 2)):
            t = timer.time(lambda: read(buf, out, programs, block, stages), reps=20, warmup=3).median_ms
            best = t if best is None else min(best, t)
    return best


def swap_variants(config) -> list:
    """(label, configuration): the table's tiles (not its decode or Gluon path) with plain products and with
    swap-AB products in the gate+up, the down GEMM and both, except the one that is the table's entry itself
    (timed as "table"); a GEMM with the "rescale" promotion keeps plain products (its variants are left out)."""
    plain = replace(config, gemv=None, gluon=False, gate_up=replace(config.gate_up, swap_ab=False),
                    down=replace(config.down, swap_ab=False))
    swap = {name: replace(g, swap_ab=True) for name, g in (("gate_up", plain.gate_up), ("down", plain.down))
            if g.promote != "rescale"}
    out = [("plain tiles", plain)] + [(f"swap {name}", replace(plain, **{name: g})) for name, g in swap.items()]
    if len(swap) == 2:
        out.append(("swap both", replace(plain, **swap)))
    return [(label, c) for label, c in out if c != config]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--shapes", default="mixtral-8x7b:1,deepseek-v3:1,gpt-oss-120b:1,mixtral-8x7b:16",
                   help="PRESET:T or PRESET:LOCAL_EXPERTS:T (a shard of that many experts at the preset's "
                        "top-k), comma-separated (default: %(default)s)")
    p.add_argument("--formats", default="fp8_block", help="formats (default: %(default)s)")
    p.add_argument("--configs", help="JSON file: a list of kernel configurations to time beside the table's")
    p.add_argument("--swap-ab", action="store_true",
                   help="also time the table's tiles with swap-AB products (GemmConfig.swap_ab) in the gate+up, the "
                        "down GEMM, and both")
    p.add_argument("--once", action="store_true", help="one forward per point after two warm-ups (for ncu)")
    p.add_argument("--output", help="write the results as JSON here")
    args = p.parse_args(argv)
    import torch
    import triton
    if not torch.cuda.is_available():
        print("decode_probe: needs a CUDA GPU", file=sys.stderr)
        return 2
    from epmoe import contract
    from epmoe.bench.experts import bench_config, make_routing, make_weights, rel_err, sample_rows
    from epmoe.bench.gpu_timing import GpuTimer
    from epmoe.kernels.tuning_table import MoEKernelConfig
    from epmoe.layouts import FlatBatch
    from epmoe.reference import reference_moe
    from epmoe.routing import Routing
    device = torch.device("cuda", torch.cuda.current_device())
    timer = GpuTimer(device)
    extra = [MoEKernelConfig.from_dict(d) for d in json.load(open(args.configs))] if args.configs else []
    rows, failed, floors = [], 0, {}
    for item in args.shapes.split(","):
        preset, *experts, T = item.split(":")
        T, experts = int(T), (int(experts[0]) if experts else None)
        for fmt in args.formats.split(","):
            gen = torch.Generator(device=device).manual_seed(0)
            cfg = bench_config(preset, fmt, experts)
            weights, oracle = make_weights(cfg, device, gen)
            ids, tw = make_routing("balanced", T, cfg.num_experts, cfg.top_k, gen, device)
            x = torch.randn(T, cfg.hidden_size, generator=gen, device=device).to(torch.bfloat16)
            xp = torch.nn.functional.pad(x, (0, cfg.padded_hidden_size - cfg.hidden_size))
            sample = sample_rows(T, gen, device)
            ref = reference_moe(x[sample], None, oracle, cfg, routing=Routing(ids[sample], tw[sample]), device=device)
            backend = contract.experts_class("triton")(cfg, device)
            batch = FlatBatch(xp, ids, tw)
            w13 = weights.w13
            hit = int(torch.unique(ids).numel())
            nbytes = hit * 3 * w13.shape[2] * (w13.shape[1] // 2) * w13.element_size()
            key = (T, tuple(w13.shape), w13.dtype)
            table_config = backend.kernel_config(T, weights)
            # a warm-up timing first (not reported; not under --once, whose launches ncu counts): see the docstring
            variants = [(f"config {i}", c) for i, c in enumerate(extra)]
            if args.swap_ab:
                variants += swap_variants(table_config)
            runs = [("warm-up", table_config)] * (not args.once) + [("table", table_config)] + variants
            if variants:             # the table's entry again last: an order or drift effect shows as a gap
                runs.append(("table again", table_config))
            for label, config in runs:
                backend._configs[key] = (config, label)
                try:
                    out = backend(batch, weights)
                except ValueError as exc:            # tiles the kernels refuse for this format
                    print(f"{preset} T={T} {fmt} {label}: refused: {exc}", flush=True)
                    continue
                err = rel_err(out[:, :cfg.hidden_size][sample], ref)
                ok = err <= 3e-2
                failed += not ok
                if args.once:
                    backend(batch, weights)
                    torch.cuda.synchronize()
                    print(f"{preset} T={T} {fmt} {label}: one forward, err {err:.2e} {'ok' if ok else 'FAILED'}",
                          flush=True)
                    continue
                t = timer.time(lambda: backend(batch, weights), reps=30, warmup=5)
                if label == "warm-up":
                    continue
                if nbytes not in floors:
                    floors[nbytes] = read_floor_ms(timer, nbytes)
                row = dict(preset=preset, local_experts=cfg.num_experts, tokens=T, format=fmt, variant=label,
                           config=config.describe(), experts_hit=hit, hit_bytes=nbytes, median_ms=t.median_ms,
                           method=t.method, tb_per_s=nbytes / (t.median_ms * 1e-3) / 1e12, read_floor_ms=floors[nbytes],
                           floor_ratio=floors[nbytes] / t.median_ms, err=err, ok=ok)
                rows.append(row)
                print(f"{preset:13s} L={cfg.num_experts:3d} T={T:3d} {fmt:10s} {label:12s} "
                      f"{t.median_ms * 1e3:8.1f} us "
                      f"{row['tb_per_s']:5.2f} TB/s  read floor {floors[nbytes] * 1e3:6.1f} us "
                      f"({row['floor_ratio']:.2f})  err {err:.1e}{'' if ok else ' FAILED'}  {config.describe()}",
                      flush=True)
    if args.output:
        from epmoe.bench.run_env import source_digest
        meta = dict(gpu=torch.cuda.get_device_name(device), torch=torch.__version__, triton=triton.__version__,
                    commit=os.environ.get("EPMOE_COMMIT", "unknown"), source_sha256=source_digest(),
                    date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
                    method="GpuTimer: L2 flushed, GPU kept busy, CUDA graph replay, median of 30")
        with open(args.output, "w") as f:
            json.dump(dict(environment=meta, rows=rows), f, indent=1)
    if failed:
        print(f"decode_probe: {failed} forward(s) FAILED the oracle check", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
