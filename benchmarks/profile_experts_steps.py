"""Where a whole experts forward spends its GPU time, kernel by kernel: the GEMMs against everything around
them (the layout, the row copy, the activation quantization, the slot sum), measured with the PyTorch
profiler's CUDA trace, not estimated.

    python3 benchmarks/profile_experts_steps.py --backends triton,triton_ws --formats fp8_block \\
        --shapes "deepseek-v3:32:8192,mixtral-8x7b::8192" --output steps.json

Each shape is PRESET:LOCAL_EXPERTS:T (LOCAL_EXPERTS empty: the preset's own), a balanced routing, the rows
and weights `epmoe bench experts` makes. Before each forward the L2 cache is flushed and the GPU kept busy
(as the benchmark times); the forwards run eagerly, so the span from the first kernel's start to the last
one's end includes launch gaps a CUDA graph would not have: the kernel times are what to read. Every forward
is checked against the float64 oracle of its format on sampled rows (3e-2), and a failed check is printed
and recorded, not hidden.
"""
from __future__ import annotations

import argparse
import functools
import json
import re
import sys
import time
from collections import defaultdict

FLUSH_MARK = "bitwise_not"      # the L2 flush before each forward (a kernel no backend launches)
SLEEP_MARK = "spin_kernel"      # torch.cuda._sleep: the forward's kernels follow it
# prototypes of benchmarks/deepgemm_experts.py, timed like the backends: name -> the GEMM that runs the down
PROTOTYPES = {"deepgemm": "gluon", "deepgemm_down": "deepgemm"}


def kernel_family(name: str) -> str:
    """A kernel's name without its template and argument lists (the Triton / Gluon names stay whole)."""
    short = re.split(r"[<(]", name, maxsplit=1)[0].strip()
    short = short.removeprefix("void ").strip()
    return (short or name)[:80]


def forwards_of(kernels: list[tuple[str, float, float]]) -> list[list[tuple[str, float, float]]]:
    """The kernels (name, start us, end us), in start order, cut into forwards: each forward is what runs
    after a sleep kernel up to the next flush."""
    spans, current = [], None
    for name, start, end in kernels:
        if SLEEP_MARK in name:
            current = []
        elif FLUSH_MARK in name:
            if current is not None:
                spans.append(current)
            current = None
        elif current is not None:
            current.append((name, start, end))
    return spans


def summarize(forwards) -> dict:
    """Per kernel family: mean microseconds per forward and share of the forward's kernel time; the mean
    kernel total and span."""
    per_family = defaultdict(float)
    totals, spans = [], []
    for fwd in forwards:
        totals.append(sum(e - s for _, s, e in fwd))
        spans.append((max(e for _, _, e in fwd) - min(s for _, s, _ in fwd)) if fwd else 0.0)
        for name, s, e in fwd:
            per_family[kernel_family(name)] += e - s
    n = max(len(forwards), 1)
    kernel_us = sum(totals) / n
    rows = sorted(((fam, us / n) for fam, us in per_family.items()), key=lambda r: -r[1])
    return {"forwards": len(forwards), "kernel_us": kernel_us, "span_us": sum(spans) / n,
            "kernels": [{"kernel": fam, "us": us, "share": us / kernel_us if kernel_us else 0.0} for fam, us in rows]}


def parse_shapes(text: str) -> list[tuple[str, int | None, int]]:
    shapes = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) != 3 or not parts[0] or not parts[2].isdigit():
            raise SystemExit(f"--shapes: {item!r} is not PRESET:LOCAL_EXPERTS:T (LOCAL_EXPERTS may be empty)")
        shapes.append((parts[0], int(parts[1]) if parts[1] else None, int(parts[2])))
    return shapes


def profile_runs(run, clock, sampler, forwards: int):
    """`forwards` eager calls of `run()` under the PyTorch profiler's CUDA trace, each behind the L2 flush (a
    kernel no backend launches: the mark the trace is cut at) and a GPU sleep, after two untimed ones: the
    kernels (name, start us, end us) of each call in start order, and the GPU's clocks over the calls only
    (not the profiler's start and stop)."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    for _ in range(2):
        run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.monotonic()
        for _ in range(forwards):
            clock.flush_buffer.bitwise_not_()
            clock.sleep(0.5)
            run()
        clock.flush_buffer.bitwise_not_()
        torch.cuda.synchronize()
        gpu_state = sampler.since(start)
    kernels = sorted(((e.name, e.time_range.start, e.time_range.end) for e in prof.events()
                      if e.device_type == torch.autograd.DeviceType.CUDA), key=lambda k: k[1])
    return forwards_of(kernels), gpu_state


def profile_forwards(backend, batch, weights, clock, sampler, forwards: int):
    """`profile_runs` of the backend's forward: `summarize` of its kernels, and the GPU's clocks."""
    runs, gpu_state = profile_runs(lambda: backend(batch, weights), clock, sampler, forwards)
    return summarize(runs), gpu_state


@functools.lru_cache(maxsize=None)
def _prototypes():
    """benchmarks/deepgemm_experts.py, loaded by its path once (the benchmarks are not a package)."""
    import importlib.util
    import os
    spec = importlib.util.spec_from_file_location(
        "deepgemm_experts", os.path.join(os.path.dirname(os.path.abspath(__file__)), "deepgemm_experts.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def prototype_problem(cfg, device) -> str | None:
    """Why the DeepGEMM prototypes cannot run this layer here: no importable `deep_gemm`, `triton_ws`'s reasons,
    or the prototype's."""
    import importlib.util

    from epmoe import contract
    if importlib.util.find_spec("deep_gemm") is None:
        return "deep_gemm is not importable here (part `deepgemm` of gpu_one_h200.sh puts it on the path)"
    return contract.experts_problem("triton_ws", cfg, device.type) or _prototypes().problem(cfg)


