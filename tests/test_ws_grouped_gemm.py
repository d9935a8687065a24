"""The warp-specialized Gluon grouped GEMM (`epmoe.kernels.ws_grouped_gemm`) without a GPU: its compile
for sm_90 (Triton's bundled ptxas) keeps the schedule it was written for, and its host checks refuse bad
operands before any launch. Its numbers are checked on a GPU by `benchmarks/gluon_gemm_probe.py`."""
from __future__ import annotations

import re

import pytest
import torch

gluon_gemm = pytest.importorskip("epmoe.kernels.ws_grouped_gemm", reason="this Triton has no Gluon",
                                 exc_type=ImportError)


def _compiled(fp8: bool, block_n: int, stages: int, gated: bool = False, has_bias: bool = False,
              gather: bool = False, k_multiple_of_16: bool = True, scale_tma: bool = False, store_tma: bool = False,
              stagger: int = 0, wide_mma: bool = False, grouped: bool = False, col_scale: bool = False,
              row_scale: bool = False, out_fp8: bool | None = None, diagnostic: str = "none"):
    from epmoe.kernels.xcompile import CrossCompileUnavailable, resource_usage
    try:
        c = gluon_gemm.compile_ws_gemm_for_hopper(fp8, block_n=block_n, stages=stages, gated=gated,
                                                  out_fp8=fp8 and gated if out_fp8 is None else out_fp8,
                                                  has_bias=has_bias, gather=gather,
                                                  k_multiple_of_16=k_multiple_of_16, scale_tma=scale_tma,
                                                  store_tma=store_tma, stagger=stagger, wide_mma=wide_mma,
                                                  grouped=grouped, col_scale=col_scale, row_scale=row_scale,
                                                  diagnostic=diagnostic)
    except CrossCompileUnavailable as exc:      # depends on the Triton build
        pytest.skip(str(exc))
    return c, resource_usage(c)


# (fp8, block_n, stages, gated, bias, most bytes of stack): FP8 tiles of 256 hold two accumulators and a
# product (192 of the math warpgroups' 232 registers); ptxas keeps a few per-tile values on the stack,
# stored before the K loop and read back in the epilogue, and (Triton 3.9's ptxas, A scales from global
# memory) one register in the K loop: up to 5 local accesses per K block, none with `scale_tma`
CASES = [(True, 128, 4, False, False, 0), (True, 256, 4, False, False, 96), (True, 256, 4, True, True, 96),
         (False, 256, 3, False, True, 0), (False, 256, 3, True, False, 0)]
# each with the outputs stored from registers and through shared memory by TMA (`store_tma`)
STORE_CASES = [case + (store,) for case in CASES for store in (False, True)]


def _loop_spills(c):
    from epmoe.kernels.xcompile import local_accesses_in_mma_loops
    return local_accesses_in_mma_loops(c)


@pytest.mark.parametrize("fp8,block_n,stages,gated,has_bias,stack,store_tma", STORE_CASES)
def test_sm90_compile_keeps_the_schedule(fp8, block_n, stages, gated, has_bias, stack, store_tma):
    c, use = _compiled(fp8, block_n, stages, gated, has_bias, store_tma=store_tma)
    ptx = c.asm["ptx"]
    if use:
        assert use["LOCAL"] == 0 and use["STACK"] <= stack, f"spills: {use}"
    spills = _loop_spills(c)
    # with the A scales from global memory (these cases), ptxas keeps a word or two of the FP8 tiles of 256 in
    # the K loop: Triton 3.9's up to 18 accesses with the gated epilogue's register stores, 3.6's 9 with its
    # TMA store (the default A scales by TMA: none, `test_sm90_compile_of_the_tma_store_epilogue`)
    bound = 20 if fp8 and block_n == 256 else 0
    assert spills is None or spills <= bound, f"{spills} local accesses in a K loop"
    # registers moved between partitions, both operands by TMA (one A box and one weight box per 128
    # columns), wgmma from two warpgroups: per K block 4 (FP8, K 32) or 4 (BF16 64-wide K, K 16) each
    split = block_n // 128 if block_n > 128 else 1
    assert "setmaxnreg.inc" in ptx and "setmaxnreg.dec" in ptx
    assert len(re.findall(r"cp\.async\.bulk\.tensor\.\dd\.shared::\w+\.global", ptx)) == 1 + split
    assert "cp.async.cg" not in ptx and "cp.async.ca" not in ptx
    assert len(re.findall(r"wgmma\.mma_async", ptx)) == 2 * 4 * split
    # no named barrier spans both math warpgroups (256 threads): each waits only for its own warps, which
    # is what lets one promote while the other multiplies (CTA-wide barriers exist only where the
    # partitions start and end)
    for threads in re.findall(r"bar\.sync\s+\d+,\s*(\d+);", ptx):
        assert int(threads) <= 128
    assert c.metadata.shared <= 227 * 1024
    # the barriers' initialisation is fenced for the async proxy before the partitions start
    start = ptx.index("barrier.sync \t1;") if "barrier.sync \t1;" in ptx else ptx.index("barrier.sync 1;")
    last_init = ptx.rindex("mbarrier.init", 0, start)
    assert "fence.proxy.async" in ptx[last_init:start]
    # the loader's one expect_tx per slot counts every byte its TMA loads bring (a wrong count hangs)
    el = 1 if fp8 else 2
    bk = 128 if fp8 else 64
    assert re.findall(r"mbarrier\.arrive\.expect_tx\.shared(?:::cta)?\.b64 _, \[%r\d+\], (\d+);", ptx) == \
        [str((128 + block_n) * bk * el)]
    # each math partition releases a slot once per K block (BF16: in the loop for the block before, and
    # after it), by one thread, after its own wgmma wait and its own 128-thread barrier
    lines = [x.strip() for x in ptx.splitlines() if x.strip() and not x.strip().startswith(("//", ".loc"))]
    arrives = [i for i, x in enumerate(lines) if re.search(r"mbarrier\.arrive\.shared::cta\.b64 _, \[", x)]
    assert len(arrives) == (2 if fp8 else 4)
    for i in arrives:
        window = lines[max(0, i - 8):i]
        assert any(re.match(r"bar\.sync\s+\d+, 128;", x) for x in window), window
        assert any(x.startswith("wgmma.wait_group") for x in window), window


