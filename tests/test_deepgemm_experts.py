"""benchmarks/deepgemm_experts.py on the CPU: `triton_ws`'s pipeline with DeepGEMM's grouped GEMMs, DeepGEMM stood in
for by its statement in PyTorch (rows grouped by expert in segments of 128, `m_indices` -1 where none is; A's
scales per group of 128 columns, B's per 128x128 block; BF16 out), the layout, row copy, activation pass and slot
sum run as on the GPU (their Triton kernels under the interpreter). Checked against the `reference` experts on
the same weights, block FP8, on awkward shapes: T = 0 and 1, every token's first slot on one expert, slots of
other ranks, a hidden size that is not a multiple of 128. DeepGEMM itself is checked on a GPU, where
`profile_experts_steps.py` checks the whole forward against the float64 oracle."""
import importlib.util
import os

import pytest
import torch

from epmoe.testing.interpreter import INTERPRETING, interpreted_file

pytestmark, test_under_the_interpreter = interpreted_file(__file__)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if not INTERPRETING:
    def test_the_prototype_takes_block_fp8_without_biases_only(benchmark_script):
        from epmoe import Fp8Config, MoEConfig
        module = benchmark_script("deepgemm_experts")
        block = MoEConfig(num_experts=4, top_k=2, hidden_size=256, intermediate_size=128, dtype=torch.bfloat16,
                          quant=Fp8Config())
        assert module.problem(block) is None
        assert "bias" in module.problem(block, with_bias=True)
        bf16 = MoEConfig(num_experts=4, top_k=2, hidden_size=256, intermediate_size=128, dtype=torch.bfloat16)
        channel = MoEConfig(num_experts=4, top_k=2, hidden_size=256, intermediate_size=128, dtype=torch.bfloat16,
                            quant=Fp8Config(weight_block=None, per_channel_weights=True, activation="per_token"))
        assert "block FP8" in module.problem(bf16) and "block FP8" in module.problem(channel)
        with pytest.raises(ValueError, match="down must be one of"):
            module.DeepGemmExperts(block, down="cutlass")

    def test_the_steps_profile_names_why_the_deepgemm_prototypes_cannot_run(benchmark_script, monkeypatch):
        """`profile_experts_steps.py --backends ...,deepgemm`: without an importable deep_gemm the prototypes are
        skipped with that said; with one, the layer's other reasons (here: no CUDA GPU for triton_ws, then a layer
        that is not block FP8) are said."""
        from epmoe import Fp8Config, MoEConfig
        steps = benchmark_script("profile_experts_steps")
        block = MoEConfig(num_experts=4, top_k=2, hidden_size=256, intermediate_size=128, dtype=torch.bfloat16,
                          quant=Fp8Config())
        cpu = torch.device("cpu")
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: None if name == "deep_gemm" else real(name, *a))
        assert "deep_gemm is not importable" in steps.prototype_problem(block, cpu)
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: object() if name == "deep_gemm" else real(name, *a))
        assert "cuda" in steps.prototype_problem(block, cpu)
        from epmoe import contract
        monkeypatch.setattr(contract, "experts_problem", lambda *args, **kwargs: None)
        assert steps.prototype_problem(block, cpu) is None
        bf16 = MoEConfig(num_experts=4, top_k=2, hidden_size=256, intermediate_size=128, dtype=torch.bfloat16)
        assert "block FP8" in steps.prototype_problem(bf16, cpu)

