"""Merge the tables of several `epmoe tune` device calls sent from the same commit into the package's table.

`gpu_one_h200.sh`'s tune part keeps each call's table before and after (`table_<GPU>_before_tune.json`,
`table_<GPU>_after_tune.json`); a call's new entries live in that call's copy only. Committing each after-table
before the next call costs the warm machine its idle time; instead several calls can run from one commit and
their after-tables be merged here afterwards:

    python3 benchmarks/merge_tune_tables.py epmoe/kernels/configs/NVIDIA_H200.json \\
        --call call1/table_H200_before_tune.json call1/table_H200_after_tune.json \\
        --call call2/table_H200_before_tune.json call2/table_H200_after_tune.json

Each call's changes are its (shape key, T) entries that differ from its before-table. Refused, with the table left
as it was: a before-table whose entries are not the table's (the call ran from another table), another GPU's
table, an entry a call removed (`epmoe tune` never removes one), and one (key, T) changed by two calls (which of
the two timings holds is not this script's to decide: tune it again from the merged table).
"""
from __future__ import annotations

import argparse
import json
import sys


class MergeError(ValueError):
    """A set of calls whose tables cannot be merged (the message says which file and entry)."""


def _load(path: str) -> dict:
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data.get("entries"), dict):
        raise MergeError(f"{path}: not a tuning table (no 'entries' object)")
    return data


def call_changes(before: dict, after: dict, name: str) -> dict[tuple[str, str], dict]:
    """{(key, T): entry} of what one call wrote: the after-table's entries that differ from its before-table."""
    for key, entry in before["entries"].items():
        gone = sorted(set(entry) - set(after["entries"].get(key, {})), key=int)
        if gone:
            raise MergeError(f"{name}: {key} T={gone[0]} is in the table before the call and not after it")
    return {(key, T): cfg for key, entry in after["entries"].items() for T, cfg in entry.items()
            if before["entries"].get(key, {}).get(T) != cfg}


def merge_calls(table: dict, calls: list[tuple[str, dict, dict]]) -> tuple[dict, list[tuple[str, str, str]]]:
    """The table with each call's changes (calls: (name, before, after)) and what was merged, as (name, key, T).
    Raises MergeError without changing `table`."""
    merged = json.loads(json.dumps(table))
    done: dict[tuple[str, str], str] = {}
    for name, before, after in calls:
        if before["entries"] != table["entries"]:
            key = next((k for k in sorted(set(before["entries"]) | set(table["entries"]))
                        if before["entries"].get(k) != table["entries"].get(k)), None)
            raise MergeError(f"{name}: its table before the call is not this table (first difference: {key})")
        for label, data in (("before", before), ("after", after)):
            if table.get("device") and data.get("device") and data["device"] != table["device"]:
                raise MergeError(f"{name}: its table {label} the call is for {data['device']}, "
                                 f"this one for {table['device']}")
        for (key, T), cfg in call_changes(before, after, name).items():
            if (key, T) in done:
                raise MergeError(f"{key} T={T} was changed by two calls: {done[(key, T)]} and {name}")
            done[(key, T)] = name
            merged["entries"].setdefault(key, {})[T] = cfg
        merged.update({k: v for k, v in after.items() if k != "entries"})
    return merged, [(name, key, T) for (key, T), name in done.items()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Each --call is one device call's tables from gpu_one_h200.sh's tune part.")
    p.add_argument("table", help="the table to merge into (this GPU's table in the package)")
    p.add_argument("--call", nargs=2, action="append", required=True, metavar=("BEFORE", "AFTER"),
                   help="a call's table before and after its tune (repeat for each call)")
    p.add_argument("--check", action="store_true", help="say what would be merged; write nothing")
    args = p.parse_args(argv)
    try:
        table = _load(args.table)
        calls = [(after, _load(before), _load(after)) for before, after in args.call]
        merged, done = merge_calls(table, calls)
    except (MergeError, OSError, json.JSONDecodeError) as e:
        print(f"merge_tune_tables: {e}", file=sys.stderr)
        return 1
    for name, key, T in done:
        cfg = merged["entries"][key][T]
        print(f"{key} T={T}: from {name} (measured_ms {cfg.get('measured_ms')})")
    if not done:
        print("no call changed an entry")
    if not args.check:
        from epmoe.bench.tune import write_table     # each shape's T in order; the file replaced whole
        write_table(args.table, merged)
    return 0


if __name__ == "__main__":
    sys.exit(main())
