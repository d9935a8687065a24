"""Kernel configuration tables and the fallback heuristic (CPU; no Triton needed)."""
import json
import os
from dataclasses import replace

import pytest

from epmoe.kernels.tuning_table import (CONFIG_DIR, GLUON_MIN_ROWS, SM_SHARED_MEMORY, SMEM_LIMIT,
                                        SMEM_RESERVED_PER_PROGRAM, TABLE_REACH, GemmConfig,
                                        MoEKernelConfig, _load_table, element_bytes, heuristic_config,
                                        fit_to_problem, lookup_config, shape_key, smem_bytes)


def _fits(cfg, elem):
    return (smem_bytes(cfg.block_m, cfg.gate_up, elem, 2) <= SMEM_LIMIT
            and smem_bytes(cfg.block_m, cfg.down, elem, 1) <= SMEM_LIMIT)


@pytest.mark.parametrize("fmt", ["bfloat16", "float16", "float32", "fp8_block", "fp8_channel"])
@pytest.mark.parametrize("T", [1, 3, 40, 700, 9000])
@pytest.mark.parametrize("shape", [(8, 4096, 14336, 2), (128, 2048, 768, 8), (16, 200, 136, 4), (4, 64, 32, 2)])
def test_heuristic_fits_shared_memory_and_problem(fmt, T, shape):
    L, H, I, k = shape
    cfg = heuristic_config(T, L, H, I, k, fmt.startswith("fp8"), element_bytes(fmt))
    assert _fits(cfg, element_bytes(fmt)), cfg
    assert cfg.block_m in (16, 32, 64, 128)
    if fmt.startswith("fp8"):
        assert cfg.gate_up.block_k == cfg.down.block_k == cfg.gate_up.block_n == 128


def test_shipped_tables_parse_and_fit():
    tables = [f for f in os.listdir(CONFIG_DIR) if f.endswith(".json")]
    assert tables, "no tuned table is shipped"
    for name in tables:
        path = os.path.join(CONFIG_DIR, name)
        with open(path) as f:
            meta = json.load(f)
        assert {"device", "triton", "torch", "date"} <= set(meta), f"{name}: provenance fields missing"
        for key, by_t in _load_table(path).items():
            fmt = key.split("fmt=")[1]
            for T, cfg in by_t.items():
                assert _fits(cfg, element_bytes(fmt)), (name, key, T)
                if fmt.startswith("fp8"):
                    assert cfg.gate_up.block_k == cfg.down.block_k == 128, (name, key, T)


def test_lookup_takes_the_nearest_token_count(tmp_path):
    from epmoe.bench import tune
    small = MoEKernelConfig(16, GemmConfig(64, 128, 1, 4, 4), GemmConfig(64, 256, 1, 4, 3))
    large = MoEKernelConfig(128, GemmConfig(128, 64, 8, 8, 3), GemmConfig(256, 64, 8, 8, 4))
    path = str(tmp_path / "t.json")
    key = shape_key(8, 4096, 14336, 2, "bfloat16")
    tune.merge_into_table(path, key, {1: (small, 0.1), 8192: (large, 9.0)}, {"device": "test"})
    assert lookup_config(2, 8, 4096, 14336, 2, "bfloat16", paths=[path]) == (small, f"t.json[{key}][T=1]")
    assert lookup_config(5000, 8, 4096, 14336, 2, "bfloat16", paths=[path])[0] == large
    cfg, where = lookup_config(5000, 8, 4096, 1000, 2, "bfloat16", paths=[path])
    assert where == "heuristic" and cfg.block_m == 128


def test_an_entry_serves_only_batches_near_its_token_count(tmp_path):
    """A shape tuned only at prefill (the deepseek-v3 32-expert shard at T = 4096 and 8192) does not hand its
    128-row tiles to decode batches: beyond a factor TABLE_REACH of the nearest tuned T the heuristic, sized by
    rows per expert, serves."""
    from epmoe.bench import tune
    prefill = MoEKernelConfig(128, GemmConfig(128, 64, 8, 8, 3), GemmConfig(256, 64, 8, 8, 4))
    path = str(tmp_path / "t.json")
    key = shape_key(32, 7168, 2048, 8, "bfloat16")
    tune.merge_into_table(path, key, {4096: (prefill, 4.5), 8192: (replace(prefill, tail_m=64), 9.0)},
                          {"device": "test"})
    _load_table.cache_clear()
    assert TABLE_REACH == 8
    for T, tuned in ((512, 4096), (4096, 4096), (65536, 8192)):
        cfg, where = lookup_config(T, 32, 7168, 2048, 8, "bfloat16", paths=[path])
        assert where == f"t.json[{key}][T={tuned}]", T
    for T in (1, 16, 511, 65537):
        cfg, where = lookup_config(T, 32, 7168, 2048, 8, "bfloat16", paths=[path])
        assert where.startswith("heuristic (the nearest tuned T") and cfg == heuristic_config(
            T, 32, 7168, 2048, 8, False, 2), T
    assert lookup_config(1, 32, 7168, 2048, 8, "bfloat16", paths=[path])[0].block_m == 16     # decode tiles


