"""`epmoe bench experts`: time every GPU experts backend on real model shapes against the roofline floor.

For each preset (mixtral-8x7b, qwen3-30b-a3b, deepseek-v3, gpt-oss-120b), token count T and routing
(balanced softmax top-k; skewed: log-normal expert popularity; one hot expert that every token visits),
each GPU experts backend runs the layer's expert computation on a flat batch (what the `local`
dispatcher hands over), and so does the anchor, `torch._grouped_mm` gate+up, activation, down on rows
already sorted by expert (the plain-PyTorch "GEMMs + activation" floor). The batched backend runs on the batched layout
(T <= 128: its use is decode).

Timing (`epmoe.bench.gpu_timing`): CUDA events, median over repeats after warm-up, fresh non-zero
inputs copied in before each run, L2 flushed, the GPU kept busy while a CUDA-graph replay (or the eager
launches of a backend that syncs with the host) is queued. Reported per run: ms, TFLOP/s
(6 T k H I), GB/s of the weights of the experts actually hit (bytes read once), the fraction of the
floor max(bytes / copy rate, FLOPs / matmul rate) with both rates measured in the same run, and the
anchor's time over this time. Each backend's output is checked on sampled rows against the float64
oracle. At points of T >= SETTLE_MIN_TOKENS each entry first runs back to back for a second on a GPU
(`--settle-ms`), so that under the power limit no entry is timed at the clock the one before left behind.
Writes JSON and a PNG under benchmarks/results/ of the checkout (./epmoe-results elsewhere).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

from ..usage import CsvList, UsageError, csv_values, token_counts
from .expert_anchors import ANCHOR_FORMATS, DENSE_FP8_BLOCK, GROUPED_BF16, GROUPED_FP8_ROWWISE
from .gpu_state import GpuStateSampler, describe_state, nvidia_smi_id
from .run_env import RESULTS_DIR_HELP, provenance, results_dir

PRESETS = ["mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v3", "gpt-oss-120b"]
TOKENS = [1, 16, 128, 1024, 8192]
ROUTINGS = ["balanced", "skewed", "onehot"]
FORMATS = ["bf16", "fp8_block"]
ANCHOR = GROUPED_BF16
ANCHOR_KEYS = {"grouped_mm": GROUPED_BF16, "scaled_grouped_mm": GROUPED_FP8_ROWWISE, "scaled_mm_block": DENSE_FP8_BLOCK}
DRY_SHRINK = 32
SKEW_SIGMA = 1.0          # log-normal popularity: p_e ~ exp(SKEW_SIGMA * N(0, 1))
CHECK_ROWS = 16
BATCHED_MAX_T = 128
GPU_SETTLE_MS = 1000.0    # --settle-ms's default on a GPU (`Timer.settle_ms`) at points of SETTLE_MIN_TOKENS or more
SETTLE_MIN_TOKENS = 1024  # below, by default not settled: of the points below measured both ways on an H100 (T = 1
                          # and 16), the `triton` rows timed within 1% settled and unsettled


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--presets", "--preset", action=CsvList, default=",".join(PRESETS),
                   help="comma-separated presets (default: %(default)s)")
    p.add_argument("--experts", type=int, default=None, metavar="N",
                   help="a shard of each preset: N local experts at the preset's top-k, all tokens routed among "
                        "them (as on one GPU of N * ranks experts); N between top-k and the preset's experts "
                        "(default: all the preset's experts)")
    p.add_argument("--tokens", action=CsvList, default=",".join(map(str, TOKENS)),
                   help="token counts T (default: %(default)s)")
    p.add_argument("--routings", action=CsvList, default=",".join(ROUTINGS), help="routings (default: %(default)s)")
    p.add_argument("--formats", action=CsvList, default=",".join(FORMATS),
                   help="weight formats: bf16, fp8_block, fp8_channel (default: %(default)s)")
    p.add_argument("--fp8-routings", action=CsvList, default="balanced",
                   help="routings timed for FP8 formats (default: %(default)s)")
    p.add_argument("--backends", action=CsvList, default="all",
                   help="experts backends to time (default: every GPU backend)")
    p.add_argument("--anchors", action=CsvList, default="all",
                   help="library anchors timed on the same rows: " + ", ".join(ANCHOR_KEYS)
                        + ", all or none (default: %(default)s)")
    p.add_argument("--reps", type=int, default=20, help="timed repeats per measurement (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs first (default: %(default)s)")
    p.add_argument("--settle-ms", type=float, default=None,
                   help="before the warm-ups, run each backend and anchor back to back for this long (ms), so that "
                        "a GPU at its power limit times each in the state its own sustained work brings it to, not "
                        "the clock the entry before left (unsettled on an H100, the anchors, timed first at each "
                        "point, ran 1-9%% faster than settled at T >= 4096; at T = 1 and 16 `triton` moved < 1%%) "
                        f"(default: {GPU_SETTLE_MS:g} on a GPU at points of T >= {SETTLE_MIN_TOKENS}, else 0, and 0 "
                        "with --dry-run; given: at every point; 0: none)")
    p.add_argument("--batched-capacity", action=CsvList, default="tight", metavar="C,...",
                   help="rows per expert of the batched layouts the batched rows run on, one row each: a number, as "
                        "the low_latency dispatcher gives it (C = ranks * max_tokens_per_rank: the rows past each "
                        "count are padding the experts must skip; a point whose largest count is above C is "
                        "reported as refused), or tight: the largest count (default: %(default)s)")
    p.add_argument("--no-check", action="store_true", help="skip the oracle check of each output")
    p.add_argument("--output", default=None, help=f"JSON path (default: experts_<gpu>_<date>.json in {RESULTS_DIR_HELP})")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and tokens (default 0)")
    p.add_argument("--dry-run", action="store_true",
                   help="the plumbing on the CPU: presets shrunk (H, I / 32), the CPU backends and anchors, "
                        "wall-clock times that are not results; checks as on the GPU")


# ------------------------------------------------------------------------------------------- inputs
def make_routing(kind: str, T: int, E: int, k: int, gen: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_ids int32 [T, k], topk_weights float32 [T, k]) of the named shape of routing."""
    if kind == "balanced":
        logits = torch.randn(T, E, generator=gen, device=device)
        ids = logits.topk(k, dim=1).indices
    elif kind == "skewed":
        popularity = torch.exp(SKEW_SIGMA * torch.randn(E, generator=gen, device=device))
        ids = torch.multinomial(popularity.expand(T, E).contiguous(), k, replacement=False, generator=gen)
    elif kind == "onehot":
        hot = 0
        others = torch.rand(T, E, generator=gen, device=device)
        others[:, hot] = -1.0
        rest = others.topk(k - 1, dim=1).indices if k > 1 else torch.empty(T, 0, dtype=torch.long, device=device)
        ids = torch.cat([torch.full((T, 1), hot, dtype=torch.long, device=device), rest], dim=1)
    else:
        raise ValueError(f"unknown routing {kind!r}; known: {ROUTINGS}")
    w = torch.softmax(torch.randn(T, k, generator=gen, device=device), dim=1)
    return ids.to(torch.int32), w.float()


