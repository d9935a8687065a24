"""What the communicating dispatchers share: the wire format of a token row, the one function that packs
rows for the wire, the collectives (with a one-rank shortcut), and the statistics hook.

A token row on the wire is one `uint8` row holding several typed fields (the hidden vector, the
routing that the receiver needs, and whatever else travels with it), each field 16-byte aligned so the
receiver reads it back as a typed view without a copy. One collective therefore moves a token and its
metadata together: one NCCL launch per direction instead of one per tensor.

FP8 dispatch plugs in here and nowhere else: `token_format` gives the `x` field the wire dtype the plan
names and, when the plan quantizes before the wire, a `scales` field (float32, one per row or per
128-column group); `pack_tokens` quantizes before writing, and `unpack_tokens` hands `scales` back beside
`x` when the format has them.

Every forward starts with the forward header (`CommDispatcher.exchange_headers`): one fixed-size
exchange, the same for every dispatcher, checked on the host before anything whose shape depends on
the layer.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.distributed as dist

from ..errors import RankMismatch
from ..placement import Placement
from ..registry import DISPATCHERS
from ..sizes import round_up
from .base import Dispatcher
from .symm_workspace import existing_pool

ALIGN = 16  # bytes; every field starts on this boundary and rows are a multiple of it

# The forward header every rank sends first, in every forward of every communicating dispatcher: one
# int64 row of these fields, then one count per destination rank (zeros where a dispatcher needs none).
# The fingerprint fields describe the layer being run; the rest describe this forward.
FINGERPRINT_FIELDS = ("dispatcher", "wire row bytes", "max_tokens_per_rank", "num_experts", "top_k",
                      "hidden size")
# "symm step": the rank is a symmetric-memory dispatcher joining this exchange after its own first exchange
# ran (it advanced its workspace's epochs and slot; the other ranks advance theirs to match).
HEADER_FIELDS = ("failed",) + FINGERPRINT_FIELDS + ("layer", "forward", "symm step", "tokens")


@dataclass(frozen=True)
class WireField:
    name: str
    dtype: torch.dtype
    width: int          # elements per row
    offset: int         # bytes from the start of the row

    @property
    def nbytes(self) -> int:
        return self.width * self.dtype.itemsize


class WireFormat:
    """Typed fields packed side by side into `uint8` rows of `row_bytes` bytes. `quantize` (FP8 dispatch):
    `x [.., H] -> (q, scales)`, applied by `pack_tokens` to high-precision `x` before it is written."""

    def __init__(self, fields: list[tuple[str, torch.dtype, int]], quantize=None):
        self.quantize = quantize
        self.fields: dict[str, WireField] = {}
        offset = 0
        for name, dtype, width in fields:
            if name in self.fields:
                raise ValueError(f"wire format: field {name!r} twice")
            f = WireField(name, dtype, int(width), offset)
            self.fields[name] = f
            offset += round_up(f.nbytes, ALIGN)
        self.row_bytes = max(offset, ALIGN)

    def empty(self, *rows: int, device=None) -> torch.Tensor:
        return torch.empty(*rows, self.row_bytes, dtype=torch.uint8, device=device)

    def view(self, buf: torch.Tensor, name: str) -> torch.Tensor:
        """The typed view `[..., width]` of field `name` inside rows `buf [..., row_bytes]` (no copy)."""
        f = self.fields[name]
        return buf[..., f.offset:f.offset + f.nbytes].view(f.dtype)

    def signature(self) -> tuple:
        return tuple((f.name, str(f.dtype).replace("torch.", ""), f.width) for f in self.fields.values())

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}:{d}[{w}]" for n, d, w in self.signature())
        return f"WireFormat({inner}; {self.row_bytes} B/row)"


def token_format(plan, ids_dtype: torch.dtype = torch.int32) -> WireFormat:
    """The row a dispatcher sends per (token, destination), as its plan says: the hidden vector `x`
    (padded width; FP8 with its float32 `scales` when the plan quantizes before the wire), the token's
    expert ids (`ids`: local ids on the destination, or global ids, -1 for a slot that is not there) and
    routing `weights`."""
    hidden, top_k = plan.padded_hidden_size, plan.top_k
    fields = [("x", plan.wire_dtype, hidden), ("ids", ids_dtype, top_k), ("weights", torch.float32, top_k)]
    quantize = None
    if plan.wire_scales:
        fields.insert(1, ("scales", torch.float32, plan.wire_scales))
        quantize = plan.quantize                                   # the one formula, epmoe.quant.fp8
    return WireFormat(fields, quantize)


def _put(view: torch.Tensor, value) -> None:
    if isinstance(value, torch.Tensor):
        view.copy_(value)
    else:
        view.fill_(value)


def pack_tokens(fmt: WireFormat, out: torch.Tensor, x, ids, weights, **extra) -> torch.Tensor:
    """THE place where token rows are written for the wire: every field of `fmt` into `out [..., row_bytes]`.

    Values are tensors broadcasting against `out`'s leading dimensions (the low-latency dispatcher writes
    one `x` into every destination's block) or scalars (padding rows). `extra` fills the remaining fields
    by name (e.g. `count`). FP8 formats quantize a high-precision `x` here, before the wire (padding rows
    get scale 1).
    """
    if fmt.quantize is not None and "scales" not in extra:
        if isinstance(x, torch.Tensor) and x.dtype != fmt.fields["x"].dtype:
            x, extra["scales"] = fmt.quantize(x)
        else:
            extra["scales"] = 1.0
    _put(fmt.view(out, "x"), x)
    _put(fmt.view(out, "ids"), ids)
    _put(fmt.view(out, "weights"), weights)
    for name, value in extra.items():
        _put(fmt.view(out, name), value)
    return out


class TokenRows(NamedTuple):
    x: torch.Tensor
    ids: torch.Tensor
    weights: torch.Tensor
    scales: torch.Tensor | None


def unpack_tokens(fmt: WireFormat, buf: torch.Tensor, contiguous: bool = False) -> TokenRows:
    """Typed views of received rows (no copy; strided), or dense copies with `contiguous=True` (what the
    flat layout hands to experts backends, some of whose kernels index rows as a dense array).
    `scales` is None when the format has none."""
    def get(name):
        if name not in fmt.fields:
            return None
        v = fmt.view(buf, name)
        return v.contiguous() if contiguous else v
    return TokenRows(get("x"), get("ids"), get("weights"), get("scales"))


# ---------------------------------------------------------------------------------------- collectives
def _gather_fn():
    # looked up at call time, so a test that wraps torch.distributed's functions sees every call
    return getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _reduce_scatter_fn():
    return getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _started_async(async_op: bool, t: torch.Tensor) -> bool:
    """Whether to start a collective with `async_op=True`: asked for, and not inside a CUDA graph
    capture (there the collective is captured synchronously into the graph)."""
    return async_op and not (t.is_cuda and torch.cuda.is_current_stream_capturing())


class Comm:
    """The collectives over one EP group; with one rank (no group) they are copies and nothing is sent.
    With `async_op=True` each returns the collective's work (None where nothing is left to wait for)."""

    def __init__(self, group, size: int):
        self.group = group
        self.size = size

    def all_to_all(self, out: torch.Tensor, inp: torch.Tensor, out_splits: list[int] | None = None,
                   in_splits: list[int] | None = None, async_op: bool = False):
        if self.size == 1:
            if out.numel():
                out.copy_(inp)
            return None if async_op else out
        work = dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.group,
                                      async_op=_started_async(async_op, out))
        return work if async_op else out

    def all_gather(self, out: torch.Tensor, inp: torch.Tensor, async_op: bool = False):
        if self.size == 1:
            out.copy_(inp)
            return None if async_op else out
        work = _gather_fn()(out, inp, group=self.group, async_op=_started_async(async_op, out))
        return work if async_op else out

    def reduce_scatter(self, out: torch.Tensor, inp: torch.Tensor, async_op: bool = False):
        if self.size == 1:
            out.copy_(inp)
            return None if async_op else out
        work = _reduce_scatter_fn()(out, inp, group=self.group, async_op=_started_async(async_op, out))
        return work if async_op else out


