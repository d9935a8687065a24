"""Expert-parallel load balancing in `epmoe bench layer`: the flags, each rank's load under the layer's
placement (replicas included), and the before / after summary of the rows measured around a rebalance."""
from __future__ import annotations

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
