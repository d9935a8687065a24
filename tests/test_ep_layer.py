"""Expert parallelism against the float64 oracle, on 2 and 4 ranks (Gloo on the CPU; NCCL on 2 GPUs with
`-m multigpu`).

Process start costs seconds, so each rank count starts its ranks once: a module-scoped fixture runs
every case of that rank count in one `run_on_ranks` call (`run_cases`), and each test below reads its
case's result on every rank. A case that fails records its error and the others still run; a case that
leaves the group's collectives unmatched makes the whole run time out (reported as such), never hang.

Covered: every EP dispatcher x every experts backend the contract accepts for it; uneven token counts
with ranks at 0 (and all ranks at 0); T = 1; skewed routing (every token to the experts of one rank;
every token to one expert); top_k below and above the rank count; E not divisible by the rank count;
an explicit, non-contiguous placement; sigmoid/grouped routing with a score-correction bias; biases and
other activations; many forwards in a row with changing sizes, and two layers used alternately;
low_latency at max_tokens_per_rank - 1, exactly, and + 1 (an error naming the setting on every rank,
after which the group still works); the handshake refusing disagreeing ranks on every rank; and the
traffic counts: `alltoall` sends each token at most once per destination rank.

`benchmarks/gpu_ep_check.py` imports this module to run the same cases with NCCL.
"""
from __future__ import annotations

import inspect
import os
import sys
import traceback

import pytest
import torch
import torch.distributed as dist

from epmoe import MoEConfig, MoELayer, Placement, RankMismatch, contract, reference_moe
from epmoe.routing import validate_routing
from epmoe.testing import bound_for, compare, load_experts, random_experts, random_inputs, run_on_ranks

EP_DISPATCHERS = tuple(d for d in contract.DISPATCHERS if contract.dispatcher_class(d).CAPS.communicates)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
BASIC_EXPERTS = ("reference", "grouped_mm", "batched")   # cheap on the CPU: every scenario runs on these


# ------------------------------------------------------------------------------------------ routers
class ForcedRouter:
    """A custom router with skewed expert choice and non-trivial weights.

    allowed: the experts a token may pick (None: all); first: an expert every token takes in slot 0.
    The other slots take the best remaining allowed experts by logit; weights are a softmax over the
    chosen experts' logits, so every slot matters. Returns int64 ids (the layer converts them).
    """

    def __init__(self, num_experts: int, top_k: int, allowed=None, first=None):
        self.E, self.k, self.allowed, self.first = num_experts, top_k, allowed, first

    def __call__(self, hidden, logits):
        scores = logits.float().clone()
        if self.allowed is not None:
            keep = torch.zeros(self.E, dtype=torch.bool, device=scores.device)
            keep[list(self.allowed)] = True
            scores = scores.masked_fill(~keep, float("-inf"))
        if self.first is not None:
            scores[:, self.first] = float("inf")
        ids = scores.topk(self.k, dim=-1).indices
        weights = torch.softmax(logits.float().gather(1, ids), dim=-1)
        return ids, weights


def _owners(E: int, ws: int, placement) -> list[int]:
    return list(Placement(E, ws, 0, placement).owners)


def _make_router(case: dict, ws: int):
    kind = case.get("routing", "softmax")
    E, k = case["E"], case["k"]
    if kind == "softmax":
        return None
    if kind.startswith("one_rank:"):
        r = int(kind.split(":")[1])
        owners = _owners(E, ws, case.get("placement"))
        return ForcedRouter(E, k, allowed=[e for e in range(E) if owners[e] == r])
    if kind.startswith("one_expert:"):
        return ForcedRouter(E, k, first=int(kind.split(":")[1]))
    if kind == "custom":
        return ForcedRouter(E, k)
    raise ValueError(kind)


# -------------------------------------------------------------------------------------- layer cases
def _config(case: dict) -> MoEConfig:
    kw = dict(num_experts=case["E"], top_k=case["k"], hidden_size=case.get("H", 32),
              intermediate_size=case.get("I", 16), activation=case.get("activation", "silu"),
              dtype=DTYPES[case.get("dtype", "bfloat16")])
    kw.update(case.get("cfg", {}))
    return MoEConfig(**kw)


