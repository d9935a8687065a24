"""The `alltoall` dispatcher's CUDA path (Triton pack/unpack kernels, `gather_sum` combine) on 2 GPUs:
correctness against its PyTorch path and the oracle, timing against NCCL moving the same bytes, and a
profile of one dispatch + combine.

    PYTHONPATH=. python3 benchmarks/gpu_alltoall_check.py --out DIR

Two ranks (NCCL, one GPU each, `epmoe.testing.run_on_ranks`). For deepseek-v3 (H 7168, top-8 of 256) and
qwen3-30b-a3b (H 2048, top-8 of 128) at 128 and 4096 tokens per rank, BF16 rows and FP8 rows on the wire
(`Fp8Config(dispatch_fp8=True)`, scales per 128 columns), each in two modes (--modes): `packed` (no
capacity: the counts read on the host size a variable all-to-all) and `bounded` (max_tokens_per_rank = T:
fixed regions per rank, counts in the data, no host read of counts; timed as CUDA graph replays, NCCL too):

  (a) check: the kernels' batch (x / FP8 rows, scales, local ids, weights) equals the PyTorch path's bit
      for bit; with identity experts both combines give the same output bit for bit, and for BF16 that
      output is x times the number of ranks the token went to, exactly (FP8: within 5e-2, one e4m3
      rounding of random rows). Bounded: also a CUDA graph of dispatch + identity + combine, replayed on
      fresh inputs, equals the eager forward bit for bit.
  (b) timing: dispatch and combine timed separately inside each forward (`epmoe.bench.dispatch.RankClock`:
      CUDA events, L2 flushed, ranks lined up and the same GPU sleep on every rank, median of --reps
      after --warmup), for the kernels (graph replays where the plan is capturable: bounded) and for the
      PyTorch path (eager), and NCCL `all_to_all_single` of exactly the bytes the dispatcher moved per
      destination, each direction, timed the way the kernels were, in the same run.
  (c) profile: one dispatch + combine at 4096 tokens (deepseek-v3, BF16 and FP8) under torch.profiler:
      the top CUDA kernels and their times, the GPU timeline with the gaps between kernels (host time:
      the header's host read, launches), written as text (and a Chrome trace).
  (d) layer: `MoELayer(dispatcher="alltoall")` with the `auto` experts (Triton) and `grouped_mm` (which
      reads the receive buffer's strided rows) on shrunk presets (16 experts, sizes / 8), against
      `reference_moe`, and against the same layer on the PyTorch path.

Writes into --out: alltoall_check.json (GPU, torch/triton versions, date, per case microseconds and
ratios to NCCL, the checks), alltoall_profile.txt, alltoall_trace_*.json, and per-rank partial results
as they are produced (rank{r}_partial.json: what survives if the run is cut short). Parts after the
timing are skipped, on both ranks alike, once --budget-s is spent; the whole run stays under 3 minutes.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

PRESETS = ("deepseek-v3", "qwen3-30b-a3b")
TOKENS = (128, 4096)
FORMATS = ("bf16", "fp8")
MODES = ("packed", "bounded")
FAST = [None]              # use_kernels of the fast path: None (CUDA); True for --cpu-smoke under TRITON_INTERPRET=1
IDENTITY_FP8_BOUND = 5e-2   # identity experts on FP8 rows vs x * ranks: one e4m3 rounding, not a bug


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for the JSON, the profile text and traces")
    p.add_argument("--presets", default=",".join(PRESETS), help="comma-separated presets (default: %(default)s)")
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="tokens per rank (default: %(default)s)")
    p.add_argument("--formats", default=",".join(FORMATS), help="bf16,fp8 (default: %(default)s)")
    p.add_argument("--modes", default=",".join(MODES),
                   help="packed (no capacity), bounded (max_tokens_per_rank = T) (default: %(default)s)")
    p.add_argument("--reps", type=int, default=20, help="timed repeats per measurement (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=5, help="warm-up repeats (default: %(default)s)")
    p.add_argument("--budget-s", type=float, default=130.0,
                   help="after this many seconds in the ranks, the remaining parts are skipped (default: %(default)s)")
    p.add_argument("--no-profile", action="store_true", help="skip (c), the profile")
    p.add_argument("--no-layer", action="store_true", help="skip (d), the layer checks")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="check this script without GPUs: 2 Gloo ranks on the CPU, shrunk presets, the PyTorch "
                        "path only (wall-clock numbers mean nothing)")
    args = p.parse_args(argv)
    args.presets = [s for s in args.presets.split(",") if s]
    args.tokens = [int(s) for s in args.tokens.split(",") if s]
    args.formats = [s for s in args.formats.split(",") if s]
    bad = [f for f in args.formats if f not in FORMATS]
    if bad:
        p.error(f"--formats: unknown {bad}; known: {', '.join(FORMATS)}")
    args.modes = [s for s in args.modes.split(",") if s]
    bad = [m for m in args.modes if m not in MODES]
    if bad or not args.modes:
        p.error(f"--modes: unknown {bad}; known: {', '.join(MODES)}")
    if args.reps < 10:
        p.error("--reps must be >= 10")
    return args


# --------------------------------------------------------------------------------------- helpers
def _bits(t):
    import torch
    return t.contiguous().view(torch.uint8)


def _cfg(preset, fmt, shrink=False):
    import torch
    from epmoe import Fp8Config
    from epmoe.presets import preset_config, shrink_config
    quant = Fp8Config(weight_block=(128, 128), dispatch_fp8=True) if fmt == "fp8" else None
    cfg = preset_config(preset, torch.bfloat16, quant=quant)
    return shrink_config(cfg, experts=16, shrink=8) if shrink else cfg


def _agree(flag: bool, device) -> bool:
    """True on every rank if it is true on any (both ranks must skip the same parts: collectives)."""
    import torch
    import torch.distributed as dist
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _identity_output(d, batch):
    """What identity experts return for `batch`: its rows in the layer's dtype (FP8 rows dequantized)."""
    if batch.scales is not None:
        return d.plan.dequantize(batch.x, batch.scales).to(d.plan.dtype)
    return batch.x.to(d.plan.dtype)


