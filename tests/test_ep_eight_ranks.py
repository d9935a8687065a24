"""Expert parallelism on 8 ranks (Gloo on the CPU), and the NCCL suite on 2, 4 and 8 GPUs (`-m multigpu`).

CPU, 8 Gloo ranks, ONE process group for every case (process start costs seconds; the machinery is
tests/test_ep_layer.py's `run_cases` scenarios and checks): every EP dispatcher with the experts backend
`experts="auto"` picks for it, on uneven token counts with ranks at 0 (and all at 0), T = 1, top_k
below (2) and above (10) the rank count, E not divisible by 8 (9, 12, 13), skewed routing (every token
to one rank's experts; every token to one expert); low_latency at max_tokens_per_rank - 1, exactly and
+ 1 (the error on every rank, then the group still works); the traffic count (alltoall sends a token at
most once per destination); the handshake refusing disagreeing ranks; FP8 dispatch (alltoall and
low_latency, FP8 rows + scales on the wire, block scales) against the oracle and bit for bit against
the same layer with BF16 on the wire; and the CUDA-graph case's steps run "dry" (eager re-runs as
replays) so that the GPU session's code is exercised here. About 3 s on a 2-core machine.

GPUs, NCCL (`pytest -m multigpu`; rank counts from EPMOE_NCCL_RANKS, default "2,4,8", those above the
GPU count skip; EPMOE_NCCL_SKIP_EXPERTS=triton,... leaves experts backends out):
  2 GPUs: what test_ep_layer's own NCCL test lacks (FP8 dispatch, the CUDA graph);
  4 GPUs: test_ep_layer's whole 4-rank suite;
  8 GPUs: the 8-rank scenarios with every (dispatcher, experts) pairing the contract accepts on CUDA,
          random configurations, EP subgroups of 2, two layers alternating, the capacity edge,
          handshake and traffic;
  and at every count FP8 dispatch for every accepted pairing and granularity (block, channel), and
  `low_latency` with each CUDA-graph-safe batched experts backend captured in a CUDA graph per rank (a
  different T on each rank, two graphs each), replayed with fresh inputs and checked against the
  oracle and bit for bit against an eager forward.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_ep_layer as ep  # noqa: E402

from epmoe import Fp8Config, MoEConfig, MoELayer, contract, reference_moe  # noqa: E402
from epmoe.quant.fp8 import dequantize_weight, quantize_weight  # noqa: E402
from epmoe.testing import bound_for, capture, compare, load_experts, random_experts, run_on_ranks  # noqa: E402

WS = 8
FP8_QUANTS = {"block": dict(), "channel": dict(weight_block=None, per_channel_weights=True, activation="per_token")}


def default_pairs(ws: int, device_type: str) -> list[tuple[str, str]]:
    """(dispatcher, the experts backend experts="auto" resolves to) for each EP dispatcher."""
    cfg = MoEConfig(num_experts=16, top_k=2, hidden_size=32, intermediate_size=16)
    return [contract.resolve_names(d, "auto", cfg, ws, device_type) for d in runnable(ws, device_type)]


def runnable(ws: int, device_type: str) -> list[str]:
    """The EP dispatchers the contract accepts on `device_type` (the symmetric-memory ones need CUDA)."""
    cfg = MoEConfig(num_experts=16, top_k=2, hidden_size=32, intermediate_size=16)
    return [d for d in ep.EP_DISPATCHERS if contract.dispatcher_problem(d, cfg, ws, device_type) is None]


def scenarios_8() -> list[dict]:
    return [
        dict(name="uneven-zeros-k2-E12", E=12, k=2, tokens=[[3, 0, 5, 1, 0, 2, 0, 4], [0] * 7 + [2], [0] * 8]),
        dict(name="T1", E=8, k=2, tokens=[[1, 0, 0, 0, 0, 0, 0, 1], [1] * 8]),
        dict(name="k10>ranks-E13", E=13, k=10, tokens=[[2, 1, 0, 3, 0, 1, 2, 0]]),
        dict(name="skew-rank5", E=16, k=2, routing="one_rank:5", tokens=[[2, 3, 1, 0, 4, 2, 1, 3]]),
        dict(name="one-expert-E9", E=9, k=3, routing="one_expert:8", tokens=[[1, 2, 0, 3, 1, 0, 2, 1]]),
    ]


def traffic_cases_8() -> list[dict]:
    return [dict(kind="traffic", name="traffic-k3", E=24, k=3, T=[5, 0, 3, 6, 1, 0, 2, 4])]


def subgroup_cases_8() -> list[dict]:
    """test_ep_layer's EP groups of 2, with the capacity raised for 8 ranks (group g adds g tokens per rank)."""
    out = []
    for c in ep.subgroup_cases(WS):
        most = max(max(t) for t in c["tokens"]) + (WS - 1) // 2
        out.append(dict(c, M=max(c["M"], most)))
    return out


