"""FP8 (e4m3fn): the one quantization formula, `Fp8Config`, and the scheme that owns FP8 weights.

The formula, written once here and mirrored bit for bit by the Triton kernel in
`epmoe.kernels.fp8_quant`:

    scale = max(amax, 1e-12) * (1.0 / 448.0)        # float32; a multiplication, never amax / 448 (1 ULP apart)
    q     = e4m3fn(clamp(x / scale, -448, 448))      # correctly rounded float32 division, round-to-nearest-even cast
    x    ~= q.float() * scale                         # dequantization

Activations are quantized per token-group of `group_size` columns (the last group may be partial) or per
token. Weights carry one scale per 128x128 block (DeepSeek-V3's `weight_scale_inv` layout), per output
channel, or per tensor. How the layer stores them (`Fp8Scheme.create_weights`):

    w13 [L, 2Ip, Hp] e4m3fn (gate rows, then up rows)        w2 [L, Hp, Ip] e4m3fn
    block (bn, bk): w13_scale [L, 2Ip/bn, Hp/bk], w2_scale [L, Hp/bn, Ip/bk]   float32 multipliers
    channel/tensor: w13_scale [L, 2Ip],            w2_scale [L, Hp]            one per output row; a
                    per-tensor scale is stored repeated over its rows, so one row-wise path serves both

Hp/Ip are the padded sizes from `roundup_sizes`: multiples of the weight block and the activation group
(and of 16, what `torch._scaled_grouped_mm` needs), so a block or group never straddles gate and up and
padded columns are zeros that change no amax.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..kernels.fp8_format import FP8_DTYPE, FP8_MAX, SCALE_FLOOR, check_counts, check_group_size, check_quantize_args
from ..sizes import ceil_div, round_up

ACTIVATION_MODES = ("per_token_group", "per_token")
GEMM_ALIGN = 16              # torch._scaled_grouped_mm: K and N multiples of 16


# ------------------------------------------------------------------------------------- the formula
def scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """float32 dequantization multiplier for a group whose largest magnitude is `amax`."""
    return amax.float().clamp_min(SCALE_FLOOR) * (1.0 / FP8_MAX)


def quantize_with_scale(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e4m3fn(clamp(x / scale, -448, 448)), `scale` broadcast against `x`, in float32."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def fp8_quantize_torch(x: torch.Tensor, group_size: int | None = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """The PyTorch implementation of `fp8_quantize` (any device)."""
    n = check_quantize_args(x, group_size)
    H = x.shape[-1]
    g = H if group_size is None else group_size
    xf = x.float()
    if n * g != H:
        xf = nn.functional.pad(xf, (0, n * g - H))   # zero columns leave every amax unchanged
    xg = xf.reshape(*x.shape[:-1], n, g)
    scale = scale_from_amax(xg.abs().amax(dim=-1, keepdim=True))
    q = quantize_with_scale(xg, scale).reshape(*x.shape[:-1], n * g)
    if n * g != H:
        q = q[..., :H].contiguous()
    return q, scale.squeeze(-1)


def fp8_quantize(x: torch.Tensor, group_size: int | None = 128, impl: str = "auto",
                 counts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations `x [..., H]` to e4m3fn with the one formula.

    group_size: columns per scale (the last group may be partial), or None for one scale per row.
    Returns `(q [..., H] float8_e4m3fn, scale [..., ceil(H / group_size)] float32)`; dequantize with
    `fp8_dequantize`. impl: "torch", "triton" (a GPU, or the CPU under TRITON_INTERPRET=1) or "auto"
    (Triton on CUDA when installed). All implementations give identical bits, except in a group that
    holds a NaN or an infinity: its scale is NaN (Triton) or NaN / infinite (torch), and q x scale is NaN
    across the group in both. `counts` [L] (x [L, C, H], a batched layout): only the rows below each count
    need quantizing, the others are left unspecified (Triton skips them; torch quantizes every row).
    """
    if impl not in ("auto", "torch", "triton"):
        raise ValueError(f"fp8_quantize: impl must be 'auto', 'torch' or 'triton', got {impl!r}")
    check_counts(x, counts, "fp8_quantize")
    if impl == "auto":
        impl = "triton" if isinstance(x, torch.Tensor) and x.is_cuda and _triton_available() else "torch"
    if impl == "triton":
        from ..kernels.fp8_quant import fp8_quantize_triton
        return fp8_quantize_triton(x, group_size, counts=counts)
    return fp8_quantize_torch(x, group_size)