def _save(out_dir, rank, data):
    path = os.path.join(out_dir, f"rank{rank}_partial.json")
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(path + ".tmp", path)


# ------------------------------------------------------------------------------ (a) and (b): one case
def _case(d, cfg, T, rank, device, clock, reps, warmup):
    import torch
    from epmoe.bench.dispatch import nccl_twin
    from epmoe.routing import route
    from epmoe.testing import compare

    g = torch.Generator().manual_seed(1000 * T + rank)
    x = torch.randn(T, cfg.hidden_size, generator=g).to(cfg.dtype).to(device)
    routing = route((torch.randn(T, cfg.num_experts, generator=g) * 2).to(device), cfg)
    res = {}

    # (a) the kernels against the PyTorch path, and identity experts against x * (ranks reached)
    d.use_kernels = FAST[0]
    res["kernels_active"] = bool(d._kernels_for(x))
    bf, hf = d.dispatch(x, routing)
    d.use_kernels = False
    bt, ht = d.dispatch(x, routing)
    d.use_kernels = FAST[0]
    same = {}
    for name in ("x", "local_ids", "weights", "scales"):
        a, b = getattr(bf, name), getattr(bt, name)
        same[name] = (a is None and b is None) or (a is not None and b is not None and a.shape == b.shape
                                                   and torch.equal(_bits(a), _bits(b)))
    res["batch_bit_equal"] = same
    y = _identity_output(d, bt)
    out_f, out_t = d.combine(y, hf), d.combine(y, ht)
    res["combine_bit_equal"] = bool(torch.equal(out_f, out_t))
    owners = torch.tensor(d.placement.owners, device=device)[routing.topk_ids.long()]
    reached = torch.zeros(T, d.ep_size, dtype=torch.bool, device=device).scatter_(1, owners, True).sum(1)
    expect = (x.float() * reached[:, None].float()).to(cfg.dtype)
    if cfg.quant is None:
        res["identity_exact"] = bool(torch.equal(out_f, expect))
    elif T:
        c = compare(out_f.float().cpu(), expect.double().cpu())
        res["identity_rel_err"] = c.rel_err      # one e4m3 rounding of random rows: about 2-3e-2
        res["identity_within_fp8_bound"] = bool(c.finite and c.rel_err <= IDENTITY_FP8_BOUND)
    res["rows_received"] = int(bf.x.shape[0])
    del bf, bt, hf, ht, out_f, out_t
    graph = d.plan.cuda_graph_safe and device.type == "cuda"
    if d.plan.max_tokens_per_rank is not None:
        res["graph_replay_bit_equal"] = _graph_replay_equal(d, cfg, T, rank, device)

    # (b) timing: the kernels, the PyTorch path, NCCL with the same bytes
    stats = d.enable_stats()
    b, h = d.dispatch(x, routing)
    d.combine(y, h)
    d.stats = None
    del b, h
    res["dispatch_bytes_per_rank"] = stats.dispatch_bytes
    res["combine_bytes_per_rank"] = stats.combine_bytes
    for path, flag in (("kernels", FAST[0]), ("torch", False)):
        d.use_kernels = flag
        td, tc, _ = clock.time_split(lambda: d.dispatch(x, routing), lambda bh: d.combine(y, bh[1]),
                                     reps, warmup, graph and path == "kernels")
        res[f"{path}_dispatch"], res[f"{path}_combine"] = td, tc
    d.use_kernels = FAST[0]
    # NCCL moving the same bytes, timed as the kernels were (graph replays or eager, the same agreed sleep
    # on every rank)
    twin = nccl_twin(clock, res["kernels_dispatch"]["method"], stats.dispatch_bytes, stats.combine_bytes, reps,
                     warmup)
    res["nccl_dispatch"], res["nccl_combine"] = twin["dispatch"], twin["combine"]
    return res