# ---------------------------------------------------------------------------------------- statistics
@dataclass
class DispatchStats:
    """What one dispatcher moved, counted by the dispatcher itself (`enable_stats()`; off by default).

    Per destination rank: rows and bytes of the dispatch direction and bytes of the combine direction
    (to itself included: index `rank`). `received_per_expert`: (token, local expert) pairs this rank's
    experts were given, accumulated on the device (no host sync; read it with `.tolist()`).
    """

    ep_size: int
    rank: int
    forwards: int = 0
    dispatch_rows: list[int] = field(default_factory=list)
    dispatch_bytes: list[int] = field(default_factory=list)
    combine_bytes: list[int] = field(default_factory=list)
    received_per_expert: torch.Tensor | None = None

    def __post_init__(self) -> None:
        for name in ("dispatch_rows", "dispatch_bytes", "combine_bytes"):
            if not getattr(self, name):
                setattr(self, name, [0] * self.ep_size)

    def add(self, name: str, per_rank) -> None:
        acc = getattr(self, name)
        for r, v in enumerate(per_rank):
            acc[r] += int(v)

    def count_experts(self, counts: torch.Tensor) -> None:
        if self.received_per_expert is None:
            self.received_per_expert = torch.zeros(counts.shape[0], dtype=torch.int64, device=counts.device)
        self.received_per_expert += counts

    def bytes_to_peers(self, name: str = "dispatch_bytes") -> int:
        return sum(v for r, v in enumerate(getattr(self, name)) if r != self.rank)

    def as_dict(self) -> dict:
        return {"ep_size": self.ep_size, "rank": self.rank, "forwards": self.forwards,
                "dispatch_rows": list(self.dispatch_rows), "dispatch_bytes": list(self.dispatch_bytes),
                "combine_bytes": list(self.combine_bytes),
                "received_per_expert": (None if self.received_per_expert is None
                                        else self.received_per_expert.tolist())}


