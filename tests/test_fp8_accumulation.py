"""FP8 with scales per row (per-token activations, per-channel or per-tensor weights) accumulates in float32.

These products take their scales after the K loop, so the kernels accumulate each K block's product straight
into the tile's accumulator. On sm_90, Triton's default for an FP8 dot (max_num_imprecise_acc = 2^30) let the
warpgroup MMA sum the whole K range at its reduced precision (about 14 bits), so the tiles of 64 rows or more, and
the swapped tiles, could drop small terms that float32 keeps; tiles of 16 or 32 rows without swap_ab compile to
mma.sync on float16 operands (e4m3 converts exactly) with float32 sums. The kernels now add every K block's
product to the float32 accumulator (max_num_imprecise_acc = BLOCK_K). Checked in the sm_90 code (no GPU needed)
and, on a GPU, with operands whose small terms sit beside a large pair that cancels, which a 14-bit accumulator
would drop entirely.
"""
import re
from dataclasses import replace

import pytest
import torch

from epmoe import Fp8Config, MoEConfig, reference_moe
from epmoe.routing import Routing
from epmoe.testing import assert_close

CHANNEL = Fp8Config(weight_block=None, per_channel_weights=True, activation="per_token")

# tiles that compile to warpgroup MMAs on sm_90: (kernel, BLOCK_M, BLOCK_N, warps, stages, and compile_case's
# keywords: TMA weights, persistent walk, swap_ab, split_k, TMA activation rows)
WGMMA_TILES = {
    "gate_up BM64": ("gate_up", 64, 128, 4, 4, {}),
    "gate_up BM128": ("gate_up", 128, 128, 8, 3, {}),
    "gate_up BM64 persistent tma": ("gate_up", 64, 128, 4, 3, dict(tma=True, persistent=True)),
    "gate_up BM16 swap_ab": ("gate_up", 16, 128, 4, 4, dict(swap_ab=True)),
    "down BM64": ("down", 64, 128, 4, 4, {}),
    "down BM128": ("down", 128, 128, 8, 4, {}),
    "down BM128 split_k tma_a": ("down", 128, 128, 8, 4, dict(tma=True, split_k=2, tma_a=True)),
    "down BM16 swap_ab": ("down", 16, 128, 4, 4, dict(swap_ab=True)),
}


@pytest.mark.parametrize("tile", sorted(WGMMA_TILES))
def test_channel_fp8_dots_promote_every_k_block_on_sm90(tile):
    """Every warpgroup MMA of a per-row-scaled FP8 tile adds its K block to the float32 accumulator
    (maxNumImpreciseAcc = BLOCK_K in the TTGIR, where Triton's sm_90 default is 2^30), and that adds no spill to
    the K loop. Mixtral's sizes (the down GEMM's K is 14336). Compiled for sm_90, no GPU needed."""
    pytest.importorskip("triton", reason="the sm_90 cross-compile needs Triton (the [triton] extra)")
    from epmoe.kernels.xcompile import CrossCompileUnavailable, compile_case, local_accesses_in_mma_loops
    kernel, bm, bn, warps, stages, kw = WGMMA_TILES[tile]
    try:
        compiled = compile_case(kernel, 4096, 14336, 2, "fp8_channel", bm, bn, 128, warps, stages,
                                kw.get("tma", False), kw.get("persistent", False), 0, "sync", kw.get("tma_a", False),
                                0, kw.get("split_k", 1), kw.get("swap_ab", False))
    except CrossCompileUnavailable as exc:
        pytest.skip(str(exc))
    ttgir = compiled.asm["ttgir"]
    dots = re.findall(r"ttng\.warp_group_dot %[^\n]*", ttgir)
    assert dots, "expected warpgroup MMAs at these tiles"
    for dot in dots:
        assert "maxNumImpreciseAcc = 128 " in dot, dot
    assert "wgmma.mma_async" in compiled.asm["ptx"]
    assert local_accesses_in_mma_loops(compiled) in (0, None)


def _cancelling_operands(n_tokens: int, H: int, I: int):
    """One expert whose two GEMMs each sum a large pair that cancels (+-448 x 448, in the first and last K
    blocks) and one small product in every 32 columns of the K blocks between: exact sums 24 (gate and up: 6
    blocks x 4) and, after the activation and the per-token quantization of the intermediate, 24 x 7 x 576 / 448 =
    216 in every output column. A 14-bit accumulator holding 448 x 448 = 200704 drops each small product."""
    assert H % 128 == 0 and I % 128 == 0 and H >= 1024 and I >= 1024
    small_h = torch.zeros(H)
    small_h[128:H - 128:32] = 1.0
    small_i = torch.zeros(I)
    small_i[128:I - 128:32] = 1.0
    x = small_h.clone()
    x[0] = x[H - 1] = 448.0
    x = x.expand(n_tokens, H).contiguous()
    w1 = small_h.clone()
    w1[0], w1[H - 1] = 448.0, -448.0
    w1 = w1.expand(I, H).contiguous()                 # gate rows = up rows
    w2 = small_i * 2.0 ** -6                          # e4m3's smallest normal: products of 448 x 2^-6 = 7
    w2[0], w2[I - 1] = 448.0, -448.0
    w2 = w2.expand(H, I).contiguous()
    return x, w1, w2


