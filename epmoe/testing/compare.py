"""Compare an output with the float64 reference: relative error, max abs error, NaN/Inf, worst rows.

A failing comparison explains itself: which rows are worst, how many NaN/Inf each side has, and the
value ranges of both sides.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# ||out - ref|| / ||ref|| bounds against a float64 reference, per dtype (the library's numerics promise).
BOUNDS = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2, "fp8": 3e-2}


def bound_for(dtype, fp8: bool = False, hidden_size: int | None = None) -> float:
    """The ||out - ref|| / ||ref|| bound for outputs of `dtype` (or FP8).

    The 16-bit bounds are for rows of at least SMALL_ROW elements. The error is a sum of roundings
    (a fast backend rounds gate/up, the intermediate, each expert's output and the result to 16 bits;
    with EP also the partial sums), so the norm of a row averages H of them; a shorter row averages
    fewer and its ratio spreads wider. With `hidden_size` below SMALL_ROW the bound grows by
    `small_row_factor(hidden_size)`.
    """
    bound = BOUNDS["fp8"] if fp8 else BOUNDS[dtype]
    if hidden_size is not None and hidden_size < SMALL_ROW and dtype in (torch.float16, torch.bfloat16):
        bound *= small_row_factor(hidden_size)
    return bound


SMALL_ROW = 64
"""Row length (hidden size) from which the 16-bit bounds hold as stated."""


def small_row_factor(n: int, z: float = 6.0) -> float:
    """How much wider the ratio of norms spreads over rows of n elements than over SMALL_ROW.

    Model: independent per-element relative errors of equal spread, so ||out - ref||^2 / ||ref||^2 is
    that spread squared times chi-square(n) / n. The factor is sqrt(q(n) / n) / sqrt(q(64) / 64), q the
    chi-square quantile at z standard deviations (z = 6: 1 - 1e-9), by the Wilson-Hilferty
    approximation: about 1.8 at n = 8, 4.4 at n = 1.
    """
    def spread(m: int) -> float:
        c = 2.0 / (9.0 * m)
        return (1.0 - c + z * c ** 0.5) ** 1.5
    return max(1.0, spread(n) / spread(SMALL_ROW))


@dataclass
class CompareResult:
    rel_err: float
    max_abs: float
    nan_actual: int
    inf_actual: int
    nan_expected: int
    inf_expected: int
    report: str

    @property
    def finite(self) -> bool:
        return self.nan_actual == self.inf_actual == self.nan_expected == self.inf_expected == 0


def _range(t: torch.Tensor) -> str:
    f = t[torch.isfinite(t)]
    if f.numel() == 0:
        return "no finite values"
    return f"min {f.min().item():.4g}, max {f.max().item():.4g}, mean|.| {f.abs().mean().item():.4g}"


def compare(actual: torch.Tensor, expected: torch.Tensor, worst: int = 5) -> CompareResult:
    if tuple(actual.shape) != tuple(expected.shape):
        raise AssertionError(f"shape mismatch: actual {list(actual.shape)} vs expected {list(expected.shape)}")
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    nan_a, inf_a = int(torch.isnan(a).sum()), int(torch.isinf(a).sum())
    nan_e, inf_e = int(torch.isnan(e).sum()), int(torch.isinf(e).sum())
    diff = a - e
    ref_norm = e.norm().item()
    err_norm = diff.norm().item()
    rel = err_norm / ref_norm if ref_norm > 0 else err_norm
    if nan_a or inf_a or nan_e or inf_e:
        rel = float("inf")
    max_abs = diff.abs().max().item() if diff.numel() else 0.0
    lines = [f"rel err ||a-e||/||e|| = {rel:.3e}, max abs err = {max_abs:.3e}",
             f"NaN/Inf: actual {nan_a}/{inf_a}, expected {nan_e}/{inf_e}",
             f"actual:   {_range(a)}", f"expected: {_range(e)}"]
    if a.dim() >= 2 and a.shape[0] > 0:
        d2 = diff.reshape(a.shape[0], -1)
        e2 = e.reshape(a.shape[0], -1)
        row_err = torch.nan_to_num(d2.norm(dim=1), nan=float("inf"))
        row_ref = e2.norm(dim=1).clamp_min(1e-300)
        top = row_err.topk(min(worst, a.shape[0])).indices.tolist()
        lines.append("worst rows: " + ", ".join(
            f"row {r} (abs {row_err[r].item():.3e}, rel {(row_err[r] / row_ref[r]).item():.3e})" for r in top))
    return CompareResult(rel, max_abs, nan_a, inf_a, nan_e, inf_e, "\n".join(lines))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, bound: float | None = None,
                 name: str = "output", context: str = "") -> CompareResult:
    """Assert `||actual - expected|| / ||expected|| <= bound` and no NaN/Inf on either side.

    `bound` defaults to the library's bound for `actual.dtype`. On failure the AssertionError carries the
    full diagnostic report.
    """
    if bound is None:
        bound = bound_for(actual.dtype)
    res = compare(actual, expected)
    if not res.finite or not res.rel_err <= bound:
        head = f"{name} differs from the reference beyond bound {bound:.1e}"
        if context:
            head += f" [{context}]"
        raise AssertionError(head + "\n" + res.report)
    return res
