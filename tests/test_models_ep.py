"""Whole tiny models of every family with their experts over 2 Gloo ranks, each rank its own prompts.

Per family and communicating dispatcher: patch_model(ep_group) and load_model(ep_group) give
transformers' logits (float32 bound), loading reads only this rank's experts, each rank holds 1/2 of the
expert memory, and greedy generation gives the same tokens as transformers. Ranks only measure; the
assertions run here, so a failure never leaves the other rank waiting in a collective.
"""
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from epmoe import contract  # noqa: E402
from epmoe.integration.tiny import FAMILY_NAMES, save_tiny_checkpoint, tiny_model  # noqa: E402
from epmoe.testing import compare, run_on_ranks  # noqa: E402
from test_models_checkpoint import CountingSafeOpen, _fp8_deepseek_checkpoint  # noqa: E402

WORLD = 2
EP_DISPATCHERS = [d for d in ("allgather", "alltoall") if d in contract.DISPATCHERS]
SEED = 31
NEW_TOKENS = 4


def _prompts(rank):
    """Different prompts and batch shapes on each rank (uneven token counts per rank)."""
    shape = (2, 6) if rank == 0 else (3, 4)
    return torch.randint(3, 128, shape, generator=torch.Generator().manual_seed(100 + rank))


def _total_expert_bytes(model):
    total = 0
    for layer in model.model.layers:
        experts = getattr(layer.mlp, "experts", None)
        if experts is not None:
            total += sum(p.numel() * p.element_size() for p in experts.parameters())
    return total


def _ep_rank(rank, world, dirs, dispatcher):
    import torch.distributed as dist

    from epmoe.integration import checkpoint as ckpt_mod
    from epmoe.integration import expert_memory_bytes, load_model, moe_blocks, patch_model
    from epmoe.integration.run_model import greedy_generate

    group = dist.group.WORLD
    results = {}
    for family, directory in dirs.items():
        reference = tiny_model(family, seed=SEED)
        ids = _prompts(rank)
        with torch.no_grad():
            want = reference(ids).logits
        r = {"total_expert_bytes": _total_expert_bytes(reference)}

        patched = tiny_model(family, seed=SEED)
        r["patched_blocks"] = patch_model(patched, ep_group=group, dispatcher=dispatcher)
        with torch.no_grad():
            r["patch_rel_err"] = compare(patched(ids).logits, want).rel_err
        r["patch_expert_bytes"] = expert_memory_bytes(patched)

        counter = CountingSafeOpen()
        ckpt_mod.safe_open = counter
        loaded = load_model(directory, ep_group=group, dispatcher=dispatcher, progress=False)
        r["expert_reads"] = counter.expert_reads()
        r["local_experts"] = {path: [int(e) for e in b.experts.placement.local_experts]
                              for path, b in moe_blocks(loaded)}
        r["load_expert_bytes"] = expert_memory_bytes(loaded)
        with torch.no_grad():
            r["load_rel_err"] = compare(loaded(ids).logits, want).rel_err
        r["tokens"] = greedy_generate(loaded, ids, NEW_TOKENS).tolist()
        r["want_tokens"] = greedy_generate(reference, ids, NEW_TOKENS).tolist()
        results[family] = r
    return results


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ep_checkpoints")
    dirs = {}
    for family in FAMILY_NAMES:
        dirs[family] = str(save_tiny_checkpoint(tiny_model(family, seed=SEED), root / family,
                                                max_shard_size="40KB", with_tokenizer=False))
    return dirs


