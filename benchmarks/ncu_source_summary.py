"""Where a kernel's warps stall, instruction by instruction: reads the source page of an Nsight Compute
report exported as CSV (`ncu -i REPORT --page source --csv --print-source sass > FILE`) and prints, for
each kernel in it, the SASS instructions holding the most warp-stall samples with the reasons sampled
there, and the samples summed over each opcode.

    python3 benchmarks/ncu_source_summary.py FILE [--top 40]

The column names are those of the CSV (they vary with the ncu version): the sample count is the column
whose name starts "Warp Stall Sampling (All", the reasons are the columns named "stall_*" or ending in
"(All Samples)" beside it. Rows that do not parse (section headers) start a new table.
"""
from __future__ import annotations

import argparse
import csv
import sys
from collections import Counter


def _number(text: str) -> float:
    try:
        return float(text.replace(",", "")) if text else 0.0
    except ValueError:
        return 0.0


def tables(path: str):
    """(header, rows) for each table in the CSV: a row whose fields name a samples column starts one."""
    header, rows = None, []
    with open(path, newline="") as f:
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("csv", help="ncu -i REPORT --page source --csv --print-source sass > this file")
    p.add_argument("--top", type=int, default=40, help="instructions to list per kernel (default %(default)s)")
    args = p.parse_args(argv)
    found = False
    for i, (header, rows) in enumerate(tables(args.csv)):
        found = True
        print(f"== table {i}")
        print(summarize(header, rows, args.top))
    if not found:
        print(f"{args.csv}: no table with a 'Warp Stall Sampling (All ...' column", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
