"""A rank on a GPU-initiated (symmetric-memory) dispatcher paired with a rank on a dispatcher that uses
collectives, in the same step: both raise `RankMismatch` naming the dispatchers, without waiting out a
timeout, and the next aligned forwards are correct.

How it works (see `CommDispatcher.exchange_headers` and `SymmDispatcher.join_collective_peer`): a collective
dispatcher whose process also has the group's symmetric workspace writes "entered a collective forward #n"
into every peer's control block before its header exchange; the symmetric-memory wait for forward #n stops
on it (COLLECTIVE_PEER), and that rank joins the header exchange with its own header, so both see the
same rows and raise the same error; the collective rank then advances its workspace state as the symm
forward did (`SymmWorkspace.skip_forward`).

Simulated here in one process: the symm rank runs its kernels under the Triton interpreter on simulated
workspaces; the collective rank is the real dispatcher class with a fake two-rank group whose
`all_to_all` runs the other rank until it has sent its row (each rank's exchange is real code, only the
transport is played). What a GPU run adds (NCCL, timing across processes, the allocation rendezvous) is
in benchmarks/gpu_mismatch_check.py.
"""
import threading

import pytest
import torch

from epmoe.testing.interpreter import INTERPRETING, interpreted_file

pytestmark, test_under_the_interpreter = interpreted_file(__file__)

