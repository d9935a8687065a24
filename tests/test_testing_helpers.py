import os
import time

import pytest
import torch
import torch.distributed as dist

from epmoe.testing import assert_close, compare, run_on_ranks


def test_assert_close_reports_diagnostics():
    ref = torch.randn(20, 8, dtype=torch.float64)
    out = ref.clone()
    out[7] += 1.0
    with pytest.raises(AssertionError) as info:
        assert_close(out, ref, 1e-3, context="case-x")
    msg = str(info.value)
    assert "case-x" in msg and "rel err" in msg and "max abs err = 1.000e+00" in msg
    assert msg.index("row 7") < msg.index("worst rows") + 40
    assert "min" in msg and "max" in msg


def test_nan_never_passes():
    ref = torch.randn(4, 4, dtype=torch.float64)
    out = ref.clone()
    out[1, 2] = float("nan")
    out[2, 2] = float("inf")
    with pytest.raises(AssertionError, match="NaN/Inf: actual 1/1"):
        assert_close(out, ref, 1.0)
    assert compare(ref.clone(), ref).rel_err == 0.0
    with pytest.raises(AssertionError, match="shape mismatch"):
        assert_close(ref[:2], ref)


def _sum_ranks(rank, world):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return (rank, t.item())


def _fail_on_one(rank, world):
    if rank == 1:
        raise ValueError("rank one is unhappy")
    dist.barrier()
    return rank


def _hang_on_zero(rank, world):
    if rank == 0:
        import time
        time.sleep(60)
    return rank


def _exit_on_one(rank, world):
    if rank == 1:
        os._exit(3)      # a rank that dies without a word, e.g. killed while starting
    time.sleep(60)       # a rank that would wait for it (in a rendezvous, a collective) until its timeout
    return rank


def test_run_on_ranks_stops_the_others_when_a_rank_dies():
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"ranks \[0\] were stopped 1s after rank 1 failed(.|\n)*"
                                           r"rank 1 ---\nprocess exited with code 3"):
        run_on_ranks(_exit_on_one, 2, timeout_s=120, grace_s=1.0)
    assert time.monotonic() - t0 < 30


def test_run_on_ranks_collects_results():
    assert run_on_ranks(_sum_ranks, 3, timeout_s=60) == [(0, 6.0), (1, 6.0), (2, 6.0)]


def test_run_on_ranks_reports_the_failing_rank():
    with pytest.raises(RuntimeError, match="rank 1 ---\nValueError: rank one is unhappy"):
        run_on_ranks(_fail_on_one, 2, timeout_s=30)


def test_run_on_ranks_kills_a_hung_rank():
    with pytest.raises(RuntimeError, match=r"ranks \[0\] did not finish within 3s"):
        run_on_ranks(_hang_on_zero, 2, timeout_s=3)


@pytest.mark.parametrize("quant", [None, "fp8_block"])
def test_layer_experts_is_what_the_layer_holds(quant):
    """LayerExperts hands the oracle the layer's own weights (real sizes out of padded storage, FP8
    dequantized, biases included): the oracle over it reproduces the layer, and ids out of range raise."""
    from epmoe import Fp8Config, MoEConfig, MoELayer, reference_moe
    from epmoe.testing import LayerExperts, load_experts, random_experts
    q = Fp8Config(weight_block=(128, 128), activation="per_token_group") if quant else None
    cfg = MoEConfig(num_experts=4, top_k=2, hidden_size=180, intermediate_size=72, dtype=torch.float32, quant=q)
    experts = random_experts(cfg, seed=3, with_bias=True)
    layer = MoELayer(cfg, experts="reference", expert_bias=True)
    load_experts(layer, experts)
    view = LayerExperts(layer)
    assert len(view) == 4 and len(view[1]) == 6
    for got, want in zip(view[1], experts[1]):
        assert got.shape == want.shape
        if quant is None:
            assert torch.equal(got, want)
    g = torch.Generator().manual_seed(4)
    x, logits = torch.randn(9, 180, generator=g), torch.randn(9, 4, generator=g)
    assert_close(layer(x, logits), reference_moe(x, logits, view, cfg), 1e-5)
    with pytest.raises(IndexError):
        view[4]


def test_interpreter_refusal_names_the_known_incompatibility_only(monkeypatch):
    """The interpreter harness skips (with the versions) only where the loop probe fails the known way; a probe
    that passes, or fails otherwise, lets the file run and show its own failure."""
    import subprocess
    from types import SimpleNamespace

    from epmoe.testing import interpreter

    def fake_run(result):
        def run(cmd, **kw):
            assert "TRITON_INTERPRET" in kw["env"] and "loop_over_argument" in cmd[-1]
            return result
        return run

    def timed_out(cmd, **kw):
        raise subprocess.TimeoutExpired(cmd, kw.get("timeout"))

    monkeypatch.setattr(interpreter, "_installed", {"triton": "3.6.0", "numpy": "2.4.6"}.get)
    try:
        for result, refused in ((SimpleNamespace(returncode=0, stdout="", stderr=""), False),
                                (SimpleNamespace(returncode=1, stdout="", stderr="SyntaxError: x"), False),
                                (SimpleNamespace(returncode=1, stdout="", stderr="TypeError: only 0-dimensional "
                                                 "arrays can be converted to Python scalars"), True),
                                (None, False)):
            interpreter.interpreter_refusal.cache_clear()
            monkeypatch.setattr(subprocess, "run", fake_run(result) if result is not None else timed_out)
            why = interpreter.interpreter_refusal()
            assert (why is not None) == refused
            if refused:
                assert "Triton 3.6.0" in why and "NumPy 2.4.6" in why
                with pytest.raises(pytest.skip.Exception, match="cannot loop over"):
                    interpreter.run_interpreted(__file__)
    finally:
        interpreter.interpreter_refusal.cache_clear()     # the session's own answer, not a fake one
