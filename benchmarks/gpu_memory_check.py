"""GPU memory of a long run: `torch.cuda.memory_allocated` over many forwards of random sizes, for every
dispatcher that runs on the GPUs given (one rank per GPU, NCCL), each with the experts `auto` picks.
Prints a table and writes the results whole (command, commit, environment) to `--output`.

    python benchmarks/gpu_memory_check.py --output gpu_memory.json             # every visible GPU
    python benchmarks/gpu_memory_check.py --ranks 1 --output gpu_memory_1.json
    python benchmarks/gpu_memory_check.py --cpu-smoke --output /tmp/m.json     # the flow on Gloo CPU ranks

Each rank passes 1 to `--max-tokens` tokens a forward (its own random sequence), routed with a skew
towards rank 0's experts. Per rank: the bytes allocated on the device at the end of the warm-up, the
most seen after it and at the end (sampled after each forward, outputs dropped). Dispatchers that take
`max_tokens_per_rank` without needing it (`symm_high_throughput`) run both ways; unbounded, their buffers
grow during the warm-up (the largest forward sizes them) and must not grow after. A dispatcher passes when
no rank's allocation after the warm-up exceeds its value at the end of the warm-up by more than `--limit`
MiB. With `--cpu-smoke` (no GPU) the ranks are Gloo CPU processes and the measure is the bytes malloc has
handed out, only to check the script's flow. Two things differ there, measured on 2 Gloo ranks with
`allgather` + `grouped_mm` (1500 forwards of 1-256 tokens): the heap grows by about 10 KiB for each token
count a rank has not passed before (a cache keyed by shape below the layer: +2.5 MiB until all 256 counts
were seen, at forward 1225-1298 there, then flat: its floor moved 0.01 MiB over the last 500 forwards),
and single samples stand up to 2.0 MiB above their neighbours (buffers still held when the sample is
taken). The 200-forward warm-up of 1-256 tokens had seen about half the counts, hence +3.49 MiB. So the
smoke passes 1-64 tokens by default (each rank's own counts almost all seen within its 500 warm-up
forwards; a gathered batch, the sum of the ranks' counts, takes rarer values, so the floor can still creep
by a fraction of the limit) and judges the floor: the least of the last 100 samples against the least of
the 100 that end the warm-up.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from epmoe import MoEConfig, MoELayer, contract  # noqa: E402
from epmoe.bench.run_env import environment, provenance  # noqa: E402
from epmoe.testing import load_experts, random_experts, run_on_ranks  # noqa: E402
from epmoe.testing.host_memory import heap_in_use_mib  # noqa: E402

MIB = float(1 << 20)


def config(args) -> MoEConfig:
    return MoEConfig(num_experts=args.experts, top_k=args.top_k, hidden_size=args.hidden,
                     intermediate_size=args.intermediate, dtype=torch.bfloat16)


def variants(cfg: MoEConfig, ranks: int, device_type: str) -> list[tuple[str, bool]]:
    """(dispatcher, with max_tokens_per_rank) for every dispatcher that runs here with `ranks` ranks."""
    out = []
    for name in contract.DISPATCHERS:
        if not any(d == name for d, _ in contract.supported_pairings(cfg, ranks, device_type)):
            continue
        caps = contract.dispatcher_class(name).CAPS
        if caps.needs_max_tokens:
            out.append((name, True))
        elif caps.takes_max_tokens:
            out += [(name, False), (name, True)]
        else:
            out.append((name, False))
    return out


def allocated_mib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / MIB
    return heap_in_use_mib() or 0.0


def run_rank(rank: int, world: int, args, dispatcher: str, bounded: bool) -> dict:
    import torch.distributed as dist
    cfg = config(args)
    device = torch.device("cpu") if args.cpu_smoke else torch.device("cuda", torch.cuda.current_device())
    group = dist.group.WORLD if world > 1 else None
    layer = MoELayer(cfg, ep_group=group, dispatcher=dispatcher, experts="auto", device=device,
                     max_tokens_per_rank=args.max_tokens if bounded else None)
    load_experts(layer, random_experts(cfg, seed=1))
    g = torch.Generator().manual_seed(1000 + rank)
    skew = torch.linspace(3.0, 0.0, cfg.num_experts)
    samples = []
    with torch.inference_mode():
        for i in range(args.forwards):
            T = int(torch.randint(1, args.max_tokens + 1, (1,), generator=g))
            x = torch.randn(T, cfg.hidden_size, generator=g).to(cfg.dtype).to(device)
            logits = (torch.randn(T, cfg.num_experts, generator=g) + skew).to(device)
            out = layer(x, logits)
            del out, x, logits
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            samples.append(allocated_mib(device))
    at_warmup = samples[args.warmup - 1]
    result = {"experts": layer.experts_name, "at_warmup_mib": at_warmup, "end_mib": samples[-1],
              "max_after_warmup_mib": max(samples[args.warmup:]),
              "growth_mib": max(samples[args.warmup:]) - at_warmup, "every_100th_mib": samples[::100]}
    if device.type == "cpu":     # the heap's floor (module docstring): a leak raises it, a held buffer does not
        window = min(100, args.warmup, args.forwards - args.warmup)
        result["growth_mib"] = min(samples[-window:]) - min(samples[args.warmup - window:args.warmup])
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=None, help="one per GPU (default: every visible GPU)")
    p.add_argument("--forwards", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=None, help="default 200 (--cpu-smoke: 500)")
    p.add_argument("--max-tokens", type=int, default=None, help="default 256 (--cpu-smoke: 64)")
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--limit", type=float, default=1.0, help="MiB a rank's allocation may grow after the warm-up")
    p.add_argument("--cpu-smoke", action="store_true", help="Gloo CPU ranks, heap bytes instead of GPU bytes")
    p.add_argument("--output", required=True, help="JSON path")
    args = p.parse_args(argv)
    if args.warmup is None:
        args.warmup = 500 if args.cpu_smoke else 200
    if args.max_tokens is None:
        args.max_tokens = 64 if args.cpu_smoke else 256
    if not 0 < args.warmup < args.forwards:
        p.error("--warmup must be between 0 and --forwards")
    if args.ranks is None:
        args.ranks = 2 if args.cpu_smoke else max(torch.cuda.device_count(), 1)
    if not args.cpu_smoke and torch.cuda.device_count() < args.ranks:
        p.error(f"--ranks {args.ranks} needs that many CUDA GPUs; {torch.cuda.device_count()} visible "
                "(--cpu-smoke runs the flow on CPU ranks)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    backend = "gloo" if args.cpu_smoke else "nccl"
    device_type = "cpu" if args.cpu_smoke else "cuda"
    cfg = config(args)
    record = {"provenance": provenance(), "environment": environment(backend, args.ranks),
              "settings": {k: v for k, v in vars(args).items() if k != "output"}, "dispatchers": []}
    unit = "MiB heap" if args.cpu_smoke else "MiB allocated"
    print(f"{args.ranks} rank(s), {args.forwards} forwards of 1-{args.max_tokens} tokens, growth after "
          f"{args.warmup} ({unit}, per rank: at warm-up -> growth)")
    ok = True
    for dispatcher, bounded in variants(cfg, args.ranks, device_type):
        if args.ranks == 1:          # no process group: this process is the one rank
            results = [run_rank(0, 1, args, dispatcher, bounded)]
        else:
            results = run_on_ranks(run_rank, args.ranks, args, dispatcher, bounded, backend=backend, timeout_s=1200)
        passed = all(r["growth_mib"] <= args.limit for r in results)
        ok &= passed
        name = dispatcher + (f" (max_tokens_per_rank={args.max_tokens})" if bounded else "")
        record["dispatchers"].append({"dispatcher": dispatcher, "bounded": bounded, "passed": passed, "ranks": results})
        cells = "  ".join(f"{r['at_warmup_mib']:.1f} -> {r['growth_mib']:+.2f}" for r in results)
        print(f"{name:<48} {results[0]['experts']:<11} {cells}  {'ok' if passed else 'GREW'}", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(record, f, indent=1)
    print(f"wrote {args.output}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
