"""Overlap on the GPU-initiated dispatchers, on simulated ranks (Triton interpreter, float32, CPU buffers):

- two micro-batches in flight in both orders (dispatch A, dispatch B, then combine B, combine A or
  combine A, combine B): each in its own workspace slot, both right;
- the transfer kernels on a grid bounded by `comm_sms` (each program taking rows in turn): the grids
  launched hold at most that many programs and the result is the oracle's;
- the schedule `MoELayer(micro_batches=2)` runs (`run_micro_batches`), each simulated rank in a thread of
  its own going through the public dispatch API: right; a rank whose experts fail in micro-batch A raises
  while its peer gets NaN exactly in A's tokens routed there; a rank whose input was refused (`abort()`
  once a micro-batch) makes its peer raise; and the next forwards are right on every rank (the ranks'
  workspaces stayed in step).
"""
import threading

import pytest
import torch

from epmoe.testing.interpreter import INTERPRETING, interpreted_file

pytestmark, test_under_the_interpreter = interpreted_file(__file__)

if INTERPRETING:
    from epmoe import MoEConfig, Placement, RankMismatch, reference_moe
    from epmoe.contract import build_plan
    from epmoe.dispatch.micro_batches import run_micro_batches
    from epmoe.dispatch.symm_high_throughput import SymmHighThroughputDispatcher
    from epmoe.dispatch.symm_low_latency import SymmLowLatencyDispatcher
    from epmoe.dispatch.symm_workspace import SymmWorkspace
    from epmoe.experts.reference import ReferenceExperts
    from epmoe.group import GroupState
    from epmoe.kernels import symm_dispatch
    from epmoe.layouts import ExpertWeights
    from epmoe.routing import route
    from epmoe.testing import assert_close, random_experts
    from test_symm_simulated import lockstep

    CFG = MoEConfig(num_experts=6, top_k=2, hidden_size=20, intermediate_size=8, dtype=torch.float32)
    EXPERTS = random_experts(CFG, seed=3)
    # (dispatcher, max_tokens_per_rank): the high-throughput one bounded and not, the low-latency one
    KINDS = [(SymmHighThroughputDispatcher, 4), (SymmHighThroughputDispatcher, None), (SymmLowLatencyDispatcher, 4)]
    IDS = ["ht-bounded", "ht-unbounded", "ll"]

    def make(cls, M, ep=2, threads=False, comm_sms=None):
        """One dispatcher per simulated rank, on a fresh simulated group (room for 4 tokens a rank)."""
        states = [GroupState() for _ in range(ep)]
        wss = SymmWorkspace.simulated(ep, SymmWorkspace.size_hint(CFG, ep, 4, dispatchers=(cls.name,)),
                                      states=states, threads=threads)
        plan = build_plan(cls.name, None, CFG, ep, "cuda", M, check_device=False, comm_sms=comm_sms)
        return [cls(plan, Placement(CFG.num_experts, ep, r), state=states[r], workspace=wss[r]) for r in range(ep)]

    def experts_of(d):
        """This rank's experts, as the layer's reference backend computes them."""
        local = d.placement.local_experts
        w13 = torch.stack([torch.cat([EXPERTS[e][0], EXPERTS[e][1]]) for e in local])
        weights = ExpertWeights(w13, torch.stack([EXPERTS[e][2] for e in local]))
        return lambda batch: ReferenceExperts(d.plan)(batch, weights)

    def data(tokens, seed):
        g = torch.Generator().manual_seed(seed)
        return ([torch.randn(t, CFG.hidden_size, generator=g) for t in tokens],
                [torch.randn(t, CFG.num_experts, generator=g) * 2 for t in tokens])

    # A, B, A, B on each kind; A, B, B, A where tests/test_symm_simulated.py does not run it
    @pytest.mark.parametrize("cls,M,order", [k + ("ABAB",) for k in KINDS] + [KINDS[1] + ("ABBA",)],
                             ids=[f"{i}-ABAB" for i in IDS] + [f"{IDS[1]}-ABBA"])
    def test_two_micro_batches_in_flight_in_both_orders(cls, M, order):
        ds = make(cls, M)
        (xa, la), (xb, lb) = data([3, 4], 1), data([4, 0], 2)
        got = {}
        for name, xs, ls in (("A", xa, la), ("B", xb, lb)):
            got[name] = lockstep([d.dispatch_steps(x, route(v, CFG)) for d, x, v in zip(ds, xs, ls)])
        assert {h.slot for _, h in got["A"]} != {h.slot for _, h in got["B"]}   # each its own slot
        outs = {}
        for name in (order[2], order[3]):
            ys = [experts_of(d)(b) for d, (b, _) in zip(ds, got[name])]
            outs[name] = lockstep([d.combine_steps(y, h) for d, y, (_, h) in zip(ds, ys, got[name])])
        for r in range(2):
            assert_close(outs["A"][r], reference_moe(xa[r], la[r], EXPERTS, CFG), 1e-5)
        assert_close(outs["B"][0], reference_moe(xb[0], lb[0], EXPERTS, CFG), 1e-5)
        assert outs["B"][1].shape == (0, CFG.hidden_size)          # rank 1 had no tokens in B

    class _Grids:
        """Records the grid of every launch of the transfer kernels (the module's kernel objects wrapped)."""

        NAMES = ("ht_dispatch_kernel", "ht_combine_kernel", "ll_dispatch_kernel", "ll_combine_kernel")

        def __init__(self, monkeypatch):
            from epmoe.kernels import token_rows
            self.grids = []
            for name in self.NAMES:
                monkeypatch.setattr(symm_dispatch, name, self._wrap(name, getattr(symm_dispatch, name)))
            # the high-throughput pull combine: the owner's reads of the peers' rows
            monkeypatch.setattr(token_rows, "gather_sum_kernel", self._wrap("ht_pull_sum", token_rows.gather_sum_kernel))

        def _wrap(self, name, kernel):
            grids = self.grids

            class Launch:
                def __getitem__(self, grid):
                    def run(*args, **meta):
                        if name != "ht_pull_sum" or meta.get("PEERS"):     # a sum over the peers' rows
                            grids.append((name, tuple(grid)))
                        return kernel[grid](*args, **meta)
                    return run
            return Launch()

    @pytest.mark.parametrize("cls,M", KINDS, ids=IDS)
    @pytest.mark.parametrize("sms", [1, 3])
    def test_transfer_kernels_on_a_bounded_grid(cls, M, sms, monkeypatch):
        grids = _Grids(monkeypatch).grids
        ds = make(cls, M, comm_sms=sms)
        xs, ls = data([4, 3], 5)
        outs = lockstep([d.dispatch_steps(x, route(v, CFG)) for d, x, v in zip(ds, xs, ls)])
        ys = [experts_of(d)(b) for d, (b, _) in zip(ds, outs)]
        outs = lockstep([d.combine_steps(y, h) for d, y, (_, h) in zip(ds, ys, outs)])
        for r in range(2):
            assert_close(outs[r], reference_moe(xs[r], ls[r], EXPERTS, CFG), 1e-5)
        launched = {name for name, _ in grids}
        assert len(launched) == 2 and all(n.startswith("ht" if cls is SymmHighThroughputDispatcher else "ll")
                                          for n in launched), grids
        for name, grid in grids:
            programs = 1
            for g in grid:
                programs *= g
            assert programs <= sms, (name, grid)

    def test_unbounded_grids_take_a_program_per_unit():
        assert symm_dispatch.programs(7, 4, None) == (7, 4)
        assert symm_dispatch.programs(0, 1, None) == (1, 1)
        assert symm_dispatch.programs(7, 4, 10) == (2, 4)
        assert symm_dispatch.programs(7, 4, 3) == (1, 3)
        assert symm_dispatch.programs(1, 1, 24) == (1, 1)

    # ------------------------------------------------------------------- the layer's schedule, in threads
    def on_threads(fns):
        """Run fns[r]() for each simulated rank r in a thread of its own; (results, {rank: exception})."""
        results, errors = [None] * len(fns), {}

        def run(r):
            try:
                results[r] = fns[r]()
            except Exception as exc:
                errors[r] = exc
        threads = [threading.Thread(target=run, args=(r,)) for r in range(len(fns))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not any(t.is_alive() for t in threads), "a simulated rank hangs"
        return results, errors

    class _FailingOnce:
        def __init__(self, experts):
            self.experts, self.calls = experts, 0

        def __call__(self, batch):
            self.calls += 1
            if self.calls == 1:
                raise RuntimeError("experts failed on purpose")
            return self.experts(batch)

    def schedule(d, experts, x, logits, parts=2):
        return lambda: run_micro_batches(d, experts, x, route(logits, CFG), parts)

    def check_forward(ds, seed, tokens=(3, 2), parts=2):
        xs, ls = data(list(tokens), seed)
        outs, errors = on_threads([schedule(d, experts_of(d), x, v, parts) for d, x, v in zip(ds, xs, ls)])
        assert not errors, errors
        for r in range(2):
            assert_close(outs[r], reference_moe(xs[r], ls[r], EXPERTS, CFG), 1e-5)

    @pytest.mark.parametrize("parts", [1, 2])
    @pytest.mark.parametrize("cls,M", KINDS, ids=IDS)
    def test_the_layer_schedule_on_threaded_ranks_and_a_failure_in_one_micro_batch(cls, M, parts):
        ds = make(cls, M, threads=True)
        check_forward(ds, 10, parts=parts)
        # rank 0's experts raise in micro-batch A (the only one with parts=1): it raises; rank 1's tokens of
        # that micro-batch routed to rank 0 come out NaN
        xs, ls = data([4, 4], 11)
        outs, errors = on_threads([schedule(ds[0], _FailingOnce(experts_of(ds[0])), xs[0], ls[0], parts),
                                   schedule(ds[1], experts_of(ds[1]), xs[1], ls[1], parts)])
        assert list(errors) == [0] and "on purpose" in str(errors[0]), errors
        owner = route(ls[1], CFG).topk_ids.long() // (CFG.num_experts // 2)
        in_a = 4 // parts
        lost = torch.zeros(4, dtype=torch.bool)
        lost[:in_a] = (owner[:in_a] == 0).any(1)
        assert lost.any()
        assert torch.isnan(outs[1][lost]).all() and not torch.isnan(outs[1][~lost]).any()
        assert_close(outs[1][~lost], reference_moe(xs[1], ls[1], EXPERTS, CFG)[~lost], 1e-5)
        check_forward(ds, 12, (2, 4), parts)
        # rank 0's input was refused: it takes part once a micro-batch, flagged; rank 1 raises too
        xs, ls = data([3, 3], 13)
        _, errors = on_threads([lambda: [ds[0].abort() for _ in range(parts)],
                                schedule(ds[1], experts_of(ds[1]), xs[1], ls[1], parts)])
        assert list(errors) == [1] and isinstance(errors[1], RankMismatch), errors
        check_forward(ds, 14, parts=parts)
        check_forward(ds, 15, (0, 1), parts)
