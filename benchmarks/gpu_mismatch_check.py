"""Ranks calling different EP layers in one step, on 2 GPUs with NCCL: every rank must raise `RankMismatch`
(not a timeout, not a hang) within the deadline, naming what differs, and the next aligned forward must
match `reference_moe`.

    PYTHONPATH=. python3 benchmarks/gpu_mismatch_check.py --out DIR

Cases: every case of tests/test_ep_mismatch.py (CASES, SKIPS; imported, not copied), then the
symmetric-memory ones: a symm layer's first forward (its kernels not yet compiled; its workspace was
allocated when the layer was built) against a collective layer; HT vs LL; HT vs HT with another hidden size / capacity / expert count; each symm kind against each
collective kind, in both orders; a skipped forward on each symm kind. Symm layers get timeout_s = 5, so a
failure shows as a timeout error quickly, never a hang; the whole run is bounded (--timeout).

`--parts recovery` (part of the default run): on each symm kind (HT with and without a capacity, LL), a
live peer's timeout -- rank 1 skips a forward rank 0 runs; rank 1 enters a forward after rank 0 gave it
up (it must raise RankMismatch at once) -- each followed by `layer.resync()` on both ranks, and an
exception inside rank 0's experts (no resync); after each, two aligned forwards (both workspace slots)
must match `reference_moe` on both ranks.

Writes DIR/mismatch.json and DIR/mismatch.txt (and DIR/progress.rank<r>.jsonl as it goes, so a run that
is killed still says how far it got).
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

SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
for _k, _v in SAFE_ENV.items():          # before torch is imported; the spawned ranks inherit them
    os.environ[_k] = _v

HT, LL = "symm_high_throughput", "symm_low_latency"
COLLECTIVE = ["allgather", "alltoall", "low_latency"]
WARMUP_TIMEOUT_S = 60.0    # the first forwards compile the kernels; a peer may wait that long once

# (case, layer on even ranks, layer on odd ranks, what every rank's error must name)
SYMM_CASES = (
    [("symm HT vs LL", (HT, {}), (LL, {}), "same layer's same forward"),
     ("symm HT hidden sizes", (HT, {}), (HT, {"hidden_size": 40}), "same layer's same forward"),
     ("symm HT capacities", (HT, {}), (HT, {"M": 12}), "same layer's same forward"),
     ("symm HT expert counts", (HT, {}), (HT, {"num_experts": 12}), "same layer's same forward"),
     ("symm LL hidden sizes", (LL, {}), (LL, {"hidden_size": 40}), "same layer's same forward")]
    + [(f"{s} vs {c}", (s, {}), (c, {}), "dispatcher differs") for s in (HT, LL) for c in COLLECTIVE]
    + [(f"{c} vs {s}", (c, {}), (s, {}), "dispatcher differs") for s in (HT, LL) for c in COLLECTIVE])
SYMM_SKIPS = [HT, LL]
PARTS = ("mismatch", "recovery")
# recovery: (name, layer); the rank that errs, what each rank must raise
RECOVERY_KINDS = [("HT bounded", (HT, {})), ("HT unbounded", (HT, {"M": None})), ("LL", (LL, {}))]


def _recovery(rank, record_row):
    """The recovery cases (module docstring): `record_row(case, raised type name or None, error text,
    seconds, expected type name or None, aligned)` for each."""
    import torch
    import torch.distributed as dist
    import test_ep_mismatch as tm
    from epmoe.testing import random_inputs

    def meet():          # every rank here before any goes on (orders "late" after the peer gave up)
        t = torch.zeros(1, device="cuda")
        dist.all_reduce(t)
        torch.cuda.synchronize()

    def attempt(fn):
        t0 = time.monotonic()
        try:
            fn()
            return None, None, time.monotonic() - t0
        except Exception as exc:  # noqa: BLE001 - recorded, judged by the verdict
            return type(exc).__name__, str(exc)[:1500], time.monotonic() - t0

    def aligned(layer, weights):
        try:
            for _ in range(2):                               # both slots of the workspace
                tm._aligned_forwards_are_correct(rank, [(layer, weights)])
            return "ok"
        except Exception as exc:  # noqa: BLE001
            return f"{type(exc).__name__}: {exc}"[:2000]

    for name, spec in RECOVERY_KINDS:
        layer, weights = tm._build(spec, seed=5)
        layer.dispatcher.timeout_s = WARMUP_TIMEOUT_S          # compile on both ranks first
        tm._aligned_forwards_are_correct(rank, [(layer, weights)])
        layer.dispatcher.timeout_s = tm.SYMM_TIMEOUT_S
        x, logits = random_inputs(layer.cfg, 3 + rank, seed=rank, device=layer.device)

        # rank 1 skips a forward that rank 0 runs: rank 0 times out
        got = attempt(lambda: layer(x, logits)) if rank == 0 else (None, None, 0.0)
        meet()
        layer.resync()
        record_row(f"{name}: a peer skipped a forward, resync", *got, "RuntimeError" if rank == 0 else None,
                   aligned(layer, weights))

        # rank 1 enters the forward after rank 0 gave it up: a timeout there, RankMismatch at once here
        if rank == 0:
            got = attempt(lambda: layer(x, logits))
            meet()
        else:
            meet()
            got = attempt(lambda: layer(x, logits))
        layer.resync()
        record_row(f"{name}: a peer came late, resync", *got, "RuntimeError" if rank == 0 else "RankMismatch",
                   aligned(layer, weights))

        # an exception inside rank 0's experts: it raises, rank 1 gets NaN where rank 0 owed rows; no resync
        if rank == 0:
            real = layer.experts

            def failing(*args, **kw):
                layer.experts = real
                raise RuntimeError("experts failed on purpose")
            layer.experts = failing
        got = attempt(lambda: layer(x, logits))
        record_row(f"{name}: rank 0's experts raised", *got, "RuntimeError" if rank == 0 else None,
                   aligned(layer, weights))


def _recovery_verdict(reports):
    """PASS when every rank raised what it must (or nothing), and the aligned forwards were right."""
    import test_ep_mismatch as tm
    out = []
    for case in [c for c in reports[0] if c.startswith("recovery: ")]:
        rows = [rep.get(case, {}) for rep in reports]
        problems = [f"rank {r}: raised {row.get('raised')}, expected {row.get('expected')}: "
                    f"{(row.get('error') or '')[:300]}" for r, row in enumerate(rows)
                    if row.get("raised") != row.get("expected")]
        problems += [f"rank {r}: next aligned forwards: {str(row.get('aligned'))[:300]}"
                     for r, row in enumerate(rows) if row.get("aligned") != "ok"]
        if case.endswith("came late, resync") and rows[1].get("seconds", 0) >= tm.DEADLINE_S:
            problems.append(f"rank 1: the late forward raised after {rows[1]['seconds']} s, not at once")
        out.append({"case": case, "pass": not problems, "problems": problems,
                    "seconds": [row.get("seconds") for row in rows],
                    "errors": [(row.get("error") or "")[:500] for row in rows]})
    return out


def _worker(rank, world, out_dir, parts=PARTS):
    import torch
    import test_ep_mismatch as tm
    from epmoe import RankMismatch

    log_path = os.path.join(out_dir, f"progress.rank{rank}.jsonl")
    results = {}

    def record(case, expected, fn):
        row = {"case": case, "expected": expected}
        try:
            error, seconds = fn()
            row.update(error=error, seconds=round(seconds, 3), raised="RankMismatch" if error else None)
        except RankMismatch as exc:      # raised outside the step (should not happen)
            row.update(error=str(exc), seconds=None, raised="RankMismatch (outside the step)")
        except Exception as exc:         # a timeout or anything else: the case fails
            row.update(error=f"{type(exc).__name__}: {exc}", seconds=None, raised=type(exc).__name__)
        results[case] = row
        with open(log_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        return row

    def aligned(case, layers):
        try:
            tm._aligned_forwards_are_correct(rank, layers)
            results[case]["aligned"] = "ok"
        except Exception as exc:
            results[case]["aligned"] = f"{type(exc).__name__}: {exc}"[:2000]
        with open(log_path, "a") as f:
            f.write(json.dumps({"case": case, "aligned": results[case]["aligned"]}) + "\n")

    def one(case, even, odd, expected, deadline=tm.DEADLINE_S):
        layers = [tm._build(even, seed=1), tm._build(odd, seed=2)]
        row = record(case, expected, lambda: tm._run_step(rank, layers, [rank % 2]))
        row["deadline_s"] = deadline
        aligned(case, layers)

    def skipped(case, dispatcher):
        layers = [tm._build((dispatcher, {}), seed=3), tm._build((dispatcher, {}), seed=4)]
        record(case, "same layer's same forward", lambda: tm._run_step(rank, layers, [1] if rank % 2 else [0, 1]))
        results[case]["deadline_s"] = tm.DEADLINE_S
        aligned(case, layers)

    if "recovery" in parts:
        def record_row(case, raised, error, seconds, expected, aligned_result):
            row = {"case": f"recovery: {case}", "raised": raised, "error": error,
                   "seconds": round(seconds, 3), "expected": expected, "aligned": aligned_result}
            results[row["case"]] = row
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        _recovery(rank, record_row)
    if "mismatch" not in parts:
        torch.cuda.synchronize()
        return results
    # 1. before any symmetric-memory forward: the symm rank's first forward compiles its kernels
    one("symm LL first forward vs alltoall", (LL, {}), ("alltoall", {}), "dispatcher differs", deadline=30.0)
    # 2. the test file's cases on NCCL
    for case, even, odd, expected in tm.CASES:
        one(case, even, odd, expected)
    for d in tm.SKIPS:
        skipped(f"{d} skipped forward", d)
    # 3. compile the symm kernels of every layer used below, on both ranks, with a generous timeout
    t0 = time.monotonic()
    specs = {repr(s): s for _, a, b, _ in SYMM_CASES for s in (a, b) if s[0] in (HT, LL)}
    for spec in specs.values():
        layer, weights = tm._build(spec, seed=0)
        layer.dispatcher.timeout_s = WARMUP_TIMEOUT_S
        tm._aligned_forwards_are_correct(rank, [(layer, weights)])
    warm = tm._build(("alltoall", {}), seed=0)      # a collective forward with the workspace present: marks
    tm._aligned_forwards_are_correct(rank, [warm])
    results["_warmup_s"] = round(time.monotonic() - t0, 1)
    # 4. the symm cases
    for case, even, odd, expected in SYMM_CASES:
        one(case, even, odd, expected)
    for d in SYMM_SKIPS:
        skipped(f"{d} skipped forward", d)
    torch.cuda.synchronize()
    return results


def _verdict(reports):
    """Per case: PASS if every rank raised RankMismatch naming the expected text (and the common words),
    within the deadline, and the aligned forwards were correct on every rank."""
    cases = [c for c in reports[0] if not c.startswith("_") and not c.startswith("recovery: ")]
    out = []
    for case in cases:
        rows = [rep.get(case, {}) for rep in reports]
        problems = []
        for r, row in enumerate(rows):
            err = row.get("error")
            if row.get("raised") != "RankMismatch":
                problems.append(f"rank {r}: {row.get('raised') or 'no error'} ({(err or '')[:300]})")
            elif row["expected"] not in err or "same layer's same forward" not in err:
                problems.append(f"rank {r}: the error does not name {row['expected']!r}: {err[:300]}")
            elif row.get("seconds") is None or row["seconds"] >= row.get("deadline_s", 5.0):
                problems.append(f"rank {r}: raised after {row.get('seconds')} s")
            if row.get("aligned") != "ok":
                problems.append(f"rank {r}: next aligned forward: {str(row.get('aligned'))[:300]}")
        out.append({"case": case, "pass": not problems, "problems": problems,
                    "seconds": [row.get("seconds") for row in rows],
                    "errors": [(row.get("error") or "")[:500] for row in rows]})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", os.path.join(os.getcwd(), "out")),
                    help="directory for mismatch.json, mismatch.txt and the per-rank progress logs")
    ap.add_argument("--timeout", type=float, default=300.0,
                    help="seconds for the whole run before the ranks are killed (default 300)")
    ap.add_argument("--parts", default=",".join(PARTS),
                    help=f"comma-separated parts to run, of {', '.join(PARTS)} (default: all)")
    args = ap.parse_args(argv)
    parts = tuple(p for p in args.parts.split(",") if p)
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        ap.error(f"--parts: unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
    os.makedirs(args.out, exist_ok=True)

    import torch
    from epmoe.bench.run_env import provenance
    from epmoe.testing import run_on_ranks
    from epmoe.version import __version__
    summary = {"torch": torch.__version__, "epmoe": __version__, "env": SAFE_ENV, "gpus": torch.cuda.device_count(),
               "parts": list(parts), "provenance": provenance()}
    try:
        import triton
        summary["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        summary["triton"] = None
    start = time.monotonic()
    if torch.cuda.device_count() < 2:
        summary.update(status="skipped", reason=f"needs 2 CUDA GPUs, found {torch.cuda.device_count()}")
        verdicts = []
    else:
        try:
            reports = run_on_ranks(_worker, 2, args.out, parts, backend="nccl", timeout_s=args.timeout,
                                   grace_s=10.0)
            verdicts = _verdict(reports) + _recovery_verdict(reports)
            summary["warmup_s"] = [rep.get("_warmup_s") for rep in reports]
            summary["status"] = "pass" if all(v["pass"] for v in verdicts) else "fail"
        except Exception as exc:  # noqa: BLE001 - a hang (killed) or a crash: the progress logs say where
            summary.update(status="error", error=f"{type(exc).__name__}: {exc}"[:6000], trace=traceback.format_exc())
            verdicts = []
    summary["seconds"] = round(time.monotonic() - start, 1)
    summary["cases"] = verdicts
    with open(os.path.join(args.out, "mismatch.json"), "w") as f:
        json.dump(summary, f, indent=1)
    lines = [f"gpu_mismatch_check: {summary['status']} in {summary['seconds']} s "
             f"(torch {summary['torch']}, triton {summary['triton']}, {summary['gpus']} GPUs)"]
    for v in verdicts:
        lines.append(f"{'PASS' if v['pass'] else 'FAIL'}  {v['case']:<55} seconds {v['seconds']}")
        lines += [f"      {p}" for p in v["problems"]]
    if summary.get("error"):
        lines.append(summary["error"])
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "mismatch.txt"), "w") as f:
        f.write(text)
    print(text)
    return 0 if summary["status"] in ("pass", "skipped") else 1


if __name__ == "__main__":
    sys.exit(main())