# (fp8, block_n, stages, gated, most bytes of stack): as above; with Triton 3.9 the 128-wide FP8 tile keeps
# a word or two on the stack (8 bytes, where 3.6 keeps none)
@pytest.mark.parametrize("fp8,block_n,stages,gated,stack", [(True, 256, 4, True, 64), (True, 128, 4, False, 16),
                                                             (False, 256, 3, True, 0)])
def test_sm90_compile_of_the_row_gather(fp8, block_n, stages, gated, stack):
    """`a_rows`: the loader's four warps copy the A rows with `cp.async` (16 bytes a thread: 8 copies each
    per 128-row tile of 128-byte rows), each thread's copies arriving on the slot's barrier without a count
    increment (so the barrier counts 1 + 128); the weights still by TMA; the math warps fence the async
    proxy between the barrier wait and their first wgmma of the block."""
    c, use = _compiled(fp8, block_n, stages, gated, has_bias=True, gather=True)
    ptx = c.asm["ptx"]
    if use:
        assert use["LOCAL"] == 0 and use["STACK"] <= stack, f"spills: {use}"
    split = block_n // 128 if block_n > 128 else 1
    assert ptx.count("cp.async.bulk.tensor") == split
    assert len(re.findall(r"cp\.async\.cg\.shared\.global \[[^]]+\], \[[^]]+\], 0x10, %r\d+;", ptx)) == 8
    arrive = re.findall(r"^\s*(@%p\d+ )?cp\.async\.mbarrier\.arrive\.noinc\.shared\.b64", ptx, re.M)
    assert arrive == [""]                   # one per thread: not predicated to one of them
    # per slot "ready" (129) and "empty" (2)
    assert re.findall(r"mbarrier\.init\.shared::cta\.b64 \[%r\d+\], (\d+);", ptx) == ["129", "2"] * stages
    el = 1 if fp8 else 2
    bk = 128 if fp8 else 64
    assert re.findall(r"mbarrier\.arrive\.expect_tx\.shared(?:::cta)?\.b64 _, \[%r\d+\], (\d+);", ptx) == \
        [str(block_n * bk * el)]
    lines = [x.strip() for x in ptx.splitlines() if x.strip() and not x.strip().startswith(("//", ".loc"))]
    waits = [i for i, x in enumerate(lines) if x.startswith("mbarrier.try_wait")]
    math_waits = []
    for i in waits:      # the math partitions' "ready" waits: the next wgmma comes before the next wait
        after = lines[i + 1:]
        first_mma = next((j for j, x in enumerate(after) if x.startswith("wgmma.mma_async")), None)
        next_wait = next((j for j, x in enumerate(after) if x.startswith("mbarrier.try_wait")), len(after))
        if first_mma is not None and first_mma < next_wait:
            math_waits.append(any(x.startswith("fence.proxy.async") for x in after[:first_mma]))
    assert math_waits == [True, True]
    for threads in re.findall(r"bar\.sync\s+\d+,\s*(\d+);", ptx):
        assert int(threads) <= 128
    assert c.metadata.shared <= 227 * 1024


@pytest.mark.parametrize("block_n,gated", [(256, True), (256, False), (128, False)])
def test_sm90_compile_of_the_a_scales_by_tma(block_n, gated):
    """`scale_tma`: the loader's expect_tx counts the 512 bytes of a K block's 128 A scales beside its
    boxes, one 1-D TMA load brings them, and the math partitions read them from shared memory (two rows
    a thread per K block) with no global load of A scales in the K loop; no spill."""
    c, use = _compiled(True, block_n, 4, gated, has_bias=not gated, scale_tma=True)
    plain, _ = _compiled(True, block_n, 4, gated, has_bias=not gated)
    ptx = c.asm["ptx"]
    if use:
        # as CASES: FP8 tiles of 256 keep a few per-tile values on the stack (before the K loop, read back in
        # the epilogue), 128-wide tiles none
        assert use["LOCAL"] == 0 and use["STACK"] <= (64 if block_n == 256 else 0), f"spills: {use}"
    assert re.findall(r"mbarrier\.arrive\.expect_tx\.shared(?:::cta)?\.b64 _, \[%r\d+\], (\d+);", ptx) == \
        [str((128 + block_n) * 128 + 512)]
    assert ptx.count("cp.async.bulk.tensor.1d") == 1
    assert ptx.count("cp.async.bulk.tensor") == plain.asm["ptx"].count("cp.async.bulk.tensor") + 1
    assert _loop_spills(c) in (None, 0, 1, 2, 3)
    # the A scales: read from the slot after the "ready" wait, two rows a thread; one fewer global load per
    # thread and K block than the plain form (whose w scales stay global loads, small and cached)
    assert len(re.findall(r"ld\.shared\.b32", ptx)) - len(re.findall(r"ld\.shared\.b32", plain.asm["ptx"])) == 2 * 2
    assert ptx.count("ld.global") < plain.asm["ptx"].count("ld.global")
    assert c.metadata.shared <= 227 * 1024


@pytest.mark.parametrize("fp8,block_n,gated,has_bias", [(True, 256, True, False), (True, 256, True, True),
                                                        (True, 256, False, True),
                                                        (True, 256, False, False), (True, 128, False, False),
                                                        (False, 256, False, False), (False, 256, True, True)])
