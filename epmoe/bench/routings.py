"""The router logits the benchmarks feed a layer or a dispatcher: which routing they measure.

    balanced  every rank of the group receives exactly the same number of (token, expert) pairs, and each
              token's experts are spread over the ranks as evenly as the routing rule allows (for top-8 on
              2 ranks: 4 experts on each); within a rank the experts are drawn at random. The router
              itself picks them (the logits put the chosen experts far above the others), so routing
              stays part of what is timed.
    random    normal logits (standard deviation 2): the routing rule's own spread; with a score
              correction bias or few tokens the ranks' shares can differ by several percent.

`router_logits(kind, cfg, T, source_rank, ws, generator)` gives rank `source_rank`'s logits [T, E] for a
group of `ws` ranks holding the experts in contiguous blocks (the default placement); `ROUTINGS` names the
kinds (the benchmarks' `--routing` choices).
"""
from __future__ import annotations

import torch

CHOSEN_LOGIT, OTHER_LOGIT, SPREAD = 6.0, -6.0, 0.5


def _random(cfg, T: int, source_rank: int, ws: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(T, cfg.num_experts, generator=g) * 2


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


def _balanced(cfg, T: int, source_rank: int, ws: int, g: torch.Generator) -> torch.Tensor:
    ids = balanced_choice(cfg, T, source_rank, ws, g)
    logits = OTHER_LOGIT + SPREAD * torch.randn(T, cfg.num_experts, generator=g)
    return logits.scatter_(1, ids, CHOSEN_LOGIT + SPREAD * torch.randn(T, cfg.top_k, generator=g))


ROUTINGS = {"balanced": _balanced, "random": _random}


def routing_problem(kind: str, cfg, ws: int) -> str | None:
    """Why `kind` cannot route `cfg` on `ws` ranks (a sentence), or None."""
    try:
        router_logits(kind, cfg, 0, 0, ws, torch.Generator())
    except ValueError as exc:
        return str(exc)
    return None


def router_logits(kind: str, cfg, T: int, source_rank: int, ws: int, generator: torch.Generator) -> torch.Tensor:
    """Float32 router logits [T, E] on the CPU for rank `source_rank` of `ws` (see the module docstring)."""
    if kind not in ROUTINGS:
        raise ValueError(f"unknown routing {kind!r}; known: {sorted(ROUTINGS)}")
    return ROUTINGS[kind](cfg, T, source_rank, ws, generator)