def _graph_replay_equal(d, cfg, T, rank, device) -> bool:
    """A CUDA graph of dispatch + identity experts + combine (bounded: nothing read back), replayed on
    fresh inputs, against the eager forward on the same inputs: bit for bit."""
    import torch
    from epmoe.routing import Routing, route
    from epmoe.testing import capture
    g = torch.Generator().manual_seed(7 * T + rank)

    def inputs():
        x = torch.randn(T, cfg.hidden_size, generator=g).to(cfg.dtype).to(device)
        r = route((torch.randn(T, cfg.num_experts, generator=g) * 2).to(device), cfg)
        return x, r.topk_ids, r.topk_weights
    xs, ids, ws = inputs()

    def forward():
        batch, handle = d.dispatch(xs, Routing(ids, ws))
        return d.combine(_identity_output(d, batch), handle)
    replay, out = capture(forward, device)
    same = True
    for _ in range(2):
        for static, new in zip((xs, ids, ws), inputs()):
            static.copy_(new)
        replay()
        got = out.clone()
        same = same and bool(torch.equal(got, forward()))
    return same


# ----------------------------------------------------------------------------------- (c) profile
def _profile(d, cfg, T, rank, device, out_dir, tag):
    import torch
    from torch.profiler import ProfilerActivity, profile
    from epmoe.routing import route

    g = torch.Generator().manual_seed(7 + rank)
    x = torch.randn(T, cfg.hidden_size, generator=g).to(cfg.dtype).to(device)
    routing = route((torch.randn(T, cfg.num_experts, generator=g) * 2).to(device), cfg)
    d.use_kernels = FAST[0]
    b, h = d.dispatch(x, routing)
    y = _identity_output(d, b)
    d.combine(y, h)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        b, h = d.dispatch(x, routing)
        d.combine(y, h)
        sync()
    lines = [f"== {tag}: one dispatch + combine, rank {rank}, {T} tokens per rank, kernels path =="]
    table = None
    for key in ("device_time_total", "cuda_time_total", "self_cpu_time_total"):
        try:
            table = prof.key_averages().table(sort_by=key, row_limit=20)
            lines.append(f"-- key_averages sorted by {key}")
            break
        except Exception:        # a key this torch does not know
            continue
    lines.append(table or "(no table)")
    try:
        kernels = []
        for e in prof.events():
            dt = getattr(e, "device_type", None)
            if dt is not None and "CUDA" in str(dt):
                kernels.append((e.time_range.start, e.time_range.end, e.name))
        kernels.sort()
        if kernels:
            t0 = kernels[0][0]
            lines.append("-- GPU timeline (us from the first kernel): start, duration, gap before, name")
            prev_end, gaps = t0, 0.0
            for s, e, name in kernels:
                gap = max(s - prev_end, 0.0)
                gaps += gap
                lines.append(f"{s - t0:10.1f} {e - s:9.1f} {gap:9.1f}  {name[:110]}")
                prev_end = max(prev_end, e)
            span = prev_end - t0
            lines.append(f"-- span {span:.1f} us, GPU busy {span - gaps:.1f} us, gaps (host: header read, "
                         f"launches) {gaps:.1f} us, {len(kernels)} GPU activities")
    except Exception:
        lines.append("(timeline failed)\n" + traceback.format_exc())
    try:
        prof.export_chrome_trace(os.path.join(out_dir, f"alltoall_trace_{tag}_rank{rank}.json"))
    except Exception:
        lines.append("(chrome trace failed)\n" + traceback.format_exc())
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- (d) layer
def _layer_check(preset, fmt, experts, rank, device):
    import torch
    import torch.distributed as dist
    from epmoe import MoELayer, reference_moe
    from epmoe.testing import bound_for, compare, load_experts, random_experts

    cfg = _cfg(preset, fmt, shrink=True)
    layer = MoELayer(cfg, ep_group=dist.group.WORLD, dispatcher="alltoall", experts=experts, device=device)
    weights = random_experts(cfg, seed=3)
    load_experts(layer, weights)
    if cfg.quant is not None:      # what the layer holds: each weight quantized by the one formula
        from epmoe.quant.fp8 import dequantize_weight, quantize_weight
        q = cfg.quant
        weights = [tuple(dequantize_weight(*quantize_weight(w, q.weight_granularity, q.weight_block), q.weight_block)
                         for w in e) for e in weights]
    else:
        weights = [tuple(w.to(cfg.dtype).float() for w in e) for e in weights]
    g = torch.Generator().manual_seed(50 + rank)
    T = 96 + 37 * rank
    x = torch.randn(T, cfg.hidden_size, generator=g).to(cfg.dtype)
    logits = torch.randn(T, cfg.num_experts, generator=g) * 2
    with torch.no_grad():
        layer.dispatcher.use_kernels = FAST[0]
        out = layer(x.to(device), logits.to(device))
        layer.dispatcher.use_kernels = False
        out_t = layer(x.to(device), logits.to(device))
        layer.dispatcher.use_kernels = FAST[0]
    bias = getattr(layer, "score_correction_bias", None)
    ref = reference_moe(x, logits, weights, cfg, score_correction_bias=None if bias is None else bias.float().cpu())
    c = compare(out.float().cpu(), ref)
    bound = bound_for(cfg.dtype, fp8=cfg.quant is not None)
    return {"preset": preset, "format": fmt, "experts": getattr(layer, "experts_name", experts),
            "experts_asked": experts, "sizes": [cfg.num_experts, cfg.top_k, cfg.hidden_size, cfg.intermediate_size],
            "tokens": T, "rel_err": c.rel_err, "bound": bound, "ok": bool(c.finite and c.rel_err <= bound),
            "bit_equal_to_torch_path": bool(torch.equal(out, out_t))}