def test_tune_candidates_fit_and_come_with_tma_twins():
    from epmoe.bench import tune
    for fp8 in (False, True):
        for bm in (16, 32, 64, 128):
            gus, dns = tune.candidates(bm, fp8)
            elem = 1 if fp8 else 2
            assert gus and dns
            assert all(smem_bytes(bm, g, elem, 2) <= SMEM_LIMIT for g in gus)
            assert all(smem_bytes(bm, g, elem, 1) <= SMEM_LIMIT for g in dns)
            # (the register-capped twins apart: test_register_caps_round_trip_are_checked_and_timed_where_they_can_pay)
            assert {g.tma for g in gus} == {False, True} and len([g for g in gus if not g.max_registers]) % 2 == 0
            # tiles of few rows also with swap-AB products, each candidate once with and once without
            for cfgs in ([g for g in gus if not g.max_registers], [g for g in dns if not g.max_registers]):
                swapped = [g for g in cfgs if g.swap_ab]
                assert len(swapped) == (len(cfgs) // 2 if bm <= tune.SWAP_AB_MAX_BLOCK_M else 0), (fp8, bm)
                assert {replace(g, swap_ab=False) for g in swapped} <= set(cfgs)
            if fp8:
                assert all(g.block_k == 128 and g.block_n == 128 for g in gus)
                # prefill gate+up tiles also walk groups of 32 row blocks (4 warps, 3 stages; with and without TMA)
                grouped = sorted((g.num_warps, g.num_stages, g.tma) for g in gus if g.group_m == 32)
                assert grouped == ([(4, 3, False), (4, 3, True)] if bm >= 64 else []), (bm, grouped)
                # decode tiles also try narrow, deeply pipelined down tiles; prefill tiles do not
                narrow = any(d.block_n == 32 and d.num_stages == 8 for d in dns)
                assert narrow == (bm <= 32), bm
            # the down GEMM split over K only where FP8 decode tiles stream long K ranges
            assert {d.split_k for d in dns} == ({1, 2, 4} if fp8 and bm <= 32 else {1}), (fp8, bm)
            assert all(g.split_k == 1 for g in gus)
    cfg = MoEKernelConfig(64, GemmConfig(64, 64, 8, 4, 4), GemmConfig(128, 64, 8, 4, 4, tma=True))
    plan = tune.refine_plan({128: cfg}, [1, 128])
    assert list(plan) == [128]
    gus, dns = plan[128][(64, 0)]
    assert [g.tma for g in gus] == [False, True] and [(d.tma, d.tma_a) for d in dns] == [(False, False), (True, False),
                                                                                          (True, True)]
    # down candidates loading weights through TMA come with the activation rows through TMA too
    for fp8 in (False, True):
        _, dns = tune.candidates(128, fp8)
        assert {d for d in dns if d.tma_a} == {replace(d, tma_a=True) for d in dns if d.tma and not d.tma_a}
    persistent = tune.persistent_plan({128: cfg}, [128])[128][(64, 0)][1]
    assert any(d.persistent and d.tma and d.tma_a for d in persistent)
    # written to a table only where set; tables without it read as before
    assert "tma_a" not in cfg.to_dict()["down"]
    on = MoEKernelConfig(64, cfg.gate_up, replace(cfg.down, tma_a=True))
    assert on.to_dict()["down"]["tma_a"] is True and MoEKernelConfig.from_dict(on.to_dict()) == on
    assert "tma_a" in on.describe()


def test_tail_tiles_in_configs_and_refine_plans(tmp_path):
    """tail_m survives the table round trip, shows in describe(), and refine plans try tails where
    experts hold at least half a tile (and 16 warps for FP8 gate+up)."""
    from epmoe.bench import tune
    cfg = MoEKernelConfig(128, GemmConfig(128, 64, 8, 8, 4), GemmConfig(256, 64, 8, 8, 4, tma=True), tail_m=32)
    assert MoEKernelConfig.from_dict(cfg.to_dict()) == cfg and "BM128+32" in cfg.describe()
    uniform = MoEKernelConfig(128, GemmConfig(128, 64, 8, 8, 4), GemmConfig(256, 64, 8, 8, 4))
    assert "tail_m" not in uniform.to_dict() and MoEKernelConfig.from_dict(uniform.to_dict()).tail_m == 0
    path = str(tmp_path / "t.json")
    key = shape_key(256, 7168, 2048, 8, "bfloat16")
    tune.merge_into_table(path, key, {8192: (cfg, 9.0)}, {"device": "test"})
    assert lookup_config(8192, 256, 7168, 2048, 8, "bfloat16", paths=[path])[0] == cfg
    assert tune.tails_for(128, 256) == [0, 64, 32] and tune.tails_for(16, 0.5) == [0]
    assert tune.tails_for(64, 20) == [0]
    plan = tune.refine_plan({8192: uniform}, [8192], lambda T: T * 8 / 256, fp8=True)
    assert set(plan[8192]) == {(128, 0), (128, 64), (128, 32)}
    gus, _ = plan[8192][(128, 32)]
    assert {g.num_warps for g in gus} == {8, 16}


def test_gemv_configs_round_trip_and_survive_lookup(tmp_path):
    """A config with the decode path keeps it through the table (to_dict / from_dict, merge, lookup and
    the clamp of tile sizes) and says so in describe(); the tuner's gemv candidates are sane tiles."""
    from epmoe.bench import tune
    from epmoe.kernels.tuning_table import GemvConfig
    gemv = GemvConfig(16, 256, 8, 512, 4, 8, 3, 1)
    cfg = MoEKernelConfig(16, GemmConfig(64, 128, 1, 4, 4), GemmConfig(64, 256, 1, 4, 3), gemv=gemv)
    assert MoEKernelConfig.from_dict(cfg.to_dict()) == cfg and "gemv gate_up[BN16 BK256 w4 s3]" in cfg.describe()
    assert "gemv" not in MoEKernelConfig(16, cfg.gate_up, cfg.down).to_dict()
    path = str(tmp_path / "t.json")
    key = shape_key(128, 2048, 768, 8, "bfloat16")
    tune.merge_into_table(path, key, {1: (cfg, 0.02)}, {"device": "test"})
    assert lookup_config(1, 128, 2048, 768, 8, "bfloat16", paths=[path])[0].gemv == gemv
    with pytest.raises(ValueError, match="bad kernel config"):
        MoEKernelConfig.from_dict(dict(cfg.to_dict(), gemv={"gate_up_n": 16}))
    for n, k, warps, stages in tune._GEMV_GATE_UP + tune._GEMV_DOWN:
        assert n & (n - 1) == 0 and k & (k - 1) == 0 and warps in (4, 8) and stages >= 1


def test_rescale_candidates_and_the_margin_it_must_win_by():
    """"rescale" (less precise) is timed only for block-FP8 weights with --allow-rescale, and chosen only
    when it beats the fastest "sync" candidate by more than the margin; round trip through the table."""
    from epmoe.bench import tune
    sync = GemmConfig(128, 128, 8, 8, 3)
    rescale = GemmConfig(256, 128, 8, 8, 3, promote="rescale")
    gus, dns = tune.candidates(128, True, block_scales=True, rescale=True)
    assert any(g.promote == "rescale" for g in gus) and any(g.promote == "rescale" and g.block_n == 256 for g in dns)
    assert all(g.promote == "sync" for g in tune.candidates(128, True, rescale=True)[0]
               + tune.candidates(128, False, rescale=True)[1])
    assert tune.fastest({sync: 1.0, rescale: 0.98}) == sync
    assert tune.fastest({sync: 1.0, rescale: 0.95}) == rescale
    assert tune.fastest({rescale: 0.95}) == rescale
    cfg = MoEKernelConfig(128, sync, rescale)
    assert MoEKernelConfig.from_dict(cfg.to_dict()) == cfg and "rescale" in cfg.describe()
    plan = tune.refine_plan({8192: MoEKernelConfig(128, sync, GemmConfig(128, 128, 8, 8, 4))}, [8192],
                            fp8=True, block_scales=True, rescale=True)
    gus, dns = plan[8192][(128, 0)]
    assert {g.promote for g in gus} == {"sync", "rescale"} and any(d.block_n == 256 for d in dns)
    plan = tune.regime_plan([4096, 8192], lambda T: T * 8 / 32, fp8=True, block_scales=True, rescale=True)
    assert any(g.promote == "rescale" for by_bm in plan.values() for gus, dns in by_bm.values() for g in gus + dns)


def _promotions(plan: dict) -> set:
    return {g.promote for by_bm in plan.values() for gus, dns in by_bm.values() for g in gus + dns}


def test_default_tuner_never_yields_rescale():
    """Without --allow-rescale every candidate the tuner times (full tune, --refine and --persistent, the
    last two seeded from an entry that holds "rescale") promotes "sync", so no entry it writes holds
    "rescale"; the flag is off unless given, and its help says what it costs."""
    import argparse
    from epmoe.bench import tune
    rows = {32: lambda T: T * 8 / 32, 8: lambda T: T * 2 / 8}
    for fp8, block_scales in ((True, True), (True, False), (False, False)):
        for rows_per_expert in rows.values():
            plan = tune.regime_plan([1, 16, 128, 1024, 4096, 8192], rows_per_expert, fp8, block_scales)
            assert _promotions(plan) == {"sync"}
    seeded = {8192: MoEKernelConfig(128, GemmConfig(128, 128, 8, 8, 3, tma=True, promote="rescale"),
                                    GemmConfig(256, 128, 8, 8, 3, tma=True, promote="rescale"), 64)}
    refine = tune.refine_plan(seeded, [8192], rows[32], fp8=True, block_scales=True)
    assert _promotions(refine) == {"sync"}
    gus, dns = refine[8192][(128, 64)]
    assert {d.block_n for d in dns} == {128, 256} and any(g.num_warps == 16 for g in gus)
    assert _promotions(tune.persistent_plan(seeded, [8192])) == {"sync"}
    assert _promotions(tune.persistent_plan(seeded, [8192], rescale=True)) == {"rescale"}
    parser = argparse.ArgumentParser()
    tune.configure_parser(parser)
    assert parser.parse_args([]).allow_rescale is False
    assert parser.parse_args(["--allow-rescale"]).allow_rescale is True
    help_text = " ".join(parser.format_help().split())
    assert "--allow-rescale" in help_text and "LESS PRECISE" in help_text and "1.5-1.6e-2" in help_text


def test_shipped_tables_hold_no_rescale_entry():
    """The shipped tables come from the default tuner: every FP8 block entry promotes "sync" (float32 after
    every K block), the library's numerics; "rescale" is for tables a user tunes with --allow-rescale."""
    for name in (f for f in os.listdir(CONFIG_DIR) if f.endswith(".json")):
        for key, by_t in _load_table(os.path.join(CONFIG_DIR, name)).items():
            for T, cfg in by_t.items():
                assert cfg.gate_up.promote == cfg.down.promote == "sync", (name, key, T, cfg.describe())


def test_no_shipped_entry_splits_k_where_a_layout_that_looks_it_up_cannot():
    """The tables are tuned on the flat layout and the batched layout looks the same entries up: no entry's GEMMs
    split K where the launch refuses it (`split_k_problem`), on the flat layout as written nor on the batched layout
    as `batched_experts` serves them (`unsplit_down`), where a down GEMM that splits K would be refused."""
    pytest.importorskip("triton", reason="split_k_problem and unsplit_down live in the Triton kernels' modules")
    from epmoe.kernels.batched_moe import unsplit_down
    from epmoe.kernels.fused_moe import split_k_problem
    for name in (f for f in os.listdir(CONFIG_DIR) if f.endswith(".json")):
        for key, by_t in _load_table(os.path.join(CONFIG_DIR, name)).items():
            for T, cfg in by_t.items():
                where = (name, key, T, cfg.describe())
                assert split_k_problem(cfg.gate_up, True, False) is None, where
                assert split_k_problem(cfg.down, False, False) is None, where
                served = unsplit_down(cfg)
                assert split_k_problem(served.gate_up, True, True) is None, where
                assert split_k_problem(served.down, False, True) is None, where
                assert served == (replace(cfg, down=replace(cfg.down, split_k=1)) if cfg.down.split_k > 1 else cfg)
                if cfg.down.split_k > 1:
                    assert split_k_problem(cfg.down, False, True) is not None, where


def test_batched_tiles_follow_the_tokens_not_the_capacity(monkeypatch):
    """The batched layout's capacity is the most rows an expert can get (low_latency: ranks x max tokens); with
    the dispatcher's T the tiles are looked up for the rows an even routing gives (T k / L an expert: the flat
    layout's lookup at T), and each expert gets programs for twice those rows, a block each; without it, for a
    full capacity, as before."""
    pytest.importorskip("triton", reason="the batched layout's tile choice lives in the Triton kernels' module")
    import epmoe.kernels.batched_moe as batched_moe
    from epmoe.kernels.batched_moe import batched_config, expected_rows, row_slots
    assert expected_rows(None, 32, 1024, 8) == 1024                 # deepseek-v3 on 8 ranks, M = 128
    assert expected_rows(16, 32, 1024, 8) == 4 and expected_rows(0, 32, 1024, 8) == 1
    assert expected_rows(10 ** 6, 32, 1024, 8) == 1024              # never past the capacity
    assert row_slots(4, 1024, 16) == 16                              # a hot expert: 4 blocks at most in turn
    assert row_slots(4, 48, 16) == 1 and row_slots(1024, 1024, 16) == 64 and row_slots(100, 1024, 64) == 4
    looked_up = []
    monkeypatch.setattr(batched_moe, "lookup_config", lambda T, *a, **k: looked_up.append(T) or (
        MoEKernelConfig(16, GemmConfig(32, 32, 2, 4, 2), GemmConfig(64, 64, 1, 4, 2, split_k=2)), "stand-in"))
    assert batched_config(32, 1024, 7168, 2048, 8, "bf16", 16).down.split_k == 1
    batched_config(32, 1024, 7168, 2048, 8, "bf16", None)
    batched_config(8, 128, 4096, 14336, 2, "fp8_block", 100)         # mixtral on one rank: C = M = 128
    assert looked_up == [16, 4096, 100]


def test_register_caps_round_trip_are_checked_and_timed_where_they_can_pay():
    """`max_registers` written only where set, read back, named in the description; 0 or 32..255 only (a table's
    string or a boolean refused); the tuner times a capped twin of each swap-AB gate+up of 8 warps whose pipeline
    leaves room for two programs in an SM's shared memory, of no other tile and of no down tile; `--refine` from a
    capped entry times it uncapped too, and caps no plain-product twin."""
    from epmoe.bench import tune
    capped = GemmConfig(128, 128, 1, 8, 3, swap_ab=True, max_registers=128)
    cfg = MoEKernelConfig(32, capped, GemmConfig(64, 128, 1, 4, 4))
    assert "max_registers" not in cfg.to_dict()["down"] and cfg.to_dict()["gate_up"]["max_registers"] == 128
    assert MoEKernelConfig.from_dict(cfg.to_dict()) == cfg and cfg.describe().count(" r128") == 1
    for bad in (True, False, 16, 256, "128", 1.5):
        with pytest.raises(ValueError, match="max_registers"):
            replace(capped, max_registers=bad)
    with pytest.raises(ValueError, match="max_registers"):
        MoEKernelConfig.from_dict(dict(cfg.to_dict(), down=dict(cfg.to_dict()["down"], max_registers="0")))
    # BM32, 3 stages of 128 x 128 FP8 K blocks: 2 x (108 KB + 1 KB) fits 228 KB; 4 stages (144 KB) do not
    assert tune.register_cap_pays(replace(capped, max_registers=0), 32, 1)
    assert not tune.register_cap_pays(replace(capped, num_stages=4), 32, 1)
    assert not tune.register_cap_pays(replace(capped, num_warps=4), 32, 1)
    assert not tune.register_cap_pays(replace(capped, swap_ab=False), 32, 1)
    assert not tune.register_cap_pays(capped, 16, 1)            # half the products: 66-80 registers uncapped
    for bm in (16, 32, 64, 128):
        for fp8 in (False, True):
            gus, dns = tune.candidates(bm, fp8)
            caps = [g for g in gus if g.max_registers]
            assert all(g.max_registers == tune.REGISTER_CAP_8_WARPS and replace(g, max_registers=0) in gus
                       for g in caps)
            assert {replace(g, max_registers=0) for g in caps} == {
                g for g in gus if not g.max_registers and tune.register_cap_pays(g, bm, 1 if fp8 else 2)}
            assert not any(d.max_registers for d in dns)
            assert bool(caps) == (fp8 and bm == 32), (bm, fp8)      # BM16's 8-warp tiles need fewer registers
    entry = {32: MoEKernelConfig(32, capped, capped)}
    gus, dns = tune.refine_plan(entry, [32], fp8=True)[32][(32, 0)]
    assert replace(capped, max_registers=0) in gus and capped in gus
    assert not any(g.max_registers and not g.swap_ab for g in gus)
    gus, _ = tune.refine_plan(entry, [32])[32][(32, 0)]       # BF16 tiles twice the bytes: two programs cannot fit
    assert not any(g.max_registers for g in gus)


def test_register_cap_fits_two_8_warp_programs_with_no_spill_in_the_k_loop_sm90():
    """The cap the tuner tries (`REGISTER_CAP_8_WARPS`) on the tile it was made for, the block-FP8 swap-AB
    gate+up of 32 rows at 8 warps, 3 stages (the qwen3-30b-a3b 16-expert shard): at most 128 registers a
    thread, no local-memory access in the K loop, and shared memory for two programs. Compiled for sm_90, no
    GPU needed."""
    pytest.importorskip("triton", reason="the sm_90 cross-compile needs Triton (the [triton] extra)")
    from epmoe.bench import tune
    from epmoe.kernels.xcompile import (CrossCompileUnavailable, compile_case, local_accesses_in_mma_loops,
                                        resource_usage)
    try:
        compiled = compile_case("gate_up", 2048, 768, 8, "fp8", 32, 128, 128, 8, 3, False, False, 0,
                                swap_ab=True, maxnreg=tune.REGISTER_CAP_8_WARPS)
    except CrossCompileUnavailable as exc:
        pytest.skip(str(exc))
    used, in_loop = resource_usage(compiled), local_accesses_in_mma_loops(compiled)
    if not used or in_loop is None:
        pytest.skip("this Triton ships no cuobjdump that reads its cubin: registers and spills cannot be read")
    assert used["REG"] <= tune.REGISTER_CAP_8_WARPS and in_loop == 0, used
    assert 2 * (compiled.metadata.shared + SMEM_RESERVED_PER_PROGRAM) <= SM_SHARED_MEMORY, compiled.metadata.shared


def test_stacked_gate_up_round_trips_is_served_where_it_runs_and_timed_where_it_fits(tmp_path):
    """`stack_gate_up` written only where set, read back, named in the description; refused with TMA weights,
    the "rescale" promotion and on the down GEMM; a table entry keeps it only for 128x128 block FP8 whose I is a
    multiple of 128 (`fit_to_problem`, the lookup); the tuner times a stacked twin of every gate+up candidate
    that fits (pointer loads, "sync", uncapped, products of at most 128 registers a thread) where the problem can
    stack, and none elsewhere; a TMA twin of a stacked tile is unstacked; `--refine` times stacked and not."""
    from epmoe.bench import tune
    from epmoe.kernels.tuning_table import can_stack_gate_up, fit_to_problem
    stacked = GemmConfig(128, 128, 1, 8, 3, swap_ab=True, stack_gate_up=True)
    cfg = MoEKernelConfig(32, stacked, GemmConfig(64, 128, 1, 4, 4))
    assert "stack_gate_up" not in cfg.to_dict()["down"] and cfg.to_dict()["gate_up"]["stack_gate_up"] is True
    assert MoEKernelConfig.from_dict(cfg.to_dict()) == cfg and cfg.describe().count(" stack") == 1
    for bad in (dict(tma=True), dict(promote="rescale", swap_ab=False)):
        with pytest.raises(ValueError, match="stack_gate_up"):
            replace(stacked, **bad)
    with pytest.raises(ValueError, match="stack_gate_up"):
        replace(cfg, down=replace(cfg.down, stack_gate_up=True))
    assert can_stack_gate_up("fp8_block", 768) and not can_stack_gate_up("fp8_block", 2880)
    assert not can_stack_gate_up("fp8_channel", 768) and not can_stack_gate_up("bfloat16", 768)
    assert fit_to_problem(cfg, 2048, 768, "fp8_block").gate_up.stack_gate_up
    for fmt, inter in (("fp8_block", 2880), ("fp8_channel", 768), ("bfloat16", 768)):
        assert fit_to_problem(cfg, 2048, inter, fmt).gate_up == replace(
            fit_to_problem(cfg, 2048, inter, fmt).gate_up, stack_gate_up=False), (fmt, inter)
    # the lookup serves an entry stacked where it runs, and unstacked, saying so, where it does not
    path = str(tmp_path / "stacked.json")
    with open(path, "w") as f:
        json.dump({"entries": {shape_key(16, 2048, inter, 8, "fp8_block"): {"128": cfg.to_dict()}
                               for inter in (768, 2880)}}, f)
    served, said = lookup_config(128, 16, 2048, 768, 8, "fp8_block", paths=[path])
    assert served.gate_up.stack_gate_up and "unstacked" not in said
    served, said = lookup_config(128, 16, 2048, 2880, 8, "fp8_block", paths=[path])
    assert not served.gate_up.stack_gate_up and "gate+up unstacked" in said
    for bm in (16, 32, 64, 128):
        gus, _ = tune.candidates(bm, True, block_scales=True, stack=True)
        twins = [g for g in gus if g.stack_gate_up]
        assert {replace(g, stack_gate_up=False) for g in twins} == {
            g for g in gus if not g.stack_gate_up and tune.stack_fits(g, bm)}, bm
        assert all(not g.tma and g.promote == "sync" and 4 * g.block_n * bm <= 128 * 32 * g.num_warps
                   and g.num_warps <= 8 for g in twins)
        assert bool(twins) == (bm <= 64), bm                 # BM128's products spill at 8 and 16 warps
        assert not any(g.stack_gate_up for g in tune.candidates(bm, True, block_scales=True)[0])
    assert tune.with_tma_twins([stacked]) == [stacked, replace(stacked, tma=True, stack_gate_up=False)]
    gus, _ = tune.refine_plan({32: cfg}, [32], fp8=True, block_scales=True, stack=True)[32][(32, 0)]
    assert stacked in gus and replace(stacked, stack_gate_up=False) in gus
    assert all(tune.stack_fits(g, 32) for g in gus if g.stack_gate_up)    # not its capped twin
    assert any(g.max_registers for g in gus)
    wide = MoEKernelConfig(64, replace(stacked, swap_ab=False), cfg.down)      # 8 warps: its 16-warp twin spills
    gus, _ = tune.refine_plan({1024: wide}, [1024], fp8=True, block_scales=True, stack=True)[1024][(64, 0)]
    assert wide.gate_up in gus and replace(wide.gate_up, num_warps=16, stack_gate_up=False) in gus
    assert not any(g.stack_gate_up and g.num_warps == 16 for g in gus)
    gus, _ = tune.refine_plan({32: cfg}, [32], fp8=True, block_scales=True)[32][(32, 0)]
    assert not any(g.stack_gate_up for g in gus)
    gus, _ = tune.persistent_plan({32: cfg}, [32])[32][(32, 0)]
    assert stacked in gus and replace(stacked, persistent=True) in gus
    assert replace(stacked, tma=True, persistent=True, stack_gate_up=False) in gus
    for fp8, block_scales in ((False, False), (True, False)):      # BF16, per-channel FP8: no stacking to time
        assert not any(g.stack_gate_up for g in tune.candidates(32, fp8, block_scales=block_scales, stack=True)[0])


def test_stacked_gate_up_of_8_warps_fits_two_programs_with_no_spill_sm90():
    """The stacked block-FP8 swap-AB gate+up of 32 rows at 8 warps, 3 stages (the qwen3-30b-a3b 16-expert shard):
    one warpgroup MMA a K block, at most 128 registers a thread with no cap (two programs an SM; the same tile
    unstacked takes 130), no local-memory access in the K loop. Compiled for sm_90, no GPU needed."""
    pytest.importorskip("triton", reason="the sm_90 cross-compile needs Triton (the [triton] extra)")
    from epmoe.kernels.xcompile import (CrossCompileUnavailable, compile_case, local_accesses_in_mma_loops,
                                        resource_usage)
    try:
        compiled = compile_case("gate_up", 2048, 768, 8, "fp8", 32, 128, 128, 8, 3, False, False, 0,
                                swap_ab=True, stack_gate_up=True)
    except CrossCompileUnavailable as exc:
        pytest.skip(str(exc))
    used, in_loop = resource_usage(compiled), local_accesses_in_mma_loops(compiled)
    if not used or in_loop is None:
        pytest.skip("this Triton ships no cuobjdump that reads its cubin: registers and spills cannot be read")
    assert used["REG"] <= 128 and in_loop == 0, used
    assert compiled.asm["ttgir"].count("ttng.warp_group_dot ") == 1


def test_swap_ab_round_trips_is_refused_with_rescale_and_flags_must_be_booleans():
    """`swap_ab` written only where set and read back; with the "rescale" promotion refused (its accumulators
    stay [rows, columns]), also when a table says so; a flag that is not a boolean (a table's "false") refused;
    `--refine` of a decode entry times its swap twin, and with "rescale" allowed a swapped entry's "rescale"
    twin is unswapped."""
    from epmoe.bench import tune
    plain = GemmConfig(128, 128, 1, 4, 4)
    swapped = replace(plain, swap_ab=True)
    cfg = MoEKernelConfig(16, swapped, plain)
    assert "swap_ab" not in cfg.to_dict()["down"] and cfg.to_dict()["gate_up"]["swap_ab"] is True
    assert MoEKernelConfig.from_dict(cfg.to_dict()) == cfg and cfg.describe().count(" swap") == 1
    with pytest.raises(ValueError, match="rescale"):
        replace(swapped, promote="rescale")
    with pytest.raises(ValueError, match="rescale"):
        MoEKernelConfig.from_dict(dict(cfg.to_dict(), gate_up=dict(cfg.to_dict()["gate_up"], promote="rescale")))
    for flag in ("swap_ab", "tma", "persistent", "tma_a", "stack_gate_up"):
        with pytest.raises(ValueError, match=f"{flag} must be true or false"):
            MoEKernelConfig.from_dict(dict(cfg.to_dict(), down=dict(cfg.to_dict()["down"], **{flag: "false"})))
    gus, dns = tune.refine_plan({16: cfg}, [16])[16][(16, 0)]
    assert {g.swap_ab for g in gus} == {g.swap_ab for g in dns} == {False, True}
    wide = MoEKernelConfig(64, swapped, plain)
    gus, _ = tune.refine_plan({1024: wide}, [1024], fp8=True, block_scales=True, rescale=True)[1024][(64, 0)]
    assert all(not g.swap_ab for g in gus if g.promote == "rescale") and any(g.swap_ab for g in gus)


def test_a_gluon_entry_is_written_read_and_kept_when_fitted(tmp_path):
    """`gluon` (the `triton` experts run `triton_ws`'s pipeline for that T): written only where set, read
    back, shown, kept when the tiles are fitted to a small problem; anything but a boolean refused."""
    from epmoe.bench import tune
    from epmoe.kernels.tuning_table import fit_to_problem, tables_pick_gluon
    tiles = MoEKernelConfig(128, GemmConfig(128, 128, 8, 8, 3), GemmConfig(128, 128, 8, 8, 4), tail_m=64)
    gluon = replace(tiles, gluon=True)
    assert "gluon" not in tiles.to_dict() and gluon.to_dict()["gluon"] is True
    assert MoEKernelConfig.from_dict(gluon.to_dict()) == gluon and MoEKernelConfig.from_dict(tiles.to_dict()) == tiles
    assert gluon.describe().endswith("| gluon") and "gluon" not in tiles.describe()
    assert fit_to_problem(gluon, 200, 136, "fp8_block").gluon
    with pytest.raises(ValueError, match="gluon must be true or false"):
        MoEKernelConfig.from_dict(dict(gluon.to_dict(), gluon="yes"))
    path = str(tmp_path / "t.json")
    key = shape_key(32, 7168, 2048, 8, "fp8_block")
    tune.merge_into_table(path, key, {1024: (tiles, 1.0), 8192: (gluon, 6.0)}, {"device": "test"})
    _load_table.cache_clear()
    assert not lookup_config(1000, 32, 7168, 2048, 8, "fp8_block", paths=[path])[0].gluon   # the tiles' entry
    # an entry's gluon serves batches within a factor 2 of its T, from 128 rows per expert: not decode
    for T, served in ((8192, True), (4096, True), (16384, True), (4095, False), (16385, False), (1, False)):
        assert lookup_config(T, 32, 7168, 2048, 8, "fp8_block", paths=[path])[0].gluon == served, T
    tune.merge_into_table(path, key, {512: (gluon, 0.5)}, {"device": "test"})     # 512 x 8 / 32 = 128 rows
    _load_table.cache_clear()
    assert lookup_config(512, 32, 7168, 2048, 8, "fp8_block", paths=[path])[0].gluon
    assert not lookup_config(511, 32, 7168, 2048, 8, "fp8_block", paths=[path])[0].gluon
    # the experts set the pipeline up only where a table picks it for their shape (any number of local
    # experts) and weight format
    assert tables_pick_gluon(7168, 2048, 8, "fp8_block", paths=[path])
    assert not tables_pick_gluon(7168, 2048, 8, "bfloat16", paths=[path])
    assert not tables_pick_gluon(4096, 2048, 8, "fp8_block", paths=[path])
    assert not tables_pick_gluon(7168, 2048, 8, "fp8_block", paths=[])


def test_a_shipped_gluon_entry_is_one_tune_wrote():
    """A shipped entry says gluon only as `epmoe tune` writes it: with the time it measured (`measured_ms`,
    the whole op for such entries), at a T whose batches have the 128 rows per expert the Gluon tiles hold,
    and not copied from another GPU's table."""
    for f in (f for f in os.listdir(CONFIG_DIR) if f.endswith(".json")):
        with open(os.path.join(CONFIG_DIR, f)) as fh:
            entries = json.load(fh)["entries"]
        for key, by_t in entries.items():
            L, k = int(key.split("L=")[1].split(",")[0]), int(key.split("k=")[1].split(",")[0])
            for t, entry in by_t.items():
                if entry.get("gluon"):
                    assert entry.get("measured_ms", 0) > 0 and "copied_from" not in entry, (f, key, t)
                    assert int(t) * k >= GLUON_MIN_ROWS * L, (f, key, t)


def test_a_quick_tune_on_another_gpu_of_the_family_keeps_the_entries_it_did_not_time(tmp_path):
    """A quick mode seeded from another GPU's table (an H100 from the H200's) writes the whole entry into
    this GPU's table, the T it did not time marked copied: the lookup takes the first table that has the
    key, so a partial entry would send every other T to the tuned ones."""
    from epmoe.bench import tune
    key = shape_key(8, 4096, 14336, 2, "fp8_block")
    small = MoEKernelConfig(16, GemmConfig(128, 128, 1, 8, 3), GemmConfig(64, 128, 1, 4, 6))
    large = MoEKernelConfig(128, GemmConfig(128, 128, 8, 8, 3), GemmConfig(128, 128, 8, 8, 4))
    family, own = str(tmp_path / "h200.json"), str(tmp_path / "h100.json")
    tune.merge_into_table(family, key, {1: (small, 0.1), 2048: (replace(large, gluon=True), 1.5),
                                        8192: (large, 6.0)}, {"device": "H200"})
    tune.merge_into_table(own, key, {8192: (replace(large, gluon=True), 5.5)}, {"device": "H100"}, seed_from=family)
    _load_table.cache_clear()
    cfg, where = lookup_config(1, 8, 4096, 14336, 2, "fp8_block", paths=[own, family])
    # the copy says so wherever the lookup's source is printed (benchmarks, the tuner's notes)
    assert cfg == small and where == f"h100.json[{key}][T=1], copied from h200.json: not timed on this table's GPU"
    cfg, where = lookup_config(8192, 8, 4096, 14336, 2, "fp8_block", paths=[own, family])
    assert cfg.gluon and where == f"h100.json[{key}][T=8192]"
    with open(own) as f:
        entry = json.load(f)["entries"][key]
    assert entry["1"]["copied_from"] == "h200.json" and "copied_from" not in entry["8192"]
    assert entry["8192"]["measured_ms"] == 5.5 and entry["8192"]["measured"] == "end_to_end"
    # a Gluon choice is raced on the GPU it serves: copied as its tiles, `gluon` off
    assert entry["2048"]["copied_from"] == "h200.json" and "gluon" not in entry["2048"]
    cfg, where = lookup_config(2048, 8, 4096, 14336, 2, "fp8_block", paths=[own, family])
    assert not cfg.gluon and cfg == large and where.startswith(f"h100.json[{key}][T=2048], copied from h200.json")
    tune.merge_into_table(own, key, {1: (small, 0.09)}, {"device": "H100"}, seed_from=family)   # has it now
    with open(own) as f:
        entry = json.load(f)["entries"][key]
    assert "copied_from" not in entry["1"] and entry["8192"]["gluon"] is True
    _load_table.cache_clear()
    assert lookup_config(1, 8, 4096, 14336, 2, "fp8_block", paths=[own, family])[1] == f"h100.json[{key}][T=1]"


def test_tune_gluon_mode_times_the_table_entry_alone_and_refuses_contradictions():
    import argparse

    from epmoe.bench import tune
    from epmoe.usage import UsageError
    cfg = MoEKernelConfig(128, GemmConfig(128, 128, 8, 8, 3), GemmConfig(128, 128, 8, 8, 4, promote="rescale"))
    rows = lambda T: T * 8 / 32       # noqa: E731  (deepseek-v3's 32-expert shard: 128 rows at T = 512)
    plan = tune.table_plan({8192: cfg, 256: cfg, 1: cfg}, [8192, 1024, 256, 1], rows)
    assert plan == {8192: {(128, 0): ([cfg.gate_up], [replace(cfg.down, promote="sync")])}}
    assert list(tune.table_plan({512: cfg}, [512], rows)) == [512]
    # where the table has no entry at a T, the tiles the lookup serves there are raced (a shape never tuned, as
    # the per-channel FP8 ones were when the Gluon GEMMs took that format); an entry is kept as it is
    from epmoe.kernels.tuning_table import GemvConfig
    heuristic = replace(cfg, gemv=GemvConfig(16, 256, 8, 512), gluon=True)
    served = {8192: (heuristic, "heuristic"), 4096: (cfg, "table entry at T=8192"), 1: (cfg, "heuristic")}
    tiles_only = replace(cfg, block_m=64)
    entries = tune.gluon_race_entries({4096: tiles_only}, [8192, 4096], served)
    assert entries == {8192: replace(heuristic, gemv=None, gluon=False), 4096: tiles_only}
    plan = tune.table_plan(entries, [8192, 4096], rows)
    assert set(plan) == {8192, 4096} and plan[4096] == {(64, 0): ([cfg.gate_up], [replace(cfg.down, promote="sync")])}
    # --no-gluon keeps the flag an entry had
    tiles = replace(cfg, gluon=False)
    kept, measured = tune.keeping_gluon({8192: (tiles, 5.0), 1024: (tiles, 1.0)},
                                        {8192: replace(cfg, gluon=True), 1024: cfg})
    assert kept == {8192: (replace(tiles, gluon=True), 5.0), 1024: (tiles, 1.0)}
    assert measured == {8192: "end_to_end_tiles"}        # its time is the tiles', not the pipeline's
    p = argparse.ArgumentParser()
    tune.configure_parser(p)
    for argv, words in ((["--gluon", "--no-gluon"], "--no-gluon"), (["--gluon", "--persistent"], "quick modes"),
                        (["--refine", "--persistent"], "quick modes"), (["--settle-ms", "-5"], "--settle-ms"),
                        (["--audit", "--follow"], "--follow")):
        with pytest.raises(UsageError, match=words):
            tune.check_mode_flags(p.parse_args(argv))
    tune.check_mode_flags(p.parse_args(["--gluon"]))
    assert p.parse_args([]).settle_ms == tune.END_TO_END_SETTLE_MS > 0


@pytest.mark.parametrize("table", ["NVIDIA_H200.json", "NVIDIA_H100_80GB_HBM3.json", "capped"])
def test_xcompile_reads_every_bf16_and_block_fp8_configuration_of_a_table(table, tmp_path):
    """`python -m epmoe.kernels.xcompile --table`: each T's gate+up and down tile (and tail tile) of the
    BF16 and block-FP8 entries, named by key, T, kernel and rows, with their swap-AB, register cap and stacking."""
    pytest.importorskip("triton", reason="the sm_90 cross-compile needs Triton (the [triton] extra)")
    from epmoe.kernels.xcompile import table_cases
    path = os.path.join(CONFIG_DIR, table)
    if table == "capped":         # entries with a register cap and swap-AB (as the H200 table's) and stacked
        path = str(tmp_path / "capped.json")      # products, which no shipped table has
        capped = MoEKernelConfig(32, GemmConfig(128, 128, 1, 8, 3, swap_ab=True, max_registers=128),
                                 GemmConfig(64, 128, 1, 4, 4))
        stacked = replace(capped, gate_up=replace(capped.gate_up, max_registers=0, stack_gate_up=True))
        with open(path, "w") as f:
            json.dump({"entries": {shape_key(16, 2048, 768, 8, "fp8_block"): {"128": capped.to_dict(),
                                                                              "256": stacked.to_dict()}}}, f)
    cases = table_cases(path)
    with open(path) as f:
        entries = json.load(f)["entries"]
    for key, by_t in entries.items():
        fmt = key.split("fmt=")[1]
        for T, c in by_t.items():
            for kernel in ("gate_up", "down"):
                for bm in [c["block_m"]] + ([c["tail_m"]] if c.get("tail_m") else []):
                    name = f"{key}:T{T}:{kernel}:bm{bm}"
                    assert (name in cases) == (fmt in ("bfloat16", "fp8_block")), name
                    if name in cases:
                        assert cases[name][4] == ("fp8" if fmt == "fp8_block" else "bf16")
                        assert cases[name][6:10] == (c[kernel]["block_n"], c[kernel]["block_k"],
                                                     c[kernel]["num_warps"], c[kernel]["num_stages"])
                        assert cases[name][17:] == (c[kernel].get("swap_ab", False),
                                                    c[kernel].get("max_registers") or None,
                                                    c[kernel].get("stack_gate_up", False))


def test_served_at_names_what_the_lookup_serves_each_batch_size(tmp_path):
    """`served_at` says what a tune must beat end to end at each T it times: the configuration the lookup serves
    there, an entry at that T or near it, or the heuristic, fitted as the lookup fits it."""
    from epmoe.bench import tune
    old = MoEKernelConfig(16, GemmConfig(64, 64, 1, 4, 3), GemmConfig(32, 64, 1, 4, 4))
    new = MoEKernelConfig(64, GemmConfig(128, 64, 1, 8, 4), GemmConfig(64, 64, 1, 4, 6))
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"entries": {shape_key(4, 64, 32, 2, "bfloat16"): {
        "1": old.to_dict(), "16": old.to_dict(), "128": new.to_dict()}}}))
    _load_table.cache_clear()
    tokens = [1, 2, 16, 128, 256]
    served = tune.served_at(tokens, tune.configs_served(tokens, 4, 64, 32, 2, "bfloat16", paths=[str(path)]))
    assert set(served) == set(tokens)
    assert served[1] == served[2] == fit_to_problem(old, 64, 32, "bfloat16")
    assert served[128] == served[256] == fit_to_problem(new, 64, 32, "bfloat16")
    no_table = tune.lookup_paths(str(tmp_path / "none.json"), False)        # no table: the heuristic serves
    assert tune.served_at([4, 512], tune.configs_served([4, 512], 4, 64, 32, 2, "bfloat16", paths=no_table)) == {
        4: heuristic_config(4, 4, 64, 32, 2), 512: heuristic_config(512, 4, 64, 32, 2)}