def _fp8_cfg(case: dict, dispatch_fp8: bool) -> MoEConfig:
    return MoEConfig(num_experts=case["E"], top_k=case["k"], hidden_size=case.get("H", 200),
                     intermediate_size=case.get("I", 72), dtype=torch.bfloat16,
                     quant=Fp8Config(dispatch_fp8=dispatch_fp8, **FP8_QUANTS[case["quant"]]))


def fp8_cases(ws: int, device_type: str, quants=("block", "channel"), only_default: bool = False) -> list[dict]:
    """FP8 dispatch for every FP8-capable dispatcher and experts backend the contract accepts here."""
    cases = []
    tokens = [[3 * r % 7 for r in range(ws)], [0] * (ws - 1) + [5], [1] * ws]
    for d in ("alltoall", "low_latency"):
        for q in quants:
            base = dict(kind="fp8", E=2 * ws + 1, k=3, quant=q, dispatcher=d, tokens=tokens,
                        M=max(max(t) for t in tokens))
            cfg = _fp8_cfg(base, True)
            if only_default:
                names = [contract.resolve_names(d, "auto", cfg, ws, device_type)[1]]
            else:
                names = list(contract.EXPERTS)
            for x in names:
                if contract.pairing_problem(d, x, cfg, ws, device_type) is None:
                    cases.append(dict(base, name=f"fp8-{d}-{x}-{q}", experts=x))
    return cases


def graph_cases(ws: int, device_type: str) -> list[dict]:
    """low_latency + each CUDA-graph-safe experts backend that takes the batched layout: captured in a CUDA
    graph on a GPU; on the CPU a "dry" run of the same steps with eager re-runs as replays (tiny shapes)."""
    gpu = device_type == "cuda"
    E, k, H, I, M = (4 * ws, 4, 1024, 512, 48) if gpu else (2 * ws, 3, 64, 32, 6)
    cfg = MoEConfig(num_experts=E, top_k=k, hidden_size=H, intermediate_size=I)
    names = [x for x in contract.EXPERTS if contract.pairing_problem("low_latency", x, cfg, ws, device_type) is None
             and contract.graph_safe("low_latency", x)]
    sizes = [[M, 5] if r == 0 else [1 + (7 * r) % M, 1 + r % 3] for r in range(ws)]   # rank 0 at the capacity
    return [dict(kind="graph", name=f"graph{'' if gpu else '-dry'}-low_latency-{x}", E=E, k=k, H=H, I=I, M=M,
                 experts=x, sizes=sizes, replays=4 if gpu else 2) for x in names]