class _WeightHolder(torch.nn.Module):
    """What a quantization scheme writes weights into (the attributes a MoELayer has)."""

    def __init__(self, cfg, device):
        super().__init__()
        self.cfg, self.device = cfg, device


def random_bf16_weights(cfg, device, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random expert weights w13 [E, 2I, H], w2 [E, H, I] in bfloat16 (scaled to keep outputs O(1))."""
    E, H, I = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
    w13 = torch.empty(E, 2 * I, H, dtype=torch.bfloat16, device=device)
    w2 = torch.empty(E, H, I, dtype=torch.bfloat16, device=device)
    for e in range(E):        # per expert: keeps the float32 temporaries small
        w13[e] = (torch.randn(2 * I, H, generator=gen, device=device) * H ** -0.5).to(torch.bfloat16)
        w2[e] = (torch.randn(H, I, generator=gen, device=device) * I ** -0.5).to(torch.bfloat16)
    return w13, w2


def make_weights(cfg, device, gen: torch.Generator, base: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Expert weights in the layer's stored format -> (ExpertWeights, oracle expert list): random, or
    the bfloat16 `base` (w13, w2) quantized as the layer's scheme stores them."""
    from ..layouts import ExpertWeights
    I = cfg.intermediate_size
    w13, w2 = random_bf16_weights(cfg, device, gen) if base is None else base
    if cfg.quant is None:
        return ExpertWeights(w13, w2), _OracleExperts(w13, w2, I)
    scheme = cfg.quant_scheme
    holder = _WeightHolder(cfg, device)
    E = cfg.num_experts
    Hp, Ip = cfg.padded_hidden_size, cfg.padded_intermediate_size
    scheme.create_weights(holder, E, Hp, Ip)
    for e in range(E):
        scheme.load_expert(holder, e, w13[e, :I], w13[e, I:], w2[e])
    weights = ExpertWeights(holder.w13, holder.w2, None, None, holder.w13_scale, holder.w2_scale)
    return weights, _DequantizedExperts(scheme, holder)


class _OracleExperts:
    """The (gate, up, down) views the oracle wants, one expert at a time."""

    def __init__(self, w13, w2, inter):
        self.w13, self.w2, self.inter = w13, w2, inter

    def __len__(self):
        return self.w13.shape[0]

    def __getitem__(self, e):
        if not 0 <= e < len(self):
            raise IndexError(e)
        return self.w13[e, :self.inter], self.w13[e, self.inter:], self.w2[e]


class _DequantizedExperts:
    def __init__(self, scheme, holder):
        self.scheme, self.holder = scheme, holder

    def __len__(self):
        return self.holder.w13.shape[0]

    def __getitem__(self, e):
        if not 0 <= e < len(self):
            raise IndexError(e)
        return self.scheme.dequantized_expert(self.holder, e)


# ------------------------------------------------------------------------------------------ runners
def batched_capacities(value: str) -> list[int | None]:
    """--batched-capacity's values: None for tight, else the capacity (>= 1)."""
    out = []
    for v in csv_values(value):
        if v == "tight":
            out.append(None)
        elif v.isdigit() and int(v) >= 1:
            out.append(int(v))
        else:
            raise UsageError(f"--batched-capacity takes tight or capacities >= 1, got {v!r}")
    return out


def _batched_inputs(x, ids, num_experts, capacity: int | None = None):
    """The batched layout of a routing: [E, C, H] rows per expert (C = `capacity`, else the largest count) +
    counts. Padding rows are NaN, so an output that reads one shows it."""
    T, k = ids.shape
    flat = ids.reshape(-1).long()
    counts = torch.bincount(flat, minlength=num_experts)
    largest = int(counts.max()) if flat.numel() else 0
    if capacity is not None and capacity < largest:
        raise ValueError(f"the batched layout's capacity {capacity} is below the largest count {largest} (the "
                         f"low_latency dispatcher would refuse this batch)")
    C = max(largest, 1) if capacity is None else capacity
    order = torch.argsort(flat, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(flat.numel(), device=x.device) - starts[flat[order]]
    xb = torch.full((num_experts, C, x.shape[1]), float("nan"), dtype=x.dtype, device=x.device)
    xb[flat[order], slot] = x[order // k]
    return xb, counts.to(torch.int32)


def _batched_tiles(experts, weights, capacity: int, T: int) -> str | None:
    """The tiles the batched experts' Triton kernel runs at this point (None where the PyTorch path runs)."""
    plan = experts.plan
    if not weights.w13.is_cuda:
        return None
    from ..kernels.batched_moe import batched_config
    from ..kernels.fused_moe import weight_format
    L, two_i, H = weights.w13.shape
    return batched_config(L, capacity, H, two_i // 2, plan.top_k, weight_format(weights.w13, plan.weight_granularity),
                          T, weights.w13.device).describe()


def _flops(T, k, H, I):
    return 6.0 * T * k * H * I


def rel_err(out, ref) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (the oracle's check, shared by the benchmarks that run the experts)."""
    out = out.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def environment(dry: bool = False) -> dict:
    """Versions, date, and the command, commit and source digest of the run (`run_env.provenance`)."""
    import triton
    env = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), **provenance()}
    if dry:
        return dict(env, gpu="none (CPU dry run: times are not results)", dry_run=True)
    props = torch.cuda.get_device_properties(0)
    return dict(env, gpu=torch.cuda.get_device_name(0), sm_count=props.multi_processor_count,
                memory_gib=round(props.total_memory / 2 ** 30, 1),
                capability=list(torch.cuda.get_device_capability()), cuda=torch.version.cuda)


def bench_config(preset: str, fmt: str, experts: int | None = None, dry: bool = False):
    """The layer config a row of the benchmark runs: the preset in `fmt`, shrunk to a shard of `experts`
    local experts at the preset's top-k, and (dry run) its sizes divided by DRY_SHRINK."""
    from dataclasses import replace
    from ..presets import preset_config, shrink_config
    from ..quant import quant_config_for
    cfg = preset_config(preset, dtype=torch.bfloat16, quant=quant_config_for(fmt))
    n = cfg.num_experts if experts is None else experts
    if dry and experts is None:
        n = min(n, 8)
    if not cfg.top_k <= n <= cfg.num_experts:
        raise UsageError(f"--experts {experts}: a shard of {preset} holds between its top-k ({cfg.top_k}) and its "
                         f"{cfg.num_experts} experts")
    cfg = shrink_config(cfg, experts=n, shrink=DRY_SHRINK if dry else 1)
    if dry:       # sizes the unpadded layouts take as they are
        cfg = replace(cfg, hidden_size=-(-cfg.hidden_size // 8) * 8, intermediate_size=-(-cfg.intermediate_size // 8) * 8)
    return cfg


def _anchor_names(arg: str) -> list[str]:
    keys = csv_values(arg)
    if keys == ["all"]:
        return list(ANCHOR_KEYS.values())
    if keys == ["none"]:
        return []
    bad = [k for k in keys if k not in ANCHOR_KEYS]
    if bad:
        raise UsageError(f"--anchors: unknown {', '.join(bad)}; known: {', '.join(ANCHOR_KEYS)}, all, none")
    return [ANCHOR_KEYS[k] for k in keys]


def check_args(args) -> None:
    """Argument errors before any GPU work (UsageError names the flag)."""
    from ..presets import PRESETS as KNOWN
    from ..quant import WEIGHT_FORMATS
    for flag, v in (("--reps", args.reps), ("--warmup", args.warmup)):
        if v < (1 if flag == "--reps" else 0):
            raise UsageError(f"{flag} must be >= {1 if flag == '--reps' else 0}, got {v}")
    if getattr(args, "settle_ms", None) is not None and not (math.isfinite(args.settle_ms) and args.settle_ms >= 0):
        raise UsageError(f"--settle-ms must be a finite number >= 0, got {args.settle_ms}")
    for name in csv_values(args.presets):
        if name not in KNOWN:
            raise UsageError(f"--presets: unknown preset {name!r}; known: {', '.join(KNOWN)}")
    for fmt in csv_values(args.formats):
        if fmt not in WEIGHT_FORMATS:
            raise UsageError(f"--formats: unknown format {fmt!r}; known: {', '.join(WEIGHT_FORMATS)}")
    for r in csv_values(args.routings) + csv_values(args.fp8_routings):
        if r not in ROUTINGS:
            raise UsageError(f"--routings: unknown routing {r!r}; known: {', '.join(ROUTINGS)}")
    tokens = token_counts(args.tokens)
    if args.experts is not None and args.experts < 1:
        raise UsageError(f"--experts must be >= 1, got {args.experts}")
    batched_capacities(args.batched_capacity)         # an argument error before any work
    for name in csv_values(args.presets):
        bench_config(name, "bf16", args.experts)
    _anchor_names(args.anchors)


def settle_ms_for(given: float | None, T: int, dry: bool) -> float:
    """How long each entry of a point of T tokens runs back to back before it is timed: `given` (--settle-ms)
    at every point; by default GPU_SETTLE_MS on a GPU where T >= SETTLE_MIN_TOKENS, else none."""
    if given is not None:
        return given
    return 0.0 if dry or T < SETTLE_MIN_TOKENS else GPU_SETTLE_MS


def _settle_method(given: float | None, dry: bool, tokens: list[int]) -> str:
    if given is not None:
        return f"; each entry first run back to back for {given:g} ms (--settle-ms)" if given > 0 else ""
    if dry or max(tokens, default=0) < SETTLE_MIN_TOKENS:
        return ""
    return (f"; each entry of a point of T >= {SETTLE_MIN_TOKENS} first run back to back for {GPU_SETTLE_MS:g} ms "
            "(--settle-ms's default)")


def run_benchmark(args) -> dict:
    dry = bool(getattr(args, "dry_run", False))
    env = environment(dry)
    if dry:
        from .gpu_timing import Timer, WallClock
        device, timer = torch.device("cpu"), Timer(WallClock())    # the GPU's loop, host clock
        copy_bw, rates = None, {}
    else:
        from .gpu_timing import GpuTimer, measure_copy_bandwidth, measure_matmul_rate
        device = torch.device("cuda", torch.cuda.current_device())
        timer = GpuTimer(device)
        copy_bw = measure_copy_bandwidth(timer)          # the ceilings unsettled, as before
        rates = {"bf16": measure_matmul_rate(timer, torch.bfloat16)}
        rates["fp8"] = measure_matmul_rate(timer, torch.float8_e4m3fn)
        print(f"# {env['gpu']}: copy {copy_bw / 1e12:.2f} TB/s (read+write), bf16 matmul "
              f"{rates['bf16'] / 1e12:.0f} TFLOP/s, fp8 matmul {rates['fp8'] / 1e12:.0f} TFLOP/s", flush=True)
    sampler = None if dry else GpuStateSampler(nvidia_smi_id(device))
    with contextlib.nullcontext() if sampler is None else sampler:
        results = _run_points(args, dry, device, timer, copy_bw, rates, sampler)
    if sampler is not None and sampler.error:
        print(f"# no clocks recorded: {sampler.error}", file=sys.stderr, flush=True)
        env["gpu_state_error"] = sampler.error
    ceilings = {} if dry else {"copy_bytes_per_s": copy_bw, **{f"matmul_{k}_flop_per_s": v for k, v in rates.items()}}
    return {"environment": env, "ceilings": ceilings,
            "command": "epmoe bench experts " + " ".join(sys.argv[3:] if sys.argv[1:3] == ["bench", "experts"]
                                                         else sys.argv[1:]),
            "method": "CUDA events, median of reps after warm-up, L2 flushed (512 MB write) and the GPU kept busy "
                      "(cuda sleep) before each run; CUDA graph replay where the backend allows; fresh inputs "
                      "copied in before each run (untimed); every format and anchor of a preset on the same rows"
                      + _settle_method(args.settle_ms, dry, [int(t) for t in csv_values(args.tokens)]),
            "settle": {"given_ms": args.settle_ms, "default_ms": 0.0 if dry else GPU_SETTLE_MS,
                       "default_min_tokens": SETTLE_MIN_TOKENS},
            "definitions": {"tflops": "6*T*k*H*I / time", "hit_weight_gbps": "experts hit * 3*H*I * bytes/elem / time",
                            "floor_ms": "max(hit weight bytes / copy rate, FLOPs / matmul rate)",
                            "vs_anchors": "anchor time / this time, for each library anchor on the same rows "
                                          "(GEMMs + activation on rows sorted beforehand; see "
                                          "epmoe.bench.expert_anchors)",
                            "vs_grouped_mm": f"{ANCHOR} time / this time",
                            "capacity": "the batched rows: rows per expert of the layout they ran on (--batched-capacity)",
                            "capacity_asked": "the batched rows: the capacity asked (null: tight, the largest count)",
                            "gpu_state": "nvidia-smi's samples (every 20 ms) while a backend's point was timed, "
                                         "capture, settling and warm-up included: SM clock lowest / median / highest, "
                                         "highest power and temperature, the clock event reasons named "
                                         "(epmoe.bench.gpu_state); null where nvidia-smi gave none"},
            "args": {k: v for k, v in vars(args).items() if k != "func"}, "results": results}


def _run_points(args, dry, device, timer, copy_bw, rates, sampler) -> list[dict]:
    """Every (preset, format, T, routing) point: the anchors once per rows, then each backend; a backend's
    row carries the GPU's clocks while it was timed (`gpu_state`) where `sampler` runs."""
    from .. import contract
    from ..layouts import BatchedBatch, FlatBatch
    from ..reference import reference_moe
    from ..routing import Routing
    from .expert_anchors import run_anchors
    formats = csv_values(args.formats)
    anchor_names = _anchor_names(args.anchors)
    capacities = batched_capacities(args.batched_capacity)
    results = []
    wanted_backends = None if args.backends == "all" else set(csv_values(args.backends))
    gen = torch.Generator(device=device).manual_seed(args.seed)
    for preset in csv_values(args.presets):
        base_cfg = bench_config(preset, "bf16", args.experts, dry)
        E, k, H, I = base_cfg.num_experts, base_cfg.top_k, base_cfg.hidden_size, base_cfg.intermediate_size
        base = random_bf16_weights(base_cfg, device, gen)
        states: dict = {}          # format -> (cfg, weights, oracle experts), made from `base` once

        def state(fmt, preset=preset, base=base, states=states):
            if fmt not in states:
                cfg = bench_config(preset, fmt, args.experts, dry)
                states[fmt] = (cfg, *make_weights(cfg, device, gen, base))
            return states[fmt]
        inputs: dict = {}          # (T, routing) -> the rows every format and anchor of this preset runs on

        def rows_for(T, routing, inputs=inputs):
            if (T, routing) not in inputs:
                ids, tw = make_routing(routing, T, E, k, gen, device)
                pool = [torch.randn(T, H, generator=gen, device=device).to(torch.bfloat16) for _ in range(3)]
                inputs[(T, routing)] = dict(ids=ids, tw=tw, pool=pool, sample=sample_rows(T, gen, device),
                                            refs={}, anchors=None)
            return inputs[(T, routing)]

        def ref_of(fmt, inp):
            if fmt not in inp["refs"]:
                cfg, _, oracle = state(fmt)
                s = inp["sample"]
                inp["refs"][fmt] = reference_moe(inp["pool"][0][s], None, oracle, cfg,
                                                 routing=Routing(inp["ids"][s], inp["tw"][s]), device=device)
            return inp["refs"][fmt]
        for fmt in formats:
            cfg, weights, _ = state(fmt)
            quant = cfg.quant
            Hp = cfg.padded_hidden_size
            backends = []
            for name in contract.EXPERTS:
                if name == "reference" or (wanted_backends is not None and name not in wanted_backends):
                    continue
                caps = contract.experts_class(name).CAPS
                layout = "flat" if "flat" in caps.layouts else "batched"
                why = contract.experts_problem(name, cfg, device.type)
                if why is None:
                    backends.append((name, layout, contract.experts_class(name)(cfg, device)))
                else:
                    print(f"  skip {name} for {preset} {fmt}: {why}", flush=True)
            routings = csv_values(args.routings) if quant is None else [r for r in csv_values(args.fp8_routings)
                                                                   if r in csv_values(args.routings)]
            for T in (int(t) for t in csv_values(args.tokens)):
                timer.settle_ms = settle_ms_for(args.settle_ms, T, dry)
                for routing in routings:
                    inp = rows_for(T, routing)
                    ids, tw, pool, sample = inp["ids"], inp["tw"], inp["pool"], inp["sample"]
                    x = pool[0].clone()
                    xp = x if Hp == H else torch.nn.functional.pad(x, (0, Hp - H))
                    hit = int(torch.unique(ids).numel())
                    flops = _flops(T, k, H, I)
                    pool_i = [0]

                    def load(i):
                        pool_i[0] = i
                        x.copy_(pool[i])
                        if Hp != H:
                            xp[:, :H].copy_(x)

                    def refresh():
                        load((pool_i[0] + 1) % len(pool))

                    def row_of(fmt_, backend):
                        elem = 1 if fmt_.startswith("fp8") else 2
                        nbytes = hit * 3 * H * I * elem
                        floor_ms = (max(nbytes / copy_bw, flops / rates["fp8" if elem == 1 else "bf16"]) * 1e3
                                    if copy_bw else None)
                        return dict(preset=preset, experts=E, top_k=k, hidden=H, inter=I, format=fmt_, T=T,
                                    routing=routing, experts_hit=hit, weight_bytes=nbytes, flops=flops,
                                    floor_ms=floor_ms, backend=backend)
                    if inp["anchors"] is None:       # once per rows, in the first format that meets them
                        inp["anchors"] = run_anchors(
                            anchor_names, timer, args.reps, args.warmup, cfg=base_cfg, x=pool[0], pool=pool, ids=ids,
                            tw=tw, sample=sample, weights_of=lambda f: state(f)[1],
                            ref_of=lambda f, inp=inp: ref_of(f, inp))
                        for a in inp["anchors"]:
                            r = dict(row_of(ANCHOR_FORMATS[a.name], a.name), anchor=True, error=a.error,
                                     check_rel_err=a.err, **a.extra)
                            if a.timing is not None:
                                r.update(ms=a.timing.median_ms, timing=a.timing.as_dict())
                            results.append(_with_rates(r))
                            _print_row(r)
                    anchor_ms = {a.name: a.timing.median_ms for a in inp["anchors"] if a.timing is not None}
                    for name, layout, experts in backends:
                        if layout == "batched" and T > BATCHED_MAX_T:
                            continue
                        for capacity in (capacities if layout == "batched" else [None]):
                            if layout == "batched":
                                load(0)
                                try:
                                    xb, counts = _batched_inputs(xp, ids, E, capacity)
                                except ValueError as e:
                                    r = dict(row_of(fmt, name), error=str(e), capacity=capacity,
                                             capacity_asked=capacity)
                                    results.append(r)
                                    _print_row(r)
                                    continue
                                batch = BatchedBatch(xb, counts, num_tokens=T)      # as the dispatchers give it
                                asked = capacity
                                fn = lambda experts=experts, batch=batch: experts(batch, weights)
                                t, gpu_state = _timed(timer, sampler, fn, args,
                                                      use_graph=experts.CAPS.cuda_graph_safe)
                                err = None
                                if not args.no_check:
                                    err = _batched_check(fn(), ids, tw, sample, xb, counts, ref_of(fmt, inp), H)
                                capacity = xb.shape[1]
                                cfg_desc = _batched_tiles(experts, weights, capacity, T)
                            else:
                                batch = FlatBatch(xp, ids, tw)
                                fn = lambda experts=experts, batch=batch: experts(batch, weights)
                                t, gpu_state = _timed(timer, sampler, fn, args, before_each=refresh,
                                                      use_graph=experts.CAPS.cuda_graph_safe)
                                err = None
                                if not args.no_check:
                                    load(0)                 # the input the oracle saw
                                    err = rel_err(fn()[:, :H][sample], ref_of(fmt, inp))
                                cfg_desc = experts.kernel_config(T, weights).describe() \
                                    if hasattr(experts, "kernel_config") else None
                                asked = None
                            ms = t.median_ms
                            r = dict(row_of(fmt, name), ms=ms, timing=t.as_dict(), check_rel_err=err,
                                     kernel_config=cfg_desc, vs_anchors={a: am / ms for a, am in anchor_ms.items()},
                                     vs_grouped_mm=(anchor_ms[ANCHOR] / ms) if ANCHOR in anchor_ms else None,
                                     gpu_state=gpu_state, capacity=capacity, capacity_asked=asked)
                            results.append(_with_rates(r))
                            _print_row(r)
        del states, base, inputs
        if not dry:
            torch.cuda.empty_cache()
    return results


def _timed(timer, sampler, fn, args, **kw):
    """`timer.time(fn)` and what the GPU's clocks did meanwhile (graph capture, settling and warm-up included; None
    without a sampler or samples). With a sampler, one call and a sync first, so that compiling a kernel
    (seconds at an idle clock) stays out of the window."""
    if sampler is not None:
        fn()
        torch.cuda.synchronize()
    start = time.monotonic()
    t = timer.time(fn, reps=args.reps, warmup=args.warmup, **kw)
    return t, (sampler.since(start) if sampler is not None else None)


def _with_rates(r: dict) -> dict:
    ms = r.get("ms")
    if ms:
        r.update(tflops=r["flops"] / (ms * 1e-3) / 1e12, hit_weight_gbps=r["weight_bytes"] / (ms * 1e-3) / 1e9,
                 floor_fraction=(r["floor_ms"] / ms) if r.get("floor_ms") else None)
    return r


def _print_row(r: dict) -> None:
    backend = r['backend'] + (f" C={r['capacity']}" if r.get("capacity") is not None else "")
    head = (f"{r['preset']:14s} E={r['experts']:<3d} {r['format']:11s} T={r['T']:5d} {r['routing']:8s} "
            f"{backend:32s}")
    if r.get("ms") is None:
        print(f"{head} {r.get('error')}", flush=True)
        return
    vs = r.get("vs_anchors") or {}
    print(f"{head} {r['ms']:8.3f} ms {r['tflops']:7.1f} TFLOP/s {r['hit_weight_gbps']:7.0f} GB/s"
          + (f" floor {r['floor_fraction']:5.2f}" if r.get("floor_fraction") else "")
          + "".join(f" x{v:.2f} vs {a.split()[0]}" + ("" if a == ANCHOR else f" {a.split()[-1]}")
                    for a, v in vs.items())
          + (f" err {r['check_rel_err']:.1e}" if r.get("check_rel_err") is not None else "")
          + f" [{r['timing']['method']}]"
          + ("" if (d := repeat_drift(r["timing"].get("times_ms", ()))) is None else f" drift {100 * d:+.0f}%")
          + (f" {describe_state(g)}" if (g := r.get("gpu_state")) else ""), flush=True)


def repeat_drift(times_ms) -> float | None:
    """How much slower the last quarter of a point's repeats ran than its first quarter (medians; 0.06: 6%
    slower), or None with fewer than 8 repeats. A GPU held at its power limit drifts; a kernel does not."""
    n = len(times_ms) // 4
    if n < 2:
        return None
    first, last = statistics.median(times_ms[:n]), statistics.median(times_ms[-n:])
    return last / first - 1.0 if first > 0 else None


def sample_rows(T, gen, device):
    """The token rows the oracle checks: all of them up to CHECK_ROWS, else the first half of that many and
    as many drawn from the rest."""
    if T <= CHECK_ROWS:
        return torch.arange(T, device=device)
    head = torch.arange(CHECK_ROWS // 2, device=device)
    tail = torch.randperm(T - CHECK_ROWS // 2, generator=gen, device=device)[:CHECK_ROWS // 2] + CHECK_ROWS // 2
    return torch.cat([head, tail])


def _batched_check(out, ids, tw, sample, xb, counts, ref, H) -> float:
    """Combine the batched (unweighted) outputs of the sampled tokens and compare with the oracle."""
    T, k = ids.shape
    flat = ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    starts = torch.cumsum(torch.bincount(flat, minlength=out.shape[0]), 0) - torch.bincount(flat, minlength=out.shape[0])
    slot = torch.empty_like(flat)
    slot[order] = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
    y = out[flat, slot].float().reshape(T, k, -1)
    combined = (y * tw.unsqueeze(2)).sum(1)[:, :H]
    return rel_err(combined[sample], ref)


# ------------------------------------------------------------------------------------------- output
def write_plot(data: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in data["results"] if r["routing"] == "balanced" and r.get("ms")]
    presets = list(dict.fromkeys(r["preset"] for r in rows))
    n = len(presets)
    cols = 2 if n > 1 else 1
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(6.5 * cols, 4.5 * ((n + cols - 1) // cols)),
                             squeeze=False)
    for ax, preset in zip(axes.flat, presets):
        pr = [r for r in rows if r["preset"] == preset]
        for (fmt, backend) in dict.fromkeys((r["format"], row_label(r)) for r in pr):
            pts = sorted((r["T"], r["ms"]) for r in pr if r["format"] == fmt and row_label(r) == backend)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                    label=f"{backend} ({fmt})", linestyle="-" if fmt == "bf16" else "-.")
        for fmt, style in (("bf16", "--"), ("fp8_block", ":")):
            floor = sorted({(r["T"], r["floor_ms"]) for r in pr if r["format"] == fmt and r.get("floor_ms")})
            if floor:
                ax.plot([p[0] for p in floor], [p[1] for p in floor], color="black", linestyle=style,
                        label=f"roofline floor ({fmt})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens T")
        ax.set_ylabel("ms (median)")
        ax.set_title(f"{preset}, balanced routing")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    env = data["environment"]
    fig.suptitle(f"MoE experts on {env['gpu']} (torch {env['torch']}, triton {env['triton']}, {env['date']})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def default_output(env: dict) -> str:
    root = results_dir()
    gpu = "".join(c if c.isalnum() else "_" for c in env["gpu"]).strip("_")
    return os.path.join(root, f"experts_{gpu}_{env['date'][:10]}.json")


def row_label(r: dict) -> str:
    """A backend row's name across points: the backend, and the capacity asked of a batched row (tight rows,
    whose capacity is each point's largest count, go by the backend's name)."""
    asked = r.get("capacity_asked")
    return r["backend"] + ("" if asked is None else f" C={asked}")


def summary(data: dict) -> str:
    """One line per (preset, T, routing): TFLOP/s of every anchor and backend in every format, and the
    ratios the targets are stated in (FP8 over BF16 of each backend; each backend over each anchor)."""
    lines = []
    rows = [r for r in data["results"] if r.get("ms")]
    for key in dict.fromkeys((r["preset"], r["experts"], r["T"], r["routing"]) for r in rows):
        same = [r for r in rows if (r["preset"], r["experts"], r["T"], r["routing"]) == key]
        cells = [f"{r['backend'].split()[0] if r.get('anchor') else row_label(r)}"
                 f"{'' if r.get('anchor') else '/' + r['format']} {r['tflops']:.0f}" for r in same]
        tf = {(row_label(r), r["format"]): r["tflops"] for r in same if not r.get("anchor")}
        for b in dict.fromkeys(b for b, _ in tf):
            for f in ("fp8_block", "fp8_channel"):
                if (b, f) in tf and (b, "bf16") in tf:
                    cells.append(f"{b} {f}/bf16 {tf[(b, f)] / tf[(b, 'bf16')]:.2f}x")
        lines.append(f"{key[0]} E={key[1]} T={key[2]} {key[3]}: " + ", ".join(cells))
    return "\n".join(lines)


def main(args) -> int:
    check_args(args)
    dry = bool(getattr(args, "dry_run", False))
    if not dry and not torch.cuda.is_available():
        print("epmoe bench experts: needs a CUDA GPU (none is visible); --dry-run checks the plumbing on the CPU",
              file=sys.stderr)
        return 2
    data = run_benchmark(args)
    path = args.output or default_output(data["environment"])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    print(f"wrote {path}")
    if not args.no_plot:
        png = os.path.splitext(path)[0] + ".png"
        write_plot(data, png)
        print(f"wrote {png}")
    print("# TFLOP/s (6 T k H I / time) and ratios, same rows:\n" + summary(data))
    bad = [r for r in data["results"] if r.get("check_rel_err") is not None
           and not r["check_rel_err"] <= (3e-2 if r["format"].startswith("fp8") else 1e-2)]
    for r in bad:
        print(f"CHECK FAILED: {r['preset']} {r['format']} T={r['T']} {r['routing']} {row_label(r)}: "
              f"rel err {r['check_rel_err']:.2e}", file=sys.stderr)
    return 1 if bad else 0
