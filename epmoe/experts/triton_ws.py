"""`triton_ws`: the experts on the warp-specialized Gluon grouped GEMM (Hopper, BF16, 128x128 block FP8 and
per-channel FP8).

Experimental, never picked by "auto": it is here so the whole experts op can be measured and checked
beside `triton` on a Hopper GPU; `triton` runs this pipeline for the batch sizes where its tuned table
says `gluon` (`epmoe tune` measured it faster there). The pipeline:
1. pairs laid out expert by expert, each expert's segment padded to tiles of 128 rows (`align_pairs`,
   no host sync);
2. the token rows (FP8: with their scales, made K-block-major) copied into that order, and each pair's
   row there (`kernels.layout_copy.rows_to_layout`: each pair's row and the scales over layout rows, then
   the token rows pair by pair, each token's row read from memory once; padding rows hold token 0: each
   output row of the GEMMs depends on its own A row only, so a padding row's values stay there, never
   read back).
   The kernel can read the tokens where they are instead (`a_rows`: a cp.async loader), but on an H200
   that gate+up was 2-7% slower than a copy plus the TMA-loaded one at three of four points
   (benchmarks/notes_kernels.md, eighth pass), so the backend copies;
3. gate+up: one grouped GEMM whose tiles hold the gate and the up columns of the same 128 outputs, with
   the bias, the activation and the cast (FP8 per group of 128 columns: the quantization, one formula) in
   its epilogue, which writes the down GEMM's operand in layout order as it reads it; FP8 per token, the
   activation as bfloat16, then quantized per row with the one formula (`fp8_quantize`: a row's scale needs
   all of its columns, which no one tile holds);
4. down: the same GEMM, plain, with the bias;
5. each token's k rows gathered from the expert-ordered output and summed with their routing weights in
   float32 (`gather_sum`), into the dispatcher's buffer where it gives one (`FlatBatch.out`).
Steps 3 and 4 run `epmoe.kernels.ws_grouped_gemm.grouped_gemm_ws` (`gemm`); the tests put its PyTorch
statement (`grouped_gemm_reference`) there to check the rest on the CPU (the Triton passes under the
interpreter).
"""
from __future__ import annotations

import time
from typing import NamedTuple

import torch

from ..activations import gated_activation_fused
from ..contract import TAKES_FP8, ExpertsCaps
from ..layouts import FLAT, ExpertWeights, FlatBatch
from ..quant.fp8 import fp8_quantize, quantize_weight
from ..registry import register_experts
from .base import Experts

TILE = 128               # rows per tile (two warpgroups of 64) and the FP8 block / activation group
SHORT_EXPERT_ROWS = 3 * TILE   # experts this short on average (BF16) walk in groups cut at their edges
# block-FP8 experts this long on average walk in groups of up to LONG_EXPERT_GROUP m-tiles (12: a choice between
# 8 tiles, left as it was, and the 12 and 16 measured faster)
LONG_EXPERT_ROWS = 12 * TILE
LONG_EXPERT_GROUP = 16         # a wave's m-tiles with long experts: as many A rows as weight rows (2048)


def _available(device_type: str) -> str | None:
    if device_type != "cuda":
        return "the warp-specialized GEMM runs on CUDA GPUs only"
    try:
        import triton.experimental.gluon  # noqa: F401
    except ImportError as exc:
        return f"this Triton has no Gluon ({exc})"
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] != 9:
        return "the warp-specialized GEMM uses Hopper's wgmma: it needs compute capability 9.x"
    return None