def test_sm90_compile_of_the_tma_store_epilogue(fp8, block_n, gated, has_bias):
    """`store_tma`: each math partition writes an accumulator's outputs into its own shared-memory buffer
    and sends them with one TMA store (gated: one per tile, plain: one per accumulator): its writes fenced
    for the async proxy and its 128 threads met at a barrier before the store, the buffer's last store
    waited for (and the threads met again) before it is written, every store waited for before the
    program ends; no output stored from registers, no spill in a K loop (the plain FP8 tile of 256 without
    a bias had an accumulator spilled there until the kernel told ptxas that the K loop runs at least
    once; the gated one with a bias, gpt-oss's gate+up, had 18 until the bias row was loaded one column per
    thread). Block-FP8 out: the formula's GPU form, the hardware's rounding cast and one reciprocal per row in
    place of a correctly rounded division per element."""
    # the ring the host gives it beside the buffers: 5 slots at FP8 128, 3 at FP8 256 with bfloat16 out, else 4
    stages = 5 if block_n == 128 else 3 if fp8 and not gated else 4
    c, use = _compiled(fp8, block_n, stages, gated, has_bias, scale_tma=fp8, store_tma=True)
    ptx = c.asm["ptx"]
    split = block_n // 128 if not gated else 1
    lines = [x.strip() for x in ptx.splitlines() if x.strip() and not x.strip().startswith(("//", ".loc"))]
    stores = [i for i, x in enumerate(lines) if re.search(r"cp\.async\.bulk\.tensor\.2d\.global\.shared::\w+", x)]
    assert len(stores) == 2 * split
    writes = [i for i, x in enumerate(lines) if x.startswith(("st.shared", "stmatrix"))]
    for i in stores:            # between the buffer's last write and its store: the fence, then the barrier
        last_write = max(w for w in writes if w < i)
        fence = [j for j in range(last_write, i) if lines[j].startswith("fence.proxy.async")]
        assert fence and any(re.match(r"bar\.sync\s+\d+, 128;", x) for x in lines[fence[0]:i]), lines[last_write:i]
    waits = [i for i, x in enumerate(lines) if re.match(r"cp\.async\.bulk\.wait_group\.read\s+0;", x)]
    assert len(waits) == 2 * split + 2          # before each buffer's writes, and once per partition at the end
    for i in stores:
        last_wait = max(w for w in waits if w < i)
        assert any(last_wait < w < i for w in writes)
        first_write = min(w for w in writes if w > last_wait)
        assert any(re.match(r"bar\.sync\s+\d+, 128;", x) for x in lines[last_wait:first_write])
    # outputs leave by TMA only: the global stores left are the FP8 out's row scales
    assert len(re.findall(r"^st\.global", ptx, flags=re.M)) <= (2 if fp8 and gated else 0)
    assert _loop_spills(c) in (None, 0)
    if use:
        assert use["LOCAL"] == 0 and use["STACK"] <= 48, f"spills: {use}"
    if fp8 and gated:
        assert "cvt.rn.satfinite.e4m3x2.f32" in ptx and "rcp.approx.ftz.f32" in ptx and "div.rn.f32" not in ptx
        # stored from registers, the epilogue keeps the formula as the other kernels run it
        regs, _ = _compiled(fp8, block_n, stages, gated, has_bias, scale_tma=fp8)
        assert "div.rn.f32" in regs.asm["ptx"] and "rcp.approx.ftz.f32" not in regs.asm["ptx"]
    # within the launch's dynamic limit: 227 KB less the 1 KB ptxas keeps static (RESERVED holds 2 KB back)
    assert c.metadata.shared <= gluon_gemm.SMEM_BYTES - 1024


@pytest.mark.parametrize("gated,row_scale,has_bias,store_tma", [(True, True, False, True), (True, True, True, True),
                                                                (False, True, True, True), (False, True, False, False),
                                                                (True, False, False, True), (False, False, True, True)])
def test_sm90_compile_of_the_per_channel_scales(gated, row_scale, has_bias, store_tma):
    """FP8 with column scales (`col_scale`, the experts' per-channel FP8 as `triton_ws` launches it: tiles
    of 256, A scales per row, or per K block by TMA; gate+up out in bfloat16 with row scales, FP8 with K-block
    ones): the same TMA loads and wgmma as block FP8, one fewer TMA load per slot with row scales (no A
    scales to bring), no global load left in the K loop, no spill there, within shared memory."""
    stages = 4 if gated or not store_tma else 3
    c, use = _compiled(True, 256, stages, gated, has_bias, scale_tma=not row_scale, store_tma=store_tma,
                       col_scale=True, row_scale=row_scale, out_fp8=gated and not row_scale)
    block, _ = _compiled(True, 256, stages, gated, has_bias, scale_tma=True, store_tma=store_tma,
                         out_fp8=gated and not row_scale)
    ptx, base = c.asm["ptx"], block.asm["ptx"]
    assert ptx.count("wgmma.mma_async") == base.count("wgmma.mma_async") > 0
    loads = ptx.count("cp.async.bulk.tensor.2d") + ptx.count("cp.async.bulk.tensor.1d")
    base_loads = base.count("cp.async.bulk.tensor.2d") + base.count("cp.async.bulk.tensor.1d")
    assert loads == base_loads - (1 if row_scale else 0)
    assert _loop_spills(c) in (None, 0)
    if use:
        assert use["LOCAL"] == 0 and use["STACK"] <= 48, f"spills: {use}"
    assert c.metadata.shared <= gluon_gemm.SMEM_BYTES - 1024
    # the weight scales per K block gone from the K loop (block FP8 loads the next block's there)
    from epmoe.kernels.xcompile import instructions_in_mma_loops
    in_loop = instructions_in_mma_loops(c, "LDG")
    if in_loop is not None:
        assert in_loop == 0 < instructions_in_mma_loops(block, "LDG")


@pytest.mark.parametrize("fp8,gated", [(True, True), (True, False), (False, False)])
def test_sm90_compile_of_the_staggered_warpgroups(fp8, gated):
    """`stagger`: one more mbarrier (count 1) that the second math partition waits on before its first
    "ready" wait, and that the first arrives on twice, predicated (after the K block that makes its lead,
    in the K loop; at its end, should it have had fewer K blocks in all), one thread each; none of it
    without `stagger`; no spill in a K loop; within the launch's shared-memory limit."""
    stages = 3 if fp8 and not gated else 4
    c, _ = _compiled(fp8, 256, stages, gated, has_bias=not gated, scale_tma=fp8, store_tma=True, stagger=2)
    plain, _ = _compiled(fp8, 256, stages, gated, has_bias=not gated, scale_tma=fp8, store_tma=True)
    ptx, base = c.asm["ptx"], plain.asm["ptx"]
    inits = re.findall(r"mbarrier\.init\.shared(?:::cta)?\.b64 \[%r\d+(?:\+\d+)?\], (\d+);", ptx)
    base_inits = re.findall(r"mbarrier\.init\.shared(?:::cta)?\.b64 \[%r\d+(?:\+\d+)?\], (\d+);", base)
    assert len(inits) == len(base_inits) + 1 and inits.count("1") == base_inits.count("1") + 1
    arrives = r"mbarrier\.arrive\.shared::cta\.b64 _, \["
    assert len(re.findall(arrives, ptx)) == len(re.findall(arrives, base)) + 2
    waits = r"mbarrier\.try_wait"
    assert len(re.findall(waits, ptx)) == len(re.findall(waits, base)) + 1
    # the first's arrives are predicated (a barrier of its own warpgroup before each: one more per K block and
    # one at its end), which keeps the K loop free of spills
    assert len(re.findall(r"bar\.sync\s+\d+, 128;", ptx)) == len(re.findall(r"bar\.sync\s+\d+, 128;", base)) + 2
    assert _loop_spills(c) in (None, 0)
    assert c.metadata.shared <= gluon_gemm.SMEM_BYTES - 1024