def _operands(x, w1, w2, dev):
    from epmoe.kernels.fused_moe import Fp8Operands
    from epmoe.quant.fp8 import fp8_quantize_torch, quantize_weight
    xq, xs = fp8_quantize_torch(x.to(dev), None)
    q13, s13 = quantize_weight(torch.cat([w1, w1]).to(dev), "channel", None)
    q2, s2 = quantize_weight(w2.to(dev), "channel", None)
    ops = Fp8Operands(xs.reshape(-1).contiguous(), s13[None].contiguous(), s2[None].contiguous(), None, None,
                      "channel")
    return xq, q13[None].contiguous(), q2[None].contiguous(), ops


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("n_tokens", [1, 40, 200])
def test_channel_fp8_keeps_small_products_beside_a_cancelling_pair(n_tokens):
    """The flat and the batched layouts, at tiles of 16 rows (mma.sync), 16 rows swapped and 64 and 128 rows
    (warpgroup MMAs; on the flat layout also a down GEMM split in two K ranges, and a persistent walk where there
    is more than one token: one token runs one program per pair): every output is 216, the float64 oracle of the
    FP8 function, to float32 rounding. A 14-bit accumulator would give about 0 at the warpgroup tiles."""
    from epmoe.kernels.batched_moe import batched_experts
    from epmoe.kernels.fused_moe import fused_experts
    from epmoe.kernels.tuning_table import GemmConfig, MoEKernelConfig
    from epmoe.quant.fp8 import dequantize_weight
    dev = torch.device("cuda")
    H = I = 1024
    x, w1, w2 = _cancelling_operands(n_tokens, H, I)
    xq, q13, q2, ops = _operands(x, w1, w2, dev)
    ids = torch.zeros(n_tokens, 1, dtype=torch.int32, device=dev)
    weights = torch.ones(n_tokens, 1, dtype=torch.float32, device=dev)
    cfg = MoEConfig(num_experts=1, top_k=1, hidden_size=H, intermediate_size=I, dtype=torch.bfloat16,
                    quant=CHANNEL, activation="silu")
    w13d = dequantize_weight(q13[0], ops.w13_scale[0], None)
    ref = reference_moe(x.to(dev).bfloat16(), None,
                        [(w13d[:I], w13d[I:], dequantize_weight(q2[0], ops.w2_scale[0], None))], cfg,
                        routing=Routing(ids.long(), weights)).float()
    assert torch.allclose(ref, torch.full_like(ref, 216.0), rtol=1e-3), "the oracle of the constructed operands"
    tiles = {
        "BM16 mma.sync": MoEKernelConfig(16, GemmConfig(128, 128, 1, 4, 4), GemmConfig(128, 128, 1, 4, 4)),
        "BM16 swap_ab": MoEKernelConfig(16, GemmConfig(128, 128, 1, 4, 4, swap_ab=True),
                                        GemmConfig(128, 128, 1, 4, 4, swap_ab=True)),
        "BM64": MoEKernelConfig(64, GemmConfig(128, 128, 8, 4, 4), GemmConfig(128, 128, 8, 4, 4)),
        "BM128": MoEKernelConfig(128, GemmConfig(128, 128, 8, 8, 3), GemmConfig(128, 128, 8, 8, 4)),
    }
    flat_only = {
        "BM128 persistent": replace(tiles["BM128"], gate_up=replace(tiles["BM128"].gate_up, persistent=True),
                                    down=replace(tiles["BM128"].down, persistent=True)),
        "BM64 down split_k=2": replace(tiles["BM64"], down=replace(tiles["BM64"].down, split_k=2)),
    }
    for name, config in {**tiles, **flat_only}.items():
        out = fused_experts(xq, ids, weights, q13, q2, "silu", out_dtype=torch.bfloat16, config=config, fp8=ops)
        assert_close(out.float(), ref, 1e-3, context=f"flat layout, {name}, T={n_tokens}")
        if name in flat_only:
            continue
        counts = torch.tensor([n_tokens], dtype=torch.int32, device=dev)
        rows = batched_experts(xq[None], counts, q13, q2, "silu", config=config, fp8=ops,
                               out_dtype=torch.bfloat16, num_tokens=n_tokens)
        assert_close(rows[0].float(), ref, 1e-3, context=f"batched layout, {name}, T={n_tokens}")
