"""The persistent GEMM's walk over m-tiles in groups cut at expert edges (`grouped_gemm_ws`'s `walk_groups`).

The Gluon grouped GEMM runs its tiles as a persistent walk: each group of m-tiles side by side over every
n-tile, so that programs working at the same time read the same weight boxes and share them in L2. Groups of
a fixed size cut through experts of a few m-tiles each (deepseek-v3's 256 experts or gpt-oss-120b at T = 8192:
~2.5 m-tiles an expert), whose weights are then read from DRAM once in each group.

Two forms, the same int32 groups (tests check them against each other): on a CUDA device one Triton program
(`walk_groups_kernel`: the runs, the cuts and the groups' bounds as prefix scans over the m-tiles), elsewhere
(the backends' CPU paths) PyTorch, which launches a few dozen small kernels (85-111 us a forward on an
H100 against 6-8 us for the one program, benchmarks/walk_groups_probe.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from .jit_keys import key_callees_first

KERNEL_MAX_TILES = 8192     # one program scans the m-tiles (more: the PyTorch form)


@triton.jit
def _max_of(a, b):
    return tl.maximum(a, b)


@triton.jit
def _min_of(a, b):
    return tl.minimum(a, b)


@triton.jit
def walk_groups_kernel(tile_expert_ptr, out_ptr, cut_ptr, M, GROUP: tl.constexpr, BLOCK: tl.constexpr):
    """`expert_walk_groups` in one program of BLOCK >= M lanes: out [M, 2] int32 (first m-tile, length of
    each m-tile's group); cut_ptr: M int32 of scratch (where groups start, read back one lane over)."""
    i = tl.arange(0, BLOCK)
    here = i < M
    te = tl.load(tile_expert_ptr + i, mask=here, other=0)
    te_prev = tl.load(tile_expert_ptr + i - 1, mask=here & (i >= 1), other=0)
    te_prev2 = tl.load(tile_expert_ptr + i - 2, mask=here & (i >= 2), other=0)
    te_next = tl.load(tile_expert_ptr + i + 1, mask=i + 1 < M, other=0)
    starts = (i == 0) | (te != te_prev)                            # m-tile i starts a run (an expert's tiles)
    prev_starts = (i == 1) | ((i >= 2) & (te_prev != te_prev2))    # m-tile i - 1 does
    first = tl.associative_scan(tl.where(here & starts, i, 0), 0, _max_of)             # its run's first m-tile
    prev_first = tl.associative_scan(tl.where(here & prev_starts, i - 1, 0), 0, _max_of)   # m-tile i - 1's
    run_end = tl.associative_scan(tl.where((i + 1 < M) & (te_next != te), i + 1, M), 0, _min_of, reverse=True)
    length = tl.maximum(run_end - first, 1)
    long = length > GROUP
    # a long run of L tiles in c = ceil(L / GROUP) groups: its tile o in group o * c // L
    at = i - first
    chunks = (length + GROUP - 1) // GROUP
    new_chunk = (at == 0) | ((at * chunks) // length != (tl.maximum(at, 1) - 1) * chunks // length)
    # a group starts there, and at a short run that starts a new stretch or follows a long run (m-tile 0 counts
    # as following one; where a run starts, the run before it ends at i)
    prev_long = (i == 0) | (i - prev_first > GROUP)
    cut = tl.where(long, new_chunk, starts & (prev_long | (first // GROUP != prev_first // GROUP)))
    group_first = tl.associative_scan(tl.where(here & cut, i, 0), 0, _max_of)
    tl.store(cut_ptr + i, cut.to(tl.int32), mask=here)
    tl.debug_barrier()                     # the program's own stores, read back by other lanes
    cut_next = tl.load(cut_ptr + i + 1, mask=i + 1 < M, other=1) != 0       # past the last m-tile: a cut
    group_end = tl.associative_scan(tl.where(cut_next, i + 1, M), 0, _min_of, reverse=True)
    tl.store(out_ptr + 2 * i, group_first, mask=here)
    tl.store(out_ptr + 2 * i + 1, group_end - group_first, mask=here)


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
    if dev.type == "cuda" and M <= KERNEL_MAX_TILES:
        return walk_groups_triton(tile_expert, group)
    return walk_groups_torch(tile_expert, group)


def walk_groups_triton(tile_expert: torch.Tensor, group: int) -> torch.Tensor:
    """`expert_walk_groups` by `walk_groups_kernel` (a CUDA device, or Triton's interpreter on the CPU)."""
    M = tile_expert.numel()
    out = torch.empty(M, 2, dtype=torch.int32, device=tile_expert.device)
    cut = torch.empty(M, dtype=torch.int32, device=tile_expert.device)
    block = triton.next_power_of_2(M)
    walk_groups_kernel[(1,)](tile_expert.contiguous(), out, cut, M, GROUP=group, BLOCK=block,
                             num_warps=4 if block <= 1024 else 8 if block <= 4096 else 16)
    return out


def walk_groups_torch(tile_expert: torch.Tensor, group: int) -> torch.Tensor:
    """`expert_walk_groups` in PyTorch (M > 0)."""
    M, dev = tile_expert.numel(), tile_expert.device
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


key_callees_first(globals())     # each Triton function keyed after those it calls: one key in every process