_TMA_LOADS = r"cp\.async\.bulk\.tensor\.\dd\.shared::\w+\.global\."
_TMA_STORES = r"cp\.async\.bulk\.tensor\.\dd\.global\.shared::"


@pytest.mark.parametrize("fp8,gated", [(True, True), (True, False), (False, True)])
def test_sm90_compile_of_the_diagnostic_forms(fp8, gated):
    """The diagnostic forms (`DIAGNOSTICS`, for `benchmarks/profile_ws_gemm.py`) compile for sm_90 and take away
    what they name, as far as the PTX shows it: `no_math` issues no wgmma and stores nothing, and keeps every TMA
    load and the slots' releases;
    `no_loads` keeps the loads (the ring's first round) and the wgmma, with one more plain arrive (the loader's
    "ready" without bytes); `no_promote` keeps the wgmma and (FP8) leaves no FFMA in the K loops, where the
    promotion puts them; none spills in a K loop."""
    from epmoe.kernels.xcompile import instructions_in_mma_loops
    kw = dict(scale_tma=fp8, store_tma=True)
    forms = {d: _compiled(fp8, 256, 4, gated, diagnostic=d, **kw)[0].asm["ptx"] for d in gluon_gemm.DIAGNOSTICS}
    count = {d: {what: len(re.findall(pattern, ptx)) for what, pattern in
                 (("loads", _TMA_LOADS), ("stores", _TMA_STORES), ("wgmma", r"wgmma\.mma_async"),
                  ("arrives", r"mbarrier\.arrive\.shared"))} for d, ptx in forms.items()}
    base = count["none"]
    assert base["loads"] >= 3 and base["stores"] >= 1 and base["wgmma"] >= 8, base
    assert count["no_math"]["wgmma"] == count["no_math"]["stores"] == 0
    assert count["no_math"]["loads"] == base["loads"]
    assert count["no_math"]["arrives"] == 2         # the slots' releases: one in each math warpgroup's loop
    assert count["no_loads"] == dict(base, arrives=base["arrives"] + 1)
    assert count["no_promote"]["wgmma"] == base["wgmma"] and count["no_promote"]["loads"] == base["loads"]
    promoted = _compiled(fp8, 256, 4, gated, diagnostic="none", **kw)[0]
    unpromoted = _compiled(fp8, 256, 4, gated, diagnostic="no_promote", **kw)[0]
    ffma = instructions_in_mma_loops(promoted, "FFMA"), instructions_in_mma_loops(unpromoted, "FFMA")
    if fp8:
        assert ffma[0] in (None, 64 * 4) and ffma[1] in (None, 0)      # 64 a box, two boxes, two K loops
    else:
        assert forms["no_promote"] == forms["none"]                     # BF16 has no promotion to take away
    for d in gluon_gemm.DIAGNOSTICS:
        assert _loop_spills(_compiled(fp8, 256, 4, gated, diagnostic=d, **kw)[0]) in (None, 0), d


def test_host_checks_of_the_diagnostic_forms():
    """An unknown diagnostic, a diagnostic form with a stagger, and `no_loads` with the gathering loader are
    refused before any compile or launch."""
    with pytest.raises(ValueError, match="diagnostic must be one of"):
        gluon_gemm.compile_ws_gemm_for_hopper(True, block_n=256, diagnostic="no_tiles")
    with pytest.raises(ValueError, match="without a stagger"):
        gluon_gemm.compile_ws_gemm_for_hopper(True, block_n=256, stages=4, stagger=2, diagnostic="no_math")
    with pytest.raises(ValueError, match="no_loads form takes A in layout order"):
        gluon_gemm.compile_ws_gemm_for_hopper(True, block_n=256, gather=True, diagnostic="no_loads")
    a = torch.zeros(128, 256, dtype=torch.bfloat16)
    w = torch.zeros(1, 256, 256, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="diagnostic must be one of"):
        gluon_gemm.grouped_gemm_ws(a, w, torch.zeros(1, dtype=torch.int32), torch.zeros(128, 256,
                                   dtype=torch.bfloat16), diagnostic="No_Math")


@pytest.mark.parametrize("gated,store_tma,gather", [(False, True, False), (True, True, False), (False, False, False),
                                                    (True, False, True)])
def test_sm90_compile_of_the_wide_product(gated, store_tma, gather):
    """`wide_mma` (BF16 tiles of 256): one m64n256k16 wgmma per 16-deep step where the two-box form issues two
    m64n128k16 (half the instructions, each reading its A rows once), the rest of the kernel as it was: the
    same TMA loads, slot releases and stores, no spill, the accumulator's two halves handed to the epilogue
    without a trip through shared memory (no more shared-memory accesses than without it)."""
    stages = 3 if gather else 4
    wide, _ = _compiled(False, 256, stages, gated, store_tma=store_tma, gather=gather, wide_mma=True)
    narrow, _ = _compiled(False, 256, stages, gated, store_tma=store_tma, gather=gather)
    ptx, base = wide.asm["ptx"], narrow.asm["ptx"]
    assert re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", ptx) == ["m64n256k16"] * 8
    assert re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", base) == ["m64n128k16"] * 16
    for pattern in (r"cp\.async\.bulk\.tensor", r"mbarrier\.arrive", r"mbarrier\.try_wait", r"cp\.async\.cg",
                    r"^\s*st\.global", r"stmatrix"):
        assert len(re.findall(pattern, ptx, re.M)) == len(re.findall(pattern, base, re.M)), pattern
    for pattern in (r"^\s*(?:st|ld)\.shared", r"shfl"):
        assert len(re.findall(pattern, ptx, re.M)) <= len(re.findall(pattern, base, re.M)), pattern
    assert _loop_spills(wide) in (None, 0)
    assert wide.metadata.shared <= gluon_gemm.SMEM_BYTES - 1024
    # left unsaid, the cross-compile builds what a launch picks: the wide product in the plain tile only
    default = gluon_gemm.compile_ws_gemm_for_hopper(False, block_n=256, stages=stages, gated=gated,
                                                    store_tma=store_tma, gather=gather)
    assert default.asm["ptx"] == (base if gated else ptx)