if INTERPRETING:
    import torch.distributed as dist

    from epmoe import MoEConfig, Placement, RankMismatch, reference_moe
    from epmoe.contract import build_plan, dispatcher_class
    from epmoe.dispatch._symm import run_steps
    from epmoe.dispatch.micro_batches import run_micro_batches
    from epmoe.dispatch.symm_high_throughput import SymmHighThroughputDispatcher
    from epmoe.dispatch.symm_low_latency import SymmLowLatencyDispatcher
    from epmoe.experts.reference import ReferenceExperts
    from epmoe.routing import route
    from epmoe.testing import assert_close, random_experts

    from test_symm_overlap import on_threads
    from test_symm_simulated import lockstep, rank_weights, simulated, simulated_group, slot_bytes

    CFG = MoEConfig(num_experts=6, top_k=2, hidden_size=16, intermediate_size=8, dtype=torch.float32)
    M = 4
    FAKE_GROUP = object()

    class Wire:
        """The transport of the fake group: each rank's last sent row, by rank."""
        def __init__(self):
            self.sent = {}

    class FakeComm:
        """`all_to_all` of a two-rank group played in one thread: deposit this rank's row, let `peer()`
        run the other rank until it has deposited its own (it may read first), then read."""
        def __init__(self, wire, rank, peer=None):
            self.wire, self.rank, self.peer, self.size = wire, rank, peer, 2

        def all_to_all(self, out, inp, *args, **kw):
            self.wire.sent[self.rank] = inp.clone()
            if len(self.wire.sent) < 2:
                assert self.peer is not None, "a rank joined a collective that no peer is in"
                self.peer()
            assert len(self.wire.sent) == 2, "the peer never took part in the exchange"
            for r in range(2):
                out.view(2, -1)[r] = self.wire.sent[r].view(2, -1)[self.rank]
            self.wire.done = self.wire.done | {self.rank} if hasattr(self.wire, "done") else {self.rank}
            if len(self.wire.done) == 2:
                self.wire.sent, self.wire.done = {}, set()
            return out

    def collective(name, rank, state, monkeypatch):
        """The real `name` dispatcher for rank `rank` of a fake two-rank group, holding that rank's group
        state (where its process's symmetric workspace is registered, as on a GPU)."""
        plan = build_plan(name, None, CFG, 2, "cpu", M if name == "low_latency" else None)
        with monkeypatch.context() as m:
            m.setattr(dist, "get_world_size", lambda group=None: 2)
            d = dispatcher_class(name)(plan, Placement(CFG.num_experts, 2, rank), FAKE_GROUP, torch.device("cpu"),
                                       state=state)
        d.layer_index = 2
        return d

    def symm_forward(d, x, routing):
        """One whole forward of a simulated symm rank (zeros for the experts' output), as steps."""
        batch, handle = yield from d.dispatch_steps(x, routing)
        return (yield from d.combine_steps(d.empty_expert_output(batch) if hasattr(d, "empty_expert_output")
                                           else torch.zeros(batch.x.shape), handle))

    def drain(gen, errors, r):
        try:
            run_steps(gen)
        except Exception as exc:  # noqa: BLE001 - recorded, checked by the caller
            errors[r] = exc

    def aligned_symm_forward_is_correct(ds, experts, seed):
        g = torch.Generator().manual_seed(seed)
        xs = [torch.randn(t, CFG.hidden_size, generator=g) for t in (3, 4)]
        ls = [torch.randn(t, CFG.num_experts, generator=g) * 2 for t in (3, 4)]
        routings = [route(v, CFG) for v in ls]
        outs = lockstep([d.dispatch_steps(x, ro) for d, x, ro in zip(ds, xs, routings)])
        ys = [ReferenceExperts(CFG)(b, rank_weights(CFG, experts, d.placement)) for d, (b, _) in zip(ds, outs)]
        got = lockstep([d.combine_steps(y, h) for d, y, (_, h) in zip(ds, ys, outs)])
        for r in range(2):
            assert_close(got[r], reference_moe(xs[r], ls[r], experts, CFG), 1e-5)

    def aligned_collective_headers(cs, wire, tokens=(3, 5)):
        """Both ranks run a collective forward's header exchange (markers written, then left behind)."""
        got = {}
        cs[1].comm = FakeComm(wire, 1)
        cs[0].comm = FakeComm(wire, 0, peer=lambda: got.__setitem__(1, cs[1].exchange_headers(tokens[1], "cpu")))
        got[0] = cs[0].exchange_headers(tokens[0], "cpu")
        assert got[0].tokens == got[1].tokens == list(tokens)

    def only_the_markers_changed(wss, before, forward):
        """Every rank's workspace differs from `before` only in the collective markers of slot 0, which now
        hold `forward` for both ranks."""
        for r, (ws, old) in enumerate(zip(wss, before)):
            region = ws.control.regions["collective"]
            changed = (ws.local != old).nonzero().reshape(-1)
            inside = (changed >= region.offset) & (changed < region.offset + region.nbytes)
            assert bool(inside.all()), f"rank {r}: marking a collective forward changed bytes {changed[~inside].tolist()}"
            assert ws.control_view(0, "collective").tolist() == [forward, forward], r

    SYMM = {"symm_high_throughput": SymmHighThroughputDispatcher, "symm_low_latency": SymmLowLatencyDispatcher}

    # every collective kind against both symm kinds, and each symm kind on either rank (the whole cross
    # product repeats the same code paths: each collective kind starts with the same `exchange_headers`)
    PAIRS = [("symm_high_throughput", "allgather", 0), ("symm_low_latency", "allgather", 1),
             ("symm_high_throughput", "alltoall", 1), ("symm_low_latency", "alltoall", 0),
             ("symm_high_throughput", "low_latency", 0), ("symm_low_latency", "low_latency", 1)]

    @pytest.mark.parametrize("symm,coll,symm_rank", PAIRS)
    def test_symm_rank_and_collective_rank_both_raise_then_recover(symm, coll, symm_rank, monkeypatch):
        cls = SYMM[symm]
        experts = random_experts(CFG, seed=1)
        wss, states = simulated_group(2, slot_bytes(cls, CFG, 2, M))
        ds = [simulated(cls, CFG, Placement(CFG.num_experts, 2, r), M, wss[r], states[r]) for r in range(2)]
        for d in ds:
            d.layer_index = 1
        cs = [collective(coll, r, states[r], monkeypatch) for r in range(2)]
        wire = Wire()
        # a normal collective forward first: its markers stay behind in the control block the symm forwards
        # use. They change nothing but the marker region, and the next aligned symm forward is right. (Here
        # every rank publishes before any waits, so no wait reads a marker; that a stale marker cannot stop
        # a waiting rank is test_a_stale_marker_of_an_earlier_forward_is_not_a_collective_peer's check.)
        before = [ws.local.clone() for ws in wss]
        aligned_collective_headers(cs, wire)
        only_the_markers_changed(wss, before, states[0].forwards)
        aligned_symm_forward_is_correct(ds, experts, seed=2)

        # the mismatched step: one rank on the symm layer, the other on the collective one
        c = 1 - symm_rank
        g = torch.Generator().manual_seed(3)
        x = torch.randn(3, CFG.hidden_size, generator=g)
        routing = route(torch.randn(3, CFG.num_experts, generator=g), CFG)
        errors = {}
        steps = symm_forward(ds[symm_rank], x, routing)
        if symm_rank == 0:      # the symm rank publishes (and the kernel would start waiting) before the marker
            next(steps)
        ds[symm_rank].comm = FakeComm(wire, symm_rank)
        cs[c].comm = FakeComm(wire, c, peer=lambda: drain(steps, errors, symm_rank))
        try:
            cs[c].dispatch(x, routing.topk_ids, routing.topk_weights)
        except RankMismatch as exc:
            errors[c] = exc
        assert set(errors) == {0, 1}, errors
        for r, exc in errors.items():
            assert isinstance(exc, RankMismatch), (r, exc)
            assert "dispatcher differs" in str(exc) and repr(symm) in str(exc) and repr(coll) in str(exc), str(exc)
        assert states[0].forwards == states[1].forwards

        # every rank's workspace state agrees again: aligned forwards on both slots, then a collective one
        for seed in (4, 5):
            aligned_symm_forward_is_correct(ds, experts, seed)
        aligned_collective_headers(cs, wire)

    def test_a_stale_marker_of_an_earlier_forward_is_not_a_collective_peer():
        """A peer that never comes is still a timeout, even with that peer's marker of an earlier
        collective forward in the control block (only the marker of this very forward counts)."""
        cls = SymmLowLatencyDispatcher
        wss, states = simulated_group(2, slot_bytes(cls, CFG, 2, M))
        d = simulated(cls, CFG, Placement(CFG.num_experts, 2, 0), M, wss[0], states[0])
        states[0].forwards = 7
        wss[1].mark_collective(7)                         # rank 1's collective forward #7, finished
        x = torch.randn(2, CFG.hidden_size)
        errors = {}
        drain(symm_forward(d, x, route(torch.randn(2, CFG.num_experts), CFG)), errors, 0)  # forward #8
        assert isinstance(errors.get(0), RuntimeError) and "timeout_s" in str(errors[0]), errors
        assert not isinstance(errors[0], RankMismatch)

    # ------------------------------------------------- two micro-batches on the symm rank, ranks in threads
    class ThreadedWire:
        """The transport of a fake two-rank group whose ranks run in threads: the n-th `all_to_all` of one
        rank pairs with the n-th of the other, which it waits for at most `timeout_s` (a process group's
        timeout, played short: a rank left waiting there is the hang this guards against)."""
        def __init__(self, timeout_s=10.0):
            self.rows, self.cond, self.timeout_s = {0: [], 1: []}, threading.Condition(), timeout_s

    class ThreadedComm:
        def __init__(self, wire, rank):
            self.wire, self.rank, self.size = wire, rank, 2

        def all_to_all(self, out, inp, *args, **kw):
            w, me = self.wire, self.rank
            with w.cond:
                i = len(w.rows[me])
                w.rows[me].append(inp.clone())
                w.cond.notify_all()
                if not w.cond.wait_for(lambda: len(w.rows[1 - me]) > i, timeout=w.timeout_s):
                    raise TimeoutError(f"rank {me} waited in vain for its peer in exchange #{i}")
                for r in range(2):
                    out.view(2, -1)[r] = w.rows[r][i].view(2, -1)[me]
            return out

    def one_kernel_at_a_time(monkeypatch):
        """The Triton interpreter is not thread-safe: kernel launches of the two threads take turns."""
        from triton.runtime.interpreter import InterpretedFunction
        lock, run = threading.Lock(), InterpretedFunction.run

        def locked(self, *args, **kw):
            with lock:
                return run(self, *args, **kw)
        monkeypatch.setattr(InterpretedFunction, "run", locked)

    # (symm kind, collective kind, the symm rank, micro-batches of the collective rank: with one, its next
    # layer's forward is the one the symm rank's second micro-batch meets)
    MICRO = [("symm_low_latency", "alltoall", 0, 2), ("symm_high_throughput", "allgather", 1, 2),
             ("symm_low_latency", "low_latency", 1, 1), ("symm_high_throughput", "alltoall", 0, 1)]

    @pytest.mark.parametrize("symm,coll,symm_rank,coll_parts", MICRO)
    def test_two_micro_batches_against_a_collective_peer_raise_on_both_then_recover(symm, coll, symm_rank,
                                                                                    coll_parts, monkeypatch):
        """The symm rank runs its layer in two micro-batches (forwards #n, #n+1), the collective rank a
        collective layer at #n (and #n+1: its second micro-batch, or its next layer). Micro-batch B's kernels
        stop on A's status bit without looking for a marker of #n+1, yet the collective rank's exchange of
        #n+1 waits for a peer: B joins it, so every rank raises `RankMismatch` in every exchange, none is
        left waiting, and the next aligned forwards of either kind are right."""
        one_kernel_at_a_time(monkeypatch)
        cls = SYMM[symm]
        experts = random_experts(CFG, seed=1)
        wss, states = simulated_group(2, slot_bytes(cls, CFG, 2, M))
        ds = [simulated(cls, CFG, Placement(CFG.num_experts, 2, r), M, wss[r], states[r]) for r in range(2)]
        for d in ds:
            d.layer_index, d.timeout_s = 1, 20.0
        cs = [collective(coll, r, states[r], monkeypatch) for r in range(2)]
        c = 1 - symm_rank
        g = torch.Generator().manual_seed(3)
        xs = [torch.randn(4, CFG.hidden_size, generator=g) for _ in range(2)]
        routings = [route(torch.randn(4, CFG.num_experts, generator=g), CFG) for _ in range(2)]
        wire = ThreadedWire()
        ds[symm_rank].comm, cs[c].comm = ThreadedComm(wire, symm_rank), ThreadedComm(wire, c)
        entered = threading.Event()

        def symm_side():
            entered.wait(30)          # the collective rank's marker of #n is written: the symm wait sees it
            d = ds[symm_rank]
            zeros = (lambda b: d.empty_expert_output(b)) if hasattr(d, "empty_expert_output") else \
                (lambda b: torch.zeros(b.x.shape))
            run_micro_batches(d, zeros, xs[symm_rank], routings[symm_rank], 2)

        def collective_side():
            errors = []
            mark = wss[c].mark_collective

            def marked(forward):
                mark(forward)
                entered.set()
            wss[c].mark_collective = marked
            for _ in range(2 // coll_parts):           # one forward of two micro-batches, or two of one
                try:
                    run_micro_batches(cs[c], lambda b: torch.zeros(b.x.shape), xs[c], routings[c], coll_parts)
                except RankMismatch as exc:
                    errors.append(exc)
            del wss[c].mark_collective
            assert len(errors) == 2 // coll_parts, errors
            raise errors[0]

        _, errors = on_threads([{symm_rank: symm_side, c: collective_side}[r] for r in range(2)])
        assert set(errors) == {0, 1}, errors
        for r, exc in errors.items():
            assert isinstance(exc, RankMismatch), (r, exc)
            assert "dispatcher differs" in str(exc) and repr(symm) in str(exc) and repr(coll) in str(exc), str(exc)
        assert len(wire.rows[0]) == len(wire.rows[1]) == 2     # both exchanges, each with both ranks
        assert states[0].forwards == states[1].forwards
        for seed in (4, 5):                                    # both slots, then a collective forward
            aligned_symm_forward_is_correct(ds, experts, seed)
        aligned_collective_headers(cs, Wire())
