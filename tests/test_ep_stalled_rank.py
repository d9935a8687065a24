"""A rank that stalls in the middle of a step: its peers' forward raises the process group's timeout
error (after the group's `timeout`), on every EP dispatcher, instead of waiting forever; the group is not
usable after that (a new one is needed: README), and its next forward says so at once. 2 Gloo ranks."""
import datetime
import time

import pytest
import torch
import torch.distributed as dist

from epmoe import MoEConfig, MoELayer
from epmoe.testing import load_experts, random_experts, random_inputs, run_on_ranks

TIMEOUT_S = 1.0
DISPATCHERS = ("allgather", "alltoall", "low_latency")


def _stall_on_rank_1(rank, world_size):
    cfg = MoEConfig(num_experts=4, top_k=2, hidden_size=16, intermediate_size=8, dtype=torch.float32)
    x, logits = random_inputs(cfg, 3)
    layers = {}
    for dispatcher in DISPATCHERS:       # one group with a short timeout per layer
        group = dist.new_group(timeout=datetime.timedelta(seconds=TIMEOUT_S))
        layers[dispatcher] = MoELayer(cfg, ep_group=group, dispatcher=dispatcher, max_tokens_per_rank=4)
        load_experts(layers[dispatcher], random_experts(cfg))
    seen = {}
    if rank == 0:                        # rank 1 never enters these forwards: it waits in the barrier below
        for dispatcher, layer in layers.items():
            start = time.monotonic()
            with pytest.raises(RuntimeError, match="[Tt]imed out") as info:
                layer(x, logits)
            seen[dispatcher] = (time.monotonic() - start, str(info.value)[:200])
            # the group is not usable after its timeout (Gloo closed its connection to the peer): the next
            # forward fails at once instead of pairing with the late rank's collectives
            start = time.monotonic()
            with pytest.raises(RuntimeError):
                layer(x, logits)
            assert time.monotonic() - start < TIMEOUT_S, f"{dispatcher}: a forward after the timeout waited"
    dist.barrier()                       # the default group, without the short timeout
    return seen


def test_peers_of_a_stalled_rank_get_the_group_timeout():
    seen = run_on_ranks(_stall_on_rank_1, 2, backend="gloo", timeout_s=60)[0]
    assert set(seen) == set(DISPATCHERS)
    for dispatcher, (waited, message) in seen.items():
        assert TIMEOUT_S * 0.9 <= waited < TIMEOUT_S + 2.0, f"{dispatcher}: raised after {waited:.1f}s: {message}"