def test_host_checks_of_the_wide_product():
    """`wide_mma` runs by default in plain BF16 tiles of 256 only (not gated, not FP8, not 128 wide), and is
    refused where asked and it cannot apply: block FP8 (its promotion needs a product per weight box) and tiles
    of one box."""
    choice = gluon_gemm._wide_mma_choice
    assert choice("c", False, 2, False, None) and not choice("c", False, 2, True, None)
    assert not choice("c", True, 2, False, None) and not choice("c", False, 1, False, None)
    assert choice("c", False, 2, True, True) and not choice("c", False, 2, False, False)
    a, w, te, out, (sa, sw) = _operands()
    with pytest.raises(ValueError, match="wide_mma takes BF16 tiles of 256 columns .* not block FP8"):
        gluon_gemm.grouped_gemm_ws(a, w, te, out, sa, sw, block_n=256, wide_mma=True)
    a, w, te, out, _ = _operands(fp8=False)
    with pytest.raises(ValueError, match="not tiles of one box"):
        gluon_gemm.grouped_gemm_ws(a, w, te, out, block_n=128, wide_mma=True)
    with pytest.raises(ValueError, match="not block FP8"):
        gluon_gemm.compile_ws_gemm_for_hopper(True, block_n=256, wide_mma=True)


def test_host_checks_of_the_tma_store():
    """`store_tma` runs wherever it applies unless asked (True / False), takes its buffers from the ring, and
    is refused where asked and TMA cannot store out or the buffers do not fit; by default the register
    stores run there instead."""
    import inspect
    assert inspect.signature(gluon_gemm.grouped_gemm_ws).parameters["store_tma"].default is None
    a, w, te, out, (sa, sw) = _operands(N=128)
    shape = gluon_gemm.check_operands(a, w, te, out, sa, sw, block_n=128)
    # its 2 x 16 KB of buffers: the FP8 128-wide ring drops from 6 slots to 5
    assert gluon_gemm._default_stages(shape) == 6
    assert gluon_gemm._default_stages(shape, gluon_gemm._store_bytes(shape)) == 5
    choice = gluon_gemm._store_tma_choice
    assert choice(shape, out, 5, True, True) and not choice(shape, out, 5, True, False)
    assert choice(shape, out, 5, True, None) and not choice(shape, out, 6, True, None)
    with pytest.raises(ValueError, match="6 slots of 33280 bytes"):
        choice(shape, out, 6, True, True)
    with pytest.raises(ValueError, match="7 slots of 32768 bytes"):
        gluon_gemm.grouped_gemm_ws(a, w, te, out, sa, sw, block_n=128, stages=7, scale_tma=False, store_tma=True)
    # the first warpgroup's lead lives in the ring: stagger in [0, stages)
    for bad in (-1, 5):
        with pytest.raises(ValueError, match=r"stagger must be in \[0, stages\) = \[0, 5\)"):
            gluon_gemm.grouped_gemm_ws(a, w, te, out, sa, sw, block_n=128, stages=5, stagger=bad)
    # bfloat16 rows of 300 columns (600 bytes) are no multiple of 16 bytes
    a, w, te, out, _ = _operands(fp8=False, N=300)
    with pytest.raises(ValueError, match="store_tma takes out 16-byte aligned"):
        gluon_gemm.grouped_gemm_ws(a, w, te, out, block_n=128, store_tma=True)
    shape = gluon_gemm.check_operands(a, w, te, out, block_n=128)
    assert not choice(shape, out, 4, False, None)         # by default: the register stores


def test_the_kernel_refuses_the_a_scales_by_tma_with_the_row_gather():
    """The gather loader fills no scale buffers: compiling the two together stops at the kernel's assertion
    instead of building a kernel whose math warps read scales nobody wrote."""
    _compiled(True, 128, 3, gather=True)        # the gather alone compiles (or this Triton cannot cross-compile)
    with pytest.raises(Exception, match="A scales by TMA take A in layout order"):
        gluon_gemm.compile_ws_gemm_for_hopper(True, block_n=128, stages=3, gather=True, scale_tma=True)


def test_host_checks_of_the_a_scales_by_tma():
    a, w, te, out, (sa, sw) = _operands(M=384)
    with pytest.raises(ValueError, match="scale_tma takes FP8 A scaled per K block, in layout order"):
        gluon_gemm.grouped_gemm_ws(a, w, te[:2], out[:256], sa, sw, a_rows=torch.zeros(256, dtype=torch.int32),
                                   scale_tma=True)
    a, w, te, out, _ = _operands(fp8=False)
    with pytest.raises(ValueError, match="scale_tma takes FP8 A scaled per K block"):
        gluon_gemm.grouped_gemm_ws(a, w, te, out, scale_tma=True)
    # where it does not apply, the default takes the global loads and an explicit True is refused: a_scale_t
    # off 16-byte alignment (a view one float in), and a ring too deep for the scales beside it
    a, w, te, out, (sa, sw) = _operands(N=128)
    shape = gluon_gemm.check_operands(a, w, te, out, sa, sw, block_n=128)
    choice = gluon_gemm._scale_tma_choice
    assert choice(shape, sa, 6, None) and choice(shape, sa, 6, True) and not choice(shape, sa, 6, False)
    assert gluon_gemm._default_stages(shape) == 6
    off = torch.empty(sa.numel() + 1)[1:].view(sa.shape)
    assert off.data_ptr() % 16 and not choice(shape, off, 6, None)
    with pytest.raises(ValueError, match="16-byte aligned"):
        gluon_gemm.grouped_gemm_ws(a, w, te, out, off, sw, block_n=128, scale_tma=True)
    assert not choice(shape, sa, 7, None)            # 7 x (32 KB + 512 B) leaves no room for the barriers
    with pytest.raises(ValueError, match="7 slots of 33280 bytes"):
        gluon_gemm.grouped_gemm_ws(a, w, te, out, sa, sw, block_n=128, stages=7, scale_tma=True)


