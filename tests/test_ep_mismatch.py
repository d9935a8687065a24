"""Ranks that call different layers in the same step, or skip a forward, raise `RankMismatch` on every
rank within seconds, naming what differs, and the group's next aligned forward is correct.

Every forward of every communicating dispatcher starts with the same fixed-size exchange (the forward
header), so a mismatch is caught before any exchange whose shape depends on the layer: no hang, no
aborted process, no rows indexed with another layer's metadata. One process group per rank count runs
every case in turn, which also shows that the group stays usable after each mismatch.
"""
import time

import pytest
import torch
import torch.distributed as dist

from epmoe import MoEConfig, MoELayer, RankMismatch, reference_moe
from epmoe.testing import assert_close, load_experts, random_experts, random_inputs, run_on_ranks

BASE = dict(num_experts=8, top_k=2, hidden_size=24, intermediate_size=16, dtype=torch.float32)
EXPERTS = {"allgather": "grouped_mm", "alltoall": "grouped_mm", "low_latency": "batched",
           "symm_high_throughput": "grouped_mm", "symm_low_latency": "batched"}
FIXED_CAPACITY = ("low_latency", "symm_low_latency", "symm_high_throughput")   # built with max_tokens_per_rank
SYMM_TIMEOUT_S = 5.0   # symmetric-memory layers (GPU runs): a failure shows as a timeout, never a hang

# (case, layer on even ranks, layer on odd ranks, what the error must name); a layer: (dispatcher, changes)
CASES = [
    ("allgather vs alltoall", ("allgather", {}), ("alltoall", {}), "dispatcher differs"),
    ("allgather vs low_latency", ("allgather", {}), ("low_latency", {}), "dispatcher differs"),
    ("alltoall vs low_latency", ("alltoall", {}), ("low_latency", {}), "dispatcher differs"),
    ("low_latency capacities", ("low_latency", {}), ("low_latency", {"M": 12}), "max_tokens_per_rank differs"),
    ("low_latency row sizes", ("low_latency", {}), ("low_latency", {"hidden_size": 40}), "wire row bytes differs"),
    ("alltoall row sizes", ("alltoall", {}), ("alltoall", {"hidden_size": 40}), "wire row bytes differs"),
    ("allgather row sizes", ("allgather", {}), ("allgather", {"hidden_size": 40}), "wire row bytes differs"),
    ("low_latency expert counts", ("low_latency", {}), ("low_latency", {"num_experts": 12}), "num_experts differs"),
    ("alltoall expert counts", ("alltoall", {}), ("alltoall", {"num_experts": 12}), "num_experts differs"),
    ("allgather expert counts", ("allgather", {}), ("allgather", {"num_experts": 12}), "num_experts differs"),
]
SKIPS = ["allgather", "alltoall", "low_latency"]
DEADLINE_S = 5.0     # a mismatch must be reported this fast on every rank (a hang would take minutes)


def _build(spec, seed):
    """A layer (dispatcher, {config changes, "M": max_tokens_per_rank}) on the default group, on the group's
    device (the current GPU with NCCL), and the float32 expert weights it holds."""
    dispatcher, changes = spec
    changes = dict(changes)
    M = changes.pop("M", 8) if dispatcher in FIXED_CAPACITY else None
    cfg = MoEConfig(**{**BASE, **changes})
    layer = MoELayer(cfg, ep_group=dist.group.WORLD, dispatcher=dispatcher, experts=EXPERTS[dispatcher],
                     max_tokens_per_rank=M)
    if hasattr(layer.dispatcher, "timeout_s"):
        layer.dispatcher.timeout_s = SYMM_TIMEOUT_S
    weights = random_experts(cfg, seed=seed)
    load_experts(layer, weights)
    return layer, weights


def _run_step(rank, layers, calls):
    """Run `calls` (indices into `layers`) as one step; a RankMismatch abandons the rest of the step (what
    an engine does on an error). Returns (error text or None, seconds until it was raised)."""
    x_cache = {}
    start = time.monotonic()
    for i in calls:
        layer, _ = layers[i]
        x, logits = x_cache.setdefault(i, random_inputs(layer.cfg, 3 + rank, seed=rank, device=layer.device))
        try:
            layer(x, logits)
        except RankMismatch as exc:
            return str(exc), time.monotonic() - start
    return None, time.monotonic() - start


def _aligned_forwards_are_correct(rank, layers):
    for layer, weights in layers:
        x, logits = random_inputs(layer.cfg, 2 + rank, seed=10 + rank, device=layer.device)
        assert_close(layer(x, logits).cpu(), reference_moe(x.cpu(), logits.cpu(), weights, layer.cfg))


def _every_case(rank, world):
    report = {}
    for case, even, odd, _ in CASES:
        layers = [_build(even, seed=1), _build(odd, seed=2)]
        report[case] = _run_step(rank, layers, [rank % 2])
        _aligned_forwards_are_correct(rank, layers)
    for dispatcher in SKIPS:
        # a step runs layers A then B; the odd ranks skip A's forward and go straight to B
        layers = [_build((dispatcher, {}), seed=3), _build((dispatcher, {}), seed=4)]
        report[f"{dispatcher} skipped forward"] = _run_step(rank, layers, [1] if rank % 2 else [0, 1])
        _aligned_forwards_are_correct(rank, layers)
    return report


def _check_reports(reports):
    expected = {case: text for case, _, _, text in CASES}
    expected.update({f"{d} skipped forward": "same layer's same forward" for d in SKIPS})
    for rank, report in enumerate(reports):
        assert set(report) == set(expected)
        for case, (error, seconds) in report.items():
            assert error is not None, f"rank {rank}, {case}: no error"
            assert expected[case] in error and "same layer's same forward" in error, (rank, case, error)
            assert seconds < DEADLINE_S, f"rank {rank}, {case}: raised after {seconds:.1f}s"


@pytest.mark.parametrize("world", [2, 4])
def test_mismatched_layers_raise_on_every_rank_and_the_next_forward_is_correct(world):
    _check_reports(run_on_ranks(_every_case, world, backend="gloo", timeout_s=120))


@pytest.mark.gpu
@pytest.mark.multigpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_mismatched_layers_on_nccl():
    """The same cases on 2 GPUs, NCCL (benchmarks/gpu_mismatch_check.py adds the symmetric-memory ones)."""
    _check_reports(run_on_ranks(_every_case, 2, backend="nccl", timeout_s=180))