@pytest.mark.parametrize("method,graph,want", [("graph", True, 0.5), ("eager", True, float("inf")),
                                               ("eager", False, 0.5)])
def test_a_race_path_timed_eagerly_is_not_compared(method, graph, want):
    """`_safe_time`: a path asked for as CUDA-graph replays whose capture failed (the timer fell back to eager
    launches) is not comparable with the replayed paths of its race: inf, never chosen. Kernel candidates, timed
    eagerly by design, keep their time; one that cannot run at all is inf."""
    from types import SimpleNamespace

    from epmoe.bench import tune

    class Timer:
        def time(self, fn, reps, warmup, use_graph):
            assert use_graph == graph
            return SimpleNamespace(median_ms=0.5, method=method)

    class Failing:
        def time(self, fn, reps, warmup, use_graph):
            raise RuntimeError("out of resources: shared memory")
    assert tune._safe_time(Timer(), lambda: None, 3, graph=graph) == want
    assert tune._safe_time(Failing(), lambda: None, 3, graph=graph) == float("inf")


def test_end_to_end_paths_and_choice():
    """What one end-to-end race runs and which it keeps: each BLOCK_M's best tiles, the decode kernels, the Gluon
    pipeline and what was served before (first, so that it keeps a tie; a Gluon entry of before is the Gluon path,
    or runs its tiles where that is not raced); the fastest plain path wins unless a Gluon path beats it by more
    than GLUON_MARGIN; failed paths (inf) never win, and with no tiles or decode path left there is no choice."""
    from epmoe.bench import tune
    from epmoe.kernels.tuning_table import GemvConfig
    bm64 = MoEKernelConfig(64, GemmConfig(128, 64, 1, 8, 4), GemmConfig(64, 64, 1, 4, 6))
    bm32 = MoEKernelConfig(32, GemmConfig(64, 64, 1, 4, 3), GemmConfig(32, 64, 1, 4, 4), tail_m=16)
    old = MoEKernelConfig(16, GemmConfig(64, 64, 1, 4, 3), GemmConfig(32, 64, 1, 4, 4))
    gemv = GemvConfig(8, 256, 8, 256)
    paths = tune.end_to_end_paths([bm64, bm32], [gemv, replace(gemv, pdl=True)], gluon=True, before=old)
    assert list(paths) == ["table before", "tiles BM64", "tiles BM32+16", "gemv", "gemv pdl", "gluon"]
    assert paths["table before"] == old and paths["tiles BM32+16"] == bm32
    assert paths["gemv"] == replace(bm64, gemv=gemv) and paths["gemv pdl"].gemv.pdl
    assert paths["gluon"] == replace(bm64, gluon=True)
    # before is one of the new paths, or the Gluon path: raced once
    assert list(tune.end_to_end_paths([bm64, bm32], before=bm32)) == ["tiles BM64", "tiles BM32+16"]
    assert list(tune.end_to_end_paths([bm64], gluon=True, before=replace(old, gluon=True))) == ["tiles BM64", "gluon"]
    # a Gluon entry of before where the Gluon pipeline is not raced: its tiles
    assert tune.end_to_end_paths([bm64], before=replace(old, gluon=True))["table before"] == old
    # new tiles passed with flags set run as plain tiles
    assert tune.end_to_end_paths([replace(bm64, gemv=gemv, gluon=True)]) == {"tiles BM64": bm64}

    inf = float("inf")
    for ends, want in (({"table before": 1.0, "tiles BM64": 1.0, "tiles BM32+16": 1.0}, "table before"),  # a tie: kept
                       ({"table before": 1.0, "tiles BM64": 0.99, "tiles BM32+16": 1.2}, "tiles BM64"),
                       ({"table before": 1.0, "tiles BM64": 1.1, "gemv": 0.7, "gemv pdl": 0.69}, "gemv pdl"),
                       ({"table before": 1.0, "tiles BM64": 1.1, "gluon": 0.99}, "table before"),  # inside the margin
                       ({"table before": 1.0, "tiles BM64": 1.1, "gluon": 0.97}, "gluon"),
                       ({"table before": inf, "tiles BM64": 1.1}, "tiles BM64"),
                       ({"table before": inf, "gluon": 2.0}, None),     # its tiles must run too
                       ({"table before": inf, "tiles BM64": inf}, None)):
        assert tune.end_to_end_choice(ends, paths) == want, ends
    # the path that runs what was served: "table before", a new path equal to it, the Gluon path for a Gluon entry
    # where that is raced (else its tiles), the decode path for a decode entry whose tiles lead the race
    assert tune.served_path(paths, old) == "table before" and tune.served_path(paths, None) is None
    assert tune.served_path(paths, replace(bm32, gluon=True)) == "gluon"
    assert tune.served_path(tune.end_to_end_paths([bm64, bm32]), replace(bm32, gluon=True)) == "tiles BM32+16"
    assert tune.served_path(tune.end_to_end_paths([bm64, bm32], before=bm32), bm32) == "tiles BM32+16"
    glu = replace(old, gluon=True)
    assert tune.served_path(tune.end_to_end_paths([bm64], gluon=True, before=glu), glu) == "gluon"
    assert tune.served_path(tune.end_to_end_paths([bm64], before=glu), glu) == "table before"
    assert tune.served_path(tune.end_to_end_paths([old]), glu) == "tiles BM16"
    dec = replace(bm64, gemv=gemv)
    assert tune.served_path(tune.end_to_end_paths([bm64], [gemv], before=dec), dec) == "gemv"
    dec_old = replace(old, gemv=gemv)
    assert tune.served_path(tune.end_to_end_paths([bm64], [gemv], before=dec_old), dec_old) == "table before"
    # what the lookup served keeps its place unless beaten by more than SERVED_MARGIN; a Gluon entry of before too
    near = 1.0 / (1 + tune.SERVED_MARGIN / 2)
    assert tune.end_to_end_choice({"table before": 1.0, "tiles BM64": near}, paths, "table before") == "table before"
    assert tune.end_to_end_choice({"table before": 1.0, "tiles BM64": 0.95}, paths, "table before") == "tiles BM64"
    assert tune.end_to_end_choice({"tiles BM64": near, "gluon": 1.0}, paths, "gluon") == "gluon"
    assert tune.end_to_end_choice({"tiles BM64": 0.95, "gluon": 1.0}, paths, "gluon") == "tiles BM64"
    assert tune.end_to_end_choice({"table before": inf, "tiles BM64": 1.0}, paths, "table before") == "tiles BM64"
    # a decode or Gluon winner takes the fastest tiles that ran
    ends = {"table before": 1.2, "tiles BM64": 1.1, "tiles BM32+16": 1.0, "gluon": 0.5}
    assert tune.with_fastest_tiles("gluon", ends, paths) == replace(bm32, gluon=True)
    assert tune.with_fastest_tiles("tiles BM64", ends, paths) == bm64


