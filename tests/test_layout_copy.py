"""`kernels.layout_copy.rows_to_layout` under the Triton interpreter: the token rows (FP8 with their scales,
K-block-major) copied into `align_pairs`' layout and each pair's row there, bit for bit as its PyTorch
statement, and by meaning (each local pair's row holds its token's row and scales), on awkward shapes:
T = 0 and 1, every token on one expert, slots of other ranks, widths that are not multiples of 16 bytes."""
import pytest
import torch

from epmoe.testing.interpreter import INTERPRETING, interpreted_file

pytestmark, test_under_the_interpreter = interpreted_file(__file__)

if not INTERPRETING:
    @pytest.mark.gpu
    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
    @pytest.mark.parametrize("order", ["pairs", "rows"])
    @pytest.mark.parametrize("fmt", ["fp8", "bf16"])
    def test_on_the_gpu_as_stated(fmt, order):
        """The compiled kernels (16-byte vectors) at a deepseek-v3 shard's width, with slots of other ranks."""
        from epmoe.kernels.layout_copy import rows_to_layout, rows_to_layout_reference
        from epmoe.kernels.moe_align import align_pairs
        from epmoe.quant.fp8 import fp8_quantize
        dev = torch.device("cuda")
        g = torch.Generator(device=dev).manual_seed(0)
        T, E, k, H = 777, 32, 8, 7168
        ids = torch.randn(T, E + 8, generator=g, device=dev).topk(k, dim=1).indices.to(torch.int32)
        ids[ids >= E] = -1
        x = torch.randn(T, H, generator=g, device=dev)
        x, scales = fp8_quantize(x, 128) if fmt == "fp8" else (x.bfloat16(), None)
        aligned = align_pairs(ids, E, 128)
        got, want = rows_to_layout(x, scales, aligned, k, order), rows_to_layout_reference(x, scales, aligned, k)
        used = int(aligned.num_padded.item())
        bits = torch.uint8 if fmt == "fp8" else torch.int16
        assert torch.equal(got[0][:used].view(bits), want[0][:used].view(bits))
        assert torch.equal(got[2], want[2]) and int((got[2] >= 0).sum()) == int((ids >= 0).sum())
        if fmt == "fp8":
            assert torch.equal(got[1][:, :used], want[1][:, :used])

else:
    from epmoe.kernels.layout_copy import rows_to_layout, rows_to_layout_reference
    from epmoe.kernels.moe_align import align_pairs
    from epmoe.quant.fp8 import fp8_quantize

    def _ids(T, E, k, g, case):
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else \
            torch.empty(0, k, dtype=torch.int64)
        if case == "one_expert" and T:       # every token's first slot on expert 2, the others distinct from it
            others = [[e for e in torch.randperm(E, generator=g).tolist() if e != 2][:k - 1] for _ in range(T)]
            ids = torch.cat([torch.full((T, 1), 2), torch.tensor(others)], dim=1)
        if case == "other_ranks" and T:
            ids[::2, 1] = -1
            ids[1::3, 0] = E + 3            # out of range: treated as not here
        return ids.to(torch.int32)

    def _bits(t):
        return t.view(torch.uint8) if t.element_size() == 1 else t.view(torch.int16)

    @pytest.mark.parametrize("order", ["pairs", "rows"])
    @pytest.mark.parametrize("fmt", ["fp8", "fp8_token", "bf16"])
    @pytest.mark.parametrize("T,E,k,H,case", [(0, 4, 2, 256, "random"), (1, 4, 2, 200, "random"),
                                              (37, 6, 3, 200, "other_ranks"), (150, 5, 3, 384, "one_expert"),
                                              (300, 16, 4, 136, "random")])
    def test_rows_and_pair_rows_as_stated(fmt, T, E, k, H, case, order):
        g = torch.Generator().manual_seed(T + H)
        ids = _ids(T, E, k, g, case)
        x = torch.randn(T, H, generator=g)
        if fmt.startswith("fp8"):         # scales per group of 128 columns, or one per row (token)
            x, scales = fp8_quantize(x, 128 if fmt == "fp8" else None)
        else:
            x, scales = x.bfloat16(), None
        aligned = align_pairs(ids, E, 128)
        a, a_scale_t, row_of_pair = rows_to_layout(x, scales, aligned, k, order)
        ra, rs, rrow = rows_to_layout_reference(x, scales, aligned, k)
        used = int(aligned.num_padded.item())
        assert a.shape == (aligned.max_rows, H) and a.dtype == x.dtype and row_of_pair.shape == (T, k)
        assert row_of_pair.dtype == torch.int32
        assert torch.equal(row_of_pair, rrow)
        assert torch.equal(_bits(a[:used]), _bits(ra[:used]))
        if fmt.startswith("fp8"):
            assert a_scale_t.shape == (-(-H // 128) if fmt == "fp8" else 1, aligned.max_rows)
            assert torch.equal(a_scale_t[:, :used], rs[:, :used])
        else:
            assert a_scale_t is None
        # by meaning: every local pair has a row holding its token's row (and scales); the others have none
        local = (ids >= 0) & (ids < E)
        assert torch.equal(row_of_pair >= 0, local)
        rows = row_of_pair[local].long()
        assert rows.unique().numel() == rows.numel() and (rows < used).all()
        tokens = torch.arange(T).repeat_interleave(k).view(T, k)[local]
        assert torch.equal(_bits(a[rows]), _bits(x[tokens]))
        if fmt.startswith("fp8"):
            assert torch.equal(a_scale_t[:, rows], scales[tokens].t())
        # padding rows hold token 0
        pad = torch.ones(used, dtype=torch.bool)
        pad[rows] = False
        if pad.any():
            assert torch.equal(_bits(a[:used][pad]), _bits(x[:1].expand(int(pad.sum()), H)))
        # only the pairs' rows: the same numbers without a copy
        assert torch.equal(rows_to_layout(None, None, aligned, k)[2], row_of_pair)

    def test_bad_operands_are_refused():
        g = torch.Generator().manual_seed(0)
        ids = _ids(10, 4, 2, g, "random")
        aligned = align_pairs(ids, 4, 128)
        x, scales = fp8_quantize(torch.randn(10, 256, generator=g), 128)
        with pytest.raises(ValueError, match=r"scales must be \[10, 2\] .* or \[10, 1\]"):
            rows_to_layout(x, scales.repeat(1, 2)[:, :3].contiguous(), aligned, 2)
        with pytest.raises(ValueError, match="x has 9 rows"):
            rows_to_layout(x[:9], scales[:9], aligned, 2)
        with pytest.raises(ValueError, match="not N tokens of top_k=3"):
            rows_to_layout(None, None, aligned, 3)
        with pytest.raises(ValueError, match="split-tile layout"):
            rows_to_layout(x, scales, align_pairs(ids, 4, 128, tail_m=32), 2)
        with pytest.raises(ValueError, match="order must be one of"):
            rows_to_layout(x, scales, aligned, 2, order="tokens")
