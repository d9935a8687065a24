"""`epmoe run`: build a layer of a named preset, fill it with random weights, run it, time it and check
a sample of its output against the float64 oracle. With several ranks, every rank does this for its own
tokens with the experts spread over the group."""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from . import contract
from .balance import max_over_mean
from .bench.routings import describe as describe_routing, router_logits, routing_problem
from .bench.run_env import available_ram
from .config import MoEConfig
from .layer import MoELayer
from .log import Steps, configure_cli_logging, get_logger
from .presets import expert_weight_bytes, preset_config, shrink_config
from .reference import reference_moe
from .testing.compare import bound_for, compare
from .testing.distributed import launch, under_torchrun
from .testing.random_moe import SeededExperts
from .usage import (UsageError, all_experts_per_token, check_backends, check_capacity, check_device,
                    check_overlap, check_redundant_experts)

log = get_logger("run")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class CountingExperts:
    """Wraps an experts backend to record how many rows each local expert received (for the report)."""

    def __init__(self, inner, num_local: int):
        self.inner = inner
        self.counts = torch.zeros(num_local, dtype=torch.long)

    def __call__(self, batch, weights):
        if batch.layout == "flat":
            ids = batch.local_ids.reshape(-1)
            ids = ids[ids >= 0].long().cpu()
            self.counts += torch.bincount(ids, minlength=len(self.counts))
        else:
            self.counts += batch.counts.long().cpu()
        return self.inner(batch, weights)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@dataclass
class RankReport:
    rank: int
    tokens: int
    ms_per_pass: float
    tokens_per_s: float
    rel_err: float
    max_abs: float
    bound: float
    checked_tokens: int
    local_experts: list = field(default_factory=list)
    rows_per_expert: list = field(default_factory=list)
    expert_bytes: int = 0

    @property
    def ok(self) -> bool:
        return self.rel_err <= self.bound


def build_config(args) -> MoEConfig:
    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    cfg = preset_config(args.preset, dtype=dtype)
    cfg = shrink_config(cfg, experts=args.experts, shrink=args.shrink)
    top_k = getattr(args, "top_k", None)
    return dataclasses.replace(cfg, top_k=top_k) if top_k else cfg


def check_args(args) -> tuple[MoEConfig, torch.device, int, str, str]:
    """What `epmoe run` will build, checked in the launching process before any rank starts:
    (config, device, ranks, dispatcher, experts backend); a mistake raises `UsageError` naming the flag."""
    device = check_device(args.device)
    problem = all_experts_per_token(args.preset, args.experts, top_k_flag=True)
    if problem and args.top_k is None:
        raise UsageError(problem)
    try:
        cfg = build_config(args)
    except ValueError as exc:
        raise UsageError(f"--experts/--top-k/--shrink make an invalid layer: {exc}") from None
    if under_torchrun():
        ranks = int(os.environ["WORLD_SIZE"])
    else:
        ranks = args.ranks or default_ranks(device)
        if device.type == "cuda" and ranks > torch.cuda.device_count():
            raise UsageError(f"--ranks {ranks} needs one GPU per rank, this machine has {torch.cuda.device_count()}; "
                             "use fewer --ranks, or --device cpu")
    if cfg.num_experts < ranks:
        raise UsageError(f"{cfg.num_experts} experts cannot be split over {ranks} ranks (each needs one); use "
                         f"--experts {ranks} or more, or fewer --ranks")
    dispatcher, experts = check_backends(args.dispatcher, args.backend, cfg, ranks, device.type)
    check_capacity(dispatcher, experts, cfg, ranks, device.type, capacity_for(args, dispatcher), args.tokens)
    check_overlap(dispatcher, args.micro_batches, args.comm_sms, cfg, ranks, device.type)
    check_redundant_experts(args.redundant_experts, cfg, ranks)
    problem = routing_problem(args.routing, cfg, ranks, args.zipf_exponent)
    if problem:
        raise UsageError(f"--routing {args.routing}: {problem}")
    return cfg, device, ranks, dispatcher, experts


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def capacity_for(args, layer_dispatcher: str) -> int | None:
    """max_tokens_per_rank for the main job: --max-tokens-per-rank, else --tokens for a dispatcher that
    declares fixed capacity (`needs_max_tokens`); others take none (an explicit value is still passed
    through)."""
    if args.max_tokens_per_rank:
        return args.max_tokens_per_rank
    return max(args.tokens, 1) if contract.needs_capacity(layer_dispatcher) else None


def default_ranks(device: torch.device) -> int:
    """The main job's embedded default: one rank per GPU, or two CPU ranks over Gloo without a GPU, so
    that a plain `epmoe run` exercises expert parallelism."""
    if device.type == "cuda":
        return max(1, torch.cuda.device_count())
    return 2


