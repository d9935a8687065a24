"""The symmetric workspace as an object the caller sees, sizes and frees: its size hint over a set of
layers, its slots, a layer refused on a workspace too small for it (naming the size it needs), and the
group's default one (the GPU-initiated dispatchers' kernels run in test_symm_simulated.py)."""
import pytest
import torch

from epmoe import Fp8Config, MoEConfig, Placement, SymmWorkspace
from epmoe.contract import build_plan
from epmoe.dispatch.symm_high_throughput import SymmHighThroughputDispatcher
from epmoe.dispatch.symm_low_latency import SymmLowLatencyDispatcher
from epmoe.dispatch.symm_workspace import default_workspace
from epmoe.group import GroupState

HT, LL = "symm_high_throughput", "symm_low_latency"
CFG = MoEConfig(num_experts=8, top_k=2, hidden_size=200, intermediate_size=64, dtype=torch.bfloat16)


def test_size_hint_covers_every_layer_and_dispatcher_given():
    one = SymmWorkspace.size_hint(CFG, 2, 16, dispatchers=(LL,))
    both = SymmWorkspace.size_hint(CFG, 2, 16)
    assert 0 < one <= both and both == max(one, SymmWorkspace.size_hint(CFG, 2, 16, dispatchers=(HT,)))
    assert SymmWorkspace.size_hint(CFG, 2, 32) > both                        # more tokens, more rows
    wide = MoEConfig(num_experts=8, top_k=2, hidden_size=400, intermediate_size=64, dtype=torch.bfloat16)
    assert SymmWorkspace.size_hint([CFG, wide], 2, 16) == SymmWorkspace.size_hint(wide, 2, 16) > both
    fp8 = MoEConfig(num_experts=8, top_k=2, hidden_size=256, intermediate_size=128, dtype=torch.bfloat16,
                    quant=Fp8Config(dispatch_fp8=True))
    bf16 = MoEConfig(num_experts=8, top_k=2, hidden_size=256, intermediate_size=128, dtype=torch.bfloat16)
    assert SymmWorkspace.size_hint(fp8, 2, 16, dispatchers=(LL,)) < SymmWorkspace.size_hint(bf16, 2, 16, dispatchers=(LL,))
    # redundant experts: the low-latency receive rows are per physical slot of a rank (8 + 4 slots: 6 a rank)
    assert SymmWorkspace.size_hint(CFG, 2, 16, dispatchers=(LL,), redundant_experts=4) == SymmWorkspace.size_hint(
        MoEConfig(num_experts=12, top_k=2, hidden_size=200, intermediate_size=64, dtype=torch.bfloat16), 2, 16,
        dispatchers=(LL,)) > one


def test_a_one_rank_workspace_is_plain_memory_with_two_slots_and_frees():
    ws = SymmWorkspace(None, 1000, device="cpu")
    assert ws.slot_bytes == 1 << 20 and ws.local.numel() == 2 * (1 << 20) and ws.number == 1
    assert [ws.next_slot() for _ in range(3)] == [0, 1, 0]
    flags = ws.control_view(1, "flags.count")
    assert flags.shape == (1,) and flags.dtype == torch.int32 and not flags.any()
    with pytest.raises(ValueError, match="needs 2097152"):
        ws.require(2 << 20, "a layer")
    ws.free()
    assert "freed" in repr(ws)
    with pytest.raises(RuntimeError, match="after free"):
        ws.control_view(0, "flags.count")
    with pytest.raises(ValueError, match="slot_bytes must be a positive int"):
        SymmWorkspace(None, 0, device="cpu")


def test_a_layer_on_a_workspace_too_small_for_it_is_refused_naming_the_size():
    placement = Placement(CFG.num_experts, 2, 0)
    for cls in (SymmLowLatencyDispatcher, SymmHighThroughputDispatcher):
        plan = build_plan(cls.name, None, CFG, 2, "cuda", 64, check_device=False)
        need = cls.slot_layout_for(plan, placement).nbytes
        states = [GroupState(), GroupState()]
        small = SymmWorkspace.simulated(2, need - 4096, states=states)
        with pytest.raises(ValueError, match=f"this layer needs {need}") as info:
            cls(plan, placement, state=states[0], workspace=small[0])
        assert "size_hint" in str(info.value)
        fits = SymmWorkspace.simulated(2, SymmWorkspace.size_hint(CFG, 2, 64, dispatchers=(cls.name,)))
        d = cls(plan, placement, state=GroupState(), workspace=fits[0])
        assert d.workspace is fits[0] and d.layout.nbytes <= fits[0].slot_bytes


def test_the_group_default_workspace_is_made_once_and_grows_at_construction_only():
    """What a layer built without a workspace takes in `prepare()` (one rank here: plain memory)."""
    state = GroupState()
    ws = default_workspace(state, None, 1000, "cpu")
    assert state.default_workspace is ws and ws.slot_bytes == 1 << 20
    assert default_workspace(state, None, 5000, "cpu") is ws and ws.slot_bytes == 1 << 20   # it fits: as it is
    held = ws.local
    assert default_workspace(state, None, 3 << 20, "cpu") is ws and ws.slot_bytes == 3 << 20
    assert ws.local is not held and ws._retired[0][0] is held      # the memory held before stays until free()
    ws.free()
    assert default_workspace(state, None, 1000, "cpu") is not ws    # a freed default is made again


def test_memory_held_before_a_grow_keeps_its_peer_distances_and_is_reset_too():
    """A CUDA graph captured before the workspace grew still stores through the memory held before and reads
    the peer distances of that time: both stay alive until `free()`, and `reset()` (inside `resync()`)
    zeroes that memory's control blocks as well, or a replay after `resync()` would find the flags of the
    epochs before it there and pass a wait its peers had not reached."""
    import gc
    import weakref
    ws = SymmWorkspace(None, 1000, device="cpu")
    old_deltas = weakref.ref(ws.deltas)
    for slot in range(SymmWorkspace.SLOTS):
        ws.control_view(slot, "flags.count").fill_(7)
        ws.control_view(slot, "heads.combine").fill_(3)
    held, old_slot = ws.local, ws.slot_bytes
    held[ws.control.nbytes:ws.control.nbytes + 16].fill_(5)        # a data region: a forward writes what it reads
    ws.grow(3 << 20)
    gc.collect()
    assert old_deltas() is not None, "the distances a graph captured before the grow reads were freed"
    ws.reset()
    for slot in range(SymmWorkspace.SLOTS):
        assert not held[slot * old_slot:slot * old_slot + ws.control.nbytes].any(), slot
    assert (held[ws.control.nbytes:ws.control.nbytes + 16] == 5).all()
    ws.free()
    gc.collect()
    assert old_deltas() is None