def _build(case: dict, ws: int, device, cfg=None, group=None):
    cfg = cfg or _config(case)
    router = _make_router(case, ws)
    group = dist.group.WORLD if group is None else group
    layer = MoELayer(cfg, ep_group=group, dispatcher=case["dispatcher"], experts=case["experts"],
                     device=device, max_tokens_per_rank=case.get("M"), router=router,
                     expert_placement=case.get("placement"), expert_bias=case.get("bias", False))
    weights = random_experts(cfg, seed=case.get("seed", 0), with_bias=case.get("bias", False))
    kept = load_experts(layer, weights)
    # the oracle gets the weights exactly as the layer stores them (rounded to its dtype; biases stay float32)
    weights = [tuple(w.to(cfg.dtype).float() for w in e[:3]) + tuple(e[3:]) for e in weights]
    owners = _owners(cfg.num_experts, ws, case.get("placement"))
    assert kept == owners.count(dist.get_rank(group)), f"kept {kept} experts, placement says {owners}"
    bias = None
    if layer.score_correction_bias is not None:
        bias = torch.randn(cfg.num_experts, generator=torch.Generator().manual_seed(5)) * 0.3
        layer.score_correction_bias.copy_(bias)
    return cfg, layer, weights, router, bias


def _inputs(cfg, counts: list[int], rank: int, seed: int, device):
    x, logits = random_inputs(cfg, sum(counts), seed=seed)
    mine = slice(sum(counts[:rank]), sum(counts[:rank + 1]))
    return x[mine].to(device), logits[mine].to(device)


def _check_forward(layer, cfg, weights, router, bias, x, logits, what: str) -> float:
    out = layer(x, logits)
    T = x.shape[0]
    assert tuple(out.shape) == (T, cfg.hidden_size) and out.dtype == cfg.dtype, \
        f"{what}: output {list(out.shape)} {out.dtype}, expected [{T}, {cfg.hidden_size}] {cfg.dtype}"
    if T == 0:
        return 0.0
    routing = None
    if router is not None:
        ids, w = router(x, logits)
        routing = validate_routing(ids, w, cfg.num_experts, T, cfg.top_k)
    ref = reference_moe(x, logits, weights, cfg, score_correction_bias=bias, routing=routing)
    res = compare(out, ref)
    bound = bound_for(cfg.dtype)
    if not (res.finite and res.rel_err <= bound):
        raise AssertionError(f"{what}: differs from the oracle beyond {bound:.0e}\n{res.report}")
    return res.rel_err


def _overflows(case: dict, counts: list[int]) -> bool:
    return _fixed_capacity(case["dispatcher"]) and any(t > case["M"] for t in counts)


def _fixed_capacity(dispatcher: str) -> bool:
    return contract.dispatcher_class(dispatcher).CAPS.needs_max_tokens


class Failures:
    """Collects a case's assertion failures so that every rank still runs all of the case's forwards
    (a rank that stopped early would leave its peers' collectives unmatched); `done()` raises them."""

    def __init__(self):
        self.errors: list[str] = []

    def check(self, fn, *args):
        try:
            return fn(*args)
        except AssertionError as exc:
            self.errors.append(str(exc))
            return 0.0

    def done(self, ok: str) -> str:
        if self.errors:
            raise AssertionError("\n".join(self.errors))
        return ok


def _forward_expecting_overflow(layer, x, logits, counts, M, what):
    try:
        layer(x, logits)
    except ValueError as exc:
        assert "max_tokens_per_rank" in str(exc), f"{what}: the overflow error must name the setting: {exc}"
        over = [r for r, t in enumerate(counts) if t > M]
        assert all(f"rank {r} passed {counts[r]} tokens" in str(exc) for r in over), str(exc)
        return 0.0
    raise AssertionError(f"{what}: max_tokens_per_rank={M} exceeded on some rank but no error here")


