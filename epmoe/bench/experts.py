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
oracle. Writes JSON and a PNG under benchmarks/results/ of the checkout (./epmoe-results elsewhere).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

import torch

from ..usage import CsvList
from .run_env import RESULTS_DIR_HELP, results_dir

PRESETS = ["mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v3", "gpt-oss-120b"]
TOKENS = [1, 16, 128, 1024, 8192]
ROUTINGS = ["balanced", "skewed", "onehot"]
FORMATS = ["bf16", "fp8_block"]
ANCHOR = "torch._grouped_mm"
SKEW_SIGMA = 1.0          # log-normal popularity: p_e ~ exp(SKEW_SIGMA * N(0, 1))
CHECK_ROWS = 16
BATCHED_MAX_T = 128


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--presets", "--preset", action=CsvList, default=",".join(PRESETS),
                   help="comma-separated presets (default: %(default)s)")
    p.add_argument("--tokens", action=CsvList, default=",".join(map(str, TOKENS)),
                   help="token counts T (default: %(default)s)")
    p.add_argument("--routings", action=CsvList, default=",".join(ROUTINGS), help="routings (default: %(default)s)")
    p.add_argument("--formats", action=CsvList, default=",".join(FORMATS),
                   help="weight formats: bf16, fp8_block, fp8_channel (default: %(default)s)")
    p.add_argument("--fp8-routings", action=CsvList, default="balanced",
                   help="routings timed for FP8 formats (default: %(default)s)")
    p.add_argument("--backends", action=CsvList, default="all",
                   help="experts backends to time (default: every GPU backend)")
    p.add_argument("--reps", type=int, default=20, help="timed repeats per measurement (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs first (default: %(default)s)")
    p.add_argument("--no-check", action="store_true", help="skip the oracle check of each output")
    p.add_argument("--output", default=None, help=f"JSON path (default: experts_<gpu>_<date>.json in {RESULTS_DIR_HELP})")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and tokens (default 0)")


def _csv(s: str) -> list[str]:
    return [v.strip() for v in s.split(",") if v.strip()]


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


def make_weights(cfg, device, gen: torch.Generator):
    """Random expert weights in the layer's stored format -> (ExpertWeights, oracle expert list)."""
    from ..layouts import ExpertWeights
    E, H, I = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
    w13 = torch.empty(E, 2 * I, H, dtype=torch.bfloat16, device=device)
    w2 = torch.empty(E, H, I, dtype=torch.bfloat16, device=device)
    for e in range(E):        # per expert: keeps the float32 temporaries small
        w13[e] = (torch.randn(2 * I, H, generator=gen, device=device) * H ** -0.5).to(torch.bfloat16)
        w2[e] = (torch.randn(H, I, generator=gen, device=device) * I ** -0.5).to(torch.bfloat16)
    if cfg.quant is None:
        return ExpertWeights(w13, w2), _OracleExperts(w13, w2, I)
    scheme = cfg.quant_scheme
    holder = _WeightHolder(cfg, device)
    Hp, Ip = cfg.padded_hidden_size, cfg.padded_intermediate_size
    scheme.create_weights(holder, E, Hp, Ip)
    for e in range(E):
        scheme.load_expert(holder, e, w13[e, :I], w13[e, I:], w2[e])
    del w13, w2
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
def _anchor_runner(x, ids, w13, w2, activation):
    """torch._grouped_mm gate+up, activation, down on rows sorted by expert beforehand (not timed).
    The activation runs in bf16 (one pass per op, no float32 copies), which makes the anchor as fast as
    plain PyTorch gets."""
    from ..activations import gated_activation_fused
    from ..experts.base import sort_pairs_by_expert
    T, k = ids.shape
    order, _, offsets = sort_pairs_by_expert(ids, w13.shape[0])
    rows = order // k
    x_sorted = x[rows].contiguous()
    w13t, w2t = w13.transpose(1, 2), w2.transpose(1, 2)

    def run():   # the activation in the rows' dtype (bf16): the plain-PyTorch way, few passes
        h = torch._grouped_mm(x_sorted, w13t, offs=offsets)
        a = gated_activation_fused(activation, h)
        return torch._grouped_mm(a, w2t, offs=offsets)
    return run, x_sorted, rows


