"""What the communicating dispatchers share: the wire format of a token row, the one function that packs
rows for the wire, the collectives (with a one-rank shortcut), and the statistics hook.

A token row on the wire is one `uint8` row holding several typed fields (the hidden vector, the
routing that the receiver needs, and whatever else travels with it), each field 16-byte aligned so the
receiver reads it back as a typed view without a copy. One collective therefore moves a token and its
metadata together: one NCCL launch per direction instead of one per tensor.

FP8 dispatch plugs in here and nowhere else: `token_format` gives the `x` field the FP8 dtype and adds a
`scales` field (float32, one per row or per 128-column group), `pack_tokens` quantizes before writing,
and `unpack_tokens` already hands `scales` back beside `x` when the format has them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.distributed as dist

from ..errors import RankMismatch
from ..placement import Placement
from ..routing import Routing
from .base import Dispatcher

ALIGN = 16  # bytes; every field starts on this boundary and rows are a multiple of it
HEADER_WIDTH = 4  # a forward's header: (tokens, layer index, step, status), see CommDispatcher.next_header


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


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
            offset += _round_up(f.nbytes, ALIGN)
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


def token_format(cfg, hidden: int, top_k: int, ids_dtype: torch.dtype = torch.int32,
                 header: bool = False) -> WireFormat:
    """The row a dispatcher sends per (token, destination): the hidden vector `x`, the token's expert ids
    (`ids`: local ids on the destination, or global ids, -1 for a slot that is not there) and routing
    `weights`; with `header=True` also the sender's forward header (token count, layer, step, status: the
    low-latency overflow and agreement checks)."""
    fields = [("x", cfg.dtype, hidden), ("ids", ids_dtype, top_k), ("weights", torch.float32, top_k)]
    quantize = None
    if cfg.quant is not None and getattr(cfg.quant, "dispatch_fp8", False):
        # FP8 dispatch: x travels as e4m3fn with its float32 scales (the one formula, epmoe.quant.fp8)
        scheme = cfg.quant_scheme
        group = scheme.activation_group_size
        fields[0] = ("x", torch.float8_e4m3fn, hidden)
        fields.insert(1, ("scales", torch.float32, 1 if group is None else -(-hidden // group)))
        quantize = scheme.quantize_activations
    if header:
        fields.append(("header", torch.int32, HEADER_WIDTH))
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
    header: torch.Tensor | None


def unpack_tokens(fmt: WireFormat, buf: torch.Tensor, contiguous: bool = False) -> TokenRows:
    """Typed views of received rows (no copy; strided), or dense copies with `contiguous=True` (what the
    flat layout hands to experts backends, some of whose kernels index rows as a dense array).
    `scales`/`header` are None when the format has none."""
    def get(name):
        if name not in fmt.fields:
            return None
        v = fmt.view(buf, name)
        return v.contiguous() if contiguous else v
    return TokenRows(get("x"), get("ids"), get("weights"), get("scales"), get("header"))


# ---------------------------------------------------------------------------------------- collectives
def _gather_fn():
    # looked up at call time, so a test that wraps torch.distributed's functions sees every call
    return getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _reduce_scatter_fn():
    return getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class Comm:
    """The collectives over one EP group; with one rank (no group) they are copies and nothing is sent."""

    def __init__(self, group, size: int):
        self.group = group
        self.size = size

    def all_to_all(self, out: torch.Tensor, inp: torch.Tensor, out_splits: list[int] | None = None,
                   in_splits: list[int] | None = None) -> torch.Tensor:
        if self.size == 1:
            if out.numel():
                out.copy_(inp)
            return out
        dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.group)
        return out

    def all_gather(self, out: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            out.copy_(inp)
            return out
        _gather_fn()(out, inp, group=self.group)
        return out

    def reduce_scatter(self, out: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            out.copy_(inp)
            return out
        _reduce_scatter_fn()(out, inp, group=self.group)
        return out


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


class CommDispatcher(Dispatcher):
    """Base of the dispatchers that move tokens: the group, its collectives and the statistics hook."""

    def __init__(self, cfg, placement: Placement, group=None, max_tokens_per_rank: int | None = None,
                 device: torch.device | None = None):
        super().__init__(cfg, placement, group, max_tokens_per_rank, device)
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
        self._failing = False       # this rank is taking part in a forward it could not compute
        if device is not None:
            placement.tables(device)  # build the id tables now, outside any CUDA graph capture

    # ---------------------------------------------------------------- per-forward agreement (header)
    def next_header(self, num_tokens: int) -> list[int]:
        """This rank's header for the forward being dispatched: (tokens, layer, the group's forward count,
        status). It travels
        in the exchange each dispatcher makes anyway (counts), so checking it costs no extra collective."""
        self.forwards[0] = (self.forwards[0] + 1) % (2 ** 31)
        return [num_tokens, self.layer_index, self.forwards[0], 1 if self._failing else 0]

    def check_headers(self, headers: list[list[int]]) -> None:
        """Raise `RankMismatch` (the same on every rank) if a rank failed this forward, or if the ranks
        are not running the same layer's same forward (their collectives would pair up wrongly)."""
        failed = [r for r, h in enumerate(headers) if h[3]]
        if failed:
            raise RankMismatch(f"{self.name} dispatcher: rank(s) {failed} could not compute this forward (their "
                               f"error is raised there); every rank of the group stops this forward")
        seen = {(h[1], h[2]) for h in headers}
        if len(seen) > 1:
            # every rank saw the same headers: all adopt the same count, so the group is usable again
            self.forwards[0] = max(h[2] for h in headers)
            per_rank = ", ".join(f"rank {r}: layer #{h[1]} forward #{h[2]}" for r, h in enumerate(headers))
            raise RankMismatch(f"{self.name} dispatcher: the ranks are not running the same layer's same forward "
                               f"({per_rank}); every rank must call the same EP layers in the same order")

    def abort(self) -> None:
        """Take part in the current forward on behalf of a rank whose inputs or routing failed, flagged
        as failed, so that every rank raises instead of waiting; the caller re-raises its own error."""
        H, k = self.cfg.padded_hidden_size, self.cfg.top_k
        x = torch.zeros(0, H, dtype=self.cfg.dtype, device=self.device)
        empty = Routing(torch.zeros(0, k, dtype=torch.int32, device=self.device),
                        torch.zeros(0, k, dtype=torch.float32, device=self.device))
        self._failing = True
        try:
            batch, handle = self.dispatch(x, empty)
            self.combine(self.empty_expert_output(batch), handle)
        except RankMismatch:
            return   # expected: this rank's failed flag ends the forward on every rank, here included
        finally:
            self._failing = False

    def empty_expert_output(self, batch) -> torch.Tensor:
        """What the experts would return for `batch`, as zeros (for `abort`)."""
        return torch.zeros(batch.x.shape, dtype=self.cfg.dtype, device=batch.x.device)

    def enable_stats(self) -> DispatchStats:
        """Start counting what this dispatcher sends (returns the live `DispatchStats`)."""
        self.stats = DispatchStats(self.ep_size, self.rank)
        return self.stats

    def wire_signature(self) -> tuple:
        """What this dispatcher puts on the wire (every rank of a group must agree: the handshake)."""
        fmt = getattr(self, "fmt", None)
        return (self.name, None if fmt is None else fmt.signature())

