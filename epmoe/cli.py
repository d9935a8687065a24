"""The `epmoe` command: `info` (backends and the support matrix), `run` (the main job), `bench`, `tune`.

Usage mistakes are caught here, in the launching process, before any rank starts: `epmoe <command>:
<the flag and the fix>` on stderr and exit code 2 (see `epmoe.usage`)."""
from __future__ import annotations

import argparse
import importlib
import sys

from .bench.routings import add_routing_flags
from .bench.run_env import RESULTS_DIR_HELP
from .log import configure_cli_logging
from .presets import PRESETS
from .testing.distributed import RanksFailed
from .usage import (UsageError, add_overlap_flags, add_redundant_experts_flag, add_verbosity, at_least,
                    forget_parsing_state, refuse_ranks_under_torchrun)

DESCRIPTION = """epmoe: Mixture-of-Experts layers with expert parallelism.

commands:
  info    backends, their declared capabilities and the dispatcher x experts support matrix
  run     build a layer of a model preset with random weights, run it (optionally over N ranks),
          time it and check a sample of its output against the float64 oracle
  bench   benchmarks: `bench experts` (expert kernels, GPU), `bench dispatch` (dispatch + combine vs NCCL),
          `bench layer` (the whole EP layer per rank count vs one rank)
  tune    tune the Triton kernel configurations for a shape on this GPU and write the table
"""

RUN_EPILOG = """examples:
  epmoe run                                   # tiny preset, experts over 2 CPU ranks (Gloo), or one rank per GPU
  epmoe run --ranks 1 --backend reference     # one rank, the plain PyTorch experts
  epmoe run --preset deepseek-v3 --experts 16 --shrink 8   # a big preset shrunk to fit this machine
  epmoe run --model ./ckpt --ranks 2 --prompt "Hello"      # a local transformers checkpoint with EP
  epmoe run --preset qwen3-30b-a3b --experts 16 --top-k 4  # fewer experts, and fewer per token
  epmoe run --ranks 4 --experts 64 --top-k 4 --routing skewed --redundant-experts 8   # EPLB on skewed routing
  epmoe run --preset qwen3-30b-a3b --tokens 4096 --micro-batches 2 --comm-sms 24   # overlap (GPUs, symm dispatcher)
under torchrun (several machines), leave out --ranks: the ranks come from torchrun's environment, e.g.
  torchrun --nproc_per_node 2 -m epmoe run --preset mixtral-8x7b --shrink 8
progress goes to stderr (rank 0 only): -q for none, -v for more."""


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="run one MoE layer (or a checkpoint) and check it against the oracle",
                       description="Build a layer of a named model preset, fill it with random weights, run "
                       "it, time it and compare a sample of its output with the float64 oracle.",
                       epilog=RUN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=list(PRESETS), help="model layer shape (default: tiny)")
    p.add_argument("--tokens", type=int, default=256, help="tokens per rank (default 256)")
    p.add_argument("--dtype", choices=["float32", "fp32", "bfloat16", "bf16", "float16", "fp16"], default=None,
                   help="layer dtype (default: bf16 on GPU, float32 on CPU)")
    p.add_argument("--device", default="auto", help="auto (default: cuda if present), cpu, cuda or cuda:N")
    p.add_argument("--experts", type=int, default=None, metavar="N",
                   help="shrink the preset to N experts (groups follow; N must exceed the preset's top_k unless "
                   "--top-k is given)")
    p.add_argument("--top-k", type=int, default=None, metavar="K", help="experts per token (default: the preset's)")
    p.add_argument("--shrink", type=int, default=1, metavar="F",
                   help="divide hidden and intermediate sizes by F to fit a small machine")
    p.add_argument("--ranks", type=int, default=None,
                   help="start N local ranks with the experts split over them (default: one per GPU, or 2 CPU "
                   "ranks over Gloo without a GPU; 1 with --model; under torchrun its ranks)")
    p.add_argument("--dispatcher", default="auto", help="dispatcher backend (see `epmoe info`; default auto)")
    p.add_argument("--backend", default="auto", help="experts backend (see `epmoe info`; default auto)")
    p.add_argument("--max-tokens-per-rank", type=int, default=None,
                   help="capacity of a fixed-capacity dispatcher (low_latency, symm_low_latency; default: --tokens; "
                   "with --model: the prompt's length); symm_high_throughput takes it too (fixed buffers, no host "
                   "read)")
    add_routing_flags(p, default="random")
    add_redundant_experts_flag(p, "EPLB: R extra expert slots for replicas of hot experts; after the timed passes "
                               "the layer rebalances from the measured load and is timed again (max/mean rank load "
                               "before and after is printed)")
    add_overlap_flags(p)
    p.add_argument("--iters", type=int, default=10, help="timed forward passes (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed passes first (default 2)")
    p.add_argument("--check-tokens", type=int, default=64,
                   help="tokens per rank compared with the oracle (0: check nothing, and say so)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and tokens (default 0)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before hung ranks are killed")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the per-rank report as JSON")
    p.add_argument("--model", default=None, metavar="PATH",
                   help="a local transformers checkpoint directory to patch and run instead of a preset")
    p.add_argument("--prompt", default="The capital of France is", help="prompt for --model")
    p.add_argument("--max-new-tokens", type=int, default=16, help="greedy tokens to generate for --model")
    p.add_argument("--allow-pickle", action="store_true",
                   help="let --model load pickled .bin/.pt checkpoints (they can run code; safetensors cannot)")
    add_verbosity(p)
    p.set_defaults(func=_cmd_run)


