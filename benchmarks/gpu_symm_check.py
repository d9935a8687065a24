"""The GPU-initiated dispatchers on two GPUs: correctness against the oracle, CUDA graphs, long runs, timing.

    python benchmarks/gpu_symm_check.py [--parts smoke,graph,soak,suite,timing]     # results under $OUT

Parts (each guarded, so one failure does not hide the others; a table sums up at the end):
  smoke_ht, smoke_ll: each symmetric-memory dispatcher with every experts backend the contract pairs it with, BF16
          and FP8 dispatch, T in {0, 1, uneven, skewed onto one expert, top_k above the rank count}, vs
          the float64 oracle; a peer that never arrives makes the waiting rank raise within its timeout.
  graph:  `symm_low_latency` + `batched` and `symm_high_throughput` (bounded) + `triton` captured in CUDA
          graphs at two T per rank, replayed with fresh inputs, every replay checked against the oracle and
          an eager forward.
  soak:   1000 forwards in a row, random T per rank, two layers (high throughput and low latency)
          alternating, every output checked.
  suite:  tests/test_ep_layer.py's multi-rank cases on NCCL, 2 GPUs: every EP dispatcher (triton experts
          behind symm_high_throughput only).
  timing: `epmoe bench dispatch` for alltoall, low_latency and both new dispatchers, BF16 and FP8 rows.
  variants: the high-throughput transfer kernels launched several ways (`HTLaunch`), BF16 and FP8 rows,
          dispatch and combine times, and a profile (time per kernel) of the default launch; the combine
          three ways: pull with the experts' output already in the batch's `out` (as the triton experts
          leave it), pull with the output handed over elsewhere (copied in first), and push
          (`combine_pull=False`: stores into the owners, then the summing pass), all bit for bit the same.
  layer:  `epmoe bench layer --ranks 2` (deepseek-v3, qwen3-30b-a3b) for alltoall and both new dispatchers,
          against one GPU doing both ranks' tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

OUT = os.environ.get("OUT", os.path.join(os.getcwd(), "out"))
HT, LL = "symm_high_throughput", "symm_low_latency"
TIMEOUT_S = 10.0          # generous: a peer may still be compiling a kernel the first time
MISSING_TIMEOUT_S = 3.0   # the missing-peer case, after everything is compiled


def _layer(cfg, dispatcher, experts, M=None, seed=0):
    from epmoe import MoELayer
    from epmoe.testing import load_experts, random_experts
    layer = MoELayer(cfg, ep_group=dist.group.WORLD, dispatcher=dispatcher, experts=experts,
                     device=torch.device("cuda", torch.cuda.current_device()), max_tokens_per_rank=M)
    layer.dispatcher.timeout_s = TIMEOUT_S
    weights = random_experts(cfg, seed=seed)
    load_experts(layer, weights)
    if cfg.quant is not None:     # what the layer holds: each weight quantized by the one formula, dequantized
        from epmoe.quant.fp8 import dequantize_weight, quantize_weight
        q = cfg.quant
        return layer, [tuple(dequantize_weight(*quantize_weight(w, q.weight_granularity, q.weight_block),
                                               q.weight_block) for w in e) for e in weights]
    return layer, [tuple(w.to(cfg.dtype).float() for w in e) for e in weights]


def _check(layer, weights, cfg, x, logits, what, routing=None):
    from epmoe import reference_moe
    from epmoe.testing import bound_for, compare
    out = layer(x, logits)
    assert out.shape == x.shape and out.dtype == cfg.dtype, f"{what}: {list(out.shape)} {out.dtype}"
    if x.shape[0] == 0:
        return 0.0
    fp8 = cfg.quant is not None
    ref = reference_moe(x.cpu(), logits.cpu(), weights, cfg, routing=routing)
    res = compare(out.cpu(), ref)
    bound = bound_for(cfg.dtype, fp8=fp8)
    if not (res.finite and res.rel_err <= bound):
        raise AssertionError(f"{what}: differs from the oracle beyond {bound:.0e}\n{res.report}")
    return res.rel_err


def _inputs(cfg, T, gen, device, skew=None):
    x = torch.randn(T, cfg.hidden_size, generator=gen).to(cfg.dtype)
    logits = torch.randn(T, cfg.num_experts, generator=gen) * 2
    if skew is not None:
        logits[:, skew] += 100.0
    return x.to(device), logits.to(device)


def smoke_worker(rank, ws, dispatchers):
    from epmoe import Fp8Config, MoEConfig, contract
    dev = torch.device("cuda", torch.cuda.current_device())
    gen = torch.Generator().manual_seed(10 + rank)
    results = {}
    cfgs = {"bf16": MoEConfig(num_experts=16, top_k=4, hidden_size=512, intermediate_size=256, dtype=torch.bfloat16),
            "bf16-H200-k3": MoEConfig(num_experts=5, top_k=3, hidden_size=200, intermediate_size=96,
                                      dtype=torch.bfloat16),
            "fp8-dispatch": MoEConfig(num_experts=16, top_k=4, hidden_size=512, intermediate_size=256,
                                      dtype=torch.bfloat16, quant=Fp8Config(weight_block=(128, 128), dispatch_fp8=True))}
    for d in dispatchers:
        for cname, cfg in cfgs.items():
            for x in contract.EXPERTS:
                if contract.pairing_problem(d, x, cfg, ws, "cuda") is not None:
                    continue
                name = f"{d}-{x}-{cname}"
                try:
                    layer, weights = _layer(cfg, d, x, M=24)
                    worst = 0.0
                    for T, skew in (([7, 3][rank], None), ([0, 5][rank], None), (1, None), ([24, 9][rank], 0),
                                    ([2, 0][rank], None), (24, None)):
                        xx, lg = _inputs(cfg, T, gen, dev, skew)
                        worst = max(worst, _check(layer, weights, cfg, xx, lg, f"{name} T={T}"))
                    results[name] = f"ok {worst:.2e}"
                except Exception as exc:
                    results[name] = f"FAIL {type(exc).__name__}: {exc}"[:2000]
                    traceback.print_exc()
                dist.barrier()
    # a peer that never arrives: rank 1 skips one forward, rank 0 must raise within its timeout
    cfg = cfgs["bf16"]
    for d, x in [(d, {HT: "grouped_mm", LL: "batched"}[d]) for d in dispatchers]:
        name = f"{d}-peer-missing"
        layer, weights = _layer(cfg, d, x, M=8)
        xx, lg = _inputs(cfg, 4, gen, dev)
        layer(xx, lg)                      # compiled and warm on both ranks
        torch.cuda.synchronize()
        dist.barrier()
        layer.dispatcher.timeout_s = MISSING_TIMEOUT_S
        try:
            if rank == 0:
                t0 = time.time()
                try:
                    layer(xx, lg)
                    torch.cuda.synchronize()
                    layer.dispatcher.check()
                    results[name] = "FAIL no error on the rank whose peer never came"
                except RuntimeError as exc:
                    took = time.time() - t0
                    ok = "timeout_s" in str(exc) and took < 3 * MISSING_TIMEOUT_S + 5
                    results[name] = (f"ok raised after {took:.1f} s" if ok else f"FAIL {took:.1f}s {exc}")[:500]
            else:
                results[name] = "ok (skipped the forward)"
        except Exception as exc:
            results[name] = f"FAIL {type(exc).__name__}: {exc}"[:2000]
        dist.barrier()
        break          # the group's workspace epochs now differ between ranks; one such case is enough
    return results


def graph_worker(rank, ws, dispatcher, experts):
    from epmoe import MoEConfig, reference_moe
    from epmoe.testing import capture, compare
    dev = torch.device("cuda", torch.cuda.current_device())
    cfg = MoEConfig(num_experts=32, top_k=4, hidden_size=1024, intermediate_size=512, dtype=torch.bfloat16)
    layer, weights = _layer(cfg, dispatcher, experts, M=48)
    gen = torch.Generator().manual_seed(100 + rank)
    graphs = []
    for T in ((48, 5), (31, 1))[rank]:
        x0, l0 = _inputs(cfg, T, gen, dev)
        replay, out = capture(lambda xs=x0, ls=l0: layer(xs, ls))
        graphs.append((T, replay, x0, l0, out))
    worst, diff, n = 0.0, 0.0, 0
    for i in range(8):
        for T, replay, xs, ls, out in graphs:
            x, lg = _inputs(cfg, T, gen, dev)
            xs.copy_(x)
            ls.copy_(lg)
            replay()
            torch.cuda.synchronize()
            got = out.clone()
            res = compare(got.cpu(), reference_moe(x.cpu(), lg.cpu(), weights, cfg))
            assert res.finite and res.rel_err <= 1e-2, f"replay {i} T={T}\n{res.report}"
            eager = layer(x, lg)
            worst, n = max(worst, res.rel_err), n + 1
            diff = max(diff, (eager.float() - got.float()).abs().max().item())
    layer.dispatcher.check()
    return {"replays": n, "worst_rel_err": worst, "max_abs_graph_vs_eager": diff}


def soak_worker(rank, ws, forwards):
    from epmoe import MoEConfig, reference_moe
    from epmoe.testing import compare
    dev = torch.device("cuda", torch.cuda.current_device())
    cfg = MoEConfig(num_experts=16, top_k=4, hidden_size=256, intermediate_size=128, dtype=torch.bfloat16)
    a, wa = _layer(cfg, HT, "triton", seed=1)
    b, wb = _layer(cfg, LL, "batched", M=40, seed=2)
    gen = torch.Generator().manual_seed(1000 + rank)
    worst, t0 = 0.0, time.time()
    for i in range(forwards):
        for layer, w in ((a, wa), (b, wb)):
            T = int(torch.randint(0, 41, (1,), generator=gen))
            x, lg = _inputs(cfg, T, gen, dev)
            out = layer(x, lg)
            if T:
                res = compare(out.cpu(), reference_moe(x.cpu(), lg.cpu(), w, cfg))
                assert res.finite and res.rel_err <= 1e-2, f"forward {i} T={T}\n{res.report}"
                worst = max(worst, res.rel_err)
    return {"forwards": 2 * forwards, "worst_rel_err": worst, "seconds": round(time.time() - t0, 1)}


VARIANTS = {   # name: HTLaunch fields that differ from the default
    "default": {}, "split2": dict(split=2), "split4": dict(split=4), "warps8": dict(warps=8),
    "qsplit2": dict(quant_split=2), "qsplit8": dict(quant_split=8), "qsplit4w8": dict(warps=8),
    "csplit4": dict(combine_split=4), "csplit16": dict(combine_split=16), "cwarps8": dict(combine_warps=8),
    "prequant": dict(quant_split=128),   # FP8: blocks of 64 columns, quantized before
    "pull_copy": {},                     # the experts' output handed over elsewhere: copied into `out` first
    "push": dict(combine_pull=False),    # the push combine: stores into the owners, then a summing pass
}


def variants_worker(rank, ws, T, names):
    """The high-throughput transfer kernels launched several ways (DeepSeek-V3 shape, T tokens per rank,
    bounded, CUDA graphs), BF16 and FP8 rows: dispatch and combine times, and one profiled eager forward
    per row format (time per kernel)."""
    from epmoe import Fp8Config, MoEConfig
    from epmoe.bench.dispatch import RankClock
    from epmoe.build import make_dispatcher
    from epmoe.dispatch.symm_high_throughput import HTLaunch
    from epmoe.routing import route
    dev = torch.device("cuda", torch.cuda.current_device())
    clock = RankClock(dev, dist.group.WORLD)
    out = {}
    for tag, quant in (("bf16", None), ("fp8", Fp8Config(weight_block=(128, 128), dispatch_fp8=True))):
        cfg = MoEConfig(num_experts=256, top_k=8, hidden_size=7168, intermediate_size=128, dtype=torch.bfloat16,
                        quant=quant)
        d = make_dispatcher(HT, cfg, group=dist.group.WORLD, device=dev, max_tokens_per_rank=T)
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(T, 7168, generator=g).to(torch.bfloat16).to(dev)
        routing = route(torch.randn(T, 256, generator=g).to(dev), cfg)
        batch, h = d.dispatch(x, routing)
        y = torch.randn(batch.x.shape, generator=g).to(torch.bfloat16).to(dev)
        ref = d.combine(y, h).clone()
        for name in names:
            d.launch = HTLaunch(**VARIANTS[name])
            in_place = d.launch.combine_pull and name != "pull_copy"
            try:
                b2, h2 = d.dispatch(x, routing)
                same = bool(torch.equal(b2.x.view(torch.uint8), batch.x.view(torch.uint8))
                            and torch.equal(d.combine(y, h2), ref))
                for _ in range(2):       # both slots: y where the batch says (experts that write in place)
                    b2, h2 = d.dispatch(x, routing)
                    same = same and bool(torch.equal(d.combine(b2.out.copy_(y) if in_place else y, h2), ref))

                def experts_out(bh):
                    return bh[0].out if in_place else y
                a, b, _ = clock.time_split(lambda: d.dispatch(x, routing), lambda bh: d.combine(experts_out(bh), bh[1]),
                                           10, 3, True)
                out[f"{tag}/{name}"] = {"dispatch_us": round(a["median_ms"] * 1e3, 1),
                                        "combine_us": round(b["median_ms"] * 1e3, 1), "same_result": same,
                                        "method": a["method"]}
            except Exception as exc:
                out[f"{tag}/{name}"] = f"FAIL {type(exc).__name__}: {exc}"[:500]
            dist.barrier()
        d.launch = HTLaunch()
        from torch.profiler import ProfilerActivity, profile
        for _ in range(2):
            d.combine(y, d.dispatch(x, routing)[1])
        torch.cuda.synchronize()
        dist.barrier()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                d.combine(y, d.dispatch(x, routing)[1])
            torch.cuda.synchronize()
        if rank == 0:
            out[f"{tag}/profile"] = prof.key_averages().table(sort_by="cuda_time_total", row_limit=14,
                                                              max_name_column_width=50)
        dist.barrier()
    return out


def part_variants(T):
    from epmoe.testing import run_on_ranks
    res = run_on_ranks(variants_worker, 2, T, list(VARIANTS), backend="nccl", timeout_s=200)
    for r in res:
        for k in [k for k in r if k.endswith("/profile")]:
            with open(os.path.join(OUT, f"profile_{k.split('/')[0]}.txt"), "w") as f:
                f.write(r.pop(k))
    return {k: [r.get(k) for r in res] for k in res[0]}


def part_smoke(dispatcher):
    from epmoe.testing import run_on_ranks
    res = run_on_ranks(smoke_worker, 2, (dispatcher,), backend="nccl", timeout_s=200)
    names = sorted(set(res[0]) | set(res[1]))
    return {n: [r.get(n, "missing") for r in res] for n in names}


def part_graph():
    from epmoe.testing import run_on_ranks
    return {f"{d}+{x}": run_on_ranks(graph_worker, 2, d, x, backend="nccl", timeout_s=150)
            for d, x in ((LL, "batched"), (HT, "triton"))}


def part_layer(extra):
    from epmoe.bench import layer as bench
    parser = argparse.ArgumentParser()
    bench.configure_parser(parser)
    path = os.path.join(OUT, "layer_2x.json")
    argv = ["--ranks", "2", "--output", path, "--dispatchers", f"alltoall,{HT},{LL}"] + extra
    rc = bench.main(parser.parse_args(argv))
    with open(path) as f:
        rows = json.load(f)["rows"]
    keep = ("preset", "format", "dispatcher", "experts", "tokens_per_rank", "kind", "skipped", "error")
    return {"rc": rc, "rows": [dict({k: r[k] for k in keep if k in r},
                                    step_ms=r.get("timing", {}).get("step_ms", r.get("step_ms")),
                                    speedup=r.get("speedup_vs_local")) for r in rows]}


def part_soak(forwards):
    from epmoe.testing import run_on_ranks
    return run_on_ranks(soak_worker, 2, forwards, backend="nccl", timeout_s=400)


def part_suite():
    """tests/test_ep_layer.py's multi-rank cases on NCCL: every EP dispatcher; `triton` experts only
    behind the high-throughput dispatcher (its kernels compile once per shape, and have their own tests)."""
    import test_ep_layer
    from epmoe.testing import run_on_ranks
    cases = [c for c in test_ep_layer.all_cases(2, "cuda")
             if c.get("experts") != "triton" or c.get("dispatcher") == HT]
    res = run_on_ranks(test_ep_layer.run_cases, 2, cases, "cuda", backend="nccl", timeout_s=500)
    return {c["name"]: [str(r.get(c["name"], "missing"))[:300] for r in res] for c in cases}


def part_timing(extra):
    from epmoe.bench import dispatch as bench
    rows = {}
    for tag, flags in (("bf16", []), ("fp8", ["--fp8"])):
        parser = argparse.ArgumentParser()
        bench.configure_parser(parser)
        path = os.path.join(OUT, f"dispatch_{tag}.json")
        argv = ["--ranks", "2", "--output", path, "--dispatchers", f"alltoall,low_latency,{HT},{LL}"] + flags + extra
        bench.main(parser.parse_args(argv))
        with open(path) as f:
            rows[tag] = json.load(f)["rows"]
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="smoke_ht,smoke_ll,graph,soak,suite,timing")
    ap.add_argument("--forwards", type=int, default=500, help="soak: forwards per layer (default %(default)s)")
    ap.add_argument("--variant-tokens", type=int, default=4096, help="variants: tokens per rank (default %(default)s)")
    ap.add_argument("--timing-args", default="", help="extra arguments for epmoe bench dispatch")
    ap.add_argument("--layer-args", default="", help="extra arguments for epmoe bench layer")
    args = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    steps = {"smoke_ht": lambda: part_smoke(HT), "smoke_ll": lambda: part_smoke(LL), "graph": part_graph, "soak": lambda: part_soak(args.forwards),
             "suite": part_suite, "timing": lambda: part_timing(args.timing_args.split()),
             "layer": lambda: part_layer(args.layer_args.split()), "variants": lambda: part_variants(args.variant_tokens)}
    from epmoe.bench.run_env import environment
    summary = {"environment": environment("nccl", 2)}
    for name in args.parts.split(","):
        print(f"\n===== {name} =====", flush=True)
        t0 = time.time()
        try:
            summary[name] = {"result": steps[name](), "seconds": round(time.time() - t0, 1)}
        except Exception as exc:
            summary[name] = {"error": f"{type(exc).__name__}: {exc}"[-6000:], "seconds": round(time.time() - t0, 1)}
        print(json.dumps(summary[name], indent=1, default=str)[-5000:], flush=True)
        with open(os.path.join(OUT, "gpu_symm_check.json"), "w") as f:
            json.dump(summary, f, indent=1, default=str)
    print("\n===== summary =====")
    for name in args.parts.split(","):
        v = summary.get(name, {})
        if "error" in v:
            print(f"{name}: ERROR {v['error'][:400]}")
        elif name in ("smoke_ht", "smoke_ll", "suite"):
            bad = {n: r for n, r in v["result"].items() if not all(str(s).startswith("ok") for s in r)}
            print(f"{name}: {len(v['result']) - len(bad)}/{len(v['result'])} ok ({v['seconds']} s)")
            for n, r in bad.items():
                print(f"  FAILED {n}: {str(r[0])[:300]} | {str(r[-1])[:300]}")
        else:
            print(f"{name}: ok ({v.get('seconds')} s) {json.dumps(v.get('result'), default=str)[:600]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
