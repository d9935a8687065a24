"""One row per profiled kernel from Nsight Compute's details page (`ncu --page details`, or the log of an ncu run
that printed it), labelled with the lines a benchmark printed for its launches, in order:

    python3 benchmarks/ncu_details_table.py LOG [--labels REGEX]

A kernel's row: elapsed cycles, SM clock, duration, SM busy (the speed-of-light compute figure), L2 and DRAM
throughput (% of peak), DRAM bytes (memory throughput x duration), L2 hit rate, and the cycles between two
issued instructions, where the sections that give them ran. Labels are the log's lines that match REGEX (by
default `profile_ws_gemm.py`'s, one per profiled launch), paired with the kernels in order; where their counts
differ the rows are printed unlabelled and the script exits 1, since an order that does not pair up says
nothing about which launch is which.
"""
from __future__ import annotations

import argparse
import re
import sys

KERNEL = re.compile(r"^\s{2}(\S.*?) \(\d+, \d+, \d+\)x\(\d+, \d+, \d+\), Context")
METRIC = re.compile(r"^\s{4}(\S.*?)\s{2,}(\S+(?:/\S+)?)?\s+([\d,.]+)\s*$")
# (column, ncu metric name, what it measures: its value is brought to the column's unit from the unit ncu printed)
COLUMNS = [("cycles", "Elapsed Cycles", "cycles"), ("GHz", "SM Frequency", "GHz"), ("ms", "Duration", "ms"),
           ("SM busy %", "Compute (SM) Throughput", "%"), ("L2 %", "L2 Cache Throughput", "%"),
           ("DRAM %", "DRAM Throughput", "%"), ("DRAM TB/s", "Memory Throughput", "TB/s"),
           ("L2 hit %", "L2 Hit Rate", "%"), ("cycles/issue", "Warp Cycles Per Issued Instruction", "cycles")]
# ncu scales its units to the value (Gbyte/s below a TB/s, us below a ms, ...): each unit it prints, as a factor
# to the column's unit
UNITS = {
    "cycles": {"cycle": 1.0, "": 1.0},
    "%": {"%": 1.0},
    "GHz": {"ghz": 1.0, "mhz": 1e-3, "khz": 1e-6, "hz": 1e-9},
    "ms": {"s": 1e3, "second": 1e3, "ms": 1.0, "msecond": 1.0, "us": 1e-3, "usecond": 1e-3, "ns": 1e-6,
           "nsecond": 1e-6},
    "TB/s": {"tbyte/s": 1.0, "gbyte/s": 1e-3, "mbyte/s": 1e-6, "kbyte/s": 1e-9, "byte/s": 1e-12},
}
DEFAULT_LABELS = r"^(.+?(?:group_m=|torch\._grouped_mm).*?): [\d.]+ ms"


def kernels(lines: list[str]) -> list[dict]:
    """Each profiled kernel's name and metrics ((name, unit) -> value), in the order ncu printed them."""
    found = []
    for line in lines:
        m = KERNEL.match(line)
        if m:
            found.append({"name": m.group(1), "metrics": {}})
            continue
        m = METRIC.match(line)
        if m and found:
            name, unit, value = m.group(1).strip(), m.group(2) or "", float(m.group(3).replace(",", ""))
            found[-1]["metrics"].setdefault((name, unit), value)
    return found


def row(kernel: dict) -> dict:
    """The table's columns of one kernel, in the columns' units (None where its sections did not give them, or
    gave them in a unit not known here)."""
    out = {}
    for column, name, kind in COLUMNS:
        hits = [v * UNITS[kind][u.lower()] for (n, u), v in kernel["metrics"].items()
                if n == name and u.lower() in UNITS[kind]]
        out[column] = hits[0] if hits else None
    out["DRAM GB"] = (out["DRAM TB/s"] * out["ms"] if out["DRAM TB/s"] is not None and out["ms"] is not None
                      else None)
    return out


def fmt(value) -> str:
    if value is None:
        return "-"
    if value >= 1e5:
        return f"{value:,.0f}"
    return f"{value:.3g}" if value < 100 else f"{value:.1f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("log", help="ncu's details page, or a log that holds it and the benchmark's lines")
    p.add_argument("--labels", default=DEFAULT_LABELS,
                   help="a regular expression whose first matching group (or whole match) labels a launch; its matches in "
                        "the log are paired with the kernels in order (default: profile_ws_gemm.py's lines)")
    args = p.parse_args(argv)
    with open(args.log, errors="replace") as f:
        lines = f.read().splitlines()
    found = kernels(lines)
    pattern = re.compile(args.labels)
    # a label: the match's first group that took part in it (alternatives each with their own group), or all of it
    labels = [next((g for g in m.groups() if g is not None), m.group(0)) for m in map(pattern.match, lines) if m]
    paired = len(labels) == len(found)
    columns = [c for c, _, _ in COLUMNS if c != "DRAM TB/s"] + ["DRAM GB"]
    print("| launch | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for i, kernel in enumerate(found):
        r = row(kernel)
        label = labels[i].strip() if paired else f"{kernel['name']} #{i}"
        print(f"| {label} | " + " | ".join(fmt(r[c]) for c in columns) + " |")
    if not paired:
        print(f"ncu_details_table: {len(found)} kernels but {len(labels)} labels: rows left unlabelled",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
