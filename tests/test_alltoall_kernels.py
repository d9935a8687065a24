"""The `alltoall` dispatcher's CUDA kernels (`epmoe.kernels.alltoall_pack`, and `gather_sum` for its
combine), run on CPU tensors under the Triton interpreter, against the PyTorch path they replace: the
same wire rows field by field, bit for bit (hidden vector, FP8 rows and their scales, local ids,
weights), the same combine rows, the same dense unpacked fields, and the same layer outputs.
"""
import dataclasses
import pytest
import torch

from epmoe.testing.interpreter import INTERPRETING, interpreted_file

pytestmark, test_under_the_interpreter = interpreted_file(__file__)

if INTERPRETING:
    import torch.nn.functional as F

    from epmoe import Fp8Config, MoEConfig, MoELayer, Placement, contract
    from epmoe.dispatch._comm import token_format, unpack_tokens
    from epmoe.group import GroupState
    from epmoe.dispatch.alltoall import back_index_torch, pack_torch, route_torch, sum_back_torch
    from epmoe.kernels.alltoall_pack import pack_rows, route_rows, unpack_rows
    from epmoe.kernels.token_rows import gather_sum
    from epmoe.testing import random_experts

    def bits(t: torch.Tensor) -> torch.Tensor:
        """A tensor's bytes (exact comparison, -0.0 and NaN included)."""
        return t.contiguous().view(torch.uint8)

    FP8 = {"none": None,
           "group128": Fp8Config(dispatch_fp8=True),
           "per_token": Fp8Config(weight_block=None, per_channel_weights=True, activation="per_token",
                                  dispatch_fp8=True)}

    def _cfg(E, k, H, dtype, fp8):
        return MoEConfig(num_experts=E, top_k=k, hidden_size=H, intermediate_size=64, dtype=dtype,
                         quant=FP8[fp8])

    def _routing(T, E, k, seed, one_expert=None):
        g = torch.Generator().manual_seed(seed)
        if one_expert is not None:
            ids = torch.full((T, k), one_expert, dtype=torch.int32)
            if k > 1:   # the other slots: distinct experts, all different from one_expert
                others = [e for e in range(E) if e != one_expert][:k - 1]
                ids[:, 1:] = torch.tensor(others, dtype=torch.int32)
        else:
            ids = torch.rand(T, E, generator=g).argsort(dim=1)[:, :k].to(torch.int32)
        w = torch.rand(T, k, generator=g)
        return ids, w

    def _pack_both(cfg, placement, T, seed, one_expert=None, scale=1.0):
        """(fmt, send from the kernels, send from PyTorch, back from the kernels, back from PyTorch, x)."""
        plan = contract.build_plan("alltoall", None, cfg, placement.ep_size, "cpu")
        fmt = token_format(plan)
        Hp = cfg.padded_hidden_size
        g = torch.Generator().manual_seed(seed + 1)
        x = F.pad(torch.randn(T, cfg.hidden_size, generator=g) * scale, (0, Hp - cfg.hidden_size)).to(cfg.dtype)
        ids, w = _routing(T, cfg.num_experts, cfg.top_k, seed, one_expert)
        goes_to = route_torch(placement, ids)
        n_send = int(goes_to.sum())
        want = fmt.empty(n_send)
        pair = pack_torch(fmt, placement, want, x, ids, w, goes_to)
        owner, index, _ = placement.tables("cpu")
        j, counts = route_rows(ids, owner, placement.ep_size)
        assert counts.tolist() == goes_to.sum(1).tolist()
        got = fmt.empty(n_send)
        group = cfg.quant_scheme.activation_group_size if fmt.quantize is not None else None
        back = pack_rows(fmt, got, x, ids, w, owner, index, j, counts, group)
        return fmt, got, want, back, back_index_torch(pair, placement.ep_size, T), x

    def _assert_same_rows(fmt, got, want):
        assert got.shape == want.shape
        for name in fmt.fields:
            a, b = fmt.view(got, name), fmt.view(want, name)
            assert torch.equal(bits(a), bits(b)), f"field {name!r} differs"

    PLACEMENTS = {      # (E, ep, expert_to_rank or None): E not divisible by ep, and a scattered map
        "ep2": (7, 2, None),
        "ep3": (8, 3, None),
        "ep4": (10, 4, None),
        "ep3_scattered": (7, 3, [2, 0, 1, 0, 2, 1, 2]),
    }

    @pytest.mark.parametrize("where", sorted(PLACEMENTS))
    @pytest.mark.parametrize("dtype,fp8,H", [(torch.float32, "none", 200), (torch.bfloat16, "none", 1100),
                                             (torch.bfloat16, "group128", 200), (torch.float32, "per_token", 136)])
    def test_pack_matches_pack_tokens(where, dtype, fp8, H):
        E, ep, owners = PLACEMENTS[where]
        cfg = _cfg(E, 3, H, dtype, fp8)
        for T in (0, 1, 11):
            fmt, got, want, back, back_t, _ = _pack_both(cfg, Placement(E, ep, 0, owners), T, seed=T + ep)
            _assert_same_rows(fmt, got, want)
            n_send = want.shape[0]
            assert torch.equal(back, torch.where(back_t.t() == n_send, -1, back_t.t()))

    @pytest.mark.parametrize("fp8", ["none", "group128", "per_token"])
    def test_pack_every_token_on_one_expert(fp8):
        """All tokens on the last expert (k = 1): every row goes to the last rank, the others get none."""
        cfg = _cfg(9, 1, 160, torch.float32, fp8)
        placement = Placement(9, 4, 0)
        fmt, got, want, back, _, _ = _pack_both(cfg, placement, 6, seed=3, one_expert=8)
        _assert_same_rows(fmt, got, want)
        assert got.shape[0] == 6
        assert (back[:, :3] == -1).all() and back[:, 3].tolist() == list(range(6))
        assert (fmt.view(got, "ids")[:, 0] == placement.ids_on_owner(torch.tensor([8]))[1].item()).all()

    @pytest.mark.parametrize("fp8", ["group128", "per_token"])
    def test_fp8_rows_are_quantize_activations(fp8):
        """The FP8 field and its scales are `quantize_activations` of x, bit for bit (per 128-column
        group, or one per row), including an all-zero token and one of huge values."""
        cfg = _cfg(6, 2, 300, torch.bfloat16, fp8)
        fmt, got, _, back, _, x = _pack_both(cfg, Placement(6, 2, 0), 9, seed=5, scale=3.0)
        x = x.clone()
        q, s = cfg.quant_scheme.quantize_activations(x)
        for t in range(x.shape[0]):
            for d in range(2):
                r = int(back[t, d])
                if r >= 0:
                    assert torch.equal(bits(fmt.view(got, "x")[r]), bits(q[t]))
                    assert torch.equal(bits(fmt.view(got, "scales")[r]), bits(s[t]))
        assert fmt.view(got, "scales").shape[1] == (cfg.padded_hidden_size // 128 if fp8 == "group128" else 1)
        # extreme rows: zeros (scale floor) and values far past the FP8 range
        x2 = torch.zeros(2, cfg.padded_hidden_size, dtype=cfg.dtype)
        x2[1, :cfg.hidden_size] = torch.linspace(-3e4, 3e4, cfg.hidden_size).to(cfg.dtype)
        ids, w = torch.tensor([[0, 1], [4, 5]], dtype=torch.int32), torch.ones(2, 2)
        placement = Placement(6, 2, 0)
        owner, index, _ = placement.tables("cpu")
        j, counts = route_rows(ids, owner, 2)
        send = fmt.empty(int(counts.sum()))
        back = pack_rows(fmt, send, x2, ids, w, owner, index, j, counts, cfg.quant_scheme.activation_group_size)
        q2, s2 = cfg.quant_scheme.quantize_activations(x2)
        assert torch.equal(bits(fmt.view(send, "x")[back[0, 0]]), bits(q2[0]))
        assert torch.equal(bits(fmt.view(send, "x")[back[1, 1]]), bits(q2[1]))
        assert torch.equal(bits(fmt.view(send, "scales")[back[1, 1]]), bits(s2[1]))

    @pytest.mark.parametrize("fp8", ["none", "group128"])
    def test_unpack_matches_unpack_tokens(fp8):
        cfg = _cfg(7, 3, 1100 if fp8 == "none" else 200, torch.bfloat16, fp8)
        fmt, got, _, _, _, _ = _pack_both(cfg, Placement(7, 3, 0), 10, seed=2)
        dense = unpack_rows(fmt, got)
        want = unpack_tokens(fmt, got, contiguous=True)
        for a, b in zip(dense, want):
            assert (a is None) == (b is None)
            if a is not None:
                assert a.is_contiguous() and a.dtype == b.dtype and torch.equal(bits(a), bits(b))
        assert all(t.shape[0] == 0 for t in unpack_rows(fmt, fmt.empty(0)) if t is not None)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    @pytest.mark.parametrize("ep", [2, 3, 4])
    def test_combine_gather_sum_matches_the_loop(dtype, ep):
        """gather_sum over the kernels' back index = the PyTorch loop over ranks, bit for bit (T = 0 too).

        Compared in float32, before the one cast to the layer's dtype: the interpreter (triton 3.9) casts
        float32 to bfloat16 by truncation, the GPU (and torch) round to nearest even."""
        E = 2 * ep + 1
        for T in (0, 1, 13):
            placement = Placement(E, ep, 0)
            ids, _ = _routing(T, E, 3, seed=ep + T)
            owner, _, _ = placement.tables("cpu")
            j, counts = route_rows(ids, owner, ep)
            goes_to = route_torch(placement, ids)
            n_send = int(goes_to.sum())
            pair = torch.nonzero(goes_to.reshape(-1)).reshape(-1)
            back_t = back_index_torch(pair, ep, T)
            back_k = torch.where(back_t.t() == n_send, -1, back_t.t()).contiguous()
            g = torch.Generator().manual_seed(T)
            rows = (torch.randn(n_send, 150, generator=g) * 10).to(dtype)
            with_zero = torch.cat([rows, torch.zeros(1, 150, dtype=dtype)])
            want = sum_back_torch(with_zero, back_t, torch.float32)
            got = gather_sum(rows, back_k, None, torch.zeros(1, dtype=torch.int32), torch.float32)
            assert got.shape == (T, 150) and torch.equal(got, want)
            if T:   # the sum really is over several ranks' rows (else the check proves little)
                assert (back_k >= 0).sum(1).max() >= 2

    @pytest.mark.parametrize("experts,fp8", [("reference", "none"), ("grouped_mm", "none"),
                                             ("reference", "group128")])     # grouped_mm's FP8 needs a GPU
    def test_layer_same_output_with_the_kernels(experts, fp8):
        """One rank, the whole layer: the kernels' path (strided views for these experts) gives the
        PyTorch path's output bit for bit; and the dense path (experts that need dense rows) too."""
        cfg = _cfg(6, 2, 200, torch.float32, fp8)
        layer = MoELayer(cfg, dispatcher="alltoall", experts=experts)
        for e, (gw, uw, dw) in enumerate(random_experts(cfg, seed=1)):
            layer.load_expert(e, gate_proj=gw, up_proj=uw, down_proj=dw)
        g = torch.Generator().manual_seed(4)
        x, logits = torch.randn(9, cfg.hidden_size, generator=g), torch.randn(9, cfg.num_experts, generator=g)
        with torch.no_grad():
            layer.dispatcher.use_kernels = False
            want = layer(x, logits)
            layer.dispatcher.use_kernels = True
            got = layer(x, logits)
            batch, handle = layer.dispatcher.dispatch(torch.randn(5, cfg.hidden_size, generator=g),
                                                      *_routing(5, 6, 2, seed=9))
        assert handle.kernels and not batch.x.is_contiguous()      # views of the receive buffer
        assert torch.equal(got, want)
        d = layer.dispatcher
        d.plan = dataclasses.replace(d.plan, experts=None, experts_read_strided_rows=False)   # on its own: dense rows
        with torch.no_grad():
            batch, _ = d.dispatch(torch.randn(5, cfg.hidden_size, generator=g), *_routing(5, 6, 2, seed=9))
        assert batch.x.is_contiguous() and batch.local_ids.is_contiguous() and batch.weights.is_contiguous()

    # ------------------------------------------------------------------ the bounded layout (capacity M)
    def _bounded_both(cfg, placement, T, M, seed, one_expert=None):
        """The fixed regions from the kernels and from PyTorch: (meta format, (x, meta, back [T, ep]) of
        each, with PyTorch's back in the kernels' convention: -1 where the token does not go)."""
        from epmoe.dispatch.alltoall import AllToAllDispatcher, pack_bounded_torch
        plan = contract.build_plan("alltoall", None, cfg, placement.ep_size, "cpu", max_tokens_per_rank=M)
        meta = AllToAllDispatcher(plan, placement, None, torch.device("cpu"), state=GroupState()).meta
        ep, Hp = placement.ep_size, cfg.padded_hidden_size
        g = torch.Generator().manual_seed(seed + 1)
        x = F.pad(torch.randn(T, cfg.hidden_size, generator=g), (0, Hp - cfg.hidden_size)).to(cfg.dtype)
        ids, w = _routing(T, cfg.num_experts, cfg.top_k, seed, one_expert)
        xt, mt = torch.zeros(ep * M + 1, Hp, dtype=plan.wire_dtype), meta.empty(ep * M + 1)
        dest = pack_bounded_torch(meta, placement, M, xt, mt, x, ids, w, route_torch(placement, ids))
        owner, index, _ = placement.tables("cpu")
        j, counts = route_rows(ids, owner, ep)
        xk, mk = torch.full((ep * M, Hp), 3.0).to(plan.wire_dtype), meta.empty(ep * M)
        back = pack_rows(meta, mk, x, ids, w, owner, index, j, counts, plan.wire_scale_group, x_send=xk, region=M)
        return meta, (xk, mk, back), (xt[:-1], mt[:-1], torch.where(dest.t() == ep * M, -1, dest.t()))

    @pytest.mark.parametrize("where", ["ep2", "ep4", "ep3_scattered"])
    @pytest.mark.parametrize("fp8", ["none", "group128"])
    def test_bounded_pack_matches_the_pytorch_layout(where, fp8):
        """Fixed regions of M rows: the token rows bit for bit at the same places (T = 0, T = 1, T = M, every
        token on one expert), every other row routed nowhere (ids -1, weights 0)."""
        E, ep, owners = PLACEMENTS[where]
        cfg = _cfg(E, 3, 200, torch.bfloat16, fp8)
        for T, M, one in ((0, 3, None), (1, 4, None), (6, 6, None), (5, 7, E - 1)):
            meta, (xk, mk, back), (xt, mt, back_t) = _bounded_both(cfg, Placement(E, ep, 0, owners), T, M,
                                                                   seed=T + ep, one_expert=one)
            assert torch.equal(back, back_t)
            sent = back[back >= 0]
            assert len(set(sent.tolist())) == sent.numel()
            for d in range(ep):                       # rank d's rows lie in its region, from its first row on
                rows = back[:, d][back[:, d] >= 0]
                assert (rows // M == d).all() and sorted(rows.tolist()) == list(range(d * M, d * M + rows.numel()))
            assert torch.equal(bits(xk[sent]), bits(xt[sent]))
            for name in meta.fields:
                assert torch.equal(bits(meta.view(mk, name)[sent]), bits(meta.view(mt, name)[sent])), name
            pad = torch.ones(ep * M, dtype=torch.bool)
            pad[sent] = False
            assert (meta.view(mk, "ids")[pad] == -1).all() and (meta.view(mk, "weights")[pad] == 0).all()
            dense = unpack_rows(meta, mk)
            assert dense[0] is None and torch.equal(dense[1], meta.view(mk, "ids").contiguous())

    @pytest.mark.parametrize("fp8", ["none", "group128"])
    def test_bounded_layer_same_output_with_the_kernels(fp8):
        """One rank, the whole bounded layer: the kernels' path gives the PyTorch path's output and the
        unbounded layer's, bit for bit; T = 0 too."""
        cfg = _cfg(6, 2, 200, torch.float32, fp8)
        experts = random_experts(cfg, seed=1)
        layers = [MoELayer(cfg, dispatcher="alltoall", experts="reference", max_tokens_per_rank=M) for M in (9, None)]
        for layer in layers:
            for e, (gw, uw, dw) in enumerate(experts):
                layer.load_expert(e, gate_proj=gw, up_proj=uw, down_proj=dw)
        g = torch.Generator().manual_seed(4)
        for T in (9, 0):
            x, logits = torch.randn(T, cfg.hidden_size, generator=g), torch.randn(T, cfg.num_experts, generator=g)
            outs = []
            with torch.no_grad():
                for kernels in (False, True):
                    layers[0].dispatcher.use_kernels = kernels
                    outs.append(layers[0](x, logits))
                outs.append(layers[1](x, logits))
            assert outs[0].shape == (T, cfg.hidden_size)
            assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