# ------------------------------------------------------------------------------------------- cases
def case_fp8(rank: int, ws: int, case: dict, device) -> str:
    """FP8 rows + scales on the wire vs the oracle (dequantized weights, quantized activations) and bit for
    bit vs the same layer with BF16 on the wire (then the layer quantizes after dispatch, same formula)."""
    wire_cfg, after_cfg = _fp8_cfg(case, True), _fp8_cfg(case, False)
    layers = {}
    for tag, cfg in (("wire", wire_cfg), ("after", after_cfg)):
        layers[tag] = MoELayer(cfg, ep_group=dist.group.WORLD, dispatcher=case["dispatcher"],
                               experts=case["experts"], device=device, max_tokens_per_rank=case["M"])
    assert layers["wire"].activation_handoff == contract.HANDOFF_ON_THE_WIRE, layers["wire"].activation_handoff
    weights = random_experts(wire_cfg, seed=case.get("seed", 11))
    for layer in layers.values():
        load_experts(layer, weights)
    q = wire_cfg.quant
    oracle = [tuple(dequantize_weight(*quantize_weight(w.to(device), q.weight_granularity, q.weight_block),
                                      q.weight_block).cpu() for w in e) for e in weights]
    fails = ep.Failures()

    def one(f, counts):
        x, logits = ep._inputs(wire_cfg, counts, rank, seed=40 + f, device=device)
        out = {tag: layer(x, logits) for tag, layer in layers.items()}
        if x.shape[0] == 0:
            assert out["wire"].shape == (0, wire_cfg.hidden_size)
            return
        ref = reference_moe(x, logits, oracle, wire_cfg)
        res = compare(out["wire"], ref)
        bound = bound_for(wire_cfg.dtype, fp8=True)
        assert res.finite and res.rel_err <= bound, f"forward {f} tokens {counts}: vs the oracle\n{res.report}"
        assert torch.equal(out["wire"], out["after"]), \
            (f"forward {f} tokens {counts}: FP8 on the wire differs from quantizing after dispatch, max abs diff "
             f"{(out['wire'].float() - out['after'].float()).abs().max().item():.3e}")

    for f, counts in enumerate(case["tokens"]):
        fails.check(one, f, counts)
    return fails.done("ok")


def case_graph(rank: int, ws: int, case: dict, device) -> str:
    """Two graphs per rank (different T on each rank, T <= M), replayed with fresh inputs; every replay vs
    the oracle and vs an eager forward of the same inputs (the same kernels: equal bits)."""
    cfg = MoEConfig(num_experts=case["E"], top_k=case["k"], hidden_size=case["H"], intermediate_size=case["I"],
                    dtype=torch.bfloat16)
    layer = MoELayer(cfg, ep_group=dist.group.WORLD, dispatcher="low_latency", experts=case["experts"],
                     device=device, max_tokens_per_rank=case["M"])
    weights = random_experts(cfg, seed=3)
    load_experts(layer, weights)
    weights = [tuple(w.to(cfg.dtype).float() for w in e) for e in weights]
    gen = torch.Generator().manual_seed(500 + rank)

    def fresh(T):
        return torch.randn(T, cfg.hidden_size, generator=gen).to(cfg.dtype), torch.randn(T, cfg.num_experts,
                                                                                         generator=gen) * 2
    graphs = []
    for T in case["sizes"][rank]:
        x0, l0 = fresh(T)
        xs, ls = x0.to(device), l0.to(device)
        replay, out = capture(lambda xs=xs, ls=ls: layer(xs, ls), device)
        graphs.append((replay, xs, ls, out))
    fails, worst = ep.Failures(), 0.0

    def one(i, replay, xs, ls, out_static):
        x, logits = fresh(xs.shape[0])
        xs.copy_(x)
        ls.copy_(logits)
        replay()
        if device.type == "cuda":
            torch.cuda.synchronize()
        got = out_static.clone()
        eager = layer(x.to(device), logits.to(device))
        res = compare(got, reference_moe(x, logits, weights, cfg))
        assert res.finite and res.rel_err <= bound_for(cfg.dtype), f"replay {i} T={xs.shape[0]}\n{res.report}"
        assert torch.equal(got, eager), (f"replay {i} T={xs.shape[0]}: graph and eager differ by "
                                         f"{(got.float() - eager.float()).abs().max().item():.3e}")
        return res.rel_err

    for i in range(case["replays"]):
        for g in graphs:
            worst = max(worst, fails.check(one, i, *g))
    return fails.done(f"ok ({case['replays'] * len(graphs)} replays, worst rel err {worst:.2e})")


KINDS = dict(ep.KINDS, fp8=case_fp8, graph=case_graph)


def run_cases(rank: int, ws: int, cases: list[dict], device_kind: str = "cpu") -> dict:
    """Every case on this rank ({name: "ok ..." or the error}), with this file's case kinds too."""
    return ep.run_cases(rank, ws, cases, device_kind, kinds=KINDS)


