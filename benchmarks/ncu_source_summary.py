"""Where a kernel's warps stall, instruction by instruction: reads the source page of an Nsight Compute
report exported as CSV (`ncu -i REPORT --page source --csv --print-source sass > FILE`) and prints, for
each kernel in it, the SASS instructions holding the most warp-stall samples with the reasons sampled
there, the samples summed over each opcode, and (where the rows carry addresses) the samples of each
tensor-core loop beside the rest of the loop around it: each innermost loop whose body issues a GMMA (a
K loop), the code of the enclosing loop before it (a tile's set-up) and after it (its epilogue).

    python3 benchmarks/ncu_source_summary.py FILE [--top 40]

The column names are those of the CSV (they vary with the ncu version): the sample count is the column
whose name starts "Warp Stall Sampling (All", the reasons are the columns named "stall_*" or ending in
"(All Samples)" beside it. Rows that do not parse (section headers) start a new table.
"""
from __future__ import annotations

import argparse
import csv
import gzip
import os
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from epmoe.kernels.xcompile import mma_loops  # noqa: E402  (the loop finder the compile checks use)


def _number(text: str) -> float:
    try:
        return float(text.replace(",", "")) if text else 0.0
    except ValueError:
        return 0.0


def tables(path: str):
    """(header, rows) for each table in the CSV: a row whose fields name a samples column starts one."""
    header, rows = None, []
    with (gzip.open(path, "rt", newline="") if path.endswith(".gz") else open(path, newline="")) as f:
        for fields in csv.reader(f):
            if any(name.startswith("Warp Stall Sampling (All") for name in fields):
                if header is not None and rows:
                    yield header, rows
                header, rows = fields, []
            elif header is not None and len(fields) == len(header):
                rows.append(dict(zip(header, fields)))
    if header is not None and rows:
        yield header, rows


def summarize(header, rows, top: int) -> str:
    samples_col = next(name for name in header if name.startswith("Warp Stall Sampling (All"))
    source_col = next((name for name in header if name.lower() == "source"), header[min(1, len(header) - 1)])
    address_col = next((name for name in header if name.lower() == "address"), None)
    reason_cols = [name for name in header if name != samples_col and
                   (name.startswith("stall_") or "Not-issued" in name or name.endswith("(All Samples)"))]
    total = sum(_number(r[samples_col]) for r in rows)
    lines = [f"{len(rows)} instructions, {total:.0f} warp-stall samples"]
    if total == 0:
        return "\n".join(lines)
    by_opcode = Counter()
    for r in rows:
        by_opcode[r[source_col].split()[0] if r[source_col].split() else "?"] += _number(r[samples_col])
    lines.append("by opcode: " + ", ".join(f"{op} {100 * n / total:.1f}%" for op, n in by_opcode.most_common(12)))
    lines.append(f"top {top} instructions (share of samples; reasons with >= 5% of the instruction's samples):")
    for r in sorted(rows, key=lambda r: -_number(r[samples_col]))[:top]:
        n = _number(r[samples_col])
        reasons = sorted(((c, _number(r[c])) for c in reason_cols), key=lambda cv: -cv[1])
        why = ", ".join(f"{c} {v:.0f}" for c, v in reasons if n and v >= 0.05 * n)
        where = f"{r[address_col]} " if address_col else ""
        lines.append(f"  {100 * n / total:5.1f}%  {where}{r[source_col][:90]}   [{why}]")
    return "\n".join(lines)


def regions(header, rows) -> str:
    """Each K loop (innermost loop issuing a GMMA) with the set-up before it and the epilogue after it
    within the smallest enclosing loop: share of samples and top reasons of each."""
    samples_col = next(name for name in header if name.startswith("Warp Stall Sampling (All"))
    source_col = next((name for name in header if name.lower() == "source"), header[min(1, len(header) - 1)])
    address_col = next((name for name in header if name.lower() == "address"), None)
    reason_cols = [name for name in header if name.startswith("stall_") and "Not Issued" not in name]
    if address_col is None:
        return "no addresses: no regions"
    try:
        addrs = [int(r[address_col], 16) for r in rows]
    except ValueError:
        return "addresses do not parse: no regions"
    code = [r[source_col] for r in rows]
    samples = [_number(r[samples_col]) for r in rows]
    total = sum(samples) or 1.0
    loops, k_loops = mma_loops(addrs, code)

    def describe(name, first, last):
        n = sum(samples[first:last + 1])
        why = Counter()
        for r in rows[first:last + 1]:
            for c in reason_cols:
                why[c] += _number(r[c])
        top = ", ".join(f"{c[6:]} {100 * v / n:.0f}%" for c, v in why.most_common(5) if n and v)
        return f"  {name}: {last - first + 1} instructions, {100 * n / total:.1f}% of samples [{top}]"

    lines = []
    for f, l in k_loops:
        outer = [(f2, l2) for f2, l2 in loops if f2 <= f and l2 > l]
        lines.append(f"K loop at {rows[f][address_col]}:")
        if outer:
            of, ol = min(outer, key=lambda fl: fl[1] - fl[0])
            if of < f:
                lines.append(describe("before it in the tile loop (set-up)", of, f - 1))
            lines.append(describe("the K loop", f, l))
            lines.append(describe("after it in the tile loop (epilogue)", l + 1, ol))
        else:
            lines.append(describe("the K loop", f, l))
    return "\n".join(lines) if lines else "no loop issuing a GMMA"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("csv", help="ncu -i REPORT --page source --csv --print-source sass > this file (or it gzipped)")
    p.add_argument("--top", type=int, default=40, help="instructions to list per kernel (default %(default)s)")
    p.add_argument("--source-log", default=None,
                   help="the log of the run that made the CSV: its '#' header lines (command, commit, GPU, "
                        "versions, date) are printed first, with this command and its date after them")
    args = p.parse_args(argv)
    if args.source_log:
        with open(args.source_log) as f:
            for line in f:
                if line.startswith("# ") and not line.startswith("# exit code"):
                    print("# source run " + line[2:].rstrip())
        import datetime
        import subprocess
        here = os.path.dirname(os.path.abspath(__file__))
        commit = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip() or "unknown"
        print(f"# summary command: python3 benchmarks/ncu_source_summary.py {' '.join(argv or sys.argv[1:])}")
        print(f"# summary commit: {commit}")
        print(f"# summary date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}")
    found = False
    for i, (header, rows) in enumerate(tables(args.csv)):
        found = True
        print(f"== table {i}")
        print(summarize(header, rows, args.top))
        print(regions(header, rows))
    if not found:
        print(f"{args.csv}: no table with a 'Warp Stall Sampling (All ...' column", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
