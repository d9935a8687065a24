"""Probe: the warp-specialized Gluon grouped GEMM (`epmoe.kernels.ws_grouped_gemm`) on one Hopper GPU.

Two stages, each in its own process with a time limit (a wrong mbarrier phase hangs a GPU kernel; the
limit turns that into an error in the JSON instead of a lost device call):
1. check: the `triton_ws` experts' self-check, then small awkward problems against the kernel's PyTorch
   statement (`grouped_gemm_reference`): N and K not multiples of the tile, unequal rows per expert, a
   skipped tile (its rows must keep their sentinel), few programs (the persistent walk and the ring wrap
   around), plain and gated, block FP8 and BF16, with a bias, A in layout order or picked from fewer
   token rows (`a_rows`, down to one token), FP8 with the A scales from global memory or brought by
   TMA (`scale_tma`), the outputs stored from registers or through shared memory by TMA (`store_tma`), the
   second math warpgroup started some K blocks behind the first (`stagger`).
   rel. error <= 1e-2.
2. time: the deepseek-v3 32-expert shard and mixtral-8x7b at T tokens, each GEMM of the experts over rows
   laid out expert by expert (gate+up with silu and, in FP8, the block quantization in its epilogue, as
   the library's gate+up kernel does; down plain, with a bias), beside the library's two kernels with the
   tuning table's configuration on the same shapes (`ws_probe.library_times`), both on a random top-k
   routing of T tokens laid out in tiles of 128 (the same draw, not the same ids). Gate+up twice: reading
   the token rows where they are (`a_rows`: its loader copies them with `cp.async`) and over rows already
   in layout order (TMA, the `triton_ws` backend's form); beside them, the backend's copy of the rows
   into the layout, timed on its own.
   `triton.testing.do_bench` medians for both; every timed variant checked on two tiles against
   `grouped_gemm_reference` first.

    python3 benchmarks/gluon_gemm_probe.py --output $OUT/gluon_gemm_probe.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

# (format, gemm): [(block_n, stages, A scales by TMA, outputs by TMA store, with a bias, K blocks the second
# math warpgroup starts behind the first)]; block_m 128 (two warpgroups of 64 rows), block_k 128 / 64. The
# experts of the presets timed have no biases. The FP8 down GEMM's TMA store (bfloat16 buffers, 32 KB)
# leaves room for 3 slots of 256-wide tiles: timed beside the register stores with 3 and with 4. (The products of the two warpgroups in turn and two K blocks
# per ring slot were timed on 2026-12-05 and lost everywhere: notes_kernels.md, eighth and ninth passes.)
VARIANTS = {
    ("fp8_block", "gate_up"): [(256, 4, True, False, False, 0), (256, 4, True, True, False, 0),
                               (256, 4, True, True, False, 2), (256, 4, True, True, False, 3)],
    ("fp8_block", "down"): [(128, 6, True, False, False, 0), (128, 5, True, True, False, 0),
                            (256, 4, True, False, False, 0), (256, 3, True, False, False, 0),
                            (256, 3, True, True, False, 0), (256, 3, True, True, False, 2)],
    ("bf16", "gate_up"): [(256, 4, False, False, False, 0), (256, 4, False, True, False, 0),
                          (256, 4, False, True, False, 2)],
    ("bf16", "down"): [(256, 4, False, False, False, 0), (256, 4, False, True, False, 0),
                       (256, 4, False, True, False, 2)],
}
# --only: which variants a focused run times beside each GEMM's plain form (same tile, A in layout order)
FOCUS = {"scale_tma": lambda scale_tma, store_tma, bias, stagger: scale_tma,
         "store_tma": lambda scale_tma, store_tma, bias, stagger: store_tma,
         "stagger": lambda scale_tma, store_tma, bias, stagger: stagger > 0}


class Problem:
    """One grouped GEMM in the kernel's layout: A [M, K] (rows of tile m belong to expert tile_expert[m]),
    W [E, w_rows, K], with FP8 block scales where `fp8` (`channel`: a weight scale per output row and A's per
    row instead, as `fp8_channel` runs), a bias, and `gated` (the activation; FP8 out in block FP8, BF16 out
    per channel, whose rows are quantized after it).
    `tokens`: A holds that many rows instead, picked for the M layout rows by `a_rows` (given, or drawn
    at random: some picked twice, some never), as the backend's gate+up reads the tokens."""

    def __init__(self, fp8, gated, tile_expert, E, w_rows, K, gen, dev, a_std=1.0, tokens=None, a_rows=None,
                 channel=False):
        import torch
        from epmoe.quant.fp8 import fp8_quantize, quantize_weight
        if channel and not fp8:
            raise ValueError("Problem: channel is a form of FP8")
        self.fp8, self.gated, self.channel = fp8, gated, channel
        self.tile_expert = torch.tensor(tile_expert, dtype=torch.int32, device=dev)
        M = 128 * len(tile_expert)
        if tokens is not None and a_rows is None:
            a_rows = torch.randint(0, tokens, (M,), generator=gen, device=dev).to(torch.int32)
        self.a_rows = a_rows
        a = torch.randn(M if tokens is None else tokens, K, generator=gen, device=dev) * a_std
        w = torch.randn(E, w_rows, K, generator=gen, device=dev) * (1.0 / K ** 0.5)
        self.bias = torch.randn(E, w_rows, generator=gen, device=dev) * 0.1
        self.use_bias = True        # args() passes the bias (a timed variant may turn it off)
        self.a_scale_t = self.w_scale = None
        if fp8:
            a, s = fp8_quantize(a, None if channel else 128)
            self.a_scale_t = s.t().contiguous()
            wq = [quantize_weight(w[e], "channel" if channel else "block", (128, 128)) for e in range(E)]
            w = torch.stack([q for q, _ in wq])
            self.w_scale = torch.stack([s for _, s in wq]).contiguous()
        else:
            a, w = a.bfloat16(), w.bfloat16()
        self.a, self.w = a, w
        self.N = w_rows // 2 if gated else w_rows
        self.M, self.K = M, K
        self.out = self.new_out(dev)

    def new_out(self, dev):
        import torch
        out_fp8 = self.fp8 and self.gated and not self.channel
        out = torch.zeros(self.M, self.N, dtype=torch.float8_e4m3fn if out_fp8 else torch.bfloat16, device=dev)
        scale_t = torch.ones(-(-self.N // 128), self.M, device=dev) if out_fp8 else None
        return out, scale_t

    def args(self, out=None):
        o, st = out or self.out
        return (self.a, self.w, self.tile_expert, o, self.a_scale_t, self.w_scale,
                self.bias if self.use_bias else None, "silu" if self.gated else None, st)

    def values(self, out=None):
        o, st = out or self.out
        return o.float() if st is None else o.float() * st.t().repeat_interleave(128, 1)[:, :self.N]

    def rel_err(self, tiles):
        """The kernel's rows of `tiles` against `grouped_gemm_reference` on the same rows."""
        import torch
        from epmoe.experts.triton_ws import grouped_gemm_reference
        rows = torch.cat([torch.arange(t * 128, (t + 1) * 128) for t in tiles]).to(self.a.device)
        picked = rows if self.a_rows is None else self.a_rows[rows].long()       # A's rows of those layout rows
        sub = Problem.__new__(Problem)
        sub.__dict__.update(self.__dict__)
        sub.a, sub.M, sub.a_rows = self.a[picked].contiguous(), rows.numel(), None
        sub.tile_expert = self.tile_expert[list(tiles)].contiguous()
        sub.a_scale_t = None if self.a_scale_t is None else self.a_scale_t[:, picked].contiguous()
        ref = sub.new_out(self.a.device)
        grouped_gemm_reference(*sub.args(ref))          # in layout order: checks the kernel's gather too
        got = self.values()[rows]
        want = sub.values(ref)
        return ((got - want).norm() / want.norm()).item()


def stage_check(cpu_smoke: bool = False, save=lambda records: None, only: str | None = None) -> list:
    """Small awkward problems, every result checked; returns one record per case. `cpu_smoke`: on the CPU
    with the PyTorch statement in the kernel's place (the probe's own plumbing, no kernel). `only` (a
    FOCUS name): the backend's self-check and the cases of that form only."""
    import torch
    from epmoe.experts.triton_ws import gemm_disagreement
    from epmoe.experts.triton_ws import grouped_gemm_reference
    if cpu_smoke:
        dev, grouped_gemm_ws = torch.device("cpu"), grouped_gemm_reference
    else:
        from epmoe.kernels.ws_grouped_gemm import grouped_gemm_ws
        dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(1)
    records = []

    def starting(rec):
        """Said (printed and saved) before the launch: a case that hangs is the last one started."""
        rec.update(ok=False, state="started")
        records.append(rec)
        print(json.dumps(rec), flush=True)
        save(records)

    def finished(rec, **result):
        rec.update(result, state="finished")
        print(json.dumps(rec), flush=True)
        save(records)

    for form in (None, "block", "channel", "channel_group"):           # the backend's own self-check first
        rec = dict(case="triton_ws self-check", fp8=form is not None, form=form or "bf16")
        starting(rec)
        why = gemm_disagreement(grouped_gemm_ws, dev, form)
        finished(rec, ok=why is None, why=why)
    # (fp8, gated, W rows per expert, K, tile experts (-1 skipped), programs, block_n, stages, A's rows
    # picked from that many tokens (`a_rows`) or None: A in layout order, A scales by TMA (FP8), outputs by
    # TMA store, with a bias, K blocks the second math warpgroup starts behind the first)
    cases = [(True, False, 384, 512, [0, 1, 1, 2], 3, 128, 3, None, False, False, True, 0),
             (True, False, 320, 320, [0, -1, 2, 2, 3], 2, 256, 4, None, False, False, True, 0),
             (True, True, 512, 7168, [1, 0], 132, 256, 4, None, False, False, True, 0),
             (True, True, 768, 384, [0, -1, 1, 1, 2], 2, 256, 3, None, False, False, True, 0),
             (False, False, 384, 512, [0, 1, 1, 2], 3, 128, 4, None, False, False, True, 0),
             (False, False, 320, 200, [0, -1, 2, 2, 3], 2, 256, 3, None, False, False, True, 0),
             (False, True, 600, 2048, [1, 1, 0], 5, 256, 4, None, False, False, True, 0),
             (False, False, 512, 2048, [0, 1, 1], 5, 64, 6, None, False, False, True, 0),
             # the row gather: fewer tokens than rows, K tails zero-filled (BF16 K 200: a 64-wide block of 8)
             (True, True, 512, 7168, [1, 0, 0], 132, 256, 4, 300, False, False, True, 0),
             (True, True, 768, 384, [0, -1, 1, 1, 2], 2, 256, 3, 1, False, False, True, 0),
             (True, False, 320, 640, [0, 1, -1, 1], 2, 128, 3, 200, False, False, True, 0),
             (False, True, 600, 2048, [1, 1, 0], 5, 256, 4, 97, False, False, True, 0),
             (False, False, 320, 200, [0, -1, 2, 2, 3], 2, 256, 3, 400, False, False, True, 0),
             # the A scales brought by TMA: plain 128 and 256 wide, gated, a K tail, a skipped tile, a
             # program walking several tiles
             (True, False, 384, 512, [0, 1, 1, 2], 3, 128, 3, None, True, False, True, 0),
             (True, False, 320, 320, [0, -1, 2, 2, 3], 2, 256, 4, None, True, False, True, 0),
             (True, True, 512, 7168, [1, 0], 132, 256, 4, None, True, False, True, 0),
             (True, True, 768, 384, [0, -1, 1, 1, 2], 2, 256, 3, None, True, False, True, 0),
             (True, False, 384, 1024, [0, 1, -1, 2], 2, 128, 6, None, True, False, True, 0),
             # the outputs by TMA store (each warpgroup's rows through its shared-memory buffer): plain 128 and
             # 256 wide with and without a bias, columns past N clipped (N 320), gated with FP8 and bfloat16
             # out, a skipped tile, programs walking several tiles and reusing their buffers
             (True, False, 384, 512, [0, 1, 1, 2], 3, 128, 3, None, True, True, False, 0),
             (True, False, 320, 320, [0, -1, 2, 2, 3], 2, 256, 3, None, True, True, True, 0),
             (True, False, 320, 320, [0, -1, 2, 2, 3], 2, 256, 3, None, True, True, False, 0),
             (True, True, 512, 7168, [1, 0], 132, 256, 4, None, True, True, False, 0),
             (True, True, 768, 384, [0, -1, 1, 1, 2], 2, 256, 3, None, True, True, True, 0),
             (False, False, 320, 200, [0, -1, 2, 2, 3], 2, 256, 3, None, False, True, False, 0),
             (False, True, 640, 2048, [1, 1, 0], 2, 256, 4, None, False, True, True, 0),
             # the second math warpgroup started behind the first: programs with no tile or fewer K blocks than
             # the lead (its end arrive lets the second start), skipped tiles, the register stores too
             (True, True, 512, 7168, [1, 0], 132, 256, 4, None, True, True, False, 2),
             (True, False, 384, 128, [0, 1, 1, 2], 3, 256, 3, None, True, True, False, 2),
             (True, False, 320, 320, [0, -1, 2, 2, 3], 2, 256, 4, None, True, False, False, 1),
             (False, False, 320, 2048, [0, -1, 2, 2, 3], 2, 256, 4, None, False, True, False, 2)]
    if only:
        cases = [c for c in cases if FOCUS[only](*c[9:])]
    for fp8, gated, w_rows, K, tiles, progs, bn, stages, tokens, scale_tma, store_tma, bias, stagger in cases:
        rec = dict(fp8=fp8, gated=gated, w_rows=w_rows, K=K, tiles=tiles, num_programs=progs, block_n=bn,
                   stages=stages, gather_from_tokens=tokens, scale_tma=scale_tma, store_tma=store_tma, bias=bias,
                   stagger=stagger)
        starting(rec)
        try:
            prob = Problem(fp8, gated, tiles, max(tiles) + 1, w_rows, K, gen, dev, tokens=tokens)
            prob.use_bias = bias
            prob.out[0].fill_(7.0)          # sentinel: a skipped tile's rows must keep it
            grouped_gemm_ws(*prob.args(), block_n=bn, stages=stages, num_programs=progs, a_rows=prob.a_rows,
                            scale_tma=scale_tma, store_tma=store_tma, stagger=stagger)
            if not cpu_smoke:
                torch.cuda.synchronize()
            used = [t for t, e in enumerate(tiles) if e >= 0]
            skipped = [t for t, e in enumerate(tiles) if e < 0]
            err = prob.rel_err(used)
            kept = all(bool((prob.out[0][t * 128:(t + 1) * 128].float() == 7.0).all()) for t in skipped)
            finished(rec, rel_err=err, skipped_kept=kept, ok=err <= 1e-2 and kept)
        except Exception as exc:
            traceback.print_exc(limit=3)
            finished(rec, ok=False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
    return records


def stage_time(tokens: int, budget_s: float, save, only: str | None = None) -> dict:
    import torch
    import triton
    import ws_probe
    from epmoe.kernels.ws_grouped_gemm import grouped_gemm_ws
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    start = time.time()
    out = dict(library=[], points=[])
    from epmoe.experts.triton_ws import TILE
    from epmoe.kernels.layout_copy import layout_tokens, rows_to_layout
    from epmoe.kernels.moe_align import align_pairs
    from epmoe.quant.fp8 import fp8_quantize
    for name, (L, H, I, k) in ws_probe.SHAPES.items():
        # a random top-k routing as the library side draws it (ws_probe.library_times -> KernelInputs),
        # in the layout the backend uses: tiles of 128, bound of tiles, padding per expert
        ids = torch.randn(tokens, L, generator=gen, device=dev).topk(k, dim=1).indices.to(torch.int32)
        aligned = align_pairs(ids, L, TILE)
        tile_expert = aligned.block_expert[:aligned.max_blocks].tolist()
        a_rows = layout_tokens(aligned, k)        # the token of each layout row, for the gathered form
        x = torch.randn(tokens, H, generator=gen, device=dev)
        # the backend's copy of the rows into the layout (reading the tokens saves it)
        for fmt in () if only else ("fp8_block", "bf16"):
            xs, ss = fp8_quantize(x, TILE) if fmt != "bf16" else (x.bfloat16(), None)
            ms = triton.testing.do_bench(lambda: rows_to_layout(xs, ss, aligned, k), warmup=20, rep=100,
                                         return_mode="median")
            out["points"].append(dict(shape=name, format=fmt, gemm="row copy", tokens=tokens,
                                      ms=ms, used_tiles=int((aligned.block_expert >= 0).sum())))
            print(json.dumps(out["points"][-1]), flush=True)
        for fmt in ("fp8_block", "bf16"):
            fp8 = fmt != "bf16"
            try:
                lib = ws_probe.library_times(name, L, H, I, k, tokens, fmt, dev, gen)
            except Exception as exc:
                lib = dict(error=f"{type(exc).__name__}: {exc}")
            lib.update(shape=name, format=fmt)
            out["library"].append(lib)
            print(json.dumps(lib), flush=True)
            # gate+up reads the tokens as the backend does (A rows by cp.async) and, beside it, rows already
            # in layout order (A by TMA); down reads the layout-ordered activation
            for gemm, w_rows, K, a_form in (("gate_up", 2 * I, H, "tokens"), ("gate_up", 2 * I, H, "layout"),
                                            ("down", H, I, "layout")):
                gather = a_form == "tokens"
                prob = Problem(fp8, gemm == "gate_up", tile_expert, L, w_rows, K, gen, dev,
                               a_std=1.0 if gemm == "gate_up" else 0.1, tokens=tokens if gather else None,
                               a_rows=a_rows if gather else None)
                for bn, stages, scale_tma, store_tma, bias, stagger in VARIANTS[(fmt, gemm)]:
                    if time.time() - start > budget_s:
                        break
                    if gather and (scale_tma or store_tma or bias or stagger):   # as the eighth pass timed it
                        continue
                    if only and (gather or not any(FOCUS[only](*v[2:]) for v in VARIANTS[(fmt, gemm)])):
                        continue                    # only the GEMMs with that form: it beside the plain ones
                    prob.use_bias = bias
                    point = dict(shape=name, format=fmt, gemm=gemm, a_rows_from=a_form, tokens=tokens, M=prob.M,
                                 w_rows=w_rows, K=K, block_n=bn, stages=stages, scale_tma=scale_tma,
                                 store_tma=store_tma, bias=bias, stagger=stagger,
                                 epilogue="silu + block FP8 quantization" if gemm == "gate_up" and fp8 else
                                 "silu" if gemm == "gate_up" else "plain")
                    try:
                        def run():
                            grouped_gemm_ws(*prob.args(), block_n=bn, stages=stages, a_rows=prob.a_rows,
                                            scale_tma=scale_tma, store_tma=store_tma, stagger=stagger)
                        run()
                        torch.cuda.synchronize()
                        used = [t for t, e in enumerate(tile_expert) if e >= 0]
                        point["rel_err"] = prob.rel_err([used[0], used[-1]])
                        ms = triton.testing.do_bench(run, warmup=50, rep=300, return_mode="median")
                        # on the routed rows (T * k), as the library side's rate: padding rows are not work
                        point.update(ms=ms, tflops=2.0 * tokens * k * K * w_rows / ms / 1e9)
                    except Exception as exc:
                        point["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
                        traceback.print_exc(limit=2)
                    out["points"].append(point)
                    print(json.dumps(point), flush=True)
                    save(out)
                del prob
                torch.cuda.empty_cache()
    return out


def _child(stage: str, args) -> dict:
    """Run one stage in a child process under a time limit; its JSON comes back through a file."""
    path = f"{args.output}.{stage}.part"
    cmd = [sys.executable, os.path.abspath(__file__), "--stage", stage, "--output", path,
           "--tokens", str(args.tokens), "--budget-s", str(args.budget_s)]
    cmd += ["--only", args.only] if args.only else []
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, timeout=args.stage_timeout_s if stage == "check" else args.budget_s + 60)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    result = dict(returncode=rc, seconds=round(time.time() - t0, 1))
    if os.path.exists(path):
        with open(path) as f:
            result.update(json.load(f))
        os.remove(path)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--budget-s", type=float, default=300.0, help="stop starting new timed variants after this long")
    p.add_argument("--stage-timeout-s", type=float, default=200.0,
                   help="limit of the check stage: about 20 kernels to compile and run; a hang ends it")
    p.add_argument("--only", choices=sorted(FOCUS),
                   help="time only the GEMMs that have this form (scale_tma: the A scales by TMA; store_tma: the "
                        "outputs through shared memory and TMA stores; stagger: the second math warpgroup started "
                        "behind the first), it beside the "
                        "plain forms (A in layout order, no row copies); the check stage runs only its cases")
    p.add_argument("--stage", choices=("check", "time"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--cpu-smoke", action="store_true",
                   help="the check stage's plumbing on the CPU, the kernel's PyTorch statement in its place")
    args = p.parse_args()
    if args.cpu_smoke:
        cases = stage_check(cpu_smoke=True)
        with open(args.output, "w") as f:
            json.dump(dict(cpu_smoke=True, cases=cases), f, indent=1)
        return 0 if all(c["ok"] for c in cases) else 1
    def save(res):     # after every point: a stage cut off by its limit keeps what it measured
        with open(args.output, "w") as f:
            json.dump(res, f, indent=1)

    if args.stage:
        if args.stage == "check":
            stage_check(save=lambda records: save(dict(cases=records)), only=args.only)
        else:
            stage_time(args.tokens, args.budget_s, save, args.only)
        return 0
    import torch
    import triton
    results = dict(gpu=torch.cuda.get_device_name(0), torch=torch.__version__, triton=triton.__version__,
                   date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   command=" ".join(sys.argv), commit=os.environ.get("EPMOE_COMMIT", "unknown"), tokens=args.tokens)
    results["check"] = _child("check", args)
    save(results)
    if results["check"].get("returncode") == "timeout":
        print("check stage timed out (a hang): no timing", flush=True)
        return 1
    results["time"] = _child("time", args)
    save(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