# ------------------------------------------------------------------------------------------ case lists
def core_cases(device_type: str = "cpu") -> list[dict]:
    """The 8-rank CPU set: each dispatcher with its default experts backend."""
    cases = []
    for d, x in default_pairs(WS, device_type):
        for s in scenarios_8():
            cases.append(ep._with_capacity(dict(s, name=f"{d}-{x}-{s['name']}", dispatcher=d, experts=x), d))
    ll = dict(default_pairs(WS, device_type))["low_latency"]
    cases += [c for c in ep.capacity_cases(WS, device_type) if c["experts"] == ll]
    cases += [c for c in ep.handshake_cases(WS) if c["name"] in ("handshake-dispatcher", "handshake-one-rank-refused")]
    cases += traffic_cases_8()
    cases += fp8_cases(WS, device_type, quants=("block",), only_default=True)
    cases += graph_cases(WS, device_type)
    return cases


def full_cases(ws: int, device_type: str = "cuda") -> list[dict]:
    """The NCCL set for 2, 4 or 8 GPUs (on 2, test_ep_layer's own NCCL test has the layer cases; this adds
    FP8 dispatch and the CUDA graph)."""
    if ws == 2:
        cases = []
    elif ws == 4:
        cases = ep.all_cases(4, device_type)
    elif ws == WS:
        cases = []
        for d, x in ep.ep_pairs(device_type):
            for s in scenarios_8() + (ep._fuzz(WS, 3, seed=8) if x in ep.BASIC_EXPERTS else []):
                cases.append(ep._with_capacity(dict(s, name=f"{d}-{x}-{s['name']}", dispatcher=d, experts=x), d))
        cases += (ep.capacity_cases(WS, device_type) + ep.handshake_cases(WS) + traffic_cases_8()
                  + ep.two_layer_cases(WS, device_type) + subgroup_cases_8())
    else:
        raise ValueError(f"the NCCL suite has case lists for 2, 4 and {WS} ranks, not {ws}")
    return cases + fp8_cases(ws, device_type) + graph_cases(ws, device_type)


# -------------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def results_8():
    return run_on_ranks(run_cases, WS, core_cases("cpu"), "cpu", backend="gloo", timeout_s=120)


@pytest.mark.parametrize("name", [c["name"] for c in core_cases("cpu")])
def test_eight_ranks(results_8, name):
    ep._assert_case(results_8, name)


def test_eight_rank_set_covers_the_brief():
    cases = core_cases("cpu")
    layer = [c for c in cases if c.get("kind", "layer") == "layer"]
    assert {c["dispatcher"] for c in layer} == set(runnable(WS, "cpu")) >= {"allgather", "alltoall", "low_latency"}
    assert any(c["k"] < WS for c in layer) and any(c["k"] > WS for c in layer)
    assert all(any(c["E"] % WS for c in layer if c["dispatcher"] == d) for d in runnable(WS, "cpu"))
    assert any(0 in counts and any(counts) for c in layer for counts in c["tokens"])
    assert any(all(t == 0 for t in counts) for c in layer for counts in c["tokens"])
    cap = [c for c in cases if c["name"].startswith("low_latency-") and c["name"].endswith("-capacity")]
    assert cap and any(max(t) > c["M"] for c in cap for t in c["tokens"])
    assert {c["dispatcher"] for c in cases if c.get("kind") == "fp8"} == {"alltoall", "low_latency"}
    assert all(len(counts) == WS for c in layer for counts in c["tokens"])


def test_nccl_case_lists_are_well_formed():
    """The lists the GPU session runs, built here for the CPU's pairings: names unique, shapes per rank."""
    assert [c["kind"] for c in full_cases(2, "cpu")] == ["fp8"] * 4 + ["graph"]
    for ws in (4, WS):
        cases = full_cases(ws, "cpu")
        names = [c["name"] for c in cases]
        assert len(names) == len(set(names)), [n for n in names if names.count(n) > 1]
        for c in cases:
            for counts in c.get("tokens", []):
                assert len(counts) == (2 if c.get("kind") == "subgroups" else ws), c["name"]
            if "T" in c:
                assert len(c["T"]) == ws
    for dev in ("cpu", "cuda"):
        g = graph_cases(WS, dev)
        assert all(len(c["sizes"]) == WS and max(max(s) for s in c["sizes"]) == c["M"] for c in g)
        assert all(min(min(s) for s in c["sizes"]) >= 1 for c in g)
    assert [c["experts"] for c in graph_cases(WS, "cpu")] == ["batched"]


