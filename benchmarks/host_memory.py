"""Host memory of a long run: many forwards of random sizes on N Gloo ranks, every CPU dispatcher x experts
pairing, as a server runs them. Prints a table and writes the results whole (with the command, commit and
environment) to benchmarks/results/host_memory_cpu_<date>.json.

    python benchmarks/host_memory.py                       # 4 ranks, 2000 forwards, 500 of them warm-up

Each rank passes 1-96 tokens a forward (its own random sequence), routed with a skew towards the low
experts (rank 0's). Per rank it records the RSS and the bytes malloc has handed out (`heap in use`: what
grows when something keeps references) every `--every` forwards; growth is measured from the end of the
warm-up: `rss growth` = the largest RSS after the warm-up minus the RSS at its end. At the end it hands
the allocator's free pages back to the OS (`malloc_trim`) and records the RSS again: what falls away
there was memory the allocator kept, not memory anything holds. `local` (no expert parallelism) runs on
every rank alone. A pairing passes when every rank's RSS growth is at most `--limit` MiB.
`--mmap-threshold 131072` fixes glibc's mmap threshold in every rank (the remedy the README describes).
`--onednn off` runs torch's own bfloat16 GEMM instead of oneDNN's: on CPUs with AVX512-BF16 (the record's
`cpu_capability`), oneDNN keeps ~1.1 MiB of state per new GEMM shape, so `grouped_mm` (a matmul per expert
group) grows while new group sizes keep coming; off, what grows is what the forwards keep.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from epmoe import MoEConfig, MoELayer, contract  # noqa: E402
from epmoe.bench.run_env import environment, provenance, results_dir  # noqa: E402
from epmoe.testing import load_experts, random_experts, run_on_ranks  # noqa: E402
from epmoe.testing.host_memory import fix_mmap_threshold, heap_in_use_mib, release_free_heap, rss_mib  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def config(args) -> MoEConfig:
    return MoEConfig(num_experts=args.experts, top_k=args.top_k, hidden_size=args.hidden,
                     intermediate_size=args.intermediate, dtype=DTYPES[args.dtype])


def pairings(cfg: MoEConfig, ranks: int) -> list[tuple[str, str]]:
    """Every pairing that runs on the CPU: with expert parallelism over `ranks`, and `local` on one."""
    ep = contract.supported_pairings(cfg, ranks, "cpu")
    return ep + [p for p in contract.supported_pairings(cfg, 1, "cpu") if p[0] == "local"]


def run_rank(rank: int, world: int, args, dispatcher: str, experts: str) -> dict:
    """One rank's forwards; returns its samples: (forward, RSS MiB, heap in use MiB)."""
    import torch.distributed as dist
    if args.mmap_threshold is not None and not fix_mmap_threshold(args.mmap_threshold):
        raise RuntimeError("--mmap-threshold needs glibc (mallopt)")
    torch.backends.mkldnn.enabled = args.onednn == "on"
    cfg = config(args)
    group = None if dispatcher == "local" else dist.group.WORLD
    layer = MoELayer(cfg, ep_group=group, dispatcher=dispatcher, experts=experts,
                     max_tokens_per_rank=args.max_tokens)
    load_experts(layer, random_experts(cfg, seed=1))
    g = torch.Generator().manual_seed(1000 + rank)
    skew = torch.linspace(args.skew, 0.0, cfg.num_experts)
    samples = []
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(args.forwards + 1):
            if i % args.every == 0:
                samples.append((i, rss_mib(), heap_in_use_mib()))
            if i == args.forwards:
                break
            T = int(torch.randint(1, args.max_tokens + 1, (1,), generator=g))
            x = torch.randn(T, cfg.hidden_size, generator=g).to(cfg.dtype)
            layer(x, torch.randn(T, cfg.num_experts, generator=g) + skew)
    seconds = time.perf_counter() - start
    released = release_free_heap()
    return {"samples": samples, "ms_per_forward": 1e3 * seconds / args.forwards,
            "rss_after_trim": rss_mib() if released else None}