def case_layer(rank: int, ws: int, case: dict, device) -> str:
    cfg, layer, weights, router, bias = _build(case, ws, device)
    fails, worst = Failures(), 0.0
    for f, counts in enumerate(case["tokens"]):
        x, logits = _inputs(cfg, counts, rank, seed=100 * case.get("seed", 0) + f + 1, device=device)
        what = f"forward {f} tokens {counts}"
        if _overflows(case, counts):
            fails.check(_forward_expecting_overflow, layer, x, logits, counts, case["M"], what)
        else:
            worst = max(worst, fails.check(_check_forward, layer, cfg, weights, router, bias, x, logits, what))
    return fails.done(f"ok (worst rel err {worst:.2e})")


def case_two_layers(rank: int, ws: int, case: dict, device) -> str:
    """Two layers of different dispatchers used alternately with changing sizes (a model's forward)."""
    built = [_build(dict(case, **spec), ws, device) for spec in case["layers"]]
    fails = Failures()
    for f, counts in enumerate(case["tokens"]):
        for i, (cfg, layer, weights, router, bias) in enumerate(built):
            x, logits = _inputs(cfg, counts, rank, seed=7 * f + i, device=device)
            fails.check(_check_forward, layer, cfg, weights, router, bias, x, logits,
                        f"layer {i} forward {f} tokens {counts}")
    return fails.done("ok")


