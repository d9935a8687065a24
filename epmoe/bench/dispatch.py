"""`epmoe bench dispatch`: time dispatch + combine of each dispatcher against NCCL moving the same bytes.

For each dispatcher and tokens-per-rank count T (defaults: every registered dispatcher that moves
tokens and runs on the device; T = 128 and 4096; DeepSeek-V3's H = 7168, top-8 of E = 256, BF16),
every rank routes T random tokens (softmax top-k of random logits: balanced routing), then dispatch and combine are timed separately and back to back,
with the experts replaced by the identity (the batch the dispatcher produced is handed straight to its
combine), so only the dispatcher's own work and traffic are measured.

The baseline is `torch.distributed.all_to_all_single` on `uint8` buffers with exactly the per-destination
byte counts the dispatcher moved (counted by its stats hook; self-traffic included, as in the dispatcher),
one call for the dispatch direction and one for the combine direction, timed the same way in the same
run. Reported per row: milliseconds (median over ranks' medians, and the slowest rank), bytes sent to
other ranks, GB/s (bytes sent to peers per second), and the ratio dispatcher / NCCL. "header ms" is the
forward header alone (the fixed-size exchange every forward of a communicating dispatcher starts with,
and its host read), timed eagerly: for `low_latency` it is what checking the ranks' agreement adds to an
eager forward (a captured graph has no header).

Timing on GPUs (`epmoe.bench.gpu_timing.GpuTimer`): CUDA events, median over repeats after warm-up, L2
flushed, the GPU kept busy while the host queues a run so launch time does not leak in, and the ranks'
streams lined up by a tiny all-reduce before each run. Dispatchers that declare `cuda_graph_safe`
(low_latency) are timed as CUDA graph replays, the others eagerly (they sync with the host by design).
On CPUs (Gloo) wall-clock time with a barrier before each run: for checking the code, not for numbers.

Ranks: under torchrun (torch.distributed already initialized) the current group is used; otherwise
`--ranks` local processes are started (NCCL with one GPU each when there are enough GPUs, else Gloo).
Writes JSON under benchmarks/results/ of the checkout, ./epmoe-results elsewhere (rank 0 / the launching
process).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

from ..log import Steps, configure_cli_logging, get_logger
from ..usage import CsvList, DeprecatedAlias, UsageError, refuse_ranks_under_torchrun
from .run_env import RESULTS_DIR_HELP, default_output, environment

log = get_logger("bench")

TOKENS = [128, 4096]


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dispatchers", action=CsvList, default=None,
                   help="comma-separated (default: every registered dispatcher that moves tokens and runs here)")
    p.add_argument("--tokens", action=CsvList, default=",".join(map(str, TOKENS)),
                   help="tokens per rank (default: %(default)s)")
    p.add_argument("--hidden", type=int, default=7168, help="hidden size H (default: %(default)s)")
    p.add_argument("--experts", type=int, default=256, metavar="N", help="experts E (default: %(default)s)")
    p.add_argument("--num-experts", dest="experts", type=int, action=DeprecatedAlias, new_flag="--experts")
    p.add_argument("--top-k", type=int, default=8, help="experts per token (default: %(default)s)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="dtype of the tokens (default: %(default)s)")
    p.add_argument("--fp8", action="store_true",
                   help="FP8 dispatch (e4m3 rows with per-128-column scales on the wire; dispatchers that cannot "
                        "send FP8 are reported as refused)")
    p.add_argument("--ranks", type=int, default=None,
                   help="local ranks to start (default: every GPU, or 2 Gloo ranks without GPUs); leave out "
                        "under torchrun")
    p.add_argument("--comm", default=None, choices=["nccl", "gloo"],
                   help="process-group backend (default: NCCL when GPUs allow, else Gloo)")
    p.add_argument("--backend", dest="comm", choices=["nccl", "gloo"], action=DeprecatedAlias, new_flag="--comm",
                   help="deprecated spelling of --comm (--backend names the experts backend in run and bench layer)")
    p.add_argument("--reps", type=int, default=20, help="timed repeats (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs first (default: %(default)s)")
    p.add_argument("--no-graph", action="store_true", help="time every dispatcher eagerly")
    p.add_argument("--output", default=None,
                   help=f"JSON path (default: dispatch_<device>_<ranks>x_<date>.json in {RESULTS_DIR_HELP})")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds before hung ranks are killed")
    p.add_argument("--seed", type=int, default=0, help="seed of the random tokens and routing (default 0)")


def _csv(s: str) -> list[str]:
    return [v.strip() for v in str(s).split(",") if v.strip()]


def _params(args) -> dict:
    from ..contract import DISPATCHERS as KNOWN
    dispatchers = None if args.dispatchers is None else _csv(args.dispatchers)   # None: chosen per device
    unknown = [d for d in dispatchers or [] if d not in KNOWN]
    if unknown:
        raise UsageError(f"unknown dispatchers {unknown}; known: {sorted(KNOWN)}")
    tokens = [int(t) for t in _csv(args.tokens)]
    if any(t < 1 for t in tokens):
        raise UsageError("--tokens must be positive")
    return {"dispatchers": dispatchers, "tokens": tokens, "hidden": args.hidden, "num_experts": args.experts,
            "top_k": args.top_k, "dtype": args.dtype, "reps": args.reps, "warmup": args.warmup,
            "graph": not args.no_graph, "seed": args.seed, "fp8": bool(args.fp8)}


# -------------------------------------------------------------------------------------------- timing
class _Clock:
    """Median time of fn() on this rank, every rank running the same sequence of calls."""

    def __init__(self, device: torch.device, group):
        self.device, self.group = device, group
        self.timer = None
        if device.type == "cuda":
            from .gpu_timing import GpuTimer
            self.timer = GpuTimer(device)
            self.one = torch.ones(1, device=device)

    def time_split(self, first, second, reps: int, warmup: int, use_graph: bool) -> tuple[dict, dict]:
        """Times of `a = first()` and `second(a)` inside each repeat (a dispatch and its combine)."""
        if self.timer is not None:
            align = lambda: dist.all_reduce(self.one, group=self.group)  # noqa: E731
            a, b = self.timer.time_split(first, second, reps=reps, warmup=warmup, use_graph=use_graph,
                                         before_each=align)
            return a.as_dict(), b.as_dict()
        ta, tb = [], []
        for i in range(warmup + reps):
            dist.barrier(group=self.group)
            t0 = time.perf_counter()
            a = first()
            t1 = time.perf_counter()
            second(a)
            if i >= warmup:
                ta.append((t1 - t0) * 1e3)
                tb.append((time.perf_counter() - t1) * 1e3)
        return tuple({"median_ms": statistics.median(t), "min_ms": min(t), "max_ms": max(t), "reps": reps,
                      "method": "wall-clock"} for t in (ta, tb))

    def time(self, fn, reps: int, warmup: int, use_graph: bool) -> dict:
        if self.timer is not None:
            # the all-reduce lines up the ranks' streams before each run (no host sync)
            align = lambda: dist.all_reduce(self.one, group=self.group)  # noqa: E731
            return self.timer.time(fn, reps=reps, warmup=warmup, use_graph=use_graph, before_each=align).as_dict()
        times = []
        for i in range(warmup + reps):
            dist.barrier(group=self.group)
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1e3)
        return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
                "reps": reps, "method": "wall-clock"}


def _exchange_splits(send: list[int], device, group) -> list[int]:
    t = torch.tensor(send, dtype=torch.int64, device=device)
    r = torch.empty_like(t)
    dist.all_to_all_single(r, t, group=group)
    return r.tolist()


def _nccl_baseline(clock, byte_splits: list[int], reps, warmup, device, group) -> tuple[dict, list[int]]:
    """all_to_all_single of uint8 with these bytes per destination (what the dispatcher moved)."""
    recv = _exchange_splits(byte_splits, device, group)
    inp = torch.randint(0, 255, (sum(byte_splits),), dtype=torch.uint8, device=device)
    out = torch.empty(sum(recv), dtype=torch.uint8, device=device)
    fn = lambda: dist.all_to_all_single(out, inp, recv, byte_splits, group=group)  # noqa: E731
    return clock.time(fn, reps, warmup, use_graph=False), recv


# ------------------------------------------------------------------------------------------- one row
def _bench_one(name: str, T: int, p: dict, rank: int, ws: int, device, group, clock) -> dict:
    from ..config import MoEConfig
    from ..build import make_dispatcher
    from ..placement import Placement
    from ..routing import route

    dtype = getattr(torch, p["dtype"])
    quant = None
    if p.get("fp8"):
        from ..quant.fp8 import Fp8Config
        quant = Fp8Config(weight_block=(128, 128), dispatch_fp8=True)
    cfg = MoEConfig(num_experts=p["num_experts"], top_k=p["top_k"], hidden_size=p["hidden"],
                    intermediate_size=128, dtype=dtype, quant=quant)
    d = make_dispatcher(name, cfg, group=group, device=device, max_tokens_per_rank=T)
    g = torch.Generator(device="cpu").manual_seed(p["seed"] * 1000 + rank)
    x = torch.randn(T, cfg.hidden_size, generator=g).to(dtype).to(device)
    routing = route(torch.randn(T, cfg.num_experts, generator=g).to(device), cfg)

    stats = d.enable_stats()
    batch, handle = d.dispatch(x, routing)            # also the warm-up of everything lazy
    y = batch.x.to(dtype)                             # the identity experts' output (made once, untimed)
    d.combine(y, handle)
    d.stats = None
    row = {"dispatcher": name, "tokens_per_rank": T,
           "rows_sent_per_rank": stats.dispatch_rows,
           "dispatch_bytes_to_peers": stats.bytes_to_peers("dispatch_bytes"),
           "combine_bytes_to_peers": stats.bytes_to_peers("combine_bytes"),
           "dispatch_bytes_per_rank": stats.dispatch_bytes, "combine_bytes_per_rank": stats.combine_bytes}
    # the (token, destination) pairs alone, H x dtype each: what an ideal dispatch must move to peers
    owner = torch.tensor(Placement(cfg.num_experts, ws, rank).owners, device=device)[routing.topk_ids.long()]
    hits = torch.zeros(T, ws, dtype=torch.bool, device=device).scatter_(1, owner, True)
    hits[:, rank] = False
    row["ideal_bytes_to_peers"] = int(hits.sum()) * cfg.hidden_size * x.element_size()

    use_graph = p["graph"] and d.plan.cuda_graph_safe
    reps, warmup = p["reps"], p["warmup"]
    # dispatch and combine timed inside the same forwards: each combine consumes its own dispatch
    row["dispatch"], row["combine"] = clock.time_split(lambda: d.dispatch(x, routing),
                                                       lambda bh: d.combine(y, bh[1]), reps, warmup, use_graph)

    def both():
        b, h = d.dispatch(x, routing)
        return d.combine(y, h)
    row["total"] = clock.time(both, reps, warmup, use_graph)
    if hasattr(d, "exchange_headers") and not d.CAPS.peer_memory:
        # the forward header alone (NCCL/Gloo dispatchers: eager, it reads back on the host; the
        # symmetric-memory ones carry it in their flag exchange)
        row["header"] = clock.time(lambda: d.exchange_headers(T, device), reps, warmup, False)
    del batch, handle
    base_d, _ = _nccl_baseline(clock, stats.dispatch_bytes, reps, warmup, device, group)
    base_c, _ = _nccl_baseline(clock, stats.combine_bytes, reps, warmup, device, group)
    row["nccl_dispatch"], row["nccl_combine"] = base_d, base_c
    return row


def _here(ws: int, device_type: str) -> list[str]:
    """The registered dispatchers that move tokens and that the contract accepts on this device."""
    from ..contract import DISPATCHERS, dispatcher_problem
    return [n for n, cls in DISPATCHERS.items()
            if cls.CAPS.communicates and dispatcher_problem(n, None, ws, device_type) is None]


def _worker(rank: int, ws: int, p: dict) -> list[dict]:
    configure_cli_logging(p.get("verbosity", 0), rank)
    group = dist.group.WORLD
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    clock = _Clock(device, group)
    rows = []
    names = p["dispatchers"] or _here(ws, device.type)
    steps = Steps(log, "measured (dispatcher, tokens):", len(names) * len(p["tokens"]), every=0.0)
    for name in names:
        for T in p["tokens"]:
            log.debug("timing %s at %d tokens per rank", name, T)
            try:
                rows.append(_bench_one(name, T, p, rank, ws, device, group, clock))
            except Exception as exc:  # e.g. out of memory: recorded, the other rows still run
                rows.append({"dispatcher": name, "tokens_per_rank": T, "error": f"{type(exc).__name__}: {exc}"})
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            dist.barrier(group=group)
            steps.advance()
    return rows


# ------------------------------------------------------------------------------------------ reporting
def _merge(per_rank: list[list[dict]]) -> list[dict]:
    """One row per (dispatcher, T): medians over ranks, the slowest rank, ratios to NCCL, GB/s."""
    out = []
    for i, first in enumerate(per_rank[0]):
        rows = [r[i] for r in per_rank]
        errors = [r.get("error") for r in rows if "error" in r]
        merged = {"dispatcher": first["dispatcher"], "tokens_per_rank": first["tokens_per_rank"]}
        if errors:
            merged["error"] = errors[0]
            out.append(merged)
            continue
        for key in ("dispatch", "combine", "total", "nccl_dispatch", "nccl_combine", "header"):
            if key not in first:
                continue
            meds = [r[key]["median_ms"] for r in rows]
            merged[f"{key}_ms"] = statistics.median(meds)
            merged[f"{key}_ms_slowest_rank"] = max(meds)
            merged[f"{key}_method"] = rows[0][key]["method"]
        merged["nccl_total_ms"] = merged["nccl_dispatch_ms"] + merged["nccl_combine_ms"]
        for key in ("dispatch", "combine", "total"):
            merged[f"{key}_vs_nccl"] = merged[f"{key}_ms"] / max(merged[f"nccl_{key}_ms"], 1e-9)
        for key in ("dispatch_bytes_to_peers", "combine_bytes_to_peers", "ideal_bytes_to_peers"):
            merged[key] = max(r[key] for r in rows)
        for key in ("dispatch", "combine"):
            merged[f"{key}_GBps_to_peers"] = merged[f"{key}_bytes_to_peers"] / (merged[f"{key}_ms"] * 1e-3) / 1e9
        merged["per_rank"] = rows
        out.append(merged)
    return out


def _print_table(rows: list[dict]) -> None:
    head = (f"{'dispatcher':<20} {'T/rank':>7} {'dispatch ms':>11} {'combine ms':>10} {'total ms':>9} "
            f"{'header ms':>9} {'NCCL d+c ms':>11} {'x NCCL':>7} {'disp GB/s':>9} {'method':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['dispatcher']:<20} {r['tokens_per_rank']:>7} error: {r['error'][:80]}")
            continue
        print(f"{r['dispatcher']:<20} {r['tokens_per_rank']:>7} {r['dispatch_ms']:>11.3f} {r['combine_ms']:>10.3f} "
              f"{r['total_ms']:>9.3f} {r.get('header_ms', float('nan')):>9.3f} {r['nccl_total_ms']:>11.3f} "
              f"{r['total_vs_nccl']:>7.2f} "
              f"{r['dispatch_GBps_to_peers']:>9.1f} {r['total_method']:>8}")


def main(args) -> int:
    p = _params(args)
    from ..testing.distributed import under_torchrun
    refuse_ranks_under_torchrun(args.ranks)
    if under_torchrun() and not dist.is_initialized():     # started by torchrun: join its group
        if torch.cuda.is_available() and args.comm != "gloo":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(args.comm or ("nccl" if torch.cuda.is_available() else "gloo"))
    if dist.is_available() and dist.is_initialized():      # torchrun: this process is one rank
        ws, rank, backend = dist.get_world_size(), dist.get_rank(), dist.get_backend()
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
        mine = _worker(rank, ws, dict(p, verbosity=getattr(args, "verbosity", 0)))
        everyone: list = [None] * ws
        dist.all_gather_object(everyone, mine)
        if rank != 0:
            return 0
    else:
        from ..testing.distributed import run_on_ranks
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        ws = args.ranks or (gpus if gpus >= 2 else 2)
        backend = args.comm or ("nccl" if gpus >= ws else "gloo")
        if backend == "nccl" and gpus < ws:
            raise UsageError(f"NCCL with {ws} ranks needs {ws} GPUs, found {gpus}")
        names = p["dispatchers"] or _here(ws, "cuda" if backend == "nccl" else "cpu")
        log.info("bench dispatch: %s x tokens per rank %s on %d %s ranks (%d measurements, each a few seconds "
                 "on the CPU)", ",".join(names), ",".join(map(str, p["tokens"])), ws, backend,
                 len(names) * len(p["tokens"]))
        everyone = run_on_ranks(_worker, ws, dict(p, verbosity=getattr(args, "verbosity", 0)), backend=backend,
                                timeout_s=args.timeout)
    rows = _merge(everyone)
    env = environment(backend, ws)
    report = {"benchmark": "dispatch+combine", "environment": env, "params": p, "rows": rows,
              "method": ("CUDA events, median of the ranks' medians after warm-up; L2 flushed; GPU kept busy "
                         "while the host queues; ranks aligned by an all-reduce; graph replay for CUDA-graph-"
                         "safe dispatchers" if backend == "nccl" else "wall clock after a barrier (CPU)"),
              "baseline": "torch.distributed.all_to_all_single (uint8) with the same bytes per destination"}
    path = args.output or default_output("dispatch", env)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    _print_table(rows)
    print(f"wrote {path}")
    return 0 if not any("error" in r for r in rows) else 1
