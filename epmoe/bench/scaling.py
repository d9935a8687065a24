"""Scaling across rank counts: the JSONs of `epmoe bench layer` and `epmoe bench dispatch` for several
rank counts (2, 4, 8, ...) -> one markdown table and one plot.

    python -m epmoe.bench.scaling benchmarks/results/ --out-dir benchmarks/results --stem scaling_h200
    python -m epmoe.bench.scaling layer_*_2x_*.json layer_*_4x_*.json dispatch_*.json --no-plot

Arguments are JSON files or directories (every `*.json` in them); files are told apart by their
`benchmark` field ("moe-layer" or "dispatch+combine"), others are ignored. Where several files hold the
same configuration on the same rank count, the newest (`environment.when`) is used, so runs split
over several calls (BF16 first, FP8 later) combine. Scaling is a ratio, so the
header names every device and host the numbers come from and warns when they differ (measure every rank
count on one machine) or when they are CPU (Gloo) wall-clock times, which are not performance results.

The plot (PNG, matplotlib: `pip install matplotlib`, or the `bench` extra) has one panel per preset:
total tokens/s of the whole layer against the rank count per dispatcher, format and T, with the single
device (`local`) doing the same total batch as a dashed line; and a panel for dispatch + combine time
against the rank count with NCCL all_to_all_single moving the same bytes.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

LAYER = "moe-layer"
DISPATCH = "dispatch+combine"


class MissingMatplotlib(RuntimeError):
    """matplotlib is not installed (the `bench` extra): the table is written, the plot is not."""


# ------------------------------------------------------------------------------------------- loading
def _expand(paths) -> list[str]:
    out = []
    for p in paths:
        if os.path.isdir(p):
            out += sorted(glob.glob(os.path.join(p, "*.json")))
        else:
            out.append(p)
    return out


def load_reports(paths) -> dict:
    """{"moe-layer": [report, ...], "dispatch+combine": [...]}, each list oldest first (`environment.when`)."""
    found: dict = {LAYER: [], DISPATCH: []}
    for path in _expand(paths):
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as exc:
            raise ValueError(f"scaling: cannot read {path}: {exc}")
        if not isinstance(data, dict) or data.get("benchmark") not in found:
            continue
        env = data.get("environment", {})
        if not isinstance(env.get("world_size", env.get("ranks")), int):
            raise ValueError(f"scaling: {path} has no environment.world_size")
        data["_path"] = path
        found[data["benchmark"]].append(data)
    for reports in found.values():
        reports.sort(key=lambda rep: str(rep["environment"].get("when", "")))
    return found


def summarize(paths) -> dict:
    """Rows of both benchmarks keyed by configuration, each with its value per rank count. Where several
    files measured the same configuration on the same rank count, the newest file's row is used (so a
    run split over several calls, e.g. BF16 then FP8, combines)."""
    found = load_reports(paths)
    if not found[LAYER] and not found[DISPATCH]:
        raise ValueError(f"scaling: no `epmoe bench layer` or `epmoe bench dispatch` JSON among {list(paths)}")
    layer: dict = {}
    local: dict = {}
    dispatch: dict = {}
    origin: dict = {}                       # (table, key, ranks) -> the report its row came from
    for rep in found[LAYER]:
        ranks = rep["environment"].get("world_size", rep["environment"].get("ranks"))
        for r in rep.get("rows", []):
            if r.get("kind") == "local":
                if "ms" in r:
                    key = (r["preset"], r["format"], r["tokens_per_rank"])
                    local.setdefault(key, {})[ranks] = r
                    origin[("local", key, ranks)] = ("layer", ranks, rep)
                continue
            # two micro-batches per forward, a bound on the transfer kernels' SMs, and a layer before / after
            # its EPLB rebalance are configurations of their own
            name = r["dispatcher"] + (f" ({r['micro_batches']} micro-batches)" if r.get("micro_batches", 1) > 1 else "")
            if r.get("comm_sms"):
                name += f" ({r['comm_sms']} comm SMs)"
            if r.get("eplb"):
                name += f" (eplb {r['eplb']})"
            key = (r["preset"], r["format"], name, r["tokens_per_rank"])
            layer.setdefault(key, {})[ranks] = r
            origin[("layer", key, ranks)] = ("layer", ranks, rep)
    for rep in found[DISPATCH]:
        ranks = rep["environment"].get("world_size", rep["environment"].get("ranks"))
        for r in rep.get("rows", []):
            # the default configuration (dispatcher="auto", no capacity, eager) is a row of its own
            name = r["dispatcher"] if r.get("config", "best") == "best" else f"{r['dispatcher']} ({r['config']})"
            key = (name, r["tokens_per_rank"])
            dispatch.setdefault(key, {})[ranks] = r
            origin[("dispatch", key, ranks)] = ("dispatch", ranks, rep)
    used = {id(rep): (kind, k, rep) for kind, k, rep in origin.values()}
    envs = sorted(used.values(), key=lambda t: (t[0], t[1], str(t[2]["environment"].get("when", ""))))
    ranks = sorted({k for _, k, _ in envs})
    devices = sorted({str(rep["environment"].get("device")) for _, _, rep in envs})
    hosts = sorted({str(rep["environment"].get("host")) for _, _, rep in envs})
    backends = sorted({str(rep["environment"].get("backend")) for _, _, rep in envs})
    warnings = []
    if len(devices) > 1 or len(hosts) > 1:
        warnings.append(f"the numbers come from more than one device or host ({', '.join(devices)}; "
                        f"{', '.join(hosts)}): ratios across rank counts are only meaningful on one machine")
    if "gloo" in backends:
        warnings.append("some numbers are CPU (Gloo) wall-clock times: they check the code, they are not "
                        "performance results")
    sources = [{"benchmark": kind, "ranks": k, "path": rep["_path"], "device": rep["environment"].get("device"),
                "host": rep["environment"].get("host"), "when": rep["environment"].get("when"),
                "torch": rep["environment"].get("torch"), "triton": rep["environment"].get("triton")}
               for kind, k, rep in envs]
    return {"ranks": ranks, "devices": devices, "hosts": hosts, "warnings": warnings, "sources": sources,
            "layer": layer, "local": local, "dispatch": dispatch}


# ------------------------------------------------------------------------------------------ markdown
def _f(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _cell(row: dict | None, key: str, spec: str) -> str:
    if row is None:
        return "-"
    if "error" in row:
        return "error"
    if "skipped" in row:
        return "skipped"
    return _f(row.get(key), spec)


def markdown(summary: dict) -> str:
    ranks = summary["ranks"]
    src = summary["sources"]
    versions = sorted({f"torch {s['torch']}, triton {s['triton']}" for s in src})
    lines = [f"# Expert-parallel scaling: {', '.join(summary['devices'])} ({', '.join(summary['hosts'])})", "",
             f"Rank counts: {', '.join(map(str, ranks))}. {'; '.join(versions)}.", ""]
    for w in summary["warnings"]:
        lines += [f"**Warning:** {w}.", ""]
    at = lambda name: " | ".join(f"{name} @{k}" for k in ranks)  # noqa: E731
    if summary["layer"]:
        lines += ["## Whole MoE layer forward (`epmoe bench layer`)", "",
                  "ms: median forward time per rank; tok/s: all ranks' tokens per second (slowest rank's time); "
                  "speedup: one device running the layer on the same total batch (`local`, all experts) / "
                  "this step; floor: the experts' roofline time (weight bytes / copy rate, FLOPs / matmul rate; "
                  "no communication) / this step.", "",
                  f"| preset | format | dispatcher | experts | T/rank | {at('ms')} | {at('tok/s')} | "
                  f"{at('speedup')} | {at('floor')} | oracle |",
                  "|" + "---|" * (6 + 4 * len(ranks))]
        for (preset, fmt, d, T), per in sorted(summary["layer"].items()):
            any_row = next(iter(per.values()))
            checks = [r["check"]["ok"] for r in per.values() if "check" in r]
            oracle = "-" if not checks else ("ok" if all(checks) else "FAILED")
            lines.append(f"| {preset} | {fmt} | {d} | {any_row.get('experts', '-')} | {T} | "
                         + " | ".join(_cell(per.get(k), "ms", ".3f") for k in ranks) + " | "
                         + " | ".join(_cell(per.get(k), "tokens_per_s_total", ".3g") for k in ranks) + " | "
                         + " | ".join(_cell(per.get(k), "speedup_vs_local", ".2f") for k in ranks) + " | "
                         + " | ".join(_cell(per.get(k), "floor_fraction", ".2f") for k in ranks)
                         + f" | {oracle} |")
        skipped = sorted({(k[0], k[1], k[2], r.get("skipped") or r.get("error"))
                          for k, per in summary["layer"].items() for r in per.values()
                          if "skipped" in r or "error" in r})
        if skipped:
            lines += ["", "Not measured:"]
            lines += [f"- {p} {f} {d}: {why}" for p, f, d, why in skipped]
        lines.append("")
    if summary["dispatch"]:
        lines += ["## Dispatch + combine (`epmoe bench dispatch`)", "",
                  "ms: dispatch + combine at the slower rank; x NCCL: that time / NCCL all_to_all_single moving "
                  "the same bytes, timed the same way; GB/s: dispatch bytes sent to peers per second; "
                  "(default): dispatcher=\"auto\", no capacity, eager.", "",
                  f"| dispatcher | T/rank | {at('ms')} | {at('x NCCL')} | {at('GB/s')} |",
                  "|" + "---|" * (2 + 3 * len(ranks))]
        for (d, T), per in sorted(summary["dispatch"].items()):
            lines.append(f"| {d} | {T} | "
                         + " | ".join(_cell(per.get(k), "total_ms", ".3f") for k in ranks) + " | "
                         + " | ".join(_cell(per.get(k), "total_vs_nccl", ".2f") for k in ranks) + " | "
                         + " | ".join(_cell(per.get(k), "dispatch_GBps_to_peers", ".1f") for k in ranks) + " |")
        lines.append("")
    lines += ["## Sources", ""]
    lines += [f"- {s['benchmark']} @{s['ranks']}: `{os.path.basename(s['path'])}` ({s['device']}, {s['when']})"
              for s in src]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- plot
def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise MissingMatplotlib(f"the scaling plot needs matplotlib ({exc}); install it with `pip install "
                                "matplotlib` (or the `bench` extra), or write the table only (--no-plot)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def write_plot(summary: dict, path: str) -> str:
    plt = _pyplot()
    presets = list(dict.fromkeys(k[0] for k in summary["layer"]))
    panels = len(presets) + (1 if summary["dispatch"] else 0)
    if panels == 0:
        raise ValueError("scaling: nothing to plot")
    cols = min(panels, 2)
    nrows = -(-panels // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(7 * cols, 4.8 * nrows), squeeze=False)
    axes = list(axes.flat)
    styles = {"allgather": ":", "alltoall": "-", "low_latency": "--"}
    for ax, preset in zip(axes, presets):
        for (p, fmt, d, T), per in sorted(summary["layer"].items()):
            if p != preset:
                continue
            pts = sorted((k, r["tokens_per_s_total"]) for k, r in per.items() if "tokens_per_s_total" in r)
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", linestyle=styles.get(d, "-"),
                        label=f"{d} {fmt} T={T}")
        # one device doing the same total batch (ranks x T tokens), measured in the same runs
        for fmt, T in sorted({(k[1], k[3]) for k in summary["layer"] if k[0] == preset}):
            pts = []
            for k in summary["ranks"]:
                r = summary["local"].get((preset, fmt, k * T), {}).get(k)
                if r is not None:
                    pts.append((k, k * T / (r["ms"] * 1e-3)))
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], color="gray", linestyle="-.", marker="x",
                        label=f"1 device, same batch ({fmt} T={T}/rank)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(summary["ranks"], [str(k) for k in summary["ranks"]])
        ax.set_xlabel("ranks (one GPU each)")
        ax.set_ylabel("tokens/s, all ranks")
        ax.set_title(f"{preset}: whole MoE layer forward")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    if summary["dispatch"]:
        ax = axes[len(presets)]
        for (d, T), per in sorted(summary["dispatch"].items()):
            pts = sorted((k, r["total_ms"]) for k, r in per.items() if "total_ms" in r)
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", linestyle=styles.get(d, "-"),
                        label=f"{d} T={T}")
            nccl = sorted((k, r["nccl_total_ms"]) for k, r in per.items() if "nccl_total_ms" in r)
            if nccl and d == "alltoall":
                ax.plot([x for x, _ in nccl], [y for _, y in nccl], color="gray", linestyle="-.", marker="x",
                        label=f"NCCL all_to_all_single, alltoall's bytes, T={T}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(summary["ranks"], [str(k) for k in summary["ranks"]])
        ax.set_xlabel("ranks (one GPU each)")
        ax.set_ylabel("dispatch + combine ms")
        ax.set_title("dispatch + combine")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    for ax in axes[panels:]:
        ax.axis("off")
    title = f"Expert parallelism: {', '.join(summary['devices'])}"
    if summary["warnings"]:
        title += " (see warnings in the table)"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(paths, out_dir: str, stem: str | None = None, plot: bool = True) -> list[str]:
    """Markdown (always) and PNG (when matplotlib is there; a note on stderr otherwise). Returns paths."""
    summary = summarize(paths)
    if stem is None:
        slug = "-".join("".join(c if c.isalnum() else "-" for c in d).strip("-").lower() for d in summary["devices"])
        stem = f"scaling_{slug}_{'-'.join(map(str, summary['ranks']))}"
    os.makedirs(out_dir, exist_ok=True)
    md = os.path.join(out_dir, stem + ".md")
    with open(md, "w") as f:
        f.write(markdown(summary))
    written = [md]
    if plot:
        try:
            written.append(write_plot(summary, os.path.join(out_dir, stem + ".png")))
        except MissingMatplotlib as exc:
            print(f"scaling: no plot: {exc}", file=sys.stderr)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m epmoe.bench.scaling", description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+", help="JSON files or directories of `epmoe bench layer` / `bench dispatch`")
    ap.add_argument("--out-dir", default=os.path.join("benchmarks", "results"), help="default: %(default)s")
    ap.add_argument("--stem", default=None, help="file name without extension (default: scaling_<device>_<ranks>)")
    ap.add_argument("--no-plot", action="store_true", help="write the markdown table only")
    args = ap.parse_args(argv)
    try:
        summary = summarize(args.paths)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.no_plot:
        try:
            _pyplot()
        except MissingMatplotlib as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    written = write_report(args.paths, args.out_dir, args.stem, plot=not args.no_plot)
    for w in written:
        print(f"wrote {w}")
    for w in summary["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