class ForwardHeaders(NamedTuple):
    """Every rank's header of one forward, read on the host: `tokens[r]` (rank r's T) and `counts[r][d]`
    (rows rank r sends to rank d; zeros for dispatchers that exchange no counts)."""
    tokens: list[int]
    counts: list[list[int]]


def _kind_code(name: str) -> int:
    """A dispatcher name as a stable int (the same on every rank and every run)."""
    return zlib.crc32(name.encode())


def _kind_name(code: int) -> str:
    return next((repr(n) for n in DISPATCHERS if _kind_code(n) == code), f"#{code}")


class CommDispatcher(Dispatcher):
    """Base of the dispatchers that move tokens: the group, its collectives, the wire format the plan
    gives, the forward header every forward starts with, and the statistics hook."""

    def __init__(self, plan, placement: Placement, group=None, device: torch.device | None = None):
        super().__init__(plan, placement, group, device)
        self.fmt = token_format(plan)
        self.ep_size = placement.ep_size
        self.rank = placement.rank
        if group is not None:
            size = dist.get_world_size(group)
            if size != self.ep_size:
                raise ValueError(f"{self.name} dispatcher: the placement is for {self.ep_size} ranks but the "
                                 f"group has {size}")
        elif self.ep_size != 1:
            raise ValueError(f"{self.name} dispatcher: a placement over {self.ep_size} ranks needs ep_group")
        self.comm = Comm(group, self.ep_size)
        self.stats: DispatchStats | None = None
        self.layer_index = 0        # set by the handshake: the layer's index among the group's EP layers
        self.forwards = [0]         # the group's forward counter, shared by its layers (set by the handshake)
        if device is not None:
            placement.tables(device)  # build the id tables now, outside any CUDA graph capture

    # --------------------------------------------------- the forward header: first exchange of a forward
    def layer_fingerprint(self) -> list[int]:
        """What ranks running the same layer agree on, as ints (the fingerprint fields of the header)."""
        return [_kind_code(self.name), self.fmt.row_bytes, self.max_tokens_per_rank or 0,
                self.plan.num_experts, self.plan.top_k, self.plan.padded_hidden_size]

    def symm_pool(self):
        """The group's symmetric-memory workspace pool if this process has an allocated one (a layer on a
        GPU-initiated dispatcher ran here), else None: then nothing is marked and nothing costs more."""
        return existing_pool(self.group)

    def exchange_headers(self, num_tokens: int, device, dest_counts: torch.Tensor | None = None,
                         failed: bool = False, *, forward: int | None = None,
                         symm_step: bool = False) -> ForwardHeaders:
        """The first collective of every forward of every communicating dispatcher, and the same one for
        all of them: every rank gathers one fixed-size int64 row per rank (`HEADER_FIELDS`, then one count
        per destination rank), read on the host and checked before anything whose shape depends on the
        layer. Ranks that run different layers, or different forwards, or of which one failed, therefore
        all raise the same `RankMismatch` here instead of pairing collectives of different sizes.

        Args:
            num_tokens: T, this rank's tokens in this forward.
            device: where the row is built (the group's device).
            dest_counts: [ep] int rows this rank sends to each rank, for dispatchers that size their
                exchange from them (None: zeros).
            failed: this rank takes part only to make its peers stop (see `abort`).
            forward: the group's forward number to send (None: the next one, counted here); a
                symmetric-memory dispatcher joining this exchange passes the number its forward used.
            symm_step: see HEADER_FIELDS.
        Returns:
            `ForwardHeaders`: every rank's token count and per-destination counts.
        """
        if forward is None:
            self.forwards[0] = (self.forwards[0] + 1) % (2 ** 62)
            forward = self.forwards[0]
        # Where this process also has a symmetric-memory workspace on the group, a peer may be waiting on
        # its flags for this same forward (it runs a GPU-initiated layer where this rank runs a collective
        # one): tell it so through the workspace, and it joins this exchange instead of timing out.
        pool = self.symm_pool() if self.ep_size > 1 else None
        if pool is not None:
            pool.mark_collective(forward)
        values = [int(failed)] + self.layer_fingerprint() + [self.layer_index, forward, int(symm_step), num_tokens]
        if dest_counts is None:
            values += [0] * self.ep_size
        # to a GPU from page-locked memory without blocking the host (the read below is the one sync)
        pinned = torch.device(device).type == "cuda"
        mine = torch.tensor(values, dtype=torch.int64, pin_memory=pinned).to(device, non_blocking=pinned)
        row = mine if dest_counts is None else torch.cat([mine, dest_counts.to(torch.int64)])
        # an all-gather done as an equal-split all-to-all of the row sent to every rank: the same result,
        # about half the latency on Gloo
        sent = row.repeat(self.ep_size)
        rows = self.comm.all_to_all(torch.empty_like(sent), sent).view(self.ep_size, -1).tolist()  # host read
        try:
            self.check_headers(rows)
        except RankMismatch:
            step = HEADER_FIELDS.index("symm step")
            if pool is not None and not symm_step and any(h[step] for h in rows):
                pool.skip_forward()      # a peer's symmetric-memory forward advanced its workspace: follow
            raise
        n = len(HEADER_FIELDS)
        return ForwardHeaders([r[n - 1] for r in rows], [r[n:] for r in rows])

    def check_headers(self, rows: list[list[int]]) -> None:
        """Raise `RankMismatch` (the same on every rank: all see the same rows) if a rank failed this
        forward, or if the ranks are not running the same layer's same forward, naming what differs."""
        failed = [r for r, h in enumerate(rows) if h[0]]
        if failed:
            raise RankMismatch(f"{self.name} dispatcher: rank(s) {failed} could not compute this forward (their "
                               f"error is raised there); every rank of the group stops this forward")
        diffs = []
        for i, name in enumerate(FINGERPRINT_FIELDS, start=1):
            values = [h[i] for h in rows]
            if len(set(values)) > 1:
                shown = [_kind_name(v) for v in values] if name == "dispatcher" else values
                diffs.append(f"{name} differs (" + ", ".join(f"rank {r}: {v}" for r, v in enumerate(shown)) + ")")
        layer, forward = HEADER_FIELDS.index("layer"), HEADER_FIELDS.index("forward")
        if diffs or len({(h[layer], h[forward]) for h in rows}) > 1:
            # every rank saw the same rows: all adopt the same count, so the group is usable again
            self.forwards[0] = max(h[forward] for h in rows)
            per_rank = ", ".join(f"rank {r}: layer #{h[layer]} forward #{h[forward]}" for r, h in enumerate(rows))
            raise RankMismatch(f"{self.name} dispatcher: the ranks are not running the same layer's same forward "
                               f"({per_rank})" + "".join(f"; {d}" for d in diffs)
                               + "; every rank must call the same EP layers in the same order")

    def abort(self) -> None:
        """Take part in the current forward on behalf of a rank whose inputs or routing failed: its header
        is flagged as failed, so every rank raises right after the first exchange instead of waiting; the
        caller re-raises its own error."""
        try:
            self.exchange_headers(0, self.device, failed=True)
        except RankMismatch:
            return   # expected: this rank's failed flag ends the forward on every rank, here included

    def enable_stats(self) -> DispatchStats:
        """Start counting what this dispatcher sends (returns the live `DispatchStats`)."""
        self.stats = DispatchStats(self.ep_size, self.rank)
        return self.stats

    def wire_signature(self) -> tuple:
        """What this dispatcher puts on the wire (every rank of a group must agree: the handshake)."""
        return (self.name, self.fmt.signature())

