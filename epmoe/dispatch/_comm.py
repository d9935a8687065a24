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

Every forward starts with the forward header (`CommDispatcher.exchange_headers`, the protocol in
`header.py`): one fixed-size exchange, the same for every dispatcher, checked on the host before anything
whose shape depends on the layer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.distributed as dist

from ..errors import RankMismatch
from ..group import GroupState, group_state
from ..placement import Placement
from ..sizes import round_up
from . import header as fh
from .base import Dispatcher, Pending
from .streams import comm_stream_for

ALIGN = 16  # bytes; every field starts on this boundary and rows are a multiple of it


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

    def record(self, sent_rows, dispatch_row_bytes: int, returned_rows, combine_row_bytes: int,
               expert_pairs: torch.Tensor) -> None:
        """One forward: rows sent to each rank (`dispatch_row_bytes` each), rows each rank's combine sends
        back here (`combine_row_bytes` each), and the (token, local expert) pairs [L] this rank received."""
        self.forwards += 1
        for acc, rows, nbytes in ((self.dispatch_rows, sent_rows, 1), (self.dispatch_bytes, sent_rows, dispatch_row_bytes),
                                  (self.combine_bytes, returned_rows, combine_row_bytes)):
            for r, n in enumerate(rows):
                acc[r] += int(n) * nbytes
        if self.received_per_expert is None:
            self.received_per_expert = torch.zeros(expert_pairs.shape[0], dtype=torch.int64,
                                                   device=expert_pairs.device)
        self.received_per_expert += expert_pairs

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