def check_fits(cfg: MoEConfig, device: torch.device, ranks: int) -> None:
    """Refuse (with the flags to use) a preset whose expert weights will not fit this machine."""
    need = expert_weight_bytes(cfg)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        per_rank = need / ranks
        if per_rank > 0.8 * free:
            raise UsageError(f"{cfg.num_experts} experts need {per_rank / 2**30:.1f} GiB per GPU, "
                             f"{free / 2**30:.1f} GiB free; use --experts N, --shrink F or more --ranks")
        return
    avail = available_ram()
    if avail and need > 0.5 * avail:
        raise UsageError(f"{cfg.num_experts} experts need {need / 2**30:.1f} GiB, this machine has "
                         f"{avail / 2**30:.1f} GiB available; shrink the preset with --experts N and/or "
                         f"--shrink F (divides hidden and intermediate sizes)")


def run_rank(rank: int, world: int, opts: dict) -> dict:
    """One rank's share of the main job; returns a RankReport as a dict."""
    import argparse
    args = argparse.Namespace(**opts)
    configure_cli_logging(args.verbosity, rank)
    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", torch.cuda.current_device())
    cfg = build_config(args)
    group = None
    if world > 1:
        import torch.distributed as dist
        group = dist.group.WORLD
    log.info("building the layer (%d ranks)", world)
    layer = MoELayer(cfg, ep_group=group, dispatcher=args.dispatcher, experts=args.backend, device=device,
                     max_tokens_per_rank=capacity_for(args, layer_dispatcher=args.dispatcher),
                     redundant_experts=args.redundant_experts or 0, micro_batches=args.micro_batches,
                     comm_sms=args.comm_sms)
    source = SeededExperts(cfg, args.seed, device)
    steps = Steps(log, "random weights of this rank's experts:", layer.num_local_experts)
    for e in layer.local_experts:
        g, u, d = source[e]
        layer.load_expert(e, gate_proj=g, up_proj=u, down_proj=d)
        steps.advance()
    if layer.score_correction_bias is not None:
        gen = torch.Generator().manual_seed(args.seed + 7)
        layer.score_correction_bias.copy_(torch.randn(cfg.num_experts, generator=gen) * 0.1)
    counter = CountingExperts(layer.experts, layer.num_local_experts)
    layer.experts = counter

    gen = torch.Generator().manual_seed(args.seed * 7919 + rank)
    tokens = args.tokens
    x = torch.randn(tokens, cfg.hidden_size, generator=gen).to(device=device, dtype=cfg.dtype)
    logits = router_logits(args.routing, cfg, tokens, rank, world, gen, args.zipf_exponent).to(device)

    out, elapsed = timed_passes(layer, x, logits, args, device, counter)
    rows_per_expert = (counter.counts // max(args.iters, 1)).tolist()
    n_check = min(args.check_tokens, tokens)
    idx = torch.randperm(tokens, generator=gen)[:n_check].sort().values.to(device)
    log.info("checking %d tokens against the float64 oracle", n_check)
    ref = reference_moe(x[idx], logits[idx], source, cfg, score_correction_bias=layer.score_correction_bias)
    res = compare(out[idx], ref)
    held = list(layer.local_experts)             # what rows_per_expert counted (before any rebalance)
    eplb = {}
    if args.redundant_experts is not None and world > 1:
        log.info("rebalancing the experts from the measured load")
        moved = layer.rebalance()
        out, elapsed_after = timed_passes(layer, x, logits, args, device, counter)
        after = compare(out[idx], ref)
        res = after if after.rel_err > res.rel_err else res
        eplb = {"rank_load_before": sum(rows_per_expert), "ms_per_pass_after": elapsed_after * 1e3,
                "rank_load_after": int(counter.counts.sum()) // max(args.iters, 1),
                "rebalance_ms": moved.seconds * 1e3, "rebalance_bytes": moved.bytes_sent + moved.bytes_received,
                "changed_slots": moved.changed_slots, "local_experts_after": list(layer.local_experts)}
    report = RankReport(rank=rank, tokens=tokens, ms_per_pass=elapsed * 1e3,
                        tokens_per_s=tokens / elapsed if elapsed > 0 else float("inf"),
                        rel_err=res.rel_err, max_abs=res.max_abs, bound=bound_for(cfg.dtype),
                        checked_tokens=n_check, local_experts=held,
                        rows_per_expert=rows_per_expert,
                        expert_bytes=sum(p.numel() * p.element_size() for p in (layer.w13, layer.w2)))
    return asdict(report) | eplb | {"dispatcher": layer.dispatcher_name, "experts": layer.experts_name,
                                    "micro_batches": layer.micro_batches, "comm_sms": layer.comm_sms,
                                    "device": str(device), "config": cfg.describe()}


def timed_passes(layer, x, logits, args, device, counter: CountingExperts) -> tuple[torch.Tensor, float]:
    """The first forward's output and the mean seconds per pass of `args.iters` passes after
    `args.warmup` more; `counter` counts the timed passes only."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch.no_grad():
        steps = Steps(log, "first forward and warm-up passes:", 1 + args.warmup)
        out = layer(x, logits)
        steps.advance()
        for _ in range(args.warmup):
            layer(x, logits)
            steps.advance()
        sync()
        counter.counts.zero_()
        steps = Steps(log, "timed passes:", args.iters)
        t0 = time.perf_counter()
        for _ in range(args.iters):
            layer(x, logits)
            steps.advance()
        sync()
    return out, (time.perf_counter() - t0) / max(args.iters, 1)


def main(args) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 140)
    cfg, device, ranks, dispatcher, experts = check_args(args)
    check_fits(cfg, device, ranks)
    if not under_torchrun() or os.environ.get("RANK") == "0":
        console.print(f"[bold]epmoe run[/bold]  preset [cyan]{escape(args.preset)}[/cyan]: {cfg.describe()}")
        console.print(f"device {device}, ranks {ranks}, dispatcher {dispatcher}, experts {experts}, tokens/rank "
                      f"{args.tokens}, input [{args.tokens}, {cfg.hidden_size}] -> output [{args.tokens}, "
                      f"{cfg.hidden_size}]", highlight=False)
        sms = contract.applied_comm_sms(dispatcher, args.comm_sms)      # what the layer's plan records
        unused = (f" (--comm-sms {args.comm_sms}: dispatcher {dispatcher} has no transfer kernels to bound)"
                  if sms is None and args.comm_sms is not None else "")
        console.print(f"micro-batches {args.micro_batches}, comm SMs {sms if sms is not None else 'unbounded'}"
                      f"{unused}", highlight=False)
        console.print(f"routing: {describe_routing(args.routing, args.zipf_exponent)}" + (
            f"; {args.redundant_experts} redundant experts, rebalanced from the measured load after the timed "
            "passes" if args.redundant_experts is not None and ranks > 1 else ""), highlight=False)
    opts = vars(args).copy()
    opts.pop("func", None)
    reports = launch(run_rank, None if under_torchrun() else ranks, opts, device.type, timeout_s=args.timeout)
    if reports is None:  # a torchrun rank other than 0: rank 0 prints the report
        return 0
    first = reports[0]
    table = Table(title="per rank")
    for col in ("rank", "experts held", "ms/pass", "tokens/s", "checked", "rel err", "max abs err", "result"):
        table.add_column(col, justify="right")
    all_ok = True
    for r in reports:
        ok = r["rel_err"] <= r["bound"]
        all_ok &= ok
        held = r["local_experts"]
        held_s = f"{held[0]}..{held[-1]} ({len(held)})" if held else "-"
        table.add_row(str(r["rank"]), held_s, f"{r['ms_per_pass']:.3f}", f"{r['tokens_per_s']:.0f}",
                      str(r["checked_tokens"]), f"{r['rel_err']:.2e}", f"{r['max_abs']:.2e}",
                      "[green]OK[/green]" if ok else "[red]FAIL[/red]")
    console.print(table)
    console.print(f"bound on ||out - ref|| / ||ref|| for {str(cfg.dtype).replace('torch.', '')}: "
                  f"{first['bound']:.0e}")
    console.print("rows each rank's experts received per pass (global expert id: rows):")
    for r in reports:
        pairs = [f"{e}:{n}" for e, n in zip(r["local_experts"], r["rows_per_expert"])]
        console.print(f"  rank {r['rank']}: " + " ".join(pairs[:32]) + (" ..." if len(pairs) > 32 else ""))
    if "rank_load_after" in first:
        print_rebalance(console, reports)
    if args.json:
        import json
        with open(args.json, "w") as f:
            json.dump({"preset": args.preset, "ranks": reports}, f, indent=1)
    if not all_ok:
        console.print("[red]output differs from the oracle beyond the bound[/red]")
    elif args.check_tokens == 0:
        console.print("[yellow]no output was compared with the oracle (--check-tokens 0)[/yellow]")
    else:
        console.print("[green]all outputs match the float64 oracle[/green]")
    return 0 if all_ok else 1


def print_rebalance(console, reports: list[dict]) -> None:
    """Max/mean rank load and time per pass before and after the rebalance, and what it moved."""
    before, after = ([r[key] for r in reports] for key in ("rank_load_before", "rank_load_after"))
    console.print(f"max/mean rank load (pairs each rank's experts received per pass): {max_over_mean(before):.3f} "
                  f"before, {max_over_mean(after):.3f} after rebalance  ({before} -> {after})", highlight=False)
    console.print(f"ms/pass of the slowest rank: {max(r['ms_per_pass'] for r in reports):.3f} before, "
                  f"{max(r['ms_per_pass_after'] for r in reports):.3f} after; the rebalance changed "
                  f"{reports[0]['changed_slots']} slots, moved {max(r['rebalance_bytes'] for r in reports) / 1e6:.2f} "
                  f"MB on the busiest rank, took {max(r['rebalance_ms'] for r in reports):.1f} ms", highlight=False)