@pytest.mark.parametrize("T,winner,served", [(1, "table before", True), (1, "gemv", True), (128, "tiles BM32", True),
                                             (128, "table before", True), (8192, "gluon", True),
                                             (8192, "tiles BM128", True), (128, "tiles BM32", False),
                                             (1, "gemv", False)])
def test_tune_races_every_batch_size_end_to_end_against_what_was_served(monkeypatch, T, winner, served):
    """`tune_problem` at every T, not only decode: the kernels' candidates are ranked on the GPU timer as they
    are (each BLOCK_M's fastest pair), then each BLOCK_M's best, the decode kernels (T <= 16), the Gluon
    pipeline (128 rows per expert or more) and what the lookup served before race the whole op on a timer over
    the same clock that settles each path for `settle_ms`; the entry is the race's winner with its end-to-end
    time, even where the kernels' times ranked another BLOCK_M first (what happened to the qwen3 16-expert
    shard at T = 128 on the H100: 64-row tiles faster by kernels, 2% slower whole); a decode or Gluon winner
    takes the tiles of the fastest tiles path. The tiles race as the lookup will serve them (float16: stages
    dropped to fit), so what is written is what was timed. Without a served rival (`before` None) the new paths
    race alone."""
    import torch
    from epmoe import MoEConfig
    from epmoe.bench import gpu_timing, tune
    from epmoe.kernels.tuning_table import GemvConfig
    from epmoe.layouts import ExpertWeights

    clock = object()                              # stands in for the GPU's clock: nothing here times anything
    monkeypatch.setattr(gpu_timing, "GpuTimer", lambda device: gpu_timing.Timer(clock))
    heights = {1: (16, 32), 128: (64, 32), 8192: (128, 64)}[T]      # the first faster by kernel times
    old = MoEKernelConfig(16, GemmConfig(32, 64, 1, 4, 3), GemmConfig(32, 64, 1, 4, 3))
    gemv = GemvConfig(8, 256, 8, 256)
    seen = {}

    def fake_candidates(problem, T_, bm, gus, dns, timer, *a, **k):
        seen["kernels"] = timer
        return {gus[0]: 1.0}, {dns[0]: 1.0 if bm == heights[0] else 1.5}

    runner_up = next(f"tiles BM{bm}" for bm in heights if f"tiles BM{bm}" != winner)

    def fake_race(problem, T_, paths, ws, timer, reps, gen, console, sampler=None):
        seen["race"], seen["paths"], seen["ws"] = timer, paths, ws
        return {name: 0.5 if name == winner else 1.0 if name == runner_up else 2.0 for name in paths}

    monkeypatch.setattr(tune, "_time_candidates", fake_candidates)
    monkeypatch.setattr(tune, "compile_jobs", lambda *a, **k: [])
    monkeypatch.setattr(tune, "_gemv_pair", lambda *a, **k: ([gemv], " (kernels)"))
    pipeline = object()
    monkeypatch.setattr(tune, "_gluon_experts", lambda problem: (pipeline, None))
    monkeypatch.setattr(tune, "_race", fake_race)
    cfg = MoEConfig(num_experts=4, top_k=2, hidden_size=64, intermediate_size=32, dtype=torch.float16)
    weights = ExpertWeights(torch.zeros(4, 64, 64, dtype=torch.float16), torch.zeros(4, 64, 32, dtype=torch.float16))
    problem = tune.Problem(cfg, "float16", weights, False)
    g = GemmConfig(64, 64, 1, 4, 5)
    plan = {T: {(bm, 0): ([g], [g]) for bm in heights}}
    best = tune.tune_problem(problem, [T], reps=1, plan=plan, show_progress=False, settle_ms=250.0,
                             before={T: old} if served else None)
    names = [f"tiles BM{bm}" for bm in heights]
    want = ["table before"] * served + names + (["gemv"] if T <= tune.GEMV_MAX_TOKENS else []) + \
        (["gluon"] if T * 2 / 4 >= GLUON_MIN_ROWS else [])
    assert list(seen["paths"]) == want
    assert seen["ws"] is (pipeline if "gluon" in want else None)
    for name in names:
        raced = seen["paths"][name]
        assert raced == fit_to_problem(raced, 64, 32, "float16") and raced.gate_up != g, raced   # as served
    paths = seen["paths"]
    if winner in ("gemv", "gluon"):
        tiles = paths[runner_up]
        assert best[T] == (replace(paths[winner], block_m=tiles.block_m, gate_up=tiles.gate_up, down=tiles.down), 0.5)
    else:
        assert best[T] == (paths[winner], 0.5)
    assert seen["kernels"].settle_ms == 0 and seen["kernels"].clock is clock
    assert seen["race"].settle_ms == 250.0 and seen["race"].clock is clock


