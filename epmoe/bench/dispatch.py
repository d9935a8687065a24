"""`epmoe bench dispatch`: time dispatch + combine of each dispatcher against NCCL moving the same bytes,
the two timed the same way.

For each dispatcher and tokens-per-rank count T (defaults: every registered dispatcher that moves
tokens and runs on the device; T = 128 and 4096; DeepSeek-V3's H = 7168, top-8 of E = 256, BF16),
every rank routes T random tokens (`--routing`, default balanced: every rank receives the same number of
(token, expert) pairs, `epmoe.bench.routings`), then dispatch and combine are timed back to back inside
each repeat, with the experts replaced by the identity (the batch the dispatcher produced is handed
straight to its combine; where the batch names an `out` buffer, the identity's output already lies there, as
experts that write in place leave it), so only the dispatcher's own work and traffic are measured.

Two configurations per T:
  best     each named dispatcher with the capacity given (`max_tokens_per_rank = T`, where it takes one)
           and, where its plan is CUDA-graph safe, timed as CUDA graph replays;
  default  what `MoELayer(dispatcher="auto")` runs: the dispatcher "auto" resolves to, no capacity,
           eager; `vs_best` = its time / the best configuration of the same dispatcher.

The baseline is `torch.distributed.all_to_all_single` on `uint8` buffers with exactly the per-destination
byte counts the dispatcher moved (counted by its stats hook; self-traffic included, as in the dispatcher),
one call for the dispatch direction and one for the combine direction, timed exactly as the dispatcher
was: back to back in each repeat, and as graph replays if and only if the dispatcher's runs were
(`paired` says whether that held; a row whose NCCL could not be captured is marked unpaired).

Every time is reported per rank; a row's time is the slower rank's (the group waits for it), and the
ratios and bandwidths use it: `dispatch_vs_nccl` = dispatcher / NCCL, each at its slower rank; GB/s =
bytes sent to other ranks (the rank that sent most) / that time. "header ms" is the forward header alone
(the fixed-size exchange every forward of a collective dispatcher starts with, and its host read), eager.

Timing (`epmoe.bench.gpu_timing`): on GPUs CUDA events, median over repeats after warm-up, L2 flushed;
before each repeat the ranks' streams are lined up by a tiny all-reduce, then every rank sleeps the SAME
time on the GPU (the longest any rank needs to queue its run, agreed before timing), so the ranks' runs
start together and no rank's time includes waiting inside a collective for a peer that started later.
On CPUs (Gloo) the same loop on the wall clock with a barrier before each run: for checking the code,
not for numbers.

Ranks: under torchrun (torch.distributed already initialized) the current group is used; otherwise
`--ranks` local processes are started (NCCL with one GPU each when there are enough GPUs, else Gloo).
Writes JSON (with the command, commit and environment) under benchmarks/results/ of the checkout,
./epmoe-results elsewhere (rank 0 / the launching process).
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist

from ..log import Steps, configure_cli_logging, get_logger
from ..usage import CsvList, DeprecatedAlias, UsageError, refuse_ranks_under_torchrun
from .gpu_timing import GRAPH, GroupAgreement, Timer, WallClock
from .routings import ZIPF_EXPONENT, add_routing_flags, router_logits, routing_params, routing_problem
from .run_env import RESULTS_DIR_HELP, default_output, environment

log = get_logger("bench")

TOKENS = [128, 4096]
BEST, DEFAULT = "best", "default"


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
                        "send FP8 are listed as skipped, with the reason)")
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
    p.add_argument("--no-default", action="store_true",
                   help="leave out the default configuration (dispatcher=\"auto\", no capacity, eager)")
    add_routing_flags(p, default="balanced")
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
            "graph": not args.no_graph, "seed": args.seed, "fp8": bool(args.fp8), "default": not args.no_default,
            **routing_params(args)}


# -------------------------------------------------------------------------------------------- timing
class RankClock:
    """The timing loop of one rank of a group (`gpu_timing.Timer`): CUDA events on NCCL ranks, the wall
    clock on Gloo ranks (or the timer given). Before each repeat the ranks are lined up (an all-reduce
    on the GPU streams, no host sync; a barrier on CPUs), and every rank sleeps the same agreed time."""

    def __init__(self, device: torch.device, group, timer: Timer | None = None):
        self.device, self.group = device, group
        if timer is None:
            if device.type == "cuda":
                from .gpu_timing import GpuTimer
                timer = GpuTimer(device)
            else:
                timer = Timer(WallClock())
        self.timer = timer
        self.agree = GroupAgreement(group, device)

    def line_up(self) -> None:
        self.agree.line_up()

    def time_split(self, first, second, reps: int, warmup: int, use_graph: bool) -> tuple[dict, dict, dict]:
        """Times of `a = first()`, `second(a)` and both, inside each repeat (a dispatch and its combine)."""
        return tuple(t.as_dict() for t in self.timer.time_split(
            first, second, reps=reps, warmup=warmup, use_graph=use_graph, before_each=self.line_up, agree=self.agree))

    def time(self, fn, reps: int, warmup: int, use_graph: bool) -> dict:
        return self.timer.time(fn, reps=reps, warmup=warmup, use_graph=use_graph, before_each=self.line_up,
                               agree=self.agree).as_dict()


def _exchange_splits(send: list[int], device, group) -> list[int]:
    t = torch.tensor(send, dtype=torch.int64, device=device)
    r = torch.empty_like(t)
    dist.all_to_all_single(r, t, group=group)
    return r.tolist()


def _bytes_exchange(byte_splits: list[int], device, group):
    """all_to_all_single of uint8 with these bytes per destination, as a function of no arguments."""
    recv = _exchange_splits(byte_splits, device, group)
    inp = torch.randint(0, 255, (sum(byte_splits),), dtype=torch.uint8, device=device)
    out = torch.empty(sum(recv), dtype=torch.uint8, device=device)
    return lambda *_: dist.all_to_all_single(out, inp, recv, byte_splits, group=group)


def nccl_twin(clock: RankClock, method: str, dispatch_bytes: list[int], combine_bytes: list[int], reps: int,
              warmup: int) -> dict:
    """`all_to_all_single` of the dispatch bytes, then of the combine bytes, timed as the dispatcher was
    (`method`: graph replays only where the dispatcher's were). {"dispatch", "combine", "total": timings}."""
    first = _bytes_exchange(dispatch_bytes, clock.device, clock.group)
    second = _bytes_exchange(combine_bytes, clock.device, clock.group)
    d, c, t = clock.time_split(first, second, reps, warmup, use_graph=method == GRAPH)
    return {"dispatch": d, "combine": c, "total": t}


def time_with_twin(clock: RankClock, first, second, dispatch_bytes: list[int], combine_bytes: list[int],
                   reps: int, warmup: int, use_graph: bool) -> dict:
    """A dispatcher's dispatch and combine (`first`, `second`), then NCCL moving the same bytes the same
    way: {"dispatch", "combine", "total", "nccl_dispatch", "nccl_combine", "nccl_total": timings}."""
    d, c, t = clock.time_split(first, second, reps, warmup, use_graph)
    twin = nccl_twin(clock, d["method"], dispatch_bytes, combine_bytes, reps, warmup)
    return {"dispatch": d, "combine": c, "total": t, **{f"nccl_{k}": v for k, v in twin.items()}}


# ------------------------------------------------------------------------------------------- one row
def bench_config(p: dict):
    """The MoEConfig the dispatchers are built for (the experts' sizes do not matter here)."""
    from ..config import MoEConfig
    quant = None
    if p.get("fp8"):
        from ..quant.fp8 import Fp8Config
        quant = Fp8Config(weight_block=(128, 128), dispatch_fp8=True)
    return MoEConfig(num_experts=p["num_experts"], top_k=p["top_k"], hidden_size=p["hidden"],
                     intermediate_size=128, dtype=getattr(torch, p["dtype"]), quant=quant)


def _bench_one(name: str, config: str, T: int, p: dict, rank: int, ws: int, device, group, clock) -> dict:
    """One (dispatcher, configuration, T) on this rank: `best` = capacity T where the dispatcher takes
    one, graph replays where its plan allows; `default` = `name` (normally "auto") without capacity, eager.
    A dispatcher the contract refuses for this configuration (e.g. FP8 rows on one that cannot send them)
    is a row with the reason under "skipped"."""
    from .. import contract
    from ..build import make_dispatcher
    from ..errors import UnsupportedCombination
    from ..placement import Placement
    from ..routing import route

    cfg = bench_config(p)
    resolved = contract.resolve_names(name, "reference", cfg, ws, device.type)[0]
    if not contract.dispatcher_class(resolved).CAPS.communicates:
        return {"dispatcher": resolved, "config": config, "requested": name, "tokens_per_rank": T,
                "skipped": f"{name!r} is {resolved!r} on {ws} rank: nothing crosses the wire"}
    try:           # decided alike on every rank, before anything collective
        capacity = contract.build_plan(resolved, None, cfg, ws, device.type,
                                       T if config == BEST else None).max_tokens_per_rank
    except UnsupportedCombination as exc:
        return {"dispatcher": resolved, "config": config, "requested": name, "tokens_per_rank": T,
                "skipped": exc.reason}
    d = make_dispatcher(resolved, cfg, group=group, device=device, max_tokens_per_rank=capacity)
    g = torch.Generator(device="cpu").manual_seed(p["seed"] * 1000 + rank)
    x = torch.randn(T, cfg.hidden_size, generator=g).to(cfg.dtype).to(device)
    logits = router_logits(p.get("routing", "balanced"), cfg, T, rank, ws, g, p.get("zipf_exponent", ZIPF_EXPONENT))
    routing = route(logits.to(device), cfg)

    stats = d.enable_stats()
    batch, handle = d.dispatch(x, routing)            # also the warm-up of everything lazy
    y = batch.x.to(cfg.dtype)                         # the identity experts' output (made once, untimed)
    d.combine(y, handle)
    d.stats = None
    batch, handle = d.dispatch(x, routing)            # the second workspace slot (dispatchers with two)
    d.combine(y, handle)                              # leaves y where a batch's `out` says (untimed)
    row = {"dispatcher": d.plan.dispatcher, "config": config, "requested": name, "capacity": capacity,
           "tokens_per_rank": T, "rows_sent_per_rank": stats.dispatch_rows,
           "dispatch_bytes_to_peers": stats.bytes_to_peers("dispatch_bytes"),
           "combine_bytes_to_peers": stats.bytes_to_peers("combine_bytes"),
           "dispatch_bytes_per_rank": stats.dispatch_bytes, "combine_bytes_per_rank": stats.combine_bytes}
    # the (token, destination) pairs alone, H x dtype each: what an ideal dispatch must move to peers
    owner = torch.tensor(Placement(cfg.num_experts, ws, rank).owners, device=device)[routing.topk_ids.long()]
    hits = torch.zeros(T, ws, dtype=torch.bool, device=device).scatter_(1, owner, True)
    hits[:, rank] = False
    row["ideal_bytes_to_peers"] = int(hits.sum()) * cfg.hidden_size * x.element_size()
    row["pairs_to_rank"] = torch.bincount(owner.reshape(-1), minlength=ws).tolist()
    del batch, handle

    use_graph = p["graph"] and config == BEST and d.plan.cuda_graph_safe
    # dispatch and combine timed inside the same repeats: each combine consumes its own dispatch
    # the identity experts write their output where the batch says the combine reads it (`out`, as the
    # triton experts do: no copy), else hand over y
    row.update(time_with_twin(clock, lambda: d.dispatch(x, routing),
                              lambda bh: d.combine(y if getattr(bh[0], "out", None) is None else bh[0].out, bh[1]),
                              stats.dispatch_bytes, stats.combine_bytes, p["reps"], p["warmup"], use_graph))
    if hasattr(d, "exchange_headers") and not d.CAPS.peer_memory:
        # the forward header alone (NCCL/Gloo dispatchers: eager, it reads back on the host; the
        # symmetric-memory ones carry it in their flag exchange)
        row["header"] = clock.time(lambda: d.exchange_headers(T, device), p["reps"], p["warmup"], False)
    return row


def _here(ws: int, device_type: str) -> list[str]:
    """The registered dispatchers that move tokens and that the contract accepts on this device."""
    from ..contract import DISPATCHERS, dispatcher_problem
    return [n for n, cls in DISPATCHERS.items()
            if cls.CAPS.communicates and dispatcher_problem(n, None, ws, device_type) is None]


def plan_rows(names: list[str], tokens: list[int], default: bool) -> list[tuple[str, str, int]]:
    """(dispatcher name, configuration, T) in the order every rank measures them."""
    todo = [(name, BEST, T) for name in names for T in tokens]
    return todo + ([("auto", DEFAULT, T) for T in tokens] if default else [])


def _worker(rank: int, ws: int, p: dict) -> list[dict]:
    configure_cli_logging(p.get("verbosity", 0), rank)
    group = dist.group.WORLD
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    clock = RankClock(device, group)
    rows = []
    todo = plan_rows(p["dispatchers"] or _here(ws, device.type), p["tokens"], p.get("default", True))
    steps = Steps(log, "measured (dispatcher, configuration, tokens):", len(todo), every=0.0)
    for name, config, T in todo:
        log.debug("timing %s (%s) at %d tokens per rank", name, config, T)
        try:
            rows.append(_bench_one(name, config, T, p, rank, ws, device, group, clock))
        except Exception as exc:  # e.g. out of memory: recorded, the other rows still run
            rows.append({"dispatcher": name, "config": config, "tokens_per_rank": T,
                         "error": f"{type(exc).__name__}: {exc}"})
            if device.type == "cuda":
                torch.cuda.empty_cache()
        dist.barrier(group=group)
        steps.advance()
    return rows


# ------------------------------------------------------------------------------------------ reporting
TIMED = ("dispatch", "combine", "total", "nccl_dispatch", "nccl_combine", "nccl_total", "header")


def merge_ranks(rows: list[dict]) -> dict:
    """One configuration from every rank's row: each rank's median, the slower rank's as the row's time,
    ratios to NCCL and bandwidths at the slower ranks, the sleep each rank used."""
    first = rows[0]
    merged = {k: first[k] for k in ("dispatcher", "config", "requested", "capacity", "tokens_per_rank") if k in first}
    errors = [f"rank {i}: {r['error']}" for i, r in enumerate(rows) if "error" in r]
    if errors:
        merged["error"] = "; ".join(errors)
        return merged
    if "skipped" in first:
        merged["skipped"] = first["skipped"]
        return merged
    for key in TIMED:
        if key in first:
            per = [r[key]["median_ms"] for r in rows]
            merged[f"{key}_ms"] = max(per)                 # the group waits for its slower rank
            merged[f"{key}_ms_per_rank"] = per
    merged["method"], merged["nccl_method"] = first["dispatch"]["method"], first["nccl_dispatch"]["method"]
    merged["paired"] = all(r["dispatch"]["method"] == r["nccl_dispatch"]["method"] for r in rows)
    merged["sleep_ms_per_rank"] = {"dispatcher": [r["dispatch"]["sleep_ms"] for r in rows],
                                   "nccl": [r["nccl_dispatch"]["sleep_ms"] for r in rows]}
    for key in ("dispatch", "combine", "total"):
        merged[f"{key}_vs_nccl"] = merged[f"{key}_ms"] / max(merged[f"nccl_{key}_ms"], 1e-9)
    for key in ("dispatch_bytes_to_peers", "combine_bytes_to_peers", "ideal_bytes_to_peers"):
        merged[key] = max(r[key] for r in rows)
    for key in ("dispatch", "combine"):
        sent = merged[f"{key}_bytes_to_peers"]
        merged[f"{key}_GBps_to_peers"] = sent / (merged[f"{key}_ms"] * 1e-3) / 1e9
        merged[f"nccl_{key}_GBps_to_peers"] = sent / (merged[f"nccl_{key}_ms"] * 1e-3) / 1e9
    merged["pairs_per_rank"] = [sum(r["pairs_to_rank"][d] for r in rows) for d in range(len(rows))]
    merged["per_rank"] = rows
    return merged


def merge(per_rank: list[list[dict]]) -> list[dict]:
    """One row per measured configuration; a default row also gets `vs_best`: its total time / that of
    the best configuration of the same dispatcher at the same T (when that was measured)."""
    out = [merge_ranks([r[i] for r in per_rank]) for i in range(len(per_rank[0]))]
    best = {(r["dispatcher"], r["tokens_per_rank"]): r for r in out if r.get("config") == BEST and "total_ms" in r}
    for r in out:
        b = best.get((r["dispatcher"], r["tokens_per_rank"]))
        if r.get("config") == DEFAULT and "total_ms" in r and b is not None:
            r["best_total_ms"] = b["total_ms"]
            r["vs_best"] = r["total_ms"] / b["total_ms"]
    return out


def _us(v) -> str:
    return "-" if v is None else f"{v * 1e3:.1f}"


def print_table(rows: list[dict]) -> None:
    print("times in µs at the slower rank; x = this / NCCL all_to_all_single of the same bytes timed the same "
          "way; GB/s = bytes to other ranks per second")
    head = (f"{'dispatcher':<21} {'config':<7} {'T/rank':>6} {'method':<10} | {'disp':>7} {'NCCL':>7} {'x':>5} "
            f"{'GB/s':>5} {'NCCL':>5} | {'comb':>7} {'NCCL':>7} {'x':>5} {'GB/s':>5} {'NCCL':>5} | {'total':>7} "
            f"{'x':>5} {'vs best':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        what = f"{r['dispatcher']:<21} {r.get('config', BEST):<7} {r['tokens_per_rank']:>6}"
        if "error" in r or "skipped" in r:
            print(f"{what} {'error' if 'error' in r else 'skipped'}: {r.get('error', r.get('skipped'))[:120]}")
            continue
        method = r["method"] + ("" if r["paired"] else f"!{r['nccl_method']}")
        cells = [what, f"{method:<10} |"]
        for key in ("dispatch", "combine"):
            cells.append(f"{_us(r[f'{key}_ms']):>7} {_us(r[f'nccl_{key}_ms']):>7} {r[f'{key}_vs_nccl']:>5.2f} "
                         f"{r[f'{key}_GBps_to_peers']:>5.0f} {r[f'nccl_{key}_GBps_to_peers']:>5.0f} |")
        vs = r.get("vs_best")
        vs = "-" if vs is None else format(vs, ".2f")
        cells.append(f"{_us(r['total_ms']):>7} {r['total_vs_nccl']:>5.2f} {vs:>7}")
        print(" ".join(cells))
    if any(not r.get("paired", True) for r in rows):
        print("method a!b: the dispatcher ran as a, NCCL as b (its capture failed): that row's ratios are unpaired")


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
        problem = routing_problem(p["routing"], bench_config(p), ws, p["zipf_exponent"])
        if problem:
            raise UsageError(f"--routing {p['routing']}: {problem}")
        names = p["dispatchers"] or _here(ws, "cuda" if backend == "nccl" else "cpu")
        log.info("bench dispatch: %s x tokens per rank %s on %d %s ranks (%d measurements, each a few seconds "
                 "on the CPU)", ",".join(names + (["auto (default)"] if p["default"] else [])),
                 ",".join(map(str, p["tokens"])), ws, backend, len(plan_rows(names, p["tokens"], p["default"])))
        everyone = run_on_ranks(_worker, ws, dict(p, verbosity=getattr(args, "verbosity", 0)), backend=backend,
                                timeout_s=args.timeout)
    rows = merge(everyone)
    env = environment(backend, ws)
    report = {"benchmark": "dispatch+combine", "environment": env, "params": p, "rows": rows,
              "method": ("CUDA events, each rank's median after warm-up, the slower rank's reported; L2 flushed; "
                         "ranks lined up by an all-reduce before each repeat, then the same GPU sleep on every "
                         "rank (agreed: the longest any rank needs to queue its run); best configuration: graph "
                         "replays where the plan is CUDA-graph safe, NCCL replayed as a graph exactly where the "
                         "dispatcher was" if backend == "nccl" else
                         "wall clock after a barrier (CPU, Gloo): not a performance result"),
              "baseline": "torch.distributed.all_to_all_single (uint8) with the same bytes per destination, "
                          "dispatch then combine direction, timed the same way as the dispatcher",
              "definitions": {
                  "<x>_ms": "the slower rank's median (<x>_ms_per_rank: every rank's)",
                  "<x>_vs_nccl": "<x>_ms / nccl_<x>_ms",
                  "<x>_GBps_to_peers": "<x>_bytes_to_peers (the rank that sent most) / <x>_ms",
                  "paired": "the NCCL twin ran the same way (graph or eager) as the dispatcher on every rank",
                  "best": "capacity = tokens_per_rank where the dispatcher takes one; graph replays where safe",
                  "default": "dispatcher='auto' as MoELayer resolves it, no capacity, eager",
                  "vs_best": "default total_ms / best total_ms of the same dispatcher and T",
                  "pairs_per_rank": "(token, expert) pairs each rank's experts receive from all ranks"}}
    path = args.output or default_output("dispatch", env)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print_table(rows)
    print(f"wrote {path}")
    return 0 if not any("error" in r for r in rows) else 1
