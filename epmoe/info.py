"""`epmoe info`: the registered backends, what each declares, and the support matrix."""
from __future__ import annotations

import sys

import torch

from . import contract
from .version import __version__


def _yes(b: bool) -> str:
    return "yes" if b else "no"


def print_info() -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 140)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    console.print(f"[bold]epmoe {__version__}[/bold]  torch {torch.__version__}  GPU: {gpu}")

    t = Table(title="dispatchers (declared capabilities)")
    for col in ("name", "layout", "moves tokens", "host sync", "CUDA graph", "max_tokens",
                "FP8 dispatch", "top-k weight applied in", "in flight", "comm_sms", "devices"):
        t.add_column(col, no_wrap=col in ("name", "host sync", "CUDA graph"))
    for name in contract.DISPATCHERS:
        c = contract.dispatcher_class(name).CAPS
        # a dispatcher that takes a capacity reads nothing back and is capturable only with one
        takes = c.takes_max_tokens and not c.needs_max_tokens
        t.add_row(name, c.layout, _yes(c.communicates), "without one" if takes and c.host_sync else _yes(c.host_sync),
                  "with one" if takes and c.cuda_graph_safe else _yes(c.cuda_graph_safe),
                  "needs" if c.needs_max_tokens else "takes" if takes else "no", _yes(c.fp8_dispatch),
                  c.topk_weight_applied_in, str(c.in_flight), _yes(c.bounded_sms), ",".join(sorted(c.devices)))
    console.print(t)
    for name in contract.DISPATCHERS:
        console.print(f"  {name}: {escape(contract.dispatcher_class(name).CAPS.summary)}")

    t = Table(title="experts backends (declared capabilities)")
    for col in ("name", "layouts", "dtypes", "quant", "FP8 activations", "devices", "CUDA graph",
                "available here"):
        t.add_column(col)
    here = "cuda" if torch.cuda.is_available() else "cpu"
    for name in contract.EXPERTS:
        c = contract.experts_class(name).CAPS
        dtypes = ",".join(sorted(str(d).replace("torch.", "") for d in c.dtypes))
        why = c.available(here) if here in c.devices else f"runs on {','.join(sorted(c.devices))}"
        t.add_row(name, ",".join(sorted(c.layouts)), dtypes, ",".join(sorted(c.quant)), c.fp8_activations,
                  ",".join(sorted(c.devices)), _yes(c.cuda_graph_safe), "yes" if not why else escape(f"no: {why}"))
    console.print(t)
    for name in contract.EXPERTS:
        console.print(f"  {name}: {escape(contract.experts_class(name).CAPS.summary)}")

    rows = contract.support_matrix()
    quants = list(dict.fromkeys(r.quant for r in rows))
    cell = {(r.dispatcher, r.experts, r.device, r.multi_rank, r.quant): r for r in rows}
    reasons: list[str] = []
    short = {contract.HANDOFF_ON_THE_WIRE: "wire", contract.HANDOFF_AFTER_DISPATCH: "after",
             contract.HANDOFF_IN_EXPERTS: "inside"}
    for dev in ("cpu", "cuda"):
        t = Table(title=f"support matrix on {dev}: ok (FP8: who quantizes activations), or the reason's number")
        for col in ("dispatcher", "experts", "ranks", *quants):
            t.add_column(col, justify="left" if col in ("dispatcher", "experts", "ranks") else "center")
        for d in contract.DISPATCHERS:
            for x in contract.EXPERTS:
                for multi in (False, True):
                    values = []
                    for q in quants:
                        r = cell[(d, x, dev, multi, q)]
                        if r.problem is None:
                            how = short.get(r.extra.get("fp8_activations"), "")
                            values.append("[green]ok[/green]" + (f" ({how})" if how else ""))
                        else:
                            if r.problem not in reasons:
                                reasons.append(r.problem)
                            values.append(f"[red]{reasons.index(r.problem) + 1}[/red]")
                    t.add_row(d, x, "EP>1" if multi else "1", *values)
        console.print(t)
    console.print("FP8 activations: wire = the dispatcher quantizes before sending (scales travel along); "
                  "after = the layer quantizes right after dispatch; inside = the experts quantize internally")
    for i, r in enumerate(reasons, 1):
        console.print(f"  {i}. {escape(r)}")
