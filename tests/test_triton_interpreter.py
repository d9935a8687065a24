"""The Triton kernels' logic on the CPU, through Triton's interpreter (TRITON_INTERPRET=1), float32.

The interpreter must be switched on before Triton compiles anything, and a GPU test run in the same
process must not be interpreted; so, unless this process already interprets, the whole file runs again
in a child process with TRITON_INTERPRET=1 and this process only checks that child's result. Float32,
and float16 for its range: bf16 `tl.dot` gives wrong results in the interpreter.
"""
from dataclasses import replace

import pytest
import torch

from epmoe.testing.interpreter import INTERPRETING, interpreted_file

pytestmark, test_under_the_interpreter = interpreted_file(__file__)

if INTERPRETING:
    from epmoe.config import MoEConfig
    from epmoe.kernels.batched_moe import batched_experts
    from epmoe.kernels.fused_moe import fused_experts
    from epmoe.kernels.moe_align import align_pairs
    from epmoe.kernels.tuning_table import GemmConfig, GemvConfig, MoEKernelConfig
    from epmoe.reference import reference_moe
    from epmoe.routing import Routing
    from epmoe.testing import assert_close, random_experts

    # small tiles so that tiny shapes still have several tiles, uneven K (H = 200) and N edges
    SMALL = MoEKernelConfig(16, GemmConfig(32, 32, 2, 4, 2), GemmConfig(64, 64, 1, 4, 2))
    # the same with weight tiles through tensor descriptors (TMA on the GPU), and the down GEMM's activation
    # rows too
    SMALL_TMA = MoEKernelConfig(16, GemmConfig(32, 32, 2, 4, 2, tma=True),
                                GemmConfig(64, 64, 1, 4, 2, tma=True, tma_a=True))

    def random_routing(T, E, k, seed, hot_expert=None):
        g = torch.Generator().manual_seed(seed)
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else \
            torch.empty(0, k, dtype=torch.int64)
        if hot_expert is not None and T:
            # every token visits `hot_expert` (in a random slot), the rest stay distinct
            for t in range(T):
                if hot_expert not in ids[t]:
                    ids[t, torch.randint(k, (1,), generator=g).item()] = hot_expert
        w = torch.rand(T, k, generator=g) + 0.1
        return ids.to(torch.int32), w / w.sum(1, keepdim=True)

    def fused_layout(experts):
        w13 = torch.stack([torch.cat([g, u]) for g, u, *_ in experts])
        w2 = torch.stack([d for _, _, d, *_ in experts])
        b13 = b2 = None
        if len(experts[0]) > 3:
            b13 = torch.stack([torch.cat([t[3], t[4]]) for t in experts])
            b2 = torch.stack([t[5] for t in experts])
        return w13.contiguous(), w2.contiguous(), b13, b2

    def fused_case(T, E, k, act, bias, routing, remote, seed):
        """Random float32 experts (H = 200, I = 96) in the fused layout, T tokens routed at random (or
        every token on expert 0: "hot"), and with `remote` the last two experts on another rank: their
        slots are -1 for the kernels and weigh 0 for the oracle."""
        cfg = MoEConfig(num_experts=E, top_k=k, hidden_size=200, intermediate_size=96, activation=act,
                        dtype=torch.float32)
        experts = random_experts(cfg, seed=T + seed, with_bias=bias)
        x = torch.randn(T, cfg.hidden_size, generator=torch.Generator().manual_seed(T + seed + 1))
        ids, w = random_routing(T, E, k, seed=T + seed + 2, hot_expert=0 if routing == "hot" else None)
        local, w_ref = ids.clone(), w.clone()
        if remote:
            local[ids >= E - 2] = -1
            w_ref[ids >= E - 2] = 0.0
        ref = reference_moe(x, None, experts, cfg, routing=Routing(ids, w_ref)) if T else None
        return cfg, x, local, w, fused_layout(experts), ref

    @pytest.mark.parametrize("single", [True, False])
    @pytest.mark.parametrize("T,E,k,bm", [(0, 4, 2, 16), (1, 8, 2, 16), (37, 8, 2, 16), (300, 16, 4, 32)])
    def test_align_pairs(single, T, E, k, bm):
        ids, _ = random_routing(T, E, k, seed=T + E)
        local = ids.clone()
        local[local >= E - 2] = -1           # two experts live on another rank
        a = align_pairs(local, E, bm, single_program_max_pairs=10 ** 9 if single else 0)
        flat = local.reshape(-1)
        counts = torch.bincount(flat[flat >= 0].long(), minlength=E)
        padded = (counts + bm - 1) // bm * bm
        total = int(padded.sum())
        assert int(a.num_padded) == total
        starts = torch.cumsum(padded, 0) - padded
        sid = a.sorted_ids[:total]
        for e in range(E):
            seg = sid[starts[e]: starts[e] + padded[e]]
            real = seg[seg < T * k]
            assert sorted(real.tolist()) == sorted((flat == e).nonzero().flatten().tolist()), f"expert {e}"
            assert int((seg == T * k).sum()) == int(padded[e] - counts[e])
            # the pairs first, then the padding: a tile's padding rows are its last (each expert's last tile)
            assert (seg[:counts[e]] < T * k).all() and (seg[counts[e]:] == T * k).all(), f"expert {e}"
            blocks = a.block_expert[starts[e] // bm: (starts[e] + padded[e]) // bm]
            assert (blocks == e).all()
        assert (a.block_expert[total // bm: a.max_blocks] == -1).all()
        assert a.max_blocks >= total // bm

    @pytest.mark.parametrize("single", [True, False])
    @pytest.mark.parametrize("T,E,k,bm,tail", [(0, 4, 2, 32, 16), (1, 8, 2, 32, 16), (37, 8, 2, 32, 8),
                                               (300, 16, 4, 64, 16), (300, 16, 4, 32, 16)])
    def test_align_pairs_split(single, T, E, k, bm, tail):
        """Split layout: an expert whose remainder after its full tiles fits one tail tile gets one (its
        segment padded to the tail), others are padded to bm; body tiles of bm rows then tail tiles of
        `tail` rows, listed as (expert, start); every padded position covered exactly once."""
        from epmoe.kernels.moe_align import split_bounds
        ids, _ = random_routing(T, E, k, seed=T + E + 3)
        local = ids.clone()
        local[local == 1] = -1
        a = align_pairs(local, E, bm, single_program_max_pairs=10 ** 9 if single else 0, tail_m=tail)
        flat = local.reshape(-1)
        counts = torch.bincount(flat[flat >= 0].long(), minlength=E)
        rem = counts % bm
        use_tail = (rem > 0) & (rem <= tail)
        padded = torch.where(use_tail, counts - rem + tail, (counts + bm - 1) // bm * bm)
        starts = torch.cumsum(padded, 0) - padded
        total = int(padded.sum())
        assert int(a.num_padded) == total and total <= a.max_rows
        max_body, max_tail, _ = split_bounds(T * k, E, bm, tail)
        n_body, n_tail = int(a.tile_counts[0]), int(a.tile_counts[1])
        assert n_body == int((padded // bm).sum()) <= max_body
        assert n_tail == int(use_tail.sum()) <= max_tail
        covered = torch.zeros(max(total, 1), dtype=torch.int32)
        tiles = [(a.tiles[i].tolist(), bm) for i in range(n_body)] + \
                [(a.tiles[max_body + i].tolist(), tail) for i in range(n_tail)]
        for (e, start), h in tiles:
            assert starts[e] <= start and start + h <= starts[e] + padded[e], f"tile {(e, start, h)} leaves expert {e}"
            covered[start:start + h] += 1
        assert (covered[:total] == 1).all()
        sid = a.sorted_ids[:total]
        for e in range(E):
            seg = sid[starts[e]: starts[e] + padded[e]]
            real = seg[seg < T * k]
            assert sorted(real.tolist()) == sorted((flat == e).nonzero().flatten().tolist()), f"expert {e}"
            assert int((seg == T * k).sum()) == int(padded[e] - counts[e])

    CASES = [  # T, E, k, activation, bias, routing, remote experts
        (0, 8, 2, "silu", False, "random", False),
        (1, 8, 2, "silu", False, "random", False),
        (5, 8, 2, "gelu", False, "random", True),
        (33, 8, 2, "swigluoai", True, "random", False),
        (24, 8, 2, "silu", False, "hot", False),
        (40, 6, 3, "gelu", True, "hot", True),
    ]

    @pytest.mark.parametrize("tma", [False, True])
    @pytest.mark.parametrize("T,E,k,act,bias,routing,remote", CASES)
    def test_fused_experts_matches_oracle(T, E, k, act, bias, routing, remote, tma):
        cfg = MoEConfig(num_experts=E, top_k=k, hidden_size=200, intermediate_size=96, activation=act,
                        dtype=torch.float32)
        experts = random_experts(cfg, seed=T + 7, with_bias=bias)
        x = torch.randn(T, cfg.hidden_size, generator=torch.Generator().manual_seed(T))
        ids, w = random_routing(T, E, k, seed=T + 1, hot_expert=0 if routing == "hot" else None)
        local = ids.clone()
        w_ref = w.clone()
        if remote:               # the last two experts live on another rank: their slots contribute nothing
            local[ids >= E - 2] = -1
            w_ref[ids >= E - 2] = 0.0
        w13, w2, b13, b2 = fused_layout(experts)
        out = fused_experts(x, local, w, w13, w2, act, b13=b13, b2=b2, config=SMALL_TMA if tma else SMALL)
        assert out.shape == (T, cfg.hidden_size) and out.dtype == torch.float32
        if T == 0:
            return
        ref = reference_moe(x, None, experts, cfg, routing=Routing(ids, w_ref))
        assert_close(out, ref, 1e-5, context=f"T={T} {act} bias={bias} {routing} remote={remote}")

    @pytest.mark.parametrize("T,tail,routing,remote", [(37, 16, "random", False), (40, 8, "hot", True),
                                                       (1, 16, "random", True), (2, 16, "hot", False)])
    def test_fused_experts_split_tiles(T, tail, routing, remote):
        """Body tiles of 32 rows + tail tiles (two launches of each GEMM) against the oracle; T = 1 takes
        the direct path (one pair per tile), with the remote experts' slots skipped."""
        _, x, local, w, (w13, w2, b13, b2), ref = fused_case(T, 6, 3, "silu", True, routing, remote, seed=17)
        config = MoEKernelConfig(32, GemmConfig(32, 32, 2, 4, 2), GemmConfig(64, 64, 1, 4, 2), tail_m=tail)
        out = fused_experts(x, local, w, w13, w2, "silu", b13=b13, b2=b2, config=config)
        assert_close(out, ref, 1e-5, context=f"T={T} tail={tail} {routing} remote={remote}")

    @pytest.mark.parametrize("T,tail,routing,remote,tma", [(37, 0, "random", False, False), (40, 0, "hot", True, True),
                                                           (37, 16, "random", True, False), (40, 8, "hot", False, True),
                                                           (1, 0, "random", True, False), (2, 16, "hot", False, False)])
    def test_fused_experts_persistent(T, tail, routing, remote, tma):
        """Persistent GEMMs (a fixed grid of programs, each walking several tiles: 4 programs without a
        GPU) on uniform tiles and on the split layout (body + tail launches) against the oracle; T = 1
        takes the direct path, where the config's persistent flag is ignored."""
        from epmoe.kernels.fused_moe import PERSISTENT_PROGRAMS_NO_GPU
        k = 3
        _, x, local, w, (w13, w2, b13, b2), ref = fused_case(T, 6, k, "swigluoai", True, routing, remote, seed=27)
        config = MoEKernelConfig(16 if not tail else 32, GemmConfig(32, 32, 2, 4, 2, tma=tma, persistent=True),
                                 GemmConfig(64, 64, 1, 4, 2, tma=tma, persistent=True, tma_a=tma), tail_m=tail)
        assert T < 3 or T * k // 16 * 3 > PERSISTENT_PROGRAMS_NO_GPU      # several tiles per program
        out = fused_experts(x, local, w, w13, w2, "swigluoai", b13=b13, b2=b2, config=config)
        assert_close(out, ref, 1e-5, context=f"T={T} tail={tail} {routing} remote={remote} tma={tma}")

    @pytest.mark.parametrize("T,E,k,act,bias,routing,remote", [
        (1, 8, 2, "silu", False, "random", False), (1, 6, 3, "swigluoai", True, "random", True),
        (3, 8, 2, "gelu", True, "hot", False), (5, 6, 3, "silu", False, "hot", True), (0, 4, 2, "silu", False, "random", False)])
    def test_decode_gemv_matches_oracle(T, E, k, act, bias, routing, remote):
        """The decode path (config.gemv): matrix-vector kernels with N and K edges (I = 96 in tiles of 64,
        H = 200 in K blocks of 64 and N tiles of 32), slots of remote experts skipped, every token on one
        expert, the slot sum inside the down kernel."""
        cfg, x, local, w, (w13, w2, b13, b2), ref = fused_case(T, E, k, act, bias, routing, remote, seed=37)
        config = MoEKernelConfig(16, GemmConfig(32, 32, 2, 4, 2), GemmConfig(64, 64, 1, 4, 2),
                                 gemv=GemvConfig(64, 64, 32, 64, gate_up_stages=2, down_stages=1))
        out = fused_experts(x, local, w, w13, w2, act, b13=b13, b2=b2, config=config)
        assert out.shape == (T, cfg.hidden_size)
        if T == 0:
            return
        assert_close(out, ref, 1e-5, context=f"gemv T={T} {act} bias={bias} {routing} remote={remote}")
        tiles = fused_experts(x, local, w, w13, w2, act, b13=b13, b2=b2, config=SMALL)
        assert_close(out, tiles, 1e-5, context="gemv against the tile path")

    @pytest.mark.parametrize("gemv", [False, True])
    def test_ids_past_the_local_experts_contribute_nothing(gemv):
        """An id outside [0, L) (not -1) is not here, for the tile path's slot sum as for the decode path:
        those slots add nothing, as the oracle with their weight at 0 says."""
        E, k, T = 6, 3, 5
        _, x, local, w, (w13, w2, b13, b2), _ = fused_case(T, E, k, "silu", True, "hot", False, seed=51)
        cfg = MoEConfig(num_experts=E, top_k=k, hidden_size=200, intermediate_size=96, dtype=torch.float32)
        experts = random_experts(cfg, seed=T + 51, with_bias=True)
        outside = local.clone()
        outside[local == E - 1] = E + 3
        w_ref = torch.where(local == E - 1, torch.zeros_like(w), w)
        config = MoEKernelConfig(16, GemmConfig(32, 32, 2, 4, 2), GemmConfig(64, 64, 1, 4, 2),
                                 gemv=GemvConfig(64, 64, 32, 64) if gemv else None)
        out = fused_experts(x, outside, w, w13, w2, "silu", b13=b13, b2=b2, config=config)
        ref = reference_moe(x, None, experts, cfg, routing=Routing(local, w_ref))
        assert (local == E - 1).any()
        assert_close(out, ref, 1e-5, context=f"ids >= L, gemv={gemv}")

    @pytest.mark.parametrize("gemv", [False, True])
    def test_experts_write_into_the_batch_out(gemv):
        """A flat batch naming `out` (a dispatcher's buffer, here rows inside a larger one) gets the output
        written there, the same bits as a fresh output; an `out` of the wrong shape is refused."""
        from epmoe.experts.triton import TritonExperts
        from epmoe.layouts import ExpertWeights, FlatBatch
        cfg, x, local, w, (w13, w2, b13, b2), ref = fused_case(5, 6, 3, "silu", False, "random", True, seed=61)
        config = MoEKernelConfig(16, GemmConfig(32, 32, 2, 4, 2), GemmConfig(64, 64, 1, 4, 2),
                                 gemv=GemvConfig(64, 64, 32, 64) if gemv else None)
        want = fused_experts(x, local, w, w13, w2, "silu", config=config)
        region = torch.full((9, cfg.hidden_size), 7.0)
        got = fused_experts(x, local, w, w13, w2, "silu", config=config, out=region[2:7])
        assert got.data_ptr() == region[2:7].data_ptr() and torch.equal(got, want)
        assert (region[:2] == 7).all() and (region[7:] == 7).all()      # nothing written around it
        with pytest.raises(ValueError, match="out must be"):
            fused_experts(x, local, w, w13, w2, "silu", config=config, out=region[:4])
        experts = TritonExperts(cfg, torch.device("cpu"))
        experts._configs = {}
        experts.kernel_config = lambda n, wts: config
        batch = FlatBatch(x, local, w, out=region[3:8])
        got = experts(batch, ExpertWeights(w13, w2))
        assert got.data_ptr() == region[3:8].data_ptr() and torch.equal(got, want)

    def test_fused_experts_heuristic_config_and_large_alignment_path():
        cfg = MoEConfig(num_experts=4, top_k=2, hidden_size=64, intermediate_size=32, dtype=torch.float32)
        experts = random_experts(cfg, seed=3)
        T = 2100                 # 4200 pairs: the multi-program alignment
        x = torch.randn(T, 64, generator=torch.Generator().manual_seed(5))
        ids, w = random_routing(T, 4, 2, seed=9)
        w13, w2, _, _ = fused_layout(experts)
        out = fused_experts(x, ids, w, w13, w2, "silu")
        ref = reference_moe(x, None, experts, cfg, routing=Routing(ids, w))
        assert_close(out, ref, 1e-5)

    @pytest.mark.parametrize("counts,act,bias,tma,num_tokens", [([0, 3, 17, 1], "silu", False, False, None),
                                                                ([0, 0, 0, 0], "gelu", True, False, None),
                                                                ([20, 20, 2, 0], "swigluoai", True, True, None),
                                                                ([20, 20, 2, 0], "silu", False, False, 1),
                                                                ([0, 33, 1, 2], "silu", True, True, 3)])
    def test_batched_experts_skips_empty_rows(counts, act, bias, tma, num_tokens):
        """Only the rows below each count are computed and written: NaN padding reaches no output, the rows
        past each count keep what the output buffer held. With `num_tokens` far below what an expert got (1
        or 3 tokens: one slot an expert, the blocks of a full expert run in turn) the rows are the same."""
        E, C = 4, 40
        cfg = MoEConfig(num_experts=E, top_k=1, hidden_size=200, intermediate_size=96, activation=act,
                        dtype=torch.float32)
        experts = random_experts(cfg, seed=11, with_bias=bias)
        x = torch.randn(E, C, 200, generator=torch.Generator().manual_seed(2))
        x[torch.arange(C)[None, :] >= torch.tensor(counts)[:, None]] = float("nan")  # rows past the count
        w13, w2, b13, b2 = fused_layout(experts)
        held = torch.full_like(x, 7.0)
        out = batched_experts(x, torch.tensor(counts), w13, w2, act, b13=b13, b2=b2,
                              config=SMALL_TMA if tma else SMALL, num_tokens=num_tokens, out=held)
        assert out is held and out.shape == x.shape
        for e, n in enumerate(counts):
            assert (out[e, n:] == 7.0).all(), f"expert {e}: rows past the count must not be written"
            if n:
                ids = torch.zeros(n, 1, dtype=torch.int32)
                single = MoEConfig(num_experts=1, top_k=1, hidden_size=200, intermediate_size=96,
                                   activation=act, dtype=torch.float32)
                ref = reference_moe(x[e, :n], None, [experts[e]], single,
                                    routing=Routing(ids, torch.ones(n, 1)))
                assert_close(out[e, :n], ref, 1e-5, context=f"expert {e}")

    def test_batched_experts_run_a_table_entry_whose_down_splits_k_unsplit(monkeypatch):
        """The tables are tuned on the flat layout, whose down GEMM may split K; the batched layout looks the same
        entries up and runs their down over the whole K range (it has no slot sum to add the ranges). Tiles given
        by hand with a split down are refused, naming it."""
        import epmoe.kernels.batched_moe as batched_moe
        E, C, H = 4, 12, 200
        cfg = MoEConfig(num_experts=E, top_k=2, hidden_size=H, intermediate_size=96, dtype=torch.float32)
        experts = random_experts(cfg, seed=17)
        w13, w2, _, _ = fused_layout(experts)
        x = torch.randn(E, C, H, generator=torch.Generator().manual_seed(18))
        counts = torch.tensor([12, 0, 5, 1], dtype=torch.int32)
        split = replace(SMALL, down=replace(SMALL.down, split_k=3))
        looked_up = []
        monkeypatch.setattr(batched_moe, "lookup_config",
                            lambda *a, **k: looked_up.append(a) or (split, "a table entry tuned on the flat layout"))
        ran = []
        launch_down = batched_moe.launch_down
        monkeypatch.setattr(batched_moe, "launch_down", lambda *a, gemm, **k: ran.append(gemm) or launch_down(
            *a, gemm=gemm, **k))
        out = batched_experts(x, counts, w13, w2, "silu", top_k=2)
        assert len(looked_up) == 1 and [g.split_k for g in ran] == [1] and ran[0] == replace(split.down, split_k=1)
        for e in range(E):
            c = int(counts[e])
            if c:
                ref = reference_moe(x[e, :c], None, [experts[e]], replace(cfg, num_experts=1, top_k=1),
                                    routing=Routing(torch.zeros(c, 1, dtype=torch.int32), torch.ones(c, 1)))
                assert_close(out[e, :c], ref, 1e-5, context=f"expert {e}")
        with pytest.raises(ValueError, match="split_k=3: only the down GEMM of the flat layout"):
            batched_experts(x, counts, w13, w2, "silu", config=split)

    FP16_GEMV = MoEKernelConfig(16, GemmConfig(32, 32, 2, 4, 2), GemmConfig(64, 64, 1, 4, 2),
                                gemv=GemvConfig(32, 64, 32, 64))

    @pytest.mark.parametrize("config", [SMALL, SMALL_TMA, FP16_GEMV], ids=["tiles", "tiles_tma", "gemv"])
    def test_fused_experts_fp16_intermediate_past_65504(config):
        """float16: act(gate) * up passes 65504 while the output fits (kept in float32 between the GEMMs)."""
        from epmoe.testing import fp16_range_case
        cfg = MoEConfig(num_experts=4, top_k=2, hidden_size=64, intermediate_size=48, dtype=torch.float16)
        x, _, experts, peak = fp16_range_case(cfg, 9, seed=5)
        assert peak > 65504
        ids, w = random_routing(9, 4, 2, seed=3)
        w13, w2, _, _ = fused_layout(experts)
        out = fused_experts(x, ids, w, w13.half(), w2.half(), "silu", config=config)
        ref = reference_moe(x, None, experts, cfg, routing=Routing(ids, w))
        assert out.dtype == torch.float16
        assert_close(out, ref, 5e-3)

    def test_batched_experts_fp16_intermediate_past_65504():
        from epmoe.testing import fp16_range_case
        cfg = MoEConfig(num_experts=2, top_k=1, hidden_size=64, intermediate_size=48, dtype=torch.float16)
        x, _, experts, _ = fp16_range_case(cfg, 2 * 16, seed=6)
        counts = [16, 7]
        w13, w2, _, _ = fused_layout(experts)
        rows = x.reshape(2, 16, 64)
        out = batched_experts(rows, torch.tensor(counts), w13.half(), w2.half(), "silu", config=SMALL)
        for e, n in enumerate(counts):
            single = MoEConfig(num_experts=1, top_k=1, hidden_size=64, intermediate_size=48, dtype=torch.float16)
            ref = reference_moe(rows[e, :n], None, [experts[e]], single,
                                routing=Routing(torch.zeros(n, 1, dtype=torch.int32), torch.ones(n, 1)))
            assert_close(out[e, :n], ref, 5e-3, context=f"expert {e}")

    def _fp8_oracle(cfg, x, ids, w, q13, s13, q2, s2):
        """The oracle of the FP8 function on the dequantized weights (the input and intermediate quantized as
        cfg.quant prescribes: the one formula)."""
        from epmoe.quant.fp8 import dequantize_weight
        blk, I = cfg.quant.weight_block, cfg.intermediate_size
        deq = [(dequantize_weight(q13[e], s13[e], blk)[:I], dequantize_weight(q13[e], s13[e], blk)[I:],
                dequantize_weight(q2[e], s2[e], blk)) for e in range(q13.shape[0])]
        return reference_moe(x, None, deq, cfg, routing=Routing(ids, w))

    def _fp8_weights(experts, granularity):
        from epmoe.quant.fp8 import quantize_weight
        w13, w2, _, _ = fused_layout(experts)
        block = (128, 128) if granularity == "block" else None
        q13, s13, q2, s2 = [], [], [], []
        for e in range(w13.shape[0]):
            if granularity == "tensor":   # one scale per tensor, stored repeated over the rows (Fp8Scheme)
                qa, sa = quantize_weight(w13[e], "tensor")
                qb, sb = quantize_weight(w2[e], "tensor")
                sa, sb = sa.expand(w13.shape[1]).clone(), sb.expand(w2.shape[1]).clone()
            else:
                qa, sa = quantize_weight(w13[e], granularity, block)
                qb, sb = quantize_weight(w2[e], granularity, block)
            q13.append(qa), s13.append(sa), q2.append(qb), s2.append(sb)
        return torch.stack(q13), torch.stack(s13), torch.stack(q2), torch.stack(s2)

    @pytest.mark.parametrize("down_bn", [64, 256])   # 256: a down tile spans two weight-scale blocks
    @pytest.mark.parametrize("granularity,act_group", [("block", 128), ("channel", None), ("tensor", 128)])
    def test_fused_experts_fp8(granularity, act_group, down_bn):
        from epmoe.kernels.fused_moe import Fp8Operands
        from epmoe.quant.fp8 import Fp8Config, fp8_quantize_torch
        T, E, k, H, I = 9, 4, 2, 256, 128
        quant = Fp8Config(weight_block=(128, 128) if granularity == "block" else None,
                          per_channel_weights=granularity == "channel",
                          activation="per_token_group" if act_group else "per_token")
        cfg = MoEConfig(num_experts=E, top_k=k, hidden_size=H, intermediate_size=I, dtype=torch.float32,
                        quant=quant)
        experts = random_experts(cfg, seed=21)
        x = torch.randn(T, H, generator=torch.Generator().manual_seed(4))
        ids, w = random_routing(T, E, k, seed=5, hot_expert=1)
        q13, s13, q2, s2 = _fp8_weights(experts, granularity)
        xq, xs = fp8_quantize_torch(x, act_group)
        tma = granularity == "block"
        # split tiles (32-row body, 16-row tail) on the block path: both FP8 scale paths see listed tiles
        # persistent GEMMs where the down tile is 256 wide (one program per tile otherwise)
        cfg8 = MoEKernelConfig(32 if tma else 16, GemmConfig(128, 128, 1, 4, 2, tma=tma, persistent=down_bn == 256),
                               GemmConfig(down_bn, 128, 1, 4, 2, tma=tma, persistent=down_bn == 256),
                               tail_m=16 if tma else 0)
        ops = Fp8Operands(xs.contiguous(), s13, s2, act_group, quant.weight_block, granularity)
        out = fused_experts(xq, ids, w, q13, q2, "silu", out_dtype=torch.float32, config=cfg8, fp8=ops)
        # the oracle on the dequantized weights, quantizing the input and intermediate activations as the
        # config prescribes (the one formula)
        ref = _fp8_oracle(cfg, x, ids, w, q13, s13, q2, s2)
        # measured ~1e-3 (float32 sums in another order flip a rare intermediate rounding); 3e-2 is the library's
        assert_close(out, ref, 5e-3, context=f"fp8 {granularity}")

    @pytest.mark.parametrize("granularity,act_group", [("block", 128), ("channel", None), ("tensor", 128)])
    def test_fp8_rows_of_unlike_size(granularity, act_group):
        """FP8 activations whose rows differ 16x in size (x rows times 1, 4, 16 in turn), checked row by row: a
        kernel that read another row's activation scale would be off by 4-16x in that row, where random rows of
        one size (and a norm over all rows) would hide it. Plain, swap-AB, a persistent walk over split tiles,
        (block weights) stacked gate+up products and (per-channel weights) TMA weights with swap-AB, as the H100
        table's per-channel entries run them."""
        from epmoe.kernels.fused_moe import Fp8Operands
        from epmoe.quant.fp8 import Fp8Config, fp8_quantize_torch
        T, E, k, H, I = 12, 4, 2, 256, 256
        quant = Fp8Config(weight_block=(128, 128) if granularity == "block" else None,
                          per_channel_weights=granularity == "channel",
                          activation="per_token_group" if act_group else "per_token")
        cfg = MoEConfig(num_experts=E, top_k=k, hidden_size=H, intermediate_size=I, dtype=torch.float32, quant=quant)
        experts = random_experts(cfg, seed=61)
        x = torch.randn(T, H, generator=torch.Generator().manual_seed(62)) * (4.0 ** (torch.arange(T) % 3))[:, None]
        ids, w = random_routing(T, E, k, seed=63)
        q13, s13, q2, s2 = _fp8_weights(experts, granularity)
        xq, xs = fp8_quantize_torch(x, act_group)
        ops = Fp8Operands(xs.contiguous(), s13, s2, act_group, quant.weight_block, granularity)
        ref = _fp8_oracle(cfg, x, ids, w, q13, s13, q2, s2)
        tma = granularity == "block"
        configs = [MoEKernelConfig(16, GemmConfig(128, 128, 1, 4, 2, tma=tma), GemmConfig(64, 128, 1, 4, 2, tma=tma)),
                   MoEKernelConfig(16, GemmConfig(128, 128, 1, 4, 2, swap_ab=True),
                                   GemmConfig(64, 128, 1, 4, 2, swap_ab=True)),
                   MoEKernelConfig(32, GemmConfig(128, 128, 1, 4, 2, tma=tma, persistent=True),
                                   GemmConfig(64, 128, 1, 4, 2, persistent=True), tail_m=16)]
        if granularity == "block":
            configs.append(MoEKernelConfig(16, GemmConfig(128, 128, 1, 4, 2, stack_gate_up=True),
                                           GemmConfig(64, 128, 1, 4, 2)))
        if granularity == "channel":    # the forms of the H100 table's per-channel entries: TMA weights, swap-AB
            configs += [MoEKernelConfig(16, GemmConfig(128, 128, 1, 8, 5, tma=True, swap_ab=True),
                                        GemmConfig(64, 128, 1, 4, 8, swap_ab=True)),
                        MoEKernelConfig(32, GemmConfig(128, 128, 1, 8, 5, tma=True, swap_ab=True),
                                        GemmConfig(128, 128, 1, 8, 3, swap_ab=True)),
                        MoEKernelConfig(64, GemmConfig(128, 128, 8, 4, 5, tma=True),
                                        GemmConfig(128, 128, 8, 8, 3, tma=True))]
        for config in configs:
            out = fused_experts(xq, ids, w, q13, q2, "silu", out_dtype=torch.float32, config=config, fp8=ops)
            for t in range(T):
                assert_close(out[t], ref[t], 5e-3, context=f"fp8 {granularity} row {t} {config.describe()}")

    @pytest.mark.parametrize("H,I", [(320, 256), (256, 200), (200, 72)])
    def test_block_fp8_partial_scale_blocks(H, I):
        """Block FP8 where H or 2I is no multiple of the 128-row scale block: each expert's weight scales are
        ceil(rows / 128) rows, and every expert past the first must find its own (a stride of floor(rows / 128)
        read its neighbour's, within a few per cent where the experts' scales are alike, far off where they
        are not: the experts here differ). Pointer and TMA weight loads, one program per tile and persistent."""
        from epmoe.kernels.fused_moe import Fp8Operands
        from epmoe.quant.fp8 import Fp8Config, fp8_quantize_torch
        T, E, k = 11, 4, 2
        quant = Fp8Config(weight_block=(128, 128), activation="per_token_group")
        cfg = MoEConfig(num_experts=E, top_k=k, hidden_size=H, intermediate_size=I, dtype=torch.float32, quant=quant)
        # experts whose up and down scales differ several-fold (up x 4^e, down / 4^e: the function's outputs
        # stay alike in size, so no expert's rows hide another's in the comparison)
        experts = [(g, u * 4.0 ** e, d / 4.0 ** e) for e, (g, u, d) in enumerate(random_experts(cfg, seed=51))]
        x = torch.randn(T, H, generator=torch.Generator().manual_seed(52))
        ids, w = random_routing(T, E, k, seed=53)
        q13, s13, q2, s2 = _fp8_weights(experts, "block")
        xq, xs = fp8_quantize_torch(x, 128)
        ops = Fp8Operands(xs.contiguous(), s13, s2, 128, quant.weight_block, "block")
        ref = _fp8_oracle(cfg, x, ids, w, q13, s13, q2, s2)
        for tma in (False, True):
            for persistent in (False, True):
                config = MoEKernelConfig(16, GemmConfig(128, 128, 1, 4, 2, tma=tma, persistent=persistent),
                                         GemmConfig(64, 128, 1, 4, 2, tma=tma, persistent=persistent))
                out = fused_experts(xq, ids, w, q13, q2, "silu", out_dtype=torch.float32, config=config, fp8=ops)
                assert_close(out, ref, 5e-3, context=f"block fp8 H={H} I={I} tma={tma} persistent={persistent}")

    @pytest.mark.parametrize("variant,T,routing,remote", [
        ("pointers", 37, "random", True), ("pointers", 1, "random", False), ("tma", 40, "hot", True),
        ("persistent_tail", 37, "hot", False), ("split_k", 40, "random", True), ("batched", 0, "", False)])
    def test_swap_ab_float32(variant, T, routing, remote, monkeypatch):
        """SWAP_AB (each product computed transposed, weights x rows^T, transposed back once) against the oracle
        in float32, and the plain products' result: uniform tiles with pointers and TMA, persistent kernels on
        split tiles, the down GEMM's K range split, the batched layout; one token (the direct path), every
        token on one expert, slots of remote experts; uneven K (H = 200) and N edges (I = 96 in tiles of 32)."""
        plain = {"pointers": SMALL, "tma": SMALL_TMA,
                 "persistent_tail": MoEKernelConfig(32, GemmConfig(32, 32, 2, 4, 2, persistent=True),
                                                    GemmConfig(64, 64, 1, 4, 2, tma=True, tma_a=True, persistent=True),
                                                    tail_m=16),
                 "split_k": replace(SMALL, down=replace(SMALL.down, split_k=3)),
                 "batched": SMALL}[variant]
        swapped = replace(plain, gate_up=replace(plain.gate_up, swap_ab=True), down=replace(plain.down, swap_ab=True))
        assert "swap" in swapped.describe() and MoEKernelConfig.from_dict(swapped.to_dict()) == swapped
        launches = swap_ab_launches(monkeypatch)
        if variant == "batched":
            E, C, H = 4, 20, 64
            cfg = MoEConfig(num_experts=E, top_k=1, hidden_size=H, intermediate_size=96, activation="gelu",
                            dtype=torch.float32)
            experts = random_experts(cfg, seed=91, with_bias=True)
            w13, w2, b13, b2 = fused_layout(experts)
            x = torch.randn(E, C, H, generator=torch.Generator().manual_seed(92))
            counts = torch.tensor([20, 0, 7, 17], dtype=torch.int32)
            out = batched_experts(x, counts, w13, w2, "gelu", b13=b13, b2=b2, config=swapped, out=torch.zeros_like(x))
            base = batched_experts(x, counts, w13, w2, "gelu", b13=b13, b2=b2, config=plain, out=torch.zeros_like(x))
            for e in range(E):
                c = int(counts[e])
                one = replace(cfg, num_experts=1)
                ref = reference_moe(x[e, :c], None, [experts[e]], one,
                                    routing=Routing(torch.zeros(c, 1, dtype=torch.int32), torch.ones(c, 1)))
                assert_close(out[e, :c], ref, 1e-5, context=f"batched expert {e}")
                assert not out[e, c:].any()                 # the rows past the count left as they were
        else:
            _, x, local, w, (w13, w2, b13, b2), ref = fused_case(T, 6, 3, "silu", True, routing, remote, seed=53)
            out = fused_experts(x, local, w, w13, w2, "silu", b13=b13, b2=b2, config=swapped)
            base = fused_experts(x, local, w, w13, w2, "silu", b13=b13, b2=b2, config=plain)
            assert_close(out, ref, 1e-5, context=f"swap_ab {variant} T={T}")
        assert_close(out, base, 1e-5, context=f"swap_ab {variant} against the plain products")
        assert launches.count(True) >= 2 and launches.count(False) >= 2      # both GEMMs each way

    def test_register_cap_reaches_every_gemm_launch(monkeypatch):
        """`max_registers` (the compiler's maxnreg) on both GEMMs: every GEMM launch passes it, and a launch
        without it passes none (the interpreter has no registers to cap: the result is only checked to be
        right; the GPU test `test_swap_ab` runs a capped tile)."""
        from epmoe.kernels import fused_moe
        seen, launch = [], fused_moe._run

        def recording(kernel, grid, args, meta, warmup):
            seen.append((kernel, meta.get("maxnreg")))
            return launch(kernel, grid, args, meta, warmup)
        monkeypatch.setattr(fused_moe, "_run", recording)
        swapped = replace(SMALL, gate_up=replace(SMALL.gate_up, swap_ab=True, num_warps=8),
                          down=replace(SMALL.down, swap_ab=True, num_warps=8))
        capped = replace(swapped, gate_up=replace(swapped.gate_up, max_registers=128),
                         down=replace(swapped.down, max_registers=128))
        _, x, local, w, (w13, w2, b13, b2), ref = fused_case(37, 6, 3, "silu", True, "random", True, seed=54)
        out = fused_experts(x, local, w, w13, w2, "silu", b13=b13, b2=b2, config=capped)
        gemms = [cap for kernel, cap in seen if kernel is fused_moe.moe_gemm_kernel]
        assert len(gemms) >= 2 and set(gemms) == {128}
        seen.clear()
        base = fused_experts(x, local, w, w13, w2, "silu", b13=b13, b2=b2, config=swapped)
        assert [cap for kernel, cap in seen if kernel is fused_moe.moe_gemm_kernel] == [None] * len(gemms)
        assert_close(out, ref, 1e-5, context="register cap")
        assert_close(base, ref, 1e-5, context="uncapped")

    def swap_ab_launches(monkeypatch) -> list:
        """The SWAP_AB of every GEMM launch from here on (None: another kernel), recorded as each is launched."""
        from epmoe.kernels import fused_moe
        seen, launch = [], fused_moe._run

        def recording(kernel, grid, args, meta, warmup):
            seen.append(meta.get("SWAP_AB"))
            return launch(kernel, grid, args, meta, warmup)
        monkeypatch.setattr(fused_moe, "_run", recording)
        return seen

    @pytest.mark.parametrize("granularity,act_group,down_bn,I", [("block", 128, 64, 256), ("block", 128, 256, 256),
                                                                 ("block", 128, 64, 192), ("channel", None, 64, 256),
                                                                 ("tensor", 128, 128, 256)])
    def test_swap_ab_fp8(granularity, act_group, down_bn, I, monkeypatch):
        """SWAP_AB in FP8: block weights (scale per block and product: one number; a down tile 256 wide over
        two blocks, or I = 192 whose gate and up halves start mid-block: per column), per-channel weights with
        per-token activations, per-tensor; against the oracle and the plain products. Not with the "rescale"
        promotion: refused where the config is made."""
        from epmoe.kernels.fused_moe import Fp8Operands
        from epmoe.quant.fp8 import Fp8Config, fp8_quantize_torch
        T, E, k, H = 9, 4, 2, 256
        quant = Fp8Config(weight_block=(128, 128) if granularity == "block" else None,
                          per_channel_weights=granularity == "channel",
                          activation="per_token_group" if act_group else "per_token")
        cfg = MoEConfig(num_experts=E, top_k=k, hidden_size=H, intermediate_size=I, dtype=torch.float32, quant=quant)
        experts = random_experts(cfg, seed=31)
        x = torch.randn(T, H, generator=torch.Generator().manual_seed(32))
        ids, w = random_routing(T, E, k, seed=33, hot_expert=2)
        q13, s13, q2, s2 = _fp8_weights(experts, granularity)
        xq, xs = fp8_quantize_torch(x, act_group)
        ops = Fp8Operands(xs.contiguous(), s13, s2, act_group, quant.weight_block, granularity)
        plain = MoEKernelConfig(16, GemmConfig(128, 128, 1, 4, 2, tma=granularity == "block"),
                                GemmConfig(down_bn, 128, 1, 4, 2))
        swapped = replace(plain, gate_up=replace(plain.gate_up, swap_ab=True), down=replace(plain.down, swap_ab=True))
        launches = swap_ab_launches(monkeypatch)
        out = fused_experts(xq, ids, w, q13, q2, "silu", out_dtype=torch.float32, config=swapped, fp8=ops)
        assert launches.count(True) == 2
        base = fused_experts(xq, ids, w, q13, q2, "silu", out_dtype=torch.float32, config=plain, fp8=ops)
        ref = _fp8_oracle(cfg, x, ids, w, q13, s13, q2, s2)
        assert_close(out, ref, 5e-3, context=f"swap_ab fp8 {granularity}")
        assert_close(out, base, 2e-3, context=f"swap_ab fp8 {granularity} against the plain products")
        with pytest.raises(ValueError, match="rescale"):
            replace(swapped.gate_up, promote="rescale")

    @pytest.mark.parametrize("swap,H,T,hot", [(True, 256, 9, 2), (False, 256, 9, 2), (True, 200, 1, None),
                                              (False, 200, 13, 0)])
    def test_stacked_gate_up_fp8(swap, H, T, hot, monkeypatch):
        """STACK_GU (`GemmConfig.stack_gate_up`): the block-FP8 gate+up as one product of the gate and up rows a K
        block, plain and swap-AB, H a multiple of 128 and not (the last K block masked), one token and a hot
        expert, one program per tile and a persistent walk over split tiles; every gate+up launch stacked, against
        the oracle and the same tile unstacked. Refused where it cannot run: with TMA or "rescale" and on the down
        GEMM (the config), on per-channel weights and the down GEMM (the launch)."""
        from epmoe.kernels import fused_moe
        from epmoe.kernels.fused_moe import Fp8Operands
        from epmoe.quant.fp8 import Fp8Config, fp8_quantize_torch
        E, k, I = 4, 2, 256
        quant = Fp8Config(weight_block=(128, 128), activation="per_token_group")
        cfg = MoEConfig(num_experts=E, top_k=k, hidden_size=H, intermediate_size=I, dtype=torch.float32, quant=quant)
        experts = random_experts(cfg, seed=41)
        x = torch.randn(T, H, generator=torch.Generator().manual_seed(42))
        ids, w = random_routing(T, E, k, seed=43, hot_expert=hot)
        q13, s13, q2, s2 = _fp8_weights(experts, "block")
        xq, xs = fp8_quantize_torch(x, 128)
        ops = Fp8Operands(xs.contiguous(), s13, s2, 128, quant.weight_block, "block")
        plain = MoEKernelConfig(16, GemmConfig(128, 128, 1, 4, 2, swap_ab=swap), GemmConfig(64, 128, 1, 4, 2))
        stacked = replace(plain, gate_up=replace(plain.gate_up, stack_gate_up=True))
        seen, launch = [], fused_moe._run

        def recording(kernel, grid, args, meta, warmup):
            if kernel is fused_moe.moe_gemm_kernel:
                seen.append((meta["GATE_UP"], meta["STACK_GU"]))
            return launch(kernel, grid, args, meta, warmup)
        monkeypatch.setattr(fused_moe, "_run", recording)
        base = fused_experts(xq, ids, w, q13, q2, "silu", out_dtype=torch.float32, config=plain, fp8=ops)
        ref = _fp8_oracle(cfg, x, ids, w, q13, s13, q2, s2)
        # one program per tile, and a persistent walk over split tiles (32-row body, 16-row tail)
        walk = MoEKernelConfig(32, replace(stacked.gate_up, persistent=True), replace(plain.down, persistent=True),
                               tail_m=16)
        for config in (stacked, walk):
            seen.clear()
            out = fused_experts(xq, ids, w, q13, q2, "silu", out_dtype=torch.float32, config=config, fp8=ops)
            assert sorted(set(seen)) == [(False, False), (True, True)]
            assert_close(out, ref, 5e-3, context=f"stacked gate+up swap={swap} H={H} {config.describe()}")
            assert_close(out, base, 1e-5, context=f"stacked gate+up swap={swap} H={H} against two products")
        for bad in (dict(tma=True), dict(promote="rescale")):
            with pytest.raises(ValueError, match="stack_gate_up"):
                replace(stacked.gate_up, **bad)
        q13c, s13c, q2c, s2c = _fp8_weights(experts, "channel")
        channel = Fp8Operands(fp8_quantize_torch(x, None)[1].contiguous(), s13c, s2c, None, None, "channel")
        with pytest.raises(ValueError, match="stack_gate_up"):
            fused_experts(fp8_quantize_torch(x, None)[0], ids, w, q13c, q2c, "silu", out_dtype=torch.float32,
                          config=stacked, fp8=channel)
        with pytest.raises(ValueError, match="stack_gate_up"):       # the config refuses it on the down GEMM
            replace(plain, down=replace(plain.down, stack_gate_up=True))
        with pytest.raises(ValueError, match="stack_gate_up"):       # and so does the down GEMM's launch
            fused_moe.launch_down(*[torch.float32] * 11, 8, 8, 1, H, I, k, False, 16,
                                  gemm=replace(plain.down, stack_gate_up=True), fp8=fused_moe.Fp8Mode(True, True),
                                  warmup=True)

    @pytest.mark.parametrize("split", [2, 3, 5])
    @pytest.mark.parametrize("fmt", ["float32", "fp8_block"])
    def test_down_gemm_split_over_k_matches_one_range(split, fmt):
        """The down GEMM's K range cut in `split` pieces (float32 partial rows the slot sum adds, the bias in
        the first piece only) gives the one-range result to float32 rounding: K = 384 is three blocks of
        128, so 2 pieces are uneven and 5 leave two pieces empty (zeros, no scale read past the end). T = 1
        (one pair per tile) and T = 9 (aligned tiles), a slot of another rank, biases; split_k is refused
        where it cannot run (gate_up, the batched layout, a persistent walk)."""
        from epmoe.kernels.fused_moe import Fp8Operands
        from epmoe.quant.fp8 import Fp8Config, fp8_quantize_torch
        E, k, H, I = 4, 2, 128, 384
        quant = Fp8Config(weight_block=(128, 128), activation="per_token_group") if fmt == "fp8_block" else None
        cfg = MoEConfig(num_experts=E, top_k=k, hidden_size=H, intermediate_size=I, dtype=torch.float32,
                        quant=quant)
        experts = random_experts(cfg, seed=29)
        gen = torch.Generator().manual_seed(8)
        b13 = torch.randn(E, 2 * I, generator=gen)
        b2 = torch.randn(E, H, generator=gen)
        base = MoEKernelConfig(16, GemmConfig(128, 128, 1, 4, 2), GemmConfig(64, 128, 1, 4, 2))
        cut = replace(base, down=replace(base.down, split_k=split))
        for T in (1, 9):
            x = torch.randn(T, H, generator=gen)
            ids, w = random_routing(T, E, k, seed=T + split)
            ids[0, 1] = -1                                     # a slot whose expert is elsewhere
            if quant is None:
                w13 = torch.stack([torch.cat([g, u]) for g, u, _ in experts])
                w2 = torch.stack([d for _, _, d in experts])
                args, kw = (x, ids, w, w13, w2, "silu"), dict(b13=b13, b2=b2)
            else:
                q13, s13, q2, s2 = _fp8_weights(experts, "block")
                xq, xs = fp8_quantize_torch(x, 128)
                ops = Fp8Operands(xs.contiguous(), s13, s2, 128, (128, 128), "block")
                args, kw = (xq, ids, w, q13, q2, "silu"), dict(b13=b13, b2=b2, out_dtype=torch.float32, fp8=ops)
            whole = fused_experts(*args, config=base, **kw)
            pieces = fused_experts(*args, config=cut, **kw)
            assert torch.isfinite(whole).all()
            assert_close(pieces, whole, 1e-5, context=f"{fmt} T={T} split {split}")
        for bad, where in ((replace(base, gate_up=replace(base.gate_up, split_k=2)), "gate_up"),
                           (replace(cut, down=replace(cut.down, persistent=True)), "persistent=True")):
            with pytest.raises(ValueError, match=where):
                fused_experts(*args, config=bad, **kw)

    def _fp8_block_case(T, seeds, activation="per_token_group"):
        """A block-FP8 layer of 4 experts (H = 256, I = 128, k = 2) with random weights, T random rows and a
        random routing, seeded (experts, rows, routing): (cfg, x, ids, w, (q13, s13, q2, s2))."""
        from epmoe.quant.fp8 import Fp8Config
        quant = Fp8Config(weight_block=(128, 128), activation=activation)
        cfg = MoEConfig(num_experts=4, top_k=2, hidden_size=256, intermediate_size=128, dtype=torch.float32,
                        quant=quant)
        experts = random_experts(cfg, seed=seeds[0])
        x = torch.randn(T, 256, generator=torch.Generator().manual_seed(seeds[1]))
        ids, w = random_routing(T, 4, 2, seed=seeds[2])
        return cfg, experts, x, ids, w, _fp8_weights(experts, "block")

    @pytest.mark.parametrize("tiles,refused", [
        ((64, 128, 64, 128), "gate_up N tile is 64"),         # its output groups of 64, read back as 128s
        ((32, 128, 64, 128), "gate_up N tile is 32"),
        ((128, 128, 64, 64), "down K tile is 64"),
        ((128, 256, 64, 128), "gate_up K tile is 256"),
        ((64, 128, 32, 128), None),                           # per-token activations: any N tile
    ])
    def test_fp8_tiles_that_would_compute_wrongly_are_refused(tiles, refused):
        """A hand-made configuration whose tiles do not match the FP8 scale groups (the gate+up's N tile is
        its output's quantization group, which the down GEMM reads in groups of 128; each K tile reads one
        activation and one weight-block scale) is refused by both layouts, where it would return wrong
        numbers (a relative error of ~0.6 at deepseek-v3's sizes on a GPU). With per-token activations the
        gate+up output is quantized per row after it, so any N tile is right: checked against the oracle."""
        from epmoe.kernels.fused_moe import Fp8Operands
        from epmoe.quant.fp8 import dequantize_weight, fp8_quantize_torch
        gu_n, gu_k, dn_n, dn_k = tiles
        act_group = 128 if refused else None
        cfg, _, x, ids, w, (q13, s13, q2, s2) = _fp8_block_case(
            5, (23, 6, 7), "per_token_group" if act_group else "per_token")
        E, H, I = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
        xq, xs = fp8_quantize_torch(x, act_group)
        ops = Fp8Operands(xs.contiguous(), s13, s2, act_group, (128, 128), "block")
        config = MoEKernelConfig(16, GemmConfig(gu_n, gu_k, 1, 4, 2), GemmConfig(dn_n, dn_k, 1, 4, 2))
        if refused:
            with pytest.raises(ValueError, match=refused):
                fused_experts(xq, ids, w, q13, q2, "silu", out_dtype=torch.float32, config=config, fp8=ops)
            rows = torch.zeros(E, 4, H, dtype=xq.dtype)
            with pytest.raises(ValueError, match=refused):
                batched_experts(rows, torch.ones(E, dtype=torch.int32), q13, q2, "silu", out_dtype=torch.float32,
                                config=config, fp8=Fp8Operands(torch.ones(E * 4, H // 128), s13, s2, act_group,
                                                               (128, 128), "block"))
            return
        out = fused_experts(xq, ids, w, q13, q2, "silu", out_dtype=torch.float32, config=config, fp8=ops)
        deq = [(dequantize_weight(q13[e], s13[e], (128, 128))[:I], dequantize_weight(q13[e], s13[e], (128, 128))[I:],
                dequantize_weight(q2[e], s2[e], (128, 128))) for e in range(E)]
        assert_close(out, reference_moe(x, None, deq, cfg, routing=Routing(ids, w)), 5e-3, context="per-token FP8")

    @pytest.mark.parametrize("promote", ["sync", "rescale"])
    @pytest.mark.parametrize("poison", ["x_nan", "x_inf", "scale_nan"])
    def test_fused_experts_fp8_keep_a_nonfinite_token_in_its_row(poison, promote):
        """A NaN or Inf in one token's input (quantized by the Triton formula), or a NaN among its scales,
        makes that token's output row non-finite and leaves every other row as it was: the FP8 formula's
        maxima (input quantization, the gate+up epilogue's) and "rescale"'s scale floor must not pass
        over NaN."""
        from epmoe.kernels.fp8_quant import fp8_quantize_triton
        from epmoe.kernels.fused_moe import Fp8Operands
        T, bad = 9, 3
        cfg, _, x, ids, w, (q13, s13, q2, s2) = _fp8_block_case(T, (21, 4, 5))
        quant = cfg.quant
        cfg8 = MoEKernelConfig(16, GemmConfig(128, 128, 1, 4, 2, promote=promote),
                               GemmConfig(64, 128, 1, 4, 2, promote=promote))

        def run(x, poison_scale=False):
            xq, xs = fp8_quantize_triton(x, 128)
            if poison_scale:
                xs[bad, 0] = float("nan")
            ops = Fp8Operands(xs.contiguous(), s13, s2, 128, quant.weight_block, "block")
            return fused_experts(xq, ids, w, q13, q2, "silu", out_dtype=torch.float32, config=cfg8, fp8=ops)

        clean = run(x)
        px = x.clone()
        if poison != "scale_nan":
            px[bad, 5] = float("nan") if poison == "x_nan" else float("inf")
        out = run(px, poison_scale=poison == "scale_nan")
        others = torch.arange(T) != bad
        assert torch.isfinite(clean).all()
        assert not torch.isfinite(out[bad]).any(), f"token {bad}'s row: {out[bad, :8].tolist()}"
        assert torch.equal(out[others], clean[others])

    @pytest.mark.parametrize("act", ["silu", "gelu", "swigluoai"])
    @pytest.mark.parametrize("value", [float("nan"), float("inf")])
    def test_fused_experts_keep_a_nonfinite_token_in_its_row(act, value):
        """A NaN or Inf in one token's input makes its row non-finite where the oracle's is (swigluoai's
        clamps turn an infinite gate or up finite, as torch.clamp does, but keep NaN), right where the
        oracle's is finite, and leaves the other rows as they were, with every activation."""
        cfg, x, local, w, (w13, w2, b13, b2), _ = fused_case(9, 6, 2, act, False, "random", False, seed=81)
        clean = fused_experts(x, local, w, w13, w2, act, config=SMALL)
        px = x.clone()
        px[3, 7] = value
        out = fused_experts(px, local, w, w13, w2, act, config=SMALL)
        experts = [tuple(t[:3]) for t in random_experts(cfg, seed=9 + 81)]
        ref = reference_moe(px, None, experts, cfg, routing=Routing(local, w))
        others = torch.arange(9) != 3
        assert torch.equal(out[others], clean[others])
        finite = torch.isfinite(ref[3])
        assert torch.isfinite(out[3]).tolist() == finite.tolist()
        if value != value:
            assert not finite.any()
        else:
            assert_close(out[3:4, finite], ref[3:4, finite], 1e-5, context=f"{act}, Inf input")

    @pytest.mark.parametrize("down_bn,persistent", [(64, True), (256, False)])
    def test_fused_experts_fp8_rescale(down_bn, persistent):
        """The "rescale" promotion of block FP8 (accumulators in units of the last K block's scale)
        against the oracle and the "sync" path, with a weight block whose scale is 0 and a token whose
        second activation group is all zeros (the rescale floor), split tiles, and (256) the down tile's
        two halves in two scale blocks."""
        promote = "rescale"
        from dataclasses import replace as dc_replace

        from epmoe.kernels.fused_moe import Fp8Operands
        from epmoe.quant.fp8 import Fp8Config, fp8_quantize_torch
        T, E, k, H, I = 11, 4, 2, 384, 256
        quant = Fp8Config(weight_block=(128, 128), activation="per_token_group")
        cfg = MoEConfig(num_experts=E, top_k=k, hidden_size=H, intermediate_size=I, dtype=torch.float32,
                        quant=quant)
        experts = random_experts(cfg, seed=22)
        x = torch.randn(T, H, generator=torch.Generator().manual_seed(6))
        x[2, 128:256] = 0.0
        ids, w = random_routing(T, E, k, seed=7, hot_expert=0)
        q13, s13, q2, s2 = _fp8_weights(experts, "block")
        s13[0, 1, 1] = 0.0          # expert 0: the gate block of rows 128..255, K 128..255 scaled to zero
        s2[1, 0, 0] = 0.0
        xq, xs = fp8_quantize_torch(x, 128)
        sync = MoEKernelConfig(32, GemmConfig(128, 128, 1, 4, 2, tma=True, persistent=persistent),
                               GemmConfig(down_bn, 128, 1, 4, 2, tma=True, persistent=persistent), tail_m=16)
        variant = dc_replace(sync, gate_up=dc_replace(sync.gate_up, promote=promote),
                             down=dc_replace(sync.down, promote=promote))
        ops = Fp8Operands(xs.contiguous(), s13, s2, 128, quant.weight_block, "block")
        out = fused_experts(xq, ids, w, q13, q2, "silu", out_dtype=torch.float32, config=variant, fp8=ops)
        base = fused_experts(xq, ids, w, q13, q2, "silu", out_dtype=torch.float32, config=sync, fp8=ops)
        ref = _fp8_oracle(cfg, x, ids, w, q13, s13, q2, s2)
        assert torch.isfinite(out).all()
        assert_close(out, ref, 5e-3, context=f"fp8 promote={promote}")
        assert_close(out, base, 2e-3, context=f"fp8 promote={promote} against sync")

    @pytest.mark.parametrize("granularity,T,remote", [("block", 1, False), ("block", 3, True), ("tensor", 2, True),
                                                      ("channel", 1, False)])
    def test_decode_gemv_fp8(granularity, T, remote):
        """The decode path in FP8 (activations per group of 128; 128x128 block or per-row weight scales):
        the intermediate is quantized per group inside the down kernel with the one formula, so it
        matches the tile path closely and the oracle within the FP8 bound; slots of remote experts
        skipped. Per-token activation scales are not taken by the decode path: the tiles run instead."""
        from dataclasses import replace

        from epmoe.kernels.decode_gemv import fp8_supported
        from epmoe.kernels.fused_moe import Fp8Operands
        from epmoe.quant.fp8 import Fp8Config, dequantize_weight, fp8_quantize_torch
        E, k, H, I = 4, 3, 256, 256
        quant = Fp8Config(weight_block=(128, 128) if granularity == "block" else None,
                          per_channel_weights=granularity == "channel", activation="per_token_group")
        cfg = MoEConfig(num_experts=E, top_k=k, hidden_size=H, intermediate_size=I, dtype=torch.float32,
                        quant=quant)
        experts = random_experts(cfg, seed=41, with_bias=True)
        x = torch.randn(T, H, generator=torch.Generator().manual_seed(42))
        ids, w = random_routing(T, E, k, seed=43)
        local, w_ref = ids.clone(), w.clone()
        if remote:
            local[ids == E - 1] = -1
            w_ref[ids == E - 1] = 0.0
        q13, s13, q2, s2 = _fp8_weights(experts, granularity)
        _, _, b13, b2 = fused_layout(experts)
        xq, xs = fp8_quantize_torch(x, 128)
        ops = Fp8Operands(xs.contiguous(), s13, s2, 128, quant.weight_block, granularity)
        assert fp8_supported(ops, H, I) and not fp8_supported(replace(ops, act_group=None), H, I)
        tiles = MoEKernelConfig(16, GemmConfig(128, 128, 1, 4, 2), GemmConfig(64, 128, 1, 4, 2))
        gemv = replace(tiles, gemv=GemvConfig(32, 256, 16, 128, gate_up_stages=2))
        out = fused_experts(xq, local, w, q13, q2, "swigluoai", b13=b13, b2=b2, out_dtype=torch.float32,
                            config=gemv, fp8=ops)
        base = fused_experts(xq, local, w, q13, q2, "swigluoai", b13=b13, b2=b2, out_dtype=torch.float32,
                             config=tiles, fp8=ops)
        blk = quant.weight_block
        deq = [(dequantize_weight(q13[e], s13[e], blk)[:I], dequantize_weight(q13[e], s13[e], blk)[I:],
                dequantize_weight(q2[e], s2[e], blk), *experts[e][3:]) for e in range(E)]
        cfg_act = replace(cfg, activation="swigluoai")
        ref = reference_moe(x, None, deq, cfg_act, routing=Routing(ids, w_ref))
        assert_close(out, ref, 5e-3, context=f"gemv fp8 {granularity} T={T}")
        assert_close(out, base, 2e-3, context=f"gemv fp8 {granularity} T={T} against the tile path")
        with pytest.raises(ValueError, match="multiples of 128"):
            fused_experts(xq, local, w, q13, q2, "swigluoai", b13=b13, b2=b2, out_dtype=torch.float32,
                          config=replace(tiles, gemv=GemvConfig(32, 64, 16, 128)), fp8=ops)
        # per-token activation scales: the decode path does not take them, the tiles run (same result)
        xq_t, xs_t = fp8_quantize_torch(x, None)
        per_token = replace(ops, x_scale=xs_t.reshape(-1).contiguous(), act_group=None)
        assert torch.equal(
            fused_experts(xq_t, local, w, q13, q2, "swigluoai", b13=b13, b2=b2, out_dtype=torch.float32,
                          config=gemv, fp8=per_token),
            fused_experts(xq_t, local, w, q13, q2, "swigluoai", b13=b13, b2=b2, out_dtype=torch.float32,
                          config=tiles, fp8=per_token))

    @pytest.mark.parametrize("granularity", ["block", "channel"])
    def test_decode_gemv_fp8_ragged_k(granularity):
        """FP8 decode path with K tiles that do not divide H or I (H = I = 384, tiles of 256): the last K
        block reads no scale past its row. The scales are views whose next elements are NaN; the result
        stays finite and equal to the tile path's."""
        from dataclasses import replace

        from epmoe.kernels.fused_moe import Fp8Operands
        from epmoe.quant.fp8 import Fp8Config, fp8_quantize_torch
        E, k, H, I, T = 3, 2, 384, 384, 2
        quant = Fp8Config(weight_block=(128, 128) if granularity == "block" else None,
                          per_channel_weights=granularity == "channel", activation="per_token_group")
        cfg = MoEConfig(num_experts=E, top_k=k, hidden_size=H, intermediate_size=I, dtype=torch.float32,
                        quant=quant)
        experts = random_experts(cfg, seed=61)
        x = torch.randn(T, H, generator=torch.Generator().manual_seed(62))
        ids, w = random_routing(T, E, k, seed=63)
        q13, s13, q2, s2 = _fp8_weights(experts, granularity)
        xq, xs = fp8_quantize_torch(x, 128)

        def nan_after(t):            # the same values, followed in memory by NaN
            buf = torch.full((t.numel() + 64,), float("nan"))
            buf[:t.numel()] = t.reshape(-1)
            return buf[:t.numel()].view(t.shape)

        ops = Fp8Operands(nan_after(xs.contiguous()), nan_after(s13), nan_after(s2), 128, quant.weight_block,
                          granularity)
        tiles = MoEKernelConfig(16, GemmConfig(128, 128, 1, 4, 2), GemmConfig(64, 128, 1, 4, 2))
        out = fused_experts(xq, ids, w, q13, q2, "silu", out_dtype=torch.float32, fp8=ops,
                            config=replace(tiles, gemv=GemvConfig(16, 256, 16, 256)))
        base = fused_experts(xq, ids, w, q13, q2, "silu", out_dtype=torch.float32, config=tiles, fp8=ops)
        assert torch.isfinite(out).all()
        assert_close(out, base, 1e-5, context=f"ragged K fp8 {granularity}")

    @pytest.mark.parametrize("group", [1, 2, 3, 8, 16])
    def test_walk_groups_kernel_gives_the_pytorch_forms_groups(group):
        """`walk_groups_kernel` (what `expert_walk_groups` runs on a GPU) against the PyTorch form, int32 for
        int32: runs of 1 to 17 m-tiles, trailing unused tiles (-1), one tile, and the tiles of random top-8
        routings of 256 and 32 experts at T = 8192 (several hundred m-tiles, past one warp's lanes)."""
        import random

        from epmoe.kernels.walk_groups import walk_groups_torch, walk_groups_triton
        rng = random.Random(group)
        layouts = [[0], [-1, -1], [0] * 17 + [1] * 3 + [-1] * 5, [4, 5, 5, 6], list(range(40))]
        for _ in range(25):
            runs = [rng.choice([1, 2, 3, 5, 8, 9, 17]) for _ in range(rng.randint(1, 30))]
            layouts.append([e for e, n in enumerate(runs) for _ in range(n)] + [-1] * rng.randint(0, 12))
        g = torch.Generator().manual_seed(group)
        for experts in (256, 32):
            counts = torch.bincount(torch.randn(8192, experts, generator=g).topk(8, dim=1).indices.flatten(),
                                    minlength=experts).tolist()
            layouts.append([e for e in range(experts) for _ in range(-(-counts[e] // 128))] + [-1] * 7)
        for te in layouts:
            t = torch.tensor(te, dtype=torch.int32)
            got, want = walk_groups_triton(t, group), walk_groups_torch(t, group)
            assert got.dtype == torch.int32 and torch.equal(got, want), (group, te)
