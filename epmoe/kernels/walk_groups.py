"""The persistent GEMM's walk over m-tiles in groups cut at expert edges (`grouped_gemm_ws`'s `walk_groups`).

The Gluon grouped GEMM runs its tiles as a persistent walk: each group of m-tiles side by side over every
n-tile, so that programs working at the same time read the same weight boxes and share them in L2. Groups of
a fixed size cut through experts of a few m-tiles each (deepseek-v3's 256 experts or gpt-oss-120b at T = 8192:
~2.5 m-tiles an expert), whose weights are then read from DRAM once in each group. Plain PyTorch (no
Triton), so that the backends' CPU paths build it too.
"""
from __future__ import annotations

import torch


def expert_walk_groups(tile_expert: torch.Tensor, group: int = 8) -> torch.Tensor:
    """`walk_groups` for `grouped_gemm_ws`: the walk's groups cut at expert edges instead of every `group`
    m-tiles. An expert's m-tiles are consecutive (a run in `tile_expert`); the runs of at most `group` tiles
    that start within one stretch of `group` m-tiles make one group (up to 2 * group - 1 tiles), a longer run
    is cut into the fewest groups of at most `group` tiles, of lengths that differ by one at most (17 tiles in
    groups of 8: 6, 6, 5; not 8, 8, 1, whose last group would read its weight boxes for one m-tile alone).
    int32 [M, 2]: per m-tile, its group's first m-tile and length. On the tensors' device, no host sync."""
    if group < 1:
        raise ValueError(f"expert_walk_groups: group must be at least 1, got {group}")
    M, dev = tile_expert.numel(), tile_expert.device
    if M == 0:
        return torch.zeros(0, 2, dtype=torch.int32, device=dev)
    idx = torch.arange(M, device=dev)
    starts = torch.ones(M, dtype=torch.bool, device=dev)
    starts[1:] = tile_expert[1:] != tile_expert[:-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(0).values          # its run's first m-tile
    run = torch.cumsum(starts.to(torch.int64), 0) - 1
    length = torch.zeros(M, dtype=torch.int64, device=dev).scatter_add_(0, run, torch.ones_like(run))[run]
    long = length > group
    # a long run of L tiles in c = ceil(L / group) groups: its tile o in group o * c // L
    at, chunks = idx - first, -(-length // group)
    new_chunk = (at == 0) | (at * chunks // length != (at - 1) * chunks // length)
    # a group starts there, and at a short run that starts a new stretch or follows a long run (m-tile 0 counts
    # as following one)
    prev_first = torch.cat([first.new_zeros(1), first[:-1]])
    prev_long = torch.cat([long.new_ones(1), long[:-1]])
    cut = torch.where(long, new_chunk, starts & (prev_long | (first // group != prev_first // group)))
    group_first = torch.where(cut, idx, torch.zeros_like(idx)).cummax(0).values
    gid = torch.cumsum(cut.to(torch.int64), 0) - 1
    group_len = torch.zeros(M, dtype=torch.int64, device=dev).scatter_add_(0, gid, torch.ones_like(gid))[gid]
    return torch.stack([group_first, group_len], 1).to(torch.int32)
