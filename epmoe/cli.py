"""The `epmoe` command: `info` (backends and the support matrix), `run` (the main job), `bench`, `tune`."""
from __future__ import annotations

import argparse
import importlib
import sys

from .presets import PRESETS

DESCRIPTION = """epmoe: Mixture-of-Experts layers with expert parallelism.

commands:
  info    backends, their declared capabilities and the dispatcher x experts support matrix
  run     build a layer of a model preset with random weights, run it (optionally over N ranks),
          time it and check a sample of its output against the float64 oracle
  bench   benchmarks on a GPU: `bench experts` (expert kernels), `bench dispatch` (dispatch + combine)
  tune    tune the Triton kernel configurations for a shape on this GPU and write the table
"""

RUN_EPILOG = """examples:
  epmoe run                                   # tiny preset, experts over 2 CPU ranks (Gloo), or one rank per GPU
  epmoe run --ranks 1 --backend reference     # one rank, the plain PyTorch experts
  epmoe run --preset deepseek-v3 --experts 16 --shrink 8   # a big preset shrunk to fit this machine
  epmoe run --model ./ckpt --ranks 2 --prompt "Hello"      # a local transformers checkpoint with EP
under torchrun (several machines), leave out --ranks: the ranks come from torchrun's environment."""


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="run one MoE layer (or a checkpoint) and check it against the oracle",
                       description="Build a layer of a named model preset, fill it with random weights, run "
                       "it, time it and compare a sample of its output with the float64 oracle.",
                       epilog=RUN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=list(PRESETS), help="model layer shape (default: tiny)")
    p.add_argument("--tokens", type=int, default=256, help="tokens per rank (default 256)")
    p.add_argument("--dtype", choices=["float32", "fp32", "bfloat16", "bf16", "float16", "fp16"], default=None,
                   help="layer dtype (default: bf16 on GPU, float32 on CPU)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--experts", type=int, default=None, metavar="N",
                   help="shrink the preset to N experts (top_k and groups follow)")
    p.add_argument("--shrink", type=int, default=1, metavar="F",
                   help="divide hidden and intermediate sizes by F to fit a small machine")
    p.add_argument("--ranks", type=int, default=None,
                   help="start N local ranks with the experts split over them (default: one per GPU, or 2 CPU "
                   "ranks over Gloo without a GPU; 1 with --model; under torchrun its ranks)")
    p.add_argument("--dispatcher", default="auto", help="dispatcher backend (see `epmoe info`; default auto)")
    p.add_argument("--backend", default="auto", help="experts backend (see `epmoe info`; default auto)")
    p.add_argument("--max-tokens-per-rank", type=int, default=None,
                   help="capacity for the low_latency dispatcher (default: --tokens; with --model: the prompt's "
                   "length)")
    p.add_argument("--iters", type=int, default=10, help="timed forward passes (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed passes first (default 2)")
    p.add_argument("--check-tokens", type=int, default=64,
                   help="tokens per rank compared with the oracle (0: check nothing, and say so)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before hung ranks are killed")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the per-rank report as JSON")
    p.add_argument("--model", default=None, metavar="PATH",
                   help="a local transformers checkpoint directory to patch and run instead of a preset")
    p.add_argument("--prompt", default="The capital of France is", help="prompt for --model")
    p.add_argument("--max-new-tokens", type=int, default=16, help="greedy tokens to generate for --model")
    p.add_argument("--allow-pickle", action="store_true",
                   help="let --model load pickled .bin/.pt checkpoints (they can run code; safetensors cannot)")
    p.set_defaults(func=_cmd_run)


def _cmd_run(args) -> int:
    for name, least in (("tokens", 1), ("iters", 1), ("check_tokens", 0), ("warmup", 0)):
        if getattr(args, name) < least:
            raise SystemExit(f"epmoe run: --{name.replace('_', '-')} must be >= {least}")
    if args.ranks is not None and args.ranks < 1:
        raise SystemExit("epmoe run: --ranks must be >= 1")
    if args.model:
        return _optional("epmoe.integration.run_model", "transformers integration").main(args)
    from .main_job import main
    return main(args)


def _cmd_info(args) -> int:
    from .info import print_info
    print_info()
    return 0


def _optional(module: str, what: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise SystemExit(f"epmoe: {what} is not available ({exc})")


def _add_plugin(sub, name: str, module: str, help_text: str) -> None:
    """A subcommand whose parser and body live in `module` (configure_parser(p), main(args))."""
    p = sub.add_parser(name, help=help_text, description=help_text)
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        p.set_defaults(func=lambda a, exc=exc: sys.exit(f"epmoe {name}: not available here ({exc})"))
        return
    mod.configure_parser(p)
    p.set_defaults(func=mod.main)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="epmoe", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from .version import __version__
    parser.add_argument("--version", action="version", version=f"epmoe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{info,run,bench,tune}")
    p = sub.add_parser("info", help="backends, capabilities and the support matrix",
                       description="Print every dispatcher and experts backend with its declared capabilities, "
                       "and the support matrix the contract check enforces (the tests enumerate the same).")
    p.set_defaults(func=_cmd_info)
    _add_run(sub)
    bench = sub.add_parser("bench", help="GPU benchmarks (experts kernels, dispatch + combine)",
                           description="GPU benchmarks; results go to benchmarks/results/ as JSON (and PNG).")
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="{experts,dispatch,layer}")
    _add_plugin(bench_sub, "experts", "epmoe.bench.experts", "time every GPU experts backend on model presets")
    _add_plugin(bench_sub, "dispatch", "epmoe.bench.dispatch", "time dispatch + combine per dispatcher vs NCCL")
    _add_plugin(bench_sub, "layer", "epmoe.bench.layer", "time the whole MoE layer with EP per dispatcher vs one rank")
    bench.set_defaults(func=lambda a: (bench.print_help(), 2)[1])
    _add_plugin(sub, "tune", "epmoe.kernels.tune", "tune Triton kernel configurations for a shape on this GPU")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        argv = ["run"]  # the main job with its embedded default
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