# ---------------------------------------------------------------------------------------- a rank
def worker(rank, ws, p):
    import torch
    import torch.distributed as dist
    from epmoe.bench.dispatch import RankClock
    from epmoe.build import make_dispatcher

    start = time.monotonic()
    if p["cpu"] and os.environ.get("TRITON_INTERPRET") == "1":
        FAST[0] = True           # the kernels on CPU tensors (the interpreter's bf16 casts truncate)
    device = torch.device("cpu") if p["cpu"] else torch.device("cuda", torch.cuda.current_device())
    group = dist.group.WORLD
    clock = RankClock(device, group)
    out = {"rank": rank, "cases": [], "layer": [], "profile": "", "skipped": [], "errors": []}

    def late():
        return _agree(time.monotonic() - start > p["budget_s"], device)

    dispatchers = {}
    for preset in p["presets"]:
        for fmt in p["formats"]:
            for T in p["tokens"]:
                for mode in p["modes"]:
                    what = f"{preset}/{fmt}/T={T}/{mode}"
                    if late():
                        out["skipped"].append(what)
                        continue
                    t0 = time.monotonic()
                    try:
                        cfg = _cfg(preset, fmt, p["cpu"])
                        if mode == "bounded":         # capacity T: one dispatcher per T
                            d = make_dispatcher("alltoall", cfg, group=group, device=device, max_tokens_per_rank=T)
                        else:
                            key = (preset, fmt)
                            if key not in dispatchers:
                                dispatchers[key] = make_dispatcher("alltoall", cfg, group=group, device=device)
                            d = dispatchers[key]
                        res = _case(d, cfg, T, rank, device, clock, p["reps"], p["warmup"])
                        res.update(preset=preset, format=fmt, tokens_per_rank=T, mode=mode,
                                   seconds=time.monotonic() - t0)
                        out["cases"].append(res)
                    except Exception:
                        out["errors"].append(f"{what}: {traceback.format_exc()}")
                        out["cases"].append({"preset": preset, "format": fmt, "tokens_per_rank": T, "mode": mode,
                                             "error": traceback.format_exc().strip().splitlines()[-1]})
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                    _save(p["out"], rank, out)
    if not p["no_profile"]:
        texts = []
        for fmt in p["formats"]:
            what = f"profile deepseek-v3/{fmt}/T=4096"
            if late():
                out["skipped"].append(what)
                continue
            try:
                key = ("deepseek-v3", fmt)
                cfg = _cfg(*key, p["cpu"])
                d = dispatchers.get(key) or make_dispatcher("alltoall", cfg, group=group, device=device)
                dispatchers[key] = d
                texts.append(_profile(d, cfg, 64 if p["cpu"] else 4096, rank, device, p["out"],
                                      f"deepseek-v3_{fmt}"))
            except Exception:
                out["errors"].append(f"{what}: {traceback.format_exc()}")
        out["profile"] = "\n\n".join(texts)
        _save(p["out"], rank, out)
    dispatchers.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if not p["no_layer"]:
        for preset in p["presets"]:
            for fmt in p["formats"]:
                for experts in (("auto", "grouped_mm") if fmt == "bf16" else ("auto",)):
                    what = f"layer {preset}/{fmt}/{experts}"
                    if late():
                        out["skipped"].append(what)
                        continue
                    try:
                        out["layer"].append(_layer_check(preset, fmt, experts, rank, device))
                    except Exception:
                        out["errors"].append(f"{what}: {traceback.format_exc()}")
                        out["layer"].append({"preset": preset, "format": fmt, "experts_asked": experts,
                                             "error": traceback.format_exc().strip().splitlines()[-1]})
                    _save(p["out"], rank, out)
    out["seconds"] = time.monotonic() - start
    _save(p["out"], rank, out)
    return out