def test_tune_writes_each_batch_size_as_it_is_decided(monkeypatch, tmp_path):
    """`epmoe tune` writes each T's entry as soon as that T is decided (`entry_writer` as `tune_problem`'s
    `on_best`): a tune stopped while it times the next T (here its race interrupted) keeps the T it finished, the
    table whole and no temporary file beside it. With --no-gluon's `keep_gluon_of` an entry keeps its `gluon`."""
    import torch
    from epmoe import MoEConfig
    from epmoe.bench import gpu_timing, tune
    from epmoe.layouts import ExpertWeights

    monkeypatch.setattr(gpu_timing, "GpuTimer", lambda device: gpu_timing.Timer(object()))
    monkeypatch.setattr(tune, "_time_candidates", lambda problem, T, bm, gus, dns, *a, **k: ({gus[0]: 1.0},
                                                                                            {dns[0]: 1.0}))
    monkeypatch.setattr(tune, "compile_jobs", lambda *a, **k: [])
    monkeypatch.setattr(tune, "_gluon_experts", lambda problem: (None, "not on this machine"))
    raced = []

    def fake_race(problem, T, paths, ws, timer, reps, gen, console, sampler=None):
        raced.append(T)
        if T == 512:
            with open(path) as f:                       # the first T is in the table before the second is timed
                assert set(json.load(f)["entries"][key]) == {"128"}
            raise KeyboardInterrupt                     # stopped part way
        return {name: 0.25 for name in paths}

    monkeypatch.setattr(tune, "_race", fake_race)
    cfg = MoEConfig(num_experts=4, top_k=2, hidden_size=64, intermediate_size=32, dtype=torch.float16)
    weights = ExpertWeights(torch.zeros(4, 64, 64, dtype=torch.float16), torch.zeros(4, 64, 32, dtype=torch.float16))
    problem = tune.Problem(cfg, "float16", weights, False)
    g = GemmConfig(64, 64, 1, 4, 3)
    plan = {T: {(32, 0): ([g], [g])} for T in (128, 512)}
    path, key = str(tmp_path / "table.json"), shape_key(4, 64, 32, 2, "float16")
    other = shape_key(8, 64, 32, 2, "float16")
    tune.merge_into_table(path, other, {1: (MoEKernelConfig(16, g, g), 0.1)}, {"device": "test"})
    before = MoEKernelConfig(32, g, g, gluon=True)
    write = tune.entry_writer(path, key, {"device": "test", "date": "today"}, keep_gluon_of={128: before})
    with pytest.raises(KeyboardInterrupt):
        tune.tune_problem(problem, [128, 512], reps=1, plan=plan, show_progress=False, on_best=write)
    assert raced == [128, 512]
    with open(path) as f:
        data = json.load(f)
    assert set(data["entries"]) == {other, key} and set(data["entries"][key]) == {"128"}
    entry = data["entries"][key]["128"]
    assert entry["measured_ms"] == 0.25 and entry["gluon"] is True and entry["measured"] == "end_to_end_tiles"
    assert data["date"] == "today"
    assert sorted(os.listdir(tmp_path)) == ["table.json"]