def test_host_checks_of_the_per_channel_scales():
    """FP8 with one weight scale per output row (w_scale [E, W rows]): A scales per 128-wide K block or one
    per row (a_scale_t [1, rows]); row scales go with column scales only, and do not come by TMA (nothing to
    bring per K block); an activation takes any I (no weight blocks to fit)."""
    a, w, te, out, (sa, sw) = _operands(K=512)
    rows_scale = torch.ones(1, 256)
    col = torch.ones(2, 256)
    shape = gluon_gemm.check_operands(a, w, te, out, sa, col)
    assert shape.col_scale and not shape.row_scale
    shape = gluon_gemm.check_operands(a, w, te, out, rows_scale, col)
    assert shape.col_scale and shape.row_scale
    assert not gluon_gemm._scale_tma_choice(shape, rows_scale, 4, None)
    with pytest.raises(ValueError, match="scale_tma takes FP8 A scaled per K block"):
        gluon_gemm.grouped_gemm_ws(a, w, te, out, rows_scale, col, scale_tma=True)
    with pytest.raises(ValueError, match="a_scale_t must be .*one per row, with w_scale one per output row only"):
        gluon_gemm.grouped_gemm_ws(a, w, te, out, rows_scale, sw)        # row scales with weight blocks
    with pytest.raises(ValueError, match="w_scale must be a contiguous float32 \\[2, 256\\]"):
        gluon_gemm.grouped_gemm_ws(a, w, te, out, rows_scale, torch.ones(2, 255))
    with pytest.raises(ValueError, match="a_scale_t must be"):
        gluon_gemm.grouped_gemm_ws(a, w, te, out, torch.ones(2, 256), col)     # neither per K block nor per row
    # gated, I = 160: no weight blocks to fit with column scales; block scales still need I % 128 == 0
    a, w, te, _, _ = _operands(N=320)
    act = torch.empty(256, 160, dtype=torch.bfloat16)
    shape = gluon_gemm.check_operands(a, w, te, act, rows_scale, torch.ones(2, 320), activation="silu")
    assert shape.gated and shape.N == 160 and shape.row_scale
    with pytest.raises(ValueError, match="I a multiple of 128"):
        gluon_gemm.check_operands(a, w, te, act, torch.ones(2, 256), torch.ones(2, 3, 2), activation="silu")


def test_reference_statement_of_the_per_channel_scales():
    """`grouped_gemm_reference` with column scales, A scales per row and per K block: the dequantized
    operands' product (each K block's scale on its columns of A), a skipped tile's rows kept."""
    from epmoe.experts.triton_ws import grouped_gemm_reference
    from epmoe.quant.fp8 import fp8_quantize, quantize_weight
    g = torch.Generator().manual_seed(3)
    x = torch.randn(384, 384, generator=g)
    w = torch.randn(2, 256, 384, generator=g) * 0.1
    te = torch.tensor([1, -1, 0], dtype=torch.int32)
    wq = [quantize_weight(w[e], "channel") for e in range(2)]
    wq8, ws = torch.stack([q for q, _ in wq]), torch.stack([s for _, s in wq])
    w_deq = wq8.float() * ws[:, :, None]
    for group in (None, 128):
        a, sa = fp8_quantize(x, group)
        a_deq = a.float() * sa.repeat_interleave(128 if group else 384, dim=1)
        out = torch.full((384, 256), 7.0, dtype=torch.bfloat16)
        grouped_gemm_reference(a, wq8, te, out, sa.t().contiguous(), ws)
        for rows, e in ((slice(0, 128), 1), (slice(256, 384), 0)):
            want = a_deq[rows] @ w_deq[e].T
            assert torch.allclose(out[rows].float(), want, rtol=1e-2, atol=1e-2), group
        assert (out[128:256].float() == 7.0).all()


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
    with pytest.raises(ValueError, match="block_n must be"):
        gluon_gemm.grouped_gemm_ws(a, w, te, out, sa, sw, block_n=512)
    a16, w16, te16, out16, _ = _operands(fp8=False)
    with pytest.raises(ValueError, match="a_scale_t and w_scale"):
        gluon_gemm.grouped_gemm_ws(a16, w16, te16, out16, sa, sw)


def test_host_checks_refuse_bad_layouts():
    a, w, te, out, (sa, sw) = _operands()
    with pytest.raises(ValueError, match="block_m is 128"):
        gluon_gemm.grouped_gemm_ws(a, w, te, out, sa, sw, block_m=64)
    with pytest.raises(ValueError, match="int32"):
        gluon_gemm.grouped_gemm_ws(a, w, te.long(), out, sa, sw)
    with pytest.raises(ValueError, match="a_scale_t must be"):
        gluon_gemm.grouped_gemm_ws(a, w, te, out, sa.t(), sw)      # row-major [M_pad, K/128]: not this layout
    with pytest.raises(ValueError, match="contiguous"):
        gluon_gemm.grouped_gemm_ws(a, w.transpose(1, 2), te, out, sa, sw)
    with pytest.raises(ValueError, match="bias must be"):
        gluon_gemm.grouped_gemm_ws(a, w, te, out, sa, sw, bias=torch.zeros(2, 128))


