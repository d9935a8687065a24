"""The router logits the benchmarks feed a layer or a dispatcher: which routing they measure.

    balanced  every rank of the group receives exactly the same number of (token, expert) pairs, and each
              token's experts are spread over the ranks as evenly as the routing rule allows (for top-8 on
              2 ranks: 4 experts on each); within a rank the experts are drawn at random. The router
              itself picks them (the logits put the chosen experts far above the others), so routing
              stays part of what is timed.
    random    normal logits (standard deviation 2): the routing rule's own spread; with a score
              correction bias or few tokens the ranks' shares can differ by several percent.
    skewed    Zipf-like expert popularity, as real routers show: p_e ~ 1 / rank_e ** zipf_exponent over a
              fixed permutation of the experts (the same on every rank, so the hot experts are not simply
              the first ones, nor all on one rank); the logits are log p_e + Gumbel noise, so a token's top k
              are k experts drawn without replacement with probabilities p. Exponent 0 is uniform; at 1.2
              the hottest of 64 experts takes 29% of the top-1 choices. What expert-parallel load
              balancing (`redundant_experts`, `rebalance`) is measured on.

`router_logits(kind, cfg, T, source_rank, ws, generator, zipf_exponent)` gives rank `source_rank`'s logits
[T, E] for a group of `ws` ranks holding the experts in contiguous blocks (the default placement);
`ROUTINGS` names the kinds (the `--routing` choices of `epmoe run` and the benchmarks, added with
`add_routing_flags`).
"""
from __future__ import annotations

import argparse

import torch

from ..usage import UsageError

CHOSEN_LOGIT, OTHER_LOGIT, SPREAD = 6.0, -6.0, 0.5
ZIPF_EXPONENT = 1.2           # the skewed routing's default


def _random(cfg, T: int, source_rank: int, ws: int, g: torch.Generator, _zipf_exponent: float) -> torch.Tensor:
    return torch.randn(T, cfg.num_experts, generator=g) * 2


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


def popularity_logits(popularity: torch.Tensor, num_tokens: int, g: torch.Generator) -> torch.Tensor:
    """Float32 logits [T, E] whose top-k routing draws k experts per token without replacement with
    probabilities `popularity` [E]: log p + Gumbel noise from `g` (the Gumbel-top-k trick)."""
    u = torch.rand(num_tokens, popularity.numel(), generator=g, dtype=torch.float64).clamp(min=1e-12, max=1 - 1e-12)
    return (popularity.log() - torch.log(-torch.log(u))).float()


def skewed_logits(num_tokens: int, num_experts: int, exponent: float = ZIPF_EXPONENT, seed: int = 0,
                  token_seed: int = 0, device="cpu") -> torch.Tensor:
    """Router logits [T, E] float32 whose top-k routing follows `zipf_popularity(E, exponent, seed)`.

    `seed` fixes the popularity (give every rank the same one); `token_seed` the tokens' noise (give
    each rank its own)."""
    p = zipf_popularity(num_experts, exponent, seed)
    g = torch.Generator().manual_seed(seed * 1_000_003 + token_seed + 1)
    return popularity_logits(p, num_tokens, g).to(device)


def _skewed(cfg, T: int, source_rank: int, ws: int, g: torch.Generator, zipf_exponent: float) -> torch.Tensor:
    return popularity_logits(zipf_popularity(cfg.num_experts, zipf_exponent), T, g)