def make_prototype(name: str, cfg, device):
    return _prototypes().DeepGemmExperts(cfg, device, down=PROTOTYPES[name])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--backends", default="triton,triton_ws",
                   help="experts backends, and the prototypes of benchmarks/deepgemm_experts.py: deepgemm (its "
                        "gate+up by DeepGEMM), deepgemm_down (both GEMMs) (default: %(default)s)")
    p.add_argument("--formats", default="fp8_block,bf16", help="formats (default: %(default)s)")
    p.add_argument("--shapes", default="deepseek-v3:32:8192,deepseek-v3:32:4096,mixtral-8x7b::8192",
                   help="PRESET:LOCAL_EXPERTS:T, comma-separated (default: %(default)s)")
    p.add_argument("--forwards", type=int, default=5, help="profiled forwards per point (default: %(default)s)")
    p.add_argument("--output", help="write the results as JSON here")
    args = p.parse_args(argv)
    shapes = parse_shapes(args.shapes)
    import torch
    if not torch.cuda.is_available():
        print("profile_experts_steps: needs a CUDA GPU", file=sys.stderr)
        return 2
    from epmoe import contract
    from epmoe.bench.experts import bench_config, make_routing, make_weights, rel_err, sample_rows
    from epmoe.bench.gpu_state import GpuStateSampler, describe_state, nvidia_smi_id
    from epmoe.bench.gpu_timing import CudaClock
    from epmoe.layouts import FlatBatch
    from epmoe.reference import reference_moe
    from epmoe.routing import Routing
    device = torch.device("cuda", torch.cuda.current_device())
    clock = CudaClock(device)
    results, failed = [], 0
    with GpuStateSampler(nvidia_smi_id(device)) as sampler:      # the clocks while each point's forwards ran
        for preset, experts, T in shapes:
            for fmt in args.formats.split(","):
                gen = torch.Generator(device=device).manual_seed(0)
                cfg = bench_config(preset, fmt, experts)
                weights, oracle = make_weights(cfg, device, gen)
                ids, tw = make_routing("balanced", T, cfg.num_experts, cfg.top_k, gen, device)
                x = torch.randn(T, cfg.hidden_size, generator=gen, device=device).to(torch.bfloat16)
                # the experts take rows of the padded hidden size, as the dispatcher hands them over (gpt-oss's
                # FP8 layers pad 2880 to 2944)
                xp = torch.nn.functional.pad(x, (0, cfg.padded_hidden_size - cfg.hidden_size))
                sample = sample_rows(T, gen, device)
                ref = reference_moe(x[sample], None, oracle, cfg, routing=Routing(ids[sample], tw[sample]),
                                    device=device)
                flops = 6.0 * T * cfg.top_k * cfg.hidden_size * cfg.intermediate_size
                for name in args.backends.split(","):
                    why = prototype_problem(cfg, device) if name in PROTOTYPES else \
                        contract.experts_problem(name, cfg, device.type)
                    if why:
                        print(f"skip {name} {preset} {fmt}: {why}", flush=True)
                        continue
                    backend = make_prototype(name, cfg, device) if name in PROTOTYPES else \
                        contract.experts_class(name)(cfg, device)
                    batch = FlatBatch(xp, ids, tw)
                    out = backend(batch, weights)            # compiles; then the check
                    err = rel_err(out[:, :cfg.hidden_size][sample], ref)
                    ok = err <= 3e-2
                    failed += not ok
                    s, gpu_state = profile_forwards(backend, batch, weights, clock, sampler, args.forwards)
                    row = dict(preset=preset, experts=cfg.num_experts, T=T, format=fmt, backend=name,
                               check_rel_err=err, check_ok=ok, tflops_of_kernel_time=flops / (s["kernel_us"] * 1e6)
                               if s["kernel_us"] else None, gpu_state=gpu_state, **s)
                    results.append(row)
                    print(f"\n{preset} E={cfg.num_experts} T={T} {fmt} {name}: {s['forwards']} forwards, kernels "
                          f"{s['kernel_us']:.0f} us ({row['tflops_of_kernel_time'] or 0:.0f} TFLOP/s), span "
                          f"{s['span_us']:.0f} us, check {err:.2e} {'ok' if ok else 'FAILED'}"
                          + (f", {describe_state(gpu_state)} ({gpu_state['samples']} samples)" if gpu_state
                             else ""),
                          flush=True)
                    for k in s["kernels"]:
                        print(f"  {k['us']:9.1f} us {100 * k['share']:5.1f}%  {k['kernel']}")
                    del backend, out
                del weights, oracle
                torch.cuda.empty_cache()
    if sampler.error:
        print(f"# no clocks recorded: {sampler.error}", file=sys.stderr)
    if args.output:
        from epmoe.bench.experts import environment
        with open(args.output, "w") as f:
            json.dump({"environment": environment(), "command": " ".join(sys.argv), "results": results}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