def test_tune_writes_nothing_where_no_batch_size_was_decided(monkeypatch, tmp_path):
    """Every path failing end to end decides no T: nothing is written, so no empty entry for the shape (the
    lookup takes the first table that has a shape's key) appears in the table."""
    import torch
    from epmoe import MoEConfig
    from epmoe.bench import gpu_timing, tune
    from epmoe.layouts import ExpertWeights

    monkeypatch.setattr(gpu_timing, "GpuTimer", lambda device: gpu_timing.Timer(object()))
    monkeypatch.setattr(tune, "_time_candidates", lambda problem, T, bm, gus, dns, *a, **k: ({gus[0]: 1.0},
                                                                                            {dns[0]: 1.0}))
    monkeypatch.setattr(tune, "compile_jobs", lambda *a, **k: [])
    monkeypatch.setattr(tune, "_race", lambda problem, T, paths, *a: {name: float("inf") for name in paths})
    cfg = MoEConfig(num_experts=4, top_k=2, hidden_size=64, intermediate_size=32, dtype=torch.float16)
    weights = ExpertWeights(torch.zeros(4, 64, 64, dtype=torch.float16), torch.zeros(4, 64, 32, dtype=torch.float16))
    g = GemmConfig(64, 64, 1, 4, 3)
    path = str(tmp_path / "table.json")
    write = tune.entry_writer(path, shape_key(4, 64, 32, 2, "float16"), {"device": "test"})
    best = tune.tune_problem(tune.Problem(cfg, "float16", weights, False), [128], reps=1,
                             plan={128: {(32, 0): ([g], [g])}}, show_progress=False, on_best=write)
    assert best == {} and not os.path.exists(path)


def test_tune_stopped_part_way_says_what_was_written_and_what_was_not():
    """Ctrl-C, or SIGTERM from a time limit (raised as KeyboardInterrupt in the main thread), stops `epmoe tune`
    with a report: the entries written stay in the table, each shape begun with its T written, the T of the shape
    it stopped in not tuned (as --tokens to run again) and the shapes not begun."""
    import signal
    import time
    from epmoe.bench import tune
    report = tune.stopped_report("/t/NVIDIA_H200.json", [1, 16, 512], [("A", [1, 16, 512]), ("B", [16])], 3)
    assert report.splitlines() == [
        "epmoe tune: stopped. The entries written before it stay in /t/NVIDIA_H200.json:",
        "  A: T = 1, 16, 512 written",
        "  B: T = 16 written",
        "  not tuned: B at --tokens 1,512",
        "  not begun: 1 of the 3 shape/format pairs asked for"]
    assert tune.stopped_report("/t.json", [8], [("A", [])], 1).splitlines()[1:] == [
        "  A: nothing written", "  not tuned: A at --tokens 8"]
    before = signal.getsignal(signal.SIGTERM)
    previous = tune._sigterm_as_interrupt()
    try:
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)                           # the handler raises before this returns
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert previous == before and signal.getsignal(signal.SIGTERM) == before


def _tune_main_on_the_cpu(monkeypatch):
    """`epmoe tune`'s main made to run on the CPU, its GPU stood in for (the device's name, the weights); returns
    run(argv): main on a 4-expert shape (H 64, I 32, top-2) with argv added, its exit status (`tune_problem` is
    the caller's to stand in for)."""
    pytest.importorskip("triton", reason="epmoe tune reports triton's version")
    import argparse
    import torch
    from epmoe.bench import experts as bench_experts
    from epmoe.bench import tune
    from epmoe.layouts import ExpertWeights

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    real_generator = torch.Generator
    monkeypatch.setattr(torch, "Generator", lambda device=None: real_generator())
    monkeypatch.setattr(bench_experts, "make_weights", lambda cfg, device, gen: (ExpertWeights(
        torch.zeros(4, 64, 64, dtype=torch.bfloat16), torch.zeros(4, 64, 32, dtype=torch.bfloat16)), None))

    def run(argv):
        p = argparse.ArgumentParser()
        tune.configure_parser(p)
        args = p.parse_args(["--local-experts", "4", "--hidden", "64", "--inter", "32", "--top-k", "2",
                             "--jobs", "1", *argv])
        args.verbosity = 0
        return tune.main(args)
    return run


@pytest.mark.parametrize("stop_at", [None, 512])
def test_tune_main_follow_runs_its_rounds_and_names_a_cut_round(monkeypatch, tmp_path, capsys, stop_at):
    """`epmoe tune --follow` end to end on the CPU: T = 1024's new entry takes over the batch sizes near it, which
    the next round tunes (announced); stopped in that round, the report names what of it was not tuned, not only
    the --tokens given."""
    from epmoe.bench import tune
    run_main = _tune_main_on_the_cpu(monkeypatch)
    path = str(tmp_path / "table.json")
    calls = []

    def fake_tune(problem, tokens, on_best=None, plan=None, **kw):
        calls.append((list(tokens), plan))
        best = {}
        for T in tokens:
            if T == stop_at:
                raise KeyboardInterrupt
            best[T] = (MoEKernelConfig(32, GemmConfig(64, 64, 1 + T % 5, 4, 3), GemmConfig(64, 64, 1, 4, 3)),
                       0.01 * T)
            on_best(T, best[T])
        return best

    monkeypatch.setattr(tune, "tune_problem", fake_tune)
    key = shape_key(4, 64, 32, 2, "bfloat16")
    status = run_main(["--tokens", "1024", "--output", path, "--follow"])
    out = capsys.readouterr().out
    with open(path) as f:
        written = sorted(int(T) for T in json.load(f)["entries"][key])
    assert calls[0] == ([1024], None) and len(calls) >= 2 and 512 in calls[1][0] and calls[1][1] is None
    assert "--follow: T = " in out
    if stop_at is None:
        assert status == 0 and "no batch size not timed here" in out and {128, 512, 1024, 8192} <= set(written)
    else:
        rest = [T for T in calls[1][0] if T not in written]
        assert status == 130 and rest[0] == 512 and f"not tuned: {key} at --tokens {','.join(map(str, rest))}" in out


@pytest.mark.parametrize("stop_at", [None, 512])
def test_tune_main_writes_as_it_goes_and_reports_a_stop(monkeypatch, tmp_path, capsys, stop_at):
    """`epmoe tune` end to end on the CPU, its GPU stood in for (the device's name, the weights, `tune_problem`):
    each T's entry is in --output as soon as `tune_problem` decides it; stopped at the second T (as SIGTERM from
    a time limit would), it exits 130 naming the T written and the --tokens not tuned, the table whole."""
    from epmoe.bench import tune
    run_main = _tune_main_on_the_cpu(monkeypatch)
    g = GemmConfig(64, 64, 1, 4, 3)
    path = str(tmp_path / "table.json")

    def fake_tune(problem, tokens, on_best=None, **kw):
        best = {}
        for T in tokens:
            if T == stop_at:
                with open(path) as f:           # what was decided before is in the table already
                    assert list(json.load(f)["entries"][key]) == [str(t) for t in best]
                raise KeyboardInterrupt
            best[T] = (MoEKernelConfig(16 if T < 64 else 32, g, g), 0.01 * T)
            on_best(T, best[T])
        return best

    monkeypatch.setattr(tune, "tune_problem", fake_tune)
    key = shape_key(4, 64, 32, 2, "bfloat16")
    status = run_main(["--tokens", "16,512,1024", "--output", path])
    out = capsys.readouterr().out
    with open(path) as f:
        entries = json.load(f)["entries"][key]
    if stop_at is None:
        assert status == 0 and list(entries) == ["16", "512", "1024"]
        assert entries["512"]["measured_ms"] == 5.12 and "wrote 3 configurations" in out
    else:
        assert status == 130 and list(entries) == ["16"]
        assert "stopped" in out and f"{key}: T = 16 written" in out and "--tokens 512,1024" in out
    assert sorted(os.listdir(tmp_path)) == ["table.json"]


def test_table_write_stopped_part_way_leaves_the_table_as_it_was(monkeypatch, tmp_path):
    """`merge_into_table` writes the table beside it and moves it over: a write that fails part way (a full disk,
    a kill) leaves the old table whole and no temporary file."""
    from epmoe.bench import tune
    g = GemmConfig(64, 64, 1, 4, 3)
    path, key = str(tmp_path / "table.json"), shape_key(4, 64, 32, 2, "float16")
    tune.merge_into_table(path, key, {1: (MoEKernelConfig(16, g, g), 0.1)}, {"device": "test"})
    with open(path) as f:
        old = f.read()

    def half_then_fail(data, f, **kw):
        f.write(json.dumps(data)[:20])
        raise OSError("No space left on device")

    monkeypatch.setattr(tune.json, "dump", half_then_fail)
    with pytest.raises(OSError, match="No space"):
        tune.merge_into_table(path, key, {128: (MoEKernelConfig(32, g, g), 0.2)}, {"device": "test"})
    with open(path) as f:
        assert f.read() == old
    assert sorted(os.listdir(tmp_path)) == ["table.json"]