def test_host_checks_of_the_launch():
    """Launch settings that would hang or divide by zero are refused; an empty problem launches nothing."""
    a, w, te, out, (sa, sw) = _operands()
    with pytest.raises(ValueError, match="stages must be at least 2"):
        gluon_gemm.grouped_gemm_ws(a, w, te, out, sa, sw, stages=1)
    with pytest.raises(ValueError, match="group_m"):
        gluon_gemm.grouped_gemm_ws(a, w, te, out, sa, sw, group_m=0)
    empty = torch.empty(0, 256, dtype=torch.bfloat16)
    assert gluon_gemm.grouped_gemm_ws(a[:0], w, te[:0], empty, sa[:, :0].contiguous(), sw) is empty
    with pytest.raises(ValueError, match="K is 0"):
        gluon_gemm.grouped_gemm_ws(a[:, :0], w[:, :, :0], te, out, torch.ones(0, 256), torch.ones(2, 2, 0))
    with pytest.raises(ValueError, match="16-byte aligned"):
        a16 = torch.zeros(256 * 256 + 4, dtype=torch.bfloat16)[4:].view(256, 256)      # 8 bytes off alignment
        gluon_gemm.grouped_gemm_ws(a16, w.to(torch.bfloat16), te, out)


def test_host_checks_of_the_gated_epilogue():
    """With an activation W is gate rows then up rows and out holds I = N / 2 columns: bfloat16, or FP8
    with its K-block-major scales; tiles of 256 (gate and up of 128 outputs)."""
    a, w, te, _, (sa, sw) = _operands(N=512)
    act = torch.empty(256, 256, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="activation must be"):
        gluon_gemm.grouped_gemm_ws(a, w, te, act, sa, sw, activation="relu", out_scale_t=torch.ones(2, 256))
    with pytest.raises(ValueError, match="needs out_scale_t"):
        gluon_gemm.grouped_gemm_ws(a, w, te, act, sa, sw, activation="silu")
    with pytest.raises(ValueError, match="out_scale_t must be"):
        gluon_gemm.grouped_gemm_ws(a, w, te, act, sa, sw, activation="silu", out_scale_t=torch.ones(256, 2))
    with pytest.raises(ValueError, match="block_n must be"):
        gluon_gemm.grouped_gemm_ws(a, w, te, act, sa, sw, activation="silu", out_scale_t=torch.ones(2, 256),
                                   block_n=128)
    with pytest.raises(ValueError, match="out must be"):        # the plain GEMM writes bfloat16 only
        gluon_gemm.grouped_gemm_ws(a, w, te, torch.empty(256, 512, dtype=torch.float8_e4m3fn), sa, sw)


def test_reference_statement_of_the_gated_epilogue():
    """`grouped_gemm_reference` with an activation: the plain product through `gated_activation_fused`
    and `fp8_quantize` (128 columns), scales K-block-major; a skipped tile's rows kept."""
    from epmoe.activations import gated_activation_fused
    from epmoe.experts.triton_ws import grouped_gemm_reference
    from epmoe.quant.fp8 import fp8_quantize
    g = torch.Generator().manual_seed(2)
    a = torch.randn(384, 256, generator=g).bfloat16()
    w = (torch.randn(2, 512, 256, generator=g) * 0.1).bfloat16()
    te = torch.tensor([1, -1, 0], dtype=torch.int32)
    plain = torch.zeros(384, 512, dtype=torch.bfloat16)
    grouped_gemm_reference(a, w, te, plain)
    act = torch.full((384, 256), 3.0).to(torch.float8_e4m3fn)
    scale_t = torch.full((2, 384), 5.0)
    grouped_gemm_reference(a, w, te, act, activation="silu", out_scale_t=scale_t)
    for rows, e in ((slice(0, 128), 1), (slice(256, 384), 0)):
        full = a[rows].float() @ w[e].float().T
        assert torch.allclose(plain[rows].float(), full, rtol=1e-2, atol=1e-2)
        q, s = fp8_quantize(gated_activation_fused("silu", full), 128)
        assert torch.equal(act[rows].view(torch.uint8), q.view(torch.uint8)) and torch.equal(scale_t[:, rows], s.t())
    assert (act[128:256].float() == 3.0).all() and (scale_t[:, 128:256] == 5.0).all()


def test_probe_plumbing_on_the_cpu(tmp_path):
    """`benchmarks/gluon_gemm_probe.py --cpu-smoke`: the GPU probe's check stage (its problems, sentinels,
    comparisons and the backend's self-check) with the PyTorch statement in the kernel's place."""
    import json
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "probe.json"
    proc = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "gluon_gemm_probe.py"), "--cpu-smoke",
                           "--output", str(out)], cwd=root, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=root))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cases = json.loads(out.read_text())["cases"]
    assert len(cases) == 33 and all(c["ok"] for c in cases)
    assert {(c.get("form"), c.get("case")) for c in cases if "self-check" in str(c.get("case"))} == \
        {(form, "triton_ws self-check") for form in ("bf16", "block", "channel", "channel_group")}
    assert {(c.get("fp8"), c.get("store_tma"), c.get("stagger")) for c in cases if c.get("stagger")} == \
        {(True, True, 2), (True, False, 1), (False, True, 2)}
    assert {(c.get("fp8"), c.get("gated"), c.get("block_n"), c.get("bias")) for c in cases if c.get("store_tma")} == \
        {(True, False, 128, False), (True, False, 256, True), (True, False, 256, False), (True, True, 256, False),
         (True, True, 256, True), (False, False, 256, False), (False, True, 256, True)}
    assert {(c.get("gated"), c.get("block_n")) for c in cases if c.get("scale_tma")} == {(False, 128), (False, 256),
                                                                                         (True, 256)}
    assert {c.get("gather_from_tokens") is not None for c in cases if "gated" in c} == {True, False}
    assert {(c.get("fp8"), c.get("gated")) for c in cases if "gated" in c} == {(True, True), (True, False),
                                                                              (False, True), (False, False)}


