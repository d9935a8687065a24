"""What expert-parallel load balancing costs on GPUs: a rebalance's bytes and time, its memory, and the
per-forward cost of the logical -> physical map and the load counter.

    PYTHONPATH=. python3 benchmarks/gpu_rebalance_cost.py                 # one GPU, one process
    PYTHONPATH=. python3 benchmarks/gpu_rebalance_cost.py --ranks 2       # two GPUs (NCCL), the real move

One GPU (no process group, so no peer to move weights to): a one-rank layer of deepseek-v3 experts
(H 7168, I 2048; FP8 128x128 blocks and BF16) with --experts slots is switched to a placement in which
every slot holds another expert (`rebalance(physical_to_logical=...)`, a cyclic shift): every slot's
storage (weights, scales, padding) is staged and copied back in place, the local half of a real move.
Timed end to end with the CUDA work synchronised (ms), with the bytes copied, the staging bytes and the
peak memory it added; the output after equals the output before bit for bit (same weights, moved) and
equals the oracle on sampled rows. Also: `balance_experts` on the host for 256 experts over 8 to 64 ranks,
and on the device, per forward, `ExpertMap.to_physical` (256 experts, 32 replicas over 8 ranks) and the
load counter's scatter-add, at 128 and 4096 tokens x top-8 (CUDA events, CUDA graph replays, L2 flushed).

Two GPUs (--ranks 2; the two-GPU machine): a 2-rank layer (alltoall dispatcher) whose ranks swap all their
experts: every slot arrives point to point from the peer in steps of at most --chunk-mb; bytes sent and
received per rank, ms per rebalance and per step, for each chunk size; outputs checked against the
oracle before and after.

Writes benchmarks/results/rebalance_cost_<gpu>_<ranks>x_<date>.json (or --out): the command, the commit,
GPU, torch / triton versions, date, and every number measured.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from epmoe import ExpertMap, Fp8Config, MoEConfig, MoELayer, balance_experts, reference_moe  # noqa: E402
from epmoe.bench.routings import skewed_logits, zipf_popularity  # noqa: E402
from epmoe.bench.run_env import environment, results_dir  # noqa: E402
from epmoe.testing import LayerExperts, bound_for, compare  # noqa: E402
from epmoe.testing.random_moe import SeededExperts  # noqa: E402

FORMATS = {"fp8": Fp8Config(), "bf16": None}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=1, choices=[1, 2], help="1: one GPU (default); 2: two GPUs, NCCL")
    p.add_argument("--experts", type=int, default=32, help="slots of the layer (per rank with --ranks 2)")
    p.add_argument("--formats", default="fp8,bf16", help="comma-separated from fp8,bf16 (default: %(default)s)")
    p.add_argument("--chunk-mb", default="64,16", help="chunk sizes in MiB for --ranks 2 (default: %(default)s)")
    p.add_argument("--reps", type=int, default=5, help="rebalances timed per configuration (default: %(default)s)")
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/rebalance_cost_...json)")
    return p.parse_args(argv)


def commit() -> str | None:
    """The commit of the code that ran (`EPMOE_COMMIT` where set, else git's HEAD): see
    `epmoe.bench.run_env.provenance`."""
    from epmoe.bench.run_env import provenance
    return provenance()["commit"]


def config(fmt: str, experts: int) -> MoEConfig:
    return MoEConfig(num_experts=experts, top_k=8, hidden_size=7168, intermediate_size=2048,
                     dtype=torch.bfloat16, quant=FORMATS[fmt])


def load(layer, source) -> None:
    for e in layer.local_experts:
        g, u, d = source[e]
        layer.load_expert(e, gate_proj=g, up_proj=u, down_proj=d)


def slot_bytes(layer) -> int:
    return sum(p[0].numel() * p.element_size() for p in layer.parameters(recurse=False))


def sync(device) -> None:
    torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------- one GPU
def local_move(fmt: str, experts: int, reps: int, device) -> dict:
    """Every slot of a one-rank layer takes another expert: staged and copied back in place."""
    cfg = config(fmt, experts)
    layer = MoELayer(cfg, device=device)
    load(layer, SeededExperts(cfg, seed=0, device=device))
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(256, cfg.hidden_size, generator=g, device=device).to(cfg.dtype)
    logits = skewed_logits(256, experts, 1.2, device=device)
    with torch.no_grad():
        before = layer(x, logits)
        oracle = [tuple(t.clone() for t in w) for w in LayerExperts(layer)]
        times, peaks, res = [], [], None
        for i in range(reps):
            shift = [(s + i + 1) % experts for s in range(experts)]     # every slot changes each time
            sync(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            res = layer.rebalance(physical_to_logical=shift)
            sync(device)
            times.append((time.perf_counter() - t0) * 1e3)
            peaks.append(torch.cuda.max_memory_allocated(device) - base)
        layer.rebalance(physical_to_logical=list(range(experts)))       # home again: the same weights, moved
        after = layer(x, logits)
        idx = torch.arange(0, 256, 16, device=device)
        ref = reference_moe(x[idx], logits[idx], oracle, cfg, device=device)
        return {"format": fmt, "experts": experts, "slot_bytes": slot_bytes(layer),
                "bytes_copied": res.bytes_copied, "staging_bytes": res.staging_bytes,
                "peak_memory_added_bytes": max(peaks),
                "ms_median": statistics.median(times), "ms_all": times,
                # each byte is read and written twice (live -> staging -> live)
                "copy_gb_per_s": res.bytes_copied * 4 / (statistics.median(times) * 1e-3) / 1e9,
                "same_output_bits": bool(torch.equal(after, before)),
                "oracle_rel_err": compare(after[idx], ref).rel_err, "bound": bound_for(cfg.dtype, fp8=fmt == "fp8")}


def host_placement_ms() -> list[dict]:
    out = []
    for ranks, redundant in ((8, 32), (32, 32), (64, 64)):
        load = zipf_popularity(256, 1.2).tolist()
        slots = [(256 + redundant) // ranks + (r < (256 + redundant) % ranks) for r in range(ranks)]
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            balance_experts(load, ranks, slots)
            times.append((time.perf_counter() - t0) * 1e3)
        out.append({"experts": 256, "ranks": ranks, "redundant": redundant, "ms_median": statistics.median(times)})
    return out


def per_forward_us(device) -> list[dict]:
    from epmoe.bench.gpu_timing import GpuTimer
    timer = GpuTimer(device)
    m = ExpertMap.build(256, 32, 8, 0)
    m.tables(device)
    counts = torch.zeros(256, dtype=torch.int64, device=device)
    out = []
    for T in (128, 4096):
        ids = torch.randint(0, 256, (T, 8), device=device, dtype=torch.int32)
        ones = torch.ones(T * 8, dtype=torch.int64, device=device)
        to_phys = timer.time(lambda: m.to_physical(ids), reps=50, warmup=10).as_dict()
        count = timer.time(lambda: counts.scatter_add_(0, ids.reshape(-1).long(), ones), reps=50, warmup=10).as_dict()
        out.append({"tokens": T, "top_k": 8, "to_physical_us": to_phys["median_ms"] * 1e3,
                    "load_count_us": count["median_ms"] * 1e3, "method": to_phys["method"]})
    return out


# ------------------------------------------------------------------------------------------ two GPUs
def two_rank_move(rank: int, ws: int, formats: list[str], experts: int, chunks: list[int], reps: int) -> list[dict]:
    import torch.distributed as dist
    device = torch.device("cuda", torch.cuda.current_device())
    rows = []
    for fmt in formats:
        cfg = config(fmt, experts * ws)
        source = SeededExperts(cfg, seed=0, device=device)
        layer = MoELayer(cfg, ep_group=dist.group.WORLD, dispatcher="alltoall", device=device)
        load(layer, source)
        whole = MoELayer(cfg, device=device)          # every expert on this GPU: the oracle's weights as stored
        load(whole, source)
        oracle = LayerExperts(whole)
        g = torch.Generator(device=device).manual_seed(rank)
        x = torch.randn(128, cfg.hidden_size, generator=g, device=device).to(cfg.dtype)
        logits = skewed_logits(128, cfg.num_experts, 1.2, token_seed=rank, device=device)
        E = cfg.num_experts
        with torch.no_grad():
            for chunk in chunks:
                times, res = [], None
                for i in range(reps):
                    half = E // 2
                    swap = [(s + half * ((i % 2) + 1)) % E for s in range(E)]    # every slot to the other rank
                    dist.barrier()
                    sync(device)
                    t0 = time.perf_counter()
                    res = layer.rebalance(physical_to_logical=swap, chunk_bytes=chunk << 20)
                    sync(device)
                    times.append((time.perf_counter() - t0) * 1e3)
                out = layer(x, logits)
                idx = torch.arange(0, 128, 16, device=device)
                err = compare(out[idx], reference_moe(x[idx], logits[idx], oracle, cfg, device=device)).rel_err
                rows.append({"rank": rank, "format": fmt, "slots_per_rank": experts, "slot_bytes": slot_bytes(layer),
                             "chunk_mib": chunk, "bytes_sent": res.bytes_sent, "bytes_received": res.bytes_received,
                             "steps": res.steps, "ms_median": statistics.median(times), "ms_all": times,
                             "step_ms_median": statistics.median(res.per_step_seconds) * 1e3 if res.per_step_seconds else None,
                             "gb_per_s_each_way": res.bytes_received / (statistics.median(times) * 1e-3) / 1e9,
                             "oracle_rel_err": err, "bound": bound_for(cfg.dtype, fp8=fmt == "fp8")})
        del layer, whole
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    formats = [f for f in args.formats.split(",") if f]
    env = environment("nccl", args.ranks)      # the GPU, CUDA and NCCL versions
    if args.ranks == 1:
        env["backend"] = None                     # one process: no process group
    report = {"benchmark": "rebalance-cost", "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
              "commit": commit(), "environment": env, "params": vars(args)}
    if args.ranks == 1:
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
        report["mode"] = "one GPU, one process: every slot of a one-rank layer moved locally (staged, copied back)"
        report["local_move"] = [local_move(f, args.experts, args.reps, device) for f in formats]
        report["balance_experts_host"] = host_placement_ms()
        report["per_forward"] = per_forward_us(device)
    else:
        from epmoe.testing import run_on_ranks
        chunks = [int(c) for c in args.chunk_mb.split(",") if c]
        report["mode"] = "two GPUs, NCCL: the ranks swap all their experts point to point"
        report["two_rank_move"] = run_on_ranks(two_rank_move, 2, formats, args.experts, chunks, args.reps,
                                               backend="nccl", timeout_s=900)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d")
    gpu = "".join(c if c.isalnum() else "_" for c in env.get("gpu") or "gpu")
    path = args.out or os.path.join(results_dir(), f"rebalance_cost_{gpu}_{args.ranks}x_{stamp}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps({k: v for k, v in report.items() if k not in ("environment", "params")}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
