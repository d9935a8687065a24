"""The Triton experts on a GPU (H100/H200): BF16 and FP8 at each preset's real sizes against the float64
oracle, edge cases (T = 0, one token, all tokens on one expert, slots of remote experts, H not a
multiple of 128), the batched kernel, float16/float32, and CUDA-graph capture. Skips without a GPU."""
import re
from dataclasses import replace

import pytest
import torch

from epmoe import MoEConfig, MoELayer, reference_moe
from epmoe.layouts import BatchedBatch, FlatBatch
from epmoe.main_job import SeededExperts
from epmoe.presets import preset_config
from epmoe.routing import Routing
from epmoe.testing import LayerExperts, assert_close, random_experts

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PRESETS = ["mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v3", "gpt-oss-120b"]
CHECK_ROWS = 32


def _fp8(kind):
    from epmoe.quant.fp8 import Fp8Config
    if kind == "block":
        return Fp8Config(weight_block=(128, 128), activation="per_token_group")
    if kind == "channel_group":        # per-channel weights, activations per group of 128 columns
        return Fp8Config(weight_block=None, per_channel_weights=True, activation="per_token_group")
    return Fp8Config(weight_block=None, per_channel_weights=True, activation="per_token")


def _layer(cfg, source, experts="triton", bias=False):
    layer = MoELayer(cfg, experts=experts, device="cuda", expert_bias=bias)
    for e in range(cfg.num_experts):
        extra = {}
        if bias:
            g = torch.Generator(device="cuda").manual_seed(100 + e)
            extra = dict(gate_bias=torch.randn(cfg.intermediate_size, device="cuda", generator=g) * 0.1,
                         up_bias=torch.randn(cfg.intermediate_size, device="cuda", generator=g) * 0.1,
                         down_bias=torch.randn(cfg.hidden_size, device="cuda", generator=g) * 0.1)
        layer.load_expert(e, *source[e], **extra)
    if layer.score_correction_bias is not None:
        layer.score_correction_bias.copy_(torch.randn(cfg.num_experts, device="cuda") * 0.1)
    return layer


