"""Building a layer's parts for a process group: the group's size and rank, the device, and the
dispatcher of a plan, with or without `MoELayer`.

`make_dispatcher` is what an engine that runs its own experts calls: it checks the dispatcher against
the config and the group (the contract), resolves the plan, builds the dispatcher and has the group's
ranks agree on it (the build handshake), then the engine drives `dispatch` / `combine` (or their async
forms) itself. `MoELayer` builds its dispatcher the same way. Here the user's config is read; the parts
built from here see only the plan.
"""
from __future__ import annotations

import torch

from . import contract
from .dispatch.base import Dispatcher
from .handshake import agree_on_dispatcher, announces_build_failure
from .placement import Placement


def group_info(group) -> tuple[int, int]:
    """(size, this rank) of an EP group; (1, 0) without one."""
    if group is None:
        return 1, 0
    import torch.distributed as dist
    if not dist.is_initialized():
        raise ValueError("ep_group was given but torch.distributed is not initialized "
                         "(call torch.distributed.init_process_group first)")
    return dist.get_world_size(group), dist.get_rank(group)


def default_device(group) -> torch.device:
    """The current CUDA device for an NCCL group, else the CPU."""
    if group is not None:
        import torch.distributed as dist
        if dist.get_backend(group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def resolve_device(device, group) -> torch.device:
    device = torch.device(device) if device is not None else default_device(group)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


@announces_build_failure   # a rank that fails here still answers the handshake: its peers raise too
def make_dispatcher(name: str, cfg, group=None, device=None, max_tokens_per_rank: int | None = None,
                    expert_placement=None, workspace=None, comm_sms: int | None = None) -> Dispatcher:
    """Build the dispatcher `name` ("auto": local for one rank, alltoall for several) for `cfg` on
    `group`, without a `MoELayer`. Every rank of `group` must call it, in the same order as its other
    EP layers and dispatchers.

    Args:
        name: a registered dispatcher name (see `epmoe info`) or "auto".
        cfg: the `MoEConfig` of the layer whose tokens it moves.
        group: the EP process group (None: one rank, every expert local).
        device: where tokens live (default: the current GPU for NCCL, else the CPU).
        max_tokens_per_rank: the most tokens a rank passes in one forward (fixed-capacity dispatchers).
        expert_placement: optional list of E rank numbers (expert -> rank); contiguous blocks by default.
        workspace: the `epmoe.SymmWorkspace` a GPU-initiated dispatcher uses (None: the group's default,
            allocated or grown here, collectively); the other dispatchers use none.
        comm_sms: the most SMs its transfer kernels take (dispatchers that declare `bounded_sms`; None:
            as many as the rows need).
    Returns:
        The `Dispatcher`: `dispatch(hidden [T, H], topk_ids [T, k] int32, topk_weights [T, k] float32) ->
        (batch, handle)`, `combine(expert_out, handle) -> [T, H]`, and `dispatch_async` / `combine_async`.
        `dispatcher.placement` says which experts are local; `dispatcher.plan` what the batch holds.
    Raises:
        UnsupportedCombination for a dispatcher that cannot run here; ValueError for bad arguments;
        RankMismatch on every rank when the ranks build different dispatchers.
    """
    ep_size, rank = group_info(group)
    device = resolve_device(device, group)
    name, _ = contract.resolve_names(name, None, cfg, ep_size, device.type)
    plan = contract.build_plan(name, None, cfg, ep_size, device.type, max_tokens_per_rank, comm_sms=comm_sms)
    placement = Placement(cfg.num_experts, ep_size, rank, expert_placement)
    dispatcher = build_dispatcher(plan, placement, group, device, workspace)
    if group is not None:
        agree_on_dispatcher(group, dispatcher)
    dispatcher.prepare()
    return dispatcher


def build_dispatcher(plan, placement: Placement, group, device: torch.device, workspace=None) -> Dispatcher:
    """The dispatcher of a resolved plan (no handshake, no `prepare()`: the caller makes both). `workspace`
    goes to the dispatchers that store into the peers' memory; the others need none."""
    cls = contract.dispatcher_class(plan.dispatcher)
    if workspace is not None and cls.CAPS.peer_memory:
        return cls(plan, placement, group, device, workspace=workspace)
    return cls(plan, placement, group, device)