def test_host_checks_of_the_row_gather():
    """`a_rows` picks A's rows: one int32 per layout row (the layout's size), A's scales per A row."""
    a, w, te, out, (sa, sw) = _operands(M=384)          # 384 token rows, a layout of 256 rows
    te, out = te[:2], out[:256]
    rows = torch.zeros(256, dtype=torch.int32)
    shape = gluon_gemm.check_operands(a, w, te, out, sa, sw, a_rows=rows)
    assert (shape.M_pad, shape.a_count, shape.gather) == (256, 384, True)
    for bad in (rows.long(), rows[:255], rows.view(2, 128), torch.zeros(512, dtype=torch.int32)[::2]):
        with pytest.raises(ValueError, match="a_rows must be|tiles of 128"):
            gluon_gemm.check_operands(a, w, te, out, sa, sw, a_rows=bad)
    with pytest.raises(ValueError, match="a_scale_t must be"):           # per layout row: not A's rows
        gluon_gemm.check_operands(a, w, te, out, sa[:, :256].contiguous(), sw, a_rows=rows)
    with pytest.raises(ValueError, match="a_rows must be"):              # rows picked from an empty A
        gluon_gemm.check_operands(a[:0], w, te, out, sa[:, :0].contiguous(), sw, a_rows=rows)


def test_sm90_compile_of_the_bf16_row_gather_with_k_not_a_multiple_of_16():
    """BF16 K = 8 (mod 16) is allowed (rows of a multiple of 16 bytes) but a launch does not specialize K
    as divisible: the loader's `cp.async` must still move 16 bytes (the row start and the K-tail mask
    follow from the 16-byte rule, not from K's specialization)."""
    c, _ = _compiled(False, 256, 3, True, has_bias=True, gather=True, k_multiple_of_16=False)
    assert len(re.findall(r"cp\.async\.cg\.shared\.global \[[^]]+\], \[[^]]+\], 0x10, %r\d+;", c.asm["ptx"])) == 8


def test_the_default_forms_are_the_measured_ones():
    """With nothing asked, the GEMMs the backends run store through TMA with the rings that were timed on an
    H200 (block FP8 gate+up 256 wide with 4 slots, plain 256 with 3; BF16 gate+up with 4), BF16 plain tiles 256
    wide with one wide product per K step and 4 slots (timed on an H100), and keep the register stores where
    out's rows are no multiple of 16 bytes."""
    def default_form(a, w, te, out, sa=None, sw=None, activation=None, out_scale_t=None):
        shape = gluon_gemm.check_operands(a, w, te, out, sa, sw, None, activation, out_scale_t)
        return (shape.sub_n * shape.split,) + gluon_gemm.kernel_forms(shape, out, sa, None, None, None)

    a, w, te, out, (sa, sw) = _operands(fp8=True, N=256, K=256)
    assert default_form(a, w, te, out, sa, sw) == (256, 3, True, True, False)
    gated_out = torch.empty(256, 128, dtype=torch.float8_e4m3fn)
    assert default_form(a, w, te, gated_out, sa, sw, "silu", torch.ones(1, 256)) == (256, 4, True, True, False)
    a, w, te, out, _ = _operands(fp8=False, N=256, K=256)
    assert default_form(a, w, te, torch.empty(256, 128, dtype=torch.bfloat16), activation="silu") == \
        (256, 4, False, True, False)
    assert default_form(a, w, te, out) == (256, 4, False, True, True)
    a, w, te, out, _ = _operands(fp8=False, N=300)
    assert default_form(a, w, te, out)[1:] == (4, False, False, True)


def test_sm90_compile_of_the_walk_groups():
    """`walk_groups` (`grouped`): each partition reads its tile's group (first m-tile and length) before its
    expert, two more loads each (the loader and the two math warpgroups) or one of both words, the same
    products, no spill; FP8 gated and plain, BF16 plain."""
    for fp8, gated, stages in ((True, True, 4), (True, False, 3), (False, False, 4)):
        base, _ = _compiled(fp8, 256, stages, gated, scale_tma=fp8, store_tma=True, wide_mma=not fp8)
        c, use = _compiled(fp8, 256, stages, gated, scale_tma=fp8, store_tma=True, wide_mma=not fp8, grouped=True)

        def count(ptx, pattern):
            return len(re.findall(pattern, ptx))

        load = r"ld\.global(?:\.\w+)*\.(?:v2\.)?[bsu]32\b"
        assert count(base.asm["ptx"], load) + 3 <= count(c.asm["ptx"], load) <= count(base.asm["ptx"], load) + 6
        assert count(c.asm["ptx"], r"wgmma\.mma_async") == count(base.asm["ptx"], r"wgmma\.mma_async")
        assert _loop_spills(c) in (None, 0)
        if use:
            assert use["LOCAL"] == 0 and use["STACK"] <= 48, f"spills: {use}"


def test_host_checks_of_the_walk_groups():
    a, w, te, out, (sa, sw) = _operands()
    for bad in (torch.zeros(te.numel(), 2), torch.zeros(te.numel() + 1, 2, dtype=torch.int32),
                torch.zeros(te.numel(), dtype=torch.int32), torch.zeros(2, te.numel(), dtype=torch.int32).t()):
        with pytest.raises(ValueError, match="walk_groups must be"):
            gluon_gemm.grouped_gemm_ws(a, w, te, out, sa, sw, walk_groups=bad)


def test_profile_script_refuses_an_unknown_diagnostic_and_counts_the_streamed_bytes(benchmark_script, capsys):
    """`profile_ws_gemm.py --diagnostic` refuses a name the kernel has not (exit 2, before any GPU check), and its
    operand bytes are one ring slot (A tile and weight boxes) per K block of every used tile: gated block FP8 with
    I = 256 (two n-tiles of 128 outputs), K = 384 (three K blocks), three m-tiles of which one is skipped."""
    script = benchmark_script("profile_ws_gemm")
    with pytest.raises(SystemExit) as exit_:
        script.main(["--diagnostic", "none,no_tiles"])
    assert exit_.value.code == 2 and "--diagnostic takes none, no_loads, no_math, no_promote" in capsys.readouterr().err
    fp8 = torch.float8_e4m3fn
    a, w = torch.zeros(3 * 128, 384, dtype=fp8), torch.zeros(2, 512, 384, dtype=fp8)
    te = torch.tensor([0, -1, 1], dtype=torch.int32)
    shape = gluon_gemm.check_operands(a, w, te, torch.zeros(3 * 128, 256, dtype=fp8), torch.ones(3, 3 * 128),
                                      torch.ones(2, 4, 3), activation="silu", out_scale_t=torch.ones(2, 3 * 128))
    assert script.operand_bytes(shape, te.tolist()) == 2 * 2 * 3 * (128 + 256) * 128