def _batched_inputs(x, ids, num_experts):
    """The batched layout of a routing: [E, C, H] rows per expert (C = the largest count) + counts."""
    T, k = ids.shape
    flat = ids.reshape(-1).long()
    counts = torch.bincount(flat, minlength=num_experts)
    C = max(int(counts.max()), 1)
    order = torch.argsort(flat, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(flat.numel(), device=x.device) - starts[flat[order]]
    xb = torch.zeros(num_experts, C, x.shape[1], dtype=x.dtype, device=x.device)
    xb[flat[order], slot] = x[order // k]
    return xb, counts.to(torch.int32)


def _flops(T, k, H, I):
    return 6.0 * T * k * H * I


def _rel_err(out, ref) -> float:
    out = out.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def _environment() -> dict:
    import triton
    props = torch.cuda.get_device_properties(0)
    return {"gpu": torch.cuda.get_device_name(0), "sm_count": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2 ** 30, 1), "capability": list(torch.cuda.get_device_capability()),
            "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def run_benchmark(args) -> dict:
    from .. import contract
    from ..layouts import BatchedBatch, FlatBatch
    from ..presets import preset_config
    from ..quant import quant_config_for
    from ..reference import reference_moe
    from ..routing import Routing
    from .gpu_timing import GpuTimer, measure_copy_bandwidth, measure_matmul_rate
    device = torch.device("cuda", torch.cuda.current_device())
    timer = GpuTimer(device)
    env = _environment()
    copy_bw = measure_copy_bandwidth(timer)
    rates = {"bf16": measure_matmul_rate(timer, torch.bfloat16)}
    formats = _csv(args.formats)
    if any(f.startswith("fp8") for f in formats):
        rates["fp8"] = measure_matmul_rate(timer, torch.float8_e4m3fn)
    print(f"# {env['gpu']}: copy {copy_bw / 1e12:.2f} TB/s (read+write), bf16 matmul {rates['bf16'] / 1e12:.0f} "
          f"TFLOP/s" + (f", fp8 matmul {rates['fp8'] / 1e12:.0f} TFLOP/s" if "fp8" in rates else ""), flush=True)
    results = []
    wanted_backends = None if args.backends == "all" else set(_csv(args.backends))
    gen = torch.Generator(device=device).manual_seed(args.seed)
    for preset in _csv(args.presets):
        for fmt in formats:
            quant = quant_config_for(fmt)
            cfg = preset_config(preset, dtype=torch.bfloat16, quant=quant)
            E, k, H, I = cfg.num_experts, cfg.top_k, cfg.hidden_size, cfg.intermediate_size
            Hp = cfg.padded_hidden_size
            weights, oracle_experts = make_weights(cfg, device, gen)
            backends = []
            for name in contract.EXPERTS:
                if name == "reference" or (wanted_backends is not None and name not in wanted_backends):
                    continue
                caps = contract.experts_class(name).CAPS
                layout = "flat" if "flat" in caps.layouts else "batched"
                why = contract.experts_problem(name, cfg, "cuda")
                if why is None:
                    backends.append((name, layout, contract.experts_class(name)(cfg, device)))
                else:
                    print(f"  skip {name} for {preset} {fmt}: {why}", flush=True)
            routings = _csv(args.routings) if quant is None else [r for r in _csv(args.fp8_routings)
                                                                   if r in _csv(args.routings)]
            for T in (int(t) for t in _csv(args.tokens)):
                for routing in routings:
                    ids, tw = make_routing(routing, T, E, k, gen, device)
                    x_pool = [torch.randn(T, H, generator=gen, device=device).to(torch.bfloat16) for _ in range(3)]
                    x = x_pool[0].clone()
                    xp = x if Hp == H else torch.nn.functional.pad(x, (0, Hp - H))
                    hit = int(torch.unique(ids).numel())
                    elem = 1 if quant is not None else 2
                    nbytes = hit * 3 * H * I * elem
                    flops = _flops(T, k, H, I)
                    floor_ms = max(nbytes / copy_bw, flops / rates["fp8" if quant else "bf16"]) * 1e3
                    pool_i = [0]
                    anchor_state = {}

                    def load(i):
                        pool_i[0] = i
                        x.copy_(x_pool[i])
                        if Hp != H:
                            xp[:, :H].copy_(x)
                        if anchor_state:
                            anchor_state["x_sorted"].copy_(x[anchor_state["rows"]])

                    def refresh():
                        load((pool_i[0] + 1) % len(x_pool))
                    row = dict(preset=preset, format=fmt, T=T, routing=routing, experts_hit=hit,
                               weight_bytes=nbytes, flops=flops, floor_ms=floor_ms)
                    sample = _sample_rows(T, gen, device)
                    ref = None
                    if not args.no_check and T:
                        ref = reference_moe(x[sample], None, oracle_experts, cfg,
                                            routing=Routing(ids[sample], tw[sample]), device=device)
                    entries = []
                    if quant is None and H % 8 == 0:
                        anchor, anchor_state["x_sorted"], anchor_state["rows"] = _anchor_runner(
                            x, ids, weights.w13, weights.w2, cfg.activation)
                        t = timer.time(anchor, reps=args.reps, warmup=args.warmup, before_each=refresh)
                        entries.append((ANCHOR, t, None, None))
                    for name, layout, experts in backends:
                        if layout == "batched":
                            if T > BATCHED_MAX_T:
                                continue
                            load(0)
                            xb, counts = _batched_inputs(xp, ids, E)
                            batch = BatchedBatch(xb, counts)
                            fn = lambda experts=experts, batch=batch: experts(batch, weights)
                            t = timer.time(fn, reps=args.reps, warmup=args.warmup,
                                           use_graph=experts.CAPS.cuda_graph_safe)
                            err = None
                            if ref is not None:
                                err = _batched_check(fn(), ids, tw, sample, xb, counts, ref, H)
                            entries.append((name, t, err, None))
                            continue
                        batch = FlatBatch(xp, ids, tw)
                        fn = lambda experts=experts, batch=batch: experts(batch, weights)
                        t = timer.time(fn, reps=args.reps, warmup=args.warmup, before_each=refresh,
                                       use_graph=experts.CAPS.cuda_graph_safe)
                        err = None
                        if ref is not None:
                            load(0)                 # the input the oracle saw
                            err = _rel_err(fn()[:, :H][sample], ref)
                        cfg_desc = None
                        if hasattr(experts, "kernel_config"):
                            cfg_desc = experts.kernel_config(T, weights).describe()
                        entries.append((name, t, err, cfg_desc))
                    anchor_ms = next((t.median_ms for n, t, _, _ in entries if n == ANCHOR), None)
                    for name, t, err, cfg_desc in entries:
                        ms = t.median_ms
                        r = dict(row, backend=name, ms=ms, tflops=flops / (ms * 1e-3) / 1e12,
                                 hit_weight_gbps=nbytes / (ms * 1e-3) / 1e9, floor_fraction=floor_ms / ms,
                                 vs_grouped_mm=(anchor_ms / ms) if anchor_ms else None, timing=t.as_dict(),
                                 check_rel_err=err, kernel_config=cfg_desc)
                        results.append(r)
                        print(f"{preset:14s} {fmt:9s} T={T:5d} {routing:8s} {name:18s} {ms:8.3f} ms "
                              f"{r['tflops']:7.1f} TFLOP/s {r['hit_weight_gbps']:7.0f} GB/s floor {r['floor_fraction']:5.2f}"
                              + (f" x{r['vs_grouped_mm']:.2f} vs gmm" if r["vs_grouped_mm"] else "")
                              + (f" err {err:.1e}" if err is not None else "") + f" [{t.method}]", flush=True)
            del weights, oracle_experts, backends
            torch.cuda.empty_cache()
    return {"environment": env, "ceilings": {"copy_bytes_per_s": copy_bw,
                                             **{f"matmul_{k}_flop_per_s": v for k, v in rates.items()}},
            "method": "CUDA events, median of reps after warm-up, L2 flushed (512 MB write) and the GPU kept busy "
                      "(cuda sleep) before each run; CUDA graph replay where the backend allows; fresh inputs "
                      "copied in before each run (untimed)",
            "definitions": {"tflops": "6*T*k*H*I / time", "hit_weight_gbps": "experts hit * 3*H*I * bytes/elem / time",
                            "floor_ms": "max(hit weight bytes / copy rate, FLOPs / matmul rate)",
                            "vs_grouped_mm": f"{ANCHOR} time / this time (the anchor: bf16, rows pre-sorted, GEMMs+act)"},
            "args": {k: v for k, v in vars(args).items() if k != "func"}, "results": results}


def _sample_rows(T, gen, device):
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
    return _rel_err(combined[sample], ref)


# ------------------------------------------------------------------------------------------- output
def write_plot(data: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in data["results"] if r["routing"] == "balanced"]
    presets = list(dict.fromkeys(r["preset"] for r in rows))
    n = len(presets)
    cols = 2 if n > 1 else 1
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(6.5 * cols, 4.5 * ((n + cols - 1) // cols)),
                             squeeze=False)
    for ax, preset in zip(axes.flat, presets):
        pr = [r for r in rows if r["preset"] == preset]
        for (fmt, backend) in dict.fromkeys((r["format"], r["backend"]) for r in pr):
            pts = sorted((r["T"], r["ms"]) for r in pr if r["format"] == fmt and r["backend"] == backend)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                    label=f"{backend} ({fmt})", linestyle="-" if fmt == "bf16" else "-.")
        for fmt, style in (("bf16", "--"), ("fp8_block", ":")):
            floor = sorted({(r["T"], r["floor_ms"]) for r in pr if r["format"] == fmt})
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


def main(args) -> int:
    if not torch.cuda.is_available():
        print("epmoe bench experts: needs a CUDA GPU (none is visible)", file=sys.stderr)
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
    bad = [r for r in data["results"] if r["check_rel_err"] is not None
           and not r["check_rel_err"] <= (3e-2 if r["format"].startswith("fp8") else 1e-2)]
    for r in bad:
        print(f"CHECK FAILED: {r['preset']} {r['format']} T={r['T']} {r['routing']} {r['backend']}: "
              f"rel err {r['check_rel_err']:.2e}", file=sys.stderr)
    return 1 if bad else 0