# ------------------------------------------------------------------------------------------ report
def merge(per_rank):
    """One row per case: medians over the ranks' medians and the slowest rank's, in microseconds; the ratio
    to NCCL at the slowest ranks (the group waits for its slower rank)."""
    rows = []
    for i, first in enumerate(per_rank[0]["cases"]):
        cases = [r["cases"][i] for r in per_rank if i < len(r["cases"])]
        row = {k: first[k] for k in ("preset", "format", "tokens_per_rank", "mode")}
        errors = [c["error"] for c in cases if "error" in c]
        if errors:
            row["error"] = errors
            rows.append(row)
            continue
        for key in ("kernels_dispatch", "kernels_combine", "torch_dispatch", "torch_combine",
                    "nccl_dispatch", "nccl_combine"):
            meds = [c[key]["median_ms"] * 1e3 for c in cases]
            row[f"{key}_us"] = statistics.median(meds)
            row[f"{key}_us_slowest_rank"] = max(meds)
        for direction in ("dispatch", "combine"):
            row[f"{direction}_vs_nccl"] = (row[f"kernels_{direction}_us_slowest_rank"]
                                           / max(row[f"nccl_{direction}_us_slowest_rank"], 1e-9))
            row[f"{direction}_speedup_vs_torch_path"] = (row[f"torch_{direction}_us"]
                                                         / max(row[f"kernels_{direction}_us"], 1e-9))
        row["checks"] = {
            "kernels_active": all(c["kernels_active"] for c in cases),
            "batch_bit_equal": all(all(c["batch_bit_equal"].values()) for c in cases),
            "combine_bit_equal": all(c["combine_bit_equal"] for c in cases),
            "identity": all(c.get("identity_exact", c.get("identity_within_fp8_bound", True)) for c in cases),
            "graph_replay_bit_equal": all(c.get("graph_replay_bit_equal", True) for c in cases)}
        row["method"] = first["kernels_dispatch"]["method"]
        row["per_rank"] = cases
        rows.append(row)
    return rows


