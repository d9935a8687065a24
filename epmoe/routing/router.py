"""Top-k routing, computed in float32 whatever the layer's dtype.

The layer and `reference_moe` share this one implementation of the routing rule, so the oracle and
every backend see the same expert choice; the rule itself is tested against an independent per-token
implementation. The DeepSeek-V3 score-correction bias is applied in float32: rounded to bf16 it would
collapse distinct values and change the selection.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Routing:
    """Which experts each token goes to and with what weight.

    topk_ids: [T, k] int32 global expert ids; topk_weights: [T, k] float32.
    """

    topk_ids: torch.Tensor
    topk_weights: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.topk_ids.shape[0]

    @property
    def top_k(self) -> int:
        return self.topk_ids.shape[1]


def softmax_topk(logits: torch.Tensor, top_k: int, renormalize: bool,
                 routed_scaling_factor: float = 1.0) -> Routing:
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if routed_scaling_factor != 1.0:
        weights = weights * routed_scaling_factor
    return Routing(ids.to(torch.int32), weights.float())


def _group_mask(selection: torch.Tensor, n_group: int, topk_group: int) -> torch.Tensor:
    """[T, E] bool: experts in each token's best `topk_group` groups (group score = sum of its top 2)."""
    t, e = selection.shape
    grouped = selection.view(t, n_group, e // n_group)
    group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)                  # [T, n_group]
    best_groups = group_scores.topk(topk_group, dim=-1).indices               # [T, topk_group]
    mask = torch.zeros(t, n_group, dtype=torch.bool, device=selection.device)
    mask.scatter_(1, best_groups, True)
    return mask.unsqueeze(-1).expand(t, n_group, e // n_group).reshape(t, e)


def sigmoid_grouped_topk(logits: torch.Tensor, top_k: int, renormalize: bool,
                         correction_bias: torch.Tensor | None = None, n_group: int | None = None,
                         topk_group: int | None = None, routed_scaling_factor: float = 1.0,
                         scoring: str = "sigmoid") -> Routing:
    """Sigmoid (or softmax) scores; select on score + bias within the best groups; weight by the score."""
    logits = logits.float()
    scores = torch.sigmoid(logits) if scoring == "sigmoid" else torch.softmax(logits, dim=-1)
    selection = scores if correction_bias is None else scores + correction_bias.float().unsqueeze(0)
    if n_group is not None:
        keep = _group_mask(selection, n_group, topk_group)
        selection = selection.masked_fill(~keep, float("-inf"))
    ids = selection.topk(top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    if routed_scaling_factor != 1.0:
        weights = weights * routed_scaling_factor
    return Routing(ids.to(torch.int32), weights.float())


def route(router_logits: torch.Tensor, cfg, score_correction_bias: torch.Tensor | None = None) -> Routing:
    """Apply the routing rule of `cfg` (an `MoEConfig`) to logits [T, E]."""
    if cfg.scoring == "sigmoid" or cfg.grouped or score_correction_bias is not None:
        return sigmoid_grouped_topk(router_logits, cfg.top_k, cfg.renormalize, score_correction_bias,
                                    cfg.n_group, cfg.topk_group, cfg.routed_scaling_factor, cfg.scoring)
    return softmax_topk(router_logits, cfg.top_k, cfg.renormalize, cfg.routed_scaling_factor)


def validate_routing(topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int,
                     num_tokens: int | None = None, top_k: int | None = None,
                     finite_weights: bool = True) -> Routing:
    """Check a routing before anything indexes with it; return it as int32 ids / float32 weights.

    Raises ValueError for: wrong shapes or dtypes, ids out of [0, num_experts), an expert twice for one
    token, and (with `finite_weights`) non-finite weights. Costs one device sync (used for custom routers
    and in tests, not on the built-in routers' hot path). `MoELayer` and `reference_moe` pass
    finite_weights=False: a NaN/Inf weight is a value, which stays in its token's output row, as NaN/Inf
    logits do through the built-in rule; ids are indices and are always checked.
    """
    if not isinstance(topk_ids, torch.Tensor) or not isinstance(topk_weights, torch.Tensor):
        raise TypeError("routing: topk_ids and topk_weights must be tensors, got "
                        f"{type(topk_ids).__name__} and {type(topk_weights).__name__}")
    if topk_ids.dim() != 2 or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"routing: topk_ids and topk_weights must both be [T, k]; got {tuple(topk_ids.shape)} "
                         f"and {tuple(topk_weights.shape)}")
    if num_tokens is not None and topk_ids.shape[0] != num_tokens:
        raise ValueError(f"routing: expected {num_tokens} tokens, got topk_ids of shape {tuple(topk_ids.shape)}")
    if top_k is not None and topk_ids.shape[1] != top_k:
        raise ValueError(f"routing: expected top_k={top_k} columns, got topk_ids of shape {tuple(topk_ids.shape)}")
    if topk_ids.dtype.is_floating_point or topk_ids.dtype == torch.bool or topk_ids.is_complex():
        raise TypeError(f"routing: topk_ids must be an integer tensor, got {topk_ids.dtype}")
    if not topk_weights.dtype.is_floating_point:
        raise TypeError(f"routing: topk_weights must be a floating tensor, got {topk_weights.dtype}")
    if topk_ids.numel():
        lo, hi = int(topk_ids.min()), int(topk_ids.max())
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"routing: expert ids must be in [0, {num_experts}), got values in [{lo}, {hi}]")
        if topk_ids.shape[1] > 1:
            s = topk_ids.sort(dim=1).values
            dup = (s[:, 1:] == s[:, :-1]).any(dim=1)
            if bool(dup.any()):
                row = int(dup.nonzero()[0, 0])
                raise ValueError(f"routing: token {row} is routed to the same expert twice: "
                                 f"{topk_ids[row].tolist()}")
        bad = ~torch.isfinite(topk_weights)
        if finite_weights and bool(bad.any()):
            raise ValueError(f"routing: {int(bad.sum())} topk_weights are NaN or Inf")
    return Routing(topk_ids.to(torch.int32), topk_weights.float())


RouterFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