# ----------------------------------------------------------------------------------- NCCL (multigpu)
NCCL_RANKS = (2, 4, WS)


def nccl_rank_counts() -> list[int]:
    raw = os.environ.get("EPMOE_NCCL_RANKS", ",".join(map(str, NCCL_RANKS)))
    counts = [int(v) for v in raw.split(",") if v.strip()]
    bad = [c for c in counts if c not in NCCL_RANKS]
    if bad:
        raise ValueError(f"EPMOE_NCCL_RANKS={raw!r}: this file has NCCL suites for {NCCL_RANKS} ranks")
    return counts


def nccl_cases(ws: int) -> list[dict]:
    """full_cases on CUDA without the experts backends named in EPMOE_NCCL_SKIP_EXPERTS (comma-separated;
    e.g. triton, whose kernels compile once per test shape and have their own GPU tests)."""
    skip = {v.strip() for v in os.environ.get("EPMOE_NCCL_SKIP_EXPERTS", "").split(",") if v.strip()}
    return [c for c in full_cases(ws, "cuda") if c.get("experts") not in skip]


def _nccl_params() -> list:
    if not torch.cuda.is_available():
        return []
    return [pytest.param(ws, c["name"], id=f"{ws}gpus-{c['name']}")
            for ws in nccl_rank_counts() for c in nccl_cases(ws)]


def test_nccl_selection_from_the_environment(monkeypatch):
    monkeypatch.setenv("EPMOE_NCCL_RANKS", "4,8")
    assert nccl_rank_counts() == [4, 8]
    monkeypatch.setenv("EPMOE_NCCL_RANKS", "3")
    with pytest.raises(ValueError, match="2, 4, 8"):
        nccl_rank_counts()
    monkeypatch.setenv("EPMOE_NCCL_SKIP_EXPERTS", "batched, reference")
    kept = nccl_cases(WS)
    assert kept and not any(c.get("experts") in ("batched", "reference") for c in kept)
    assert {c.get("kind", "layer") for c in kept} >= {"layer", "handshake", "traffic", "two_layers", "subgroups"}
    monkeypatch.delenv("EPMOE_NCCL_SKIP_EXPERTS")
    assert len(nccl_cases(WS)) > len(kept)


@pytest.fixture(scope="module")
def nccl_results():
    cache: dict = {}

    def get(ws: int):
        if ws not in cache:
            try:
                cache[ws] = run_on_ranks(run_cases, ws, nccl_cases(ws), "cuda", backend="nccl",
                                         timeout_s=float(os.environ.get("EPMOE_NCCL_TIMEOUT", "900")))
            except Exception as exc:   # one failed run fails each of its cases, not a retry per case
                cache[ws] = exc
        if isinstance(cache[ws], Exception):
            raise cache[ws]
        return cache[ws]
    return get


@pytest.mark.multigpu
@pytest.mark.timeout(1200)    # the first case of a rank count also starts its ranks (spawn, NCCL, compiles)
@pytest.mark.parametrize("ws,name", _nccl_params())
def test_nccl_gpus(nccl_results, ws, name):
    if torch.cuda.device_count() < ws:
        pytest.skip(f"needs {ws} CUDA GPUs, found {torch.cuda.device_count()}")
    ep._assert_case(nccl_results(ws), name)


if __name__ == "__main__":  # python tests/test_ep_eight_ranks.py [gloo|nccl] [ranks]
    be = sys.argv[1] if len(sys.argv) > 1 else "gloo"
    ws = int(sys.argv[2]) if len(sys.argv) > 2 else WS
    cases = core_cases("cpu") if be == "gloo" else full_cases(ws, "cuda")
    res = run_on_ranks(run_cases, ws, cases, "cpu" if be == "gloo" else "cuda", backend=be, timeout_s=900)
    for c in cases:
        print(c["name"], [str(r[c["name"]]).splitlines()[0] for r in res])
    os._exit(0)
