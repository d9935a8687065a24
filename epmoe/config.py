"""`MoEConfig`: what one MoE layer computes, validated when it is built.

Every invalid value raises `ValueError` naming the field and the rule, so a bad config fails at
construction and never as a wrong answer later.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch

ACTIVATIONS = ("silu", "gelu", "swigluoai")
SCORINGS = ("softmax", "sigmoid")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"MoEConfig.{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"MoEConfig.{name} must be >= {minimum}, got {value}")


@dataclass(frozen=True)
class MoEConfig:
    """The function one MoE layer computes (contract: exactly these fields).

    Routing: `scoring="softmax"` takes softmax over all experts, then the top-k; `"sigmoid"` scores each
    expert with a sigmoid and selects on score + `score_correction_bias` (DeepSeek-V3), weighting by the
    score without the bias. With `n_group`/`topk_group`, experts are split into `n_group` groups, a group
    scores the sum of its two best selection scores, only the best `topk_group` groups compete.
    `renormalize` divides the k weights by their sum; `routed_scaling_factor` multiplies them after that.
    """

    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    activation: str = "silu"
    scoring: str = "softmax"
    renormalize: bool = True
    n_group: int | None = None
    topk_group: int | None = None
    routed_scaling_factor: float = 1.0
    quant: Any = None
    dtype: torch.dtype = torch.bfloat16

    def __post_init__(self) -> None:
        _check_int("num_experts", self.num_experts)
        _check_int("top_k", self.top_k)
        _check_int("hidden_size", self.hidden_size)
        _check_int("intermediate_size", self.intermediate_size)
        if self.top_k > self.num_experts:
            raise ValueError(
                f"MoEConfig.top_k ({self.top_k}) must be <= num_experts ({self.num_experts}): "
                "a token cannot pick more distinct experts than exist")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"MoEConfig.activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.scoring not in SCORINGS:
            raise ValueError(f"MoEConfig.scoring must be one of {SCORINGS}, got {self.scoring!r}")
        if not isinstance(self.renormalize, bool):
            raise ValueError(f"MoEConfig.renormalize must be a bool, got {self.renormalize!r}")
        if (self.n_group is None) != (self.topk_group is None):
            raise ValueError(
                "MoEConfig.n_group and MoEConfig.topk_group go together: set both (grouped top-k) or neither, "
                f"got n_group={self.n_group!r}, topk_group={self.topk_group!r}")
        if self.n_group is not None:
            _check_int("n_group", self.n_group)
            _check_int("topk_group", self.topk_group)
            if self.num_experts % self.n_group:
                raise ValueError(
                    f"MoEConfig.num_experts ({self.num_experts}) must be divisible by n_group ({self.n_group})")
            if self.topk_group > self.n_group:
                raise ValueError(
                    f"MoEConfig.topk_group ({self.topk_group}) must be <= n_group ({self.n_group})")
            per_group = self.num_experts // self.n_group
            if per_group < 2:
                raise ValueError(
                    f"MoEConfig.n_group ({self.n_group}) leaves {per_group} expert per group; a group's score is "
                    "the sum of its two best experts, so each group needs at least 2")
            if self.top_k > self.topk_group * per_group:
                raise ValueError(
                    f"MoEConfig.top_k ({self.top_k}) must be <= topk_group * experts per group "
                    f"({self.topk_group} * {per_group}): only that many experts are eligible")
        rsf = self.routed_scaling_factor
        if isinstance(rsf, bool) or not isinstance(rsf, (int, float)) or not math.isfinite(rsf) or rsf <= 0:
            raise ValueError(f"MoEConfig.routed_scaling_factor must be a finite number > 0, got {rsf!r}")
        object.__setattr__(self, "routed_scaling_factor", float(rsf))   # 1 and 1.0: one config, one repr
        if self.dtype not in DTYPES:
            raise ValueError(f"MoEConfig.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.quant is not None:
            from .quant import validate_quant_config
            validate_quant_config(self)

    # Sizes the weight format needs (padding is owned by the quantization scheme, callers never see it).
    @property
    def padded_hidden_size(self) -> int:
        return self.padded_sizes[0]

    @property
    def padded_intermediate_size(self) -> int:
        return self.padded_sizes[1]

    @functools.cached_property
    def padded_sizes(self) -> tuple[int, int]:
        """(padded hidden size, padded intermediate size), worked out once."""
        return self.quant_scheme.roundup_sizes(self.hidden_size, self.intermediate_size)

    @functools.cached_property
    def quant_scheme(self):
        """The quantization scheme of `quant` (built once: the config is immutable)."""
        from .quant import scheme_for
        return scheme_for(self)

    @property
    def grouped(self) -> bool:
        return self.n_group is not None

    def describe(self) -> str:
        parts = [f"E={self.num_experts}", f"top_k={self.top_k}", f"H={self.hidden_size}",
                 f"I={self.intermediate_size}", self.activation, self.scoring,
                 "renorm" if self.renormalize else "no-renorm", str(self.dtype).replace("torch.", "")]
        if self.grouped:
            parts.append(f"groups={self.n_group}/{self.topk_group}")
        if self.routed_scaling_factor != 1.0:
            parts.append(f"scale={self.routed_scaling_factor}")
        if self.quant is not None:
            parts.append(self.quant_scheme.name)
        return " ".join(parts)