class CommDispatcher(Dispatcher):
    """Base of the dispatchers that move tokens: the group, its collectives, the wire format the plan
    gives, the forward header every forward starts with, and the statistics hook.

    `state`: what the layers of the group share on this process (`epmoe.group.GroupState`: the forward
    count, the layer count, the group's symmetric workspaces); by default the group's own, for one rank a
    fresh one. `layer_index`: this layer's index on the group (the build handshake sets it)."""

    def __init__(self, plan, placement: Placement, group=None, device: torch.device | None = None, *,
                 state: GroupState | None = None):
        super().__init__(plan, placement, group, device)
        self.fmt = token_format(plan)
        self.ep_size = placement.ep_size
        self.rank = placement.rank
        if group is not None:
            size = dist.get_world_size(group)
            if size != self.ep_size:
                raise ValueError(f"{self.name} dispatcher: the placement is for {self.ep_size} ranks but the "
                                 f"group has {size}")
        elif self.ep_size != 1 and state is None:
            raise ValueError(f"{self.name} dispatcher: a placement over {self.ep_size} ranks needs ep_group")
        self.state = state if state is not None else (group_state(group) if group is not None else GroupState())
        self.comm = Comm(group, self.ep_size)
        self.stats: DispatchStats | None = None
        self.layer_index = 0
        self.layer_fields = fh.layer_values(self.name, self.fmt.row_bytes, plan)
        self.fingerprint = fh.fingerprint(self.layer_fields)
        self.comm_stream = comm_stream_for(self.state, device)
        if device is not None:
            placement.tables(device)  # build the id tables now, outside any CUDA graph capture

    # --------------------------------------------------- the forward header: first exchange of a forward
    def exchange_headers(self, num_tokens: int, device, dest_counts: torch.Tensor | None = None,
                         failed: bool = False, *, header: fh.Header | None = None,
                         symm_step: int = 0) -> ForwardHeaders:
        """The first collective of every forward of every communicating dispatcher, and the same one for
        all of them: every rank gathers one fixed-size int64 row per rank (`header.COLLECTIVE_FIELDS`, then
        one count per destination rank), read on the host and checked before anything whose shape depends
        on the layer. Ranks that run different layers, or different forwards, or of which one failed,
        therefore all raise the same `RankMismatch` here instead of pairing collectives of different sizes.

        Args:
            num_tokens: T, this rank's tokens in this forward.
            device: where the row is built (the group's device).
            dest_counts: [ep] int rows this rank sends to each rank, for dispatchers that size their
                exchange from them (None: zeros).
            failed: this rank takes part only to make its peers stop (see `abort`).
            header: the header to send (None: this layer's, for the group's next forward); a
                symmetric-memory dispatcher joining this exchange passes the one its forward used.
            symm_step: the number of the workspace a symmetric-memory forward of this rank stepped (0:
                none), so that the other ranks step theirs (`SymmWorkspace.skip_forward`).
        Returns:
            `ForwardHeaders`: every rank's token count and per-destination counts.
        """
        if header is None:
            header = fh.Header(self.fingerprint, self.layer_index, self.state.next_forward(), num_tokens, failed)
        # Where this process also has symmetric-memory workspaces on the group, a peer may be waiting on
        # their flags for this same forward (it runs a GPU-initiated layer where this rank runs a collective
        # one): tell it so through the workspace, and it joins this exchange instead of timing out.
        if self.ep_size > 1:
            for ws in self.state.workspaces:
                ws.mark_collective(header.forward)
        values = header.values() + [symm_step] + self.layer_fields
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
        error = fh.mismatch(f"{self.name} dispatcher", rows)
        if error is not None:
            self.settle_mismatch(rows, symm_step)
            raise error
        n = len(fh.COLLECTIVE_FIELDS)
        return ForwardHeaders([r[fh.TOKENS] for r in rows], [r[n:] for r in rows])

    def settle_mismatch(self, rows: list[list[int]], symm_step: int) -> None:
        """After a mismatch every rank saw the same rows: all adopt the largest forward number (the group's
        next forward then has the same number everywhere), and a rank whose peer's symmetric-memory forward
        stepped a workspace steps its own alike."""
        self.state.adopt_forward(max(h[fh.FIELDS.index("forward")] for h in rows))
        step = fh.COLLECTIVE_FIELDS.index(fh.SYMM_STEP)
        stepped = {h[step] for h in rows if h[step]}
        if not symm_step:
            for number in stepped:
                ws = self.state.workspace_numbered(number)
                if ws is not None:
                    ws.skip_forward()

    def exchange_capacity_header(self, num_tokens: int, device) -> None:
        """The forward header of a fixed-capacity forward (max_tokens_per_rank) and its overflow check: every
        rank's T is read on the host (the eager forward's one host read, of the headers, not of any count)
        and every rank raises alike, naming the setting, if one passed more. While a CUDA graph is captured
        nothing is read back and no header is exchanged: each rank checks its own T, which a replay cannot
        change; with one rank there are no peers."""
        M = self.plan.max_tokens_per_rank
        capturing = torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing()
        if self.ep_size > 1 and not capturing:
            bad = [(r, t) for r, t in enumerate(self.exchange_headers(num_tokens, device).tokens) if t > M]
        else:
            bad = [(self.rank, num_tokens)] if num_tokens > M else []
        if bad:
            who = ", ".join(f"rank {r} passed {t} tokens" for r, t in bad)
            raise ValueError(
                f"{self.name} dispatcher: {who}, more than max_tokens_per_rank={M} (raised on every rank "
                f"of the group; this forward's outputs were discarded, no token was dropped silently). "
                f"Build the layer with a larger max_tokens_per_rank on every rank, or pass fewer tokens per "
                f"forward")

    def abort(self) -> None:
        """Take part in the current forward on behalf of a rank whose inputs or routing failed: its header
        is flagged as failed, so every rank raises right after the first exchange instead of waiting; the
        caller re-raises its own error. Issued like an exchange (on the communication stream, in order)."""
        self._issue(self._start_abort, (), None).wait()

    def _start_abort(self) -> Pending:
        try:
            self.exchange_headers(0, self.device, failed=True)
        except RankMismatch:
            pass     # expected: this rank's failed flag ends the forward on every rank, here included
        return Pending([], lambda: None, overlaps=False)

    # ------------------------------------------------------------------------------------- resync
    def resync(self) -> None:
        """A collective on the group (every rank calls it, on any of the group's layers, between forwards:
        no dispatch waiting for its combine): the group's state is put back in step on every rank -- every
        symmetric workspace on the group is reset (`SymmWorkspace.reset`) and every rank continues the
        group's forward count from the largest any rank reached (so no forward number is used twice: a CUDA
        graph captured before keeps the number it was captured with, and no later forward takes it). Needed after a rank gave a forward up on a timeout of the
        symmetric-memory dispatchers (a peer skipped the forward, or came late): the ranks' slots and
        epochs then differ. Raises the process group's error where a rank is dead (then only a new group
        helps)."""
        for _ in self.resync_steps():       # each step runs as the generator is drained; nothing to wait on
            continue

    def resync_steps(self):
        """`resync` as steps (a generator; simulated ranks stop at each meeting)."""
        # every rank's earlier kernels are done (they store into the peers); the largest forward count
        reached = yield from self.meet_steps(self.state.forwards)
        for ws in self.group_workspaces():
            ws.reset()
        self.state.adopt_forward(reached)
        yield from self.meet_steps()          # every rank reset before any rank publishes again

    def group_workspaces(self) -> list:
        """The symmetric workspaces on this group in this process (what `resync` resets)."""
        return list(self.state.workspaces)

    def meet_steps(self, value: int = 0):
        """Every rank gets here before any leaves, this rank's device work done first: a tiny all-to-all
        on the group carrying `value`, between two device synchronisations (a generator for
        `resync_steps`, returning the largest `value` of any rank)."""
        cuda = self.device is not None and torch.device(self.device).type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
        largest = value
        if self.ep_size > 1:
            token = torch.full((self.ep_size,), value, dtype=torch.int64, device=self.device)
            received = torch.empty_like(token)
            self.comm.all_to_all(received, token)
            largest = int(received.max())        # a host read: resync() runs between forwards
        yield from ()
        return largest

    def enable_stats(self) -> DispatchStats:
        """Start counting what this dispatcher sends (returns the live `DispatchStats`)."""
        self.stats = DispatchStats(self.ep_size, self.rank)
        return self.stats

    def wire_signature(self) -> tuple:
        """What this dispatcher puts on the wire (every rank of a group must agree: the handshake)."""
        return (self.name, self.fmt.signature())
