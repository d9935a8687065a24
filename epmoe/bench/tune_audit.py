"""`epmoe tune --audit`: how each entry of a tuning table was timed, which entries no end-to-end race has set
against a path that could serve them now, and which batch sizes another GPU's table has entries for that this
table's shapes hide (`shadowed_entries`), each with the command that times them.

A table grows over many tunes, each of some shapes and batch sizes, on machines that come and go; an entry
written by an older tuner (kernel times only) or on a machine where a path could not run keeps serving until a
tune of that very shape and T replaces it. The audit reads the JSON only (no GPU): it is how such an entry is
found before a user's batch meets it.
"""
from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass

from ..kernels.tuning_table import (CONFIG_DIR, GLUON_MIN_ROWS, MoEKernelConfig, nearest_tuned, sibling_tables,
                                   within_reach)

_HOPPER = re.compile(r"\b(H100|H200|H800|H20|GH200)\b")
_FORMAT_FLAGS = {"bfloat16": "bf16", "float16": "fp16"}
_KEY = re.compile(r"L=(\d+),H=(\d+),I=(\d+),k=(\d+),fmt=(\w+)$")
RACED = "raced end to end"


def gluon_formats() -> frozenset[str]:
    """The table formats the Gluon pipeline can serve, as `triton_ws` declares them (its `ExpertsCaps`): each
    unquantized activation dtype it takes by name ("bfloat16"), and each FP8 weight format by its quant name."""
    from ..experts.triton_ws import WarpSpecializedExperts
    caps = WarpSpecializedExperts.CAPS
    plain = {str(d).removeprefix("torch.") for d in caps.dtypes} if "none" in caps.quant else set()
    return frozenset(plain | (caps.quant - {"none"}))


def how_timed(raw: dict, cfg: MoEKernelConfig) -> str:
    """What an entry's `measured_ms` is, from its marks (the table's `method` says the same in prose)."""
    if raw.get("copied_from"):
        return f"copied from {raw['copied_from']}, never timed on this table's GPU"
    mark = raw.get("measured")
    if mark == "end_to_end":
        return RACED
    if mark == "end_to_end_tiles":
        return "raced end to end, its tiles (the `gluon` kept by --no-gluon)"
    if mark is not None:
        return f"measured as {mark!r}"
    if cfg.gluon:
        return "Gluon against its tiles end to end, before the race"
    if cfg.gemv is not None:
        return "decode kernels against its tiles end to end, before the race"
    return "kernel times only, before the race"


@dataclass(frozen=True)
class Entry:
    """One entry of a table as the audit reads it: what runs its batch, how it was timed."""
    key: str
    T: int
    runs: str                  # "gluon", "decode kernels" or the tiles
    timed: str                 # how_timed's label
    ms: float | None
    raced: bool                # raced end to end at its T (`end_to_end`; `end_to_end_tiles`: by a --no-gluon tune)
    gluon_unraced: bool        # Gluon could serve it (Hopper, format, rows per expert) and no race set it against it


def parse_key(key: str) -> tuple[int, int, int, int, str]:
    """(L, H, I, k, fmt) of a table key (`shape_key`'s form); ValueError for any other string."""
    m = _KEY.match(key)
    if not m:
        raise ValueError(f"not a table key: {key!r} (expected L=..,H=..,I=..,k=..,fmt=..)")
    L, H, I, k = map(int, m.groups()[:4])
    return L, H, I, k, m.group(5)


def audit_entries(entries: dict, hopper: bool) -> list[Entry]:
    """Every entry of a table's raw `entries` object, in key and T order."""
    out, formats = [], gluon_formats()
    for key in sorted(entries):
        L, _, _, k, fmt = parse_key(key)
        for t, raw in sorted(entries[key].items(), key=lambda kv: int(kv[0])):
            T = int(t)
            cfg = MoEKernelConfig.from_dict(raw)
            runs = "gluon" if cfg.gluon else "decode kernels" if cfg.gemv is not None else \
                f"tiles BM{cfg.block_m}" + (f"+{cfg.tail_m}" if cfg.tail_m else "")
            timed = how_timed(raw, cfg)
            raced = timed.startswith(RACED)
            can_gluon = hopper and fmt in formats and T * k / L >= GLUON_MIN_ROWS
            out.append(Entry(key, T, runs, timed, raw.get("measured_ms"), raced,
                             can_gluon and not cfg.gluon and not raced))
    return out


