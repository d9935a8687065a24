"""The library anchors `epmoe bench experts` times beside the experts backends, on the same rows.

Each anchor runs the two expert GEMMs and the activation between them on rows sorted by expert
beforehand (sorting, gathering and quantizing the input are not timed; nor is the weighted sum of a
token's k outputs): what a PyTorch library kernel reaches at the layer's GEMM shapes.

- `torch._grouped_mm` (BF16): CUTLASS grouped GEMMs over the experts' segments.
- `torch._scaled_grouped_mm` row-wise FP8: per-token activation scales, per-channel weight scales (the
  `fp8_channel` format; the intermediate quantized per token between the GEMMs with the one formula).
  torch has no block-scaled grouped kernel.
- `F.scaled_mm` block-wise, dense: all T*k rows through one expert's weights, activations per 1x128
  group, weights per 128x128 block (the `fp8_block` scheme): cuBLAS's block-FP8 rate at these shapes,
  without the grouping.

Each is checked against the float64 oracle of its own function: the grouped anchors' outputs, combined
with the routing weights on sampled tokens, against `reference_moe` of that format; the dense one per
GEMM on sampled rows against the float64 product of its dequantized operands.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

GROUPED_BF16 = "torch._grouped_mm"
GROUPED_FP8_ROWWISE = "torch._scaled_grouped_mm rowwise"
DENSE_FP8_BLOCK = "F.scaled_mm blockwise dense"
ANCHORS = (GROUPED_BF16, GROUPED_FP8_ROWWISE, DENSE_FP8_BLOCK)
ANCHOR_FORMATS = {GROUPED_BF16: "bf16", GROUPED_FP8_ROWWISE: "fp8_channel", DENSE_FP8_BLOCK: "fp8_block"}


@dataclass
class AnchorRun:
    """One anchor's outcome: its timing (None when it could not run here: `error` says why), the
    relative error against its oracle, and extra numbers (the dense anchor's GEMMs alone)."""
    name: str
    timing: object = None
    err: float | None = None
    error: str | None = None
    extra: dict = field(default_factory=dict)


def unavailable(name: str, device: torch.device, cfg) -> str | None:
    """Why an anchor cannot run on this device and shape (None: it can)."""
    if name == GROUPED_BF16:
        if not hasattr(torch, "_grouped_mm"):
            return f"torch {torch.__version__} has no torch._grouped_mm"
        if cfg.hidden_size % 8 or cfg.intermediate_size % 8:
            return "torch._grouped_mm needs H and I multiples of 8 (16-byte rows)"
        return None
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (9, 0):
        return "FP8 library GEMMs need a CUDA GPU of compute capability 9.0+"
    if name == GROUPED_FP8_ROWWISE and not hasattr(torch, "_scaled_grouped_mm"):
        return f"torch {torch.__version__} has no torch._scaled_grouped_mm"
    if name == DENSE_FP8_BLOCK and not hasattr(torch.nn.functional, "scaled_mm"):
        return f"torch {torch.__version__} has no torch.nn.functional.scaled_mm"
    return None


def combine(y_sorted: torch.Tensor, order: torch.Tensor, tw: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """out[t] = sum_j tw[t, j] * y[pair t * k + j] for the tokens `rows`, in float64 (y in expert order)."""
    T, k = tw.shape
    y_pairs = torch.empty_like(y_sorted)
    y_pairs[order] = y_sorted
    y = y_pairs.reshape(T, k, -1)[rows].double()
    return (y * tw[rows].double().unsqueeze(2)).sum(1)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def blockwise_scale_layout(scale: torch.Tensor) -> torch.Tensor:
    """Activation scales [M, K/128] laid out M-major (stride (1, M)), as cuBLAS's 1x128 scaling reads them."""
    return scale.t().contiguous().t()


def grouped_bf16_chain(activation: str, w13: torch.Tensor, w2: torch.Tensor, offsets: torch.Tensor):
    """fn(rows sorted by expert) -> down(act(gate+up)) through `torch._grouped_mm`, the activation in the
    rows' dtype (one pass per op: plain PyTorch at its fastest)."""
    from ..activations import gated_activation_fused
    w13t, w2t = w13.transpose(1, 2), w2.transpose(1, 2)

    def run(xs):
        h = torch._grouped_mm(xs, w13t, offs=offsets)
        return torch._grouped_mm(gated_activation_fused(activation, h), w2t, offs=offsets)
    return run


def weight_scale_layout(scale: torch.Tensor) -> torch.Tensor:
    """128x128 weight-block scales [N/128, K/128] as cuBLAS reads them for the transposed weight: K blocks
    padded to a multiple of 4 (the padding multiplies nothing: K ends before it), returned transposed."""
    nb, kb = scale.shape
    padded = torch.ones(nb, -(-kb // 4) * 4, dtype=scale.dtype, device=scale.device)
    padded[:, :kb] = scale
    return padded.t()


def run_anchors(names, timer, reps: int, warmup: int, *, cfg, x: torch.Tensor, pool: list, ids: torch.Tensor,
                tw: torch.Tensor, sample: torch.Tensor, weights_of, ref_of) -> list[AnchorRun]:
    """Time and check the named anchors on tokens x [T, H] (padded to the FP8 weights' H where they are
    padded) routed by ids / tw; `pool`: other inputs of x's shape copied in before each timed run.
    weights_of(fmt) -> ExpertWeights of that format (bf16, fp8_channel, fp8_block); ref_of(fmt) -> the
    float64 oracle on the sampled tokens in that format."""
    from ..activations import gated_activation_fused
    from ..experts.base import sort_pairs_by_expert
    from ..quant.fp8 import fp8_quantize
    T, k = ids.shape
    E = cfg.num_experts
    order, _, offsets = sort_pairs_by_expert(ids, E)
    src = order // k
    out: list[AnchorRun] = []
    for name in names:
        why = unavailable(name, x.device, cfg)
        if why is None and name == DENSE_FP8_BLOCK and T * k < 128 * E:
            # it runs every row through one expert's weights: below 128 rows per expert it reads a fraction
            # of the weight bytes the experts must read, so it bounds nothing at decode
            why = f"{T * k} rows over {E} experts: the dense anchor bounds prefill only (>= 128 rows per expert)"
        if why is not None:
            out.append(AnchorRun(name, error=f"unavailable: {why}"))
            continue
        w = weights_of(ANCHOR_FORMATS[name])
        pool_w = [_fit(p, w.w13.shape[2]) for p in pool]     # the input padded as these weights are
        try:
            if name == GROUPED_BF16:
                rows_of = [p[src].contiguous() for p in pool_w]
                xs = rows_of[0].clone()
                chain = grouped_bf16_chain(cfg.activation, w.w13, w.w2, offsets)
                fn = lambda: chain(xs)            # noqa: E731
                ins = [(r,) for r in rows_of]
                bufs = (xs,)
            elif name == GROUPED_FP8_ROWWISE:
                quant = [fp8_quantize(p[src], None) for p in pool_w]
                ins = [(q.contiguous(), s.reshape(-1).float().contiguous()) for q, s in quant]
                bufs = (ins[0][0].clone(), ins[0][1].clone())
                w13t, w2t = w.w13.transpose(1, 2), w.w2.transpose(1, 2)

                def fn():
                    h = torch._scaled_grouped_mm(bufs[0], w13t, bufs[1], w.w13_scale, offs=offsets,
                                                 out_dtype=torch.bfloat16)
                    a_q, a_s = fp8_quantize(gated_activation_fused(cfg.activation, h.float()), None)
                    return torch._scaled_grouped_mm(a_q, w2t, a_s.reshape(-1), w.w2_scale, offs=offsets,
                                                    out_dtype=torch.bfloat16)
            else:
                out.append(_dense_block(name, timer, reps, warmup, cfg, pool_w, src, w, sample))
                continue

            def refresh(state={"i": 0}):
                state["i"] = (state["i"] + 1) % len(ins)
                for b, v in zip(bufs, ins[state["i"]]):
                    b.copy_(v)
            t = timer.time(fn, reps=reps, warmup=warmup, before_each=refresh)
            for b, v in zip(bufs, ins[0]):
                b.copy_(v)
            err = rel_err(combine(fn(), order, tw, sample)[:, :cfg.hidden_size], ref_of(ANCHOR_FORMATS[name]))
            out.append(AnchorRun(name, t, err))
        except (RuntimeError, NotImplementedError, TypeError, ValueError) as exc:
            out.append(AnchorRun(name, error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"))
    return out


def _dense_block(name, timer, reps, warmup, cfg, pool, src, w, sample) -> AnchorRun:
    """The dense block-FP8 anchor: every pair's row through expert 0's gate+up, activation, 1x128
    quantization, down; checked per GEMM on the sampled tokens' rows."""
    import torch.nn.functional as F
    from ..activations import gated_activation_fused
    from ..quant.fp8 import dequantize_weight, fp8_quantize
    Fs = F.ScalingType
    w13, w2 = w.w13[0], w.w2[0]
    s13, s2 = w.w13_scale[0], w.w2_scale[0]                # [N/128, K/128]; cuBLAS's layout below

    def gemm(a, a_s, wt, ws):
        return F.scaled_mm(a, wt.t(), blockwise_scale_layout(a_s), Fs.BlockWise1x128, ws, Fs.BlockWise128x128,
                           output_dtype=torch.bfloat16)
    s13, s2 = weight_scale_layout(s13), weight_scale_layout(s2)
    quant = [fp8_quantize(p[src], 128) for p in pool]
    ins = [(q.contiguous(), s.float().contiguous()) for q, s in quant]
    xq, xs = ins[0][0].clone(), ins[0][1].clone()

    def gate_up():
        return gemm(xq, xs, w13, s13)

    def act_quant(h):
        return fp8_quantize(gated_activation_fused(cfg.activation, h), 128)

    def fn():
        a_q, a_s = act_quant(gate_up())
        return gemm(a_q, a_s.float(), w2, s2)

    def refresh(state={"i": 0}):
        state["i"] = (state["i"] + 1) % len(ins)
        xq.copy_(ins[state["i"]][0])
        xs.copy_(ins[state["i"]][1])
    t = timer.time(fn, reps=reps, warmup=warmup, before_each=refresh)
    h_in = act_quant(gate_up())
    t_gu = timer.time(gate_up, reps=reps, warmup=warmup)
    t_dn = timer.time(lambda: gemm(h_in[0], h_in[1].float(), w2, s2), reps=reps, warmup=warmup)
    # the oracle of each GEMM: float64 products of the dequantized operands, on the sampled tokens' rows
    xq.copy_(ins[0][0])
    xs.copy_(ins[0][1])
    sel = _rows_of_tokens(src, sample)
    h = gate_up()
    blk = (128, 128)
    a_ref = _deq_rows(xq[sel], xs[sel]) @ dequantize_weight(w13, w.w13_scale[0], blk).double().t()
    a_q, a_s = act_quant(h)
    d_ref = _deq_rows(a_q[sel], a_s[sel].float()) @ dequantize_weight(w2, w.w2_scale[0], blk).double().t()
    y = gemm(a_q, a_s.float(), w2, s2)
    err = max(rel_err(h[sel], a_ref), rel_err(y[sel], d_ref))
    return AnchorRun(name, t, err, extra={"gate_up_ms": t_gu.median_ms, "down_ms": t_dn.median_ms,
                                          "gemms_ms": t_gu.median_ms + t_dn.median_ms})


def _fit(x: torch.Tensor, cols: int) -> torch.Tensor:
    """x [T, H] with `cols` columns: zero-padded (the FP8 schemes pad H) or as it is."""
    return x if x.shape[1] == cols else torch.nn.functional.pad(x, (0, cols - x.shape[1]))


def _rows_of_tokens(src: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Positions (in expert order) of the pairs whose token is one of `tokens`."""
    return torch.isin(src, tokens).nonzero().reshape(-1)


def _deq_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Rows quantized per group of 128 columns, in float64."""
    M, K = q.shape
    return (q.double().reshape(M, -1, 128) * scale.double().unsqueeze(2)).reshape(M, K)
