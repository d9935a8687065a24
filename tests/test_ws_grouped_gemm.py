"""The warp-specialized Gluon grouped GEMM (`epmoe.kernels.ws_grouped_gemm`) without a GPU: its compile
for sm_90 (Triton's bundled ptxas) keeps the schedule it was written for, and its host checks refuse bad
operands before any launch. Its numbers are checked on a GPU by `benchmarks/gluon_gemm_probe.py`."""
from __future__ import annotations

import re

import pytest
import torch

gluon_gemm = pytest.importorskip("epmoe.kernels.ws_grouped_gemm", reason="this Triton has no Gluon",
                                 exc_type=ImportError)


def _compiled(fp8: bool, block_n: int, stages: int):
    from epmoe.kernels.xcompile import CrossCompileUnavailable, resource_usage
    try:
        c = gluon_gemm.compile_ws_gemm_for_hopper(fp8, block_n=block_n, stages=stages)
    except CrossCompileUnavailable as exc:      # depends on the Triton build
        pytest.skip(str(exc))
    return c, resource_usage(c)


@pytest.mark.parametrize("fp8,block_n,stages", [(True, 128, 4), (False, 256, 3)])
def test_sm90_compile_keeps_the_schedule(fp8, block_n, stages):
    c, use = _compiled(fp8, block_n, stages)
    ptx = c.asm["ptx"]
    if use:
        assert use["LOCAL"] == 0, f"spills: {use}"
    # registers moved between partitions, both operands by TMA, wgmma from two warpgroups
    assert "setmaxnreg.inc" in ptx and "setmaxnreg.dec" in ptx
    assert ptx.count("cp.async.bulk.tensor") == 2
    assert "cp.async.cg" not in ptx and "cp.async.ca" not in ptx
    assert len(re.findall(r"wgmma\.mma_async", ptx)) == 8
    # no barrier spans both math warpgroups (256 threads) or the whole CTA: each waits only for its own
    # warps, which is what lets one promote while the other multiplies
    for threads in re.findall(r"bar\.sync\s+\d+,\s*(\d+);", ptx):
        assert int(threads) <= 128
    assert not re.search(r"bar\.sync\s+\d+;", ptx)
    assert c.metadata.shared <= 227 * 1024


def _operands(fp8=True, M=256, N=256, K=256, E=2):
    dt = torch.float8_e4m3fn if fp8 else torch.bfloat16
    a = torch.zeros(M, K, dtype=dt)
    w = torch.zeros(E, N, K, dtype=dt)
    te = torch.zeros(M // 128, dtype=torch.int32)
    out = torch.empty(M, N, dtype=torch.bfloat16)
    scales = (torch.ones(K // 128, M), torch.ones(E, N // 128, K // 128)) if fp8 else (None, None)
    return a, w, te, out, scales


def test_host_checks_refuse_bad_operands():
    a, w, te, out, (sa, sw) = _operands()
    with pytest.raises(ValueError, match="a_scale_t and w_scale"):
        gluon_gemm.grouped_gemm_ws(a, w, te, out)
    with pytest.raises(ValueError, match="A \\[M_pad, K\\] and W \\[E, N, K\\]"):
        gluon_gemm.grouped_gemm_ws(a, w[:, :, :128], te, out, sa, sw)
    with pytest.raises(ValueError, match="tiles of 128"):
        gluon_gemm.grouped_gemm_ws(a, w, te[:1], out, sa, sw)
    with pytest.raises(ValueError, match="bfloat16"):
        gluon_gemm.grouped_gemm_ws(a, w, te, out.float(), sa, sw)
    with pytest.raises(ValueError, match="block_k 128"):
        gluon_gemm.grouped_gemm_ws(a, w, te, out, sa, sw, block_n=256)
    a16, w16, te16, out16, _ = _operands(fp8=False)
    with pytest.raises(ValueError, match="a_scale_t and w_scale"):
        gluon_gemm.grouped_gemm_ws(a16, w16, te16, out16, sa, sw)


def test_host_checks_refuse_bad_layouts():
    a, w, te, out, (sa, sw) = _operands()
    with pytest.raises(ValueError, match="block_m is 128"):
        gluon_gemm.grouped_gemm_ws(a, w, te, out, sa, sw, block_m=64)
    with pytest.raises(ValueError, match="int32"):
        gluon_gemm.grouped_gemm_ws(a, w, te.long(), out, sa, sw)
    with pytest.raises(ValueError, match="scales must be"):
        gluon_gemm.grouped_gemm_ws(a, w, te, out, sa.t(), sw)      # row-major [M_pad, K/128]: not this layout
    with pytest.raises(ValueError, match="contiguous"):
        gluon_gemm.grouped_gemm_ws(a, w.transpose(1, 2), te, out, sa, sw)