def shape_flags(key: str) -> str:
    """`epmoe tune`'s flags for a table key: the preset whose key it is, else the sizes (with the activation of a
    preset of the same sizes: the key does not hold it, the tune needs one). A preset's key holds its sizes as the
    format pads them (`MoEConfig.padded_sizes`: block FP8 to whole 128-wide blocks), as the tune writes them."""
    from ..presets import PRESETS, preset_config
    from ..quant import quant_config_for
    L, H, I, k, fmt = parse_key(key)
    fmt_flag = _FORMAT_FLAGS.get(fmt, fmt)
    try:
        quant = None if fmt_flag in ("bf16", "fp16") else quant_config_for(fmt_flag)
    except ValueError:                     # a format the tune does not name: no preset can match it
        return f"--local-experts {L} --hidden {H} --inter {I} --top-k {k} --formats {fmt_flag}"
    for name in PRESETS:
        cfg = preset_config(name, quant=quant)
        if cfg.top_k != k or cfg.padded_sizes != (H, I):
            continue
        if cfg.num_experts == L:
            return f"--presets {name} --formats {fmt_flag}"
        # a shard of the preset: its sizes as given (the tune pads them as the layer does)
        return (f"--local-experts {L} --hidden {cfg.hidden_size} --inter {cfg.intermediate_size} --top-k {k} "
                f"--activation {cfg.activation} --formats {fmt_flag}")
    return f"--local-experts {L} --hidden {H} --inter {I} --top-k {k} --formats {fmt_flag}"


def audit_table(path: str) -> tuple[dict, list[Entry]]:
    """(the table's header fields, its entries audited)."""
    with open(path) as f:
        data = json.load(f)
    entries = data.get("entries")
    if not isinstance(entries, dict):
        raise ValueError(f"{path}: a kernel config table needs an 'entries' object")
    header = {k: v for k, v in data.items() if k != "entries"}
    return header, audit_entries(entries, bool(_HOPPER.search(str(header.get("device", "")))))


def _tokens(rows: list[Entry]) -> str:
    return ",".join(str(e.T) for e in rows)


@dataclass(frozen=True)
class Shadowed:
    """A batch size another GPU's table of the family has an entry for, in a shape this table has too but not at
    that T: the lookup reads the first table that holds a shape, so this GPU never reads the other's entry and
    serves the batch from its own nearest entry (`served_by`, a T) or the heuristic (None), untimed there."""
    key: str
    T: int
    served_by: int | None
    sibling: str


def shadowed_entries(path: str, siblings: list[str] | None = None) -> list[Shadowed]:
    """Every such batch size of the table at `path`, against `siblings` (default: the package tables its GPU
    reads after it, `sibling_tables`), in key and T order, each T once (the first sibling that has it)."""
    with open(path) as f:
        own = json.load(f).get("entries") or {}
    found: dict[tuple[str, int], Shadowed] = {}
    for sibling in (sibling_tables(path) if siblings is None else siblings):
        with open(sibling) as f:
            other = json.load(f).get("entries") or {}
        for key in {k for k in own if own[k]} & set(other):    # a shape with no entries here: the lookup reads on
            mine = {int(t) for t in own[key]}
            for T in (int(t) for t in other[key]):
                if T >= 1 and T not in mine and (key, T) not in found:
                    t = nearest_tuned(mine, T)
                    found[(key, T)] = Shadowed(key, T, t if within_reach(t, T) else None, os.path.basename(sibling))
    return [found[k] for k in sorted(found)]


def _shadowed_by_shape(path: str, siblings: list[str] | None = None) -> dict[str, list[Shadowed]]:
    """`shadowed_entries` grouped by shape key (key order, each shape's T in order)."""
    by_key: dict[str, list[Shadowed]] = {}
    for s in shadowed_entries(path, siblings):
        by_key.setdefault(s.key, []).append(s)
    return by_key


def _shadowed_tune(key: str, shadowed: list[Shadowed]) -> str:
    """`epmoe tune`'s arguments that time one shape's shadowed batch sizes."""
    return f"{shape_flags(key)} --tokens {','.join(str(s.T) for s in shadowed)}"


def shadowed_tune_args(path: str, siblings: list[str] | None = None) -> list[str]:
    """`epmoe tune`'s arguments that time each shape's shadowed batch sizes (`shadowed_entries`) on the table's
    GPU, one string a shape, the shapes with a batch size the heuristic serves first (a call cut by its time limit
    has then done those)."""
    by_key = _shadowed_by_shape(path, siblings)
    order = sorted(by_key, key=lambda key: (all(s.served_by is not None for s in by_key[key]), key))
    return [_shadowed_tune(key, by_key[key]) for key in order]