def case_subgroups(rank: int, ws: int, case: dict, device) -> str:
    """The world split into EP groups of 2 (ranks {0,1}, {2,3}, ...): each group runs its own layer with
    group-relative ranks, different token counts per group, all groups at once."""
    groups = [dist.new_group([r, r + 1]) for r in range(0, ws, 2)]
    group = groups[rank // 2]
    fails = Failures()
    for spec in case["layers"]:
        sub = dict(case, **spec, E=case["E"] + 2 * (rank // 2))          # each group its own shape
        cfg, layer, weights, router, bias = _build(sub, 2, device, group=group)
        for f, counts in enumerate(case["tokens"]):
            counts = [c + rank // 2 for c in counts]
            x, logits = _inputs(cfg, counts, dist.get_rank(group), seed=f + 10 * rank // 2, device=device)
            fails.check(_check_forward, layer, cfg, weights, router, bias, x, logits,
                        f"{spec['dispatcher']} group {rank // 2} forward {f} tokens {counts}")
    return fails.done("ok")


# ---------------------------------------------------------------------------------- handshake cases
def case_handshake(rank: int, ws: int, case: dict, device) -> str:
    """Ranks build disagreeing layers: every rank must raise (RankMismatch, or its own build error)."""
    spec = dict(case["base"], **case.get("per_rank", {}).get(rank, {}))
    cfg = _config(spec)
    expected = case.get("expect", {}).get(rank, RankMismatch.__name__)
    try:
        MoELayer(cfg, ep_group=dist.group.WORLD, dispatcher=spec["dispatcher"], experts=spec["experts"],
                 device=device, max_tokens_per_rank=spec.get("M"), expert_placement=spec.get("placement"))
    except Exception as exc:
        assert type(exc).__name__ == expected, f"expected {expected}, got {type(exc).__name__}: {exc}"
        for word in case.get("mentions", {}).get(rank, case.get("mention", [])):
            assert word in str(exc), f"the error should mention {word!r}: {exc}"
        return f"ok ({type(exc).__name__})"
    raise AssertionError(f"rank {rank} built the layer although the ranks disagree ({case['name']})")


# ------------------------------------------------------------------------------------ traffic counts
WRAPPED = ("all_to_all_single", "all_gather_single", "all_gather_into_tensor", "all_gather",
           "reduce_scatter_single", "reduce_scatter_tensor", "reduce_scatter", "all_reduce", "broadcast",
           "send", "isend", "recv", "irecv", "batch_isend_irecv", "gather", "scatter", "all_to_all")


class Recorder:
    """Wraps torch.distributed's collectives and records what each call sends: the input's dtype, shape
    and, for all_to_all_single, the rows sent to each rank."""

    def __init__(self):
        self.calls: list[dict] = []
        self._saved: dict = {}

    def __enter__(self):
        for name in WRAPPED:
            fn = getattr(dist, name, None)
            if fn is None:
                continue
            self._saved[name] = fn
            setattr(dist, name, self._wrap(name, fn))
        return self

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(dist, name, fn)

    def _wrap(self, name, fn):
        sig = inspect.signature(fn)

        def wrapper(*args, **kwargs):
            a = sig.bind(*args, **kwargs).arguments
            inp = a.get("input", a.get("input_tensor", a.get("tensor")))
            rec = {"name": name}
            if isinstance(inp, torch.Tensor):
                rec.update(dtype=inp.dtype, shape=tuple(inp.shape), nbytes=inp.numel() * inp.element_size())
            if name == "all_to_all_single":
                n = dist.get_world_size(a.get("group"))
                splits = a.get("input_split_sizes")
                rec["rows_to"] = list(splits) if splits else [inp.shape[0] // n] * n
                out_splits = a.get("output_split_sizes")
                out = a.get("output")
                rec["rows_from"] = list(out_splits) if out_splits else [out.shape[0] // n] * n
            self.calls.append(rec)
            return fn(*args, **kwargs)
        return wrapper


def _check_traffic(d, out, ref, calls, stats, case, cfg, T, dest_rows, pairs_to, my_experts) -> None:
    ws, k, H = len(dest_rows), cfg.top_k, cfg.hidden_size
    if T:
        res = compare(out, ref)
        assert res.rel_err <= bound_for(cfg.dtype), f"{d}: {res.report}"
    # every forward starts with the forward header: one small int64 exchange (ranks agree on the layer)
    headers = [c for c in calls if c.get("dtype") == torch.int64]
    assert len(headers) == 1 and headers[0]["nbytes"] <= 8 * (16 + ws) * ws, headers
    calls = [c for c in calls if c not in headers]
    names = {c["name"] for c in calls}
    if d == "alltoall_bounded":          # fixed regions of M rows: hidden vectors and routing apart, then back
        M = max(case["T"])
        assert names == {"all_to_all_single"}, f"bounded alltoall used {names}"
        data = [c for c in calls if c["dtype"] == torch.uint8]
        back = [c for c in calls if c["dtype"] == cfg.dtype]
        assert len(data) == 2 and len(back) == 1, calls
        assert all(c["rows_to"] == [M] * ws == c["rows_from"] for c in data + back), calls
        assert data[0]["shape"] == (ws * M, H * cfg.dtype.itemsize), data
        assert stats.dispatch_rows == [M] * ws and stats.forwards == 1
    elif d == "alltoall":
        assert names == {"all_to_all_single"}, f"alltoall used {names}"
        data = [c for c in calls if c["dtype"] == torch.uint8]
        back = [c for c in calls if c["dtype"] == cfg.dtype]
        assert len(data) == 1 and len(back) == 1, calls
        assert data[0]["rows_to"] == dest_rows, \
            f"rows sent per destination {data[0]['rows_to']}, (token, destination) pairs {dest_rows}"
        assert all(n <= T for n in data[0]["rows_to"]), "a token was sent twice to one rank"
        if T >= 2 and k > 1:
            assert sum(data[0]["rows_to"]) < sum(pairs_to), "sent once per expert, not once per rank"
        assert back[0]["rows_from"] == dest_rows, "the combine must bring back one row per (token, rank)"
        row_bytes = data[0]["shape"][1]
        assert row_bytes <= H * 2 + 8 * k + 2 * 16, f"a dispatch row is {row_bytes} bytes for H={H}"
        assert stats.dispatch_rows == dest_rows and stats.forwards == 1
    elif d == "allgather":
        t_max = max(case["T"])
        gathered = [c for c in calls if c["name"] in ("all_gather_single", "all_gather_into_tensor")
                    and c["dtype"] == torch.uint8]
        assert len(gathered) == 1 and gathered[0]["shape"][0] == t_max, calls
        assert stats.dispatch_rows == [t_max] * ws
        if T and any(n < t_max for n in dest_rows):
            assert sum(dest_rows) < ws * t_max     # the counter tells the two apart
    else:
        assert names == {"all_to_all_single"}, f"low_latency used {names}"
        M = max(case["T"])
        assert [c["rows_to"] for c in calls] == [[1] * ws, [1] * ws], calls   # [ep, M, ..] blocks
        assert calls[0]["shape"][:2] == (ws, M) and calls[1]["shape"][:2] == (ws, M)
    assert len(stats.received_per_expert.tolist()) == len(my_experts)


def case_traffic(rank: int, ws: int, case: dict, device) -> str:
    """Count what each dispatcher sends for the same tokens and routing.

    Each forward starts with one small exchange of the forward header. alltoall (no capacity): otherwise
    only all_to_all_single; exactly one row per (token, destination rank holding >= 1 of its
    experts) is sent, never one per expert, and one row per (token, rank) comes back; a row is the hidden
    vector plus ~8 bytes per slot. alltoall with a capacity: fixed regions of M rows per destination.
    allgather: the counter sees every token go to every rank (the counter can see an all-gather in
    disguise). low_latency: fixed M rows per destination."""
    E, k, H = case["E"], case["k"], 32
    cfg = MoEConfig(num_experts=E, top_k=k, hidden_size=H, intermediate_size=16, dtype=torch.bfloat16)
    owners = _owners(E, ws, None)
    per_rank = [[e for e in range(E) if owners[e] == r] for r in range(ws)]

    def router(hidden, logits):   # token t: all k experts on rank (t + rank) % ws, plus a random mix
        T = hidden.shape[0]
        ids = torch.empty(T, k, dtype=torch.int64)
        for t in range(T):
            home = per_rank[(t + rank) % ws]
            if t % 3 == 2:         # every third token spreads over all experts
                ids[t] = torch.randperm(E, generator=torch.Generator().manual_seed(t))[:k]
            else:
                ids[t] = torch.tensor(home[:k])
        return ids.to(hidden.device), torch.softmax(logits.float().gather(1, ids.to(logits.device)), -1)

    T = case["T"][rank]
    layers = {d: MoELayer(cfg, ep_group=dist.group.WORLD, dispatcher=d.replace("_bounded", ""), experts=x,
                          device=device, max_tokens_per_rank=None if d == "alltoall" else max(case["T"]),
                          router=router)
              for d, x in (("alltoall", "reference"), ("alltoall_bounded", "reference"), ("allgather", "reference"),
                           ("low_latency", "batched"))}
    weights = random_experts(cfg)
    x_in, logits = _inputs(cfg, case["T"], rank, seed=3, device=device)
    ids = router(x_in, logits)[0].cpu().tolist()
    dest_rows = [sum(1 for t in range(T) if any(owners[e] == d for e in ids[t])) for d in range(ws)]
    pairs_to = [sum(1 for t in range(T) for e in ids[t] if owners[e] == d) for d in range(ws)]
    runs = {}
    for d, layer in layers.items():          # every forward first: the collectives stay matched
        load_experts(layer, weights)
        stats = layer.dispatcher.enable_stats()
        with Recorder() as rec:
            out = layer(x_in, logits)
        runs[d] = out, rec.calls, stats
    ref = reference_moe(x_in, None, weights, cfg, routing=validate_routing(*router(x_in, logits), E))
    fails = Failures()
    for d, (out, calls, stats) in runs.items():
        fails.check(_check_traffic, d, out, ref, calls, stats, case, cfg, T, dest_rows, pairs_to, per_rank[rank])
    fails.done("ok")
    return f"ok (alltoall rows to each rank {dest_rows} for {T} tokens x {k} experts)"


# ------------------------------------------------------------------------------------------- runner
KINDS = {"layer": case_layer, "two_layers": case_two_layers, "handshake": case_handshake,
         "traffic": case_traffic, "subgroups": case_subgroups}


def run_cases(rank: int, ws: int, cases: list[dict], device_kind: str = "cpu", kinds: dict | None = None) -> dict:
    """Run every case on this rank; returns {case name: "ok ..." or the error}. `kinds`: case kind -> function
    (default: this file's; other suites add their own kinds)."""
    kinds = KINDS if kinds is None else kinds
    device = torch.device("cuda", torch.cuda.current_device()) if device_kind == "cuda" else torch.device("cpu")
    results = {}
    for case in cases:
        try:
            results[case["name"]] = kinds[case.get("kind", "layer")](rank, ws, case, device)
        except Exception as exc:
            results[case["name"]] = f"FAILED {type(exc).__name__}: {exc}\n{traceback.format_exc()}"
            print(f"[rank {rank}] case {case['name']}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    # the group must still be usable: every case left the collectives matched
    t = torch.ones(1, device=device)
    dist.all_reduce(t)
    assert t.item() == ws
    return results


def ep_pairs(device_type: str) -> list[tuple[str, str]]:
    """Every (EP dispatcher, experts backend) pairing the contract accepts here."""
    cfg = MoEConfig(num_experts=8, top_k=2, hidden_size=32, intermediate_size=16)
    return [(d, x) for d in EP_DISPATCHERS for x in contract.EXPERTS
            if contract.pairing_problem(d, x, cfg, 2, device_type) is None]


def _scenarios_2() -> list[dict]:
    """Per pairing, on 2 ranks (experts: rank 0 holds the first half)."""
    return [
        dict(name="uneven", E=6, k=2, tokens=[[5, 0], [0, 3], [7, 6], [0, 0]]),
        dict(name="T1", E=6, k=2, tokens=[[1, 1], [1, 0], [0, 1]]),
        dict(name="skew-rank1", E=6, k=2, routing="one_rank:1", tokens=[[6, 4]]),
        dict(name="one-expert-k1", E=6, k=1, routing="one_expert:0", tokens=[[5, 6]]),
        dict(name="one-expert-k3", E=6, k=3, routing="one_expert:4", tokens=[[4, 3]]),
        dict(name="topk3>ranks-E5", E=5, k=3, tokens=[[5, 2]]),
        dict(name="placement", E=6, k=3, placement=[1, 0, 0, 1, 1, 0], tokens=[[4, 5]]),
        dict(name="fp32-gelu-bias", E=4, k=2, dtype="float32", activation="gelu", bias=True, tokens=[[6, 3]]),
        dict(name="sigmoid-grouped", E=8, k=3, cfg=dict(scoring="sigmoid", n_group=4, topk_group=2,
                                                         routed_scaling_factor=2.5), tokens=[[5, 4]]),
        dict(name="many", E=6, k=2, tokens=[[3, 1], [0, 0], [8, 2], [1, 8], [5, 5], [0, 7], [2, 0], [6, 6]]),
        dict(name="larger", E=16, k=4, H=64, I=48, routing="custom", seed=3, tokens=[[37, 20], [0, 50]]),
    ]


def _scenarios_4() -> list[dict]:
    return [
        dict(name="uneven-k2<ranks-E6", E=6, k=2, tokens=[[3, 0, 5, 1], [0, 0, 0, 2], [0, 0, 0, 0]]),
        dict(name="T1", E=8, k=2, tokens=[[1, 0, 0, 1], [1, 1, 1, 1]]),
        dict(name="k6>ranks-E7", E=7, k=6, tokens=[[4, 2, 0, 3]]),
        dict(name="skew-rank2", E=8, k=2, routing="one_rank:2", tokens=[[3, 4, 2, 5]]),
        dict(name="one-expert-k1", E=8, k=1, routing="one_expert:7", tokens=[[2, 3, 4, 1]]),
        dict(name="placement", E=6, k=3, placement=[3, 3, 2, 1, 0, 0], tokens=[[2, 5, 1, 3]]),
        dict(name="many", E=8, k=3, tokens=[[2, 1, 0, 3], [0, 0, 0, 0], [4, 4, 4, 4], [1, 0, 6, 2]]),
        dict(name="larger", E=18, k=5, H=64, I=48, seed=4, tokens=[[20, 0, 33, 9]]),
    ]


def _fuzz(ws: int, n: int, seed: int) -> list[dict]:
    """Random small configurations (fixed seeds): E, k, sizes, dtype, activation, biases, routing, a random
    placement that leaves no rank empty, and three forwards of random per-rank counts (zeros included)."""
    import random
    rng = random.Random(seed)
    out = []
    for i in range(n):
        E = rng.randint(ws, 12)
        k = rng.randint(1, min(E, 5))
        placement = None
        if rng.random() < 0.5:
            placement = list(range(ws)) + [rng.randrange(ws) for _ in range(E - ws)]
            rng.shuffle(placement)
        out.append(dict(name=f"fuzz{i}", E=E, k=k, H=rng.choice([16, 32, 48]), I=rng.choice([8, 24]),
                        dtype=rng.choice(["float32", "bfloat16"]), activation=rng.choice(["silu", "gelu", "swigluoai"]),
                        bias=rng.random() < 0.3, routing=rng.choice(["softmax", "custom"]), placement=placement,
                        seed=100 + i, tokens=[[rng.choice([0, 1, rng.randint(0, 12)]) for _ in range(ws)]
                                              for _ in range(3)]))
    return out


def _with_capacity(case: dict, dispatcher: str) -> dict:
    if _fixed_capacity(dispatcher):
        case = dict(case, M=max(max(c) for c in case["tokens"]) or 1)
    return case


def layer_cases(ws: int, device_type: str) -> list[dict]:
    named = _scenarios_2() if ws == 2 else _scenarios_4()
    fuzz = _fuzz(2, 6, seed=2) if ws == 2 else _fuzz(4, 4, seed=4)
    cases = []
    for d, x in ep_pairs(device_type):
        # the PyTorch backends get every scenario; others (Triton on a GPU: a compile per new shape) the
        # named scenarios only
        for s in named + (fuzz if x in BASIC_EXPERTS else []):
            cases.append(_with_capacity(dict(s, name=f"{d}-{x}-{s['name']}", dispatcher=d, experts=x), d))
    return cases


def capacity_cases(ws: int, device_type: str) -> list[dict]:
    """low_latency at max_tokens_per_rank - 1, exactly, + 1 (an error on every rank), then usable again."""
    M = 4
    over = [M + 1] + [2] * (ws - 1)
    seq = [[M - 1] * ws, [M] * ws, over, [M] + [0] * (ws - 1), [M + 2] * ws, [1] * ws]
    return [dict(name=f"{d}-{x}-capacity", dispatcher=d, experts=x, E=2 * ws, k=2, M=M,
                 routing="one_expert:0", tokens=seq) for d, x in ep_pairs(device_type) if _fixed_capacity(d)]


def handshake_cases(ws: int) -> list[dict]:
    base = dict(E=2 * ws, k=2, dispatcher="alltoall", experts="reference")
    last = ws - 1
    return [
        dict(kind="handshake", name="handshake-top_k", base=base, per_rank={last: dict(k=1)},
             mention=["config differs in top_k (rank 0: 2", f"rank {last}: 1)"]),
        dict(kind="handshake", name="handshake-dispatcher", base=base, per_rank={0: dict(dispatcher="allgather")},
             mention=["dispatcher differs", "'allgather'", "'alltoall'"]),
        dict(kind="handshake", name="handshake-placement", base=base,
             per_rank={0: dict(placement=list(reversed(Placement(2 * ws, ws, 0).owners)))},
             mention=["placement differs"]),
        dict(kind="handshake", name="handshake-capacity", base=dict(base, dispatcher="low_latency", M=4),
             per_rank={last: dict(M=8)}, mention=["max_tokens_per_rank differs"]),
        dict(kind="handshake", name="handshake-dtype", base=base, per_rank={last: dict(dtype="float32")},
             mention=["config differs in dtype", f"rank {last}: torch.float32"]),
        # rank 0 is refused by the contract before the handshake: it still answers, so nobody waits
        dict(kind="handshake", name="handshake-one-rank-refused", base=base, per_rank={0: dict(dispatcher="local")},
             expect={0: "UnsupportedCombination"}, mentions={r: ["rank 0 could not build", "UnsupportedCombination"]
                                                             for r in range(1, ws)}),
        dict(kind="handshake", name="handshake-all-refused", base=dict(base, dispatcher="local"),
             expect={r: "UnsupportedCombination" for r in range(ws)}),
        dict(kind="handshake", name="handshake-bad-placement", base=base,
             per_rank={last: dict(placement=[0] * (2 * ws))}, expect={last: "ValueError"},
             mentions={r: [f"rank {last} could not build"] for r in range(last)}),
    ]


def traffic_cases(ws: int) -> list[dict]:
    if ws == 2:
        return [dict(kind="traffic", name="traffic-k2", E=8, k=2, T=[7, 5]),
                dict(kind="traffic", name="traffic-k4-zero", E=8, k=4, T=[6, 0])]
    return [dict(kind="traffic", name="traffic-k2", E=8, k=2, T=[5, 0, 3, 6])]


def two_layer_cases(ws: int, device_type: str) -> list[dict]:
    flat = "grouped_mm" if ("alltoall", "grouped_mm") in ep_pairs(device_type) else "reference"
    return [dict(kind="two_layers", name="two-layers-alternating", E=2 * ws, k=2, M=6,
                 layers=[dict(dispatcher="alltoall", experts=flat), dict(dispatcher="low_latency", experts="batched"),
                         dict(dispatcher="allgather", experts="reference")],
                 tokens=[[3] * ws, [0] * ws, [6] + [1] * (ws - 1), [2] * (ws - 1) + [0]])]


def subgroup_cases(ws: int) -> list[dict]:
    if ws < 4:
        return []
    return [dict(kind="subgroups", name="subgroups-of-2", E=6, k=2, M=8,
                 layers=[dict(dispatcher="alltoall", experts="reference"),
                         dict(dispatcher="low_latency", experts="batched"),
                         dict(dispatcher="allgather", experts="reference")],
                 tokens=[[3, 5], [0, 2], [6, 0]])]


def all_cases(ws: int, device_type: str = "cpu") -> list[dict]:
    return (layer_cases(ws, device_type) + capacity_cases(ws, device_type) + handshake_cases(ws)
            + traffic_cases(ws) + two_layer_cases(ws, device_type) + subgroup_cases(ws))


def run_suite(ws: int, backend: str = "gloo", timeout_s: float = 240.0) -> tuple[list[dict], list[dict]]:
    device_type = "cuda" if backend == "nccl" else "cpu"
    cases = all_cases(ws, device_type)
    return cases, run_on_ranks(run_cases, ws, cases, device_type, backend=backend, timeout_s=timeout_s)


# -------------------------------------------------------------------------------------------- tests
def _assert_case(results: list[dict], name: str) -> None:
    bad = [f"--- rank {r} ---\n{res.get(name, 'missing')}" for r, res in enumerate(results)
           if not str(res.get(name, "missing")).startswith("ok")]
    assert not bad, f"case {name} failed:\n" + "\n".join(bad)


@pytest.fixture(scope="module")
def results_2():
    return run_suite(2)[1]


@pytest.fixture(scope="module")
def results_4():
    return run_suite(4)[1]


@pytest.mark.parametrize("name", [c["name"] for c in all_cases(2)])
def test_two_ranks(results_2, name):
    _assert_case(results_2, name)


@pytest.mark.parametrize("name", [c["name"] for c in all_cases(4)])
def test_four_ranks(results_4, name):
    _assert_case(results_4, name)


def test_every_ep_pairing_is_covered():
    """Each EP dispatcher has at least one experts backend here, and the refused layouts stay refused."""
    pairs = ep_pairs("cpu")
    on_cpu = {d for d in EP_DISPATCHERS if "cpu" in contract.dispatcher_class(d).CAPS.devices}
    assert {d for d, _ in pairs} == on_cpu and {"allgather", "alltoall", "low_latency"} <= on_cpu
    assert ("low_latency", "batched") in pairs and ("alltoall", "batched") not in pairs
    assert ("low_latency", "grouped_mm") not in pairs


_two_gpus = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                               reason="needs 2 CUDA GPUs")


@pytest.fixture(scope="module")
def results_nccl():
    return run_suite(2, backend="nccl", timeout_s=840)[1]


@pytest.mark.multigpu
@pytest.mark.timeout(900)     # the first test also sets the fixture up: spawn, NCCL, Triton compiles
@_two_gpus
@pytest.mark.parametrize("name", [c["name"] for c in all_cases(2, "cuda")] if torch.cuda.is_available() else [])
def test_two_gpus_nccl(results_nccl, name):
    _assert_case(results_nccl, name)


if __name__ == "__main__":  # python tests/test_ep_layer.py [ranks] [gloo|nccl]
    ws = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    be = sys.argv[2] if len(sys.argv) > 2 else "gloo"
    cases, res = run_suite(ws, be)
    for c in cases:
        print(c["name"], [str(r[c["name"]]).splitlines()[0] for r in res])
    os._exit(0)
