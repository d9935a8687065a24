"""Expert-parallel load balancing in `epmoe bench layer`: the flags, each rank's load under the layer's
placement (replicas included), and the before / after summary of the rows measured around a rebalance.

`python -m epmoe.bench.eplb SKEWED.json BALANCED.json` sets the step times of an EPLB run (`--routing skewed
--redundant-experts R`: before and after the rebalance) beside those of the same configurations under
balanced routing from another `bench layer` run: after / balanced is what the rebalance leaves of the skew's cost."""
from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.distributed as dist

from ..balance import max_over_mean
from ..usage import UsageError, add_redundant_experts_flag


def add_flags(p) -> None:
    add_redundant_experts_flag(p, "EPLB: build the EP layers with R redundant experts, time them, rebalance from the "
                               "measured load and time them again (a row each, max/mean rank load printed)")


def params(args) -> dict:
    if args.redundant_experts is not None and args.redundant_experts < 0:
        raise UsageError(f"--redundant-experts must be >= 0, got {args.redundant_experts}")
    return {"redundant_experts": args.redundant_experts}


def rank_pairs(layer, routing, group) -> torch.Tensor:
    """(token, slot) pairs each of this rank's physical slots gets from the group's tokens: [L] int64.
    `routing` is this rank's (logical ids); the layer's rule maps them to slots as its forward does."""
    ids = layer.expert_map.to_physical(routing.topk_ids).reshape(-1).long()
    counts = torch.zeros(layer.expert_map.num_slots, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(0, ids, torch.ones_like(ids))
    if group is not None:
        dist.all_reduce(counts, group=group)
    return counts[torch.tensor(layer.placement.local_experts, device=counts.device)]


def print_summary(rows: list[dict]) -> None:
    """Max/mean rank load and step time of each configuration before and after its rebalance."""
    done = [r for r in rows if r.get("eplb") == "after rebalance" and "ms" in r]
    if not done:
        return
    print("\n# EPLB: max/mean over ranks of the (token, expert) pairs each rank's experts receive, and the step time")
    before = {_key(r): r for r in rows if r.get("eplb") == "before" and "ms" in r}
    for r in done:
        b = before.get(_key(r))
        if b is None:
            continue
        print(f"{r['preset']:<14} {r['format']:<12} {r['dispatcher']:<11} T={r['tokens_per_rank']:<6} "
              f"mb={r.get('micro_batches', 1)} "
              f"R={r['redundant_experts']}: max/mean load {max_over_mean(b['pairs_per_rank']):.3f} -> "
              f"{max_over_mean(r['pairs_per_rank']):.3f}, step {b['step_ms']:.3f} -> {r['step_ms']:.3f} ms; "
              f"rebalance {r['rebalance']['ms']:.1f} ms, {r['rebalance']['bytes'] / 1e6:.2f} MB on rank 0")


def _key(r: dict) -> tuple:
    return r["preset"], r["format"], r["dispatcher"], r["tokens_per_rank"], r.get("micro_batches", 1)


def against_balanced(eplb_rows: list[dict], balanced_rows: list[dict]) -> list[dict]:
    """Per configuration rebalanced in `eplb_rows`: step ms before and after the rebalance, and of the same
    configuration (preset, format, dispatcher, T, micro-batches) in `balanced_rows` under balanced routing
    without replicas (None where that run has no such row); after / balanced where both exist."""
    balanced = {_key(r): r for r in balanced_rows
                if r.get("kind") == "ep" and r.get("routing") == "balanced" and "eplb" not in r and "step_ms" in r}
    before = {_key(r): r for r in eplb_rows if r.get("eplb") == "before" and "step_ms" in r}
    out = []
    for r in eplb_rows:
        if r.get("eplb") != "after rebalance" or "step_ms" not in r or _key(r) not in before:
            continue
        b, bal = before[_key(r)], balanced.get(_key(r))
        out.append({"preset": r["preset"], "format": r["format"], "dispatcher": r["dispatcher"],
                    "tokens_per_rank": r["tokens_per_rank"], "micro_batches": r.get("micro_batches", 1),
                    "routing": r["routing"], "redundant_experts": r["redundant_experts"],
                    "before_ms": b["step_ms"], "after_ms": r["step_ms"],
                    "balanced_ms": bal["step_ms"] if bal else None,
                    "after_vs_balanced": r["step_ms"] / bal["step_ms"] if bal else None,
                    "load_before": max_over_mean(b["pairs_per_rank"]), "load_after": max_over_mean(r["pairs_per_rank"])})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m epmoe.bench.eplb", description=__doc__.split("\n\n")[1])
    p.add_argument("eplb_json", help="a `bench layer --routing skewed --redundant-experts R` JSON")
    p.add_argument("balanced_json", help="a `bench layer --routing balanced` JSON of the same configurations")
    args = p.parse_args(argv)
    reports = []
    for path in (args.eplb_json, args.balanced_json):
        try:
            with open(path) as f:
                reports.append(json.load(f)["rows"])
        except (OSError, ValueError, KeyError) as exc:
            print(f"epmoe.bench.eplb: {path}: not a bench layer JSON ({type(exc).__name__}: {exc})", file=sys.stderr)
            return 2
    rows = against_balanced(*reports)
    if not rows:
        print(f"epmoe.bench.eplb: {args.eplb_json} has no configuration measured before and after a rebalance",
              file=sys.stderr)
        return 2
    print("# EPLB step time (the slower rank's) under skewed routing, before and after the rebalance, vs balanced "
          "routing without replicas")
    for r in rows:
        bal = "-" if r["balanced_ms"] is None else f"{r['balanced_ms']:.3f} ms"
        ratio = "-" if r["after_vs_balanced"] is None else f"{r['after_vs_balanced']:.2f}x"
        print(f"{r['preset']:<14} {r['format']:<12} {r['dispatcher']:<20} T={r['tokens_per_rank']:<6} "
              f"mb={r['micro_batches']} R={r['redundant_experts']}: {r['routing']} {r['before_ms']:.3f} -> "
              f"{r['after_ms']:.3f} ms (max/mean load {r['load_before']:.3f} -> {r['load_after']:.3f}); "
              f"balanced {bal}; after / balanced {ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
