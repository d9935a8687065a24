"""After a forward that failed, the next aligned forward on the same symmetric-memory dispatchers and the
same workspaces equals the oracle on every rank (simulated ranks, Triton interpreter, float32), for
`symm_high_throughput` bounded and unbounded and `symm_low_latency`, with one micro-batch and two:

- a timeout of a live peer (it skipped the forward, or came after its peer gave the forward up, or
  stalled between two phases): the ranks' slots and epochs may differ afterwards, so the rank that timed
  out refuses forwards, a peer that comes late raises at once on the failed header that rank left (not a
  wrong result, not a second timeout) and refuses its next forward too, and after `resync()` on every rank
  the next forward is right; a CUDA graph captured before (its Triton launches, replayed) sends nothing
  while a rank waits for `resync()`, and replays right after it; a combine collected after `resync()`
  still raises its error;
- two forwards in flight (micro-batches; async combines): the status word is one per workspace, so when
  one forward's collection reads an error, the other still raises it when collected, before or after
  `resync()`, whether its combine was issued before that read or after it;
- errors every rank sees in the same forward (ranks on different layers, an overflow): nothing to do,
  the next aligned forward is right as it is. (An exception inside one rank's experts and a refused input,
  through the layer's schedule on ranks in threads, are `tests/test_symm_overlap.py`'s.)
"""
import pytest
import torch

from epmoe.testing.interpreter import INTERPRETING, interpreted_file

pytestmark, test_under_the_interpreter = interpreted_file(__file__)

