"""`MoELayer`: route -> dispatch -> experts -> combine, built and checked once, run many times."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from . import contract
from . import state_dict as state_dict_names
from .balance.expert_map import ExpertMap
from .config import MoEConfig
from .build import build_dispatcher, group_info, resolve_device
from .dispatch.micro_batches import run_micro_batches
from .handshake import announces_build_failure
from .layouts import ExpertWeights
from .routing import Routing, route, validate_routing


def _refuse_autograd(name: str, t: torch.Tensor) -> None:
    """The forward is not differentiable: the dispatchers' collectives and the fused kernels record no
    autograd graph, so a gradient through the layer would be silently cut. Refuse instead (a host-side
    flag check, no device work), the same on one rank as on several."""
    if t.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"MoELayer: {name} requires grad, but epmoe layers are for inference only (no "
                         "backward pass): run the forward under torch.no_grad() or torch.inference_mode(), "
                         f"or pass {name}.detach()")


class MoELayer(nn.Module):
    """One MoE layer: `layer(hidden_states [T, H], router_logits [T, E]) -> [T, H]`.

    ep_group: a `torch.distributed` process group whose ranks split the experts (None: one rank holds all).
    dispatcher / experts: explicit backend names (see `epmoe info`) or "auto". The pairing is checked here,
    at construction, and refused with `epmoe.UnsupportedCombination` if it cannot compute `cfg` exactly.
    router: optional callable `(hidden_states, router_logits) -> (topk_ids, topk_weights)` replacing the
    config's routing rule; what it returns is validated before it is used.
    expert_placement: optional list of rank numbers, one per physical slot (expert -> rank when
    redundant_experts is 0); contiguous blocks by default.
    redundant_experts: R >= 0 extra physical slots (E + R in all, spread over the ranks, uneven counts
    allowed) holding replicas of hot experts on other ranks; `rebalance` chooses which from measured load.
    expert_bias: experts carry biases (gpt-oss): `load_expert` then also takes gate_bias [I], up_bias [I],
    down_bias [H].
    workspace: the `epmoe.SymmWorkspace` the GPU-initiated dispatchers (`symm_*`) use, shared by the layers
    of one group; None: the group's default one, allocated (or grown) here, collectively. The other
    dispatchers use none.
    micro_batches: 2 splits every forward in two micro-batches whose exchanges interleave with the other's
    experts (`epmoe.dispatch.micro_batches`; the dispatcher must declare two forwards in flight); the output
    is the same. With a capacity, each micro-batch's tokens count against `max_tokens_per_rank`.
    comm_sms: the most SMs the GPU-initiated dispatchers' transfer kernels take, leaving the rest to the
    experts running beside them (None: as many as the rows need); refused for dispatchers whose transfers
    it cannot bound, and without effect (`layer.comm_sms` None) on `local`, which has none.

    Inference only: with grad enabled, inputs that require grad are refused. NaN/Inf in a token's inputs
    are not checked (no host sync) and reach that token's output row only.
    """

    @announces_build_failure   # a rank that fails here still answers the handshake: its peers raise too
    def __init__(self, cfg: MoEConfig, ep_group=None, dispatcher: str = "auto", experts: str = "auto",
                 device=None, max_tokens_per_rank: int | None = None,
                 router: Callable | None = None, expert_placement=None, expert_bias: bool = False,
                 redundant_experts: int = 0, workspace=None, micro_batches: int = 1,
                 comm_sms: int | None = None):
        super().__init__()
        if not isinstance(cfg, MoEConfig):
            raise TypeError(f"MoELayer: cfg must be an epmoe.MoEConfig, got {type(cfg).__name__}")
        if router is not None and not callable(router):
            raise TypeError(f"MoELayer: router must be callable, got {type(router).__name__}")
        self.cfg = cfg
        self.ep_group = ep_group
        self.ep_size, self.ep_rank = group_info(ep_group)
        self.device = resolve_device(device, ep_group)
        # logical experts (the router's ids) in physical slots; the dispatcher and experts see slots only
        self.expert_map = ExpertMap.build(cfg.num_experts, redundant_experts, self.ep_size, self.ep_rank,
                                          expert_placement)
        self.placement = self.expert_map.placement
        self.dispatcher_name, self.experts_name = contract.resolve_names(
            dispatcher, experts, cfg, self.ep_size, self.device.type)
        # the pairing checked and resolved once: the dispatcher and the experts are built from this plan
        self.plan = contract.build_plan(self.dispatcher_name, self.experts_name, cfg, self.ep_size,
                                        self.device.type, max_tokens_per_rank, micro_batches=micro_batches,
                                        comm_sms=comm_sms)
        self.max_tokens_per_rank = max_tokens_per_rank
        self.micro_batches = micro_batches
        self.comm_sms = self.plan.comm_sms        # what applies (None where the dispatcher has nothing to bound)
        self.router = router
        self.expert_bias = bool(expert_bias)

        self.scheme = self.plan.scheme
        L, H, I = self.placement.num_local_experts, self.plan.padded_hidden_size, self.plan.padded_intermediate_size
        self._create_weights(L, H, I)
        if cfg.scoring == "sigmoid":
            self.register_buffer("score_correction_bias",
                                 torch.zeros(cfg.num_experts, dtype=torch.float32, device=self.device))
        else:
            self.score_correction_bias = None
        self._loaded: set[int] = set()
        # (token, expert) pairs routed to each logical expert by this rank's forwards (`expert_load`)
        self.register_buffer("expert_load_counts", torch.zeros(cfg.num_experts, dtype=torch.int64,
                                                               device=self.device), persistent=False)
        self.expert_map.tables(self.device)    # built now, outside any CUDA graph capture
        self._rebalancing = None
        # the state dict speaks transformers' names, one tensor per expert (see epmoe.state_dict)
        self.register_state_dict_post_hook(state_dict_names.save_hook)
        self.register_load_state_dict_pre_hook(state_dict_names.load_hook)

        self.dispatcher = build_dispatcher(self.plan, self.placement, ep_group, self.device, workspace)
        self.experts = contract.experts_class(self.experts_name)(self.plan, self.device)
        self.activation_handoff = self.plan.handoff    # who quantizes the activations (FP8)
        if ep_group is not None:
            from .handshake import check_group_agrees
            check_group_agrees(self)   # also gives the dispatcher the layer's index on the group
        self.dispatcher.prepare()      # the ranks agree: a workspace may be allocated now, collectively

    # ----------------------------------------------------------------------------------------- weights
    def _create_weights(self, L: int, H: int, I: int) -> None:
        """Weights in the scheme's format (padded sizes H, I); biases stay float32 beside them."""
        dev = self.device
        self.scheme.create_weights(self, L, H, I)
        if self.expert_bias:
            self.b13 = nn.Parameter(torch.zeros(L, 2 * I, dtype=torch.float32, device=dev), requires_grad=False)
            self.b2 = nn.Parameter(torch.zeros(L, H, dtype=torch.float32, device=dev), requires_grad=False)

    def _apply(self, fn, recurse=True):
        """`.to()`, `.cuda()`, `.half()` ...: a device move is allowed (the pairing is checked again for the
        new device); a dtype change is refused before anything is converted: the dtype is part of the
        config, FP8 weights and the float32 correction bias must keep theirs."""
        probes = {(t.dtype, t.device) for t in list(self.parameters(recurse=False)) + list(self.buffers(recurse=False))}
        new_device = None
        for dtype, device in probes:
            moved = fn(torch.empty(0, dtype=dtype, device=device))
            if moved.dtype != dtype:
                raise TypeError(f"MoELayer: its dtype is fixed by its MoEConfig ({self.cfg.dtype}; weights stored as "
                                f"{dtype}): build a new layer with MoEConfig(dtype=...) instead of converting it to "
                                f"{moved.dtype}")
            new_device = moved.device
        plan = None
        if new_device is not None and new_device != self.device:   # the pairing checked for the new device
            plan = contract.build_plan(self.dispatcher_name, self.experts_name, self.cfg, self.ep_size,
                                       new_device.type, self.max_tokens_per_rank, micro_batches=self.micro_batches,
                                       comm_sms=self.comm_sms)
            # the move refused, or the experts' device-bound set-up redone, before any tensor moves
            self.dispatcher.check_move_to(new_device)
            self.experts.move_to(new_device, plan)
        result = super()._apply(fn, recurse)
        if new_device is not None and new_device != self.device:
            self.expert_map.tables(new_device)
            self.device = new_device
            self.plan = self.dispatcher.plan = plan
            self.dispatcher.device = new_device
        return result

    @property
    def expert_weights(self) -> ExpertWeights:
        return ExpertWeights(self.w13, self.w2, getattr(self, "b13", None), getattr(self, "b2", None),
                             getattr(self, "w13_scale", None), getattr(self, "w2_scale", None))

    @property
    def num_local_experts(self) -> int:
        """This rank's physical slots (one replica of a logical expert each)."""
        return self.placement.num_local_experts

    @property
    def local_experts(self) -> tuple[int, ...]:
        """The logical expert of each of this rank's slots, in the order of its weight tensors."""
        return self.expert_map.local_experts

    @property
    def redundant_experts(self) -> int:
        return self.expert_map.redundant_experts

    def mark_all_experts_loaded(self) -> None:
        """Declare that the weights were written directly (not through `load_expert`)."""
        self._loaded = set(range(self.num_local_experts))

    def load_expert(self, e: int, gate_proj: torch.Tensor, up_proj: torch.Tensor, down_proj: torch.Tensor,
                    gate_bias: torch.Tensor | None = None, up_bias: torch.Tensor | None = None,
                    down_bias: torch.Tensor | None = None, **extra) -> bool:
        """Load global expert `e` from HF-shaped tensors (gate/up [I, H], down [H, I]).

        Returns False (and keeps nothing) if another rank holds `e`. Shapes are checked; values are cast
        to the layer's dtype and copied into the padded fused layout.
        """
        if isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < self.cfg.num_experts:
            raise ValueError(f"load_expert: expert id must be an int in [0, {self.cfg.num_experts}), got {e!r}")
        if self._rebalancing is not None:
            raise RuntimeError(f"load_expert({e}): a rebalance of this layer is in progress; finish() it first")
        local = self.expert_map.local_slot(e)
        H, I = self.cfg.hidden_size, self.cfg.intermediate_size
        for name, t, shape in (("gate_proj", gate_proj, (I, H)), ("up_proj", up_proj, (I, H)),
                               ("down_proj", down_proj, (H, I))):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"load_expert({e}): {name} must be a tensor, got {type(t).__name__}")
            if tuple(t.shape) != shape:
                raise ValueError(f"load_expert({e}): {name} must have shape {list(shape)} ([out, in] as in "
                                 f"nn.Linear), got {list(t.shape)}")
            if not t.dtype.is_floating_point:
                raise TypeError(f"load_expert({e}): {name} must be a floating-point tensor, got {t.dtype} "
                                "(quantized integer weights are not a format epmoe loads)")
        biases = (gate_bias, up_bias, down_bias)
        if self.expert_bias:
            for name, t, n in (("gate_bias", gate_bias, I), ("up_bias", up_bias, I), ("down_bias", down_bias, H)):
                if not isinstance(t, torch.Tensor) or tuple(t.shape) != (n,):
                    raise ValueError(f"load_expert({e}): this layer has expert_bias=True and needs {name} of "
                                     f"shape [{n}], got {None if t is None else list(t.shape)}")
        elif any(b is not None for b in biases):
            raise ValueError(f"load_expert({e}): biases given but the layer was built with expert_bias=False")
        if local is None:
            return False
        self.scheme.load_expert(self, local, gate_proj, up_proj, down_proj, **extra)
        if self.expert_bias:
            Ip = self.w2.shape[2]
            with torch.no_grad():
                self.b13[local].zero_()
                self.b13[local, :I].copy_(gate_bias)
                self.b13[local, Ip:Ip + I].copy_(up_bias)
                self.b2[local].zero_()
                self.b2[local, :H].copy_(down_bias)
        self._loaded.add(local)
        return True

    def _check_loaded(self) -> None:
        if len(self._loaded) != self.num_local_experts:
            missing = [self.local_experts[i] for i in range(self.num_local_experts) if i not in self._loaded]
            shown = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
            raise RuntimeError(f"MoELayer: {len(missing)} local experts were never loaded (global ids {shown}); "
                               "call load_expert for each, or load_state_dict")

    # ----------------------------------------------------------------------------------------- forward
    def _check_inputs(self, hidden_states, router_logits) -> None:
        cfg = self.cfg
        if not isinstance(hidden_states, torch.Tensor):
            raise TypeError(f"MoELayer: hidden_states must be a tensor, got {type(hidden_states).__name__}")
        if hidden_states.dim() != 2 or hidden_states.shape[1] != cfg.hidden_size:
            raise ValueError(f"MoELayer: hidden_states must be [T, {cfg.hidden_size}] (flatten batch and sequence "
                             f"first), got {list(hidden_states.shape)}")
        if hidden_states.dtype != cfg.dtype:
            raise TypeError(f"MoELayer: hidden_states dtype {hidden_states.dtype} does not match the layer's "
                            f"dtype {cfg.dtype}")
        if hidden_states.device != self.device:
            raise ValueError(f"MoELayer: hidden_states is on {hidden_states.device}, the layer on {self.device}")
        _refuse_autograd("hidden_states", hidden_states)
        if router_logits is None:
            if self.router is None:
                raise ValueError("MoELayer: router_logits is required unless the layer has a custom router")
            return
        if not isinstance(router_logits, torch.Tensor):
            raise TypeError(f"MoELayer: router_logits must be a tensor, got {type(router_logits).__name__}")
        T = hidden_states.shape[0]
        if router_logits.dim() != 2 or tuple(router_logits.shape) != (T, cfg.num_experts):
            raise ValueError(f"MoELayer: router_logits must be [T, E] = [{T}, {cfg.num_experts}], "
                             f"got {list(router_logits.shape)}")
        if not router_logits.dtype.is_floating_point:
            raise TypeError(f"MoELayer: router_logits must be floating point, got {router_logits.dtype}")
        if router_logits.device != self.device:
            raise ValueError(f"MoELayer: router_logits is on {router_logits.device}, the layer on {self.device}")
        _refuse_autograd("router_logits", router_logits)

    def compute_routing(self, hidden_states: torch.Tensor, router_logits: torch.Tensor | None) -> Routing:
        if self.router is not None:
            ids, weights = self.router(hidden_states, router_logits)
            for name, t in (("topk_ids", ids), ("topk_weights", weights)):
                if isinstance(t, torch.Tensor) and t.device != hidden_states.device:
                    raise ValueError(f"MoELayer: the custom router returned {name} on {t.device}, the tokens are "
                                     f"on {hidden_states.device}")
            if isinstance(weights, torch.Tensor):
                _refuse_autograd("the custom router's topk_weights", weights)
            return validate_routing(ids, weights, self.cfg.num_experts, hidden_states.shape[0], self.cfg.top_k,
                                    finite_weights=False)
        return route(router_logits, self.cfg, self.score_correction_bias)

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor | None = None,
                shared_experts: Callable | None = None) -> torch.Tensor:
        """`[T, H]`, `[T, E]` -> `[T, H]`. `shared_experts`: optional callable `[T, H] -> [T, H]` (the
        model's shared experts) computed while this layer's dispatch is in flight and added to the
        output."""
        try:
            self._check_inputs(hidden_states, router_logits)
            self._check_loaded()
            routing = self.compute_routing(hidden_states, router_logits)
        except Exception:
            # the peers are entering this forward's exchanges: take part, flagged, so that every rank
            # raises (RankMismatch there, this error here) instead of waiting for this one (in each
            # micro-batch's dispatch: the peers issue both)
            for _ in range(self.micro_batches):
                self.dispatcher.abort()
            raise
        if shared_experts is None:
            return self.forward_routed(hidden_states, routing)
        return self.forward_routed(hidden_states, routing, shared_experts=shared_experts)

    def forward_routed(self, hidden_states: torch.Tensor, routing: Routing,
                       shared_experts: Callable | None = None) -> torch.Tensor:
        """Run dispatch -> experts -> combine on an already computed (and valid) routing; the shared
        experts, if given, run while the dispatch is in flight."""
        self.expert_load_counts.scatter_add_(0, routing.topk_ids.reshape(-1).long(),
                                             torch.ones_like(routing.topk_ids, dtype=torch.int64).reshape(-1))
        # logical ids -> physical slots (replicas split the tokens); a CUDA graph always records the map, so
        # that it stays right after a rebalance changes it in place
        capturing = hidden_states.is_cuda and torch.cuda.is_current_stream_capturing()
        if capturing or not self.expert_map.is_identity:
            routing = Routing(self.expert_map.to_physical(routing.topk_ids), routing.topk_weights)
        # one schedule for one batch or several: a rank whose experts raise still takes part in the combine
        # (NaN in the rows it owed) so no peer waits for it, then raises (`run_micro_batches`)
        return run_micro_batches(self.dispatcher, lambda batch: self.experts(batch, self.expert_weights),
                                 hidden_states, routing, self.micro_batches, shared_experts)

    def resync(self) -> None:
        """Put the group's per-forward state back in step on every rank: a collective on the layer's group
        (every rank calls it, on any one layer of the group, between forwards). Needed after a rank raised
        a timeout on a symmetric-memory dispatcher (a peer skipped that forward or came late): the ranks'
        workspace slots and epochs then differ, and the rank that timed out (and a peer that read its failed
        header) refuses forwards until then.
        Resets every symmetric workspace on the group (all the group's layers share them) and continues
        the group's forward count from the largest any rank reached, on every rank. Raises the process group's error where a rank is dead: then a new group is
        needed. Nothing to do on one rank."""
        self.dispatcher.resync()

    # ------------------------------------------------------------------------------ load balance
    def expert_load(self) -> torch.Tensor:
        """(token, expert) pairs this rank's forwards routed to each logical expert since the layer was
        built or `reset_expert_load()` was called: [E] int64 on the layer's device. Counted on the device
        in every forward (no host sync; CUDA graphs count on replay); reading it is a copy, not a sync."""
        return self.expert_load_counts.clone()

    def reset_expert_load(self) -> None:
        """Start counting `expert_load` from zero (in place: CUDA graphs keep counting into it)."""
        self.expert_load_counts.zero_()

    def enable_stats(self):
        """Turn on the dispatcher's statistics and return them (`DispatchStats`): rows and bytes sent to each
        destination rank and bytes back, and `received_per_expert`, the (token, slot) pairs each of this
        rank's physical slots received. Off by default: some dispatchers read counts back to the host.
        Only for a dispatcher that declares it keeps them (`CAPS.keeps_stats`)."""
        if not self.dispatcher.CAPS.keeps_stats:
            keeping = [n for n, cls in contract.DISPATCHERS.items() if cls.CAPS.keeps_stats]
            raise ValueError(f"enable_stats: dispatcher {self.dispatcher_name!r} keeps no statistics (it declares "
                             f"keeps_stats=False; these do: {', '.join(keeping)}); expert_load() counts the pairs "
                             "per logical expert on every dispatcher")
        return self.dispatcher.enable_stats()

    def rebalance(self, load=None, *, physical_to_logical=None, num_groups: int = 1, chunk_bytes: int | None = None):
        """Re-place the experts for `load` and move their weights: a collective on the layer's group (every
        rank calls it, with its own load), between forwards.

        load: [E] pairs per logical expert from this rank (default: `expert_load()`); the ranks add theirs up
            and every rank computes the same placement with `epmoe.balance_experts` (hottest experts get the
            replicas, slots packed so that the most loaded rank is as light as possible).
        physical_to_logical: a placement to switch to instead (one logical id per physical slot).
        num_groups: balance hierarchically over this many equal groups of consecutive ranks (nodes).
        chunk_bytes: the most bytes a rank sends, and receives, per step of the move (default 64 MiB).
        Weights move with their FP8 scales, biases and padding. Returns a `RebalanceResult` (bytes moved,
        time, the new map, max/mean rank load of `load` before and after). The load counter is not reset.
        """
        return self.start_rebalance(load, physical_to_logical=physical_to_logical, num_groups=num_groups,
                                    chunk_bytes=chunk_bytes).finish()

    def start_rebalance(self, load=None, *, physical_to_logical=None, num_groups: int = 1,
                        chunk_bytes: int | None = None):
        """`rebalance` in steps: agrees on the placement and returns the move (`Rebalance`); each
        `step()` moves one chunk (collective), `finish()` the rest and switches. Forwards in between
        compute with the old placement."""
        from .balance.rebalance import DEFAULT_CHUNK_BYTES, start_rebalance
        return start_rebalance(self, load, physical_to_logical=physical_to_logical, num_groups=num_groups,
                               chunk_bytes=DEFAULT_CHUNK_BYTES if chunk_bytes is None else chunk_bytes)

    def extra_repr(self) -> str:
        return (f"{self.cfg.describe()}, dispatcher={self.dispatcher_name}, experts={self.experts_name}, "
                f"ep={self.ep_rank}/{self.ep_size}, local_experts={self.num_local_experts}, "
                f"redundant_experts={self.redundant_experts}, device={self.device}")