def print_table(rows):
    head = (f"{'preset':<14} {'fmt':<4} {'T':>5} {'mode':<7} {'disp us':>8} {'NCCL':>7} {'x':>5} {'comb us':>8} "
            f"{'NCCL':>7} {'x':>5} {'torch d':>8} {'torch c':>8}  checks")
    print(head)
    print("-" * len(head))
    for r in rows:
        lead = f"{r['preset']:<14} {r['format']:<4} {r['tokens_per_rank']:>5} {r['mode']:<7}"
        if "error" in r:
            print(f"{lead} error: {r['error'][0][:90]}")
            continue
        ok = "ok" if all(r["checks"].values()) else f"FAILED {r['checks']}"
        print(f"{lead} {r['kernels_dispatch_us']:>8.1f} "
              f"{r['nccl_dispatch_us']:>7.1f} {r['dispatch_vs_nccl']:>5.2f} {r['kernels_combine_us']:>8.1f} "
              f"{r['nccl_combine_us']:>7.1f} {r['combine_vs_nccl']:>5.2f} {r['torch_dispatch_us']:>8.1f} "
              f"{r['torch_combine_us']:>8.1f}  {ok}")


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    if not args.cpu_smoke and (not torch.cuda.is_available() or torch.cuda.device_count() < 2):
        print("gpu_alltoall_check: needs 2 CUDA GPUs (found "
              f"{torch.cuda.device_count() if torch.cuda.is_available() else 0})", file=sys.stderr)
        return 2
    from epmoe.bench.run_env import environment
    from epmoe.testing.distributed import run_on_ranks
    os.makedirs(args.out, exist_ok=True)
    p = dict(out=os.path.abspath(args.out), presets=args.presets, tokens=args.tokens, formats=args.formats,
             modes=args.modes, reps=args.reps, warmup=args.warmup, budget_s=args.budget_s, no_profile=args.no_profile,
             no_layer=args.no_layer, cpu=args.cpu_smoke)
    if args.cpu_smoke:
        p["tokens"] = [min(t, 17) for t in p["tokens"]]
    backend = "gloo" if args.cpu_smoke else "nccl"
    t0 = time.monotonic()
    failure = None
    try:
        per_rank = run_on_ranks(worker, 2, p, backend=backend, timeout_s=args.budget_s + 40)
    except Exception as exc:      # a rank failed or hung: report what the ranks saved so far
        failure = f"{type(exc).__name__}: {exc}"
        per_rank = []
        for r in range(2):
            try:
                with open(os.path.join(p["out"], f"rank{r}_partial.json")) as f:
                    per_rank.append(json.load(f))
            except OSError:
                per_rank.append({"rank": r, "cases": [], "layer": [], "profile": "", "skipped": [], "errors": []})
    rows = merge(per_rank) if per_rank and per_rank[0]["cases"] else []
    report = {"check": "alltoall CUDA path (pack/unpack kernels, gather_sum combine) vs PyTorch path and NCCL",
              "environment": environment(backend, 2), "params": p, "wall_s": time.monotonic() - t0,
              "failure": failure, "cases": rows, "layer": [r.get("layer", []) for r in per_rank],
              "skipped": per_rank[0].get("skipped", []) if per_rank else [],
              "errors": [e for r in per_rank for e in r.get("errors", [])],
              "method": "CUDA events via epmoe.bench.dispatch's clock (packed: eager, the dispatch reads the counts "
                        "on the host; bounded: CUDA graph replays of the kernels' path; the same agreed GPU sleep on "
                        "every rank), median of the ranks' medians and the slowest rank's, ratios at the slowest "
                        "ranks; NCCL all_to_all_single of uint8 with the dispatcher's bytes per destination, timed "
                        "the way the kernels were, same run"}
    with open(os.path.join(p["out"], "alltoall_check.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    with open(os.path.join(p["out"], "alltoall_profile.txt"), "w") as f:
        f.write("\n\n".join(r.get("profile", "") for r in per_rank))
    print_table(rows)
    for ranks_layer in report["layer"][:1]:
        for c in ranks_layer:
            print("layer", {k: c.get(k) for k in ("preset", "format", "experts", "rel_err", "ok",
                                                  "bit_equal_to_torch_path", "error")})
    if report["skipped"]:
        print("skipped (budget):", ", ".join(report["skipped"]))
    for e in report["errors"]:
        print("ERROR", e.strip().splitlines()[-1])
    print(f"wrote {os.path.join(p['out'], 'alltoall_check.json')} in {report['wall_s']:.0f} s")
    good = failure is None and rows and all("error" not in r and all(r["checks"].values()) for r in rows)
    good = good and all(c.get("ok") for c in (report["layer"][0] if report["layer"] else []))
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
