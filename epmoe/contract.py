"""The contract check: what each dispatcher and experts backend can do, and which pairings work.

Backends only *declare* (a `CAPS` attribute on their class); the rules that pair them live here, in one
place, and run when a layer is built. A refused pairing raises `UnsupportedCombination` naming both
parts, the reason, and the pairings that would work. `epmoe info` prints `support_matrix()`, and the
tests enumerate the same matrix.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from . import registry
from .errors import UnsupportedCombination
from .layouts import FLAT
from .plan import Handoff, MoEPlan
from .sizes import scale_groups

# The backends, by name: filled by `@register_dispatcher` / `@register_experts` in each backend's file
# (the built-in ones are imported with `epmoe`). The names are the public, explicit selectors (no hidden
# environment switches choose a backend).
DISPATCHERS = registry.DISPATCHERS
EXPERTS = registry.EXPERTS

# Who quantizes the activations when a layer is FP8: the experts either take FP8 rows with their scales
# (from the dispatcher, or quantized right after dispatch), or take high-precision rows and quantize inside.
TAKES_FP8 = "takes_fp8"
QUANTIZES_INTERNALLY = "quantizes_internally"

# What a built FP8 layer does with its activations (the plan's `handoff`); `epmoe info` shows it.
HANDOFF_NONE = Handoff.NONE
HANDOFF_ON_THE_WIRE = Handoff.ON_THE_WIRE
HANDOFF_AFTER_DISPATCH = Handoff.AFTER_DISPATCH
HANDOFF_IN_EXPERTS = Handoff.IN_EXPERTS


def _always(_device_type: str) -> str | None:
    return None


def _no_quant_problem(_scheme, _device_type: str) -> str | None:
    return None


@dataclass(frozen=True)
class DispatcherCaps:
    layout: str                         # FLAT or BATCHED: what dispatch() produces
    communicates: bool                  # moves tokens between ranks (False: only valid for one rank)
    devices: frozenset = frozenset({"cpu", "cuda"})
    host_sync: bool = False             # does the forward wait on the host for data-dependent sizes
    cuda_graph_safe: bool = False
    needs_max_tokens: bool = False      # requires max_tokens_per_rank
    takes_max_tokens: bool = False      # uses max_tokens_per_rank when given (fixed buffers, no host read)
    peer_memory: bool = False           # stores into the peers' GPU memory (one host: NVLink / PCIe peer access)
    fp8_dispatch: bool = False          # can quantize to FP8 before the wire (scales travel along)
    # forwards one rank may have dispatched and not yet combined at once (a symmetric workspace's slots; a
    # dispatcher that keeps each forward's state in its handle allows more): `micro_batches` needs as many
    in_flight: int = 1
    # its transfer kernels run on at most `comm_sms` SMs when the plan bounds them (else the setting is refused)
    bounded_sms: bool = False
    # counts what it moves when asked: `enable_stats()` returns its live `DispatchStats` (off by default)
    keeps_stats: bool = False
    # "auto" picks, among the dispatchers that can run, the one with the highest (0: never picked); for one
    # rank one that does not communicate, for several one that does
    auto_priority: int = 0
    summary: str = ""
    available: Callable[[str], str | None] = _always

    @property
    def topk_weight_applied_in(self) -> str:
        return "experts" if self.layout == FLAT else "combine"


@dataclass(frozen=True)
class ExpertsCaps:
    layouts: frozenset
    dtypes: frozenset = frozenset({torch.float32, torch.bfloat16, torch.float16})
    quant: frozenset = frozenset({"none"})
    fp8_activations: str = QUANTIZES_INTERNALLY   # for FP8 layers: TAKES_FP8 or QUANTIZES_INTERNALLY
    devices: frozenset = frozenset({"cpu", "cuda"})
    cuda_graph_safe: bool = False
    # flat batches may be strided views (rows further apart than their width: fields of a receive
    # buffer); False: the backend indexes rows as a dense array and gets dense copies
    reads_strided_rows: bool = False
    # "auto" picks, among the backends that accept the dispatcher's layout here, the one with the highest
    # (0: never picked)
    auto_priority: int = 0
    summary: str = ""
    available: Callable[[str], str | None] = _always
    # for a quantized layer whose kind is in `quant`: why these experts cannot run its scheme (the
    # `epmoe.quant` scheme object: config and dtype) on this device (None: they can)
    quant_problem: Callable[..., str | None] = _no_quant_problem


# Public names of backends epmoe does not provide: asking for one is a refusal through the contract
# (UnsupportedCombination with what to use instead), not an "unknown name".
DISPATCHERS_NOT_PROVIDED: dict[str, str] = {
    "nvshmem": "NVSHMEM's all_to_all_vdev transport is not provided; the GPU-initiated dispatchers on torch "
               "symmetric memory are",
}


def _load(table: dict[str, type], name: str, kind: str):
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; known: {sorted(table)}")
    return table[name]


def dispatcher_class(name: str):
    if name in DISPATCHERS_NOT_PROVIDED:
        peer = [d for d, cls in DISPATCHERS.items() if cls.CAPS.peer_memory]
        raise UnsupportedCombination(name, "-", f"{DISPATCHERS_NOT_PROVIDED[name]} {peer}",
                                     [f"dispatcher={d!r}" for d in peer or DISPATCHERS])
    return _load(DISPATCHERS, name, "dispatcher")


def needs_capacity(dispatcher: str) -> bool:
    """Whether the named dispatcher has fixed capacity and needs max_tokens_per_rank ("auto" never picks
    one that does)."""
    return dispatcher in DISPATCHERS and DISPATCHERS[dispatcher].CAPS.needs_max_tokens


def experts_class(name: str):
    return _load(EXPERTS, name, "experts backend")


def quant_name(cfg) -> str:
    return "none" if cfg.quant is None else cfg.quant_scheme.kind


def dispatcher_problem(dispatcher: str, cfg, ep_size: int, device_type: str, check_device: bool = True) -> str | None:
    """Why this dispatcher cannot run on `ep_size` ranks of `device_type`; None if it can
    (`check_device=False`: the device and availability are not checked, see `build_plan`)."""
    d = dispatcher_class(dispatcher).CAPS
    if ep_size > 1 and not d.communicates:
        return (f"the group has {ep_size} ranks but dispatcher {dispatcher!r} does not move tokens between "
                f"ranks: each rank would compute only its own experts and silently lose the others' "
                f"contributions")
    if not check_device:
        return None
    if device_type not in d.devices:
        return f"dispatcher {dispatcher!r} runs on {sorted(d.devices)}, not {device_type}"
    why = d.available(device_type)
    if why:
        return f"{dispatcher!r} is unavailable here: {why}"
    return None


def experts_problem(experts: str, cfg, device_type: str, layout: str | None = None,
                    dispatcher: str | None = None, check_device: bool = True) -> str | None:
    """Why these experts cannot run `cfg` on `device_type` (fed the `layout` that `dispatcher`
    produces, when given); None if they can (`check_device=False`: the device, availability and what the
    quantization needs of the device are not checked, see `build_plan`)."""
    x = experts_class(experts).CAPS
    if check_device and device_type not in x.devices:
        return f"experts {experts!r} run on {sorted(x.devices)}, not {device_type}"
    why = x.available(device_type) if check_device else None
    if why:
        return f"{experts!r} is unavailable here: {why}"
    if layout is not None and layout not in x.layouts:
        return (f"dispatcher {dispatcher!r} produces the {layout!r} layout, experts {experts!r} accept "
                f"{sorted(x.layouts)}")
    if cfg is not None:
        if cfg.dtype not in x.dtypes:
            return f"experts {experts!r} do not support dtype {cfg.dtype}"
        q = quant_name(cfg)
        if q not in x.quant:
            return f"experts {experts!r} support quantization {sorted(x.quant)}, not {q!r}"
        if q != "none":
            why = x.quant_problem(cfg.quant_scheme, device_type) if check_device else None
            if why:
                return f"experts {experts!r} cannot run {q} on {device_type}: {why}"
            if x.fp8_activations not in (TAKES_FP8, QUANTIZES_INTERNALLY):
                return (f"experts {experts!r} declare fp8_activations={x.fp8_activations!r}; FP8 experts must "
                        f"declare {TAKES_FP8!r} or {QUANTIZES_INTERNALLY!r}")
    return None


def pairing_problem(dispatcher: str, experts: str, cfg, ep_size: int, device_type: str,
                    check_device: bool = True) -> str | None:
    """Why this pairing cannot run `cfg` on `ep_size` ranks of `device_type`; None if it can."""
    d = dispatcher_class(dispatcher).CAPS
    why = (dispatcher_problem(dispatcher, cfg, ep_size, device_type, check_device)
           or experts_problem(experts, cfg, device_type, d.layout, dispatcher, check_device))
    if why:
        return why
    if cfg is not None and cfg.quant is not None and getattr(cfg.quant, "dispatch_fp8", False) and d.communicates:
        # who quantizes is settled here, at build time, never discovered in a forward
        if not d.fp8_dispatch:
            return (f"dispatch_fp8=True but dispatcher {dispatcher!r} cannot send FP8 rows with their "
                    f"scales; set dispatch_fp8=False (BF16 on the wire) or pick an FP8-capable dispatcher")
        if experts_class(experts).CAPS.fp8_activations != TAKES_FP8:
            return (f"dispatch_fp8=True sends FP8 rows with scales, but experts {experts!r} quantize their "
                    f"activations internally from high-precision rows; set dispatch_fp8=False or pick "
                    f"experts that take FP8")
    return None


def activation_handoff(dispatcher: str | None, experts: str | None, cfg) -> Handoff:
    """Who quantizes the activations of a valid pairing (call after `check_pairing`).

    FP8 on the wire when asked for and the dispatcher can; otherwise experts that take FP8 get their rows
    quantized right after dispatch (the explicit conversion, same formula, same bits), and experts that
    quantize internally get the high-precision rows. A dispatcher built without experts (`experts=None`:
    the caller runs its own) hands high-precision rows on unless it quantizes before the wire; experts
    built without a dispatcher quantize rows that arrive in the layer's dtype.
    """
    if cfg is None or cfg.quant is None:
        return Handoff.NONE
    if (dispatcher is not None and getattr(cfg.quant, "dispatch_fp8", False)
            and dispatcher_class(dispatcher).CAPS.fp8_dispatch):
        return Handoff.ON_THE_WIRE
    if experts is not None and experts_class(experts).CAPS.fp8_activations == TAKES_FP8:
        return Handoff.AFTER_DISPATCH
    return Handoff.IN_EXPERTS


def _check_capacity(max_tokens_per_rank) -> None:
    if max_tokens_per_rank is not None and (isinstance(max_tokens_per_rank, bool) or
                                            not isinstance(max_tokens_per_rank, int) or max_tokens_per_rank < 1):
        raise ValueError(f"max_tokens_per_rank must be a positive int (the most tokens any rank passes in one "
                         f"forward), got {max_tokens_per_rank!r}")


def check_overlap(dispatcher: str | None, experts: str | None, micro_batches, comm_sms) -> None:
    """The overlap settings against what the dispatcher declares (`in_flight`, `bounded_sms`): ValueError for
    a bad value, `UnsupportedCombination` for a setting the dispatcher cannot take (also what the command
    line checks before any rank starts)."""
    if isinstance(micro_batches, bool) or micro_batches not in (1, 2):
        raise ValueError(f"micro_batches must be 1 or 2 (a forward split in two micro-batches whose exchanges "
                         f"interleave with the other's experts), got {micro_batches!r}")
    if comm_sms is not None and (isinstance(comm_sms, bool) or not isinstance(comm_sms, int) or comm_sms < 1):
        raise ValueError(f"comm_sms must be None or a positive int (the most SMs the transfer kernels use), got "
                         f"{comm_sms!r}")
    if dispatcher is None:
        return
    d = dispatcher_class(dispatcher).CAPS
    if micro_batches > d.in_flight:
        raise UnsupportedCombination(
            dispatcher, experts or "-", f"micro_batches={micro_batches} keeps {micro_batches} forwards in flight at "
            f"once, dispatcher {dispatcher!r} declares {d.in_flight}",
            [f"dispatcher={n!r}" for n, cls in DISPATCHERS.items() if cls.CAPS.in_flight >= micro_batches]
            + ["micro_batches=1"])
    if comm_sms is not None and d.communicates and not d.bounded_sms:
        raise UnsupportedCombination(
            dispatcher, experts or "-", f"comm_sms={comm_sms} bounds the SMs of transfer kernels, and dispatcher "
            f"{dispatcher!r} has none it bounds (its transfers are the process group's collectives: bound NCCL's "
            f"with the group's options, ProcessGroupNCCL.Options().config.max_ctas)",
            [f"dispatcher={n!r}" for n, cls in DISPATCHERS.items() if cls.CAPS.bounded_sms] + ["comm_sms=None"])


def build_plan(dispatcher: str | None, experts: str | None, cfg, ep_size: int, device_type: str,
               max_tokens_per_rank: int | None = None, *, check_device: bool = True, micro_batches: int = 1,
               comm_sms: int | None = None) -> MoEPlan:
    """Check the pairing (explicit names; see `resolve_names` for "auto") and resolve it into the
    immutable `MoEPlan` the dispatcher and the experts are built from: the plan's only constructor.

    `experts=None`: a dispatcher on its own (an engine running its own experts): only the dispatcher's
    side is checked. `dispatcher=None`: experts on their own (one rank; the caller brings the batches).
    `check_device=False` resolves the plan for `device_type` without checking that the parts can run here
    (simulated ranks whose kernels run under the Triton interpreter on the CPU; experts built on their own
    for tests and benchmarks); every other rule still applies.
    `micro_batches` (1 or 2): a layer's forward split in that many micro-batches, as many forwards in flight
    as the dispatcher must declare (`in_flight`); `comm_sms`: the most SMs its transfer kernels may use, for
    a dispatcher that declares `bounded_sms` (None: unbounded; refused where a dispatcher's transfers are
    collectives it cannot bound, and the plan records None where there is no transfer to bound).
    Raises `UnsupportedCombination` for a refused pairing or overlap setting, ValueError for a missing or
    bad `max_tokens_per_rank` or a bad setting.
    """
    if dispatcher is None and experts is None:
        raise ValueError("build_plan: name a dispatcher, an experts backend, or both")
    _check_capacity(max_tokens_per_rank)
    check_overlap(dispatcher, experts, micro_batches, comm_sms)
    if dispatcher is None:
        why = experts_problem(experts, cfg, device_type, check_device=check_device)
        if why:
            raise UnsupportedCombination("-", experts, why, [f"experts={x!r}" for x in EXPERTS
                                                             if experts_problem(x, cfg, device_type) is None])
    elif experts is None:
        why = dispatcher_problem(dispatcher, cfg, ep_size, device_type, check_device=check_device)
        if why is None and getattr(cfg.quant, "dispatch_fp8", False) and not dispatcher_class(dispatcher).CAPS.fp8_dispatch:
            why = f"dispatch_fp8=True but dispatcher {dispatcher!r} cannot send FP8 rows with their scales"
        if why:
            raise UnsupportedCombination(dispatcher, "-", why, [f"dispatcher={d!r}" for d in DISPATCHERS
                                                            if dispatcher_problem(d, cfg, ep_size, device_type) is None])
    else:
        check_pairing(dispatcher, experts, cfg, ep_size, device_type, check_device=check_device)
    d = dispatcher_class(dispatcher).CAPS if dispatcher is not None else None
    x = experts_class(experts).CAPS if experts is not None else None
    if d is not None and d.needs_max_tokens and max_tokens_per_rank is None:
        raise ValueError(f"dispatcher {dispatcher!r} has fixed capacity and needs max_tokens_per_rank (the most "
                         f"tokens any rank passes in one forward)")
    scheme = cfg.quant_scheme
    handoff = activation_handoff(dispatcher, experts, cfg)
    act_group = getattr(scheme, "activation_group_size", None)
    wire_dtype, wire_scales, wire_group = cfg.dtype, 0, None
    if handoff is Handoff.ON_THE_WIRE:
        wire_dtype, wire_group = torch.float8_e4m3fn, act_group
        wire_scales = scale_groups(cfg.padded_hidden_size, act_group)
    capacity = max_tokens_per_rank if d is not None and (d.needs_max_tokens or d.takes_max_tokens) else None
    # a dispatcher that takes a capacity is capturable only with one (without it a host read sizes it)
    graph_safe = ((d is None or (d.cuda_graph_safe and (capacity is not None or not d.takes_max_tokens)))
                  and (x is None or x.cuda_graph_safe))
    fp8 = cfg.quant is not None
    return MoEPlan(dispatcher=dispatcher, experts=experts, layout=d.layout if d is not None else None,
                   ep_size=ep_size, device_type=device_type, dtype=cfg.dtype, num_experts=cfg.num_experts,
                   top_k=cfg.top_k, activation=cfg.activation, hidden_size=cfg.hidden_size,
                   padded_hidden_size=cfg.padded_hidden_size, intermediate_size=cfg.intermediate_size,
                   padded_intermediate_size=cfg.padded_intermediate_size, scheme=scheme, quant=quant_name(cfg),
                   weight_block=cfg.quant.weight_block if fp8 else None,
                   weight_granularity=cfg.quant.weight_granularity if fp8 else None,
                   act_group=act_group if fp8 else None, handoff=handoff, wire_dtype=wire_dtype,
                   wire_scales=wire_scales, wire_scale_group=wire_group,
                   experts_read_strided_rows=x is not None and x.reads_strided_rows, cuda_graph_safe=graph_safe,
                   host_sync=d is not None and d.host_sync and not (d.takes_max_tokens and capacity is not None),
                   max_tokens_per_rank=capacity, micro_batches=micro_batches,
                   comm_sms=applied_comm_sms(dispatcher, comm_sms))


def applied_comm_sms(dispatcher: str | None, comm_sms: int | None) -> int | None:
    """The SM bound that applies to `dispatcher`'s transfer kernels: `comm_sms` where it declares
    `bounded_sms`, None where there is nothing to bound (`local` has no transfer kernels; a dispatcher whose
    transfers are collectives refuses the setting in `check_overlap`)."""
    return comm_sms if dispatcher is not None and dispatcher_class(dispatcher).CAPS.bounded_sms else None


def graph_safe(dispatcher: str, experts: str) -> bool:
    """Whether both parts of a pairing declare themselves CUDA-graph capturable."""
    return dispatcher_class(dispatcher).CAPS.cuda_graph_safe and experts_class(experts).CAPS.cuda_graph_safe


def check_pairing(dispatcher: str, experts: str, cfg, ep_size: int, device_type: str,
                  check_device: bool = True) -> None:
    """Raise `UnsupportedCombination` (with the working alternatives) unless the pairing is valid."""
    why = pairing_problem(dispatcher, experts, cfg, ep_size, device_type, check_device)
    if why is None:
        return
    alternatives = [f"dispatcher={d!r}, experts={x!r}" for d, x in
                    supported_pairings(cfg, ep_size, device_type)]
    raise UnsupportedCombination(dispatcher, experts, why, alternatives)


def supported_pairings(cfg, ep_size: int, device_type: str) -> list[tuple[str, str]]:
    return [(d, x) for d in DISPATCHERS for x in EXPERTS
            if pairing_problem(d, x, cfg, ep_size, device_type) is None]


def _one_host(ep_size: int) -> bool:
    """Whether the group plausibly fits on this host's GPUs (no communication: every rank decides alike on
    hosts of the same size; a group spread over hosts with as many GPUs each is not detected and fails
    when its workspace is allocated, with the symmetric-memory error)."""
    return torch.cuda.is_available() and torch.cuda.device_count() >= ep_size


def _by_priority(table: dict[str, type]) -> list[str]:
    """The names "auto" may pick, highest `auto_priority` first (registration order among equals)."""
    return sorted((n for n, cls in table.items() if cls.CAPS.auto_priority > 0),
                  key=lambda n: -table[n].CAPS.auto_priority)


def resolve_names(dispatcher: str, experts: str | None, cfg, ep_size: int, device_type: str
                  ) -> tuple[str, str | None]:
    """Turn "auto" into explicit names, by what the backends declare: the dispatcher of highest
    `auto_priority` that runs here -- for one rank one that does not communicate, for several one that
    does, and one on peer memory only when the group fits on this host's GPUs -- and the experts backend of
    highest `auto_priority` that accepts that dispatcher's layout on this device. `experts=None`: a
    dispatcher on its own."""
    if dispatcher == "auto":
        multi = ep_size > 1
        dispatcher = next((n for n in _by_priority(DISPATCHERS)
                           if DISPATCHERS[n].CAPS.communicates == multi
                           and not (DISPATCHERS[n].CAPS.peer_memory and not _one_host(ep_size))
                           and dispatcher_problem(n, cfg, ep_size, device_type) is None), None)
        if dispatcher is None:
            raise UnsupportedCombination("auto", experts or "-", f"no registered dispatcher that "
                                         f"{'moves tokens' if multi else 'runs on one rank'} can run on {ep_size} "
                                         f"{device_type} rank(s)", [])
    if experts == "auto":
        ranked = _by_priority(EXPERTS)
        experts = next((x for x in ranked if pairing_problem(dispatcher, x, cfg, ep_size, device_type) is None),
                       ranked[-1] if ranked else "reference")   # none fits: the check that follows says why
    return dispatcher, experts


@dataclass
class MatrixRow:
    dispatcher: str
    experts: str
    device: str
    multi_rank: bool
    quant: str
    problem: str | None = None
    extra: dict = field(default_factory=dict)


def support_matrix(cfgs: dict | None = None) -> list[MatrixRow]:
    """Every dispatcher x experts x device x (1 rank / several) x quantization, with its verdict.

    `cfgs`: quant name -> a representative MoEConfig (defaults: a small bf16 config, and FP8 ones when
    the FP8 scheme is installed).
    """
    from .config import MoEConfig
    if cfgs is None:
        cfgs = {"none": MoEConfig(num_experts=8, top_k=2, hidden_size=256, intermediate_size=256)}
        cfgs.update(example_configs())
    rows = []
    for d in DISPATCHERS:
        for x in EXPERTS:
            for device in ("cpu", "cuda"):
                for multi in (False, True):
                    for q, cfg in cfgs.items():
                        problem = pairing_problem(d, x, cfg, 2 if multi else 1, device)
                        extra = {}
                        if problem is None and cfg.quant is not None:
                            extra["fp8_activations"] = activation_handoff(d, x, cfg)
                        rows.append(MatrixRow(d, x, device, multi, q, problem, extra))
    return rows


def example_configs() -> dict:
    """Representative FP8 configs for the support matrix (`epmoe info`, the contract tests): quant label ->
    MoEConfig. Block scales (DeepSeek-V3) and per-channel scales, each without and with FP8 dispatch."""
    from .config import MoEConfig
    from .quant import Fp8Config
    base = dict(num_experts=8, top_k=2, hidden_size=256, intermediate_size=256)
    return {
        "fp8_block": MoEConfig(**base, quant=Fp8Config()),
        "fp8_block+fp8_dispatch": MoEConfig(**base, quant=Fp8Config(dispatch_fp8=True)),
        "fp8_channel": MoEConfig(**base, quant=Fp8Config(weight_block=None, per_channel_weights=True,
                                                         activation="per_token")),
        "fp8_channel+fp8_dispatch": MoEConfig(**base, quant=Fp8Config(
            weight_block=None, per_channel_weights=True, activation="per_token", dispatch_fp8=True)),
    }
