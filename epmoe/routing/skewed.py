"""Skewed router logits for benchmarks and tests: Zipf-like expert popularity, as real routers show.

Expert popularity p_e is proportional to 1 / rank_e ** exponent, the ranks a seeded permutation of the
experts (so the hot experts are not simply the first ones, nor all on one rank). The logits are
log p_e + Gumbel noise per (token, expert): the top k of a token's logits are then k experts drawn without
replacement with probabilities p (the Gumbel-top-k trick), so top-k routing of these logits has that
popularity. Exponent 0 is uniform routing; at 1.2 the hottest of 64 experts takes 29% of the top-1
choices.
"""
from __future__ import annotations

import torch


def zipf_popularity(num_experts: int, exponent: float, seed: int = 0) -> torch.Tensor:
    """[E] float64 probabilities: p_e ~ 1 / rank_e ** exponent over a seeded permutation of the experts."""
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"zipf_popularity: num_experts must be a positive int, got {num_experts!r}")
    if not exponent >= 0:
        raise ValueError(f"zipf_popularity: exponent must be >= 0 (0: uniform), got {exponent!r}")
    g = torch.Generator().manual_seed(seed)
    rank = torch.randperm(num_experts, generator=g).double() + 1.0
    weights = rank ** -float(exponent)
    return weights / weights.sum()


def skewed_logits(num_tokens: int, num_experts: int, exponent: float = 1.2, seed: int = 0,
                  token_seed: int = 0, device="cpu") -> torch.Tensor:
    """Router logits [T, E] float32 whose top-k routing follows `zipf_popularity(E, exponent, seed)`.

    `seed` fixes the popularity (give every rank the same one); `token_seed` the tokens' noise (give
    each rank its own)."""
    p = zipf_popularity(num_experts, exponent, seed)
    g = torch.Generator().manual_seed(seed * 1_000_003 + token_seed + 1)
    u = torch.rand(num_tokens, num_experts, generator=g, dtype=torch.float64).clamp(min=1e-12, max=1 - 1e-12)
    gumbel = -torch.log(-torch.log(u))
    return (p.log() + gumbel).float().to(device)
