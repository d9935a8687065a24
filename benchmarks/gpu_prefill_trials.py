"""Issue 15 (experts at prefill), one short GPU call: which direction reaches 650 TFLOP/s BF16 and 1.6x
for FP8 block. Times the experts computation at T = 8192 (and 1024) on the four presets, balanced routing:

  (a) `triton` as the tuned table chooses (the baseline of this run), whole op and each GEMM kernel;
  (b) the same kernels with a few configurations the table does not hold (`bf16_variants`), whole op
      and each GEMM kernel, with a model of each configuration's padding and L2 -> SM bytes;
  (c) `torch._grouped_mm` BF16 on rows sorted by expert: the `grouped_mm` backend (gather once, two
      grouped GEMMs, activation between, scatter and sum), GEMMs + activation only, each GEMM alone;
  (d) `torch._scaled_grouped_mm` FP8 rowwise (per-token activations, per-channel weights) the same way:
      a ceiling of a library FP8 grouped GEMM on these shapes, NOT our 128x128 block scheme;
  (e) `triton` FP8 block (128x128 weights, per-token-group activations) as the table chooses.

Every whole-op variant is checked against `reference_moe` with the library's bounds
(`epmoe.testing.compare`) on T_CHECK tokens before it is timed, and on sampled rows at each timed T.
Timing is `epmoe bench experts`' (GpuTimer: L2 flushed, GPU kept busy, CUDA events, median; graph
replay where the backend allows). FLOPs: 6 T k H I for the whole op (as the bench counts), 4 T k H I
for gate+up alone, 2 T k H I for down alone (real, unpadded H and I).

    PYTHONPATH=. python3 benchmarks/gpu_prefill_trials.py --out DIR           # one H200, ~4 minutes
    PYTHONPATH=. python3 benchmarks/gpu_prefill_trials.py --dry-run --out DIR # CPU plumbing check

Robustness: every variant runs in try/except (the error is recorded), the run stops starting new work
at --budget-s, a variant that runs past --variant-s is interrupted, the Triton kernels of every variant
are compiled ahead in worker processes while the weights are made, and the JSON and the text table are
rewritten after every variant. --dry-run: the Triton interpreter on the CPU, tiny shrunk presets in
float32, correctness only (no timing).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import sys
import time
import traceback
from dataclasses import replace

PRESETS = ["qwen3-30b-a3b", "gpt-oss-120b", "deepseek-v3", "mixtral-8x7b"]   # most informative first
TOKENS = [8192, 1024]
T_CHECK = 256
CHECK_ROWS = 16


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="output folder (default: benchmarks/results/prefill_trials_<date>)")
    p.add_argument("--presets", default=",".join(PRESETS), help="comma-separated (default: %(default)s)")
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)),
                   help="token counts; variants (b)-(d) run at the largest only, plus all where cheap "
                        "(default: %(default)s)")
    p.add_argument("--budget-s", type=float, default=225.0,
                   help="start no new work after this many seconds (default: %(default)s)")
    p.add_argument("--variant-s", type=float, default=45.0,
                   help="interrupt one variant after this many seconds (default: %(default)s)")
    p.add_argument("--reps", type=int, default=10, help="timed repeats (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs first (default: %(default)s)")
    p.add_argument("--jobs", type=int, default=max(1, min(12, (os.cpu_count() or 1) - 4)),
                   help="compile worker processes (0: compile at first launch) (default: %(default)s)")
    p.add_argument("--no-fp8", action="store_true", help="skip (d) and (e)")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU only: Triton interpreter, tiny shrunk presets in float32, checks only, no timing")
    return p.parse_args(argv)


class VariantTimeout(BaseException):
    """Raised by the per-variant alarm (BaseException: GpuTimer's `except Exception` must not eat it)."""


class Run:
    """The results so far, the clock, and the files they are written to after every step."""

    def __init__(self, args, env):
        self.args, self.t0 = args, time.monotonic()
        self.rows: list[dict] = []
        self.notes: list[str] = []
        self.data = {"environment": env, "args": vars(args), "rows": self.rows, "notes": self.notes}
        os.makedirs(args.out, exist_ok=True)
        self.json_path = os.path.join(args.out, "prefill_trials.json")
        self.txt_path = os.path.join(args.out, "prefill_trials.txt")

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def late(self) -> bool:
        return self.elapsed() > self.args.budget_s

    def note(self, msg: str) -> None:
        line = f"[{self.elapsed():6.1f}s] {msg}"
        print(line, flush=True)
        self.notes.append(line)

    def add(self, **row) -> dict:
        row.setdefault("elapsed_s", round(self.elapsed(), 1))
        self.rows.append(row)
        ms, tf = row.get("ms"), row.get("tflops")
        chk = row.get("check")
        print(f"  {row['preset']:14s} {row['format']:11s} T={row.get('T', '-')!s:5s} {row['variant']:34s} "
              + (f"{ms:8.3f} ms {tf:6.1f} TFLOP/s" if ms is not None else "       -            -    ")
              + (f"  check {'ok' if chk['pass'] else 'FAIL'} {chk['rel_err']:.1e}" if chk else "")
              + (f"  ERROR {row['error'][:160]}" if row.get("error") else ""), flush=True)
        self.save()
        return row

    def save(self) -> None:
        self.data["elapsed_s"] = round(self.elapsed(), 1)
        tmp = self.json_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(tmp, self.json_path)
        with open(self.txt_path, "w") as f:
            f.write(text_table(self.data))


def text_table(data: dict) -> str:
    env = data["environment"]
    lines = [f"# prefill trials on {env.get('gpu')} (torch {env.get('torch')}, triton {env.get('triton')}, "
             f"{env.get('date')}), balanced routing; TFLOP/s = FLOPs / median time (whole op: 6TkHI)", ""]
    rows = data["rows"]
    for preset in dict.fromkeys(r["preset"] for r in rows):
        lines.append(f"## {preset}")
        lines.append(f"{'format':11s} {'T':>5s} {'variant':34s} {'ms':>9s} {'TFLOP/s':>8s} {'check':>12s}  "
                     f"{'pad rows':>8s} {'L2->SM GB':>9s}  config / error")
        for r in (r for r in rows if r["preset"] == preset):
            chk = r.get("check")
            c = "-" if not chk else f"{'ok' if chk['pass'] else 'FAIL'} {chk['rel_err']:.0e}"
            model = r.get("model") or {}
            pad = f"{model['padded_row_frac']:.3f}" if "padded_row_frac" in model else "-"
            l2 = f"{model['l2_to_sm_gb']:.1f}" if "l2_to_sm_gb" in model else "-"
            ms = f"{r['ms']:9.3f}" if r.get("ms") is not None else f"{'-':>9s}"
            tf = f"{r['tflops']:8.1f}" if r.get("tflops") is not None else f"{'-':>8s}"
            tail = r.get("error") or r.get("config") or ""
            lines.append(f"{r['format']:11s} {r.get('T', '-')!s:>5s} {r['variant']:34s} {ms} {tf} {c:>12s}  "
                         f"{pad:>8s} {l2:>9s}  {tail[:150]}")
        ratios = _fp8_ratios(rows, preset)
        if ratios:
            lines.append("FP8 block / BF16 (triton, table): " + ", ".join(f"T={t}: {v:.2f}x" for t, v in ratios))
        lines.append("")
    return "\n".join(lines) + "\n"


def _fp8_ratios(rows, preset):
    out = []
    for T in sorted({r.get("T") for r in rows if r["preset"] == preset and r.get("T")}):
        get = lambda fmt: next((r["tflops"] for r in rows if r["preset"] == preset and r.get("T") == T
                                and r["format"] == fmt and r["variant"] == "(a/e) triton table"
                                and r.get("tflops")), None)
        b, f = get("bf16"), get("fp8_block")
        if b and f:
            out.append((T, f / b))
    return out


# ------------------------------------------------------------------------------------- variants (b)
def bf16_variants(base, rows_per_expert: float) -> dict:
    """Configurations of the `triton` kernels at T = 8192 that `epmoe tune` never times (its prefill lists:
    BLOCK_M <= 128, GROUP_M 8, BF16 num_warps <= 8, gate+up BLOCK_N <= 128); each varies one thing
    against the table's entry `base` or tests one hypothesis (benchmarks/notes_kernels.md, next trial)."""
    from epmoe.kernels.tuning_table import GemmConfig, MoEKernelConfig
    v = {
        # L2 reuse of weight tiles across an expert's row tiles: what the swizzle already buys
        "(b) swizzle off (GROUP_M 1)": replace(base, gate_up=replace(base.gate_up, group_m=1),
                                               down=replace(base.down, group_m=1)),
        "(b) swizzle GROUP_M 32": replace(base, gate_up=replace(base.gate_up, group_m=32),
                                          down=replace(base.down, group_m=32)),
        # the table's tiles with 16 warps (4 warpgroups): half the registers per thread; control for BM256
        "(b) table tiles, 16 warps": replace(base, gate_up=replace(base.gate_up, num_warps=16, num_stages=3),
                                             down=replace(base.down, num_warps=16, num_stages=3)),
        # short, wide tiles: less padding (BM 64), but each row tile re-reads its weight tile from L2
        "(b) BM64 wide-N (BN256)": MoEKernelConfig(64, GemmConfig(256, 64, 8, 8, 3, tma=True),
                                                   GemmConfig(256, 64, 8, 8, 4, tma=True)),
        # gate+up 256 x (2 x 128) output tiles, 16 warps: a third fewer L2 -> SM bytes per gate+up FLOP
        # (down 256 x 128, 8 warps: as many bytes as the table's 128 x 256; its 256 x 256 with 16 warps
        # failed ptxas in a triton 3.9 cross-compile)
        "(b) BM256+128 big tile, 16 warps": MoEKernelConfig(256, GemmConfig(128, 64, 8, 16, 3, tma=True),
                                                            GemmConfig(128, 64, 8, 8, 4, tma=True), tail_m=128),
    }
    if rows_per_expert >= 512:     # 256-row tiles without a tail where experts hold many rows
        v["(b) BM256 big tile, no tail"] = MoEKernelConfig(256, GemmConfig(128, 64, 8, 16, 3, tma=True),
                                                           GemmConfig(128, 64, 8, 8, 4, tma=True))
    return v


def tile_model(counts, cfg, H: int, I: int, elem: int) -> dict:
    """Padding and the bytes the GEMM tiles load from L2 (each tile loads its A rows and weight rows for
    every K block: gate+up (rows + 2 BN) x H, down (rows + BN) x I per N tile), from the expert counts
    and the split-layout rule of `moe_align` (one tail tile when the remainder fits it)."""
    bm, tail = cfg.block_m, cfg.tail_m if cfg.tail_m and cfg.tail_m < cfg.block_m else 0
    rows_total, tiles = 0, []
    for c in counts:
        c = int(c)
        whole, rem = divmod(c, bm)
        if tail and 0 < rem <= tail:
            t = [bm] * whole + [tail]
        else:
            t = [bm] * (-(-c // bm))
        tiles += t
        rows_total += c
    n_gu = -(-I // cfg.gate_up.block_n)
    n_dn = -(-H // cfg.down.block_n)
    gu = sum(n_gu * H * (r + 2 * cfg.gate_up.block_n) for r in tiles) * elem
    dn = sum(n_dn * I * (r + cfg.down.block_n) for r in tiles) * elem
    return {"padded_row_frac": sum(tiles) / max(rows_total, 1) - 1.0, "row_tiles": len(tiles),
            "l2_to_sm_gb": (gu + dn) / 1e9, "gate_up_l2_gb": gu / 1e9, "down_l2_gb": dn / 1e9}


# ------------------------------------------------------------------------------------------ helpers
def environment(dry: bool) -> dict:
    import torch
    import triton
    env = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "dry_run": dry}
    if torch.cuda.is_available() and not dry:
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=torch.cuda.get_device_name(0), sm_count=props.multi_processor_count,
                   capability=list(torch.cuda.get_device_capability()), cuda=torch.version.cuda)
    else:
        env["gpu"] = "none (CPU, Triton interpreter)"
    return env


class Guard:
    """Interrupt the body after `seconds` (SIGALRM; the main thread only)."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __enter__(self):
        def fire(signum, frame):
            raise VariantTimeout(f"variant ran past {self.seconds:.0f} s")
        self.old = signal.signal(signal.SIGALRM, fire)
        signal.setitimer(signal.ITIMER_REAL, self.seconds)
        return self

    def __exit__(self, *exc):
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self.old)
        return False


def _err(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"


class Compiler:
    """Compiles the Triton kernels of the planned configurations ahead, in worker processes (what
    `epmoe tune` does: Triton's warmup fills its on-disk cache, which the launches then hit)."""

    def __init__(self, jobs: int):
        self.pool, self.futures = None, {}
        if jobs > 0:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor
            from epmoe.bench.tune import _worker_init
            self.pool = ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"),
                                            initializer=_worker_init)

    def submit(self, key, problem, cfg) -> None:
        if self.pool is None or key in self.futures:
            return
        from epmoe.bench.tune import _compile_job, compile_jobs
        jobs = compile_jobs(problem, cfg.block_m, [cfg.gate_up], [cfg.down],
                            cfg.tail_m if cfg.tail_m and cfg.tail_m < cfg.block_m else 0)
        self.futures[key] = [self.pool.submit(_compile_job, j) for j in jobs]

    def wait(self, key, timeout: float) -> str | None:
        """None when compiled (or nothing was submitted), else what went wrong (compile errors are
        reported, the variant still runs: it then compiles at its first launch)."""
        errors = []
        deadline = time.monotonic() + timeout
        for f in self.futures.get(key, []):
            try:
                err = f.result(timeout=max(0.1, deadline - time.monotonic()))
            except Exception as exc:  # timeout or a dead worker
                err = _err(exc)
            if err:
                errors.append(err)
        return "; ".join(errors) or None

    def close(self) -> None:
        if self.pool is None:
            return
        procs = list(getattr(self.pool, "_processes", {}).values())
        self.pool.shutdown(wait=False, cancel_futures=True)
        for p in procs:             # the workers this script started: do not wait for stray compiles
            if p.is_alive():
                p.terminate()


def meta_problem(cfg, fmt: str):
    """A tune `Problem` whose weights are meta tensors of the layer's shapes and dtypes (compile only)."""
    from types import SimpleNamespace

    import torch
    from epmoe.bench.tune import Problem
    L, H, I = cfg.num_experts, cfg.padded_hidden_size, cfg.padded_intermediate_size
    wdt = torch.float8_e4m3fn if cfg.quant is not None else cfg.dtype
    w = SimpleNamespace(w13=torch.empty(L, 2 * I, H, dtype=wdt, device="meta"),
                        w2=torch.empty(L, H, I, dtype=wdt, device="meta"), b13=None, b2=None)
    return Problem(cfg, fmt, w, cfg.quant is not None)


# --------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"       # before Triton is imported
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if args.out is None:
        args.out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                f"prefill_trials_{datetime.date.today():%Y-%m-%d}" + ("_dry" if args.dry_run else ""))
    import torch
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_prefill_trials: needs a CUDA GPU (or --dry-run)", file=sys.stderr)
        return 2
    run = Run(args, environment(args.dry_run))
    run.note(f"start: {run.data['environment']}")
    compiler = None
    try:
        compiler = Compiler(0 if args.dry_run else args.jobs)
        trials(run, compiler)
    except BaseException as exc:     # keep what was measured
        run.note(f"stopped: {_err(exc)}\n{traceback.format_exc()[-2000:]}")
    finally:
        if compiler is not None:
            compiler.close()
        run.save()
    print(open(run.txt_path).read())
    print(f"wrote {run.json_path} and {run.txt_path} in {run.elapsed():.0f} s")
    return 0


def trials(run: Run, compiler: Compiler) -> None:
    import torch
    from epmoe.kernels.fused_moe import weight_format
    from epmoe.kernels.tuning_table import lookup_config
    from epmoe.presets import preset_config, shrink_config
    from epmoe.quant import quant_config_for

    args, dry = run.args, run.args.dry_run
    device = torch.device("cpu") if dry else torch.device("cuda", torch.cuda.current_device())
    dtype = torch.float32 if dry else torch.bfloat16      # bf16 tl.dot is wrong in the interpreter
    tokens = sorted({int(t) for t in args.tokens.split(",") if t.strip()}, reverse=True)
    if dry:
        tokens = [64]
    t_big = tokens[0]
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    formats = ["bf16"] + ([] if args.no_fp8 else ["fp8_block", "fp8_channel"])

    def layer_cfg(preset, fmt):
        cfg = preset_config(preset, dtype=dtype, quant=quant_config_for(fmt))
        if not dry:
            return cfg
        cfg = shrink_config(cfg, experts=8, shrink=32)     # then sizes the unpadded layouts take as they are
        return replace(cfg, hidden_size=-(-cfg.hidden_size // 32) * 32,
                       intermediate_size=-(-cfg.intermediate_size // 32) * 32)

    # ceilings of this run, as the bench measures them
    timer = None
    if not dry:
        from epmoe.bench.gpu_timing import GpuTimer, measure_matmul_rate
        timer = GpuTimer(device)
        run.data["ceilings"] = {"matmul_bf16_tflops": measure_matmul_rate(timer, torch.bfloat16) / 1e12}
        if not args.no_fp8:
            run.data["ceilings"]["matmul_fp8_tflops"] = measure_matmul_rate(timer, torch.float8_e4m3fn) / 1e12
        run.note(f"ceilings {run.data['ceilings']}")

    # every Triton configuration of the run, compiled ahead in preset order
    plans = {}
    for preset in presets:
        for fmt in formats[:2]:
            cfg = layer_cfg(preset, fmt)
            L, k, Hp, Ip = cfg.num_experts, cfg.top_k, cfg.padded_hidden_size, cfg.padded_intermediate_size
            wfmt = weight_format(dtype, cfg.quant.weight_granularity if cfg.quant else None)
            configs = {}
            for T in tokens:
                configs[("(a/e) triton table", T)] = lookup_config(T, L, Hp, Ip, k, wfmt, device)
            if fmt == "bf16":
                base = configs[("(a/e) triton table", t_big)][0]
                for name, c in bf16_variants(base, t_big * k / L).items():
                    configs[(name, t_big)] = (c, "variant")
            plans[(preset, fmt)] = configs
            problem = meta_problem(cfg, wfmt)
            for (name, T), (c, _src) in configs.items():
                compiler.submit((preset, fmt, c), problem, c)
    run.note(f"compile jobs submitted: {sum(len(v) for v in compiler.futures.values())}")

    gen = torch.Generator(device=device).manual_seed(0)
    for preset in presets:
        for fmt in formats:
            if run.late():
                run.note(f"budget spent: skipping {preset} {fmt}")
                continue
            try:       # each variant inside has its own time guard
                one_format(run, compiler, timer, gen, device, preset, fmt, layer_cfg(preset, fmt), tokens,
                           plans.get((preset, fmt), {}))
            except BaseException as exc:
                if isinstance(exc, KeyboardInterrupt):
                    raise
                run.add(preset=preset, format=fmt, variant="(setup)", error=_err(exc),
                        traceback=traceback.format_exc()[-1500:])
            if not dry:
                torch.cuda.empty_cache()


def one_format(run, compiler, timer, gen, device, preset, fmt, cfg, tokens, plan) -> None:
    """All variants of one preset in one weight format: weights made once, every variant checked on
    T_CHECK tokens against the oracle, then timed at each T."""
    import torch
    from epmoe import contract
    from epmoe.bench.expert_anchors import grouped_bf16_chain
    from epmoe.bench.experts import make_routing, make_weights
    from epmoe.activations import gated_activation_fused
    from epmoe.experts.base import sort_pairs_by_expert
    from epmoe.bench.tune import _time_candidates
    from epmoe.layouts import FlatBatch
    from epmoe.reference import reference_moe
    from epmoe.routing import Routing
    from epmoe.testing.compare import bound_for, compare

    args, dry = run.args, run.args.dry_run
    t_big = tokens[0]
    E, k, H, I = cfg.num_experts, cfg.top_k, cfg.hidden_size, cfg.intermediate_size
    Hp = cfg.padded_hidden_size
    fp8 = cfg.quant is not None
    t0 = time.monotonic()
    weights, oracle = make_weights(cfg, device, gen)
    if weights.w13.dtype != cfg.dtype and not fp8:     # dry run: float32 layers (the same values)
        weights = replace(weights, w13=weights.w13.to(cfg.dtype), w2=weights.w2.to(cfg.dtype))
    run.note(f"{preset} {fmt}: weights in {time.monotonic() - t0:.1f} s "
             f"(L={E} H={H} I={I} k={k}, stored {list(weights.w13.shape)} {weights.w13.dtype})")
    bound = bound_for(cfg.dtype, fp8=fp8, hidden_size=H)

    def inputs(T):
        ids, tw = make_routing("balanced", T, E, k, gen, device)
        pool = [torch.randn(T, H, generator=gen, device=device).to(cfg.dtype) for _ in range(2)]
        x = pool[0].clone()
        xp = x if Hp == H else torch.nn.functional.pad(x, (0, Hp - H))
        return ids, tw, pool, x, xp

    def check_of(out, ref):
        res = compare(out[:, :H], ref)
        return {"rel_err": res.rel_err, "bound": bound, "pass": bool(res.finite and res.rel_err <= bound)}

    # the oracle on T_CHECK tokens (every row), and the flop counts
    tc = 24 if dry else T_CHECK
    c_ids, c_tw, _, c_x, c_xp = inputs(tc)
    c_ref = reference_moe(c_x, None, oracle, cfg, routing=Routing(c_ids, c_tw), device=device)
    by_t = {T: inputs(T) for T in tokens}
    fmt_rows = dict(preset=preset, format=fmt)

    def flops(T, part="whole"):
        return {"whole": 6.0, "gate_up": 4.0, "down": 2.0}[part] * T * k * H * I

    def timed(fn, T, refresh=None, graph=True, part="whole"):
        if timer is None:
            return {}
        t = timer.time(fn, reps=args.reps, warmup=args.warmup, before_each=refresh, use_graph=graph)
        return {"ms": t.median_ms, "tflops": flops(T, part) / (t.median_ms * 1e-3) / 1e12, "timing": t.as_dict()}

    def whole_op(name, make_fn, Ts, graph=True, config=None, extra=None):
        """make_fn(xp, ids, tw) -> fn: check at T_CHECK, then time (and check sampled rows) at each T."""
        if run.late():
            run.add(**fmt_rows, variant=name, error="skipped: budget spent")
            return
        try:
            with Guard(args.variant_s):
                chk = check_of(make_fn(c_xp, c_ids, c_tw)(), c_ref)
                if not chk["pass"]:
                    run.add(**fmt_rows, T=tc, variant=name, check=chk, config=config,
                            error="check failed: not timed")
                    return
                for T in Ts:
                    ids, tw, pool, x, xp = by_t[T]
                    fn = make_fn(xp, ids, tw)
                    state = {"i": 0}

                    def refresh(x=x, xp=xp, pool=pool):
                        state["i"] = (state["i"] + 1) % len(pool)
                        x.copy_(pool[state["i"]])
                        if xp is not x:
                            xp[:, :H].copy_(x)
                    res = timed(fn, T, refresh, graph)
                    x.copy_(pool[0])
                    if xp is not x:
                        xp[:, :H].copy_(x)
                    sample = torch.arange(min(T, CHECK_ROWS), device=device)
                    ref = reference_moe(x[sample], None, oracle, cfg, routing=Routing(ids[sample], tw[sample]),
                                        device=device)
                    run.add(**fmt_rows, T=T, variant=name, check=check_of(fn()[sample], ref),
                            check_small_t=chk, config=config, **res, **(extra(T) if extra else {}))
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                raise
            run.add(**fmt_rows, variant=name, config=config, error=_err(exc), traceback=traceback.format_exc()[-1500:])

    def gemm_only(name, fn_for_t, Ts, part):
        if timer is None or run.late():
            return
        for T in Ts:
            try:
                with Guard(args.variant_s):
                    run.add(**fmt_rows, T=T, variant=name, **timed(fn_for_t(T), T, part=part))
            except BaseException as exc:
                if isinstance(exc, KeyboardInterrupt):
                    raise
                run.add(**fmt_rows, T=T, variant=name, error=_err(exc))

    def counts_of(ids):
        return torch.bincount(ids.reshape(-1).long(), minlength=E).tolist()

    # ---- (a) / (b) / (e): the triton backend, table and variant configurations
    if fmt in ("bf16", "fp8_block"):
        from epmoe.experts.triton import TritonExperts
        if dry and fp8:     # the FP8 build check asks for a GPU; the interpreter runs the kernels on the CPU
            import epmoe.experts.triton as triton_experts
            triton_experts._quant_problem = lambda cfg, device_type: None
        for (name, T), (kcfg, src) in plan.items():
            if run.late():
                run.add(**fmt_rows, T=T, variant=name, error="skipped: budget spent")
                continue
            err = compiler.wait((preset, fmt, kcfg), timeout=max(5.0, min(args.variant_s, args.budget_s - run.elapsed())))
            if err and "Timeout" not in err:     # it would fail again at its launch, after compiling again
                run.add(**fmt_rows, T=T, variant=name, config=kcfg.describe(), error=f"compile failed: {err}")
                continue
            experts = TritonExperts(cfg, device)
            experts.kernel_config = lambda n, w, kcfg=kcfg: kcfg       # this configuration at every T

            def make_fn(xp, ids, tw, experts=experts):
                batch = FlatBatch(xp, ids, tw)
                return lambda: experts(batch, weights)
            elem = 1 if fp8 else 2
            extra = lambda T, kcfg=kcfg: {"model": tile_model(counts_of(by_t[T][0]), kcfg, Hp,
                                                              cfg.padded_intermediate_size, elem),
                                          "compile_error": err, "config_source": src}
            whole_op(name, make_fn, [T], config=kcfg.describe(), extra=extra)
            # each GEMM kernel alone (tune's timing: eager behind a sleep, L2 flushed, one balanced routing)
            if timer is not None and not run.late():
                try:
                    from epmoe.bench.tune import Problem
                    problem = Problem(cfg, plan_fmt(cfg), weights, fp8)
                    with Guard(args.variant_s):
                        tail = kcfg.tail_m if kcfg.tail_m and kcfg.tail_m < kcfg.block_m else 0
                        gu, dn = _time_candidates(problem, T, kcfg.block_m, [kcfg.gate_up], [kcfg.down], timer,
                                                  args.reps, gen, tail_m=tail)
                    for part, ms in (("gate_up", gu[kcfg.gate_up]), ("down", dn[kcfg.down])):
                        run.add(**fmt_rows, T=T, variant=f"{name} [{part} kernel]", ms=ms,
                                tflops=flops(T, part) / (ms * 1e-3) / 1e12 if ms < float("inf") else None,
                                config=kcfg.describe())
                except BaseException as exc:
                    if isinstance(exc, KeyboardInterrupt):
                        raise
                    run.add(**fmt_rows, T=T, variant=f"{name} [kernels]", error=_err(exc))

    # ---- (c): torch._grouped_mm BF16 on rows sorted by expert
    def grouped_mm_backend(name) -> bool:
        """The `grouped_mm` backend's whole op (False, recorded, where it cannot run this layer here)."""
        why = contract.experts_problem("grouped_mm", cfg, device.type)
        if why:
            run.add(**fmt_rows, variant=name, error=f"unavailable: {why}")
            return False
        gmm = contract.experts_class("grouped_mm")(cfg, device)

        def make_fn(xp, ids, tw):
            batch = FlatBatch(xp, ids, tw)
            return lambda: gmm(batch, weights)
        whole_op(name, make_fn, tokens, graph=gmm.CAPS.cuda_graph_safe)
        return True

    if fmt == "bf16" and grouped_mm_backend("(c) grouped_mm backend (whole op)"):
        def anchor(T):
            ids, tw, pool, x, xp = by_t[T]
            order, _, offsets = sort_pairs_by_expert(ids, E)
            xs = x[order // k].contiguous()
            chain = grouped_bf16_chain(cfg.activation, weights.w13, weights.w2, offsets)
            return lambda: chain(xs)
        gemm_only("(c) grouped_mm GEMMs + act (bench anchor)", anchor, tokens, "whole")
        sorted_in = {}

        def sorted_rows(T):
            if T not in sorted_in:
                ids, tw, pool, x, xp = by_t[T]
                order, _, offsets = sort_pairs_by_expert(ids, E)
                xs = x[order // k].contiguous()
                h = torch._grouped_mm(xs, weights.w13.transpose(1, 2), offs=offsets)
                sorted_in[T] = (xs, offsets, gated_activation_fused(cfg.activation, h).contiguous())
            return sorted_in[T]
        gemm_only("(c) grouped_mm gate_up GEMM alone",
                  lambda T: (lambda s=sorted_rows(T): torch._grouped_mm(s[0], weights.w13.transpose(1, 2),
                                                                         offs=s[1])), tokens, "gate_up")
        gemm_only("(c) grouped_mm down GEMM alone",
                  lambda T: (lambda s=sorted_rows(T): torch._grouped_mm(s[2], weights.w2.transpose(1, 2),
                                                                         offs=s[1])), tokens, "down")

    # ---- (d): torch._scaled_grouped_mm FP8 rowwise (a ceiling; not the block scheme)
    if fmt == "fp8_channel" and grouped_mm_backend("(d) scaled_grouped_mm rowwise (whole op)"):
        scheme = cfg.quant_scheme
        sorted_in = {}

        def sorted_fp8(T):
            if T not in sorted_in:
                ids, tw, pool, x, xp = by_t[T]
                order, _, offsets = sort_pairs_by_expert(ids, E)
                src = order // k
                xq, xs = scheme.quantize_activations(xp)
                xq, xs = xq[src].contiguous(), xs.reshape(-1)[src].float().contiguous()
                h = torch._scaled_grouped_mm(xq, weights.w13.transpose(1, 2), xs, weights.w13_scale,
                                             offs=offsets, out_dtype=torch.bfloat16)
                aq, as_ = scheme.quantize_activations(gated_activation_fused(cfg.activation, h.float()))
                sorted_in[T] = (xq, xs, offsets, aq.contiguous(), as_.reshape(-1).float().contiguous())
            return sorted_in[T]
        gemm_only("(d) scaled_grouped_mm gate_up alone",
                  lambda T: (lambda s=sorted_fp8(T): torch._scaled_grouped_mm(
                      s[0], weights.w13.transpose(1, 2), s[1], weights.w13_scale, offs=s[2],
                      out_dtype=torch.bfloat16)), tokens, "gate_up")
        gemm_only("(d) scaled_grouped_mm down alone",
                  lambda T: (lambda s=sorted_fp8(T): torch._scaled_grouped_mm(
                      s[3], weights.w2.transpose(1, 2), s[4], weights.w2_scale, offs=s[2],
                      out_dtype=torch.bfloat16)), tokens, "down")
    del weights, oracle


def plan_fmt(cfg) -> str:
    return "fp8_" + cfg.quant.weight_granularity if cfg.quant is not None else str(cfg.dtype).replace("torch.", "")


if __name__ == "__main__":
    sys.exit(main())