def _check_layer(layer, tokens, routing="random", bound=None, seed=0):
    cfg = layer.cfg
    g = torch.Generator(device="cuda").manual_seed(seed)
    experts = LayerExperts(layer)
    for T in tokens:
        x = torch.randn(T, cfg.hidden_size, device="cuda", generator=g).to(cfg.dtype)
        logits = torch.randn(T, cfg.num_experts, device="cuda", generator=g) * 2
        if routing == "onehot":
            logits[:, 3] = 100.0              # every token's top choice is expert 3
        out = layer(x, logits)
        torch.cuda.synchronize()
        assert out.shape == (T, cfg.hidden_size)
        if T == 0:
            continue
        rows = torch.arange(min(T, CHECK_ROWS), device="cuda")
        if T > CHECK_ROWS:
            rows = torch.cat([rows[:CHECK_ROWS // 2], torch.randperm(T, device="cuda", generator=g)[:CHECK_ROWS // 2]])
        ref = reference_moe(x[rows], logits[rows], experts, cfg, layer.score_correction_bias, device="cuda")
        assert_close(out[rows], ref, bound, context=f"{cfg.describe()} T={T} {routing}")


def _assert_graph_replay_is_eager(layer, T: int, seed: int = 6):
    """The layer's experts on T tokens (k distinct experts each), replayed in a CUDA graph: the eager bits."""
    cfg, experts = layer.cfg, layer.experts
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(T, cfg.hidden_size, device="cuda", generator=g).to(cfg.dtype)
    ids = torch.stack([torch.randperm(cfg.num_experts, device="cuda", generator=g)[:cfg.top_k]
                       for _ in range(T)]).to(torch.int32)
    w = torch.softmax(torch.randn(T, cfg.top_k, device="cuda", generator=g), 1)
    batch = FlatBatch(x, ids, w)
    eager = experts(batch, layer.expert_weights).clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = experts(batch, layer.expert_weights)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, eager)


@pytest.mark.parametrize("preset", PRESETS)
def test_real_size_bf16(preset):
    cfg = preset_config(preset, dtype=torch.bfloat16)
    layer = _layer(cfg, SeededExperts(cfg, seed=5, device="cuda"), bias=preset == "gpt-oss-120b")
    _check_layer(layer, (0, 1, 7, 128, 2048))
    _check_layer(layer, (300,), routing="onehot", seed=1)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("kind", ["block", "channel"])
def test_real_size_fp8(preset, kind):
    cfg = preset_config(preset, dtype=torch.bfloat16, quant=_fp8(kind))
    layer = _layer(cfg, SeededExperts(replace(cfg, quant=None), seed=6, device="cuda"))
    _check_layer(layer, (1, 33, 1024), bound=3e-2)
    _check_layer(layer, (200,), routing="onehot", bound=3e-2, seed=2)


@pytest.mark.parametrize("experts,fp8", [(e, f) for e in ("triton_ws", "triton_ws_down") for f in (None, "block")]
                         + [("triton_ws", "channel"), ("triton_ws", "channel_group")])
@pytest.mark.parametrize("preset", ["deepseek-v3", "mixtral-8x7b", "gpt-oss-120b"])
def test_triton_ws_real_size(preset, fp8, experts):
    """The experimental warp-specialized Gluon experts (Hopper only) at real sizes, BF16, block FP8 and
    per-channel FP8 (`triton_ws`: activations per token) (gpt-oss with its biases and swigluoai), against
    the oracle: T = 0, 1, a batch spanning many tiles, every token on one expert; both GEMMs Gluon ones, or
    the library's gate+up and the Gluon down."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("triton_ws runs on Hopper (compute capability 9.x)")
    cfg = preset_config(preset, dtype=torch.bfloat16, quant=_fp8(fp8) if fp8 else None)
    source = SeededExperts(replace(cfg, quant=None), seed=7, device="cuda")
    layer = _layer(cfg, source, experts=experts, bias=preset == "gpt-oss-120b")
    bound = 3e-2 if fp8 else None
    _check_layer(layer, (0, 1, 33, 2048), bound=bound)
    _check_layer(layer, (300,), routing="onehot", bound=bound, seed=3)


def test_triton_ws_long_block_fp8_experts(monkeypatch):
    """Block FP8 with LONG_EXPERT_ROWS or more rows per expert on average: `triton_ws`'s GEMMs walk in groups
    of up to LONG_EXPERT_GROUP m-tiles cut at expert edges (`walk_group`; `triton_ws_down`, whose down GEMM
    alone is a Gluon one, keeps the fixed walk). Mixtral at T = 6144 (1536 rows per expert, the least that
    takes this walk) and 8192: the layout takes the walk, every output row equals the fixed walk's bit for
    bit (a walk moves work between programs, not values), and sampled rows agree with the oracle."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("triton_ws runs on Hopper (compute capability 9.x)")
    from epmoe.experts import triton_ws
    cfg = preset_config("mixtral-8x7b", dtype=torch.bfloat16, quant=_fp8("block"))
    source = SeededExperts(replace(cfg, quant=None), seed=8, device="cuda")
    layer = _layer(cfg, source, experts="triton_ws")
    down_only = _layer(cfg, source, experts="triton_ws_down")
    g = torch.Generator(device="cuda").manual_seed(9)
    for T in (6144, 8192):
        x = torch.randn(T, cfg.hidden_size, device="cuda", generator=g).to(cfg.dtype)
        logits = torch.randn(T, cfg.num_experts, device="cuda", generator=g) * 2
        batch = FlatBatch(x, logits.topk(cfg.top_k, dim=1).indices.to(torch.int32),
                          torch.rand(T, cfg.top_k, device="cuda", generator=g))
        for lay, long in ((layer, True), (down_only, False)):
            walk = lay.experts.padded_layout(batch, lay.expert_weights).walk_groups
            assert (walk is not None) == long, (T, lay.experts)
            if long:
                assert int(walk[:, 1].max()) <= 2 * triton_ws.LONG_EXPERT_GROUP - 1
                assert int(walk[:, 1].max()) > 8             # not the groups of 8
        out = layer(x, logits)
        with monkeypatch.context() as m:
            m.setattr(triton_ws, "walk_group", lambda *args: None)
            fixed = layer(x, logits)
        torch.cuda.synchronize()
        assert torch.equal(out, fixed), T
    _check_layer(layer, (6144, 8192), bound=3e-2)


@pytest.mark.parametrize("gathered", [False, True])
def test_the_wide_bf16_product_agrees_with_the_gemm_statement(gathered):
    """`wide_mma` (one 64 x 256 product per K step in BF16 tiles of 256) against the Gluon GEMM's PyTorch
    statement on the self-check's problems (plain with N = 320 clipped, gated with bias and activation, a
    skipped tile that must keep its rows, two programs walking several tiles as the ring wraps; `gathered`:
    the gate+up's A rows picked from fewer tokens), with the outputs by TMA store and from registers; and
    its outputs against the two-box form's on a larger problem (the same products summed in the same order
    of K steps: equal within a bfloat16 rounding)."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon GEMM runs on Hopper (compute capability 9.x)")
    from functools import partial
    from epmoe.experts.triton_ws import gemm_disagreement
    from epmoe.kernels.ws_grouped_gemm import grouped_gemm_ws
    dev = torch.device("cuda")
    for store_tma in (None, False):
        wide = partial(grouped_gemm_ws, block_n=256, wide_mma=True, store_tma=store_tma)
        assert gemm_disagreement(wide, dev, None, gathered=gathered) is None
    g = torch.Generator(device=dev).manual_seed(1)
    M, K, E = 6 * 128, 2048, 3
    tile_expert = torch.tensor([2, 0, 0, -1, 1, 2], dtype=torch.int32, device=dev)
    a = torch.randn(M, K, generator=g, device=dev).bfloat16()
    w = (torch.randn(E, 512, K, generator=g, device=dev) * 0.05).bfloat16()
    outs = []
    for wide_mma in (False, True):
        out = torch.full((M, 512), 7.0, dtype=torch.bfloat16, device=dev)
        grouped_gemm_ws(a, w, tile_expert, out, block_n=256, wide_mma=wide_mma)
        outs.append(out.float())
    narrow, wide_out = outs
    assert bool((wide_out[3 * 128:4 * 128] == 7.0).all())          # the skipped tile's rows kept
    assert torch.isfinite(wide_out).all()
    assert ((wide_out - narrow).norm() / narrow.norm()).item() <= 1e-3
    print(f"wide vs two-box outputs bit for bit equal: {torch.equal(wide_out, narrow)}")


@pytest.mark.parametrize("gathered", [False, True])
def test_gluon_gemm_self_check_in_every_form(gathered):
    """The Gluon GEMM itself (Hopper only) against its PyTorch statement on the self-check's problems in
    every form (BF16 and the FP8 forms: block, per-channel with A per row, per-channel with A per group of
    128), with the gate+up's A rows in layout order and (`gathered`) picked from fewer tokens by `a_rows`,
    which the backends do not launch but the kernel takes."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon GEMM runs on Hopper (compute capability 9.x)")
    from epmoe.experts.triton_ws import FP8_FORMS, gemm_disagreement
    from epmoe.kernels.ws_grouped_gemm import grouped_gemm_ws
    for form in (None,) + FP8_FORMS:
        assert gemm_disagreement(grouped_gemm_ws, torch.device("cuda"), form, gathered=gathered) is None, form


@pytest.mark.parametrize("form", ["fp8", "fp8_gated", "bf16"])
def test_the_gluon_gemm_diagnostic_forms(form):
    """The Gluon GEMM's diagnostic forms (`profile_ws_gemm.py --diagnostic`) on one program that walks two tiles of
    as many K blocks as the ring has slots (tile 0 of expert 1, a skipped tile, tile 2 of expert 0), so that the
    second tile's steps are the ring's second round: `none` agrees with the PyTorch statement and keeps the skipped
    tile's rows; `no_loads` loads only the first round, so tile 2 is computed from tile 0's rows and expert 1's
    weights left in the slots: its outputs equal tile 0's bit for bit (unit scales), tile 0's equal the GEMM's;
    `no_math` leaves the output as it was, and its loader's second round waits for the math warps' releases (a
    missing one hangs); `no_promote` with unit scales agrees with the GEMM within the tensor cores' accumulation.
    Forms: plain block FP8 (A scales from global memory), the gated block-FP8 gate+up as the experts run it (A scales
    by TMA, FP8 output), plain BF16. Each launch is polled (60 s): a hang fails with its message, and the GPU work
    of this process cannot go on after it."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon GEMM runs on Hopper (compute capability 9.x)")
    from epmoe.experts.triton_ws import grouped_gemm_reference, unfinished
    from epmoe.kernels.ws_grouped_gemm import grouped_gemm_ws
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(3)
    fp8, gated = form != "bf16", form == "fp8_gated"
    stages = 3 if gated else 4
    block_k, E, w_rows = (128 if fp8 else 64), 2, 256
    M, K = 3 * 128, stages * block_k                 # a tile's K blocks fill the ring once
    n_out = w_rows // 2 if gated else w_rows
    tile_expert = torch.tensor([1, -1, 0], dtype=torch.int32, device=dev)
    dtype = torch.float8_e4m3fn if fp8 else torch.bfloat16
    a = (torch.randn(M, K, generator=g, device=dev) * 0.5).to(dtype)
    w = (torch.randn(E, w_rows, K, generator=g, device=dev) * 0.5).to(dtype)
    scales = ((torch.ones(K // 128, M, device=dev), torch.ones(E, w_rows // 128, K // 128, device=dev)) if fp8
              else (None, None))
    out_dtype = torch.float8_e4m3fn if gated else torch.bfloat16
    extra = dict(scale_tma=True) if gated else {}

    def launch(gemm, diagnostic="none"):
        out = torch.full((M, n_out), 7.0, device=dev).to(out_dtype)
        out_scale_t = torch.full((n_out // 128, M), 3.0, device=dev) if gated else None
        gemm(a, w, tile_expert, out, *scales, None, "silu" if gated else None, out_scale_t, stages=stages,
             num_programs=1, diagnostic=diagnostic, **(extra if gemm is grouped_gemm_ws else {}))
        if gemm is grouped_gemm_ws:
            done = torch.cuda.Event()
            done.record()
            why = unfinished(done, 60.0)
            assert why is None, f"{form} {diagnostic}: {why}"
        values = out.float()
        return values * out_scale_t.t().repeat_interleave(128, 1) if gated else values

    want = launch(grouped_gemm_reference)
    full = launch(grouped_gemm_ws)
    assert ((full - want).norm() / want.norm()).item() <= 1e-2
    sentinel = 7.0 * 3.0 if gated else 7.0
    assert bool((full[128:256] == sentinel).all())
    no_loads = launch(grouped_gemm_ws, "no_loads")
    assert torch.equal(no_loads[:128], full[:128]) and torch.equal(no_loads[256:], full[:128])
    assert not torch.equal(full[256:], full[:128])           # the test can tell: tile 2's own outputs differ
    assert bool((launch(grouped_gemm_ws, "no_math") == sentinel).all())
    unpromoted = launch(grouped_gemm_ws, "no_promote")
    assert bool((unpromoted[128:256] == sentinel).all())
    assert ((unpromoted - full).norm() / full.norm()).item() <= 1e-2
    if not fp8:
        assert torch.equal(unpromoted, full)                    # BF16 has no promotion: the same kernel


@pytest.mark.parametrize("fp8", [False, True])
def test_triton_runs_the_gluon_pipeline_where_its_table_says(fp8, tmp_path, monkeypatch):
    """`triton` with a table whose mixtral entry at T = 2048 says `gluon` (Hopper only): the pipeline is
    set up when the layer is built, runs the batches that entry serves (against the oracle, and replayed in
    a CUDA graph), and decode-size batches keep the tiles."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon GEMMs run on Hopper (compute capability 9.x)")
    from epmoe.bench import tune
    from epmoe.kernels import tuning_table
    cfg = preset_config("mixtral-8x7b", dtype=torch.bfloat16, quant=_fp8("block") if fp8 else None)
    fmt = "fp8_block" if fp8 else "bfloat16"
    tiles = tuning_table.lookup_config(2048, 8, 4096, 14336, 2, fmt, torch.device("cuda"))[0]
    table = str(tmp_path / "gluon.json")
    tune.merge_into_table(table, tuning_table.shape_key(8, 4096, 14336, 2, fmt),
                          {2048: (replace(tiles, gluon=True), 1.0)}, {"device": "test"})
    monkeypatch.setattr(tuning_table, "table_paths_for_device", lambda device=None: [table])
    layer = _layer(cfg, SeededExperts(replace(cfg, quant=None), seed=9, device="cuda"))
    experts = layer.experts
    assert experts.gluon is not None
    assert experts.kernel_config(2048, layer.expert_weights).gluon
    assert not experts.kernel_config(16, layer.expert_weights).gluon
    bound = 3e-2 if fp8 else None
    _check_layer(layer, (1, 2048), bound=bound, seed=4)
    _assert_graph_replay_is_eager(layer, 2048)