def fp8_dequantize(q: torch.Tensor, scale: torch.Tensor, group_size: int | None = 128) -> torch.Tensor:
    """`q.float() * scale`, each scale spread over its group of columns -> float32 [..., H]."""
    check_group_size(group_size)
    H = q.shape[-1]
    g = H if group_size is None else group_size
    return q.float() * scale.float().repeat_interleave(g, dim=-1)[..., :H]


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------------------- weights
def quantize_weight(w: torch.Tensor, granularity: str, block: tuple[int, int] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize one weight matrix `w [N, K]` (out, in) with the one formula.

    granularity "block": scale [ceil(N/bn), ceil(K/bk)] (DeepSeek-V3 `weight_scale_inv`, partial edge
    blocks); "channel": scale [N]; "tensor": scale [] (one).
    """
    wf = w.float()
    N, K = wf.shape
    if granularity == "block":
        bn, bk = block
        nb, kb = ceil_div(N, bn), ceil_div(K, bk)
        wp = nn.functional.pad(wf, (0, kb * bk - K, 0, nb * bn - N)).reshape(nb, bn, kb, bk)
        scale = scale_from_amax(wp.abs().amax(dim=(1, 3)))
        q = quantize_with_scale(wp, scale[:, None, :, None]).reshape(nb * bn, kb * bk)[:N, :K].contiguous()
        return q, scale
    if granularity == "channel":
        scale = scale_from_amax(wf.abs().amax(dim=1))
        return quantize_with_scale(wf, scale[:, None]), scale
    if granularity == "tensor":
        scale = scale_from_amax(wf.abs().amax())
        return quantize_with_scale(wf, scale), scale
    raise ValueError(f"quantize_weight: granularity must be 'block', 'channel' or 'tensor', got {granularity!r}")


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None = None
                      ) -> torch.Tensor:
    """FP8 weights `[..., N, K]` and their scales -> float32 `[..., N, K]`.

    Scale layouts: `[..., ceil(N/bn), ceil(K/bk)]` multipliers of `block` = (bn, bk) (edge blocks
    partial), `[..., N]` one per row, or a single value.
    """
    N, K = q.shape[-2:]
    s = scale.float()
    if s.dim() == q.dim():                      # blocks
        if block is None:
            raise ValueError(f"dequantize_weight: block scales {list(s.shape)} need block=(rows, cols)")
        bn, bk = block
        if s.shape[-2:] != (ceil_div(N, bn), ceil_div(K, bk)):
            raise ValueError(f"dequantize_weight: {block} blocks of a [{N}, {K}] weight need scales "
                             f"[{ceil_div(N, bn)}, {ceil_div(K, bk)}], got {list(s.shape[-2:])}")
        s = s.repeat_interleave(bn, dim=-2)[..., :N, :].repeat_interleave(bk, dim=-1)[..., :K]
        return q.float() * s
    if s.numel() == 1:
        return q.float() * s.reshape(())
    return q.float() * s.unsqueeze(-1)


# ---------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class Fp8Config:
    """FP8 (e4m3fn) weights and activations for `MoEConfig(quant=...)`.

    weight_block: (rows, cols) of one weight scale block, (128, 128) as in DeepSeek-V3 checkpoints; None
    for one scale per tensor, or per output channel with `per_channel_weights=True`.
    activation: "per_token_group" (one scale per `group_size` columns of a token) or "per_token".
    dispatch_fp8: dispatchers that move tokens quantize them before the wire and send the scales along
    (half the bytes of BF16); the combine stays in the layer's dtype. Needs experts that take FP8 rows.
    """

    weight_block: tuple[int, int] | None = (128, 128)
    per_channel_weights: bool = False
    activation: str = "per_token_group"
    group_size: int = 128
    dispatch_fp8: bool = False

    def __post_init__(self) -> None:
        wb = self.weight_block
        if wb is not None:
            if (not isinstance(wb, (tuple, list)) or len(wb) != 2
                    or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in wb)):
                raise ValueError(f"Fp8Config.weight_block must be None or two positive ints (rows, cols), "
                                 f"e.g. (128, 128), got {wb!r}")
            object.__setattr__(self, "weight_block", (int(wb[0]), int(wb[1])))
        if not isinstance(self.per_channel_weights, bool):
            raise ValueError(f"Fp8Config.per_channel_weights must be a bool, got {self.per_channel_weights!r}")
        if self.per_channel_weights and wb is not None:
            raise ValueError("Fp8Config.per_channel_weights=True needs weight_block=None: a weight is scaled "
                             f"per block or per channel, not both (got weight_block={wb!r})")
        if self.activation not in ACTIVATION_MODES:
            raise ValueError(f"Fp8Config.activation must be one of {ACTIVATION_MODES}, got {self.activation!r}")
        gs = self.group_size
        if isinstance(gs, bool) or not isinstance(gs, int) or gs < 1:
            raise ValueError(f"Fp8Config.group_size must be a positive int, got {gs!r}")
        if not isinstance(self.dispatch_fp8, bool):
            raise ValueError(f"Fp8Config.dispatch_fp8 must be a bool, got {self.dispatch_fp8!r}")

    @property
    def weight_granularity(self) -> str:
        if self.weight_block is not None:
            return "block"
        return "channel" if self.per_channel_weights else "tensor"

    @property
    def activation_group_size(self) -> int | None:
        """Columns per activation scale; None = one scale per token."""
        return self.group_size if self.activation == "per_token_group" else None


# ---------------------------------------------------------------------------------------- scheme
@dataclass(frozen=True)
class Fp8Scheme:
    """What an FP8 layer stores, how it loads and pads weights, and how it quantizes activations."""

    config: Fp8Config
    dtype: torch.dtype

    @property
    def kind(self) -> str:
        """The name experts declare in `ExpertsCaps.quant`: fp8_block, fp8_channel or fp8_tensor."""
        return "fp8_" + self.config.weight_granularity

    @property
    def name(self) -> str:
        c = self.config
        w = f"block{c.weight_block[0]}x{c.weight_block[1]}" if c.weight_block else c.weight_granularity
        a = f"group{c.group_size}" if c.activation == "per_token_group" else "token"
        return f"fp8(w={w}, a={a}{', fp8 dispatch' if c.dispatch_fp8 else ''})"

    @property
    def activation_group_size(self) -> int | None:
        return self.config.activation_group_size

    # -- sizes
    def size_multiple(self) -> int:
        m = GEMM_ALIGN
        if self.config.weight_block is not None:
            m = math.lcm(m, *self.config.weight_block)
        if self.config.activation_group_size is not None:
            m = math.lcm(m, self.config.activation_group_size)
        return m

    def roundup_sizes(self, hidden_size: int, intermediate_size: int) -> tuple[int, int]:
        """Padded (H, I): multiples of the weight block, the activation group and 16."""
        m = self.size_multiple()
        return round_up(hidden_size, m), round_up(intermediate_size, m)

    # -- activations
    def quantize_activations(self, x: torch.Tensor, counts: torch.Tensor | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        """`counts` [L] with x [L, C, H]: the rows past each count may be left unquantized (`fp8_quantize`)."""
        return fp8_quantize(x, self.activation_group_size, counts=counts)

    def dequantize_activations(self, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return fp8_dequantize(q, scale, self.activation_group_size)

    # -- weights
    def create_weights(self, layer, L: int, H: int, I: int) -> None:
        """FP8 w13/w2 (padded sizes H, I) and their float32 scales as parameters of `layer`."""
        dev = layer.device
        layer.w13 = nn.Parameter(torch.zeros(L, 2 * I, H, dtype=FP8_DTYPE, device=dev), requires_grad=False)
        layer.w2 = nn.Parameter(torch.zeros(L, H, I, dtype=FP8_DTYPE, device=dev), requires_grad=False)
        if self.config.weight_block is not None:
            bn, bk = self.config.weight_block
            s13, s2 = (L, 2 * I // bn, H // bk), (L, H // bn, I // bk)
        else:
            s13, s2 = (L, 2 * I), (L, H)
        layer.w13_scale = nn.Parameter(torch.ones(s13, dtype=torch.float32, device=dev), requires_grad=False)
        layer.w2_scale = nn.Parameter(torch.ones(s2, dtype=torch.float32, device=dev), requires_grad=False)

    def scale_shape(self, N: int, K: int) -> tuple[int, ...]:
        """The scale shape a checkpoint provides for one [N, K] weight of this granularity."""
        g = self.config.weight_granularity
        if g == "block":
            bn, bk = self.config.weight_block
            return (ceil_div(N, bn), ceil_div(K, bk))
        return (N,) if g == "channel" else ()

    def _scale_rule(self) -> str:
        g = self.config.weight_granularity
        if g == "block":
            bn, bk = self.config.weight_block
            return (f"one float32 dequantization multiplier per {bn}x{bk} block, partial blocks at the edges "
                    "(DeepSeek-V3 weight_scale_inv)")
        return "one float32 multiplier per output row" if g == "channel" else "one float32 multiplier"

    def _prepare(self, e_desc: str, name: str, w: torch.Tensor, scale, device) -> tuple[torch.Tensor, torch.Tensor]:
        N, K = w.shape
        if w.dtype != FP8_DTYPE:
            return quantize_weight(w.to(device), self.config.weight_granularity, self.config.weight_block)
        want = self.scale_shape(N, K)
        if not isinstance(scale, torch.Tensor):
            raise ValueError(f"load_expert({e_desc}): {name} is float8_e4m3fn and needs {name}_scale "
                             f"of shape {list(want)}: {self._scale_rule()}")
        s = scale.detach()
        if want == () and s.numel() == 1:
            s = s.reshape(())
        elif want == (N,) and tuple(s.shape) == (N, 1):
            s = s.reshape(N)
        if tuple(s.shape) != want:
            raise ValueError(f"load_expert({e_desc}): {name}_scale must have shape {list(want)} for a [{N}, {K}] "
                             f"weight ({self._scale_rule()}), got {list(scale.shape)}")
        if not s.dtype.is_floating_point or not torch.isfinite(s.float()).all():
            raise ValueError(f"load_expert({e_desc}): {name}_scale must hold finite floating-point values")
        return w.to(device), s.to(device, torch.float32)

    def load_expert(self, layer, local: int, gate_proj, up_proj, down_proj, gate_proj_scale=None,
                    up_proj_scale=None, down_proj_scale=None, **extra) -> None:
        """Store one expert: FP8 tensors with their scales as given, or BF16/FP32 tensors quantized here."""
        if extra:
            raise TypeError(f"load_expert: unexpected arguments for an FP8 layer: {sorted(extra)} (FP8 layers "
                            "take gate_proj_scale=, up_proj_scale=, down_proj_scale=)")
        e_desc = f"local expert {local}"
        tensors = {"gate_proj": gate_proj, "up_proj": up_proj, "down_proj": down_proj}
        scales = {"gate_proj": gate_proj_scale, "up_proj": up_proj_scale, "down_proj": down_proj_scale}
        is_fp8 = {n: t.dtype == FP8_DTYPE for n, t in tensors.items()}
        if len(set(is_fp8.values())) > 1:
            raise ValueError(f"load_expert({e_desc}): gate/up/down must all be float8_e4m3fn (with scales) or all "
                             f"high precision (quantized on load), got {[str(t.dtype) for t in tensors.values()]}")
        if not any(is_fp8.values()):
            given = [f"{n}_scale" for n, s in scales.items() if s is not None]
            if given:
                raise ValueError(f"load_expert({e_desc}): {given} given with {gate_proj.dtype} weights; scales go "
                                 "with float8_e4m3fn weights only (high-precision weights are quantized on load)")
        cfg = layer.cfg
        H, I = cfg.hidden_size, cfg.intermediate_size
        Ip = layer.w2.shape[2]
        dev = layer.w13.device
        (gq, gs), (uq, us), (dq, ds) = (self._prepare(e_desc, n, tensors[n], scales[n], dev) for n in tensors)
        with torch.no_grad():
            layer.w13[local].zero_()
            layer.w2[local].zero_()
            layer.w13[local, :I, :H].copy_(gq)
            layer.w13[local, Ip:Ip + I, :H].copy_(uq)
            layer.w2[local, :H, :I].copy_(dq)
            s13, s2 = layer.w13_scale[local], layer.w2_scale[local]
            s13.fill_(1.0)
            s2.fill_(1.0)
            g = self.config.weight_granularity
            if g == "block":
                up0 = Ip // self.config.weight_block[0]
                s13[:gs.shape[0], :gs.shape[1]].copy_(gs)
                s13[up0:up0 + us.shape[0], :us.shape[1]].copy_(us)
                s2[:ds.shape[0], :ds.shape[1]].copy_(ds)
            elif g == "channel":
                s13[:I].copy_(gs)
                s13[Ip:Ip + I].copy_(us)
                s2[:H].copy_(ds)
            else:
                s13[:Ip].fill_(gs.item())
                s13[Ip:].fill_(us.item())
                s2.fill_(ds.item())

    def dequantized_expert(self, layer, local: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Local expert `local` as float32 (gate [I, H], up [I, H], down [H, I]): what the oracle compares to."""
        H, I = layer.cfg.hidden_size, layer.cfg.intermediate_size
        Ip = layer.w2.shape[2]
        block = self.config.weight_block
        w13 = dequantize_weight(layer.w13[local], layer.w13_scale[local], block)
        w2 = dequantize_weight(layer.w2[local], layer.w2_scale[local], block)
        return w13[:I, :H], w13[Ip:Ip + I, :H], w2[:H, :I]

    def expert_tensors(self, layer, local: int) -> dict[str, torch.Tensor]:
        """Local expert `local` as `load_expert` arguments: the stored FP8 weights at their real sizes and
        their scales in the checkpoint layout (`scale_shape`), views of what the layer holds. Loading them
        back gives the same bits."""
        H, I = layer.cfg.hidden_size, layer.cfg.intermediate_size
        Ip = layer.w2.shape[2]
        s13, s2 = layer.w13_scale[local], layer.w2_scale[local]
        g = self.config.weight_granularity
        if g == "block":
            (gn, gk), (dn, dk) = self.scale_shape(I, H), self.scale_shape(H, I)
            up0 = Ip // self.config.weight_block[0]
            scales = (s13[:gn, :gk], s13[up0:up0 + gn, :gk], s2[:dn, :dk])
        elif g == "channel":
            scales = (s13[:I], s13[Ip:Ip + I], s2[:H])
        else:
            scales = (s13[0], s13[Ip], s2[0])
        return {"gate_proj": layer.w13[local, :I, :H], "up_proj": layer.w13[local, Ip:Ip + I, :H],
                "down_proj": layer.w2[local, :H, :I], "gate_proj_scale": scales[0], "up_proj_scale": scales[1],
                "down_proj_scale": scales[2]}