def summarize(rank_result: dict, warmup: int) -> dict:
    samples = rank_result["samples"]
    at_warmup = next(s for s in samples if s[0] >= warmup)
    after = [s for s in samples if s[0] >= warmup]
    heap = [s[2] for s in after if s[2] is not None]
    return {"rss_at_warmup": at_warmup[1], "rss_end": samples[-1][1],
            "rss_growth": max(s[1] for s in after) - at_warmup[1],
            "heap_growth": (max(heap) - at_warmup[2]) if heap else None,
            "rss_after_trim": rank_result["rss_after_trim"], "ms_per_forward": rank_result["ms_per_forward"]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--forwards", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=500, help="forwards before growth is measured")
    p.add_argument("--every", type=int, default=50, help="forwards between samples")
    p.add_argument("--max-tokens", type=int, default=96, help="tokens per rank and forward: 1 to this")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--hidden", type=int, default=200)
    p.add_argument("--intermediate", type=int, default=96)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--skew", type=float, default=3.0, help="logit bias of expert 0, falling to 0 for the last")
    p.add_argument("--limit", type=float, default=8.0, help="MiB of RSS growth after the warm-up a pairing may show")
    p.add_argument("--mmap-threshold", type=int, default=None,
                   help="bytes: set glibc's mmap threshold in every rank (as MALLOC_MMAP_THRESHOLD_ would)")
    p.add_argument("--onednn", choices=("on", "off"), default="on",
                   help="torch's oneDNN backend in every rank (off: its per-shape state leaves the figures)")
    p.add_argument("--pairings", default="", help="comma-separated dispatcher:experts (default: every CPU pairing)")
    p.add_argument("--output", default=None, help="JSON path (default: benchmarks/results/host_memory_cpu_<date>.json)")
    args = p.parse_args(argv)
    if not 0 <= args.warmup < args.forwards or args.warmup % args.every:
        p.error("--warmup must be a multiple of --every and below --forwards")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = config(args)
    chosen = ([tuple(s.split(":")) for s in args.pairings.split(",")] if args.pairings
              else pairings(cfg, args.ranks))
    record = {"provenance": provenance(), "environment": environment("gloo", args.ranks),
              "settings": {k: v for k, v in vars(args).items() if k != "output"},
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "pairings": []}
    print(f"{'dispatcher':<12} {'experts':<11} {'ms/fwd':>7}  per rank: RSS at warm-up -> growth after it "
          f"(heap in use growth) [RSS after malloc_trim]")
    ok = True
    for dispatcher, experts in chosen:
        results = run_on_ranks(run_rank, args.ranks, args, dispatcher, experts, backend="gloo", timeout_s=7200)
        ranks = [summarize(r, args.warmup) for r in results]
        passed = all(r["rss_growth"] <= args.limit for r in ranks)
        ok &= passed
        record["pairings"].append({"dispatcher": dispatcher, "experts": experts, "passed": passed, "ranks": ranks,
                                   "samples": [r["samples"] for r in results]})
        cells = "  ".join(f"{r['rss_at_warmup']:.0f}->{r['rss_growth']:+.1f}"
                          f"({'?' if r['heap_growth'] is None else format(r['heap_growth'], '+.1f')})"
                          f"[{'?' if r['rss_after_trim'] is None else format(r['rss_after_trim'], '.0f')}]"
                          for r in ranks)
        ms = max(r["ms_per_forward"] for r in ranks)
        print(f"{dispatcher:<12} {experts:<11} {ms:7.1f}  {cells}  {'ok' if passed else 'OVER ' + str(args.limit)}",
              flush=True)
    path = args.output or os.path.join(results_dir(), "host_memory_cpu_"
                                       f"{datetime.date.today().isoformat()}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    print(f"wrote {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