def _units(cfg, ws: int) -> tuple[torch.Tensor, int, bool]:
    """[ws, U]: the units each rank holds (expert groups when the group limit binds, else experts), the
    experts per unit, and whether units are groups. Raises ValueError where no exact balance exists."""
    E, k = cfg.num_experts, cfg.top_k
    if E % ws:
        raise ValueError(f"balanced routing: {E} experts do not split evenly over {ws} ranks")
    per_rank = E // ws
    grouped = bool(cfg.n_group) and cfg.n_group > 1 and cfg.topk_group < cfg.n_group
    if not grouped:
        return torch.arange(E).view(ws, per_rank), 1, False
    size = E // cfg.n_group
    if per_rank % size:
        raise ValueError(f"balanced routing: a group of {size} experts spans two ranks ({per_rank} experts "
                         f"per rank); use a rank count that divides n_group={cfg.n_group}")
    if k % cfg.topk_group:
        raise ValueError(f"balanced routing needs top_k ({k}) to be a multiple of topk_group ({cfg.topk_group})")
    return torch.arange(cfg.n_group).view(ws, per_rank // size), size, True


def balanced_choice(cfg, T: int, source_rank: int, ws: int, g: torch.Generator) -> torch.Tensor:
    """[T, k] expert ids of rank `source_rank`'s tokens such that, over the tokens of all `ws` ranks,
    every rank receives exactly T * k pairs.

    Each token takes `u` units (experts, or `topk_group` expert groups where the group limit binds); unit
    slot j of the group's token number c (counted over all ranks' tokens) lands on rank (c * u + j) % ws,
    so the slots of all tokens cycle through the ranks and each rank gets the same number. Which of a
    rank's units, and which experts inside a group, are drawn at random without repeats."""
    k = cfg.top_k
    units, size, grouped = _units(cfg, ws)
    U = units.shape[1]
    u = cfg.topk_group if grouped else k
    if -(-u // ws) > U:
        raise ValueError(f"balanced routing: {u} choices per token over {ws} ranks need more than the {U} "
                         f"{'groups' if grouped else 'experts'} a rank holds")
    c = torch.arange(T) + source_rank * T
    j = torch.arange(u)
    ranks = (c[:, None] * u + j[None, :]) % ws                                   # [T, u]
    perm = torch.rand(T, ws, U, generator=g).argsort(dim=-1)                     # a random order per rank
    # slot j is its rank's (j // ws)-th slot of the token: the (j // ws)-th unit of that rank's order
    pick = perm[torch.arange(T)[:, None], ranks, (j // ws)[None, :]]
    chosen = units[ranks, pick]                                                  # [T, u] unit ids
    if not grouped:
        return chosen
    inner = torch.rand(T, u, size, generator=g).argsort(dim=-1)[:, :, : k // u]  # experts inside each group
    return (chosen[:, :, None] * size + inner).reshape(T, k)


def _balanced(cfg, T: int, source_rank: int, ws: int, g: torch.Generator, _zipf_exponent: float) -> torch.Tensor:
    ids = balanced_choice(cfg, T, source_rank, ws, g)
    logits = OTHER_LOGIT + SPREAD * torch.randn(T, cfg.num_experts, generator=g)
    return logits.scatter_(1, ids, CHOSEN_LOGIT + SPREAD * torch.randn(T, cfg.top_k, generator=g))


ROUTINGS = {"balanced": _balanced, "random": _random, "skewed": _skewed}
DESCRIPTIONS = {"balanced": "balanced (every rank receives the same number of (token, expert) pairs)",
                "random": "random logits (near-uniform expert popularity)",
                "skewed": "skewed, Zipf-like expert popularity with exponent {zipf_exponent:g}"}


def add_routing_flags(p: argparse.ArgumentParser, default: str) -> None:
    """`--routing` (a kind of ROUTINGS, `default` if not given) and `--zipf-exponent` (the skewed kind's)."""
    p.add_argument("--routing", default=default, choices=sorted(ROUTINGS),
                   help="router logits: balanced (every rank receives the same pairs), random (the routing rule's "
                   "own spread) or skewed (Zipf-like expert popularity, see --zipf-exponent); default %(default)s")
    p.add_argument("--zipf-exponent", type=float, default=ZIPF_EXPONENT, metavar="S",
                   help="with --routing skewed: expert popularity ~ 1/rank**S (default %(default)s)")


def routing_params(args) -> dict:
    """The routing flags of `add_routing_flags`, checked."""
    if not args.zipf_exponent >= 0:
        raise UsageError(f"--zipf-exponent must be >= 0, got {args.zipf_exponent}")
    return {"routing": args.routing, "zipf_exponent": args.zipf_exponent}


def describe(kind: str, zipf_exponent: float = ZIPF_EXPONENT) -> str:
    return DESCRIPTIONS[kind].format(zipf_exponent=zipf_exponent)


def routing_problem(kind: str, cfg, ws: int, zipf_exponent: float = ZIPF_EXPONENT) -> str | None:
    """Why `kind` cannot route `cfg` on `ws` ranks (a sentence), or None."""
    try:
        router_logits(kind, cfg, 0, 0, ws, torch.Generator(), zipf_exponent)
    except ValueError as exc:
        return str(exc)
    return None


def router_logits(kind: str, cfg, T: int, source_rank: int, ws: int, generator: torch.Generator,
                  zipf_exponent: float = ZIPF_EXPONENT) -> torch.Tensor:
    """Float32 router logits [T, E] on the CPU for rank `source_rank` of `ws` (see the module docstring);
    every kind takes `zipf_exponent`, the skewed one reads it."""
    if kind not in ROUTINGS:
        raise ValueError(f"unknown routing {kind!r}; known: {sorted(ROUTINGS)}")
    return ROUTINGS[kind](cfg, T, source_rank, ws, generator, zipf_exponent)
