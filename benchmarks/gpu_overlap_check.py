"""Overlap on GPUs: shared experts under the dispatch, two micro-batches, and their CUDA graphs.

    python benchmarks/gpu_overlap_check.py --ranks 1 --out DIR     # one H200: every dispatcher at ep_size 1,
                                                                   # qwen3-30b-a3b
    python benchmarks/gpu_overlap_check.py --ranks 2 --out DIR     # two H200s (NCCL group; NVLink multicast
                                                                   # off), deepseek-v3
    python benchmarks/gpu_overlap_check.py --cpu-smoke --ranks 2 --out DIR   # the flow on Gloo CPU ranks, tiny
                                                                            # shapes: checks the script, not results

For every dispatcher that runs on the group (`--dispatchers`; the fixed-capacity ones at the decode sizes
only) and every T per rank (`--tokens`), with the preset's layer (BF16) and a SwiGLU shared expert
(intermediate `--shared-intermediate`):
  timing: the step time (median of --reps after --warmup, every rank sleeping the same before each repeat,
    each rank's time and the slower one) of
      routed       layer(x, logits)
      shared       the shared experts alone
      both         layer(x, logits, shared_experts=...), exchanges on the communication stream (overlap on)
      both, in order   the same with `use_comm_stream = False` (every exchange on the caller's stream)
    each with one micro-batch and with two (`micro_batches=2`); eager, and as CUDA-graph replays where the
    layer can be captured (with a capacity). `hidden` = routed + shared - both: how much of the shared
    experts' time the overlap hid (at most the exchanges' time);
  check: two micro-batches against one batch (largest difference) and against the float64 oracle (sampled
    rows, BF16 bound); where the layer can be captured, the layer with two micro-batches and shared experts
    captured in a CUDA graph and replayed on fresh inputs, each replay compared bit for bit with the eager
    forward on the same inputs.
Writes DIR/overlap_<ranks>x.json (every row, with the command, commit, GPU, torch / triton versions and
date) and prints a table. A row that fails records its error; the others still run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
for _k, _v in SAFE_ENV.items():          # before torch is imported; the spawned ranks inherit them
    os.environ[_k] = _v

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

DECODE_MAX = 512          # the fixed-capacity (low-latency) dispatchers run at T up to this
REPLAYS = 4


class SharedExperts(torch.nn.Module):
    """A shared expert: SwiGLU MLP [T, H] -> [T, H], weights drawn on the device."""

    def __init__(self, hidden: int, intermediate: int, dtype, device, seed: int = 5):
        super().__init__()
        g = torch.Generator(device=device).manual_seed(seed)
        self.gate_up = (torch.randn(2 * intermediate, hidden, generator=g, device=device) * hidden ** -0.5).to(dtype)
        self.down = (torch.randn(hidden, intermediate, generator=g, device=device) * intermediate ** -0.5).to(dtype)

    def forward(self, x):
        gate, up = F.linear(x, self.gate_up).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down)


def configs_for(name: str, T: int) -> list[tuple[str, int | None]]:
    """(label, max_tokens_per_rank) to measure dispatcher `name` at T: without a capacity where it runs
    without one, with capacity T (at least 1) where it takes one (fixed-capacity ones at decode sizes only)."""
    from epmoe import contract
    caps, cap = contract.dispatcher_class(name).CAPS, max(T, 1)
    if caps.needs_max_tokens:
        return [("capacity", cap)] if T <= DECODE_MAX else []
    return [("no capacity", None)] + ([("capacity", cap)] if caps.takes_max_tokens else [])


def twin(layer, group, **options):
    """Another MoELayer like `layer` (the same config, group, backends and capacity) holding the same weight
    tensors (no copy), built with `options`."""
    from epmoe import MoELayer
    other = MoELayer(layer.cfg, ep_group=group, dispatcher=layer.dispatcher_name, experts=layer.experts_name,
                     device=layer.device, max_tokens_per_rank=layer.max_tokens_per_rank, **options)
    for name, p in layer.named_parameters(recurse=False):
        setattr(other, name, p)
    if layer.score_correction_bias is not None:
        other.score_correction_bias.copy_(layer.score_correction_bias)
    other.mark_all_experts_loaded()
    return other


class Rank:
    def __init__(self, rank: int, ws: int, p: dict):
        from epmoe.bench.gpu_timing import GroupAgreement, Timer, WallClock
        self.rank, self.ws, self.p = rank, ws, p
        self.cuda = not p["cpu_smoke"]
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.cuda else torch.device("cpu")
        self.group = None
        if ws > 1:
            import torch.distributed as dist
            self.group = dist.group.WORLD
        self.agree = GroupAgreement(self.group, self.device) if self.group is not None else None
        if self.cuda:
            from epmoe.bench.gpu_timing import GpuTimer
            self.timer = GpuTimer(self.device)
        else:
            self.timer = Timer(WallClock())

    def inputs(self, cfg, T: int, seed: int):
        """hidden [T, H] and router logits [T, E]: balanced routing (every rank gets the same share of
        pairs) where the shape allows it, else random."""
        from epmoe.bench.routings import router_logits, routing_problem
        g = torch.Generator(device=self.device).manual_seed(seed * 7919 + 1000 * self.rank + T)
        g_route = torch.Generator().manual_seed(seed * 7919 + 1000 * self.rank + T)
        x = torch.randn(T, cfg.hidden_size, generator=g, device=self.device).to(cfg.dtype)
        kind = "balanced" if routing_problem("balanced", cfg, self.ws) is None else "random"
        return x, router_logits(kind, cfg, T, self.rank, self.ws, g_route).to(self.device)

    def time(self, fn, use_graph: bool) -> dict:
        """The timing loop on fn (the same on every rank: the agreement's sleep, lined up before each run)."""
        before = self.agree.line_up if self.agree is not None else None
        t = self.timer.time(fn, reps=self.p["reps"], warmup=self.p["warmup"], use_graph=use_graph,
                            before_each=before, agree=self.agree)
        return t.as_dict()

    def row(self, layers, shared, x, logits, use_graph: bool) -> dict:
        """The step times of one layer configuration (see the module docstring) and what the overlap hid."""
        one, two = layers
        out = {"shared": self.time(lambda: shared(x), use_graph)}
        for micro, layer in ((1, one), (2, two)):
            default = layer.dispatcher.use_comm_stream
            for key, comm, with_shared in (("routed", True, False), ("both", True, True),
                                           ("both, in order", False, True)):
                layer.dispatcher.use_comm_stream = comm
                fn = (lambda lay=layer: lay(x, logits, shared_experts=shared)) if with_shared else \
                    (lambda lay=layer: lay(x, logits))
                out[f"{key}, {micro} micro-batch{'es' if micro > 1 else ''}"] = self.time(fn, use_graph)
            layer.dispatcher.use_comm_stream = default
        for micro in ("1 micro-batch", "2 micro-batches"):
            routed, both = out[f"routed, {micro}"]["median_ms"], out[f"both, {micro}"]["median_ms"]
            out[f"hidden ms, {micro}"] = routed + out["shared"]["median_ms"] - both
            out[f"overlap gain ms, {micro}"] = out[f"both, in order, {micro}"]["median_ms"] - both
        return out

    def check(self, layers, shared, cfg, source, T: int) -> dict:
        """Two micro-batches against one batch and the oracle; graph replays against eager, bit for bit."""
        from epmoe import reference_moe
        from epmoe.testing import bound_for, capture, compare
        one, two = layers
        x, logits = self.inputs(cfg, T, seed=3)
        out_one, out_two = one(x, logits), two(x, logits)
        idx = torch.arange(0, T, max(T // 64, 1), device=self.device)
        res = compare(out_two[idx], reference_moe(x[idx], logits[idx], source, cfg, device=self.device,
                                                  score_correction_bias=two.score_correction_bias))
        check = {"two_vs_one_max_abs": (out_two.float() - out_one.float()).abs().max().item() if T else 0.0,
                 "two_vs_oracle_rel_err": res.rel_err, "oracle_rows": int(idx.numel()),
                 "oracle_ok": bool(res.finite and res.rel_err <= bound_for(cfg.dtype))}
        if not two.plan.cuda_graph_safe:
            return check
        xs, ls = x.clone(), logits.clone()
        replay, static = capture(lambda: two(xs, ls, shared_experts=shared), self.device)
        equal = []
        for i in range(REPLAYS):
            x, logits = self.inputs(cfg, T, seed=10 + i)
            xs.copy_(x)
            ls.copy_(logits)
            replay()
            got = static.clone()
            equal.append(bool(torch.equal(got, two(x, logits, shared_experts=shared))))
        status_check = getattr(two.dispatcher, "check", None)    # the symm ones: what the replays reported
        if status_check is not None:
            status_check()
        check.update(graph_replays=REPLAYS, graph_bit_equal_eager=all(equal))
        return check

    def run(self) -> list[dict]:
        from epmoe import MoELayer, contract
        from epmoe.bench.layer import layer_config
        from epmoe.main_job import SeededExperts
        p, rows = self.p, []
        cfg = layer_config(p["preset"], "bf16", p["experts"], p["shrink"])
        source = SeededExperts(cfg, 0, self.device)
        shared = SharedExperts(cfg.hidden_size, p["shared_intermediate"], cfg.dtype, self.device)
        with torch.no_grad():
            for name in p["dispatchers"]:
                for T in p["tokens"]:
                    for label, cap in configs_for(name, T):
                        row = {"dispatcher": name, "config": label, "tokens_per_rank": T, "rank": self.rank}
                        why = contract.dispatcher_problem(name, cfg, self.ws, self.device.type)
                        if why:
                            rows.append(dict(row, skipped=why))
                            continue
                        try:
                            one = MoELayer(cfg, ep_group=self.group, dispatcher=name, device=self.device,
                                           max_tokens_per_rank=cap)
                            for e in one.placement.local_experts:
                                g, u, d = source[e]
                                one.load_expert(e, gate_proj=g, up_proj=u, down_proj=d)
                            if one.score_correction_bias is not None:
                                one.score_correction_bias.normal_(0, 0.1, generator=torch.Generator(
                                    device=self.device).manual_seed(7))
                            layers = (one, twin(one, self.group, micro_batches=2))
                            row["experts"] = one.experts_name
                            x, logits = self.inputs(cfg, T, seed=1)
                            row["eager"] = self.row(layers, shared, x, logits, use_graph=False)
                            if one.plan.cuda_graph_safe and self.cuda:
                                row["graph"] = self.row(layers, shared, x, logits, use_graph=True)
                            row["check"] = self.check(layers, shared, cfg, source, T)
                        except Exception as exc:     # recorded; every rank fails alike (the same layers)
                            row["error"] = f"{type(exc).__name__}: {exc}"
                        layers = one = None
                        if self.cuda:
                            torch.cuda.synchronize(self.device)
                            torch.cuda.empty_cache()
                        rows.append(row)
                        print(f"[rank {self.rank}] {summary_line(row)}", flush=True)
        return rows


def _worker(rank: int, ws: int, p: dict) -> list[dict]:
    return Rank(rank, ws, p).run()


def summary_line(row: dict) -> str:
    head = f"{row['dispatcher']:>21} {row['config']:>11} T={row['tokens_per_rank']:<5}"
    if "skipped" in row or "error" in row:
        return f"{head} {row.get('skipped') or row.get('error')}"
    parts = []
    for method in ("eager", "graph"):
        if method in row:
            r = row[method]
            parts.append(f"{method}: routed {r['routed, 1 micro-batch']['median_ms']:.3f} shared "
                         f"{r['shared']['median_ms']:.3f} both {r['both, 1 micro-batch']['median_ms']:.3f} "
                         f"(in order {r['both, in order, 1 micro-batch']['median_ms']:.3f}) hidden "
                         f"{r['hidden ms, 1 micro-batch']:.3f}; 2 micro-batches both "
                         f"{r['both, 2 micro-batches']['median_ms']:.3f} (in order "
                         f"{r['both, in order, 2 micro-batches']['median_ms']:.3f}) ms")
    c = row.get("check", {})
    parts.append(f"two vs one {c.get('two_vs_one_max_abs', float('nan')):.2e}, oracle "
                 f"{'ok' if c.get('oracle_ok') else 'FAILED'}"
                 + (f", graph replays bit-equal: {c['graph_bit_equal_eager']}" if "graph_bit_equal_eager" in c else ""))
    return f"{head} " + " | ".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=1, choices=(1, 2))
    ap.add_argument("--preset", default=None,
                    help="the layer's shape (default: qwen3-30b-a3b on one rank, deepseek-v3 on two; tiny with "
                         "--cpu-smoke)")
    ap.add_argument("--tokens", default="128,4096", help="tokens per rank, comma-separated")
    ap.add_argument("--dispatchers", default=None,
                    help="comma-separated (default: local, alltoall, low_latency and both symm_ ones on one "
                         "rank; allgather, alltoall, low_latency and both symm_ ones on two)")
    ap.add_argument("--shared-intermediate", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=None, help="fewer experts than the preset")
    ap.add_argument("--shrink", type=int, default=1, help="divide hidden and intermediate sizes")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=os.environ.get("OUT", os.path.join(os.getcwd(), "out")))
    ap.add_argument("--timeout", type=float, default=540.0)
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="Gloo CPU ranks, tiny shapes (preset tiny unless given): checks the flow, not results")
    args = ap.parse_args(argv)
    from epmoe.bench.run_env import environment
    from epmoe.testing import run_on_ranks
    smoke = args.cpu_smoke
    if not smoke and torch.cuda.device_count() < args.ranks:
        print(f"gpu_overlap_check: --ranks {args.ranks} needs as many GPUs, found {torch.cuda.device_count()}")
        return 2
    default = (["local", "alltoall", "low_latency"] if args.ranks == 1 else ["allgather", "alltoall", "low_latency"])
    preset = args.preset or ("tiny" if smoke else "qwen3-30b-a3b" if args.ranks == 1 else "deepseek-v3")
    p = {"ranks": args.ranks, "preset": preset,
         "tokens": [int(t) for t in args.tokens.split(",")],
         "dispatchers": args.dispatchers.split(",") if args.dispatchers else
         default + ["symm_high_throughput", "symm_low_latency"],
         "shared_intermediate": args.shared_intermediate, "experts": args.experts, "shrink": args.shrink,
         "reps": args.reps, "warmup": args.warmup, "cpu_smoke": smoke}
    if args.ranks == 1:
        if not smoke:
            torch.cuda.set_device(0)
        per_rank = [_worker(0, 1, p)]
    else:
        per_rank = run_on_ranks(_worker, args.ranks, p, backend="gloo" if smoke else "nccl", timeout_s=args.timeout)
    env = environment("gloo" if smoke else ("nccl" if args.ranks > 1 else "none (one GPU)"), args.ranks)
    if not smoke and args.ranks == 1:
        env.pop("cpu", None)
        env.update(device=torch.cuda.get_device_name(0), gpu=torch.cuda.get_device_name(0), gpu_count=1,
                   cuda=torch.version.cuda)
    rows = []
    for i, row in enumerate(per_rank[0]):                # every rank ran the same rows in the same order
        merged = dict(row, ranks=[r[i] for r in per_rank])
        merged.pop("rank", None)
        rows.append(merged)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"overlap_{args.ranks}x.json")
    with open(path, "w") as f:
        json.dump({"environment": env, "params": p, "smoke": smoke, "rows": rows}, f, indent=1)
    print(f"\n===== summary ({'CPU smoke, not results' if smoke else env.get('gpu')}) =====")
    failed = 0
    for row in rows:
        for r, each in enumerate(row["ranks"]):
            print(f"rank {r}: {summary_line(each)}")
        c = row.get("check", {})
        failed += int("error" in row or bool(c and (not c["oracle_ok"] or c.get("graph_bit_equal_eager") is False)))
    print(f"rows: {len(rows)}, failed: {failed}; written: {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