@pytest.mark.parametrize("dtype,bound", [(torch.float16, 5e-3), (torch.float32, 1e-5)])
def test_other_dtypes_and_awkward_sizes(dtype, bound):
    cfg = MoEConfig(num_experts=16, top_k=4, hidden_size=200, intermediate_size=136, activation="gelu", dtype=dtype)
    layer = _layer(cfg, [tuple(t.to("cuda") for t in e) for e in random_experts(cfg, seed=4)])
    _check_layer(layer, (0, 1, 5, 333), bound=bound)
    _check_layer(layer, (77,), routing="onehot", bound=bound)


def test_remote_slots_and_cuda_graph():
    """Slots whose expert lives elsewhere (-1) contribute nothing; the whole forward replays in a graph."""
    from epmoe.experts.triton import TritonExperts
    cfg = preset_config("qwen3-30b-a3b", dtype=torch.bfloat16)
    layer = _layer(cfg, SeededExperts(cfg, seed=8, device="cuda"))
    experts = TritonExperts(cfg, torch.device("cuda"))
    g = torch.Generator(device="cuda").manual_seed(3)
    T = 96
    x = torch.randn(T, cfg.hidden_size, device="cuda", generator=g).to(cfg.dtype)
    ids = torch.stack([torch.randperm(cfg.num_experts, device="cuda", generator=g)[:cfg.top_k] for _ in range(T)])
    w = torch.softmax(torch.randn(T, cfg.top_k, device="cuda", generator=g), 1)
    local = torch.where(ids < 64, ids, -1).to(torch.int32)         # experts 64.. live on another rank
    batch = FlatBatch(x, local, w)
    static_out = experts(batch, layer.expert_weights)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = experts(batch, layer.expert_weights)
    x.copy_(torch.randn(T, cfg.hidden_size, device="cuda", generator=g).to(cfg.dtype))
    graph.replay()
    torch.cuda.synchronize()
    ref = reference_moe(x, None, LayerExperts(layer), cfg, device="cuda",
                        routing=Routing(ids.to(torch.int32), torch.where(ids < 64, w, 0.0)))
    assert_close(static_out, ref, 1e-2, context="graph replay, remote slots")