def _quant_problem(scheme, device_type: str) -> str | None:
    """FP8 the GEMM takes: 128x128 weight blocks with activations per group of 128 columns, or one weight
    scale per output row with activations per token or per group of 128."""
    q = scheme.config
    got = "per token" if q.activation_group_size is None else f"per group of {q.activation_group_size}"
    if scheme.kind == "fp8_channel":
        if q.activation_group_size not in (None, TILE):
            return f"it takes per-channel FP8 with activations per token or per group of {TILE} columns, not {got}"
        return None
    if q.weight_block is None:          # (the caps refuse fp8_tensor first: this is for a direct call)
        return "it takes FP8 weights in blocks or one scale per output row, not one scale per tensor"
    if tuple(q.weight_block) != (TILE, TILE):
        return f"it takes FP8 weight blocks of ({TILE}, {TILE}) only, not weight_block={q.weight_block}"
    if q.activation_group_size != TILE:
        return f"it takes block-FP8 activations per group of {TILE} columns only, not {got}"
    return None


# the GEMM's FP8 operand forms (`ws_grouped_gemm.check_operands`): "block", 128x128 weight blocks and A per
# group of 128 columns; "channel", a weight scale per output row and A per row (token); "channel_group", a
# weight scale per output row and A per group of 128
FP8_FORMS = ("block", "channel", "channel_group")


def fp8_form(plan) -> str | None:
    """The FP8 form (FP8_FORMS) of a plan's GEMMs, or None: not FP8."""
    if plan.quant == "none":
        return None
    if plan.quant == "fp8_block":
        return "block"
    return "channel" if plan.act_group is None else "channel_group"


class PaddedLayout(NamedTuple):
    """A batch's pairs laid out for the Gluon GEMMs (`WarpSpecializedExperts.padded_layout`)."""
    tokens: int
    top_k: int
    hidden: int
    inter: int
    fp8: bool
    aligned: object              # `align_pairs`' result, tiles of 128
    rows: int                    # rows of the layout
    tile_expert: torch.Tensor    # the expert of each tile (-1: none)
    walk_groups: torch.Tensor | None   # the GEMMs' walk (`expert_walk_groups`), or None: groups of 8 m-tiles


# the plans' quant kinds the Gluon pipeline takes (its CAPS, and what `walk_group` decides for)
GLUON_QUANTS = ("none", "fp8_block", "fp8_channel")


def walk_group(quant: str, pairs: int, experts: int, long_walk: bool = True) -> int | None:
    """The GEMMs' walk for `pairs` rows over `experts` experts of a plan whose `quant` is one of GLUON_QUANTS
    ("none": BF16 weights): groups cut at expert edges of up to this many m-tiles (`expert_walk_groups`), or
    None (groups of a fixed 8 m-tiles). `long_walk`: whether the long-expert walk below may be taken (it was
    measured with both GEMMs Gluon ones; alone, the down GEMM took 3.3% more cycles with it).

    - BF16 with one to SHORT_EXPERT_ROWS / 128 tiles' worth of rows per expert on average: 8. Groups of a
      fixed 8 m-tiles cut through experts of a few tiles each and read their weights twice, and the GEMMs are
      bound by reading weights there (deepseek-v3's 256 experts and gpt-oss-120b at T = 8192: whole op
      3.5-7% faster on an H100). Block FP8 (half the weight bytes) gained nothing there; BF16 groups of 8 cut
      at the edges of longer experts (the deepseek-v3 32-expert shard, mixtral) were no faster and once 6%
      slower.
    - Block FP8 with at least LONG_EXPERT_ROWS rows per expert on average: LONG_EXPERT_GROUP. A wave (one
      program per SM, 132 on an H100) walks m-tile first, so groups of G m-tiles make waves of G A tiles and
      132 / G n-tiles of 256 weight rows: 8 x 128 + 16 x 256 = 5120 operand rows per K block at G = 8, 16 x
      128 + 8 x 256 = 4096 at G = 16, the fewest. On an H100 (the deepseek-v3 32-expert shard, T = 8192, ncu)
      the gate+up's DRAM traffic was 4.44 GB instead of 6.07 in as many cycles; the down's 1.74 GB instead of
      2.16, in 3.3% more cycles. At the GPU's power cap the whole op ran 1.1-3.0% faster than the mean of a
      before and a before-again run (the shard at T = 6144 and 8192, mixtral at 8192), within the run's own
      drift (up to 2.6%) at T = 8192. BF16 there moved -1.6% to +2.0% and keeps its walk; per-channel FP8 is
      not measured and keeps its walk.
    - Otherwise None: below one tile per expert there is nothing to cut, while building the groups costs a
      launch (one Triton program, 6-8 us on an H100; the PyTorch form's few dozen small kernels took
      85-111 us)."""
    if quant not in GLUON_QUANTS:
        raise ValueError(f"walk_group: quant must be one of {GLUON_QUANTS}, got {quant!r}")
    if long_walk and quant == "fp8_block" and pairs >= LONG_EXPERT_ROWS * experts:
        return LONG_EXPERT_GROUP
    return 8 if quant == "none" and TILE * experts <= pairs <= SHORT_EXPERT_ROWS * experts else None


