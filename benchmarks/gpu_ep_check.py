"""Expert parallelism on two GPUs with NCCL: correctness, CUDA-graph replay, dispatch timing.

    python benchmarks/gpu_ep_check.py            # results under $OUT (default ./out)

Parts (each in its own try/except, so one failure does not hide the others; a final table sums up):
  1. correctness: the whole multi-rank suite of tests/test_ep_layer.py (every EP dispatcher x every experts
     backend the contract accepts on CUDA, uneven counts with zeros, T = 1, skewed routing, top_k below
     and above the rank count, E not divisible, explicit placement, many forwards, the low_latency
     capacity edge and overflow error on every rank, the handshake, the traffic counts) with NCCL on 2 GPUs;
  2. graph: `low_latency` + every CUDA-graph-safe batched experts backend captured in a CUDA graph per
     rank (different T per rank, two graphs of different T each), replayed with fresh inputs and routing
     each time; every replay checked against the float64 oracle and against an eager forward;
  3. timing: `epmoe bench dispatch` (dispatch + combine per dispatcher at T = 128 and 4096 per rank,
     H = 7168, top-8 of E = 256, BF16, vs NCCL all_to_all_single moving the same bytes); the JSON goes
     to $OUT and to benchmarks/results/.
Writes $OUT/gpu_ep_check.json (everything) and prints the table.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
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


# ------------------------------------------------------------------------------- part 2: CUDA graph
GRAPH_SHAPE = dict(num_experts=32, top_k=4, hidden_size=1024, intermediate_size=512)
GRAPH_M = 48
GRAPH_T = {0: (48, 5), 1: (31, 1)}          # tokens per rank for the two graphs (rank 0 at the capacity)
GRAPH_REPLAYS = 6


def graph_worker(rank: int, ws: int, experts_name: str, dry: bool = False) -> dict:
    from epmoe import MoEConfig, MoELayer, reference_moe
    from epmoe.testing import capture, compare, load_experts, random_experts

    device = torch.device("cpu") if dry else torch.device("cuda", torch.cuda.current_device())
    cfg = MoEConfig(**GRAPH_SHAPE, dtype=torch.bfloat16)
    layer = MoELayer(cfg, ep_group=dist.group.WORLD, dispatcher="low_latency", experts=experts_name,
                     device=device, max_tokens_per_rank=GRAPH_M)
    weights = random_experts(cfg, seed=1)
    load_experts(layer, weights)
    weights = [tuple(w.to(cfg.dtype).float() for w in e) for e in weights]   # as the layer stores them
    gen = torch.Generator().manual_seed(100 + rank)

    def fresh(T):
        x = torch.randn(T, cfg.hidden_size, generator=gen).to(cfg.dtype)
        logits = torch.randn(T, cfg.num_experts, generator=gen) * 2
        return x, logits

    graphs = []
    for T in GRAPH_T.get(rank, (GRAPH_M, 1)):
        x0, l0 = fresh(T)
        x_static, l_static = x0.to(device), l0.to(device)
        replay, out_static = capture(lambda xs=x_static, ls=l_static: layer(xs, ls), "cpu" if dry else None)
        graphs.append((T, replay, x_static, l_static, out_static))

    worst_oracle, worst_eager, replays = 0.0, 0.0, 0
    for i in range(GRAPH_REPLAYS):
        for T, replay, x_static, l_static, out_static in graphs:
            x, logits = fresh(T)
            x_static.copy_(x)
            l_static.copy_(logits)
            replay()
            if not dry:
                torch.cuda.synchronize()
            got = out_static.clone()
            ref = reference_moe(x, logits, weights, cfg)
            res = compare(got, ref)
            if not (res.finite and res.rel_err <= 1e-2):
                raise AssertionError(f"replay {i} T={T}: differs from the oracle\n{res.report}")
            eager = layer(x.to(device), logits.to(device))
            worst_oracle = max(worst_oracle, res.rel_err)
            worst_eager = max(worst_eager, (eager.float() - got.float()).abs().max().item())
            replays += 1
    return {"rank": rank, "experts": experts_name, "graphs_T": [t for t, *_ in graphs], "replays": replays,
            "worst_rel_err_vs_oracle": worst_oracle, "max_abs_diff_vs_eager": worst_eager}


def part_graph(dry: bool = False) -> dict:
    from epmoe import MoEConfig, contract
    from epmoe.testing import run_on_ranks
    cfg = MoEConfig(**GRAPH_SHAPE)
    names = [x for x in contract.EXPERTS
             if contract.pairing_problem("low_latency", x, cfg, 2, "cpu" if dry else "cuda") is None
             and contract.graph_safe("low_latency", x)]
    if not names:
        raise RuntimeError("no CUDA-graph-safe experts backend takes the batched layout")
    out = {}
    for name in names:
        try:
            out[name] = {"ok": True, "ranks": run_on_ranks(graph_worker, 2, name, dry,
                                                           backend="gloo" if dry else "nccl", timeout_s=300)}
        except Exception as exc:
            out[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    return out


# ------------------------------------------------------------------------------------------ helpers
def part_correctness(dry: bool = False, skip_experts: tuple = ()) -> dict:
    import test_ep_layer

    from epmoe.testing import run_on_ranks
    device_type = "cpu" if dry else "cuda"
    cases = [c for c in test_ep_layer.all_cases(2, device_type) if c.get("experts") not in skip_experts]
    results = run_on_ranks(test_ep_layer.run_cases, 2, cases, device_type, backend="gloo" if dry else "nccl",
                           timeout_s=840)
    table = {}
    for c in cases:
        per_rank = [str(r.get(c["name"], "missing")) for r in results]
        table[c["name"]] = {"ok": all(v.startswith("ok") for v in per_rank), "ranks": per_rank}
    return table


def part_timing(dry: bool = False) -> dict:
    from epmoe.bench import dispatch as bench
    parser = argparse.ArgumentParser()
    bench.configure_parser(parser)
    path = os.path.join(OUT, "dispatch_bench.json")
    argv = ["--ranks", "2", "--output", path]
    if dry:     # plumbing only: tiny shapes on Gloo, nothing copied to benchmarks/results/
        argv += ["--comm", "gloo", "--hidden", "256", "--experts", "16", "--top-k", "4", "--tokens", "8,32",
                 "--reps", "2", "--warmup", "1"]
    rc = bench.main(parser.parse_args(argv))
    with open(path) as f:
        report = json.load(f)
    report["rc"] = rc
    if dry:
        report["copied_to"] = path
        return report
    dest = os.path.join(ROOT, "benchmarks", "results", os.path.basename(bench.default_output("dispatch", report["environment"])))
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    shutil.copy(path, dest)
    report["copied_to"] = dest
    return report


def _run(name: str, fn, summary: dict) -> None:
    print(f"\n===== {name} =====", flush=True)
    t0 = time.time()
    try:
        summary[name] = {"result": fn(), "seconds": round(time.time() - t0, 1)}
    except Exception as exc:
        summary[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(),
                         "seconds": round(time.time() - t0, 1)}
        print(summary[name]["traceback"], flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="exercise the script on 2 Gloo CPU ranks (eager 'replays', tiny timing, no results kept)")
    ap.add_argument("--parts", default="correctness,graph,timing",
                    help="which parts to run, in this order (default: %(default)s)")
    ap.add_argument("--skip-experts", default="",
                    help="experts backends to leave out of the correctness part, comma-separated (e.g. triton, "
                    "whose kernels compile once per test shape and are checked by their own GPU tests)")
    args = ap.parse_args()
    dry = args.cpu_dry_run
    parts = [p for p in args.parts.split(",") if p]
    unknown = set(parts) - {"correctness", "graph", "timing"}
    if unknown:
        ap.error(f"unknown parts {sorted(unknown)}")
    skip = tuple(x for x in args.skip_experts.split(",") if x)
    os.makedirs(OUT, exist_ok=True)
    summary: dict = {"environment": {"torch": torch.__version__, "cuda": torch.version.cuda,
                                     "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}}
    try:
        v = torch.cuda.nccl.version()
        summary["environment"]["nccl"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    except Exception as exc:   # older torch or no NCCL: record why instead of a version
        summary["environment"]["nccl"] = f"unknown ({type(exc).__name__})"
    print(json.dumps(summary["environment"]), flush=True)
    if torch.cuda.device_count() < 2 and not dry:
        print("needs 2 CUDA GPUs (or --cpu-dry-run)", flush=True)
        return 2
    steps = {"correctness": lambda: part_correctness(dry, skip), "graph": lambda: part_graph(dry),
             "timing": lambda: part_timing(dry)}
    summary["skipped_experts_in_correctness"] = list(skip)
    for name in parts:
        _run(name, steps[name], summary)
        with open(os.path.join(OUT, "gpu_ep_check.json"), "w") as f:   # after each part: a timeout keeps the rest
            json.dump(summary, f, indent=1, default=str)

    print("\n===== summary =====")
    ok_all = True
    corr = summary.get("correctness")
    if corr is None:
        print("correctness: not run (--parts)")
    elif "error" in corr:
        print(f"correctness: ERROR {corr['error'][:300]}")
        ok_all = False
    else:
        table = corr["result"]
        bad = [n for n, v in table.items() if not v["ok"]]
        print(f"correctness: {len(table) - len(bad)}/{len(table)} cases ok ({corr['seconds']} s)")
        for n in bad:
            print(f"  FAILED {n}: {table[n]['ranks'][0].splitlines()[0][:200]} | "
                  f"{table[n]['ranks'][-1].splitlines()[0][:200]}")
        ok_all &= not bad
    gr = summary.get("graph")
    if gr is None:
        print("graph: not run (--parts)")
    elif "error" in gr:
        print(f"graph: ERROR {gr['error'][:300]}")
        ok_all = False
    else:
        for name, v in gr["result"].items():
            if v["ok"]:
                r = v["ranks"]
                print(f"graph low_latency+{name}: ok, {sum(x['replays'] for x in r)} replays, worst rel err "
                      f"{max(x['worst_rel_err_vs_oracle'] for x in r):.2e}, max |graph - eager| "
                      f"{max(x['max_abs_diff_vs_eager'] for x in r):.2e}")
            else:
                print(f"graph low_latency+{name}: FAILED {v['error'][:300]}")
                ok_all = False
    tm = summary.get("timing")
    if tm is None:
        print("timing: not run (--parts)")
    elif "error" in tm:
        print(f"timing: ERROR {tm['error'][:300]}")
        ok_all = False
    else:
        from epmoe.bench.dispatch import _print_table
        _print_table(tm["result"]["rows"])
        print(f"timing JSON: {tm['result']['copied_to']}")
    print(f"\nall parts ok: {ok_all}; details in {os.path.join(OUT, 'gpu_ep_check.json')}")
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
