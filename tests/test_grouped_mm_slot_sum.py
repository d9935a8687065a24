"""`grouped_mm`'s slot sum on CUDA (`sum_sorted_outputs`: each token's rows gathered from the
expert-ordered GEMM output and summed with their routing weights in one Triton pass), run on CPU tensors
under the Triton interpreter: the same outputs as the PyTorch path it replaces (scatter to pair order, then
the weighted sum), and as the float64 oracle, on awkward shapes (T = 0 and 1, every token on one expert,
hidden size not a multiple of 128, biases, slots of other ranks)."""
import importlib.util

import pytest
import torch

from epmoe.testing.interpreter import INTERPRETING, run_interpreted

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed (pip install 'epmoe[triton]')")

if not INTERPRETING:
    def test_grouped_mm_slot_sum_under_the_interpreter():
        run_interpreted(__file__)

else:
    from epmoe import MoEConfig, MoELayer
    from epmoe.experts.base import sort_pairs_by_expert
    from epmoe.experts.grouped_mm import sum_sorted_outputs
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
