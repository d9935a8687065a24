"""The GPU-initiated dispatchers' kernels and bookkeeping, on simulated ranks in one process.

Each simulated rank has its own plain buffer; the kernels (Triton interpreter, float32) store into the
others' buffers through the same byte distances as on GPUs. The dispatchers' step generators stop at
every wait, so the ranks advance in lockstep. Checked against `reference_moe` and against an independent
computation of what each rank must receive.
"""
import pytest
import torch

from epmoe.testing.interpreter import INTERPRETING, interpreted_file

pytestmark, test_under_the_interpreter = interpreted_file(__file__)

if INTERPRETING:
    from epmoe import ExpertMap, MoEConfig, Placement, reference_moe
    from epmoe.contract import build_plan
    from epmoe.dispatch._symm import SymmHandle
    from epmoe.dispatch.symm_high_throughput import SymmHighThroughputDispatcher
    from epmoe.dispatch.symm_low_latency import SymmLowLatencyDispatcher
    from epmoe.dispatch.symm_workspace import SymmWorkspace
    from epmoe.group import GroupState
    from epmoe.experts.reference import ReferenceExperts
    from epmoe.layouts import ExpertWeights
    from epmoe.routing import Routing, route
    from epmoe.testing import assert_close, random_experts

    def lockstep(gens, errors=None):
        """Advance every rank's step generator to its next wait in turn; return their results. With
        `errors` (a dict), a rank's exception is recorded there instead of raised."""
        results = [None] * len(gens)
        live = set(range(len(gens)))
        while live:
            for r in sorted(live):
                try:
                    next(gens[r])
                except StopIteration as stop:
                    results[r] = stop.value
                    live.discard(r)
                except Exception as exc:
                    if errors is None:
                        raise
                    errors[r] = exc
                    live.discard(r)
        return results


    def simulated(cls, cfg, placement, M, ws, state):
        """One simulated rank's dispatcher: its plan resolved for CUDA without checking this machine (the
        kernels run under the interpreter on CPU tensors), on that rank's workspace and group state."""
        return cls(build_plan(cls.name, None, cfg, placement.ep_size, "cuda", M, check_device=False), placement,
                   state=state, workspace=ws)

    def simulated_group(ep, slot_bytes):
        """(workspace, group state) per simulated rank: what the layers of one group share."""
        states = [GroupState() for _ in range(ep)]
        return SymmWorkspace.simulated(ep, slot_bytes, states=states), states

    def rank_weights(cfg, experts, placement):
        H, I = cfg.hidden_size, cfg.intermediate_size
        local = placement.local_experts
        w13 = torch.stack([torch.cat([experts[e][0], experts[e][1]]) for e in local]).to(cfg.dtype)
        w2 = torch.stack([experts[e][2] for e in local]).to(cfg.dtype)
        assert w13.shape == (len(local), 2 * I, H)
        return ExpertWeights(w13, w2)


    def slot_bytes(cls, cfg, ep, M, redundant_experts=0):
        return SymmWorkspace.size_hint(cfg, ep, M, dispatchers=(cls.name,), redundant_experts=redundant_experts)

    def make(cls, cfg, ep, M, group=None, tokens=None, placements=None):
        """One dispatcher per simulated rank on `group` ((workspaces, states) shared by several layers) or
        fresh ones, sized for `tokens` per rank (default M); `placements` (one per rank, of the physical
        slots) or the contiguous ones of the experts."""
        placements = placements or [Placement(cfg.num_experts, ep, r) for r in range(ep)]
        if group is None:
            redundant = placements[0].num_experts - cfg.num_experts
            group = simulated_group(ep, slot_bytes(cls, cfg, ep, tokens or M, redundant))
        wss, states = group
        return [simulated(cls, cfg, placements[r], M, wss[r], states[r]) for r in range(ep)]


    def run_forward(ds, cfg, experts, xs, logits, maps=None):
        """One forward of every simulated rank; `maps` (one `ExpertMap` per rank): the ranks' routing goes
        to physical slots as the layer sends it, `experts` then indexed by slot."""
        routings = [route(l, cfg) for l in logits]
        if maps is not None:
            routings = [Routing(m.to_physical(ro.topk_ids), ro.topk_weights) for m, ro in zip(maps, routings)]
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
        for _ in range(3):              # slots alternate; epochs advance; fresh tokens each time, so rows
            xs = [torch.randn(t, H, generator=g) for t in tokens]      # left by an earlier forward cannot pass
            logits = [torch.randn(t, E, generator=g) * 2 for t in tokens]
            outs, _, _ = run_forward(ds, cfg, experts, xs, logits)
            for r in range(ep):
                ref = reference_moe(xs[r], logits[r], experts, cfg)
                assert outs[r].shape == (tokens[r], H)
                assert_close(outs[r], ref, 1e-5)

    DISPATCHERS = [SymmHighThroughputDispatcher, SymmLowLatencyDispatcher]

    def _setup(cls, ep=2, E=6, k=2, H=16, M=4, seed=0):
        cfg = MoEConfig(num_experts=E, top_k=k, hidden_size=H, intermediate_size=8, dtype=torch.float32)
        return cfg, random_experts(cfg, seed=seed), make(cls, cfg, ep, M)

    def _data(cfg, tokens, seed):
        g = torch.Generator().manual_seed(seed)
        return ([torch.randn(t, cfg.hidden_size, generator=g) for t in tokens],
                [torch.randn(t, cfg.num_experts, generator=g) * 2 for t in tokens])

    @pytest.mark.parametrize("cls", DISPATCHERS)
    def test_two_micro_batches_in_flight(cls):
        """dispatch A, dispatch B, combine B, combine A: each gets its own slot and the right answer."""
        cfg, experts, ds = _setup(cls)
        xa, la = _data(cfg, [3, 4], 1)
        xb, lb = _data(cfg, [4, 2], 2)
        ra, rb = [route(v, cfg) for v in la], [route(v, cfg) for v in lb]
        got_a = lockstep([d.dispatch_steps(x, r) for d, x, r in zip(ds, xa, ra)])
        got_b = lockstep([d.dispatch_steps(x, r) for d, x, r in zip(ds, xb, rb)])
        assert {h.slot for _, h in got_a} != {h.slot for _, h in got_b}      # each forward's slot: in its handle
        assert all(isinstance(h, SymmHandle) and h.ws is d.workspace for d, (_, h) in zip(ds, got_a))

        def experts_on(outs):
            return [ReferenceExperts(cfg)(b, rank_weights(cfg, experts, d.placement)) for d, (b, _) in zip(ds, outs)]
        ya, yb = experts_on(got_a), experts_on(got_b)
        out_b = lockstep([d.combine_steps(y, h) for d, y, (_, h) in zip(ds, yb, got_b)])
        out_a = lockstep([d.combine_steps(y, h) for d, y, (_, h) in zip(ds, ya, got_a)])
        for r in range(2):
            assert_close(out_a[r], reference_moe(xa[r], la[r], experts, cfg), 1e-5)
            assert_close(out_b[r], reference_moe(xb[r], lb[r], experts, cfg), 1e-5)

    @pytest.mark.parametrize("cls", DISPATCHERS)
    def test_overflow_raises_on_every_rank_then_recovers(cls):
        cfg, experts, ds = _setup(cls, M=4)
        xs, ls = _data(cfg, [6, 2], 3)                # rank 0 passes more than max_tokens_per_rank
        errors = {}
        routings = [route(v, cfg) for v in ls]
        outs = lockstep([d.dispatch_steps(x, r) for d, x, r in zip(ds, xs, routings)], errors)
        if not errors:                                 # the capturable paths raise at the end of combine
            ys = [torch.zeros(b.x.shape, dtype=cfg.dtype) for b, _ in outs]
            lockstep([d.combine_steps(y, h) for d, y, (_, h) in zip(ds, ys, outs)], errors)
        assert set(errors) == {0, 1}, errors
        for exc in errors.values():
            assert isinstance(exc, ValueError) and "max_tokens_per_rank=4" in str(exc)
            assert "rank 0 passed 6 tokens" in str(exc)
        xs, ls = _data(cfg, [4, 1], 4)                 # the group is usable again
        outs, _, _ = run_forward(ds, cfg, experts, xs, ls)
        for r in range(2):
            assert_close(outs[r], reference_moe(xs[r], ls[r], experts, cfg), 1e-5)

    @pytest.mark.parametrize("cls", DISPATCHERS)
    def test_ranks_calling_different_layers_raise_on_every_rank(cls):
        """Two layers of different sizes share the group's workspace; rank 0 calls one, rank 1 the other."""
        from epmoe import RankMismatch
        cfg_a = MoEConfig(num_experts=6, top_k=2, hidden_size=16, intermediate_size=8, dtype=torch.float32)
        cfg_b = MoEConfig(num_experts=6, top_k=2, hidden_size=32, intermediate_size=8, dtype=torch.float32)
        group = simulated_group(2, max(slot_bytes(cls, c, 2, 4) for c in (cfg_a, cfg_b)))
        a, b = make(cls, cfg_a, 2, 4, group), make(cls, cfg_b, 2, 4, group)   # one group state per rank
        for db in b:                  # the second layer built on the group
            db.layer_index = 1
        xa, la = _data(cfg_a, [3, 3], 5)
        xb, lb = _data(cfg_b, [3, 3], 6)
        calls = [(a[0], xa[0], route(la[0], cfg_a)), (b[1], xb[1], route(lb[1], cfg_b))]
        errors = {}
        outs = lockstep([d.dispatch_steps(x, r) for d, x, r in calls], errors)
        if not errors:
            _no_rows_for_the_experts(outs)
            ys = [torch.zeros(bt.x.shape, dtype=torch.float32) for bt, _ in outs]
            lockstep([d.combine_steps(y, h) for (d, _, _), y, (_, h) in zip(calls, ys, outs)], errors)
        assert set(errors) == {0, 1}, errors
        assert all(isinstance(e, RankMismatch) for e in errors.values()), errors

    def _no_rows_for_the_experts(outs):
        """A failed forward's batch routes nothing (no id the experts could index out of range with)."""
        for batch, _ in outs:
            if hasattr(batch, "local_ids"):
                assert (batch.local_ids == -1).all(), batch.local_ids
            else:
                assert not batch.counts.any(), batch.counts

    def test_one_rank_high_throughput_the_other_low_latency_raise_on_both_then_recover():
        """The two kinds share the group's workspace: their first exchange meets, the headers differ,
        both raise without waiting out a timeout, and the next aligned forwards are right."""
        from epmoe import RankMismatch
        cfg = MoEConfig(num_experts=6, top_k=2, hidden_size=16, intermediate_size=8, dtype=torch.float32)
        experts = random_experts(cfg, seed=9)
        group = simulated_group(2, max(slot_bytes(c, cfg, 2, 4) for c in DISPATCHERS))
        wss = group[0]
        ht, ll = make(SymmHighThroughputDispatcher, cfg, 2, 4, group), make(SymmLowLatencyDispatcher, cfg, 2, 4, group)
        for d in ll:                  # the second layer built on the group
            d.layer_index = 1
        xs, ls = _data(cfg, [3, 2], 10)
        calls = [(ht[0], xs[0], route(ls[0], cfg)), (ll[1], xs[1], route(ls[1], cfg))]
        errors = {}
        outs = lockstep([d.dispatch_steps(x, r) for d, x, r in calls], errors)
        if len(errors) < 2:
            ys = [torch.zeros(b.x.shape) for b, _ in outs]
            lockstep([d.combine_steps(y, h) for (d, _, _), y, (_, h) in zip(calls, ys, outs)], errors)
        assert set(errors) == {0, 1} and all(isinstance(e, RankMismatch) for e in errors.values()), errors
        # the low-latency rank counted rows into the high-throughput rank's expert counters: cleared there
        assert all(not wss[r].control_view(s, "counters").any() for r in range(2) for s in range(2))
        # other tokens than the failed forward's (its leftovers must not pass for them), both slots
        for seed, ds in ((20, ll), (21, ll), (22, ht), (23, ht), (24, ll)):
            xs, ls = _data(cfg, [3, 2], seed)
            outs, _, _ = run_forward(ds, cfg, experts, xs, ls)
            for r in range(2):
                assert_close(outs[r], reference_moe(xs[r], ls[r], experts, cfg), 1e-5)

    @pytest.mark.parametrize("cls", DISPATCHERS)
    def test_a_peer_that_never_comes_is_a_timeout_error(cls):
        cfg, experts, ds = _setup(cls)
        xs, ls = _data(cfg, [3, 3], 7)
        errors = {}
        outs = lockstep([ds[0].dispatch_steps(xs[0], route(ls[0], cfg))], errors)   # rank 1 never takes part
        if not errors:
            _no_rows_for_the_experts(outs)
            b, h = outs[0]
            lockstep([ds[0].combine_steps(torch.zeros(b.x.shape), h)], errors)
        assert isinstance(errors.get(0), RuntimeError) and "timeout_s" in str(errors[0]), errors

    def test_unbounded_high_throughput_beyond_its_workspace_raises_on_every_rank_then_recovers():
        """Nothing grows inside a forward: a forward that needs more rows than the workspace holds raises on
        every rank (all read the same counts), naming the size; the next forward that fits is right."""
        cfg = MoEConfig(num_experts=6, top_k=2, hidden_size=16, intermediate_size=8, dtype=torch.float32)
        experts = random_experts(cfg, seed=13)
        ds = make(SymmHighThroughputDispatcher, cfg, 2, None, tokens=2)     # room for about 2 tokens a rank
        xs, ls = _data(cfg, [7, 6], 14)
        errors = {}
        lockstep([d.dispatch_steps(x, route(v, cfg)) for d, x, v in zip(ds, xs, ls)], errors)
        assert set(errors) == {0, 1}, errors
        for exc in errors.values():
            assert isinstance(exc, ValueError) and "rows a slot" in str(exc) and "size_hint" in str(exc), exc
        xs, ls = _data(cfg, [2, 1], 15)
        outs, _, _ = run_forward(ds, cfg, experts, xs, ls)
        for r in range(2):
            assert_close(outs[r], reference_moe(xs[r], ls[r], experts, cfg), 1e-5)

    def test_bounded_high_throughput_batch_spans_its_capacity_not_the_workspace():
        """In a workspace sized by a much larger layer, the bounded batch still has ep x max_tokens rows."""
        cfg = MoEConfig(num_experts=6, top_k=2, hidden_size=16, intermediate_size=8, dtype=torch.float32)
        experts = random_experts(cfg, seed=11)
        ds = make(SymmHighThroughputDispatcher, cfg, 2, 4,
                  simulated_group(2, 64 * slot_bytes(SymmHighThroughputDispatcher, cfg, 2, 4)))
        xs, ls = _data(cfg, [4, 3], 12)
        outs, got, _ = run_forward(ds, cfg, experts, xs, ls)
        assert [b.x.shape[0] for b, _ in got] == [2 * 4, 2 * 4]
        for r in range(2):
            assert_close(outs[r], reference_moe(xs[r], ls[r], experts, cfg), 1e-5)

    def test_high_throughput_rows_are_what_each_rank_must_receive():
        """Rows, local ids and weights each rank received, against an independent walk over the routing."""
        cfg, experts, ds = _setup(SymmHighThroughputDispatcher, ep=3, E=7, k=3, H=16, M=5)
        xs, ls = _data(cfg, [5, 0, 4], 8)
        routings = [route(v, cfg) for v in ls]
        outs = lockstep([d.dispatch_steps(x, r) for d, x, r in zip(ds, xs, routings)])
        for me, (batch, _) in enumerate(outs):
            owners = ds[0].placement.owners
            rows, ids, weights = [], [], []
            for s in range(3):
                for t in range(xs[s].shape[0]):
                    g = routings[s].topk_ids[t].tolist()
                    if any(owners[e] == me for e in g):
                        rows.append(xs[s][t])
                        ids.append(ds[me].placement.local_ids(routings[s].topk_ids[t]).tolist())
                        weights.append(routings[s].topk_weights[t])
            n = len(rows)
            assert torch.equal(batch.x[:n], torch.stack(rows)) if n else True
            assert batch.local_ids[:n].tolist() == ids
            assert torch.equal(batch.weights[:n], torch.stack(weights)) if n else True
            assert (batch.local_ids[n:] == -1).all()       # the rest of the capacity is routed nowhere

    @pytest.mark.parametrize("launch,M", [(dict(split=3, combine_split=2, route_block=2), 5),
                                          (dict(split=2, combine_split=3, route_block=4, warps=2), None)])
    def test_high_throughput_rows_split_over_programs(launch, M):
        """Rows moved by several programs each (every split-th block of columns) and a routing scan over
        several blocks of tokens give the reference result, bounded and unbounded."""
        from epmoe.dispatch.symm_high_throughput import HTLaunch
        cfg = MoEConfig(num_experts=7, top_k=3, hidden_size=40, intermediate_size=8, dtype=torch.float32)
        experts = random_experts(cfg, seed=5)
        ds = make(SymmHighThroughputDispatcher, cfg, 3, M, tokens=256)   # unbounded: room for 256 tokens a rank
        for d in ds:
            d.launch = HTLaunch(**launch)
        xs, ls = _data(cfg, [5, 1, 3], 21)
        outs, _, _ = run_forward(ds, cfg, experts, xs, ls)
        for r in range(3):
            assert_close(outs[r], reference_moe(xs[r], ls[r], experts, cfg), 1e-5)

    def test_high_throughput_routing_scan_over_many_blocks():
        """The two-pass routing scan (blocks of 2 tokens, more blocks than one chunk of the prefix) against
        a walk in token order."""
        from epmoe.kernels.token_rows import route_to_ranks
        g = torch.Generator().manual_seed(4)
        ep, E, T, K = 3, 7, 140, 2
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(torch.int32)
        ids[:20] = torch.tensor([0, 1], dtype=torch.int32)     # a stretch on one rank only
        owner = torch.tensor(Placement(E, ep, 0).owners, dtype=torch.int32)
        j, counts = route_to_ranks(ids, owner, ep, block_t=2)
        want = torch.full((ep, T), -1, dtype=torch.int64)
        n = [0] * ep
        for t in range(T):
            for d in sorted({int(owner[e]) for e in ids[t]}):
                want[d, t] = n[d]
                n[d] += 1
        assert torch.equal(j, want)
        assert counts.tolist() == n

    @pytest.mark.parametrize("split", [1, 4])
    def test_high_throughput_fp8_rows_are_the_one_formula(split):
        """FP8 on the wire: quantized inside the transfer kernel (whole groups per column block) or before
        it (4 programs a row: blocks of 64 columns), the received rows and scales are `quantize_activations` of the
        sent rows, bit for bit, and the layer matches the oracle within the FP8 bound."""
        from epmoe import Fp8Config
        from epmoe.dispatch.symm_high_throughput import HTLaunch
        cfg = MoEConfig(num_experts=6, top_k=2, hidden_size=256, intermediate_size=128, dtype=torch.float32,
                        quant=Fp8Config(weight_block=(128, 128), dispatch_fp8=True))
        ds = make(SymmHighThroughputDispatcher, cfg, 2, 5)
        for d in ds:
            d.launch = HTLaunch(quant_split=split)
        xs, ls = _data(cfg, [5, 3], 31)
        xs[0][1] *= 1e4                                          # groups of very different ranges
        routings = [route(v, cfg) for v in ls]
        outs = lockstep([d.dispatch_steps(x, r) for d, x, r in zip(ds, xs, routings)])
        owners = ds[0].placement.owners
        for me, (batch, _) in enumerate(outs):
            sent = [xs[s][t] for s in range(2) for t in range(xs[s].shape[0])
                    if any(owners[e] == me for e in routings[s].topk_ids[t].tolist())]
            q, sc = cfg.quant_scheme.quantize_activations(torch.stack(sent))
            n = len(sent)
            assert torch.equal(batch.x[:n].view(torch.uint8), q.view(torch.uint8))
            assert torch.equal(batch.scales[:n], sc.float())

    SENTINEL = 0x5A      # every byte of the slots' data regions before a failed forward

    def _fill_data_regions(wss):
        for ws in wss:
            for slot in range(ws.SLOTS):
                ws.local[slot * ws.slot_bytes + ws.control.nbytes:(slot + 1) * ws.slot_bytes].fill_(SENTINEL)

    def _bytes_changed(ws, slot, region) -> int:
        """How many bytes of `region` in slot `slot` of `ws` no longer hold the sentinel."""
        start = slot * ws.slot_bytes + region.offset
        return int((ws.local[start:start + region.nbytes] != SENTINEL).sum())

    @pytest.mark.parametrize("pull", [True, False])
    def test_a_failed_high_throughput_forward_stores_nothing_into_the_peers(pull):
        """Ranks on two layers of different sizes (one workspace): the mismatch is known on every rank
        after the count exchange, so neither the dispatch kernel nor the combine kernel may store a row
        into any rank's buffer -- each would land at its own layer's offsets, inside the other layer's
        regions. Every byte of both slots' data regions is a sentinel before the forward; afterwards the
        only bytes changed are each rank's own routing ids (marked routed nowhere, as the failed
        forward's batch must be)."""
        from epmoe import RankMismatch
        cls = SymmHighThroughputDispatcher
        cfg_a = MoEConfig(num_experts=6, top_k=2, hidden_size=16, intermediate_size=8, dtype=torch.float32)
        cfg_b = MoEConfig(num_experts=6, top_k=2, hidden_size=32, intermediate_size=8, dtype=torch.float32)
        group = simulated_group(2, max(slot_bytes(cls, c, 2, 4) for c in (cfg_a, cfg_b)))
        wss = group[0]
        a, b = make(cls, cfg_a, 2, 4, group), make(cls, cfg_b, 2, 4, group)   # one group state per rank
        for db in b:                  # the second layer built on the group
            db.layer_index = 1
        if not pull:                  # the push combine: stores into the owners' buffers, guarded alike
            from epmoe.dispatch.symm_high_throughput import HTLaunch
            for d in a + b:
                d.launch = HTLaunch(combine_pull=False)
        _fill_data_regions(wss)
        xa, la = _data(cfg_a, [3, 3], 5)
        xb, lb = _data(cfg_b, [3, 3], 6)
        calls = [(a[0], xa[0], route(la[0], cfg_a)), (b[1], xb[1], route(lb[1], cfg_b))]
        errors = {}
        outs = lockstep([d.dispatch_steps(x, r) for d, x, r in calls], errors)
        assert not errors, errors                  # bounded: the verdict is read at the end of combine
        slot = outs[0][1].slot
        ys = [torch.full(bt.x.shape, 3.0) for bt, _ in outs]      # rows a combine kernel would store
        lockstep([d.combine_steps(y, h) for (d, _, _), y, (_, h) in zip(calls, ys, outs)], errors)
        assert set(errors) == {0, 1} and all(isinstance(e, RankMismatch) for e in errors.values()), errors
        for r, (d, _, _) in enumerate(calls):
            ws = wss[r]
            regions = d.layout_in(ws).regions
            # the pull combine copies this rank's own expert output into its own combine region (where the
            # peers would read it; after a failure nobody does): those rows hold exactly its output
            comb = ws.view(slot, regions["comb"])
            if pull:
                assert torch.equal(comb[:ys[r].shape[0], :ys[r].shape[1]], ys[r]), f"rank {r}: its combine region"
            else:
                assert _bytes_changed(ws, slot, regions["comb"]) == 0, f"rank {r}: rows landed in comb"
            for name, region in regions.items():
                if name in ws.control.regions or name in ("rids", "comb"):
                    continue
                assert _bytes_changed(ws, slot, region) == 0, f"rank {r}: rows landed in {name} of a failed forward"
            start = slot * ws.slot_bytes + ws.control.nbytes
            changed = (ws.local[start:(slot + 1) * ws.slot_bytes] != SENTINEL).nonzero().reshape(-1) + start
            rids, comb_r = regions["rids"], regions["comb"]
            lo, lo_c = slot * ws.slot_bytes + rids.offset, slot * ws.slot_bytes + comb_r.offset
            own = ((changed >= lo) & (changed < lo + rids.nbytes)) | ((changed >= lo_c) & (changed < lo_c + comb_r.nbytes))
            assert bool(own.all()), f"rank {r}: bytes outside its routing ids and its own output changed in a failed forward"
            assert (ws.view(slot, rids) == -1).all()

    def test_a_failed_low_latency_forward_sends_no_row_back_to_a_late_peer():
        """Rank 0 times out waiting for rank 1's count flags (its counters are then cleared); rank 1 comes
        late and its dispatch claims rows of rank 0's experts. Rank 0's combine must send nothing back:
        rank 1's combine region keeps every sentinel byte."""
        cls = SymmLowLatencyDispatcher
        cfg, experts, ds = _setup(cls)
        wss = [d.workspace for d in ds]
        _fill_data_regions(wss)
        xs, ls = _data(cfg, [3, 3], 7)
        errors = {}
        outs = lockstep([ds[0].dispatch_steps(xs[0], route(ls[0], cfg))], errors)   # rank 1 not there yet
        assert not errors and not outs[0][0].counts.any()
        late = ds[1].dispatch_steps(xs[1], route(ls[1], cfg))
        next(late)                                      # rank 1's rows and counts land in rank 0's buffer
        b, h = outs[0]
        assert b.counts.any(), "rank 1's late rows should count into rank 0's experts"
        lockstep([ds[0].combine_steps(torch.full(b.x.shape, 3.0), h)], errors)
        assert isinstance(errors.get(0), RuntimeError) and "timeout_s" in str(errors[0]), errors
        comb = ds[1].layout.regions["comb"]
        for slot in range(2):
            assert _bytes_changed(wss[1], slot, comb) == 0, "rank 0's failed combine stored rows into rank 1"

    @pytest.mark.parametrize("cls", DISPATCHERS)
    def test_redundant_experts_in_physical_slots(cls):
        """Replicas: the dispatchers move tokens to 11 physical slots (6 + 5 over 2 ranks) holding 8 logical
        experts, the hot ones twice, from routing mapped to slots by the layer's rule; every output equals
        the logical oracle, before and after the map switches on the same workspaces."""
        ep, E, tokens = 2, 8, [7, 4]
        cfg = MoEConfig(num_experts=E, top_k=3, hidden_size=16, intermediate_size=8, dtype=torch.float32)
        experts = random_experts(cfg, seed=6)
        maps = [ExpertMap.build(E, 3, ep, r) for r in range(ep)]
        for m in maps:
            m.switch([0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2])
        assert maps[0].placement.experts_per_rank == (6, 5) and maps[1].local_experts == (6, 7, 0, 1, 2)
        ds = make(cls, cfg, ep, max(tokens), placements=[m.placement for m in maps])
        slot_experts = [experts[e] for e in maps[0].physical_to_logical]
        xs, ls = _data(cfg, tokens, 9)
        for l in ls:
            l[:, :3] += 4.0                          # most pairs go to the replicated experts
        outs, _, _ = run_forward(ds, cfg, slot_experts, xs, ls, maps=maps)
        for r in range(ep):
            assert_close(outs[r], reference_moe(xs[r], ls[r], experts, cfg), 1e-5)
        # a rebalance changes what the slots hold, not the slots: the same dispatchers on the same
        # workspaces carry on with the new map and the moved weights
        new = [7, 6, 5, 4, 3, 2, 1, 0, 7, 6, 5]
        for m in maps:
            m.switch(new)
        outs, _, _ = run_forward(ds, cfg, [experts[e] for e in new], xs, ls, maps=maps)
        for r in range(ep):
            assert_close(outs[r], reference_moe(xs[r], ls[r], experts, cfg), 1e-5)

    # ------------------------------------------------------------------------------ the pull combine
    def _forward_with(ds, cfg, experts, xs, logits, in_place=False):
        """One forward; the experts' output written into the batch's `out` (what experts that can write
        there do) when `in_place`, else handed over as a tensor of its own (the combine copies it)."""
        routings = [route(v, cfg) for v in logits]
        got = lockstep([d.dispatch_steps(x, ro) for d, x, ro in zip(ds, xs, routings)])
        ys = []
        for d, (batch, _) in zip(ds, got):
            y = ReferenceExperts(cfg)(batch, rank_weights(cfg, experts, d.placement))
            if in_place:
                assert batch.out is not None and batch.out.shape == y.shape
                y = batch.out.copy_(y)
            ys.append(y)
        return lockstep([d.combine_steps(y, h) for d, y, (_, h) in zip(ds, ys, got)])

    PULL_CASES = [  # (ep, E, k, H, tokens per rank, expert every token visits or None, bounded)
        (2, 8, 2, 24, [5, 3], None, True),
        (3, 7, 2, 20, [1, 0, 4], None, False),   # T = 1, a rank with no tokens, E not divisible by ep
        (4, 8, 3, 12, [3, 2, 0, 4], 7, True),    # every token on the last rank's expert (and two others)
    ]

    @pytest.mark.parametrize("ep,E,k,H,tokens,one,bounded", PULL_CASES)
    def test_pull_combine_equals_push_and_the_oracle(ep, E, k, H, tokens, one, bounded):
        """The pull combine (the owner reads every rank's row and sums in rank order, float32) gives the
        push combine's result bit for bit, and the oracle's; the same whether the experts wrote into the
        batch's `out` or returned a tensor of their own; bounded and unbounded."""
        from epmoe.dispatch.symm_high_throughput import HTLaunch
        cfg = MoEConfig(num_experts=E, top_k=k, hidden_size=H, intermediate_size=8, dtype=torch.float32)
        experts = random_experts(cfg, seed=ep)
        xs, ls = _data(cfg, tokens, 40 + ep)
        if one is not None:
            for v in ls:
                v[:, one] = 50.0
        M = max(tokens) if bounded else None
        pull = make(SymmHighThroughputDispatcher, cfg, ep, M, tokens=max(tokens))
        push = make(SymmHighThroughputDispatcher, cfg, ep, M, tokens=max(tokens))
        for d in push:
            d.launch = HTLaunch(combine_pull=False)
        want = _forward_with(push, cfg, experts, xs, ls)
        for r in range(ep):
            assert_close(want[r], reference_moe(xs[r], ls[r], experts, cfg), 1e-5)
        for in_place in (False, True):       # the two slots, one each way
            got = _forward_with(pull, cfg, experts, xs, ls, in_place)
            for r in range(ep):
                assert torch.equal(got[r], want[r]), (in_place, r)

    def test_pull_combine_batch_names_the_combine_region():
        """The batch's `out` is the slot's combine region (the rows the peers read), in receive order;
        an output handed over elsewhere is copied there; the push variant names none."""
        from epmoe.dispatch.symm_high_throughput import HTLaunch, _is_view_of
        cfg, experts, ds = _setup(SymmHighThroughputDispatcher, M=4)
        xs, ls = _data(cfg, [3, 4], 50)
        got = lockstep([d.dispatch_steps(x, route(v, cfg)) for d, x, v in zip(ds, xs, ls)])
        ys = []
        for d, (batch, handle) in zip(ds, got):
            comb = d._regions(handle.ws, handle.slot).comb_RH
            assert _is_view_of(batch.out, comb[:batch.x.shape[0]]) and handle.pull
            ys.append(torch.randn(batch.out.shape))
        lockstep([d.combine_steps(y, h) for d, y, (_, h) in zip(ds, ys, got)])
        for d, y, (batch, handle) in zip(ds, ys, got):
            assert torch.equal(batch.out, y)                 # copied where the peers read
        for d in ds:
            d.launch = HTLaunch(combine_pull=False)
        got = lockstep([d.dispatch_steps(x, route(v, cfg)) for d, x, v in zip(ds, xs, ls)])
        assert all(b.out is None and not h.pull for b, h in got)
        lockstep([d.combine_steps(torch.zeros(b.x.shape), h) for d, (b, h) in zip(ds, got)])

    def test_pull_sum_reads_nothing_outside_the_region_nor_after_a_failure():
        """`gather_sum` over the peers' buffers: a row past the region is skipped (never read), terms in
        rank order in float32; a non-zero status word gives NaN rows without reading any term."""
        from epmoe.kernels.token_rows import gather_sum
        wss = SymmWorkspace.simulated(3, 1 << 20)
        regions = [ws.local[:6 * 8 * 4].view(torch.float32).view(-1, 8)[:5] for ws in wss]   # [5, 8] on each rank
        for r, reg in enumerate(regions):
            reg.copy_(torch.randn(5, 8, generator=torch.Generator().manual_seed(r)) * 10)
        back = torch.tensor([[0, 4, -1], [2, 5, 1], [9, -1, 3]], dtype=torch.int64)    # 5 and 9: past the region
        status = torch.zeros(1, dtype=torch.int32)
        got = gather_sum(regions[0], back, None, status, torch.float32, deltas=wss[0].deltas, block_h=4)
        want = torch.zeros(3, 8)
        for t in range(3):
            for d in range(3):
                i = int(back[t, d])
                if 0 <= i < 5:
                    want[t] += regions[d][i]
        assert torch.equal(got, want)
        status.fill_(2)
        assert torch.isnan(gather_sum(regions[0], back, None, status, torch.float32, deltas=wss[0].deltas)).all()