@pytest.mark.skipif(not EP_DISPATCHERS, reason="no communicating dispatcher (allgather / alltoall) is registered")
@pytest.mark.parametrize("dispatcher", EP_DISPATCHERS or ["none"])
def test_families_over_two_gloo_ranks(dispatcher, checkpoints):
    per_rank = run_on_ranks(_ep_rank, WORLD, checkpoints, dispatcher, backend="gloo", timeout_s=150)
    for rank, results in enumerate(per_rank):
        for family, r in results.items():
            where = f"{family}, {dispatcher}, rank {rank}"
            assert r["patched_blocks"] == 2, where
            assert r["patch_rel_err"] <= 1e-5, f"{where}: patched logits rel err {r['patch_rel_err']:.2e}"
            assert r["load_rel_err"] <= 1e-5, f"{where}: loaded logits rel err {r['load_rel_err']:.2e}"
            # each rank holds half of the routed experts' memory
            assert r["patch_expert_bytes"] * WORLD == r["total_expert_bytes"], where
            assert r["load_expert_bytes"] * WORLD == r["total_expert_bytes"], where
            # loading read exactly this rank's experts, each tensor (or fused row) once per expert
            wanted = {(p, e) for p, experts in r["local_experts"].items() for e in experts}
            layers = {p for p, _ in r["expert_reads"]}
            assert len(layers) == 2, where
            assert {(p.replace("block_sparse_moe", "mlp"), e) for p, e in r["expert_reads"]} == wanted, where
            per_expert = len(r["expert_reads"]) / len(wanted)
            assert per_expert in (2, 3, 4), where        # fused gate_up+down (+2 biases) or gate/up/down
            assert all(r["expert_reads"].count(x) == per_expert for x in set(r["expert_reads"])), where
            assert r["tokens"] == r["want_tokens"], f"{where}: generated {r['tokens']} != {r['want_tokens']}"
    # the two ranks hold complementary halves
    for family in FAMILY_NAMES:
        held = [next(iter(results[family]["local_experts"].values())) for results in per_rank]
        assert sorted(held[0] + held[1]) == list(range(8)), family


def _fp8_rank(rank, world, directory, dispatcher):
    import torch.distributed as dist

    from epmoe.integration import checkpoint as ckpt_mod
    from epmoe.integration import expert_memory_bytes, load_model, moe_blocks

    ids = _prompts(rank)
    single = load_model(directory, progress=False)                     # all experts, FP8, no EP
    counter = CountingSafeOpen()
    ckpt_mod.safe_open = counter
    ep = load_model(directory, ep_group=dist.group.WORLD, dispatcher=dispatcher, progress=False)
    with torch.no_grad():
        rel = compare(ep(ids).logits, single(ids).logits).rel_err
    layer = moe_blocks(ep)[0][1].experts
    return {"rel_err": rel, "fp8": layer.w13.dtype == torch.float8_e4m3fn,
            "bytes": (expert_memory_bytes(ep), expert_memory_bytes(single)),
            "experts_read": sorted({e for _, e in counter.expert_reads()}),
            "scales_read": sum(1 for k, _ in counter.reads if k.endswith("weight_scale_inv") and ".experts." in k),
            "local": [int(e) for e in layer.placement.local_experts]}


@pytest.mark.skipif(not EP_DISPATCHERS, reason="no communicating dispatcher (allgather / alltoall) is registered")
@pytest.mark.parametrize("dispatcher", EP_DISPATCHERS or ["none"])
def test_fp8_checkpoint_over_two_gloo_ranks(dispatcher, tmp_path):
    directory, _ = _fp8_deepseek_checkpoint(tmp_path)
    for rank, r in enumerate(run_on_ranks(_fp8_rank, WORLD, str(directory), dispatcher, backend="gloo",
                                          timeout_s=150)):
        assert r["fp8"], "the experts should stay FP8"
        assert r["rel_err"] <= 1e-5, f"rank {rank}: FP8 logits with EP differ from one rank: {r['rel_err']:.2e}"
        assert r["experts_read"] == r["local"], f"rank {rank} read experts {r['experts_read']}"
        assert r["scales_read"] == 2 * 3 * len(r["local"])      # 2 layers x (gate, up, down) per local expert
        assert r["bytes"][0] * WORLD == r["bytes"][1]