def test_tune_names_only_batch_sizes_whose_running_path_changed():
    """What the H100's BF16 race did: a T = 1 entry kept its decode kernels and had its tiles rewritten. T = 2
    and 4, served by that entry, still run the same decode kernels, so the tuner does not send the user to time
    them; where the decode kernels do not take the format the tiles run, and the change is named."""
    import torch

    from epmoe.bench import tune
    from epmoe.config import MoEConfig
    from epmoe.experts.base import ExpertWeights
    from epmoe.kernels.tuning_table import GemvConfig
    from epmoe.quant.fp8 import Fp8Config
    gemv = GemvConfig(8, 512, 8, 256, gate_up_stages=3, down_stages=3)
    old = MoEKernelConfig(16, GemmConfig(128, 128, 1, 4, 3, tma=True), GemmConfig(64, 256, 1, 4, 3), gemv=gemv)
    new = replace(old, gate_up=GemmConfig(64, 128, 1, 4, 4, swap_ab=True))
    src = "t.json[key][T=1]"
    before = {1: (old, src), 2: (old, src), 4: (old, src)}
    assert tune.taken_over(before, {T: (new, src) for T in before}, {1: (new, 0.2)}) == []
    assert [T for T, _, _ in tune.taken_over(before, {T: (new, src) for T in before}, {1: (new, 0.2)},
                                             decode_path=False)] == [2, 4]
    other_gemv = replace(old, gemv=replace(gemv, down_n=4))
    assert [T for T, _, _ in tune.taken_over(before, {T: (other_gemv, src) for T in before}, {1: (new, 0.2)})] \
        == [2, 4]
    assert tune.taken_over(before, {T: (other_gemv, src) for T in before}, {1: (new, 0.2)}, decode_path=False) == []
    # a Gluon entry runs its pipeline (its tiles where that cannot run), not its decode kernels
    gluon = {T: (replace(c, gluon=True), s) for T, (c, s) in before.items()}
    assert [T for T, _, _ in tune.taken_over(gluon, {T: (replace(new, gluon=True), src) for T in before},
                                             {1: (new, 0.2)})] == [2, 4]

    def problem(quant, H=256, I=128):
        cfg = MoEConfig(num_experts=4, top_k=2, hidden_size=H, intermediate_size=I, dtype=torch.bfloat16,
                        quant=quant)
        weights = ExpertWeights(torch.zeros(4, 2 * I, H), torch.zeros(4, H, I))
        return tune.Problem(cfg, "x", weights, quant is not None)
    assert tune.decode_path_takes(problem(None)) and tune.decode_path_takes(problem(Fp8Config()))
    assert not tune.decode_path_takes(problem(Fp8Config(), H=200))
    assert not tune.decode_path_takes(problem(Fp8Config(weight_block=None, per_channel_weights=True,
                                                        activation="per_token")))


def test_tune_names_the_untimed_batch_sizes_its_new_entries_take_over(tmp_path):
    """What happened on the H100 when the deepseek-v3 32-expert shard, tuned at T = 4096 and 8192, got an entry
    at T = 128 alone: T = 16 .. 512, served before by the heuristic (or T = 4096's entry), now took T = 128's
    tiles, timed at none of them (T = 16 ran 5% slower). The tuner names them, and not the T it timed, nor
    batch sizes whose configuration stayed the same."""
    from io import StringIO

    from rich.console import Console

    from epmoe.bench import tune
    prefill = MoEKernelConfig(128, GemmConfig(128, 128, 8, 8, 3), GemmConfig(256, 128, 8, 8, 3))
    mid = MoEKernelConfig(64, GemmConfig(128, 128, 8, 8, 4), GemmConfig(64, 128, 8, 4, 4))
    path = str(tmp_path / "t.json")
    key = shape_key(32, 7168, 2048, 8, "fp8_block")
    tune.merge_into_table(path, key, {4096: (prefill, 2.9), 8192: (prefill, 5.6)}, {"device": "test"})
    _load_table.cache_clear()
    sizes = tune.NEIGHBOUR_SIZES
    assert tune.lookup_paths(path, False) == [path] and tune.lookup_paths(str(tmp_path / "none.json"), False) == []
    before = tune.configs_served(sizes, 32, 7168, 2048, 8, "fp8_block", paths=tune.lookup_paths(path, False))
    best = {128: (mid, 0.51)}
    tune.merge_into_table(path, key, best, {"device": "test"})
    _load_table.cache_clear()
    after = tune.configs_served(sizes, 32, 7168, 2048, 8, "fp8_block", paths=tune.lookup_paths(path, False))
    changed = tune.taken_over(before, after, best)
    # T = 16 .. 512 lie within TABLE_REACH of 128 and nearer it than 4096 (1024 stays with 4096, 8 with the
    # heuristic: 16x from 128); T = 128 itself was tuned
    assert [T for T, _, _ in changed] == [16, 32, 64, 256, 512]
    assert all(now.startswith(f"t.json[{key}][T=128]: BM") for _, _, now in changed)
    assert changed[0][1].startswith("heuristic") and changed[-1][1].startswith(f"t.json[{key}][T=4096]: BM")
    out = StringIO()
    tune.report_taken_over(Console(file=out, width=200), key, changed)
    text = out.getvalue()
    assert "--tokens 16,32,64,256,512" in text and "T=16: t.json" in text and "(was heuristic" in text
    out = StringIO()
    tune.report_taken_over(Console(file=out, width=200), key, [])
    assert "no batch size not timed here (1..16384" in out.getvalue() and "--tokens" not in out.getvalue()
    # an entry with the tiles its neighbours already had: only the batch sizes whose tiles differ now are named
    # (T = 16 and 32 go from T = 128's entry to T = 64's, the same configuration; T = 8 from the heuristic)
    best = {64: (mid, 0.4)}
    tune.merge_into_table(path, key, best, {"device": "test"})
    _load_table.cache_clear()
    again = tune.configs_served(sizes, 32, 7168, 2048, 8, "fp8_block", paths=tune.lookup_paths(path, False))
    assert again[16][1] == f"t.json[{key}][T=64]" and after[16][1] == f"t.json[{key}][T=128]"
    assert [T for T, _, _ in tune.taken_over(after, again, best)] == [8]


def test_tune_follow_tunes_the_batch_sizes_each_round_took_over_until_none_is_left(tmp_path):
    """The H100's fp8_channel tunes took four calls at mixtral and two at the deepseek shard: each call's new
    entries took over batch sizes near them untimed (T = 1024's took over T = 128 .. 2048, theirs T = 16 .. 512,
    and so on), which the next call tuned. `--follow` runs those rounds in one call: each round tunes whole (no
    quick plan) the batch sizes the entries written so far changed, raced against what is served there after
    them; a batch size asked for that the quick plan left out counts as not tried; it ends where none is left
    that was not tried."""
    from epmoe.bench import tune
    key = shape_key(32, 7168, 2048, 8, "fp8_block")
    prefill = MoEKernelConfig(128, GemmConfig(128, 128, 8, 8, 3), GemmConfig(256, 128, 8, 8, 3))

    def table(name):            # a table with prefill entries only, as the H100's had for fp8_channel
        path = str(tmp_path / name)
        tune.merge_into_table(path, key, {4096: (prefill, 2.9), 8192: (prefill, 5.6)}, {"device": "test"})
        return path

    def served_now(path):
        _load_table.cache_clear()
        return tune.configs_served(tune.NEIGHBOUR_SIZES, 32, 7168, 2048, 8, "fp8_block",
                                   paths=tune.lookup_paths(path, False))

    def config_for(T):          # a distinct configuration per batch size, so every new entry changes its neighbours
        return MoEKernelConfig(16 if T <= 16 else 64, GemmConfig(128, 128, 1 + T % 7, 4, 3),
                               GemmConfig(64, 128, 1, 4, 3 + T % 3))

    def follow(path, tokens, plan, follow):
        rounds = []

        def tune_round(todo, plan, before):     # a quick plan times only its own T, as --gluon does
            rounds.append((list(todo), plan, dict(before)))
            best = {T: (config_for(T), 0.1 * T) for T in todo if plan is None or T in plan}
            tune.merge_into_table(path, key, best, {"device": "test"})
            return best
        asked = []
        best, left = tune.tune_following(tune_round, tokens, plan, served_now(path), lambda: served_now(path), True,
                                         follow, on_round=asked.extend)
        return rounds, asked, best, left

    # without --follow: one round, and the note names what it took over
    path = table("a.json")
    plan = {128: "quick"}
    rounds, asked, best, left = follow(path, [128], plan, False)
    assert [r[0] for r in rounds] == [[128]] and rounds[0][1] is plan and asked == []
    assert [T for T, _, _ in left] == [16, 32, 64, 256, 512]
    # then those five with --follow: round 1 took over T = 2 .. 8 (T = 16's reach) and 1024 (nearer 512 than
    # 4096); round 2's entries took over T = 1 (T = 2's) and 2048 (as near 1024 as 4096: the lookup takes the
    # smaller); then nothing is left
    rounds, asked, best, left = follow(path, [16, 32, 64, 256, 512], None, True)
    assert [r[0] for r in rounds] == [[16, 32, 64, 256, 512], [2, 4, 8, 1024], [1, 2048]]
    assert all(r[1] is None for r in rounds) and asked == [2, 4, 8, 1024, 1, 2048]
    assert left == [] and sorted(best) == [1, 2, 4, 8, 16, 32, 64, 256, 512, 1024, 2048]
    # each round raced against what was served there after the rounds before: T = 1024 against T = 512's new
    # entry, not 4096's
    assert rounds[1][2][1024] == served_now(path)[512][0] != prefill
    # a quick plan that leaves out T = 32 of --tokens: T = 64's entry takes it over (and every size within its
    # reach: 512 is as near 64 as 4096), and round 2 tunes it whole
    path = table("b.json")
    rounds, asked, best, left = follow(path, [32, 64], {64: "quick"}, True)
    assert [r[0] for r in rounds] == [[32, 64], [8, 16, 32, 128, 256, 512], [1, 2, 4, 1024], [2048]]
    assert rounds[0][1] == {64: "quick"} and rounds[1][1] is None and 32 in best and left == []


class _JitKeys:
    """Records each launch of the GEMM kernels (`fused_moe._run`) with the key Triton's JIT caches the compiled
    kernel under, computed by Triton's own argument binder for an sm_90 target (`create_function_from_signature`,
    `compute_cache_key`: the code `JITFunction.run` runs), nothing compiled or launched. A warmup's dtypes are
    wrapped as `warmup` wraps them (`MockTensor`, which counts as 16-byte aligned)."""

    def __init__(self, monkeypatch):
        from triton.runtime import jit as triton_jit
        try:
            from triton.backends.compiler import GPUTarget
            from triton.compiler import make_backend
            self.backend = make_backend(GPUTarget("cuda", 90, 64))
            self.bind, self.key = triton_jit.create_function_from_signature, triton_jit.compute_cache_key
        except (ImportError, AttributeError, RuntimeError) as exc:   # a Triton whose JIT internals moved
            pytest.skip(f"this Triton's JIT binder cannot be called here: {type(exc).__name__}: {exc}")
        self.mock = triton_jit.MockTensor.wrap_dtype
        self.binders: dict = {}
        self.launches: list = []           # (warmup, cache key, (kernel, the specialization Triton bound))
        from epmoe.kernels import fused_moe, moe_align

        class NoLaunch:                    # the alignment's kernels: only the shapes of what they fill matter here
            def __getitem__(self, grid):
                return lambda *args, **kwargs: None
        for name in ("_align_single_program_kernel", "_count_kernel", "_scan_kernel", "_scatter_kernel"):
            monkeypatch.setattr(moe_align, name, NoLaunch())
        monkeypatch.setattr(fused_moe, "_run", self.record)

    def record(self, kernel, grid, args, meta, warmup):
        binder = self.binders.get(kernel)
        if binder is None:
            binder = self.binders[kernel] = self.bind(kernel.signature, kernel.params, self.backend)
        if warmup:
            args = [self.mock(a) for a in args]
        meta = dict(meta, debug=meta.get("debug", kernel.debug) or False)   # as `run` completes the options
        _, spec, options = binder(*args, **meta)
        self.launches.append((warmup, self.key({}, spec, options), (kernel, spec)))

    def missed(self, problem, T: int, bm: int, tail: int, gate_ups, downs, gen) -> tuple[int, list]:
        """Compile `gate_ups` and `downs` as the tuner's workers do, then launch each as its timing process does:
        the number of timing launches and, for each whose key no worker compiled, what differs."""
        from epmoe.bench import tune
        from epmoe.kernels import fused_moe
        self.launches.clear()
        for job in tune.compile_jobs(problem, bm, gate_ups, downs, tail):
            (fused_moe.launch_gate_up if job[0] == "gate_up" else fused_moe.launch_down)(warmup=True, **job[1])
        compiled = {key: spec for warm, key, spec in self.launches if warm}
        assert compiled
        self.launches.clear()
        inputs = tune.KernelInputs(problem, T, bm, gen, tail)
        for g in gate_ups:
            inputs.gate_up(g)
        for g in downs:
            inputs.down(g)
        assert self.launches and not any(warm for warm, _, _ in self.launches)
        self.tails = len(inputs.launches) - 1
        return len(self.launches), [self.differs(spec, compiled.values()) for _, key, spec in self.launches
                                    if key not in compiled]

    @staticmethod
    def differs(launched, compiled) -> str:
        """A launch no worker compiled, said as what differs from the nearest compiled specialization."""
        kernel, spec = launched
        near = min((s for k, s in compiled if k is kernel), key=lambda s: sum(a != b for a, b in zip(s, spec)),
                   default=None)
        if near is None:
            return f"{kernel.fn.__name__}: no worker compiled it at all"
        return f"{kernel.fn.__name__}: " + ", ".join(f"{p.name} compiled {a}, launched {b}" for p, a, b in
                                                 zip(kernel.params, near, spec) if a != b)