@pytest.mark.parametrize("num_tokens", [None, 4])
@pytest.mark.parametrize("fp8", [False, True])
def test_batched_kernel(fp8, num_tokens):
    """The real rows of each expert against the oracle, whatever the padding held (NaN); the rows past each
    count left as the output buffer held them. num_tokens=4: tiles and slots for one row an expert, while
    experts hold up to 48 (their row blocks run in turn)."""
    from epmoe.kernels.batched_moe import batched_experts
    from epmoe.kernels.fused_moe import Fp8Operands
    cfg = preset_config("deepseek-v3", dtype=torch.bfloat16, quant=_fp8("block") if fp8 else None)
    cfg = replace(cfg, num_experts=32, n_group=None, topk_group=None)
    src = SeededExperts(replace(cfg, quant=None), seed=9, device="cuda")
    layer = _layer(cfg, src)
    C, H = 48, cfg.hidden_size
    counts = torch.randint(0, C + 1, (cfg.num_experts,), device="cuda", dtype=torch.int32)
    counts[0], counts[1] = 0, C
    x = torch.randn(cfg.num_experts, C, H, device="cuda").to(cfg.dtype)
    x[torch.arange(C, device="cuda")[None, :] >= counts[:, None]] = float("nan")    # padding rows: garbage
    w = layer.expert_weights
    ops = None
    xin = x
    if fp8:
        xin, xs = cfg.quant_scheme.quantize_activations(x)
        ops = Fp8Operands(xs.float().contiguous(), w.w13_scale, w.w2_scale, 128, (128, 128), "block")
    held = torch.full((cfg.num_experts, C, H), 7.0, device="cuda", dtype=cfg.dtype)
    out = batched_experts(xin, counts, w.w13, w.w2, cfg.activation, top_k=cfg.top_k, out_dtype=cfg.dtype, fp8=ops,
                          num_tokens=num_tokens, out=held)
    assert out is held
    experts = LayerExperts(layer)
    for e in range(cfg.num_experts):
        n = int(counts[e])
        assert (out[e, n:] == 7.0).all()
        if n:
            one = replace(cfg, num_experts=1, top_k=1)
            ref = reference_moe(x[e, :n], None, [experts[e]], one, device="cuda",
                                routing=Routing(torch.zeros(n, 1, dtype=torch.int32), torch.ones(n, 1)))
            assert_close(out[e, :n], ref, 3e-2 if fp8 else 1e-2, context=f"expert {e} ({n} rows)")