def grouped_gemm_reference(a, w, tile_expert, out, a_scale_t=None, w_scale=None, bias=None, activation=None,
                           out_scale_t=None, *, block_m: int = 128, block_n: int | None = None,
                           block_k: int | None = None, a_rows=None, walk_groups=None, **_launch) -> torch.Tensor:
    """What `grouped_gemm_ws` computes, in PyTorch (any device): float32 products, in FP8 each 128-wide K
    block promoted with its activation and weight scales; plus the bias; with an activation, act(gate,
    up) in float32, cast once or quantized with the one formula per 128 columns; with `a_rows`, layout
    row r is A's row a_rows[r]. Rows of skipped tiles are left as they are; `walk_groups` (the walk's order)
    changes nothing in the result and is only checked. The experts backend runs it on the CPU (tests) in
    place of the kernel; the tile sizes are checked as the kernel checks them, and the launch options
    (`stages`, ...) are ignored."""
    from ..kernels.ws_grouped_gemm import check_operands
    shape = check_operands(a, w, tile_expert, out, a_scale_t, w_scale, bias, activation, out_scale_t, block_m,
                           block_n, block_k, a_rows=a_rows, walk_groups=walk_groups)
    if a_rows is not None:
        a = a[a_rows.long()]
        a_scale_t = None if a_scale_t is None else a_scale_t[:, a_rows.long()]
    K = shape.K
    for m, e in enumerate(tile_expert.tolist()):
        if e < 0:
            continue
        rows = slice(m * block_m, (m + 1) * block_m)
        x, wt = a[rows].float(), w[e].float()
        if shape.fp8:
            acc = torch.zeros(block_m, shape.w_rows, dtype=torch.float32, device=a.device)
            kbs = -(-K // TILE)
            # [W rows, K blocks]: a block's scale on each of its rows, or a row's scale on each K block
            w_row_scale = w_scale[e][:, None].expand(-1, kbs) if shape.col_scale else \
                w_scale[e].repeat_interleave(TILE, 0)[:shape.w_rows]
            for kb in range(kbs):
                cols = slice(kb * TILE, (kb + 1) * TILE)
                a_s = a_scale_t[0 if shape.row_scale else kb, rows]        # one per row: the same for every block
                acc += (x[:, cols] @ wt[:, cols].T) * a_s[:, None] * w_row_scale[:, kb][None, :]
        else:
            acc = x @ wt.T
        if bias is not None:
            acc = acc + bias[e][None, :]
        if not shape.gated:
            out[rows] = acc.to(out.dtype)
            continue
        act = gated_activation_fused(activation, acc)
        if shape.out_fp8:
            q, s = fp8_quantize(act, TILE)
            out[rows] = q
            out_scale_t[:, rows] = s.t()
        else:
            out[rows] = act.to(out.dtype)
    return out


SELF_CHECK_SECONDS = 60.0      # the self-check's GEMMs take milliseconds: longer is a hang


def unfinished(event, seconds: float, poll_s: float = 0.01) -> str | None:
    """Why the GPU work before `event` (recorded, `.query()` True once done) is not done after `seconds`
    (polled, so that a hung kernel leaves the host free to say so; None: it finished)."""
    deadline = time.monotonic() + seconds
    while not event.query():
        if time.monotonic() > deadline:
            return (f"its kernel did not finish within {seconds:.0f} s (a hang: the GPU work of this process cannot "
                    f"go on; restart it and use experts='triton')")
        time.sleep(poll_s)
    return None


def gemm_disagreement(gemm, device: torch.device, form: str | None, settle=None, gathered: bool = False
                      ) -> str | None:
    """Why `gemm` (the `grouped_gemm_ws` contract) disagrees with `grouped_gemm_reference` on two small
    problems in `form` (one of FP8_FORMS, or None: BF16), both with a bias: plain over rows in layout order
    (down), and with the activation (FP8 per group of 128: quantized) in the epilogue (gate+up), over rows in
    layout order as the backend runs it or, `gathered`,
    over token rows picked by `a_rows` (fewer tokens than rows, in no order, some twice). Two experts, a
    skipped tile whose rows must stay as they were, N not a multiple of the tile (the gated I too where the form's
    layers leave I unpadded: BF16 and A per row, I = 160; the forms with A per group of 128 pad I to 128s), on
    two programs with K
    long enough that each walks several tiles and the ring of slots wraps (None: it agrees within 1e-2; NaN
    anywhere disagrees). Each GEMM twice, as the backends launch it: the walk in groups of a fixed size, and
    in groups of unequal length (one tile, then three: `walk_groups`, as groups cut at expert edges are).
    `settle()`, called after each launch of `gemm`, says why its work did not finish (None: it did)."""
    if form is not None and form not in FP8_FORMS:
        raise ValueError(f"gemm_disagreement: form must be one of {FP8_FORMS} or None (BF16), got {form!r}")
    fp8 = form is not None
    a_group = None if form == "channel" else TILE         # A's scales: per row, or per group of 128 columns
    g = torch.Generator(device=device).manual_seed(0)
    M, K, tokens = 4 * TILE, 9 * TILE, 3 * TILE - 37
    tile_expert = torch.tensor([0, -1, 1, 1], dtype=torch.int32, device=device)
    picks = torch.randint(0, tokens, (M,), generator=g, device=device).to(torch.int32)
    uneven = torch.tensor([[0, 1], [1, 3], [1, 3], [1, 3]], dtype=torch.int32, device=device)
    gated_i = 2 * TILE if a_group is not None and fp8 else 160
    for what, w_rows, activation, a_rows in (("plain", 320, None, None),
                                             ("gated", 2 * gated_i, "silu", picks if gathered else None)):
        a = torch.randn(M if a_rows is None else tokens, K, generator=g, device=device)
        a_scale_t = None
        if fp8:
            a, a_scale = fp8_quantize(a, a_group)
            a_scale_t = a_scale.t().contiguous()
        else:
            a = a.bfloat16()
        w = torch.randn(2, w_rows, K, generator=g, device=device) * 0.05
        bias = torch.randn(2, w_rows, generator=g, device=device) * 0.1
        w_scale = None
        if fp8:
            wq = [quantize_weight(w[e], "block" if form == "block" else "channel", (TILE, TILE)) for e in range(2)]
            w, w_scale = torch.stack([q for q, _ in wq]), torch.stack([s for _, s in wq]).contiguous()
        else:
            w = w.bfloat16()
        n_out = w_rows // 2 if activation else w_rows
        out_fp8 = fp8 and a_group is not None and activation is not None

        def launch(fn, walk_groups):
            out = torch.zeros(M, n_out, dtype=torch.float8_e4m3fn if out_fp8 else torch.bfloat16, device=device)
            out_scale_t = torch.ones(n_out // TILE, M, device=device) if out_fp8 else None
            fn(a, w, tile_expert, out, a_scale_t, w_scale, bias, activation, out_scale_t, num_programs=2,
               a_rows=a_rows, walk_groups=walk_groups)
            return out.float() if not out_fp8 else out.float() * out_scale_t.t().repeat_interleave(TILE, 1)

        want = launch(grouped_gemm_reference, None)
        for walk in (None, uneven):
            got = launch(gemm, walk)
            why = settle() if settle is not None else None
            if why:
                return why
            err = ((got - want).norm() / want.norm()).item()
            skipped = slice(TILE, 2 * TILE)
            skipped_kept = bool((got[skipped] == want[skipped]).all() and (want[skipped] == 0).all())
            if not err <= 1e-2 or not skipped_kept:        # NaN fails the first
                kind = f"FP8 ({form})" if fp8 else "BF16"
                return (f"its {kind} {what} GEMM{'' if walk is None else ' (walk groups)'} "
                        f"disagrees with its PyTorch statement on a small problem (relative error {err:.3g}"
                        f"{'' if skipped_kept else ', a skipped tile written'}); use experts='triton'")
    return None


@register_experts("triton_ws")
class WarpSpecializedExperts(Experts):
    CAPS = ExpertsCaps(layouts=frozenset({FLAT}), dtypes=frozenset({torch.bfloat16}), devices=frozenset({"cuda"}),
                       quant=frozenset(GLUON_QUANTS), fp8_activations=TAKES_FP8,
                       cuda_graph_safe=True, auto_priority=0,
                       summary="experimental: a warp-specialized Gluon grouped GEMM (Hopper), BF16, block and "
                               "per-channel FP8",
                       available=_available, quant_problem=_quant_problem)

    # the grouped GEMM of steps 3 and 4: None is the Gluon kernel; tests set `grouped_gemm_reference`
    gemm = None
    # whether `padded_layout` may give long block-FP8 experts the long-expert walk (`walk_group`): measured with
    # both GEMMs Gluon ones, as here
    LONG_WALK = True

    _checked: dict = {}      # (device index, FP8 form or None) -> None (passed) or why the kernel disagreed

    def __init__(self, plan, device: torch.device | None = None):
        super().__init__(plan, device)
        self._refuse_if_unchecked(device)

    def move_to(self, device: torch.device, plan) -> None:
        """The GEMM self-checked on the new device too (the check is per device) before the layer moves."""
        self._refuse_if_unchecked(device)
        super().move_to(device, plan)

    def _refuse_if_unchecked(self, device) -> None:
        if device is not None and torch.device(device).type == "cuda":
            why = self.self_check(torch.device(device), fp8_form(self.plan))
            if why:
                raise RuntimeError(f"experts 'triton_ws' refused: {why}")

    @classmethod
    def self_check(cls, device: torch.device, form: str | None) -> str | None:
        """The Gluon GEMM against its PyTorch statement (`gemm_disagreement`), once per device and form
        (`fp8_form`):
        an experimental kernel that disagrees is refused before any forward, not used; one that does not
        finish within SELF_CHECK_SECONDS is refused with that said (the host polls instead of waiting), and
        one that does not compile or launch here with the error it raised."""
        from ..kernels.ws_grouped_gemm import grouped_gemm_ws
        index = device.index if device.index is not None else torch.cuda.current_device()

        def settle():
            event = torch.cuda.Event()
            event.record()
            return unfinished(event, SELF_CHECK_SECONDS)

        if (index, form) not in cls._checked:
            with torch.cuda.device(index):
                try:
                    why = gemm_disagreement(grouped_gemm_ws, torch.device("cuda", index), form, settle)
                except Exception as exc:       # it did not compile or launch here (Triton's errors included)
                    first = str(exc).splitlines()[0][:300] if str(exc) else ""
                    why = f"its GEMM failed to build or run: {type(exc).__name__}: {first}"
                cls._checked[(index, form)] = why
        return cls._checked[(index, form)]

    def _gemm(self):
        if self.gemm is not None:
            return self.gemm
        from ..kernels.ws_grouped_gemm import grouped_gemm_ws
        return grouped_gemm_ws

    def padded_layout(self, batch: FlatBatch, weights: ExpertWeights) -> PaddedLayout:
        """The batch's pairs in tiles of 128 (`align_pairs`), shared by the pipelines built on this GEMM;
        where `walk_group` says so, the GEMMs walk in groups cut at expert edges (`expert_walk_groups`)."""
        from ..kernels.moe_align import align_pairs
        from ..kernels.walk_groups import expert_walk_groups
        n, k = batch.local_ids.shape
        L, two_i, H = weights.w13.shape
        fp8 = weights.w13_scale is not None
        aligned = align_pairs(batch.local_ids, L, TILE)
        tile_expert = aligned.block_expert[:aligned.max_blocks]
        group = walk_group(self.plan.quant, n * k, L, self.LONG_WALK)
        walk = None if group is None else expert_walk_groups(tile_expert, group)
        return PaddedLayout(n, k, H, two_i // 2, fp8, aligned, aligned.max_rows, tile_expert, walk)

    def forward_flat(self, batch: FlatBatch, weights: ExpertWeights) -> torch.Tensor:
        from ..kernels.layout_copy import rows_to_layout
        plan, gemm = self.plan, self._gemm()
        x = batch.x
        if x.shape[0] == 0:
            return torch.zeros(x.shape, dtype=plan.dtype, device=x.device)
        n, k, H, inter, fp8, aligned, rows, tile_expert, walk = self.padded_layout(batch, weights)
        a, a_scale_t, row_of_pair = rows_to_layout(x, batch.scales if fp8 else None, aligned, k)
        b13 = None if weights.b13 is None else weights.b13.float().contiguous()
        b2 = None if weights.b2 is None else weights.b2.float().contiguous()
        # gate+up with the activation (and, FP8 per group of 128, the quantization) in its epilogue: the down
        # GEMM's operand; FP8 per token, quantized after it, each row's scale over all of its columns
        per_token = fp8_form(plan) == "channel"
        quantized = fp8 and not per_token
        act = torch.empty(rows, inter, dtype=torch.float8_e4m3fn if quantized else torch.bfloat16, device=x.device)
        act_scale_t = torch.empty(-(-inter // TILE), rows, dtype=torch.float32, device=x.device) if quantized \
            else None
        gemm(a, weights.w13, tile_expert, act, a_scale_t, weights.w13_scale, b13, plan.activation, act_scale_t,
             walk_groups=walk)
        if per_token:
            act, act_scale = fp8_quantize(act, None)
            act_scale_t = act_scale.view(1, rows)
        y = torch.empty(rows, H, dtype=torch.bfloat16, device=x.device)
        gemm(act, weights.w2, tile_expert, y, act_scale_t, weights.w2_scale, b2, walk_groups=walk)
        return self.slot_sum(y, row_of_pair, batch)

    def slot_sum(self, y: torch.Tensor, row_of_pair: torch.Tensor, batch: FlatBatch):
        """Each token's k rows of the down GEMM's output y (layout order; `row_of_pair` [n, k] their rows,
        -1 where the expert is not here: `rows_to_layout`) summed with their routing weights in float32
        (`gather_sum`), into the dispatcher's buffer where it gives one."""
        from ..kernels.token_rows import gather_sum
        status = torch.zeros(1, dtype=torch.int32, device=y.device)
        # where the dispatcher's combine reads it (its pull buffer), when it is a dense array of the dtype
        out = batch.out if batch.out is not None and batch.out.is_contiguous() and batch.out.dtype == self.plan.dtype \
            else None
        return gather_sum(y, row_of_pair, batch.weights.float(), status, self.plan.dtype, out=out)
