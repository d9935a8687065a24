"""The GPU-initiated dispatchers' kernels and bookkeeping, on simulated ranks in one process.

Each simulated rank has its own plain buffer; the kernels (Triton interpreter, float32) store into the
others' buffers through the same byte distances as on GPUs. The dispatchers' step generators stop at
every wait, so the ranks advance in lockstep. Checked against `reference_moe` and against an independent
computation of what each rank must receive.
"""
import importlib.util

import pytest
import torch

from epmoe.testing.interpreter import INTERPRETING, run_interpreted

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed (pip install 'epmoe[triton]')")

if not INTERPRETING:
    def test_simulated_ranks_under_the_interpreter():
        run_interpreted(__file__)

else:
    from epmoe import MoEConfig, Placement, reference_moe
    from epmoe.dispatch.symm_high_throughput import SymmHighThroughputDispatcher
    from epmoe.dispatch.symm_low_latency import SymmLowLatencyDispatcher
    from epmoe.dispatch.symm_workspace import WorkspacePool, simulated_workspaces
    from epmoe.experts.reference import ReferenceExperts
    from epmoe.layouts import ExpertWeights
    from epmoe.routing import route
    from epmoe.testing import assert_close, random_experts

    def lockstep(gens):
        """Advance every rank's step generator to its next wait in turn; return their results."""
        results = [None] * len(gens)
        live = set(range(len(gens)))
        while live:
            for r in sorted(live):
                try:
                    next(gens[r])
                except StopIteration as stop:
                    results[r] = stop.value
                    live.discard(r)
        return results


    def rank_weights(cfg, experts, placement):
        H, I = cfg.hidden_size, cfg.intermediate_size
        local = placement.local_experts
        w13 = torch.stack([torch.cat([experts[e][0], experts[e][1]]) for e in local]).to(cfg.dtype)
        w2 = torch.stack([experts[e][2] for e in local]).to(cfg.dtype)
        assert w13.shape == (len(local), 2 * I, H)
        return ExpertWeights(w13, w2)


    def make(cls, cfg, ep, M, placements=None):
        probe = cls(cfg, Placement(cfg.num_experts, ep, 0, placements), max_tokens_per_rank=M,
                    pool=WorkspacePool(None, torch.device("cpu"), 0, ep, simulated_workspaces(ep, 2, 128)[0]))
        layout = probe.slot_layout(probe._rows_for(1)) if cls is SymmHighThroughputDispatcher else probe.slot_layout()
        wss = simulated_workspaces(ep, 2, layout.nbytes)
        return [cls(cfg, Placement(cfg.num_experts, ep, r, placements), max_tokens_per_rank=M,
                    pool=WorkspacePool(None, torch.device("cpu"), r, ep, wss[r])) for r in range(ep)]


    def run_forward(ds, cfg, experts, xs, logits):
        routings = [route(l, cfg) for l in logits]
        outs = lockstep([d.dispatch_steps(x, ro) for d, x, ro in zip(ds, xs, routings)])
        ys = [ReferenceExperts(cfg)(b, rank_weights(cfg, experts, d.placement)) for d, (b, _) in zip(ds, outs)]
        return lockstep([d.combine_steps(y, h) for d, y, (_, h) in zip(ds, ys, outs)]), outs, routings


    CASES = [  # (ep, E, k, H, tokens per rank)
        (2, 8, 2, 24, [5, 3]),
        (2, 6, 3, 20, [0, 4]),          # a rank with no tokens; E not a power of two
        (3, 7, 2, 16, [1, 6, 2]),       # E not divisible by ep; T = 1
        (4, 8, 4, 12, [3, 3, 0, 2]),    # top_k above ... the rank count equal
    ]


    @pytest.mark.parametrize("cls", [SymmHighThroughputDispatcher, SymmLowLatencyDispatcher])
    @pytest.mark.parametrize("ep,E,k,H,tokens", CASES)
    def test_simulated_ranks_match_reference(cls, ep, E, k, H, tokens):
        cfg = MoEConfig(num_experts=E, top_k=k, hidden_size=H, intermediate_size=8, dtype=torch.float32)
        experts = random_experts(cfg, seed=3)
        M = max(max(tokens), 1)
        ds = make(cls, cfg, ep, M)
        g = torch.Generator().manual_seed(ep * 100 + E)
        xs = [torch.randn(t, H, generator=g) for t in tokens]
        logits = [torch.randn(t, E, generator=g) * 2 for t in tokens]
        for _ in range(3):              # slots alternate; epochs advance
            outs, _, _ = run_forward(ds, cfg, experts, xs, logits)
            for r in range(ep):
                ref = reference_moe(xs[r], logits[r], experts, cfg)
                assert outs[r].shape == (tokens[r], H)
                assert_close(outs[r], ref, 1e-5)
