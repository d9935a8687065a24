"""The `triton_ws` and `triton_ws_down` experts' pipelines on the CPU: the padded layout, the token of each layout row, the
rows copied into that order (the FP8 scales turned K-block-major) and the slot sum
run as on the GPU (their Triton kernels under the interpreter); the two grouped GEMMs (gate+up with its
activation epilogue, down) are their PyTorch statement (`grouped_gemm_reference`; the Gluon kernel
itself is checked against it on a GPU by `benchmarks/gluon_gemm_probe.py`). Against the `reference`
experts on the same weights, BF16 and block FP8, on awkward shapes: T = 0 and 1, every token on one
expert, slots of other ranks, biases, a hidden size that is not a multiple of 128."""
import dataclasses
import io
import time

import pytest
import torch

from epmoe.testing.interpreter import INTERPRETING, interpreted_file

pytestmark, test_under_the_interpreter = interpreted_file(__file__)

if not INTERPRETING:
    def test_refused_where_it_cannot_run():
        from epmoe import Fp8Config, MoEConfig, contract
        cfg = MoEConfig(num_experts=4, top_k=2, hidden_size=256, intermediate_size=128, dtype=torch.bfloat16)
        assert "cuda" in contract.experts_problem("triton_ws", cfg, "cpu")
        f32 = MoEConfig(num_experts=4, top_k=2, hidden_size=256, intermediate_size=128, dtype=torch.float32)
        assert "dtype" in contract.experts_problem("triton_ws", f32, "cuda", check_device=False)
        tensor = MoEConfig(num_experts=4, top_k=2, hidden_size=256, intermediate_size=128, dtype=torch.bfloat16,
                           quant=Fp8Config(weight_block=None, activation="per_token"))
        assert "fp8_tensor" in contract.experts_problem("triton_ws", tensor, "cuda", check_device=False)
        # per-channel weights: with activations per token or per group of 128, not per group of 64 (the
        # scheme's check, which the contract asks on the device)
        from epmoe.experts.triton_ws import _quant_problem
        for activation, group, refused in (("per_token", 128, False), ("per_token_group", 128, False),
                                           ("per_token_group", 64, True)):
            channel = MoEConfig(num_experts=4, top_k=2, hidden_size=256, intermediate_size=128,
                                dtype=torch.bfloat16, quant=Fp8Config(weight_block=None, per_channel_weights=True,
                                                                      activation=activation, group_size=group))
            assert contract.experts_problem("triton_ws", channel, "cuda", check_device=False) is None
            why = _quant_problem(channel.quant_scheme, "cuda")
            assert (why is not None and "per group of 64" in why) if refused else why is None, why
        assert "triton_ws" not in contract._by_priority(contract.EXPERTS)      # experimental: never "auto"

    def test_triton_sets_up_the_gluon_pipeline_only_where_a_table_picks_it(monkeypatch):
        """`triton` on a GPU sets up `triton_ws`'s pipeline (its self-check) only where a table of the device
        runs it for the layer's weight format, and warns where it cannot run there (the tiles run instead);
        `gluon_pipeline` says why for layers it cannot run."""
        from epmoe import Fp8Config, MoEConfig
        from epmoe.contract import build_plan
        from epmoe.experts import triton as triton_experts
        from epmoe.kernels import tuning_table
        asked = []
        monkeypatch.setattr(tuning_table, "tables_pick_gluon", lambda hidden, inter, top_k, fmt, device=None:
                            asked.append((hidden, inter, top_k, fmt)) or fmt == "bfloat16")
        monkeypatch.setattr(triton_experts, "gluon_pipeline", lambda plan, device: (None, "its GEMM disagreed"))
        monkeypatch.setattr(triton_experts, "_quant_problem", lambda scheme, device_type: None)   # FP8 without a GPU
        bf16 = MoEConfig(num_experts=4, top_k=2, hidden_size=256, intermediate_size=128, dtype=torch.bfloat16)
        with pytest.warns(RuntimeWarning, match="runs the Gluon GEMMs.*its GEMM disagreed.*tile kernels"):
            experts = triton_experts.TritonExperts(bf16, torch.device("cuda"))
        assert experts.gluon is None and asked == [(256, 128, 2, "bfloat16")]
        # what it reports (`epmoe bench experts` prints it) is what runs: the tiles
        from epmoe.kernels.tuning_table import GemmConfig, MoEKernelConfig
        from epmoe.layouts import ExpertWeights
        entry = MoEKernelConfig(128, GemmConfig(128, 64, 8, 8, 3), GemmConfig(128, 64, 8, 8, 4), gluon=True)
        monkeypatch.setattr(tuning_table, "lookup_config", lambda *args: (entry, "table"))
        weights = ExpertWeights(torch.zeros(4, 256, 256, dtype=torch.bfloat16),
                                torch.zeros(4, 256, 128, dtype=torch.bfloat16))
        assert experts.kernel_config(8192, weights) == dataclasses.replace(entry, gluon=False)
        block = MoEConfig(num_experts=4, top_k=2, hidden_size=256, intermediate_size=128, dtype=torch.bfloat16,
                          quant=Fp8Config())
        assert triton_experts.TritonExperts(block, torch.device("cuda")).gluon is None
        assert asked[-1] == (256, 128, 2, "fp8_block")
        assert triton_experts.TritonExperts(bf16).gluon is None and len(asked) == 2       # no device: not asked
        monkeypatch.undo()
        for cfg, words in ((bf16, "CUDA GPUs only"),
                           (MoEConfig(num_experts=4, top_k=2, hidden_size=256, intermediate_size=128,
                                      dtype=torch.float16), "not torch.float16"),
                           (MoEConfig(num_experts=4, top_k=2, hidden_size=256, intermediate_size=128,
                                      dtype=torch.bfloat16, quant=Fp8Config(weight_block=None, activation="per_token")),
                            "not fp8_tensor")):
            device = torch.device("cpu" if words == "CUDA GPUs only" else "cuda")
            plan = build_plan(None, "triton", cfg, 1, device.type, check_device=False)
            pipeline, why = triton_experts.gluon_pipeline(plan, device)
            assert pipeline is None and words in why, why

    def test_a_move_redoes_the_device_bound_set_up(monkeypatch):
        """`MoELayer.to()` hands the experts their new device before the tensors move: `triton` sets the
        Gluon pipeline up again there (or drops it) and looks its configurations up again; `triton_ws`
        self-checks its GEMM on the new device, and a refusal leaves the experts where they were."""
        from epmoe import MoEConfig
        from epmoe.contract import build_plan
        from epmoe.experts import triton as triton_experts
        from epmoe.experts import triton_ws
        from epmoe.kernels import tuning_table
        cfg = MoEConfig(num_experts=4, top_k=2, hidden_size=256, intermediate_size=128, dtype=torch.bfloat16)
        plan = build_plan(None, "triton", cfg, 1, "cuda", check_device=False)
        picked = {"cuda:0": False, "cuda:1": True}
        monkeypatch.setattr(tuning_table, "tables_pick_gluon", lambda hidden, inter, top_k, fmt, device=None:
                            picked[str(device)])
        pipeline = object()
        built = []
        monkeypatch.setattr(triton_experts, "gluon_pipeline",
                            lambda plan, device: built.append(str(device)) or (pipeline, None))
        experts = triton_experts.TritonExperts(plan, torch.device("cuda:0"))
        assert experts.gluon is None and built == []
        experts._configs[(1, (4, 256, 256), torch.bfloat16)] = "looked up on cuda:0"
        experts.move_to(torch.device("cuda:1"), plan)
        assert experts.gluon is pipeline and built == ["cuda:1"] and experts._configs == {}
        assert experts.device == torch.device("cuda:1")
        experts.move_to(torch.device("cuda:0"), plan)
        assert experts.gluon is None and built == ["cuda:1"]

        ws_plan = build_plan(None, "triton_ws", cfg, 1, "cuda", check_device=False)
        checked = []
        verdicts = {0: None, 1: "it disagreed on cuda:1"}
        monkeypatch.setattr(triton_ws.WarpSpecializedExperts, "self_check",
                            classmethod(lambda cls, device, fp8: checked.append(device.index) or verdicts[device.index]))
        ws = triton_ws.WarpSpecializedExperts(ws_plan, torch.device("cuda:0"))
        with pytest.raises(RuntimeError, match="refused: it disagreed on cuda:1"):
            ws.move_to(torch.device("cuda:1"), ws_plan)
        assert checked == [0, 1] and ws.device == torch.device("cuda:0")

    def test_gather_sum_refuses_an_out_it_cannot_write():
        from epmoe.kernels.token_rows import gather_sum
        src, index = torch.zeros(6, 8), torch.zeros(3, 2, dtype=torch.long)
        status = torch.zeros(1, dtype=torch.int32)
        for bad in (torch.zeros(3, 7), torch.zeros(3, 8, dtype=torch.bfloat16), torch.zeros(8, 3).t()):
            with pytest.raises(ValueError, match="out must be"):
                gather_sum(src, index, None, status, torch.float32, out=bad)

    @pytest.mark.parametrize("fp8", [None, "block", "channel", "channel_group"])
    def test_a_gemm_that_disagrees_is_refused(fp8):
        """The self-check run before the Gluon GEMM is used (`gemm_disagreement`), in each form (BF16 and the
        FP8 forms): the PyTorch statement agrees with itself; a GEMM that forgets the weight scales or writes
        a skipped tile is caught, and one wrong only in groups of unequal length (the walk cut at expert
        edges)."""
        from epmoe.experts.triton_ws import gemm_disagreement
        from epmoe.experts.triton_ws import grouped_gemm_reference
        cpu = torch.device("cpu")
        assert gemm_disagreement(grouped_gemm_reference, cpu, fp8) is None

        def writes_skipped_tiles(a, w, tile_expert, out, *rest, **launch):
            grouped_gemm_reference(a, w, tile_expert.clamp(min=0), out, *rest, **launch)

        def forgets_the_bias_when_gated(a, w, tile_expert, out, a_scale_t, w_scale, bias, activation, out_scale_t,
                                        **launch):
            grouped_gemm_reference(a, w, tile_expert, out, a_scale_t, w_scale, None if activation else bias,
                                   activation, out_scale_t, **launch)

        def writes_nan(a, w, tile_expert, out, *rest, **launch):
            grouped_gemm_reference(a, w, tile_expert, out, *rest, **launch)
            out[0] = float("nan")

        def reads_the_next_token(a, w, tile_expert, out, *rest, a_rows=None, **launch):
            shifted = None if a_rows is None else ((a_rows + 1) % a.shape[0]).to(torch.int32)
            grouped_gemm_reference(a, w, tile_expert, out, *rest, a_rows=shifted, **launch)

        def drops_a_walk_group(a, w, tile_expert, out, *rest, walk_groups=None, **launch):
            grouped_gemm_reference(a, w, tile_expert, out, *rest, walk_groups=walk_groups, **launch)
            if walk_groups is not None:         # the second group (tiles 1-3) never computed
                out[2 * 128:] = 0

        assert "plain GEMM (walk groups)" in gemm_disagreement(drops_a_walk_group, cpu, fp8)
        assert "plain GEMM" in gemm_disagreement(writes_skipped_tiles, cpu, fp8)
        assert "skipped tile" in gemm_disagreement(writes_skipped_tiles, cpu, fp8)
        assert "gated GEMM" in gemm_disagreement(forgets_the_bias_when_gated, cpu, fp8)
        assert "relative error nan" in gemm_disagreement(writes_nan, cpu, fp8)
        assert "gated GEMM" in gemm_disagreement(reads_the_next_token, cpu, fp8, gathered=True)
        assert gemm_disagreement(reads_the_next_token, cpu, fp8) is None       # the backend's forms pick no rows
        if fp8:
            def no_weight_scales(a, w, tile_expert, out, a_scale_t, w_scale, *rest, **launch):
                grouped_gemm_reference(a, w, tile_expert, out, a_scale_t, torch.ones_like(w_scale), *rest, **launch)

            def scales_of_the_layout_row(a, w, tile_expert, out, a_scale_t, *rest, a_rows=None, **launch):
                """The token's rows but the scale of the layout row's position (a gather that forgot them)."""
                if a_rows is not None:
                    a, a_scale_t = a[a_rows.long()], a_scale_t[:, :a_rows.numel()].repeat(1, 2)[:, :a_rows.numel()]
                grouped_gemm_reference(a, w, tile_expert, out, a_scale_t.contiguous(), *rest, **launch)

            def no_row_scales(a, w, tile_expert, out, a_scale_t, *rest, **launch):
                grouped_gemm_reference(a, w, tile_expert, out, torch.ones_like(a_scale_t), *rest, **launch)

            assert "relative error" in gemm_disagreement(no_weight_scales, cpu, fp8)
            assert "relative error" in gemm_disagreement(no_row_scales, cpu, fp8)
            assert "gated GEMM" in gemm_disagreement(scales_of_the_layout_row, cpu, fp8, gathered=True)
            # the forms are told apart: each one's operands have their own scale shapes
            with pytest.raises(ValueError, match="one of"):
                gemm_disagreement(grouped_gemm_reference, cpu, "tensor")

    def test_a_gemm_that_does_not_finish_is_refused():
        """The self-check polls the GPU's progress after each launch of the kernel instead of waiting on
        it: a kernel still running after the limit (a hang) is refused with that said."""
        from epmoe.experts.triton_ws import gemm_disagreement, grouped_gemm_reference, unfinished

        class Event:
            def __init__(self, done_after):
                self.polls, self.done_after = 0, done_after

            def query(self):
                self.polls += 1
                return self.polls > self.done_after

        assert unfinished(Event(3), 5.0, poll_s=0) is None
        stuck = Event(10 ** 9)
        why = unfinished(stuck, 0.05, poll_s=0.001)
        assert "did not finish within 0 s" in why and "experts='triton'" in why and stuck.polls > 1
        launches = []

        def hangs_at_the_second():
            launches.append(1)
            return None if len(launches) < 2 else "its kernel did not finish"

        def kernel(*args, **launch):
            return grouped_gemm_reference(*args, **launch)

        # settled after the kernel's launches only (plain in fixed groups, then in uneven ones): the second refused
        assert gemm_disagreement(kernel, torch.device("cpu"), "block", hangs_at_the_second) == \
            "its kernel did not finish"
        assert len(launches) == 2

    def test_a_gemm_that_does_not_build_is_refused_once(monkeypatch):
        """A Gluon GEMM that raises (Triton's compile errors are not RuntimeErrors) is refused with its error,
        remembered per device and format (not rebuilt at every layer), so `triton` falls back to its tiles."""
        import contextlib

        from epmoe.experts import triton_ws

        class CompilationError(Exception):
            """What Triton raises for a kernel that does not compile: not a RuntimeError."""

        calls = []

        def fails(*args, **kwargs):
            calls.append(1)
            raise CompilationError("at 12:4: unsupported layout\nmore")

        monkeypatch.setattr(triton_ws, "gemm_disagreement", fails)
        monkeypatch.setattr(triton_ws.WarpSpecializedExperts, "_checked", {})
        monkeypatch.setattr(torch.cuda, "device", lambda index: contextlib.nullcontext())
        for _ in range(2):
            why = triton_ws.WarpSpecializedExperts.self_check(torch.device("cuda", 0), "block")
            assert why == "its GEMM failed to build or run: CompilationError: at 12:4: unsupported layout"
        assert len(calls) == 1

    def test_the_self_check_walks_tiles_and_wraps_the_ring():
        """What `gemm_disagreement` asks of the kernel: two programs (each walks several tiles), K blocks
        beyond every default ring of slots, the walk in groups of unequal length (one tile, then three)."""
        from epmoe.experts.triton_ws import TILE, gemm_disagreement
        from epmoe.experts.triton_ws import grouped_gemm_reference
        from epmoe.kernels.ws_grouped_gemm import _default_stages, check_operands
        calls, walks, gated_n = [], [], []

        def records(a, w, tile_expert, out, a_scale_t, w_scale, bias, activation, out_scale_t, a_rows=None,
                    **launch):
            shape = check_operands(a, w, tile_expert, out, a_scale_t, w_scale, bias, activation, out_scale_t,
                                   a_rows=a_rows)
            calls.append((launch.get("num_programs"), (shape.K + shape.block_k - 1) // shape.block_k,
                          _default_stages(shape), int((tile_expert >= 0).sum()), shape.gated, shape.gather,
                          shape.a_count < shape.M_pad and a_rows is not None and a_rows.unique().numel() < shape.M_pad))
            walks.append(None if launch["walk_groups"] is None else launch["walk_groups"].tolist())
            if shape.gated:
                gated_n.append(shape.N)
            grouped_gemm_reference(a, w, tile_expert, out, a_scale_t, w_scale, bias, activation, out_scale_t,
                                   a_rows=a_rows, **launch)

        for form in (None, "block"):
            assert gemm_disagreement(records, torch.device("cpu"), form) is None
        # each GEMM walked in fixed groups, then in groups of unequal length
        assert len(calls) == 8 and walks == [None, [[0, 1], [1, 3], [1, 3], [1, 3]]] * 4
        for programs, k_blocks, stages, tiles, *_ in calls:
            assert programs == 2 and tiles > programs and k_blocks > stages, calls
        # the forms the backend runs: down plain and gate+up gated, rows in layout order; `gathered`: gate+up
        # over token rows picked (fewer tokens than rows: some picked twice)
        assert [c[4:] for c in calls] == ([(False, False, False)] * 2 + [(True, False, False)] * 2) * 2
        calls.clear()
        assert gemm_disagreement(records, torch.device("cpu"), "block", gathered=True) is None
        assert [c[4:] for c in calls] == [(False, False, False)] * 2 + [(True, True, True)] * 2
        # the gated I as each form's layers have it: unpadded (160, not a multiple of the tile) in BF16 and with A
        # per row, a multiple of 128 where A is quantized per group of 128
        for form, want in ((None, 160), ("block", 256), ("channel", 160), ("channel_group", 256)):
            gated_n.clear()
            assert gemm_disagreement(records, torch.device("cpu"), form) is None and gated_n == [want, want], form