if INTERPRETING:
    from epmoe import MoEConfig, Placement, RankMismatch, reference_moe
    from epmoe.dispatch.symm_high_throughput import SymmHighThroughputDispatcher
    from epmoe.dispatch.symm_low_latency import SymmLowLatencyDispatcher
    from epmoe.experts.reference import ReferenceExperts
    from epmoe.routing import route
    from epmoe.testing import assert_close, random_experts

    from test_symm_simulated import lockstep, rank_weights, simulated, simulated_group, slot_bytes

    CFG = MoEConfig(num_experts=6, top_k=2, hidden_size=16, intermediate_size=8, dtype=torch.float32)
    EXPERTS = random_experts(CFG, seed=17)
    M = 4
    # (dispatcher, max_tokens_per_rank): the high-throughput one bounded and not, the low-latency one
    KINDS = [(SymmHighThroughputDispatcher, M), (SymmHighThroughputDispatcher, None), (SymmLowLatencyDispatcher, M)]
    IDS = ["ht-bounded", "ht-unbounded", "ll"]

    def make(cls, capacity, cfg=CFG, group=None):
        """One dispatcher per simulated rank, on `group` or a fresh one (room for M tokens a rank)."""
        group = group or simulated_group(2, max(slot_bytes(c, cfg, 2, M)
                                                for c in (SymmHighThroughputDispatcher, SymmLowLatencyDispatcher)))
        wss, states = group
        return [simulated(cls, cfg, Placement(cfg.num_experts, 2, r), capacity, wss[r], states[r]) for r in range(2)]

    def data(tokens, seed, cfg=CFG):
        g = torch.Generator().manual_seed(seed)
        return ([torch.randn(t, cfg.hidden_size, generator=g) for t in tokens],
                [torch.randn(t, cfg.num_experts, generator=g) * 2 for t in tokens])

    def experts_out(ds, got):
        return [ReferenceExperts(CFG)(b, rank_weights(CFG, EXPERTS, d.placement)) for d, (b, _) in zip(ds, got)]

    def aligned(ds, seed, micro_batches=1, tokens=(3, 4)):
        """An aligned forward of every rank in `micro_batches` micro-batches (both dispatched before either
        is combined, as the layer's schedule does), checked against the oracle on every rank."""
        xs, ls = data(tokens, seed)
        parts = [(0, 2), (2, None)] if micro_batches == 2 else [(0, None)]
        got = [lockstep([d.dispatch_steps(x[a:b], route(v[a:b], CFG)) for d, x, v in zip(ds, xs, ls)])
               for a, b in parts]
        outs = [lockstep([d.combine_steps(y, h) for d, y, (_, h) in zip(ds, experts_out(ds, g), g)]) for g in got]
        for r in range(2):
            assert_close(torch.cat([o[r] for o in outs]), reference_moe(xs[r], ls[r], EXPERTS, CFG), 1e-5)

    def alone(d, seed):
        """A whole forward of one rank while its peer is elsewhere (zeros for the experts' output): its
        error, or None."""
        xs, ls = data([3], seed)
        errors = {}
        got = lockstep([d.dispatch_steps(xs[0], route(ls[0], CFG))], errors)
        if not errors:
            b, h = got[0]
            lockstep([d.combine_steps(torch.zeros(b.x.shape), h)], errors)
        return errors.get(0)

    def timed_out(exc):
        return isinstance(exc, RuntimeError) and "timeout_s" in str(exc) and "resync()" in str(exc)

    def resync(ds):
        lockstep([d.resync_steps() for d in ds])

    @pytest.mark.parametrize("micro_batches", [1, 2])
    @pytest.mark.parametrize("cls,capacity", KINDS, ids=IDS)
    def test_a_peer_that_skipped_a_forward(cls, capacity, micro_batches):
        """Rank 0 runs a forward rank 1 never enters: a timeout there, and rank 0 is one slot and epoch
        ahead. Rank 0 refuses its next forward until resync(); after it, aligned forwards are right."""
        ds = make(cls, capacity)
        aligned(ds, 1, micro_batches)
        error = alone(ds[0], 2)
        assert timed_out(error), error
        wss = [d.workspace for d in ds]
        assert wss[0].epochs[0] != wss[1].epochs[0]        # out of step: what resync() is for
        with pytest.raises(RuntimeError, match=r"resync\(\) on every rank"):
            lockstep([ds[0].dispatch_steps(*_one(3))])
        reached = [d.state.forwards for d in ds]
        assert reached[0] > reached[1]                     # rank 0 numbered the forward rank 1 skipped
        resync(ds)
        assert all(ws.epochs.tolist() == [0, 0, 0] and not ws.status.item() for ws in wss)
        # every rank continues from the largest number reached: none is used twice
        assert ds[0].state.forwards == ds[1].state.forwards == max(reached)
        for seed in (3, 4):                                  # both slots
            aligned(ds, seed, micro_batches)

    def _one(tokens, seed=5):
        xs, ls = data([tokens], seed)
        return xs[0], route(ls[0], CFG)

    @pytest.mark.parametrize("cls,capacity", KINDS, ids=IDS)
    def test_a_peer_that_comes_late(cls, capacity):
        """Rank 0 gives the forward up on a timeout; rank 1 enters it afterwards. Rank 1 must not take
        rank 0's published rows of the abandoned forward for a complete one: it raises at once, saying
        that every rank must call resync() now (before, a bounded forward completed there from stale rows),
        and refuses its next forward until then (rank 0 does: waiting for it would only time out). After
        resync(), right."""
        ds = make(cls, capacity)
        aligned(ds, 6)
        first, late = alone(ds[0], 7), alone(ds[1], 7)
        assert timed_out(first), first
        assert isinstance(late, RankMismatch) and "gave this forward up on a timeout" in str(late), late
        assert "Every rank must call resync() now" in str(late), late
        for d in ds:
            with pytest.raises(RuntimeError, match=r"resync\(\) on every rank"):
                lockstep([d.dispatch_steps(*_one(3))])
        resync(ds)
        for seed in (8, 9):
            aligned(ds, seed)

    @pytest.mark.parametrize("cls,capacity", KINDS, ids=IDS)
    def test_a_peer_that_stalls_before_the_combine(cls, capacity):
        """Both ranks dispatch; rank 0 combines and times out waiting for rank 1, which combines after:
        rank 1 raises at once on the failed header of rank 0's combine phase (unbounded: both at the next
        forward's read); resync(), then right."""
        ds = make(cls, capacity)
        xs, ls = data([3, 2], 10)
        got = lockstep([d.dispatch_steps(x, route(v, CFG)) for d, x, v in zip(ds, xs, ls)])
        ys = experts_out(ds, got)
        errors = [{}, {}]
        outs = [lockstep([ds[r].combine_steps(ys[r], got[r][1])], errors[r])[0] for r in range(2)]
        if capacity is None:
            # no host read at the end of an unbounded combine: both outputs are NaN, and the next forward's
            # one read raises on every rank (the status bits stay until read)
            assert not errors[0] and not errors[1] and all(torch.isnan(o).all() for o in outs), errors
            xs, ls = data([2, 2], 21)
            for r in range(2):
                lockstep([ds[r].dispatch_steps(xs[r], route(ls[r], CFG))], errors[r])
        assert timed_out(errors[0].get(0)), errors
        assert isinstance(errors[1].get(0), RankMismatch) and "resync()" in str(errors[1][0]), errors
        resync(ds)
        aligned(ds, 11)

    def test_an_unbounded_combine_timeout_is_still_raised_after_resync():
        """Unbounded, a timeout in the combine phase is left in the status word for the next forward's read;
        a resync() before that keeps it, and check() raises it on each rank (told as from before resync())."""
        ds = make(SymmHighThroughputDispatcher, None)
        xs, ls = data([3, 2], 50)
        got = lockstep([d.dispatch_steps(x, route(v, CFG)) for d, x, v in zip(ds, xs, ls)])
        ys = experts_out(ds, got)
        outs = [lockstep([ds[r].combine_steps(ys[r], got[r][1])])[0] for r in range(2)]    # one after the other
        assert all(torch.isnan(o).all() for o in outs)
        resync(ds)
        for d, kind in zip(ds, (RuntimeError, RankMismatch)):      # rank 0 timed out, rank 1 read it gave up
            with pytest.raises(kind, match=r"issued before resync\(\)"):
                d.check()
        aligned(ds, 51)

    @pytest.mark.parametrize("cls,capacity", KINDS, ids=IDS)
    def test_resync_on_ranks_in_threads_and_a_handle_from_before(cls, capacity):
        """The public resync() (ranks in threads, meeting at each stop) resets the workspaces; a forward
        dispatched before it cannot be combined after it."""
        import threading

        from epmoe.dispatch.symm_workspace import SymmWorkspace
        from epmoe.group import GroupState
        states = [GroupState() for _ in range(2)]
        wss = SymmWorkspace.simulated(2, slot_bytes(cls, CFG, 2, M), states=states, threads=True)
        ds = make(cls, capacity, group=(wss, states))
        xs, ls = data([2, 3], 12)
        got = [None, None]

        def on_threads(fn):
            threads = [threading.Thread(target=fn, args=(r,)) for r in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=300)
            assert not any(t.is_alive() for t in threads)

        on_threads(lambda r: got.__setitem__(r, ds[r].dispatch(xs[r], route(ls[r], CFG))))
        on_threads(lambda r: ds[r].resync())
        assert all(ws.generation == 1 and ws.epochs.tolist() == [0, 0, 0] for ws in wss)
        for d, (b, h) in zip(ds, got):
            with pytest.raises(RuntimeError, match="before resync"):
                d.combine(torch.zeros(b.x.shape), h)
        outs = [None, None]
        xs, ls = data([3, 1], 13)

        def forward(r):
            b, h = ds[r].dispatch(xs[r], route(ls[r], CFG))
            outs[r] = ds[r].combine(ReferenceExperts(CFG)(b, rank_weights(CFG, EXPERTS, ds[r].placement)), h)
        on_threads(forward)
        for r in range(2):
            assert_close(outs[r], reference_moe(xs[r], ls[r], EXPERTS, CFG), 1e-5)

    @pytest.mark.parametrize("micro_batches", [1, 2])
    @pytest.mark.parametrize("cls,capacity", KINDS, ids=IDS)
    def test_ranks_on_different_layers_then_aligned(cls, capacity, micro_batches):
        """A RankMismatch (rank 0 on one layer, rank 1 on another of the same group): every rank raises in
        that forward and stays in step; the next aligned forwards of either layer are right, no resync."""
        cfg_b = MoEConfig(num_experts=6, top_k=2, hidden_size=24, intermediate_size=8, dtype=torch.float32)
        group = simulated_group(2, max(slot_bytes(cls, c, 2, M) for c in (CFG, cfg_b)))
        a, b = make(cls, capacity, group=group), make(cls, capacity, cfg=cfg_b, group=group)
        for d in b:
            d.layer_index = 1
        xa, la = data([3, 3], 14)
        xb, lb = data([3, 3], 15, cfg_b)
        calls = [(a[0], xa[0], route(la[0], CFG)), (b[1], xb[1], route(lb[1], cfg_b))]
        errors = {}
        outs = lockstep([d.dispatch_steps(x, r) for d, x, r in calls], errors)
        if not errors:
            lockstep([d.combine_steps(torch.zeros(bt.x.shape), h) for (d, _, _), (bt, h) in zip(calls, outs)], errors)
        assert set(errors) == {0, 1} and all(isinstance(e, RankMismatch) for e in errors.values()), errors
        for seed in (16, 17):
            aligned(a, seed, micro_batches)

    @pytest.mark.parametrize("micro_batches", [1, 2])
    @pytest.mark.parametrize("cls,capacity", KINDS, ids=IDS)
    def test_an_overflow_then_aligned(cls, capacity, micro_batches):
        """Rank 0 passes more tokens than the capacity (bounded) or than the workspace holds (unbounded):
        every rank raises in that forward; the next aligned forwards are right, no resync."""
        ds = make(cls, capacity)
        # more than the capacity, or than the rows the workspace holds (a rank sends each token somewhere)
        big = M + 2 if capacity is not None else ds[0].layout.regions["rx"].shape[0] + 1
        xs, ls = data([big, 2], 18)
        errors = {}
        outs = lockstep([d.dispatch_steps(x, route(v, CFG)) for d, x, v in zip(ds, xs, ls)], errors)
        if not errors:
            lockstep([d.combine_steps(torch.zeros(b.x.shape), h) for d, (b, h) in zip(ds, outs)], errors)
        assert set(errors) == {0, 1} and all(isinstance(e, ValueError) for e in errors.values()), errors
        for seed in (19, 20):
            aligned(ds, seed, micro_batches)

    BOUNDED = [k for k in KINDS if k[1] is not None]
    BOUNDED_IDS = [i for k, i in zip(KINDS, IDS) if k[1] is not None]

    @pytest.mark.parametrize("collect", ["wait", "check"])
    @pytest.mark.parametrize("cls,capacity", BOUNDED, ids=BOUNDED_IDS)
    def test_a_combine_collected_after_resync_still_raises(cls, capacity, collect):
        """Both ranks dispatch; rank 0 issues its combine async (its status read put off until the wait)
        and times out there, rank 1 never combines; every rank calls resync() before rank 0 collects. The
        reset must not swallow the timeout: waiting for the combine raises it, told as a forward from before
        resync(), even after an aligned forward in between, and so does check() first where it is called
        first (the combine still raises when waited for: its output is NaN); nothing more to do."""
        ds = make(cls, capacity)
        xs, ls = data([3, 2], 30)
        got = lockstep([d.dispatch_steps(x, route(v, CFG)) for d, x, v in zip(ds, xs, ls)])
        ys = experts_out(ds, got)
        pending = ds[0].combine_async(ys[0], got[0][1])      # alone: its wait times out
        resync(ds)
        aligned(ds, 31)                                      # a later forward's status is its own
        if collect == "check":
            with pytest.raises(RuntimeError, match=r"issued before resync\(\).*timeout_s"):
                ds[0].check()
        with pytest.raises(RuntimeError, match=r"issued before resync\(\).*timeout_s"):
            pending.wait()
        assert torch.isnan(pending.wait()).all()              # reported once, the output stays NaN
        ds[0].check()
        assert not any(d.workspace.needs_reset for d in ds)
        aligned(ds, 32)

    def micro_batches(ds, xs, ls, split):
        """Both micro-batches dispatched on every rank (tokens [:split] and [split:]), neither combined:
        [[(batch, handle) per rank] per micro-batch]."""
        return [lockstep([d.dispatch_steps(x[a:b], route(v[a:b], CFG)) for d, x, v in zip(ds, xs, ls)])
                for a, b in ((0, split), (split, None))]

    @pytest.mark.parametrize("resync_first", [False, True], ids=["waited", "waited-after-resync"])
    @pytest.mark.parametrize("cls,capacity", BOUNDED, ids=BOUNDED_IDS)
    def test_two_combines_in_flight_both_raise(cls, capacity, resync_first):
        """Rank 0 issues the combines of two micro-batches async (each status read put off until it is
        waited for) and times out in the first (rank 1 never combines); the second's kernels stop on that,
        its output is NaN. Waiting for the first raises and clears the status word; waiting for the second
        must raise too (before, it read a clear word and returned NaN), also where resync() ran before
        either was waited for (before, the first took what the reset kept)."""
        ds = make(cls, capacity)
        xs, ls = data([4, 3], 60)
        got = micro_batches(ds, xs, ls, 2)
        pendings = [ds[0].combine_async(experts_out(ds, g)[0], g[0][1]) for g in got]
        if resync_first:
            resync(ds)
            aligned(ds, 61)
        first, second = ((r"issued before resync\(\).*timeout_s",) * 2 if resync_first else
                         (r"did not signal within timeout_s", r"in flight beside it.*timeout_s"))
        with pytest.raises(RuntimeError, match=first):
            pendings[0].wait()
        with pytest.raises(RuntimeError, match=second):
            pendings[1].wait()
        assert all(torch.isnan(p.wait()).all() for p in pendings)      # each reported once
        ds[0].check()
        if not resync_first:
            resync(ds)
        aligned(ds, 62, micro_batches=2)

    @pytest.mark.parametrize("cls,capacity", BOUNDED, ids=BOUNDED_IDS)
    def test_a_combine_issued_after_another_read_the_error_still_raises(cls, capacity):
        """Two micro-batches in flight; rank 0 passes more tokens than the capacity in the second, which the
        GPU flags on every rank in that dispatch (nothing is read back there). Combining the first reads the
        status word, clears it and raises; the second's combine, issued only then, runs on a clear word:
        before, it returned a wrong result on rank 1 (zeros, or rows an earlier forward left) without
        raising. Now every rank raises for both, and the next aligned forwards are right as they are."""
        ds = make(cls, capacity)
        xs, ls = data([2 + M + 1, 4], 70)
        for g in micro_batches(ds, xs, ls, 2):
            errors = {}
            lockstep([d.combine_steps(y, h) for d, y, (_, h) in zip(ds, experts_out(ds, g), g)], errors)
            assert set(errors) == {0, 1} and all(isinstance(e, ValueError) for e in errors.values()), errors
        aligned(ds, 71)
        aligned(ds, 72, micro_batches=2)

    class Graph:
        """A forward of one simulated rank recorded as its Triton launches, replayed as a CUDA graph is: the
        same kernels with the same arguments (the same tensors, the header with its forward number and the
        slot baked in), nothing on the host in between -- no refusal, no status read. A replay stops after
        each exchange has published (as the dispatchers' step generators do), for `lockstep`."""

        current = None          # the Graph recording the launches of the rank being stepped

        def __init__(self):
            self.launches = []

        @staticmethod
        def patch(monkeypatch):
            from triton.runtime.interpreter import InterpretedFunction
            run = InterpretedFunction.run

            def recording_run(fn, *args, grid, warmup, **kwargs):
                if Graph.current is not None and not warmup:
                    Graph.current.launches.append((fn, args, grid, kwargs))
                return run(fn, *args, grid=grid, warmup=warmup, **kwargs)
            monkeypatch.setattr(InterpretedFunction, "run", recording_run)
            Graph.run = staticmethod(run)

        def record(self, steps):
            """`steps` (a step generator), its launches recorded."""
            while True:
                Graph.current = self
                try:
                    next(steps)
                except StopIteration as stop:
                    return stop.value
                finally:
                    Graph.current = None
                yield

        def replay(self):
            from epmoe.kernels.symm_dispatch import exchange_flags_kernel
            for fn, args, grid, kwargs in self.launches:
                Graph.run(fn, *args, grid=grid, warmup=False, **kwargs)
                if fn is exchange_flags_kernel and kwargs["PUBLISH"] and not kwargs["WAIT"]:
                    yield

    def captured(ds, seed):
        """Every rank's forward recorded as a `Graph` (checked against the oracle), its outputs (a replay
        writes them again, in place) and the oracle's."""
        xs, ls = data([3, 4], seed)
        graphs = [Graph(), Graph()]
        got = lockstep([g.record(d.dispatch_steps(x, route(v, CFG))) for g, d, x, v in zip(graphs, ds, xs, ls)])
        ys = experts_out(ds, got)
        outs = lockstep([g.record(d.combine_steps(y, h)) for g, d, y, (_, h) in zip(graphs, ds, ys, got)])
        refs = [reference_moe(xs[r], ls[r], EXPERTS, CFG) for r in range(2)]
        for r in range(2):
            assert_close(outs[r], refs[r], 1e-5)
        return graphs, outs, refs

    def rows_from(d, sender: int, slot: int) -> int:
        """Rows stored into `d`'s receive region of `slot` since `clear_rows`: low latency, those of `sender`
        (each row's origin is beside it); high throughput, of any rank (a stored row carries its routing;
        none may land in these tests: every rank's count exchange fails before its rows move)."""
        if isinstance(d, SymmLowLatencyDispatcher):
            meta = d._regions(d.workspace, slot).meta_LC
            return int(((meta >= 0) & (meta // (M * CFG.top_k) == sender)).sum())
        rids = d._regions(d.workspace, slot).rids_RK
        return int((rids >= 0).any(dim=1).sum())

    def clear_rows(d, slot: int) -> None:
        if isinstance(d, SymmLowLatencyDispatcher):
            d._regions(d.workspace, slot).meta_LC.fill_(-1)
        else:
            d._regions(d.workspace, slot).rids_RK.fill_(-7)

    @pytest.mark.parametrize("peer", ["late", "skipped"])
    @pytest.mark.parametrize("cls,capacity", BOUNDED, ids=BOUNDED_IDS)
    def test_a_graph_replayed_while_a_resync_is_pending_sends_nothing(cls, capacity, peer, monkeypatch):
        """A CUDA graph captured before a timeout replays without the host seeing it. On a rank that waits
        for resync() its kernels refuse by themselves (the status word's RESET_PENDING): no row and no
        counter claim reaches the peer, the header goes out failed, the output is NaN and check() says why;
        a peer that came late (also waiting for resync()) does the same instead of pairing with it on stale
        state, and a peer that skipped the timed-out forward gets NaN and an error, never rank 0's rows.
        After resync() the same graph replays right."""
        Graph.patch(monkeypatch)
        ds = make(cls, capacity)
        graphs, outs, refs = captured(ds, 40)                 # in slot 0
        lockstep([g.replay() for g in graphs])                 # a replay in step is right (the harness)
        for r in range(2):
            assert_close(outs[r], refs[r], 1e-5)
        assert timed_out(alone(ds[0], 41))                     # in slot 1
        if peer == "late":
            assert isinstance(alone(ds[1], 41), RankMismatch)
        for d in ds:
            clear_rows(d, 0)
        lockstep([g.replay() for g in graphs])
        assert rows_from(ds[1], 0, 0) == 0 and (peer == "skipped" or rows_from(ds[0], 1, 0) == 0)
        assert all(torch.isnan(o).all() for o in outs)
        with pytest.raises(RuntimeError, match=r"waited for resync\(\).*sent nothing"):
            ds[0].check()
        with pytest.raises(RuntimeError):
            ds[1].check()
        resync(ds)
        lockstep([g.replay() for g in graphs])
        for r in range(2):
            assert_close(outs[r], refs[r], 1e-5)
        aligned(ds, 42)

    @pytest.mark.parametrize("cls,capacity", BOUNDED, ids=BOUNDED_IDS)
    def test_an_eager_combine_issued_after_a_give_up_is_refused_and_says_so(cls, capacity):
        """Both ranks dispatch; rank 0 then gives another forward up on a timeout and only afterwards issues
        the first forward's combine: its kernels send nothing (REFUSED), and the error says that an eager
        combine was issued while the rank waited for resync(), not only graph replays."""
        ds = make(cls, capacity)
        xs, ls = data([3, 2], 80)
        got = lockstep([d.dispatch_steps(x, route(v, CFG)) for d, x, v in zip(ds, xs, ls)])
        assert timed_out(alone(ds[0], 81))
        (b, h) = got[0]
        with pytest.raises(RuntimeError, match=r"waited for resync\(\).*an eager combine issued since.*sent nothing"):
            lockstep([ds[0].combine_steps(experts_out(ds[:1], got[:1])[0], h)])