else:
    from epmoe import Fp8Config, MoEConfig, MoELayer
    from epmoe.experts.triton_ws import grouped_gemm_reference
    from epmoe.layouts import FlatBatch
    from epmoe.quant.fp8 import dequantize_weight, fp8_dequantize
    from epmoe.testing import awkward_flat_batches, load_experts, random_experts

    _spec = importlib.util.spec_from_file_location("deepgemm_experts",
                                                   os.path.join(ROOT, "benchmarks", "deepgemm_experts.py"))
    deepgemm_experts = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(deepgemm_experts)

    class StandInDeepGemm:
        """`m_grouped_fp8_gemm_nt_contiguous` as DeepGEMM states it, in PyTorch: rows of one expert in whole
        segments of 128, rows marked -1 written as zeros; refusing scales or operands of other shapes, dtypes or
        layouts than its checks take (A, B and D with their last dimension contiguous, B and its scales whole,
        float32 scales, `m_indices` contiguous int32); each call's A scales recorded (whether they came
        MN-major, as the K-block-major copy leaves them)."""

        def __init__(self, alignment=128):
            self.calls = []
            self.alignment = alignment

        def get_mk_alignment_for_contiguous_layout(self):
            return self.alignment

        def m_grouped_fp8_gemm_nt_contiguous(self, a_pair, b_pair, d, m_indices):
            (a, sfa), (b, sfb) = a_pair, b_pair
            M, K = a.shape
            G, N, _ = b.shape
            assert a.dtype == b.dtype == torch.float8_e4m3fn and d.dtype == torch.bfloat16
            assert M % 128 == 0 and K % 128 == 0 and N % 128 == 0, (M, N, K)
            assert tuple(sfa.shape) == (M, K // 128) and tuple(sfb.shape) == (G, N // 128, K // 128)
            assert tuple(d.shape) == (M, N) and tuple(m_indices.shape) == (M,) and m_indices.dtype == torch.int32
            assert a.stride(1) == 1 and d.stride(1) == 1 and b.is_contiguous() and m_indices.is_contiguous()
            assert sfa.dtype == sfb.dtype == torch.float32 and sfb.is_contiguous()
            assert sfa.stride(1) == 1 or sfa.stride(0) == 1, "A's scales K-major or MN-major"
            segments = m_indices.view(-1, 128)
            assert (segments == segments[:, :1]).all(), "an expert's rows must fill whole segments of 128"
            assert ((m_indices >= -1) & (m_indices < G)).all()
            self.calls.append({"mn_major_a_scales": sfa.stride(0) == 1, "rows": M})
            A = fp8_dequantize(a, sfa, 128)
            d[m_indices < 0] = 0
            for e in m_indices.unique().tolist():
                if e < 0:
                    continue
                B = dequantize_weight(b[e], sfb[e], (128, 128))
                rows = m_indices == e
                d[rows] = (A[rows] @ B.t()).to(d.dtype)

    def _rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()

    @pytest.mark.parametrize("down", ["gluon", "deepgemm"])
    def test_the_pipeline_with_deepgemm_matches_the_reference_experts(down):
        """Gate+up by DeepGEMM (A's scales MN-major), the activation and quantization pass, down by DeepGEMM or
        by the Gluon GEMM (its statement here): against the reference experts within the FP8 bound."""
        cfg = MoEConfig(num_experts=5, top_k=3, hidden_size=200, intermediate_size=160, dtype=torch.bfloat16,
                        quant=Fp8Config(weight_block=(128, 128)))
        layer = MoELayer(cfg, dispatcher="local", experts="reference")
        load_experts(layer, random_experts(cfg, seed=1))
        stand_in = StandInDeepGemm()
        experts = deepgemm_experts.DeepGemmExperts(cfg, down=down)
        experts.deep_gemm = stand_in
        experts.gemm = grouped_gemm_reference
        Hp = experts.plan.padded_hidden_size
        g = torch.Generator().manual_seed(4)
        for T, batch in awkward_flat_batches(cfg, Hp, g):
            before = len(stand_in.calls)
            got = experts(batch, layer.expert_weights)
            want = layer.experts(batch, layer.expert_weights)
            assert got.shape == (T, Hp) and got.dtype == cfg.dtype
            calls = stand_in.calls[before:]
            if not T:
                assert calls == []
                continue
            assert len(calls) == (2 if down == "deepgemm" else 1)
            assert calls[0]["mn_major_a_scales"]
            assert torch.isfinite(got).all() and got.abs().sum() > 0
            assert _rel(got, want) < 3e-2, (T, down, _rel(got, want))

    def test_a_deepgemm_whose_segments_are_not_the_tiles_is_refused():
        cfg = MoEConfig(num_experts=5, top_k=3, hidden_size=200, intermediate_size=160, dtype=torch.bfloat16,
                        quant=Fp8Config(weight_block=(128, 128)))
        layer = MoELayer(cfg, dispatcher="local", experts="reference")
        load_experts(layer, random_experts(cfg, seed=1))
        experts = deepgemm_experts.DeepGemmExperts(cfg)
        experts.deep_gemm = StandInDeepGemm(alignment=256)
        batch = FlatBatch(torch.zeros(3, experts.plan.padded_hidden_size, dtype=cfg.dtype),
                          torch.tensor([[0, 1, 2]] * 3, dtype=torch.int32), torch.rand(3, 3))
        with pytest.raises(RuntimeError, match="segments of 256"):
            experts(batch, layer.expert_weights)

    def test_biases_are_refused():
        cfg = MoEConfig(num_experts=5, top_k=3, hidden_size=200, intermediate_size=160, dtype=torch.bfloat16,
                        quant=Fp8Config(weight_block=(128, 128)))
        layer = MoELayer(cfg, dispatcher="local", experts="reference", expert_bias=True)
        load_experts(layer, random_experts(cfg, seed=1, with_bias=True))
        experts = deepgemm_experts.DeepGemmExperts(cfg)
        experts.deep_gemm = StandInDeepGemm()
        batch = FlatBatch(torch.zeros(3, experts.plan.padded_hidden_size, dtype=cfg.dtype),
                          torch.tensor([[0, 1, 2]] * 3, dtype=torch.int32), torch.rand(3, 3))
        with pytest.raises(ValueError, match="without expert biases"):
            experts(batch, layer.expert_weights)