def _cmd_run(args) -> int:
    for name, least in (("tokens", 1), ("iters", 1), ("check_tokens", 0), ("warmup", 0), ("ranks", 1),
                        ("experts", 1), ("top_k", 1), ("shrink", 1), ("max_tokens_per_rank", 1),
                        ("max_new_tokens", 1), ("redundant_experts", 0), ("zipf_exponent", 0), ("comm_sms", 1)):
        at_least("--" + name.replace("_", "-"), getattr(args, name), least)
    refuse_ranks_under_torchrun(args.ranks)
    if args.model and (args.redundant_experts is not None or args.routing != "random"):
        raise UsageError("--redundant-experts and --routing act on preset layers; with --model the checkpoint's "
                         "router decides (leave them out)")
    if args.model and (args.micro_batches != 1 or args.comm_sms is not None):
        raise UsageError("--micro-batches and --comm-sms act on preset layers; leave them out with --model")
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
    add_verbosity(p)
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
    add_verbosity(p)
    p.set_defaults(func=_cmd_info)
    _add_run(sub)
    bench = sub.add_parser("bench", help="benchmarks: experts kernels, dispatch + combine, the whole EP layer",
                           description="Benchmarks: `experts` (expert kernels, GPU), `dispatch` (dispatch + combine "
                           "vs NCCL), `layer` (the whole EP layer per rank count). Results go as JSON (and PNG) "
                           f"to {RESULTS_DIR_HELP}, or where --output says.")
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="{experts,dispatch,layer}")
    _add_plugin(bench_sub, "experts", "epmoe.bench.experts", "time every GPU experts backend on model presets")
    _add_plugin(bench_sub, "dispatch", "epmoe.bench.dispatch", "time dispatch + combine per dispatcher vs NCCL")
    _add_plugin(bench_sub, "layer", "epmoe.bench.layer", "time the whole MoE layer with EP per dispatcher vs one rank")
    bench.set_defaults(func=lambda a: (bench.print_help(), 2)[1])
    _add_plugin(sub, "tune", "epmoe.bench.tune", "tune Triton kernel configurations for a shape on this GPU")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        argv = ["run"]  # the main job with its embedded default
    args = forget_parsing_state(parser.parse_args(argv))
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    configure_cli_logging(getattr(args, "verbosity", 0))
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"{_command(args)}: {exc}", file=sys.stderr)
        return 2
    except RanksFailed as exc:     # every rank's traceback with -v; one line per rank otherwise
        detail = str(exc) if getattr(args, "verbosity", 0) > 0 else exc.summary() + "\n(-v shows the tracebacks)"
        print(f"{_command(args)}: ranks failed\n{detail}", file=sys.stderr)
        return 1


def _command(args) -> str:
    return " ".join(c for c in ("epmoe", args.command, getattr(args, "bench_command", None)) if c)


if __name__ == "__main__":
    sys.exit(main())
