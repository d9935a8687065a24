"""`epmoe bench layer`: time the whole MoE layer forward with expert parallelism, per dispatcher.

What is timed is `layer(hidden [T, H], router_logits [T, E])` on every rank of the group: routing,
dispatch, the experts, combine. The logits route the tokens as `--routing` says (`epmoe.bench.routings`;
default balanced: every rank's experts receive exactly the same number of (token, expert) pairs, each
token's experts spread over the ranks; `random`: normal logits; `skewed`: Zipf-like expert popularity,
`--zipf-exponent`). For each preset (default: deepseek-v3
and qwen3-30b-a3b at their real sizes; `--experts N` / `--shrink F` shrink them as for `epmoe run`),
format (BF16; with `--fp8-dispatch` also FP8 weights with `Fp8Config(dispatch_fp8=True)`, FP8 rows
and scales on the wire, into the experts that take FP8), dispatcher (allgather, alltoall, low_latency)
and tokens per rank T (128, 4096), every rank passes its own T tokens. The experts backend of each
dispatcher is the one `experts="auto"` resolves to (or `--backend`); a pairing the contract refuses is
listed as skipped with its reason.

The same layer on ONE rank is measured in the same run as the baseline: the `local` dispatcher with
every expert on one device (each rank runs it on its own device at the same time, where it fits in
memory), at T tokens (this rank's) and at ranks x T tokens (every rank's tokens together: one device
doing the whole group's batch). Reported per row:
  ms                      median over ranks of each rank's median forward time
  step_ms                 the slowest rank's median (the group finishes a step when its slowest rank does);
                          per_rank holds every rank's
  tokens_per_s_per_rank   T / ms;  tokens_per_s_total: ranks x T / step_ms
  tflops_per_gpu          the effective MoE-layer rate of one GPU: 6 * T * k * H * I / step_ms (routing,
                          dispatch, experts and combine all inside the step)
  speedup_vs_local        local time for all ranks x T tokens on one device / step_ms (1 device doing the
                          whole batch vs ranks devices sharing it); scaling_efficiency = speedup / ranks
  ep_vs_local_same_tokens step_ms / local time for T tokens (same tokens per device; < 1: EP is faster
                          per step because each device holds and reads only E / ranks experts)

Timing on GPUs (`epmoe.bench.gpu_timing.GpuTimer`): CUDA events, median of `--reps` after `--warmup`,
fresh non-zero inputs (a pool of random hidden states and router logits per rank, copied into the
layer's input buffers before each run, untimed), L2 flushed and the GPU kept busy while the host queues
a run; for EP layers the ranks' streams are lined up by a tiny all-reduce before each run and every rank
sleeps the same agreed time (the longest any rank needs), so the ranks start each run together.
Pairings whose dispatcher and experts both declare `cuda_graph_safe` (low_latency + batched, local +
triton; alltoall and the symm dispatchers, which are built with capacity T) are captured once in a CUDA
graph and replayed; the others run eagerly (allgather waits for the host by design, and that wait is part
of its time). On CPUs (Gloo, `--device cpu`): wall
clock after a barrier, for checking the code on small shapes; those times are not performance results.

Every measured configuration's output (inputs of the pool's first entry) is checked on `--check-rows`
sampled rows of every rank against `epmoe.reference_moe` in float64 (on the GPU where there is one), on
the weights as the layer stores them (BF16, or FP8 dequantized), bound 1e-2 for BF16 and 3e-2 for FP8.

EPLB: with `--redundant-experts R` the EP layers hold R replicas of hot experts (`MoELayer(redundant_experts=R)`);
each configuration is measured as built (row `eplb: before`), then rebalanced from the load its timed runs
counted (`layer.rebalance()`, a collective) and measured again, timed and checked the same way (row `eplb:
after rebalance`, with the rebalance's ms and bytes); the rank loads are counted on the physical slots, and
a summary of max/mean rank load and step time before and after follows the table. Meant for `--routing skewed`.

Overlap: `--micro-batches 2` builds the EP layers with `MoELayer(micro_batches=2)` (each forward split in two
micro-batches whose dispatch and combine run while the other's experts compute); `--micro-batches 1,2`
measures both, a row each (`micro_batches` in the row, `mb` in the table), against the same one-rank
baseline, which always runs one batch (it has no exchange to hide). `--comm-sms N` bounds the SMs of the
symm dispatchers' transfer kernels (`MoELayer(comm_sms=N)`). Both are checked before any rank starts as
the layer checks them: a dispatcher named in `--dispatchers` that cannot take them is refused with the
reason, and the default list leaves such dispatchers out (said in a note).

Ranks: `--ranks 2,4,8` runs each count in turn (local processes, NCCL with one GPU each, or Gloo with
`--device cpu`), one JSON per count; under torchrun leave out `--ranks`. Rows are also appended to
`<json>.partial.jsonl` as they finish (removed after a complete run), so a run that is cut off keeps
what it measured. `python -m epmoe.bench.scaling` turns the JSONs of several counts into a table and
a plot (done here too when several counts ran).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
import torch.distributed as dist

from ..log import get_logger
from ..sizes import ceil_div
from ..testing.graphs import capture
from ..usage import (CsvList, UsageError, add_overlap_flags, all_experts_per_token, at_least, check_overlap,
                     check_redundant_experts, micro_batch_values, overlap_problem, refuse_ranks_under_torchrun)
from . import eplb
from .gpu_timing import GroupAgreement, Timer, WallClock
from .routings import add_routing_flags, router_logits, routing_params, routing_problem
from .run_env import RESULTS_DIR_HELP, available_ram, default_output, environment, results_dir

log = get_logger("bench")

PRESETS = ["deepseek-v3", "qwen3-30b-a3b"]
TOKENS = [128, 4096]
FORMATS = {"bf16": "BF16 weights and rows", "fp8-dispatch": "FP8 block weights, FP8 rows + scales on the wire"}
POOL = 3                      # distinct random inputs cycled through the timed runs
MEMORY_FRACTION = 0.85        # a configuration runs if its estimated bytes fit in this share of free memory


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--presets", "--preset", action=CsvList, default=",".join(PRESETS),
                   help="comma-separated presets (default: %(default)s)")
    p.add_argument("--tokens", action=CsvList, default=",".join(map(str, TOKENS)),
                   help="tokens per rank T (default: %(default)s)")
    p.add_argument("--dispatchers", action=CsvList, default=None,
                   help="comma-separated (default: every registered dispatcher that moves tokens, runs here and "
                        "takes --micro-batches and --comm-sms)")
    p.add_argument("--backend", default="auto",
                   help="experts backend for every dispatcher (default: what experts='auto' resolves to)")
    add_routing_flags(p, default="balanced")
    p.add_argument("--experts", type=int, default=None, metavar="N", help="shrink each preset to N experts")
    p.add_argument("--shrink", type=int, default=1, metavar="F", help="divide hidden and intermediate sizes by F")
    p.add_argument("--fp8-dispatch", action="store_true",
                   help="also time FP8 layers (block-scaled weights) with Fp8Config(dispatch_fp8=True)")
    p.add_argument("--formats", action=CsvList, default="bf16",
                   help=f"formats to time, comma-separated, from {list(FORMATS)} (default: %(default)s; "
                        "--fp8-dispatch adds fp8-dispatch)")
    p.add_argument("--ranks", action=CsvList, default=None,
                   help="rank counts to run, comma-separated, e.g. 2,4,8 (default: every GPU, or 2 on the CPU); "
                        "leave out under torchrun")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                   help="cuda: NCCL, one GPU per rank; cpu: Gloo (small shapes only; default: cuda if present)")
    p.add_argument("--reps", type=int, default=20, help="timed repeats (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs first (default: %(default)s)")
    p.add_argument("--no-graph", action="store_true", help="run every configuration eagerly")
    p.add_argument("--no-local", action="store_true", help="skip the single-rank `local` baseline")
    p.add_argument("--check-rows", type=int, default=16, help="rows per rank checked against the oracle")
    p.add_argument("--output", default=None,
                   help="JSON path (one rank count only; default: <output-dir>/layer_<device>_<ranks>x_<date>.json)")
    p.add_argument("--output-dir", default=None, help=f"where JSONs go (default: {RESULTS_DIR_HELP})")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per rank count before ranks are killed")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and tokens (default 0)")
    eplb.add_flags(p)
    add_overlap_flags(p, several=True)


def _csv(s) -> list[str]:
    return [v.strip() for v in str(s).split(",") if v.strip()]


def _positive_ints(s, what: str) -> list[int]:
    try:
        vals = [int(v) for v in _csv(s)]
    except ValueError:
        raise UsageError(f"{what} must be comma-separated integers, got {s!r}")
    if not vals or any(v < 1 for v in vals):
        raise UsageError(f"{what} must be positive integers, got {s!r}")
    return vals


def _params(args) -> dict:
    from .. import contract
    from ..presets import PRESETS as KNOWN_PRESETS
    presets = _csv(args.presets)
    bad = [x for x in presets if x not in KNOWN_PRESETS]
    if bad or not presets:
        raise UsageError(f"unknown presets {bad}; known: {list(KNOWN_PRESETS)}")
    here = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    micro_batches = micro_batch_values(args.micro_batches)
    at_least("--comm-sms", args.comm_sms, 1)

    def overlap(d: str) -> str | None:      # the overlap flags against what the dispatcher declares
        return next(filter(None, (overlap_problem(d, m, args.comm_sms, None, 2, here) for m in micro_batches)), None)
    if args.dispatchers is not None:
        dispatchers = _csv(args.dispatchers)
    else:                                   # the registry's, runnable here, taking the overlap flags
        dispatchers = [n for n, cls in contract.DISPATCHERS.items()
                       if cls.CAPS.communicates and contract.dispatcher_problem(n, None, 2, here) is None]
        left_out = {d: why for d in dispatchers if (why := overlap(d))}
        for d, why in left_out.items():
            log.warning("note: %s is not measured: %s", d, why)
        dispatchers = [d for d in dispatchers if d not in left_out]
        if left_out and not dispatchers:
            raise UsageError(f"no dispatcher that runs here takes these settings: {next(iter(left_out.values()))}")
    bad = [d for d in dispatchers if d not in contract.DISPATCHERS or not contract.DISPATCHERS[d].CAPS.communicates]
    if bad or not dispatchers:
        raise UsageError(f"dispatchers must be among {[d for d, c in contract.DISPATCHERS.items() if c.CAPS.communicates]}"
                         f" (local is the baseline, always measured unless --no-local), got {bad or dispatchers}")
    for d in dispatchers:                   # named on the command line: refused as the layer would refuse it
        problem = overlap(d)
        if problem:
            raise UsageError(problem)
    if args.backend != "auto" and args.backend not in contract.EXPERTS:
        raise UsageError(f"unknown experts backend {args.backend!r}; known: {sorted(contract.EXPERTS)}")
    for name in ("reps", "check_rows"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        raise UsageError("--warmup must be >= 0")
    for preset in presets:     # measured as asked (a valid shape to time), but said
        problem = all_experts_per_token(preset, args.experts)
        if problem:
            log.warning("note: %s", problem)
    if args.experts is not None and args.experts < 1 or args.shrink < 1:
        raise UsageError("--experts and --shrink must be >= 1")
    formats = _csv(args.formats)
    if args.fp8_dispatch and "fp8-dispatch" not in formats:
        formats.append("fp8-dispatch")
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise UsageError(f"--formats must be among {list(FORMATS)}, got {args.formats!r}")
    return {"presets": presets, "tokens": _positive_ints(args.tokens, "--tokens"), "dispatchers": dispatchers,
            "backend": args.backend, "experts": args.experts, "shrink": args.shrink,
            "formats": formats, "reps": args.reps,
            "warmup": args.warmup, "graph": not args.no_graph, "local": not args.no_local,
            "check_rows": args.check_rows, "seed": args.seed, "micro_batches": micro_batches,
            "comm_sms": args.comm_sms, **routing_params(args), **eplb.params(args)}


# ------------------------------------------------------------------------------------ configurations
def layer_config(preset: str, fmt: str, experts: int | None = None, shrink: int = 1):
    """The MoEConfig a row measures: the preset (shrunk if asked) in BF16, or with FP8 dispatch."""
    from ..presets import preset_config, shrink_config
    from ..quant.fp8 import Fp8Config
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; known: {list(FORMATS)}")
    quant = Fp8Config(weight_block=(128, 128), activation="per_token_group", dispatch_fp8=True) \
        if fmt == "fp8-dispatch" else None
    return shrink_config(preset_config(preset, dtype=torch.bfloat16, quant=quant), experts=experts, shrink=shrink)


def pick_experts(dispatcher: str, backend: str, cfg, ranks: int, device_type: str) -> tuple[str, str | None]:
    """(experts backend, why it cannot run or None) for this dispatcher, as the layer would resolve it."""
    from .. import contract
    _, experts = contract.resolve_names(dispatcher, backend, cfg, ranks, device_type)
    return experts, contract.pairing_problem(dispatcher, experts, cfg, ranks, device_type)


def estimate_bytes(cfg, layout: str, tokens: int, ranks: int, local_experts: int, capacity: int = 0,
                   micro_batches: int = 1) -> int:
    """A rough upper estimate of the device memory one rank's layer needs for one forward: its weights,
    the rows it receives in the layer's dtype (in, out, a copy), the float32 intermediates of the expert
    pairs, and where the layer has a capacity (`capacity`: rows a batch spans; the batched layout's per
    local expert) the whole of it. Used only to skip what cannot fit.

    `micro_batches` 2: the first micro-batch's rows are held until it is combined, after the second has
    arrived, so both batches count; with a capacity each spans all of it (each micro-batch's tokens count
    against max_tokens_per_rank), without one each holds its half of the tokens. The experts' float32
    intermediates are one micro-batch's at a time."""
    H, I, k = cfg.padded_hidden_size, cfg.padded_intermediate_size, cfg.top_k
    welem = 1 if cfg.quant is not None else 2
    weights = local_experts * 3 * H * I * welem
    if layout == "batched":
        rows = local_experts * capacity * micro_batches
        return weights + rows * (H * 2 * 2 + 3 * I * 4) + ranks * tokens * k * H * 4
    share = ceil_div(tokens, micro_batches)    # the larger micro-batch's tokens
    # at most every token of every rank arrives here once (a batch with a capacity spans all of it)
    rows = micro_batches * max(ranks * share, capacity)
    pairs = 2 * share * min(k, local_experts)  # a rank's expected share of pairs, twice for imbalance
    return weights + rows * H * 2 * 3 + pairs * (3 * I + H) * 4