def report(console, paths: list[str], verbose: bool = False) -> int:
    """Print the audit of each table; return how many entries Gluon could serve that no race set against it."""
    from rich.markup import escape
    flagged = 0
    for path in paths:
        header, rows = audit_table(path)
        raced = [e for e in rows if e.raced]
        console.print(escape(f"{path} ({header.get('device', 'no device named')}, torch {header.get('torch', '?')}, "
                             f"triton {header.get('triton', '?')}, last written {header.get('date', '?')}): "
                             f"{len(rows)} entries of {len({e.key for e in rows})} shapes, {len(raced)} raced end "
                             f"to end"), soft_wrap=True)
        if verbose:
            for e in rows:
                ms = f"{e.ms:.4f} ms" if e.ms is not None else "no time"
                console.print(escape(f"  {e.key} T={e.T}: {e.runs}, {ms}, {e.timed}"), soft_wrap=True)
        unraced: dict[str, dict[str, list[Entry]]] = {}
        for e in rows:
            if not e.raced:
                unraced.setdefault(e.key, {}).setdefault(e.timed, []).append(e)
        for key, by_how in unraced.items():
            console.print(escape(f"  not raced end to end: {key}: " + "; ".join(
                f"T={_tokens(es)} {how}" for how, es in by_how.items())), soft_wrap=True)
        for key, es in _gluon_unraced(rows).items():
            flagged += len(es)
            gpu = header.get("device", "not named")
            console.print(escape(f"  the Gluon pipeline could serve {key} at T={_tokens(es)} ({GLUON_MIN_ROWS} rows "
                                 f"per expert or more) and no race has set it against it; race it on the table's GPU "
                                 f"({gpu}): epmoe tune --gluon {_race_args(key, es)}"), soft_wrap=True)
        for key, ss in _shadowed_by_shape(path).items():
            served = "; ".join(f"T={s.T} from {'the heuristic' if s.served_by is None else f'T={s.served_by}'}"
                               for s in ss)
            names = sorted({s.sibling for s in ss})
            console.print(escape(
                f"  {key}: {', '.join(names)} {'has' if len(names) == 1 else 'have between them'} entries at "
                f"T={','.join(str(s.T) for s in ss)} and this table has not; a GPU reading this table never reads "
                f"those and serves {served}, untimed there; time them on the table's GPU: epmoe tune "
                f"{_shadowed_tune(key, ss)}"), soft_wrap=True)
    return flagged


def _gluon_unraced(rows: list[Entry]) -> dict[str, list[Entry]]:
    out: dict[str, list[Entry]] = {}
    for e in rows:
        if e.gluon_unraced:
            out.setdefault(e.key, []).append(e)
    return out


def _race_args(key: str, rows: list[Entry]) -> str:
    return f"{shape_flags(key)} --tokens {_tokens(rows)}"


def gluon_race_args(path: str) -> list[str]:
    """`epmoe tune --gluon`'s arguments for each shape of the table at `path` with entries the Gluon pipeline could
    serve that no race has set against it (what `report` names), one string a shape."""
    _, rows = audit_table(path)
    return [_race_args(key, es) for key, es in _gluon_unraced(rows).items()]


def package_tables() -> list[str]:
    """The tables shipped in the package, by file name."""
    return sorted(os.path.join(CONFIG_DIR, f) for f in os.listdir(CONFIG_DIR) if f.endswith(".json"))


def main(argv: list[str] | None = None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="python -m epmoe.bench.tune_audit",
                                description="For a tuning table: `epmoe tune --gluon`'s arguments for each shape with "
                                            "entries the Gluon pipeline could serve that no race has set against "
                                            "it, one line a shape (none: no output). `epmoe tune --audit` says why.")
    p.add_argument("table", help="the table (a JSON file under epmoe/kernels/configs/, or one a tune wrote)")
    p.add_argument("--shadowed", action="store_true",
                   help="instead, `epmoe tune`'s arguments for each shape whose batch sizes another GPU's table of "
                        "the family (read after this one) has entries for and this table has not: a GPU reading "
                        "this table serves those from its own nearest entry or the heuristic, never timed there")
    args = p.parse_args(argv)
    if not os.path.exists(args.table):
        print(f"tune_audit: no table at {args.table}", file=sys.stderr)
        return 2
    for line in (shadowed_tune_args if args.shadowed else gluon_race_args)(args.table):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
