"""The Gluon GEMM's walk in groups cut at expert edges (`epmoe.kernels.walk_groups`), on the CPU: the groups
cover every m-tile once, the kernel's tile ids map onto every (m-tile, n-tile) once, short experts stay
whole in one group, and the walk shares more weight boxes among the programs of a wave than groups of a
fixed size do."""
import random

import pytest
import torch

from epmoe.kernels.walk_groups import expert_walk_groups


def _walk(groups: list, num_n_tiles: int) -> list:
    """The kernel's `_tile_at` (GROUPED) in Python: tile id t -> (m-tile, n-tile)."""
    tiles = []
    for t in range(len(groups) * num_n_tiles):
        first, rows = groups[t // num_n_tiles]
        local = t - first * num_n_tiles
        tiles.append((first + local % rows, local // rows))
    return tiles


def _fixed_walk(num_m: int, num_n: int, group_m: int) -> list:
    """The kernel's `_tile_coords` (groups of group_m m-tiles) in Python."""
    tiles = []
    for t in range(num_m * num_n):
        per_group = group_m * num_n
        first = (t // per_group) * group_m
        rows = min(num_m - first, group_m)
        tiles.append((first + (t % per_group) % rows, (t % per_group) // rows))
    return tiles


def _layouts(rng: random.Random) -> list:
    layouts = [[0], [-1, -1], [0] * 17 + [1] * 3 + [-1] * 5, [0, -1, 1, 1], list(range(40))]
    for _ in range(60):
        runs = [rng.choice([1, 2, 3, 5, 8, 9, 17]) for _ in range(rng.randint(1, 30))]
        layouts.append([e for e, n in enumerate(runs) for _ in range(n)] + [-1] * rng.randint(0, 12))
    return layouts


@pytest.mark.parametrize("group", [1, 2, 3, 8, 16])
def test_groups_cover_every_tile_once_and_keep_short_experts_whole(group):
    rng = random.Random(group)
    for te in _layouts(rng):
        M = len(te)
        wg = expert_walk_groups(torch.tensor(te, dtype=torch.int32), group)
        assert wg.dtype == torch.int32 and tuple(wg.shape) == (M, 2) and wg.is_contiguous()
        groups = [tuple(r) for r in wg.tolist()]
        # consecutive groups that partition [0, M), each row naming the group it lies in
        m = 0
        while m < M:
            first, rows = groups[m]
            assert first == m and rows >= 1 and groups[m:m + rows] == [(first, rows)] * rows, (te, groups)
            m += rows
        for n_tiles in (1, 3):
            assert sorted(_walk(groups, n_tiles)) == [(m, n) for m in range(M) for n in range(n_tiles)]
        runs = {}
        for m, e in enumerate(te):
            if m == 0 or te[m - 1] != e:
                runs[m] = 0
            runs[max(runs)] += 1
        for start, length in runs.items():
            own = {groups[m] for m in range(start, start + length)}
            if length <= group:                 # a short expert whole in one group, no longer than 2 * group - 1
                assert len(own) == 1 and next(iter(own))[1] <= 2 * group - 1, (te, start, groups)
            else:                               # a long one in the fewest groups of its own, as even as can be
                chunks = -(-length // group)
                assert len(own) == chunks and {r for _, r in own} <= {length // chunks, -(-length // chunks)}
                assert all(f >= start and f + r <= start + length and r <= group for f, r in own), (te, groups)


def test_edge_cases():
    assert expert_walk_groups(torch.zeros(0, dtype=torch.int32)).shape == (0, 2)
    assert expert_walk_groups(torch.tensor([3], dtype=torch.int32)).tolist() == [[0, 1]]
    # groups of unequal length: the run [5, 5] starts in the first stretch of 2, the run [6] in the second
    assert expert_walk_groups(torch.tensor([4, 5, 5, 6], dtype=torch.int32), 2).tolist() == \
        [[0, 3], [0, 3], [0, 3], [3, 1]]
    # 17 tiles of one expert in groups of at most 8: 6, 6, 5
    assert [r for _, r in expert_walk_groups(torch.zeros(17, dtype=torch.int32), 8).tolist()] == [6] * 12 + [5] * 5
    with pytest.raises(ValueError, match="group must be"):
        expert_walk_groups(torch.zeros(4, dtype=torch.int32), 0)


def _boxes_read(walk: list, tile_expert: list, programs: int = 132) -> int:
    """Weight boxes (expert, n-tile) read per wave of `programs` tiles run side by side, summed over waves:
    what reaches DRAM when a wave's programs share boxes in L2 and nothing lasts from one wave to the next."""
    total = 0
    for w0 in range(0, len(walk), programs):
        total += len({(tile_expert[m], n) for m, n in walk[w0:w0 + programs] if tile_expert[m] >= 0})
    return total


def test_fewer_weight_boxes_read_than_fixed_groups_at_a_few_tiles_per_expert():
    """At ~2.5 m-tiles an expert (deepseek-v3's 256 experts at T = 8192), groups of a fixed 8 m-tiles cut
    through experts and read their boxes in two waves; groups cut at expert edges do not (a count, the
    reason the backends launch this walk). At ~16 m-tiles an expert it costs nothing."""
    g = torch.Generator().manual_seed(0)
    for experts, top_k, n_tiles, least_saved in ((256, 8, 16, 0.10), (32, 8, 16, 0.0)):
        ids = torch.randn(8192, experts, generator=g).topk(top_k, dim=1).indices
        counts = torch.bincount(ids.flatten(), minlength=experts).tolist()
        te = [e for e in range(experts) for _ in range(-(-counts[e] // 128))] + [-1] * 7
        groups = [tuple(r) for r in expert_walk_groups(torch.tensor(te, dtype=torch.int32)).tolist()]
        fixed = _boxes_read(_fixed_walk(len(te), n_tiles, 8), te)
        cut = _boxes_read(_walk(groups, n_tiles), te)
        assert cut <= fixed * (1 - least_saved), (experts, cut, fixed)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_kernel_gives_the_pytorch_forms_groups():
    """On a CUDA device `expert_walk_groups` runs one Triton program (`walk_groups_kernel`): the same int32
    groups as the PyTorch form, for the layouts above and the tiles of random top-8 routings of 256 experts
    up to T = 65536 (past KERNEL_MAX_TILES the PyTorch form runs there too)."""
    from epmoe.kernels.walk_groups import KERNEL_MAX_TILES, walk_groups_torch
    g = torch.Generator().manual_seed(3)
    layouts = _layouts(random.Random(5))
    for T in (8192, 65536):
        counts = torch.bincount(torch.randn(T, 256, generator=g).topk(8, dim=1).indices.flatten(), minlength=256)
        layouts.append([e for e in range(256) for _ in range(-(-int(counts[e]) // 128))] + [-1] * 7)
    layouts.append([e // 3 for e in range(KERNEL_MAX_TILES + 5)])
    for group in (1, 3, 8, 16):
        for te in layouts:
            t = torch.tensor(te, dtype=torch.int32)
            got = expert_walk_groups(t.cuda(), group)
            assert got.device.type == "cuda" and torch.equal(got.cpu(), walk_groups_torch(t, group)), (group, len(te))