def _tune_problem(L: int, H: int, I: int, k: int, fmt: str):
    import torch

    from epmoe import MoEConfig
    from epmoe.bench import tune
    from epmoe.bench.experts import make_weights
    from epmoe.quant.fp8 import Fp8Config
    fp8 = fmt == "fp8_block"
    cfg = MoEConfig(num_experts=L, top_k=k, hidden_size=H, intermediate_size=I, dtype=torch.bfloat16,
                    quant=Fp8Config(weight_block=(128, 128), activation="per_token_group") if fp8 else None)
    weights, _ = make_weights(cfg, torch.device("cpu"), torch.Generator().manual_seed(0))
    return tune.Problem(cfg, fmt, weights, fp8)


@pytest.mark.parametrize("fmt", ["fp8_block", "bfloat16"])
def test_tune_compiles_in_its_workers_the_kernels_its_timings_launch(fmt, monkeypatch):
    """The tuner compiles every candidate in a pool of workers (`compile_jobs`, dtype stand-ins for tensors),
    then launches each on real operands in the timing process (`KernelInputs`): each launch must find the
    kernel its worker compiled, or the timing process compiles it again, one candidate after another. The
    split layout's tail launch reads slices of the tile list and tile counts (`tile_launches`) whose addresses
    are not multiples of 16: with those pointers specialized on alignment every tail launch missed (each
    candidate of a split layout compiled twice, the second time alone). Keyed by Triton's own binder
    (`_JitKeys`), nothing run."""
    pytest.importorskip("triton", reason="the GEMM kernels and their launches need Triton (the [triton] extra)")
    import torch

    from epmoe.bench import tune
    keys = _JitKeys(monkeypatch)
    problem = _tune_problem(8, 256, 256, 2, fmt)
    gen = torch.Generator().manual_seed(1)
    tails_seen = 0
    for bm, tail, T in ((64, 0, 300), (64, 16, 300), (32, 16, 77), (128, 32, 1000)):
        gus, dns = tune.candidates(bm, fmt == "fp8_block", block_scales=fmt == "fp8_block")
        gus, dns = gus[:6] + gus[-6:], dns[:6] + dns[-6:]
        n, missed = keys.missed(problem, T, bm, tail, gus, dns, gen)
        tails_seen += keys.tails
        assert not missed, f"BM{bm}+{tail} T={T}: {len(missed)} of {n} launches compile again: {missed[0]}"
    assert tails_seen == 3           # the three split layouts launched their tail tiles too


def test_tune_plan_of_the_qwen3_shard_compiles_nothing_while_timing(monkeypatch):
    """The whole plan `epmoe tune` times at the qwen3 16-expert shard in block FP8 (every layout and candidate
    of T = 1, 128 and 300), as the device tunes it: every timing launch finds a kernel a worker compiled."""
    pytest.importorskip("triton", reason="the GEMM kernels and their launches need Triton (the [triton] extra)")
    import torch

    from epmoe.bench import tune
    keys = _JitKeys(monkeypatch)
    problem = _tune_problem(16, 2048, 768, 8, "fp8_block")
    L, H, I, k = problem.sizes
    gen = torch.Generator().manual_seed(1)
    layouts = 0
    for T in (1, 128, 300):
        plan = tune.regime_plan([T], lambda T: T * k / L, True, True, False, tune.can_stack_gate_up("fp8_block", I))
        for (bm, tail), (gus, dns) in plan[T].items():
            n, missed = keys.missed(problem, T, bm, tail, gus, dns, gen)
            assert not missed, f"T={T} BM{bm}+{tail}: {len(missed)} of {n} launches compile again: {missed[0]}"
            layouts += 1
    assert layouts >= 8               # T = 1: BM16; T = 128 and 300: uniform and split layouts of several heights


def test_tile_list_alignment_is_not_specialized_and_would_change_no_instruction_sm90():
    """`moe_gemm_kernel` does not specialize the tile list and its counts on alignment (a split layout's tail
    launch reads them at addresses that are not multiples of 16). Marked aligned, as before, the kernel compiles
    to the same SASS: the hint bought nothing. One tail-tile configuration (a swap-AB down GEMM of 16 rows,
    listed tiles), compiled for sm_90 both ways; no GPU needed."""
    pytest.importorskip("triton", reason="the sm_90 cross-compile needs Triton (the [triton] extra)")
    import re

    from epmoe.kernels import fused_moe
    from epmoe.kernels.xcompile import CrossCompileUnavailable, _cuobjdump, compile_case
    fn = fused_moe.moe_gemm_kernel
    params = [p for p in fn.params if p.do_not_specialize_on_alignment]
    assert {p.name for p in params} == {"block_expert_ptr", "num_padded_ptr"}

    def sass() -> list[str]:
        try:
            compiled = compile_case("down", 2048, 768, 8, "fp8", 16, 128, 128, 4, 5, False, False, 1, swap_ab=True)
        except CrossCompileUnavailable as exc:
            pytest.skip(str(exc))
        text = _cuobjdump(compiled, "-sass")
        if not text:
            pytest.skip("this Triton ships no cuobjdump that reads its cubin: the SASS cannot be read")
        return [re.sub(r"/\*[0-9a-f]+\*/", "", line).strip() for line in text.splitlines()
                if re.search(r"/\*[0-9a-f]{4}\*/", line)]
    unaligned = sass()
    try:
        for p in params:
            p.do_not_specialize_on_alignment = False
        aligned = sass()
    finally:
        for p in params:
            p.do_not_specialize_on_alignment = True
    assert len(unaligned) > 100 and unaligned == aligned


def test_compile_log_says_what_the_timing_process_compiled_again_and_why(monkeypatch, tmp_path):
    """`epmoe tune` compiles its candidates in workers and times them here; a kernel Triton's disk cache does not
    give back compiles again here, one after another. `CompileLog` (Triton's compilation listener) records each
    compile and whether the cache had it, and `recompiled_report` says how many of the workers' kernels were
    compiled again and which argument's specialization differs. Shown with a small kernel compiled for sm_90
    three times into a fresh cache: as a worker does, the same again (found: nothing reported), then with one
    pointer no longer marked 16-byte aligned (compiled again, that pointer named). A kernel compiled again under a
    worker's very key is said as such, with both cache folders; and `--compile-log` writes each record as a line."""
    pytest.importorskip("triton", reason="the compile listener is Triton's")
    from epmoe.bench import tune
    from epmoe.kernels.gated_rows import gated_rows_kernel
    from epmoe.kernels.xcompile import CrossCompileUnavailable, compile_for_hopper
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    types = ["*bf16", "*fp32", "*i64", "*bf16", "*fp32", "i32", "i32"]
    const = dict(ACTIVATION=0, HAS_BIAS=True, QUANT=False, GROUP=1024, BLOCK=1024, GROUPS=4)

    def compile_with(unaligned=()) -> None:
        try:
            compile_for_hopper(gated_rows_kernel, types, const, ints16=(), num_warps=8, unaligned=unaligned)
        except CrossCompileUnavailable as exc:
            pytest.skip(str(exc))
    with tune.CompileLog() as workers:
        compile_with()
    assert [(name, hit) for name, hit, _ in workers.compiles] == [("gated_rows_kernel", False)]
    parts = [p for _, _, p in workers.compiles]
    assert parts[0]["attributes of expert_ptr"] == "[['tt.divisibility', 16]]"
    assert len(parts[0]["triton key"]) == 16 and parts[0]["backend key"].endswith("90")   # ptxas version, sm_90
    with tune.CompileLog() as timing:
        compile_with()
    assert [hit for _, hit, _ in timing.compiles] == [True]
    assert tune.recompiled_report(timing, parts) is None
    with tune.CompileLog() as timing:
        compile_with(unaligned={"expert_ptr"})
    report = tune.recompiled_report(timing, parts)
    assert report is not None and "compiled 1 gated_rows_kernel kernels again" in report
    assert "first differs from the nearest worker compile in attributes of expert_ptr: workers " \
           "[['tt.divisibility', 16]], here -" in report, report
    # the same key compiled again: the cache did not give back what the worker stored, and the log says so
    assert parts[0]["cache dir"] == str(tmp_path) and len(parts[0]["key hash"]) == 64
    again = [(name, dict(p, **{"cache dir": "/elsewhere"})) for name, p in workers.missed()]
    monkeypatch.setattr(timing, "missed", lambda: again)
    report = tune.recompiled_report(timing, parts)
    assert f"has the key of a worker compile ({parts[0]['key hash'][:16]})" in report, report
    assert f"cache dir workers {tmp_path}, here /elsewhere" in report, report
    # --compile-log: each record one JSON line, with its shape
    path = tmp_path / "compiles.jsonl"
    write = tune._compile_log_writer(str(path), "L8_H256")
    write({"workers": parts})
    write({"T": 1, "block_m": 16, "tail_m": 0, "timing": []})
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["shape"] for line in lines] == ["L8_H256"] * 2 and lines[0]["workers"] == parts
    assert tune._compile_log_writer(None, "L8_H256") is None


def test_the_nearest_tuned_t_is_by_ratio_the_smaller_of_two_as_near_and_serves_within_reach():
    """`nearest_tuned` (the entry the lookup takes): nearest by ratio, the smaller T where two are as near (T = 4
    between 2 and 8), T <= 0 counted as 1; `within_reach`: within TABLE_REACH either way, a batch of 0 as 1."""
    from epmoe.kernels.tuning_table import TABLE_REACH, nearest_tuned, within_reach
    assert nearest_tuned({2, 8}, 4) == 2 and nearest_tuned({8, 2}, 4) == 2
    assert nearest_tuned({16, 128}, 1) == 16 and nearest_tuned({16, 128}, 0) == 16
    assert nearest_tuned({1, 128}, 16) == 128 and nearest_tuned({1, 128}, 11) == 1
    assert within_reach(16, 2) and not within_reach(16, 1) and not within_reach(16, 0)
    assert within_reach(1, 0) and within_reach(1, TABLE_REACH) and not within_reach(1, TABLE_REACH + 1)
    assert within_reach(4, 8, factor=2) and not within_reach(4, 9, factor=2)
