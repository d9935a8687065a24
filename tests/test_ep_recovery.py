"""A forward that fails on one rank leaves the group usable: after an exception inside one rank's experts,
or a rank whose input is refused (`RankMismatch` on its peers), the next aligned forward on the same layer
is correct on every rank, for every collective dispatcher (and `local`). The failing rank raises its own
error; its peers get NaN exactly in the rows of the tokens that rank's experts held, the right values in
every other row, and nobody waits for the process group's timeout (which would break the group: see
test_ep_stalled_rank.py). Ranks that run different layers: test_ep_mismatch.py."""
import pytest
import torch
import torch.distributed as dist

from epmoe import MoEConfig, MoELayer, RankMismatch, contract, reference_moe
from epmoe.routing import route
from epmoe.testing import assert_close, load_experts, random_experts, random_inputs, run_on_ranks

CFG = MoEConfig(num_experts=8, top_k=2, hidden_size=40, intermediate_size=24, dtype=torch.float32)
TOKENS = (5, 0, 3)      # per rank; rank 1 has no tokens
M = 6


class ExpertsFailure(RuntimeError):
    pass


def _pairs(ep):
    return [p for p in contract.supported_pairings(CFG, ep, "cpu") if p[0] != "symm_high_throughput"]


def _fail_once(layer):
    """Make the layer's experts raise in its next forward only."""
    real = layer.experts

    class Failing:
        def __call__(self, *args, **kw):
            layer.experts = real
            raise ExpertsFailure("experts failed on purpose")
    layer.experts = Failing()


def _check_aligned(layer, weights, rank, seed):
    x, logits = random_inputs(CFG, TOKENS[rank % len(TOKENS)] + 1, seed=seed + rank)
    assert_close(layer(x, logits), reference_moe(x, logits, weights, CFG), 1e-5,
                 context=f"rank {rank}: the aligned forward after the failed one")


def _every_case(rank, world):
    weights = random_experts(CFG, seed=4)
    seen = {}
    ep = world
    for dispatcher, experts in _pairs(ep) + [p for p in _pairs(1) if p[0] == "local"]:
        group = None if dispatcher == "local" else dist.group.WORLD
        layer = MoELayer(CFG, ep_group=group, dispatcher=dispatcher, experts=experts, max_tokens_per_rank=M)
        load_experts(layer, weights)
        failing_rank = 0 if dispatcher == "local" else world - 1
        key = f"{dispatcher}+{experts}"

        # 1. an exception inside the experts of one rank
        x, logits = random_inputs(CFG, TOKENS[rank % len(TOKENS)], seed=20 + rank)
        if rank == failing_rank:
            _fail_once(layer)
            with pytest.raises(ExpertsFailure):
                layer(x, logits)
        else:
            out = layer(x, logits)
            ref = reference_moe(x, logits, weights, CFG).float()
            held = layer.placement.ids_on_owner(route(logits, CFG).topk_ids)[0] == failing_rank
            held = held.any(dim=1) & (group is not None)     # `local`: the ranks do not meet
            assert torch.isnan(out[held]).all(), f"{key} rank {rank}: rows the failed rank owed are not NaN"
            assert_close(out[~held], ref[~held], 1e-5, context=f"{key} rank {rank}: the other rows")
        seen[key] = int(held.sum()) if rank != failing_rank else None
        _check_aligned(layer, weights, rank, seed=30)

        # 2. a rank whose input is refused: it raises its error, the peers RankMismatch
        if group is not None:
            bad = x.to(torch.float64) if rank == failing_rank else x
            with pytest.raises((TypeError, RankMismatch)) as info:
                layer(bad, logits)
            assert (info.type is TypeError) == (rank == failing_rank), (key, rank, info.value)
            _check_aligned(layer, weights, rank, seed=40)

        # 3. resync(): a collective every rank may call between forwards (the symmetric-memory dispatchers
        # need it after a timeout); here it meets the peers and brings every rank's forward count to the
        # largest any rank reached (rank 0 skips ahead first: the others adopt its count)
        if group is not None:
            state = layer.dispatcher.state
            state.adopt_forward(state.forwards + (5 if rank == 0 else 0))
            reached = state.forwards
        layer.resync()
        if group is not None:
            counts = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size(group))]
            dist.all_gather(counts, torch.tensor([state.forwards]), group=group)
            assert all(int(c) == int(counts[0]) for c in counts) and state.forwards >= reached, (key, counts)
            assert rank != 0 or state.forwards == reached, key
        _check_aligned(layer, weights, rank, seed=50)
    return seen


@pytest.mark.parametrize("world", [3])
def test_the_next_aligned_forward_is_correct_after_a_failed_one(world):
    seen = run_on_ranks(_every_case, world, backend="gloo", timeout_s=180)
    # the peers did have tokens that the failed rank's experts held (else the NaN check checked nothing)
    for key in seen[0]:
        if not key.startswith("local"):
            assert any(s[key] for s in seen[:-1]), key