# ------------------------------------------------------------------------------------ oracle weights
class Fp8DequantizedExperts:
    """Expert e of a seeded source as an FP8 layer stores it: quantized with the scheme's one formula and
    dequantized to float32 (what the oracle compares an FP8 layer to)."""

    def __init__(self, source, quant):
        self.source, self.quant = source, quant

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, e: int):
        from ..quant.fp8 import dequantize_weight, quantize_weight
        g, b = self.quant.weight_granularity, self.quant.weight_block
        return tuple(dequantize_weight(*quantize_weight(w, g, b), b) for w in self.source[e])


# ------------------------------------------------------------------------------------------ one rank
class _RankBench:
    def __init__(self, rank: int, ws: int, p: dict, device: torch.device, group):
        self.rank, self.ws, self.p, self.device, self.group = rank, ws, p, device, group
        self.timer = Timer(WallClock())
        self.agree = GroupAgreement(group, device)
        self.rates: dict | None = None      # copy bytes/s and matmul FLOP/s of this GPU (the floor)
        self.rows: list[dict] = []
        if device.type == "cuda":
            from .gpu_timing import GpuTimer, measure_copy_bandwidth, measure_matmul_rate
            self.timer = GpuTimer(device)
            self.rates = {"copy": measure_copy_bandwidth(self.timer),
                          "bf16": measure_matmul_rate(self.timer, torch.bfloat16)}
            if "fp8-dispatch" in p["formats"]:
                try:
                    self.rates["fp8"] = measure_matmul_rate(self.timer, torch.float8_e4m3fn)
                except Exception as exc:   # no FP8 matrix units: the FP8 floor then counts bytes only
                    print(f"[rank {rank}] FP8 matmul rate not measured: {exc}", file=sys.stderr, flush=True)

    # -- collectives of the bench itself
    def all_ok(self, ok: bool) -> bool:
        t = torch.tensor([1 if ok else 0], dtype=torch.int32, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return bool(t.item())

    def fits(self, need: int) -> tuple[bool, str]:
        """Does `need` bytes fit on every rank (decided together, so every rank skips alike)?"""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            free = torch.cuda.mem_get_info(self.device)[0]
        else:
            avail = available_ram()
            free = avail // self.ws if avail else 1 << 62
        t = torch.tensor([free - need / MEMORY_FRACTION], dtype=torch.float64)
        t = t.to(self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return t.item() >= 0, f"needs about {need / 2**30:.1f} GiB per rank, {free / 2**30:.1f} GiB free here"

    def publish(self, row: dict) -> None:
        """Gather one row from every rank; rank 0 merges it, prints it and appends it to the partial file."""
        everyone: list = [None] * self.ws
        dist.all_gather_object(everyone, row, group=self.group)
        if self.rank != 0:
            return
        merged = merge_rows(everyone, self.ws)
        self.rows.append(merged)
        print(format_row(merged), flush=True)
        if self.p.get("partial"):
            with open(self.p["partial"], "a") as f:
                f.write(json.dumps(merged) + "\n")

    # -- inputs
    def pool(self, cfg, T: int, sources=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """POOL inputs (hidden, logits) of T tokens of each rank in `sources` (default: this rank), one
        after the other: a rank's tokens are the same whichever rank builds them (the one-device baseline
        at ranks x T runs exactly the group's tokens)."""
        parts = []
        for src in ([self.rank] if sources is None else sources):
            seed = self.p["seed"] * 7919 + 1000 * src + T
            g = torch.Generator(device=self.device).manual_seed(seed)
            g_route = torch.Generator().manual_seed(seed)
            parts.append([(torch.randn(T, cfg.hidden_size, generator=g, device=self.device).to(cfg.dtype),
                           router_logits(self.p["routing"], cfg, T, src, self.ws, g_route,
                                         self.p["zipf_exponent"]).to(self.device))
                          for _ in range(POOL)])
        return [tuple(torch.cat(t) for t in zip(*entry)) for entry in zip(*parts)]

    def sample(self, T: int) -> torch.Tensor:
        n = self.p["check_rows"]
        if T <= n:
            return torch.arange(T)
        g = torch.Generator().manual_seed(self.p["seed"] + 31 * self.rank + T)
        head = torch.arange(n // 2)
        tail = torch.randperm(T - n // 2, generator=g)[:n - n // 2] + n // 2
        return torch.cat([head, tail]).sort().values

    # -- timing
    def _capture(self, fn):
        """CUDA graph of fn() after a warm-up on a side stream; (replay, static output) or None."""
        try:
            replay, out = capture(fn, self.device)
            replay()
            torch.cuda.synchronize(self.device)
            return replay, out
        except Exception as exc:
            print(f"[rank {self.rank}] CUDA graph capture failed, timing eagerly: {type(exc).__name__}: {exc}",
                  file=sys.stderr, flush=True)
            torch.cuda.synchronize(self.device)
            return None

    def measure(self, layer, pool, use_graph: bool, collective: bool) -> tuple[dict, torch.Tensor]:
        """Time layer(x, logits) with inputs cycled from `pool`; return (timing, output on pool[0])."""
        x_s, l_s = pool[0][0].clone(), pool[0][1].clone()
        state = {"i": 0}

        def load(i):
            state["i"] = i
            x_s.copy_(pool[i][0])
            l_s.copy_(pool[i][1])

        forward = lambda: layer(x_s, l_s)  # noqa: E731
        run, out_static, graph = forward, None, None
        if self.device.type == "cuda" and use_graph:
            captured = self._capture(forward)
            ok = captured is not None
            if collective:
                ok = self.all_ok(ok)
            if ok:
                run, out_static = captured
                graph = run      # the replay holds the graph alive
        reps, warmup = self.p["reps"], self.p["warmup"]

        def before_each():
            load((state["i"] + 1) % len(pool))
            if collective:
                self.agree.line_up()

        t = self.timer.time(run, reps=reps, warmup=warmup, use_graph=False, before_each=before_each,
                            agree=self.agree if collective else None).as_dict()
        if graph is not None:
            t["method"] = "graph"
        load(0)
        out = run()
        out = (out_static if graph is not None else out).clone()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        del graph
        return t, out

    def check(self, out, pool, cfg, oracle, bias) -> dict:
        from ..reference import reference_moe
        from ..testing.compare import bound_for, compare
        x, logits = pool[0]
        idx = self.sample(x.shape[0]).to(self.device)
        ref = reference_moe(x[idx], logits[idx], oracle, cfg, score_correction_bias=bias, device=self.device)
        res = compare(out[idx], ref)
        bound = bound_for(cfg.dtype, fp8=cfg.quant is not None)
        return {"rel_err": res.rel_err, "max_abs": res.max_abs, "finite": res.finite, "bound": bound,
                "rows": int(idx.numel()), "ok": bool(res.finite and res.rel_err <= bound),
                **({} if res.finite and res.rel_err <= bound else {"report": res.report})}

    def load_of(self, layer, x, logits, collective: bool) -> dict:
        """What this rank's experts get for these inputs (every rank's tokens when `collective`): experts
        hit and (token, expert) pairs; on a GPU also the floor of its expert work in ms, max(weight bytes
        of the experts hit / copy rate, 6 * pairs * H * I FLOPs / matmul rate), rates measured in this run."""
        cfg = layer.cfg
        routing = layer.compute_routing(x, logits)
        mine = eplb.rank_pairs(layer, routing, self.group if collective else None)
        out = {"experts_hit": int((mine > 0).sum()), "pairs": int(mine.sum())}
        if self.rates is not None:
            H, I, fp8 = cfg.hidden_size, cfg.intermediate_size, cfg.quant is not None
            nbytes = out["experts_hit"] * 3 * H * I * (1 if fp8 else 2)
            rate = self.rates.get("fp8" if fp8 else "bf16")
            flops = 6.0 * out["pairs"] * H * I
            out["floor_ms"] = max(nbytes / self.rates["copy"], flops / rate if rate else 0.0) * 1e3
        return out

    # -- building layers
    def build(self, cfg, dispatcher, experts, source, bias, group, max_tokens=None, micro_batches=1):
        """The layer a row times; an EP layer (`group`) with the run's --comm-sms and redundant experts."""
        from ..layer import MoELayer
        ep = group is not None
        layer = MoELayer(cfg, ep_group=group, dispatcher=dispatcher, experts=experts, device=self.device,
                         max_tokens_per_rank=max_tokens, micro_batches=micro_batches,
                         comm_sms=self.p["comm_sms"] if ep else None,
                         redundant_experts=(self.p["redundant_experts"] or 0) if ep else 0)
        for e in layer.local_experts:
            g, u, d = source[e]
            layer.load_expert(e, gate_proj=g, up_proj=u, down_proj=d)
        if layer.score_correction_bias is not None:
            layer.score_correction_bias.copy_(bias)
        return layer

    def release(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    # -- the run
    def run(self) -> list[dict]:
        from ..placement import Placement
        from ..testing.random_moe import SeededExperts
        p = self.p
        with torch.no_grad():
            for preset in p["presets"]:
                for fmt in p["formats"]:
                    cfg = layer_config(preset, fmt, p["experts"], p["shrink"])
                    source = SeededExperts(cfg, p["seed"], self.device)
                    oracle = source if cfg.quant is None else Fp8DequantizedExperts(source, cfg.quant)
                    bias = None
                    if cfg.scoring == "sigmoid":
                        gen = torch.Generator().manual_seed(p["seed"] + 7)
                        bias = (torch.randn(cfg.num_experts, generator=gen) * 0.1).to(self.device)
                    base = {"preset": preset, "format": fmt, "config": cfg.describe(), "ranks": self.ws,
                            "routing": p["routing"],
                            "num_experts": cfg.num_experts, "top_k": cfg.top_k, "hidden_size": cfg.hidden_size,
                            "intermediate_size": cfg.intermediate_size}
                    if p["local"]:
                        self.run_local(cfg, base, source, oracle, bias)
                    L = Placement(cfg.num_experts + (p["redundant_experts"] or 0), self.ws,
                                  self.rank).num_local_experts      # physical slots, replicas included
                    for d in p["dispatchers"]:
                        for m in p["micro_batches"]:
                            self.run_dispatcher(cfg, base, d, L, source, oracle, bias, m)
        return self.rows

    def run_local(self, cfg, base, source, oracle, bias) -> None:
        """The same layer on one rank (every expert here), at T and at ranks x T tokens."""
        experts, why = pick_experts("local", self.p["backend"], cfg, 1, self.device.type)
        sizes = sorted({t for T in self.p["tokens"] for t in (T, self.ws * T)})
        whole_group = {self.ws * T for T in self.p["tokens"]}     # sizes that run every rank's tokens
        head = dict(base, dispatcher="local", experts=experts, kind="local", micro_batches=1, comm_sms=None)
        if why is not None:
            for t in sizes:
                self.publish(dict(head, tokens_per_rank=t, skipped=why))
            return
        ok, note = self.fits(estimate_bytes(cfg, "flat", 0, 1, cfg.num_experts))
        if not ok:
            for t in sizes:
                self.publish(dict(head, tokens_per_rank=t, skipped=f"does not fit on one device: {note}"))
            return
        layer = self.build(cfg, "local", experts, source, bias, None)
        caps_graph = self._graph_safe("local", experts)
        for t in sizes:
            row = dict(head, tokens_per_rank=t)
            ok, note = self.fits(estimate_bytes(cfg, "flat", t, 1, cfg.num_experts)
                                 - estimate_bytes(cfg, "flat", 0, 1, cfg.num_experts))
            if not ok:
                self.publish(dict(row, skipped=f"does not fit on one device: {note}"))
                continue
            try:
                pool = (self.pool(cfg, t // self.ws, range(self.ws)) if t in whole_group else self.pool(cfg, t))
                timing, out = self.measure(layer, pool, caps_graph, collective=False)
                row.update(timing=timing, check=self.check(out, pool, cfg, oracle, bias),
                           load=self.load_of(layer, *pool[0], collective=False))
                del pool, out
            except Exception as exc:  # out of memory on one device: recorded; no collective was in flight
                row["error"] = f"{type(exc).__name__}: {exc}"
            self.release()
            self.publish(row)
        del layer
        self.release()

    def run_dispatcher(self, cfg, base, d, L, source, oracle, bias, micro_batches: int = 1) -> None:
        from .. import contract
        experts, why = pick_experts(d, self.p["backend"], cfg, self.ws, self.device.type)
        head = dict(base, dispatcher=d, experts=experts, kind="ep", micro_batches=micro_batches,
                    comm_sms=self.p["comm_sms"])
        if why is not None:
            for T in self.p["tokens"]:
                self.publish(dict(head, tokens_per_rank=T, skipped=why))
            return
        dcls = contract.dispatcher_class(d)
        layout = dcls.CAPS.layout
        per_t = dcls.CAPS.needs_max_tokens or dcls.CAPS.takes_max_tokens   # capacity = T: one layer per T
        balancing = self.p["redundant_experts"] is not None
        rebuild = per_t or balancing               # a rebalanced layer: each T starts from the initial placement
        if balancing:
            head.update(eplb="before", redundant_experts=self.p["redundant_experts"])
        use_graph = self._graph_safe(d, experts)
        layer, built_for = None, None
        for T in self.p["tokens"]:
            row = dict(head, tokens_per_rank=T)
            ok, note = self.fits(estimate_bytes(cfg, layout, T, self.ws, L, capacity=self.ws * T if per_t else 0,
                                                micro_batches=micro_batches))
            if not ok:
                self.publish(dict(row, skipped=note))
                continue
            try:
                if layer is None or (rebuild and built_for != T):
                    layer = None
                    self.release()
                    layer = self.build(cfg, d, experts, source, bias, self.group, max_tokens=T if per_t else None,
                                       micro_batches=micro_batches)
                    built_for = T
                pool = self.pool(cfg, T)
                timing, out = self.measure(layer, pool, use_graph, collective=True)
                row.update(timing=timing, check=self.check(out, pool, cfg, oracle, bias),
                           load=self.load_of(layer, *pool[0], collective=True))
                del pool, out
            except Exception as exc:   # a build refused on every rank (handshake) or out of memory
                row["error"] = f"{type(exc).__name__}: {exc}"
                layer = None
            self.release()
            self.publish(row)
            if balancing:
                self.publish(self.rebalanced(layer, row, cfg, T, use_graph, oracle, bias))
        del layer
        self.release()

    def rebalanced(self, layer, row: dict, cfg, T: int, use_graph: bool, oracle, bias) -> dict:
        """Rebalance `layer` from the load its timed runs measured, and measure it again (a row)."""
        after = {k: v for k, v in row.items() if k not in ("timing", "check", "load", "error")}
        after["eplb"] = "after rebalance"
        if layer is None or "error" in row:
            return dict(after, skipped="the layer before the rebalance failed")
        try:
            moved = layer.rebalance()
            pool = self.pool(cfg, T)
            timing, out = self.measure(layer, pool, use_graph, collective=True)
            after.update(timing=timing, check=self.check(out, pool, cfg, oracle, bias),
                         load=self.load_of(layer, *pool[0], collective=True),
                         rebalance={"ms": moved.seconds * 1e3, "bytes": moved.bytes_sent + moved.bytes_received,
                                    "changed_slots": moved.changed_slots})
        except Exception as exc:
            after["error"] = f"{type(exc).__name__}: {exc}"
        self.release()
        return after

    def _graph_safe(self, dispatcher: str, experts: str) -> bool:
        from .. import contract
        return self.p["graph"] and self.device.type == "cuda" and contract.graph_safe(dispatcher, experts)


def _worker(rank: int, ws: int, p: dict) -> dict:
    """One rank: {"rows": the merged rows (rank 0; [] elsewhere), "rates": this GPU's copy/matmul rates}."""
    if ws < 2:
        raise ValueError("epmoe bench layer: expert parallelism needs at least 2 ranks")
    cuda = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    bench = _RankBench(rank, ws, p, device, dist.group.WORLD)
    return {"rows": bench.run(), "rates": bench.rates}


# ------------------------------------------------------------------------------------------ reporting
def merge_rows(rows: list[dict], ws: int) -> dict:
    """One row from every rank's view of the same configuration."""
    first = rows[0]
    merged = {k: v for k, v in first.items() if k not in ("timing", "check", "error", "load")}
    errors = [f"rank {r}: {row['error']}" for r, row in enumerate(rows) if "error" in row]
    if errors:
        merged["error"] = "; ".join(errors)
        return merged
    if "skipped" in first:
        return merged
    meds = [r["timing"]["median_ms"] for r in rows]
    T = first["tokens_per_rank"]
    ms, step = statistics.median(meds), max(meds)
    merged.update(ms=ms, step_ms=step, method=first["timing"]["method"], reps=first["timing"]["reps"],
                  tokens_per_s_per_rank=T / (ms * 1e-3),
                  tflops_per_gpu=6.0 * T * first["top_k"] * first["hidden_size"] * first["intermediate_size"]
                  / (step * 1e-3) / 1e12)
    if first.get("kind") == "ep":
        merged["tokens_per_s_total"] = ws * T / (step * 1e-3)
    checks = [r["check"] for r in rows]
    merged["check"] = {"ok": all(c["ok"] for c in checks), "max_rel_err": max(c["rel_err"] for c in checks),
                       "max_abs_err": max(c["max_abs"] for c in checks), "bound": checks[0]["bound"],
                       "rows_checked": sum(c["rows"] for c in checks)}
    bad = [f"rank {r}: {c['report']}" for r, c in enumerate(checks) if "report" in c]
    if bad:
        merged["check"]["report"] = "\n".join(bad)
    loads = [r["load"] for r in rows]
    merged["experts_hit_per_rank"] = [x["experts_hit"] for x in loads]
    merged["pairs_per_rank"] = [x["pairs"] for x in loads]
    if first.get("kind") == "ep":
        merged["pairs_balanced"] = len(set(merged["pairs_per_rank"])) == 1
    if all("floor_ms" in x for x in loads):
        merged["floor_ms"] = max(x["floor_ms"] for x in loads)
        merged["floor_fraction"] = merged["floor_ms"] / step
    merged["per_rank"] = [{"rank": r, **row["timing"], "rel_err": row["check"]["rel_err"], **row["load"]}
                          for r, row in enumerate(rows)]
    return merged


def add_local_ratios(rows: list[dict], ws: int) -> None:
    """Fill each EP row's ratios to the single-rank `local` rows of the same preset and format."""
    local = {(r["preset"], r["format"], r["tokens_per_rank"]): r for r in rows
             if r.get("kind") == "local" and "ms" in r}
    for r in rows:
        if r.get("kind") != "ep" or "ms" not in r:
            continue
        T = r["tokens_per_rank"]
        same = local.get((r["preset"], r["format"], T))
        whole = local.get((r["preset"], r["format"], ws * T))
        r["local_ms_same_tokens"] = same["ms"] if same else None
        r["ep_vs_local_same_tokens"] = r["step_ms"] / same["ms"] if same else None
        r["local_ms_all_tokens"] = whole["ms"] if whole else None
        r["speedup_vs_local"] = whole["ms"] / r["step_ms"] if whole else None
        r["scaling_efficiency"] = r["speedup_vs_local"] / ws if whole else None


def format_row(r: dict) -> str:
    what = (f"{r['preset']:<14} {r['format']:<12} {r['dispatcher']:<11} {r.get('experts', '-'):<10} "
            f"T={r['tokens_per_rank']:<6} mb={r.get('micro_batches', 1)}")
    if "error" in r:
        return f"{what} ERROR {r['error'][:300]}"
    if "skipped" in r:
        return f"{what} skipped: {r['skipped'][:200]}"
    c = r["check"]
    return (f"{what} {r['ms']:9.3f} ms (slowest rank {r['step_ms']:.3f}) {r['tokens_per_s_per_rank']:12.0f} tok/s/rank"
            f" {r['tflops_per_gpu']:7.1f} TFLOP/s/GPU [{r['method']}] oracle {'ok' if c['ok'] else 'FAILED'} "
            f"rel err {c['max_rel_err']:.2e}")


def print_table(rows: list[dict], ws: int) -> None:
    head = (f"{'preset':<14} {'format':<12} {'dispatcher':<11} {'experts':<10} {'T/rank':>6} {'mb':>2} {'step ms':>9} "
            f"{'tok/s/rank':>11} {'tok/s total':>12} {'TFLOP/s':>8} {'1-rank ms':>10} {'speedup':>8} {'eff':>5} "
            f"{'floor':>6} {'check':>6}")
    print(f"\n# whole-layer forward on {ws} ranks; step = the slower rank's time; speedup = one device doing all "
          f"{ws} x T tokens / this step; TFLOP/s = 6 T k H I / step per GPU; floor = the experts' roofline time "
          "(no communication) / this step; mb = micro-batches per forward"
          + "".join(sorted({f"; comm SMs {r['comm_sms']}" for r in rows if r.get("comm_sms") is not None})))
    print(head)
    print("-" * len(head))
    for r in rows:
        if r.get("kind") != "ep":
            continue
        if "ms" not in r:
            print(format_row(r))
            continue
        sp = r.get("speedup_vs_local")
        print(f"{r['preset']:<14} {r['format']:<12} {r['dispatcher']:<11} {r['experts']:<10} {r['tokens_per_rank']:>6} "
              f"{r.get('micro_batches', 1):>2} "
              f"{r['step_ms']:>9.3f} {r['tokens_per_s_per_rank']:>11.0f} {r['tokens_per_s_total']:>12.0f} "
              f"{r['tflops_per_gpu']:>8.1f} "
              + (f"{r['local_ms_all_tokens']:>10.3f} {sp:>8.2f} {r['scaling_efficiency']:>5.2f}" if sp else
                 f"{'-':>10} {'-':>8} {'-':>5}")
              + f" {_f(r.get('floor_fraction'), '6.2f'):>6} {'ok' if r['check']['ok'] else 'FAIL':>6}")


def _f(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _check_cpu_fits(p: dict, ws: int) -> None:
    """On the CPU, refuse real-size presets up front (with the flags that shrink them)."""
    from ..presets import expert_weight_bytes
    avail = available_ram()
    if not avail:
        return
    for preset in p["presets"]:
        cfg = layer_config(preset, "bf16", p["experts"], p["shrink"])
        need = expert_weight_bytes(cfg) * (1 + (1 if p["local"] else 0) * ws)   # EP shards + a full copy per rank
        if need > 0.5 * avail:
            raise UsageError(f"{preset} with {cfg.num_experts} experts of H={cfg.hidden_size}, "
                             f"I={cfg.intermediate_size} needs about {need / 2**30:.1f} GiB on this CPU machine "
                             f"({avail / 2**30:.1f} GiB available); shrink it with --experts N and --shrink F")


def run_one(p: dict, ws: int | None, device_type: str, args) -> tuple[str, dict]:
    """Run every configuration on `ws` ranks (None: under torchrun); rank 0 / the launcher writes the JSON."""
    from ..testing.distributed import launch
    backend = "nccl" if device_type == "cuda" else "gloo"
    if ws is not None:
        env_ws = ws
    else:
        env_ws = int(os.environ["WORLD_SIZE"])
    env = environment(backend, env_ws)
    path = args.output or default_output("layer", env, args.output_dir)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = path + ".partial.jsonl"
    if os.path.exists(partial):
        os.remove(partial)
    p = dict(p, partial=partial)
    results = launch(_worker, ws, p, device_type, timeout_s=args.timeout)
    if results is None:       # a torchrun rank other than 0
        return "", {}
    rows = results[0]["rows"]
    add_local_ratios(rows, env_ws)
    ceilings = None
    if results[0]["rates"] is not None:
        ceilings = {"per_rank": [r["rates"] for r in results],
                    "copy_bytes_per_s_median": statistics.median(r["rates"]["copy"] for r in results),
                    "matmul_bf16_flop_per_s_median": statistics.median(r["rates"]["bf16"] for r in results)}
    report = {"benchmark": "moe-layer", "environment": env, "params": {k: v for k, v in p.items() if k != "partial"},
              "formats": {f: FORMATS[f] for f in p["formats"]},
              "ceilings": ceilings,
              "method": ("CUDA events, median over repeats after warm-up of each rank; fresh inputs copied in "
                         "before each run; L2 flushed; GPU kept busy while the host queues; EP ranks lined up by "
                         "an all-reduce, then the same agreed GPU sleep on every rank; CUDA graph replay where "
                         "dispatcher and experts are graph-safe"
                         if backend == "nccl" else "wall clock after a barrier (CPU, Gloo): not a performance result"),
              "definitions": {
                  "ms": "median over ranks of each rank's median forward time",
                  "step_ms": "the slowest rank's median forward time",
                  "tokens_per_s_per_rank": "tokens_per_rank / ms",
                  "tokens_per_s_total": "ranks x tokens_per_rank / step_ms",
                  "tflops_per_gpu": "6 * tokens_per_rank * top_k * hidden_size * intermediate_size / step_ms: "
                                    "the effective MoE-layer rate of one GPU (routing, dispatch, experts, combine)",
                  "pairs_balanced": "every rank's experts received the same number of (token, expert) pairs",
                  "routing": "how the tokens were routed (epmoe.bench.routings)",
                  "local_ms_same_tokens": "the local (one-rank, all experts) layer at tokens_per_rank tokens",
                  "local_ms_all_tokens": "the local layer on every rank's tokens together (ranks x tokens_per_rank)",
                  "speedup_vs_local": "local_ms_all_tokens / step_ms",
                  "scaling_efficiency": "speedup_vs_local / ranks",
                  "floor_ms": "max over ranks of max(weight bytes of the rank's experts hit / copy rate, "
                              "6 * pairs * H * I / matmul rate): the expert work alone, no communication; GPU only",
                  "floor_fraction": "floor_ms / step_ms",
                  "ep_vs_local_same_tokens": "step_ms / local_ms_same_tokens",
                  "check": "sampled rows of every rank vs reference_moe in float64 on the stored weights"},
              "rows": rows}
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    if os.path.exists(partial):
        os.remove(partial)
    print_table(rows, env_ws)
    eplb.print_summary(rows)
    print(f"wrote {path}", flush=True)
    return path, report


def failed_rows(report: dict) -> list[dict]:
    return [r for r in report.get("rows", []) if "error" in r or ("check" in r and not r["check"]["ok"])]


def main(args) -> int:
    from ..testing.distributed import under_torchrun
    p = _params(args)
    device_type = args.device
    if device_type == "auto":
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA GPU is visible")
    if under_torchrun():
        refuse_ranks_under_torchrun(args.ranks)
        counts: list[int | None] = [None]
    else:
        if args.ranks:
            counts = _positive_ints(args.ranks, "--ranks")
        else:
            gpus = torch.cuda.device_count() if device_type == "cuda" else 0
            counts = [gpus if gpus >= 2 else 2]
        if any(c < 2 for c in counts):
            raise UsageError("expert parallelism needs --ranks >= 2 (the one-rank `local` "
                             "layer is measured in every run as the baseline)")
        if device_type == "cuda" and max(counts) > torch.cuda.device_count():
            raise UsageError(f"{max(counts)} ranks need {max(counts)} GPUs (one each), "
                             f"found {torch.cuda.device_count()}")
        if device_type == "cpu":
            _check_cpu_fits(p, max(counts))
        for preset in p["presets"]:
            cfg = layer_config(preset, "bf16", p["experts"], p["shrink"])
            if cfg.num_experts < max(counts):
                raise UsageError(f"{preset} has {cfg.num_experts} experts, fewer than {max(counts)} ranks "
                                 "(every rank must hold at least one expert)")
            for ws in counts:
                problem = routing_problem(p["routing"], cfg, ws, p["zipf_exponent"])
                if problem:
                    raise UsageError(f"--routing {p['routing']} with {preset} on {ws} ranks: {problem}")
                check_redundant_experts(p["redundant_experts"], cfg, ws)
    if args.output and len(counts) > 1:
        raise UsageError("--output names one file; with several --ranks use --output-dir")
    paths, bad = [], 0
    for ws in counts:
        log.info("bench layer on %s ranks (%s): presets %s, dispatchers %s, tokens per rank %s; a row per "
                 "configuration as it completes", ws or "torchrun's", device_type, ",".join(p["presets"]),
                 ",".join(p["dispatchers"]), ",".join(map(str, p["tokens"])))
        path, report = run_one(p, ws, device_type, args)
        if not path:
            return 0
        paths.append(path)
        for r in failed_rows(report):
            bad += 1
            print(f"FAILED: {format_row(r)}" + (f"\n{r['check']['report']}" if r.get("check", {}).get("report") else ""),
                  file=sys.stderr)
    if len(paths) > 1:
        from . import scaling
        written = scaling.write_report(paths, args.output_dir or results_dir())
        for w in written:
            print(f"wrote {w}")
    return 1 if bad else 0
