"""`grouped_mm`'s Triton passes on CUDA, run on CPU tensors under the Triton interpreter: the activation
between the GEMMs (`gated_rows`: bias, activation, cast or FP8 quantization in one pass) and the slot sum
(`sum_sorted_outputs`: each token's rows gathered from the expert-ordered GEMM output and summed with their
routing weights). Each against the PyTorch path it replaces and the whole layer against the float64 oracle,
on awkward shapes (T = 0 and 1, every token on one expert, sizes not multiples of 128, biases, slots of
other ranks)."""
import pytest
import torch

from epmoe.testing.interpreter import INTERPRETING, interpreted_file

pytestmark, test_under_the_interpreter = interpreted_file(__file__)

if not INTERPRETING:
    @pytest.mark.parametrize("quant,group,block,warps", [(False, 1024, 1024, 8), (True, 14336, 16384, 16),
                                                         (True, 128, 128, 8)])
    def test_gated_rows_compiles_for_hopper_with_vector_accesses_and_no_local_memory(quant, group, block, warps):
        """Compiled for sm_90 (no GPU needed): 16-byte loads of the gate+up rows and stores of the result,
        and no register spills even for a whole 14336-column row quantized with one scale."""
        from epmoe.kernels.gated_rows import gated_rows_kernel
        from epmoe.kernels.xcompile import CrossCompileUnavailable, compile_for_hopper, resource_usage
        types = ["*bf16", "*fp32", "*i64", "*fp8e4nv" if quant else "*bf16", "*fp32", "i32", "i32"]
        const = dict(ACTIVATION=0, HAS_BIAS=True, QUANT=quant, GROUP=group, BLOCK=block,
                     GROUPS=1 if group > 1024 else 4096 // block)
        try:
            compiled = compile_for_hopper(gated_rows_kernel, types, const, ints16=("I",), num_warps=warps)
        except CrossCompileUnavailable as exc:
            pytest.skip(str(exc))
        import re
        ptx = compiled.asm["ptx"]
        assert "ld.global.v4.b32" in set(re.findall(r"ld\.global[\.\w]*", ptx))
        assert "st.global.v4.b32" in set(re.findall(r"st\.global[\.\w]*", ptx))
        usage = resource_usage(compiled)
        if usage:
            assert usage["LOCAL"] == 0 and usage["STACK"] == 0, usage

else:
    from epmoe import MoEConfig, MoELayer, fp8_quantize
    from epmoe.activations import gated_activation_fused
    from epmoe.experts.base import sort_pairs_by_expert
    from epmoe.experts.grouped_mm import sum_sorted_outputs
    from epmoe.kernels.gated_rows import gated_rows
    from epmoe.layouts import FlatBatch
    from epmoe.reference import reference_moe
    from epmoe.testing import load_experts, random_experts

    def _rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()

    @pytest.mark.parametrize("with_bias", [False, True])
    def test_layer_matches_the_pytorch_path_and_the_oracle(with_bias):
        cfg = MoEConfig(num_experts=6, top_k=3, hidden_size=200, intermediate_size=48, dtype=torch.float32)
        layer = MoELayer(cfg, dispatcher="local", experts="grouped_mm", expert_bias=with_bias)
        experts = random_experts(cfg, seed=1, with_bias=with_bias)
        load_experts(layer, experts)
        g = torch.Generator().manual_seed(5)
        for T, one_expert in ((0, False), (1, False), (13, False), (9, True)):
            x = torch.randn(T, cfg.hidden_size, generator=g)
            logits = torch.randn(T, cfg.num_experts, generator=g)
            if one_expert:
                logits[:, 2] += 100.0          # every token's first slot on expert 2
            with torch.no_grad():
                layer.experts.use_kernels = False
                want = layer(x, logits)
                layer.experts.use_kernels = True
                got = layer(x, logits)
            assert got.shape == (T, cfg.hidden_size) and got.dtype == cfg.dtype
            if T:
                ref = reference_moe(x, logits, experts, cfg)
                assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)
                assert _rel(got, ref) < 1e-5 and got.abs().sum() > 0

    def test_slots_of_other_ranks_contribute_nothing():
        """Rows of pairs whose expert is not here hold garbage (NaN): the sum skips them and their
        weights, on both paths."""
        n, k, L, H = 7, 3, 4, 150
        g = torch.Generator().manual_seed(2)
        ids = torch.tensor([[0, 1, -1], [2, -1, -1], [-1, -1, -1], [3, 3, 0], [1, -1, 2], [0, 0, 0], [-1, 2, 1]],
                           dtype=torch.int32)
        weights = torch.rand(n, k, generator=g)
        weights[ids < 0] = float("nan")                 # an absent slot's weight must not leak in
        batch = FlatBatch(torch.zeros(n, H), ids, weights)
        order, counts, _ = sort_pairs_by_expert(ids, L)
        y_sorted = torch.randn(n * k, H, generator=g)
        y_sorted[int(counts.sum()):] = float("nan")       # the rows past the local experts' segments
        got = sum_sorted_outputs(y_sorted, order, batch, L, torch.float32, use_kernel=True)
        want = sum_sorted_outputs(y_sorted, order, batch, L, torch.float32, use_kernel=False)
        assert torch.isfinite(got).all() and torch.allclose(got, want, rtol=1e-6, atol=1e-6)
        assert torch.equal(got[2], torch.zeros(H))       # a token with no slot here
        # by hand: token 3 = w0 * y(3) + w1 * y(3) + w2 * y(0), its pairs' rows where `order` put them
        pos = torch.empty_like(order)
        pos[order] = torch.arange(order.numel())
        by_hand = sum(weights[3, j] * y_sorted[pos[3 * k + j]] for j in range(k))
        assert torch.allclose(got[3], by_hand, rtol=1e-6, atol=1e-6)

    def _gate_up_rows(P, I, L, seed, with_bias):
        g = torch.Generator().manual_seed(seed)
        h = (torch.randn(P, 2 * I, generator=g) * 3).to(torch.bfloat16)
        h[P // 2:, :7] = 0.0                                  # a few exact zeros
        bias = expert = None
        if with_bias:
            bias = torch.randn(L, 2 * I, generator=g)
            expert = torch.randint(0, L, (P,), generator=g)
        ref = h.float() if bias is None else h.float() + bias[expert]
        return h, bias, expert, ref

    @pytest.mark.parametrize("activation", ["silu", "gelu", "swigluoai"])
    @pytest.mark.parametrize("I", [48, 200, 1100])
    @pytest.mark.parametrize("with_bias", [False, True])
    def test_gated_rows_in_the_operand_dtype(activation, I, with_bias):
        for P in (0, 1, 7):
            h, bias, expert, ref = _gate_up_rows(P, I, 3, seed=P + I, with_bias=with_bias)
            got, scales = gated_rows(h, activation, torch.float32, bias, expert)
            want = gated_activation_fused(activation, ref)
            assert scales is None and got.shape == (P, I) and got.dtype == torch.float32
            # absolute slack relative to the largest value: 1 + erf(g / sqrt 2) cancels for very negative g
            # (the kernels' gelu and torch's differ there by ~1e-8 of the row's scale)
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-6 * max([1.0] + want.abs().flatten().tolist()))

    @pytest.mark.parametrize("activation", ["silu", "swigluoai"])
    @pytest.mark.parametrize("I,group", [(200, None), (200, 128), (48, 128), (1100, None), (1100, 128)])
    @pytest.mark.parametrize("with_bias", [False, True])
    def test_gated_rows_quantized_with_the_one_formula(activation, I, group, with_bias):
        """The scales and e4m3 values of quantizing the activation with `epmoe.fp8_quantize`: scales to
        float32 rounding of the activation's amax, and at least 99% of the values bit-equal (an
        activation 1 ulp apart may round to the neighbouring e4m3 value, never further)."""
        for P in (0, 1, 7):
            h, bias, expert, ref = _gate_up_rows(P, I, 3, seed=P + I, with_bias=with_bias)
            q, s = gated_rows(h, activation, torch.bfloat16, bias, expert, quant_group=group)
            q_want, s_want = fp8_quantize(gated_activation_fused(activation, ref), group)
            assert q.dtype == torch.float8_e4m3fn and q.shape == (P, I) and s.shape == s_want.shape
            if not P:
                continue
            assert torch.allclose(s, s_want, rtol=1e-5, atol=0)
            same = (q.view(torch.uint8) == q_want.view(torch.uint8)).float().mean().item()
            assert same >= 0.99, same
            step = q_want.float().abs().clamp(min=2 ** -6) * 2 ** -3     # one e4m3 spacing at that magnitude
            assert ((q.float() - q_want.float()).abs() <= step + 1e-6).all()
