"""The forward header: what every rank says first in every forward of every communicating dispatcher, and
the one check of what the ranks said.

A header is a row of ints that starts with `FIELDS` (the same columns whether it travels through a
collective as int64 or through the symmetric workspace's control block as int32, where the GPU compares
them: `epmoe.kernels.symm_dispatch` H_*), followed by what the transport adds (the collective row: whether a
symmetric-memory forward stepped, then the layer's fields one by one so a mismatch names them; both: one row
count per destination rank). The fingerprint is one function of the layer's fields (`fingerprint`), so a
layer has the same fingerprint whichever way its header travels.

Every rank reads every rank's row, so every rank reaches the same verdict (`mismatch`) at the same point:
ranks that run different layers or different forwards, or of which one failed, all raise `RankMismatch`
instead of pairing exchanges of different sizes.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

from ..errors import RankMismatch
from ..registry import DISPATCHERS

FIELDS = ("fingerprint", "layer", "forward", "tokens", "failed")
FAILED, TOKENS = FIELDS.index("failed"), FIELDS.index("tokens")
# what a layer is made of, as ints: its fingerprint is a function of these, and the collective header
# carries them one by one (a mismatch then names the field)
LAYER_FIELDS = ("dispatcher", "wire row bytes", "max_tokens_per_rank", "num_experts", "top_k", "hidden size")
# the collective header: FIELDS, then this, then LAYER_FIELDS, then one count per destination rank
SYMM_STEP = "symm step"      # 0, or the number of the workspace a symmetric-memory forward of the sender stepped
COLLECTIVE_FIELDS = FIELDS + (SYMM_STEP,) + LAYER_FIELDS


def _crc31(text: str) -> int:
    return zlib.crc32(text.encode()) & 0x7FFFFFFF


def kind_code(name: str) -> int:
    """A dispatcher name as a stable int (the same on every rank and every run)."""
    return _crc31(name)


def kind_name(code: int) -> str:
    return next((repr(n) for n in DISPATCHERS if kind_code(n) == code), f"#{code}")


def layer_values(dispatcher: str, row_bytes: int, plan) -> list[int]:
    """`LAYER_FIELDS` of a layer: its dispatcher, bytes per row on its wire, and the plan's capacity,
    experts, top-k and padded hidden size."""
    return [kind_code(dispatcher), row_bytes, plan.max_tokens_per_rank or 0, plan.num_experts, plan.top_k,
            plan.padded_hidden_size]


def fingerprint(values: list[int]) -> int:
    """The layer's fingerprint (int32 >= 0) from its `layer_values`: the one fingerprint function."""
    return _crc31(repr(tuple(int(v) for v in values)))


@dataclass(frozen=True)
class Header:
    """One rank's header of one forward (`FIELDS`)."""

    fingerprint: int
    layer: int
    forward: int
    tokens: int
    failed: bool = False

    def values(self) -> list[int]:
        return [self.fingerprint, self.layer, self.forward, self.tokens, int(self.failed)]


def mismatch(who: str, rows: list[list[int]]) -> RankMismatch | None:
    """The error every rank raises for the header rows of one forward (one per rank, each starting with
    `FIELDS`; collective rows also carry `LAYER_FIELDS`, which the message then names), or None when no
    rank failed and all run the same layer's same forward."""
    failed = [r for r, h in enumerate(rows) if h[FAILED]]
    if failed:
        return RankMismatch(f"{who}: rank(s) {failed} could not compute this forward (their error is raised "
                            f"there); every rank of the group stops this forward")
    if len({tuple(h[:TOKENS]) for h in rows}) == 1:
        return None
    diffs = []
    if all(len(h) >= len(COLLECTIVE_FIELDS) for h in rows):
        for i, name in enumerate(LAYER_FIELDS, start=len(FIELDS) + 1):
            values = [h[i] for h in rows]
            if len(set(values)) > 1:
                shown = [kind_name(v) for v in values] if name == "dispatcher" else values
                diffs.append(f"{name} differs (" + ", ".join(f"rank {r}: {v}" for r, v in enumerate(shown)) + ")")
    elif len({h[0] for h in rows}) > 1:
        diffs.append("their layers' fingerprints differ (" + ", ".join(f"rank {r}: {h[0]}" for r, h in enumerate(rows))
                     + ")")
    per_rank = ", ".join(f"rank {r}: layer #{h[1]} forward #{h[2]}" for r, h in enumerate(rows))
    return RankMismatch(f"{who}: the ranks are not running the same layer's same forward ({per_rank})"
                        + "".join(f"; {d}" for d in diffs) + "; every rank must call the same EP layers in the "
                        "same order")