else:
    from epmoe import Fp8Config, MoEConfig, MoELayer
    from epmoe.experts.triton_ws import WarpSpecializedExperts
    from epmoe.experts.triton_ws_down import WarpSpecializedDownExperts
    from epmoe.experts.triton_ws import grouped_gemm_reference
    from epmoe.layouts import FlatBatch
    from epmoe.testing import awkward_flat_batches, awkward_ids, load_experts, random_experts

    def _rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()

    # triton_ws_down in block FP8 only: its gate+up is the library's Triton GEMM, and the interpreter computes
    # bfloat16 dots wrongly (NumPy has no bfloat16; float32 and FP8 operands come out right). Its BF16 path
    # is checked on a GPU (tests/test_triton_gpu.py, tests/test_gpu_experts.py).
    QUANTS = {"block": Fp8Config(weight_block=(128, 128)),
              # per-channel weights, activations per token: the gate+up's output quantized after it, per row
              "channel": Fp8Config(weight_block=None, per_channel_weights=True, activation="per_token"),
              "channel_group": Fp8Config(weight_block=None, per_channel_weights=True)}

    @pytest.mark.parametrize("fp8,with_bias,backend", [(None, True, WarpSpecializedExperts),
                                                       ("block", False, WarpSpecializedExperts),
                                                       ("channel", True, WarpSpecializedExperts),
                                                       ("channel_group", False, WarpSpecializedExperts),
                                                       ("block", False, WarpSpecializedDownExperts),
                                                       ("block", True, WarpSpecializedDownExperts)])
    def test_pipeline_matches_the_reference_experts(fp8, with_bias, backend):
        """`triton_ws` (both GEMMs the Gluon one; BF16, block and per-channel FP8) and `triton_ws_down` (the
        library's Triton gate+up, under the interpreter here, then the Gluon down)."""
        quant = QUANTS[fp8] if fp8 else None
        # block FP8 and per-channel FP8 with A per group of 128 pad I = 160 to 256: two scale blocks per row of the
        # intermediate, so their layout matters (per token, I stays 160: the gate+up's tiles run past I, masked)
        cfg = MoEConfig(num_experts=5, top_k=3, hidden_size=200, intermediate_size=160 if fp8 else 48,
                        dtype=torch.bfloat16,
                        quant=quant)
        layer = MoELayer(cfg, dispatcher="local", experts="reference", expert_bias=with_bias)
        load_experts(layer, random_experts(cfg, seed=1, with_bias=with_bias))
        ws = backend(cfg)
        ws.gemm = grouped_gemm_reference
        Hp = ws.plan.padded_hidden_size
        g = torch.Generator().manual_seed(4)
        for T, batch in awkward_flat_batches(cfg, Hp, g):
            if T == 11:                      # a dispatcher's buffer to write into (the pull combine's)
                batch.out = torch.full((T, Hp), float("nan"), dtype=cfg.dtype)
            got = ws(batch, layer.expert_weights)
            if batch.out is not None:
                assert got.data_ptr() == batch.out.data_ptr()
                batch.out = None
            want = layer.experts(batch, layer.expert_weights)
            assert got.shape == (T, Hp) and got.dtype == cfg.dtype
            if T:
                assert torch.isfinite(got).all() and got.abs().sum() > 0
                assert _rel(got, want) < (3e-2 if fp8 else 1e-2), (T, _rel(got, want))

    def test_the_walk_is_cut_at_expert_edges_for_short_bf16_experts_and_long_experts():
        """`padded_layout`'s walk groups: BF16 with 128 to SHORT_EXPERT_ROWS rows per expert on average walks in
        groups of up to 8 m-tiles cut at expert edges (`expert_walk_groups` of its tiles); block FP8 with
        LONG_EXPERT_ROWS or more, in groups of up to LONG_EXPERT_GROUP; everything else (longer BF16 experts,
        per-channel FP8, fewer rows, shorter block-FP8 experts) keeps the fixed groups (None)."""
        from epmoe.experts.triton_ws import LONG_EXPERT_GROUP, LONG_EXPERT_ROWS, SHORT_EXPERT_ROWS
        from epmoe.kernels.walk_groups import expert_walk_groups
        from epmoe.layouts import ExpertWeights
        g = torch.Generator().manual_seed(5)
        E, H, I = 4, 128, 128
        bf16 = ExpertWeights(torch.zeros(E, 2 * I, H, dtype=torch.bfloat16), torch.zeros(E, H, I, dtype=torch.bfloat16))
        fp8 = dataclasses.replace(bf16, w13_scale=torch.ones(E, 2, 1), w2_scale=torch.ones(E, 1, 1))
        channel = dataclasses.replace(bf16, w13_scale=torch.ones(E, 2 * I), w2_scale=torch.ones(E, H))
        cfg = MoEConfig(num_experts=E, top_k=2, hidden_size=H, intermediate_size=I, dtype=torch.bfloat16)
        plans = {"bf16": (WarpSpecializedExperts(cfg), bf16),
                 **{kind: (WarpSpecializedExperts(dataclasses.replace(cfg, quant=QUANTS[kind])), weights)
                    for kind, weights in (("block", fp8), ("channel", channel))}}
        long = LONG_EXPERT_ROWS * E // 2
        for T, kind, group in ((SHORT_EXPERT_ROWS * E // 2, "bf16", 8), (SHORT_EXPERT_ROWS * E // 2 + 1, "bf16", None),
                               (128 * E // 2, "bf16", 8), (128 * E // 2 - 1, "bf16", None), (1, "bf16", None),
                               (SHORT_EXPERT_ROWS * E // 2, "block", None), (long - 1, "block", None),
                               (long, "bf16", None), (long, "channel", None), (long, "block", LONG_EXPERT_GROUP),
                               (4 * long, "block", LONG_EXPERT_GROUP)):
            batch = FlatBatch(torch.zeros(T, H, dtype=torch.bfloat16), awkward_ids(T, E, 2, g),
                              torch.rand(T, 2, generator=g))
            ws, weights = plans[kind]
            layout = ws.padded_layout(batch, weights)
            tile_expert, walk = layout.tile_expert, layout.walk_groups
            if group is not None:
                assert walk is not None and torch.equal(walk, expert_walk_groups(tile_expert, group)), T
                if group != 8:      # the long experts' groups are not those of 8
                    assert not torch.equal(walk, expert_walk_groups(tile_expert, 8)), T
            else:
                assert walk is None, (T, kind)
        # the down-only pipeline keeps the fixed walk where `triton_ws` takes the long one
        from epmoe.experts.triton_ws import walk_group
        from epmoe.experts.triton_ws_down import WarpSpecializedDownExperts
        batch = FlatBatch(torch.zeros(long, H, dtype=torch.bfloat16), awkward_ids(long, E, 2, g),
                          torch.rand(long, 2, generator=g))
        block_cfg = dataclasses.replace(cfg, quant=QUANTS["block"])
        assert WarpSpecializedDownExperts(block_cfg).padded_layout(batch, fp8).walk_groups is None
        assert WarpSpecializedExperts(block_cfg).padded_layout(batch, fp8).walk_groups is not None
        assert walk_group("fp8_block", 2 * long, E, long_walk=False) is None
        with pytest.raises(ValueError, match="quant must be one of"):
            walk_group("bf16", 2 * long, E)

    def test_triton_runs_the_gluon_pipeline_where_its_config_says(monkeypatch):
        """`triton` with a table entry that says `gluon` runs `triton_ws`'s pipeline (the same bits), and its
        tiles where the entry does not say so or no pipeline was set up (no Hopper GPU, or refused there).
        Block FP8 (the interpreter computes bf16 dots wrongly), the FP8 hardware check lifted: the
        interpreter stands in for it."""
        from epmoe.experts import triton as triton_experts
        from epmoe.experts.triton import TritonExperts
        monkeypatch.setattr(triton_experts, "_quant_problem", lambda scheme, device_type: None)
        from epmoe.kernels.tuning_table import GemmConfig, MoEKernelConfig
        cfg = MoEConfig(num_experts=5, top_k=3, hidden_size=200, intermediate_size=160, dtype=torch.bfloat16,
                        quant=Fp8Config(weight_block=(128, 128)))
        layer = MoELayer(cfg, dispatcher="local", experts="reference")
        load_experts(layer, random_experts(cfg, seed=2))
        w = layer.expert_weights
        ws = WarpSpecializedExperts(cfg)
        ws.gemm = grouped_gemm_reference
        ws_runs = []
        ws_forward = ws.forward_flat
        ws.forward_flat = lambda batch, weights: ws_runs.append(batch.x.shape[0]) or ws_forward(batch, weights)
        experts = TritonExperts(cfg)
        assert experts.gluon is None                  # built without a GPU: none set up
        g = torch.Generator().manual_seed(3)
        Hp = experts.plan.padded_hidden_size
        x = torch.zeros(40, Hp)
        x[:, :cfg.hidden_size] = torch.randn(40, cfg.hidden_size, generator=g)
        batch = FlatBatch(x.to(cfg.dtype), awkward_ids(40, cfg.num_experts, cfg.top_k, g, other_ranks=True),
                          torch.rand(40, cfg.top_k, generator=g))
        want = layer.experts(batch, w)
        tiles = MoEKernelConfig(16, GemmConfig(128, 128, 1, 4, 2), GemmConfig(64, 128, 1, 4, 2))
        runs = {}
        gluon = dataclasses.replace(tiles, gluon=True)
        for name, config, pipeline in (("tiles", tiles, ws), ("gluon", gluon, ws), ("gluon, none set up", gluon, None)):
            experts.kernel_config = lambda n, weights, config=config: config
            experts.gluon = pipeline
            runs[name] = experts(batch, w)
            assert _rel(runs[name], want) < 3e-2, (name, _rel(runs[name], want))
            assert ws_runs == ([40] if name != "tiles" else []), name
        assert torch.equal(runs["gluon"], ws(batch, w))
        assert torch.equal(runs["gluon, none set up"], runs["tiles"])

    @pytest.mark.parametrize("gluon_ms,tiles_ms,chosen", [(0.9, 1.0, True), (0.99, 1.0, False), (1.2, 1.0, False),
                                                          (0.5, float("inf"), None)])
    def test_tune_races_the_gluon_pipeline_as_the_triton_experts_run_it(gluon_ms, tiles_ms, chosen):
        """`epmoe tune`'s end-to-end race (`_race`): each path runs as the `triton` experts run it, replayed
        as a CUDA graph (the tiles through the fused kernels, `gluon` through `triton_ws`'s pipeline); the entry
        says `gluon` only where that path beats the tiles by more than GLUON_MARGIN, and none is written where
        the tiles failed (inf): they serve the batches the pipeline does not take."""
        from types import SimpleNamespace

        from rich.console import Console

        from epmoe.bench import tune
        from epmoe.bench.gpu_timing import GRAPH
        from epmoe.kernels.tuning_table import GemmConfig, MoEKernelConfig
        cfg = MoEConfig(num_experts=4, top_k=2, hidden_size=128, intermediate_size=64, dtype=torch.bfloat16)
        layer = MoELayer(cfg, dispatcher="local", experts="reference")
        load_experts(layer, random_experts(cfg, seed=5))
        ws = WarpSpecializedExperts(cfg)
        ws.gemm = grouped_gemm_reference
        ran = []

        class Timer:        # each path's time as given; checks that the path timed is the one asked for
            def time(self, fn, reps, warmup, use_graph):
                assert use_graph, "end-to-end paths are timed as CUDA-graph replays"
                before = ws_calls[0]
                out = fn()
                assert out.shape == (64, cfg.hidden_size)
                ran.append("gluon" if ws_calls[0] > before else "tiles")
                return SimpleNamespace(median_ms=gluon_ms if ran[-1] == "gluon" else tiles_ms, method=GRAPH)

        ws_calls, ws_times = [0], []
        forward = ws.forward_flat
        ws.forward_flat = lambda batch, weights: ws_calls.__setitem__(0, ws_calls[0] + 1) or \
            ws_times.append(time.monotonic()) or forward(batch, weights)
        problem = tune.Problem(cfg, "bfloat16", layer.expert_weights, False)
        tiles = MoEKernelConfig(16, GemmConfig(64, 64, 1, 4, 2), GemmConfig(64, 64, 1, 4, 2))
        paths = tune.end_to_end_paths([tiles], gluon=True)
        class Sampler:      # each path's stretch its own clocks; the second path's record has none
            def since(self, start):
                if len(ran) == 2:   # the Gluon path ran once before its stretch (its compiles out of the record)
                    assert len(ws_times) == 2 and ws_times[0] < start <= ws_times[1], (ws_times, start)
                return {"sm_mhz_min": 1500.0, "sm_mhz_max": 1700.0, "sm_mhz_median": 1600.0, "power_w_max": 690.0,
                        "clock_event_reasons": ["sw_power_cap"]} if len(ran) == 1 else None

        log = io.StringIO()
        ends = tune._race(problem, 64, paths, ws, Timer(), 1, torch.Generator().manual_seed(0),
                          Console(file=log, width=400), Sampler())
        assert ran == ["tiles", "gluon"] and ends == {"tiles BM16": tiles_ms, "gluon": gluon_ms}
        line = " ".join(log.getvalue().split())
        assert (f"tiles BM16 {tiles_ms:.4f} ms [sm 1500-1700 MHz (median 1600) 690 W sw_power_cap], "
                f"gluon {gluon_ms:.4f} ms") in line and not line.endswith("]"), line
        name = tune.end_to_end_choice(ends, paths)
        assert (name is None) if chosen is None else paths[name] == (dataclasses.replace(tiles, gluon=True) if chosen
                                                                     else tiles)