def test_batched_backend_uses_the_kernel_on_cuda(monkeypatch):
    """experts='batched' on CUDA runs the Triton kernel and agrees with its PyTorch path."""
    from epmoe import contract
    if "batched" not in contract.EXPERTS:
        pytest.skip("no batched experts backend registered")
    import epmoe.kernels.batched_moe as kernel_module
    from epmoe.experts.batched import BatchedExperts, batched_experts_torch
    calls = []
    real = kernel_module.batched_experts
    monkeypatch.setattr(kernel_module, "batched_experts", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    cfg = preset_config("qwen3-30b-a3b", dtype=torch.bfloat16)
    layer = _layer(cfg, SeededExperts(cfg, seed=10, device="cuda"))
    C = 24
    counts = torch.randint(0, C + 1, (cfg.num_experts,), device="cuda", dtype=torch.int32)
    x = torch.randn(cfg.num_experts, C, cfg.hidden_size, device="cuda").to(cfg.dtype)
    out = BatchedExperts(cfg, torch.device("cuda"))(BatchedBatch(x, counts), layer.expert_weights)
    assert calls, "the batched backend did not call the Triton kernel on CUDA"
    ref = batched_experts_torch(x, counts, layer.expert_weights, cfg.activation, cfg.dtype)
    real = torch.arange(C, device="cuda")[None, :] < counts[:, None]       # rows past each count: unspecified
    assert_close(out[real].float(), ref[real].double(), 1e-2)


@pytest.mark.parametrize("preset", ["qwen3-30b-a3b", "deepseek-v3"])
def test_split_tiles_and_direct_path(preset):
    """The split layout (body tiles + tail tiles of 64 / 32 rows, two launches per GEMM) and the direct
    path of one token (no alignment pass) against the uniform layout and the oracle, bf16, random and
    one-hot routing, with the slots of remote experts skipped."""
    from epmoe.kernels.fused_moe import fused_experts
    from epmoe.kernels.tuning_table import GemmConfig, MoEKernelConfig
    cfg = preset_config(preset, dtype=torch.bfloat16)
    layer = _layer(cfg, SeededExperts(cfg, seed=9, device="cuda"))
    w = layer.expert_weights
    g = torch.Generator(device="cuda").manual_seed(4)
    E, k, H = cfg.num_experts, cfg.top_k, cfg.hidden_size
    uniform = MoEKernelConfig(128, GemmConfig(128, 64, 8, 8, 4), GemmConfig(256, 64, 8, 8, 4, tma=True))
    for T, onehot in ((1, False), (1500, False), (700, True)):
        x = torch.randn(T, H, device="cuda", generator=g).to(cfg.dtype)
        ids = torch.stack([torch.randperm(E, device="cuda", generator=g)[:k] for _ in range(T)])
        if onehot:
            ids[:, 0] = torch.where((ids[:, 1:] == 3).any(1), ids[:, 0], 3)
        wts = torch.softmax(torch.randn(T, k, device="cuda", generator=g), 1)
        local = torch.where(ids < E - 8, ids, -1).to(torch.int32)
        ref = reference_moe(x, None, LayerExperts(layer), cfg, device="cuda",
                            routing=Routing(ids.to(torch.int32), torch.where(ids < E - 8, wts, 0.0)))
        base = fused_experts(x, local, wts, w.w13, w.w2, cfg.activation, config=uniform)
        for tail in (64, 32):
            out = fused_experts(x, local, wts, w.w13, w.w2, cfg.activation,
                                config=replace(uniform, tail_m=tail))
            torch.cuda.synchronize()
            assert_close(out, ref, 1e-2, context=f"{preset} T={T} onehot={onehot} tail={tail}")
            assert_close(out, base, 1e-3, context=f"{preset} T={T} tail={tail} vs uniform tiles")


@pytest.mark.parametrize("preset", ["qwen3-30b-a3b", "gpt-oss-120b"])
def test_persistent_kernels(preset):
    """Persistent GEMMs (one program per SM walking the tiles in a flattened, pipelined loop; pointer and
    TMA weight loads; uniform tiles and the split layout) against the oracle and the one-program-per-tile
    kernels, bf16, random and one-hot routing, with the slots of remote experts skipped; and inside a
    CUDA graph (the grid depends on shapes only, the tile count is read on the GPU)."""
    from epmoe.kernels.fused_moe import fused_experts
    from epmoe.kernels.tuning_table import GemmConfig, MoEKernelConfig
    cfg = preset_config(preset, dtype=torch.bfloat16)
    bias = preset == "gpt-oss-120b"
    layer = _layer(cfg, SeededExperts(cfg, seed=9, device="cuda"), bias=bias)
    w = layer.expert_weights
    g = torch.Generator(device="cuda").manual_seed(5)
    E, k, H = cfg.num_experts, cfg.top_k, cfg.hidden_size
    plain = MoEKernelConfig(128, GemmConfig(128, 64, 8, 8, 4), GemmConfig(256, 64, 8, 8, 4, tma=True))
    variants = {"P": MoEKernelConfig(128, GemmConfig(128, 64, 8, 8, 4, persistent=True),
                                     GemmConfig(256, 64, 8, 8, 4, tma=True, persistent=True)),
                "P tma/ptr": MoEKernelConfig(128, GemmConfig(128, 64, 8, 8, 4, tma=True, persistent=True),
                                             GemmConfig(256, 64, 8, 8, 4, persistent=True)),
                "P tail64": MoEKernelConfig(128, GemmConfig(128, 64, 8, 8, 4, persistent=True),
                                            GemmConfig(256, 64, 8, 8, 4, tma=True, persistent=True), tail_m=64),
                # the down GEMM's activation rows through a tensor descriptor too, uniform and split tiles
                "P tma_a": MoEKernelConfig(128, GemmConfig(128, 64, 8, 8, 4, persistent=True),
                                           GemmConfig(256, 64, 8, 8, 3, tma=True, tma_a=True, persistent=True)),
                "tma_a tail64": MoEKernelConfig(128, GemmConfig(128, 64, 8, 8, 4),
                                                GemmConfig(256, 64, 8, 8, 3, tma=True, tma_a=True), tail_m=64)}
    for T, onehot in ((3000, False), (700, True)):
        x = torch.randn(T, H, device="cuda", generator=g).to(cfg.dtype)
        ids = torch.stack([torch.randperm(E, device="cuda", generator=g)[:k] for _ in range(T)])
        if onehot:
            ids[:, 0] = torch.where((ids[:, 1:] == 3).any(1), ids[:, 0], 3)
        wts = torch.softmax(torch.randn(T, k, device="cuda", generator=g), 1)
        local = torch.where(ids < E - 8, ids, -1).to(torch.int32)
        rows = torch.randperm(T, device="cuda", generator=g)[:CHECK_ROWS]
        ref = reference_moe(x[rows], None, LayerExperts(layer), cfg, device="cuda",
                            routing=Routing(ids[rows].to(torch.int32), torch.where(ids[rows] < E - 8, wts[rows], 0.0)))
        kw = dict(b13=w.b13, b2=w.b2)
        base = fused_experts(x, local, wts, w.w13, w.w2, cfg.activation, config=plain, **kw)
        for name, config in variants.items():
            out = fused_experts(x, local, wts, w.w13, w.w2, cfg.activation, config=config, **kw)
            torch.cuda.synchronize()
            assert_close(out[rows], ref, 1e-2, context=f"{preset} T={T} onehot={onehot} {name}")
            assert_close(out, base, 1e-3, context=f"{preset} T={T} {name} vs one program per tile")
    # CUDA graph: captured once, replayed on new routing of the same shape
    config = variants["P tail64"]
    T = 1000
    x = torch.randn(T, H, device="cuda", generator=g).to(cfg.dtype)
    ids = torch.stack([torch.randperm(E, device="cuda", generator=g)[:k] for _ in range(T)]).to(torch.int32)
    wts = torch.softmax(torch.randn(T, k, device="cuda", generator=g), 1)
    fused_experts(x, ids, wts, w.w13, w.w2, cfg.activation, config=config, b13=w.b13, b2=w.b2)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_experts(x, ids, wts, w.w13, w.w2, cfg.activation, config=config, b13=w.b13, b2=w.b2)
    ids.copy_(torch.stack([torch.randperm(E, device="cuda", generator=g)[:k] for _ in range(T)]))
    graph.replay()
    torch.cuda.synchronize()
    base = fused_experts(x, ids, wts, w.w13, w.w2, cfg.activation, config=plain, b13=w.b13, b2=w.b2)
    assert_close(out, base, 1e-3, context=f"{preset} persistent in a CUDA graph")


@pytest.mark.parametrize("preset", ["deepseek-v3"])
def test_persistent_kernels_fp8(preset):
    """FP8 block (128x128 weight scales, activations per 128 columns), persistent GEMMs on uniform and
    split tiles, and the down GEMM's activation rows through a tensor descriptor, against the oracle."""
    from epmoe.kernels.tuning_table import GemmConfig, MoEKernelConfig
    cfg = preset_config(preset, dtype=torch.bfloat16, quant=_fp8("block"))
    layer = _layer(cfg, SeededExperts(replace(cfg, quant=None), seed=6, device="cuda"))
    experts = layer.experts
    for persistent, tail, tma_a in ((True, 0, False), (True, 64, False), (True, 0, True), (False, 64, True)):
        config = MoEKernelConfig(128, GemmConfig(128, 128, 8, 8, 3, persistent=persistent),
                                 GemmConfig(128, 128, 8, 8, 3 if tma_a else 4, tma=True, tma_a=tma_a,
                                            persistent=persistent), tail_m=tail)
        experts._configs.clear()
        experts.kernel_config = lambda num_rows, weights, c=config: c
        _check_layer(layer, (2048,), bound=3e-2, seed=3)
        _check_layer(layer, (300,), routing="onehot", bound=3e-2, seed=4)


@pytest.mark.parametrize("preset,experts", [("deepseek-v3", 32), ("mixtral-8x7b", None)])
def test_fp8_block_promote_variants(preset, experts):
    """The block-FP8 "rescale" promotion (opt-in: `epmoe tune --allow-rescale`; pointer and TMA weights,
    one program per tile and persistent, uniform and split tiles) at real sizes against the oracle (the
    library's FP8 bound), and "sync" (each K block's product promoted to float32, the default) to the
    precision it was measured at. Rescale accumulates the whole K range in the tensor cores' FP8
    accumulator: measured 1.5e-2 against 4e-3 (benchmarks/notes_kernels.md)."""
    from epmoe.kernels.tuning_table import GemmConfig, MoEKernelConfig
    from epmoe.presets import shrink_config
    cfg = preset_config(preset, dtype=torch.bfloat16, quant=_fp8("block"))
    if experts:
        cfg = shrink_config(cfg, experts=experts)
    layer = _layer(cfg, SeededExperts(replace(cfg, quant=None), seed=8, device="cuda"))
    triton_experts = layer.experts
    variants = {
        "sync": MoEKernelConfig(128, GemmConfig(128, 128, 8, 8, 3), GemmConfig(128, 128, 8, 8, 4, tma=True), 64),
        "rescale persistent": MoEKernelConfig(128, GemmConfig(128, 128, 8, 8, 3, tma=True, persistent=True,
                                                              promote="rescale"),
                                              GemmConfig(256, 128, 8, 8, 3, persistent=True, promote="rescale")),
        "rescale": MoEKernelConfig(128, GemmConfig(128, 128, 8, 8, 3, tma=True, promote="rescale"),
                                   GemmConfig(256, 128, 8, 8, 3, tma=True, promote="rescale"), 64),
        "rescale pointers": MoEKernelConfig(128, GemmConfig(128, 128, 8, 8, 4, promote="rescale"),
                                            GemmConfig(128, 128, 8, 8, 4, promote="rescale")),
    }
    g = torch.Generator(device="cuda").manual_seed(5)
    T = 2048
    x = torch.randn(T, cfg.hidden_size, device="cuda", generator=g).to(cfg.dtype)
    x[3, 256:384] = 0.0                     # an all-zero activation group (the rescale floor)
    logits = torch.randn(T, cfg.num_experts, device="cuda", generator=g) * 2
    rows = torch.cat([torch.arange(16, device="cuda"), torch.randperm(T, device="cuda", generator=g)[:16]])
    ref = reference_moe(x[rows], logits[rows], LayerExperts(layer), cfg, layer.score_correction_bias, device="cuda")
    outs = {}
    for name, config in variants.items():
        triton_experts._configs.clear()
        triton_experts.kernel_config = lambda num_rows, weights, c=config: c
        outs[name] = layer(x, logits)
        torch.cuda.synchronize()
        assert torch.isfinite(outs[name]).all(), name
        assert_close(outs[name][rows], ref, 8e-3 if name == "sync" else 3e-2, context=f"{preset} {name}")
        assert_close(outs[name], outs["sync"], 3e-2, context=f"{preset} {name} against sync")


@pytest.mark.parametrize("preset", PRESETS)
def test_decode_gemv_path(preset):
    """The decode path (config.gemv: two matrix-vector kernels, slot sum in the second) at real sizes,
    bf16, T = 1, 3 and 16, with biases (gpt-oss), slots of remote experts and every token on one expert,
    against the oracle and the tile path, with and without PDL (the down kernel starting early and
    prefetching its weights); then the PDL path replayed in a CUDA graph on new routing."""
    from epmoe.kernels.fused_moe import fused_experts
    from epmoe.kernels.tuning_table import GemmConfig, GemvConfig, MoEKernelConfig
    from epmoe.testing import capture
    cfg = preset_config(preset, dtype=torch.bfloat16)
    bias = preset == "gpt-oss-120b"
    layer = _layer(cfg, SeededExperts(cfg, seed=11, device="cuda"), bias=bias)
    w = layer.expert_weights
    b13, b2 = w.b13, w.b2
    g = torch.Generator(device="cuda").manual_seed(12)
    E, k, H = cfg.num_experts, cfg.top_k, cfg.hidden_size
    tiles = MoEKernelConfig(16, GemmConfig(64, 128, 1, 4, 4), GemmConfig(64, 128, 1, 4, 4))
    plain = GemvConfig(16, 256, 8, 256, 4, 4, 3, 1)
    gemv = replace(tiles, gemv=replace(plain, pdl=True))
    remote = E - max(1, E // 8)

    def inputs(T, onehot):
        x = torch.randn(T, H, device="cuda", generator=g).to(cfg.dtype)
        ids = torch.stack([torch.randperm(E, device="cuda", generator=g)[:k] for _ in range(T)])
        if onehot:
            ids[:, 0] = torch.where((ids[:, 1:] == 3).any(1), ids[:, 0], 3)
        wts = torch.softmax(torch.randn(T, k, device="cuda", generator=g), 1)
        return x, ids, wts

    for T, onehot in ((1, False), (3, True), (16, False)):
        x, ids, wts = inputs(T, onehot)
        local = torch.where(ids < remote, ids, -1).to(torch.int32)
        ref = reference_moe(x, None, LayerExperts(layer), cfg, device="cuda",
                            routing=Routing(ids.to(torch.int32), torch.where(ids < remote, wts, 0.0)))
        out = fused_experts(x, local, wts, w.w13, w.w2, cfg.activation, b13=b13, b2=b2, config=gemv)
        no_pdl = fused_experts(x, local, wts, w.w13, w.w2, cfg.activation, b13=b13, b2=b2,
                               config=replace(tiles, gemv=plain))
        base = fused_experts(x, local, wts, w.w13, w.w2, cfg.activation, b13=b13, b2=b2, config=tiles)
        torch.cuda.synchronize()
        assert_close(out, ref, 1e-2, context=f"{preset} gemv T={T} onehot={onehot}")
        assert torch.equal(out, no_pdl), f"{preset} T={T}: PDL changed the result"
        assert_close(out, base, 1e-2, context=f"{preset} gemv T={T} against the tile path")

    x, ids, wts = inputs(1, False)
    local = ids.to(torch.int32)
    replay, static_out = capture(lambda: fused_experts(x, local, wts, w.w13, w.w2, cfg.activation, b13=b13, b2=b2,
                                                       config=gemv))
    x2, ids2, wts2 = inputs(1, False)
    x.copy_(x2)
    local.copy_(ids2)
    wts.copy_(wts2)
    replay()
    torch.cuda.synchronize()
    ref = reference_moe(x, None, LayerExperts(layer), cfg, device="cuda", routing=Routing(local, wts))
    assert_close(static_out, ref, 1e-2, context=f"{preset} gemv T=1 graph replay on new routing")


@pytest.mark.parametrize("preset", ["qwen3-30b-a3b", "deepseek-v3"])
@pytest.mark.parametrize("kind", ["block", "channel_group"])
def test_decode_gemv_path_fp8(preset, kind):
    """The decode path in FP8 at real sizes (activations per group of 128; weights per 128x128 block or per
    row): T = 1 and 5 with remote slots, against the oracle (FP8 bound) and the tile path, with PDL, and
    replayed in a CUDA graph."""
    from epmoe.kernels.fused_moe import Fp8Operands, fused_experts
    from epmoe.kernels.tuning_table import GemmConfig, GemvConfig, MoEKernelConfig
    from epmoe.quant.fp8 import Fp8Config
    from epmoe.testing import capture
    quant = (Fp8Config(weight_block=(128, 128), activation="per_token_group") if kind == "block" else
             Fp8Config(weight_block=None, per_channel_weights=True, activation="per_token_group"))
    cfg = preset_config(preset, dtype=torch.bfloat16, quant=quant)
    layer = _layer(cfg, SeededExperts(replace(cfg, quant=None), seed=13, device="cuda"))
    w = layer.expert_weights
    E, k, H = cfg.num_experts, cfg.top_k, cfg.hidden_size
    g = torch.Generator(device="cuda").manual_seed(14)
    tiles = MoEKernelConfig(16, GemmConfig(128, 128, 1, 4, 3), GemmConfig(128, 128, 1, 4, 3))
    gemv = replace(tiles, gemv=GemvConfig(16, 256, 8, 256, 4, 4, 3, 3, pdl=True))

    def run(x, local, wts, config):
        xq, xs = cfg.quant_scheme.quantize_activations(x)
        ops = Fp8Operands(xs.float().contiguous(), w.w13_scale, w.w2_scale, 128, quant.weight_block,
                          quant.weight_granularity)
        return fused_experts(xq, local, wts, w.w13, w.w2, cfg.activation, out_dtype=cfg.dtype, config=config,
                             fp8=ops)

    for T in (1, 5):
        x = torch.randn(T, H, device="cuda", generator=g).to(cfg.dtype)
        ids = torch.stack([torch.randperm(E, device="cuda", generator=g)[:k] for _ in range(T)])
        wts = torch.softmax(torch.randn(T, k, device="cuda", generator=g), 1)
        local = torch.where(ids < E - 16, ids, -1).to(torch.int32)
        ref = reference_moe(x, None, LayerExperts(layer), cfg, device="cuda",
                            routing=Routing(ids.to(torch.int32), torch.where(ids < E - 16, wts, 0.0)))
        out, base = run(x, local, wts, gemv), run(x, local, wts, tiles)
        torch.cuda.synchronize()
        assert_close(out, ref, 3e-2, context=f"{preset} fp8 {kind} gemv T={T}")
        assert_close(out, base, 1e-2, context=f"{preset} fp8 {kind} gemv T={T} against the tile path")
    replay, static_out = capture(lambda: run(x, local, wts, gemv))
    x.copy_(torch.randn(T, H, device="cuda", generator=g).to(cfg.dtype))
    replay()
    torch.cuda.synchronize()
    ref = reference_moe(x, None, LayerExperts(layer), cfg, device="cuda",
                        routing=Routing(ids.to(torch.int32), torch.where(ids < E - 16, wts, 0.0)))
    assert_close(static_out, ref, 3e-2, context=f"{preset} fp8 {kind} gemv graph replay")


@pytest.mark.parametrize("preset", ["mixtral-8x7b", "gpt-oss-120b"])
def test_down_split_over_k_fp8(preset, monkeypatch):
    """The down GEMM's K range split in 2 and 4 (float32 partial rows the slot sum adds) at real sizes in
    block FP8: T = 1, 16 and 33 against the oracle (gpt-oss-120b with its biases, which only the first range
    adds), whatever the table says for these batches."""
    from epmoe.kernels import tuning_table
    from epmoe.kernels.tuning_table import GemmConfig, MoEKernelConfig
    cfg = preset_config(preset, dtype=torch.bfloat16, quant=_fp8("block"))
    layer = _layer(cfg, SeededExperts(replace(cfg, quant=None), seed=17, device="cuda"),
                   bias=preset == "gpt-oss-120b")
    for split, tma in ((2, False), (4, True)):
        config = MoEKernelConfig(16, GemmConfig(128, 128, 1, 8, 3), GemmConfig(64, 128, 1, 4, 6, tma=tma,
                                                                                split_k=split))
        monkeypatch.setattr(tuning_table, "lookup_config", lambda *a, **k: (config, "test"))
        layer.experts._configs.clear()
        _check_layer(layer, (1, 16, 33), bound=3e-2, seed=split)


@pytest.mark.parametrize("hidden,inter", [(2880, 256), (1024, 200)])
def test_block_fp8_experts_whose_scales_differ(hidden, inter):
    """Block FP8 where H (gpt-oss-120b's 2880) or 2I is no multiple of the 128-row scale block, with experts whose
    weight scales differ 4x from one to the next (up x 4^(e % 4), down / 4^(e % 4): outputs alike in size): each
    expert must read its own ceil(rows / 128) scale rows. Seeded experts of one distribution hide a neighbour's
    scales inside the FP8 bound; these do not. T = 1, 16, 300 against the oracle of the weights the layer holds."""
    cfg = MoEConfig(num_experts=8, top_k=2, hidden_size=hidden, intermediate_size=inter, dtype=torch.bfloat16,
                    quant=_fp8("block"))
    seeded = SeededExperts(replace(cfg, quant=None), seed=29, device="cuda")
    source = [(g, u * 4.0 ** (e % 4), d / 4.0 ** (e % 4)) for e, (g, u, d) in
              ((e, seeded[e]) for e in range(cfg.num_experts))]
    _check_layer(_layer(cfg, source), (1, 16, 300), bound=3e-2)


@pytest.mark.parametrize("preset,experts,fmt", [("qwen3-30b-a3b", 16, "fp8_block"), ("gpt-oss-120b", None, "fp8_block"),
                                                ("mixtral-8x7b", None, "bf16")])
def test_swap_ab(preset, experts, fmt, monkeypatch):
    """Swap-AB products (`GemmConfig.swap_ab`: weights x rows^T, the weight rows on the tensor cores' wide
    side) at real sizes, block FP8 and BF16: tiles of 16, 32 and 64 rows, pointer and TMA loads (the down's
    rows through a tensor descriptor too), persistent kernels, split tiles, the down GEMM's K range split, a
    gate+up of 8 warps capped at 128 registers and (block FP8) gate+up tiles of one stacked product a K block;
    T = 1, 16, 33 and 300 against the oracle (gpt-oss-120b with its biases)."""
    from epmoe.kernels import tuning_table
    from epmoe.kernels.tuning_table import GemmConfig, MoEKernelConfig
    from epmoe.presets import shrink_config
    cfg = preset_config(preset, dtype=torch.bfloat16, quant=_fp8("block") if fmt == "fp8_block" else None)
    if experts:
        cfg = shrink_config(cfg, experts=experts)
    layer = _layer(cfg, SeededExperts(replace(cfg, quant=None), seed=23, device="cuda"), bias=preset == "gpt-oss-120b")
    bk = 128 if fmt == "fp8_block" else 64
    configs = [
        MoEKernelConfig(16, GemmConfig(128, bk, 1, 4, 4, swap_ab=True), GemmConfig(64, bk, 1, 4, 4, swap_ab=True)),
        MoEKernelConfig(16, GemmConfig(128, bk, 1, 4, 4, tma=True, swap_ab=True),
                        GemmConfig(128, bk, 1, 4, 4, tma=True, tma_a=True, swap_ab=True, split_k=2)),
        MoEKernelConfig(32, GemmConfig(128, bk, 1, 8, 3, tma=True, persistent=True, swap_ab=True),
                        GemmConfig(64, bk, 1, 4, 4, persistent=True, swap_ab=True), tail_m=16),
        MoEKernelConfig(64, GemmConfig(128, bk, 8, 8, 3, swap_ab=True),
                        GemmConfig(128, bk, 8, 4, 4, tma=True, swap_ab=True)),
        # the register cap the tuner tries (`tune.with_register_caps`): 8 warps at 128 registers a thread
        MoEKernelConfig(32, GemmConfig(128, bk, 1, 8, 3, swap_ab=True, max_registers=128),
                        GemmConfig(64, bk, 1, 4, 4, swap_ab=True)),
    ]
    if fmt == "fp8_block" and cfg.intermediate_size % 128 == 0:   # gate and up rows as one product a K block
        # (`GemmConfig.stack_gate_up`: where the gate and up halves start on a scale block)
        configs += [MoEKernelConfig(32, GemmConfig(128, bk, 1, 8, 3, swap_ab=True, stack_gate_up=True),
                                    GemmConfig(64, bk, 1, 4, 4, swap_ab=True)),
                    MoEKernelConfig(64, GemmConfig(128, bk, 8, 8, 3, stack_gate_up=True),
                                    GemmConfig(128, bk, 8, 4, 4, tma=True))]
    for i, config in enumerate(configs):
        monkeypatch.setattr(tuning_table, "lookup_config", lambda *a, c=config, **k: (c, "test"))
        layer.experts._configs.clear()
        _check_layer(layer, (1, 16, 33, 300), bound=3e-2 if fmt == "fp8_block" else None, seed=i)


@pytest.mark.parametrize("fp8", [False, True])
def test_tune_races_whole_forwards_and_its_entries_run(fp8, tmp_path, monkeypatch, capsys):
    """`epmoe tune`'s end-to-end race on the GPU (`tune_problem`, two BLOCK_M at each T, what a table served
    before as the rival): at T = 1 (decode kernels too) and T = 512 (128 rows per expert: the Gluon pipeline
    too, on Hopper) every path is timed whole as CUDA-graph replays, each entry is one of the paths raced with
    a finite time, and a layer that looks those entries up matches the float64 oracle."""
    from rich.console import Console

    from epmoe.bench import tune
    from epmoe.bench.experts import make_weights
    from epmoe.kernels import tuning_table
    from epmoe.kernels.fused_moe import weight_format
    from epmoe.kernels.tuning_table import GemmConfig, MoEKernelConfig
    cfg = MoEConfig(num_experts=8, top_k=2, hidden_size=512, intermediate_size=384, dtype=torch.bfloat16,
                    quant=_fp8("block") if fp8 else None)
    fmt = "fp8_block" if fp8 else "bfloat16"
    weights, _ = make_weights(cfg, torch.device("cuda"), torch.Generator(device="cuda").manual_seed(3))
    problem = tune.Problem(cfg, weight_format(weights.w13, "block" if fp8 else None), weights, fp8)
    assert problem.fmt == fmt
    g = GemmConfig(128, 128 if fp8 else 64, 1, 4, 3)        # fits shared memory at 64 rows in both formats
    plan = {T: {(bm, 0): ([g], [g]) for bm in (16, 64)} for T in (1, 512)}
    served = MoEKernelConfig(32, GemmConfig(64, 128, 1, 4, 3), GemmConfig(64, 128, 1, 4, 3))
    before = {T: tuning_table.fit_to_problem(served, 512, 384, fmt) for T in (1, 512)}      # as the lookup serves
    best = tune.tune_problem(problem, [1, 512], reps=3, plan=plan, show_progress=False, settle_ms=20.0,
                             before=before, console=Console(file=None, force_terminal=False))
    printed = capsys.readouterr().out
    hopper = torch.cuda.get_device_capability()[0] == 9
    for T in (1, 512):
        line = re.search(rf"T={T} end to end: (.*)", printed).group(1)
        ends = dict(re.findall(r"([a-z][a-zA-Z0-9 +]*?) ([0-9.]+|inf) ms", line))
        want = {"table before", "tiles BM16", "tiles BM64"} | ({"gemv"} if T == 1 else {"gluon"} if hopper else set())
        assert want <= set(ends), (T, line)
        assert all(float(ends[name]) < float("inf") for name in want), (T, line)     # each ran, as a graph
        assert 0 < best[T][1] < float("inf")
    table = str(tmp_path / "tuned.json")
    tune.merge_into_table(table, tuning_table.shape_key(8, 512, 384, 2, fmt), best, {"device": "test"})
    tuning_table._load_table.cache_clear()
    monkeypatch.setattr(tuning_table, "table_paths_for_device", lambda device=None: [table])
    layer = _layer(cfg, SeededExperts(replace(cfg, quant=None), seed=9, device="cuda"))
    for T in (1, 512):
        assert layer.experts.kernel_config(T, layer.expert_weights) == best[T][0]
    _check_layer(layer, (1, 512), bound=3e-2 if fp8 else None, seed=4)
