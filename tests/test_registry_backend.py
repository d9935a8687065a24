"""A dispatcher added through the registry alone, in one file of a test, runs through everything that
names backends: the contract and its support matrix, `epmoe info`, `epmoe run` (its pre-flight check
and its ranks) and `epmoe bench dispatch`. Every decision about it comes from what it declares in `CAPS`
(fixed capacity here), never from its name."""
import json

import pytest
import torch

from epmoe import MoEConfig, contract, register_dispatcher
from epmoe.cli import main
from epmoe.dispatch.low_latency import LowLatencyDispatcher
from epmoe.registry import unregister

NAME = "_test_fixed_capacity"


class _FixedCapacity(LowLatencyDispatcher):
    """The low_latency algorithm under another name: fixed capacity, batched layout."""

    CAPS = contract.DispatcherCaps(layout="batched", communicates=True, cuda_graph_safe=True, needs_max_tokens=True,
                                   fp8_dispatch=True, summary="test backend: fixed capacity, through the registry alone")


@pytest.fixture
def registered():
    register_dispatcher(NAME)(_FixedCapacity)
    try:
        yield NAME
    finally:
        unregister(NAME)
    assert NAME not in contract.DISPATCHERS


def test_contract_and_info_list_it(registered, capsys):
    cfg = MoEConfig(num_experts=8, top_k=2, hidden_size=64, intermediate_size=32, dtype=torch.float32)
    assert (NAME, "batched") in contract.supported_pairings(cfg, 2, "cpu")
    assert (NAME, "grouped_mm") not in contract.supported_pairings(cfg, 2, "cpu")       # flat experts: refused
    assert {r.experts for r in contract.support_matrix() if r.dispatcher == NAME and r.problem is None} >= {"batched"}
    assert contract.needs_capacity(NAME) and contract.resolve_names("auto", "auto", cfg, 2, "cpu")[0] != NAME
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert NAME in out and "fixed capacity, through the registry alone" in out


def test_epmoe_run_gives_it_a_capacity_and_refuses_one_below_the_tokens(registered, tmp_path, capsys):
    report = tmp_path / "r.json"
    assert main(["run", "--dispatcher", NAME, "--tokens", "12", "--iters", "1", "--warmup", "0",
                 "--json", str(report)]) == 0                      # the capacity defaults to --tokens
    ranks = json.loads(report.read_text())["ranks"]
    assert [r["dispatcher"] for r in ranks] == [NAME, NAME] and all(r["rel_err"] <= r["bound"] for r in ranks)
    capsys.readouterr()
    assert main(["run", "--dispatcher", NAME, "--tokens", "12", "--max-tokens-per-rank", "4"]) == 2
    err = capsys.readouterr().err
    assert "--max-tokens-per-rank 4" in err and "12 or more" in err


def test_epmoe_bench_dispatch_measures_it(registered, tmp_path):
    out = tmp_path / "d.json"
    assert main(["bench", "dispatch", "--dispatchers", NAME, "--tokens", "8", "--hidden", "64", "--experts", "8",
                 "--top-k", "2", "--dtype", "float32", "--reps", "1", "--warmup", "0", "--ranks", "2",
                 "--no-default", "--output", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["dispatcher"] for r in rows] == [NAME] and rows[0]["dispatch_bytes_to_peers"] > 0
