"""Command-line mistakes: caught in the launching process before any rank starts, said in one or two lines
that name the flag and the fix (`epmoe <command>: ...`, exit code 2), never as a traceback per rank.

Also the flag vocabulary the commands share: comma-separated lists that may also repeat (`CsvList`) and
old spellings kept as deprecated aliases (`DeprecatedAlias`).
"""
from __future__ import annotations

import argparse
import sys

import torch


class UsageError(SystemExit):
    """A mistake in the command line; the message names the flag and what to do instead. A `SystemExit`, so
    that code calling a command's `main(args)` directly still stops with the message rather than a
    traceback; the `epmoe` command prints it as `epmoe <command>: <message>` and exits with code 2."""


def at_least(flag: str, value, minimum: int) -> None:
    if value is not None and value < minimum:
        raise UsageError(f"{flag} must be >= {minimum}, got {value}")


def refuse_ranks_under_torchrun(ranks) -> None:
    """`--ranks N` starts N processes; under torchrun every one of its processes would start N more, which
    then wait for each other until the rendezvous times out."""
    from .testing.distributed import launcher_env
    found = launcher_env()
    if ranks is not None and found:
        raise UsageError(f"--ranks starts local processes, but this one was started by torchrun ({', '.join(found)} "
                         "set): leave out --ranks, the ranks are torchrun's (--nproc_per_node)")


def all_experts_per_token(preset: str, experts: int | None, top_k_flag: bool = False) -> str | None:
    """What is wrong with `--experts N` for `preset` if N <= its top_k (every token would then go to every
    expert: the routing selects nothing, almost never what was meant), else None."""
    from .presets import PRESETS
    preset_k = PRESETS[preset]["top_k"]
    if experts is None or experts > preset_k:
        return None
    or_k = f", or say --top-k K (K < {experts})" if top_k_flag and experts > 1 else ""
    return (f"--experts {experts} with {preset}'s top_k {preset_k}: every token would go to every expert; use "
            f"--experts {2 * preset_k} or more{or_k}")


def check_device(name: str) -> torch.device:
    """`--device`: auto, cpu, cuda or cuda:N, on a machine that has it."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name!r}: epmoe runs on cpu or cuda; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA GPU is visible here (torch {torch.__version__}, "
                             f"built with CUDA {torch.version.cuda}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} GPUs")
    return device


def check_backends(dispatcher: str, experts: str, cfg, world: int, device_type: str,
                   experts_flag: str = "--backend") -> tuple[str, str]:
    """The dispatcher and experts names (flags --dispatcher and `experts_flag`) resolved and checked as a
    pair for `world` ranks on `device_type`, as the layer will; returns the explicit names."""
    from . import contract
    from .errors import UnsupportedCombination
    for flag, name, known in (("--dispatcher", dispatcher, contract.DISPATCHERS),
                              (experts_flag, experts, contract.EXPERTS)):
        if name != "auto" and name not in known:
            raise UsageError(f"{flag} {name!r} is unknown; use auto or one of: {', '.join(known)} (see `epmoe info`)")
    try:
        d, x = contract.resolve_names(dispatcher, experts, cfg, world, device_type)
        contract.check_pairing(d, x, cfg, world, device_type)
    except UnsupportedCombination as exc:
        chosen = f"--dispatcher {exc.dispatcher}" + (" (auto)" if dispatcher == "auto" else "")
        chosen += f" with {experts_flag} {exc.experts}" + (" (auto)" if experts == "auto" else "")
        works = contract.supported_pairings(cfg, world, device_type)
        with_d = [x for d, x in works if d == exc.dispatcher]
        with_x = [d for d, x in works if x == exc.experts]
        fixes = ([f"{experts_flag} {' or '.join(with_d)}"] if with_d else []) + \
                ([f"--dispatcher {' or '.join(with_x)}"] if with_x else [])
        raise UsageError(f"{chosen} on {world} {device_type} rank(s) is refused: {exc.reason}.\n"
                         f"  use {', or '.join(fixes) if fixes else 'another pairing (see `epmoe info`)'}") from None
    return d, x


def check_capacity(dispatcher: str, experts: str, cfg, world: int, device_type: str, capacity: int | None,
                   tokens: int, flag: str = "--max-tokens-per-rank") -> None:
    """The capacity a command will build the layer with (`capacity`, from `flag` or its default), checked
    as the layer will check it (`contract.build_plan`), and against the `tokens` a rank passes for a
    dispatcher that declares a capacity (overflow would be every rank's error)."""
    from . import contract
    try:
        plan = contract.build_plan(dispatcher, experts, cfg, world, device_type, capacity)
    except ValueError as exc:
        raise UsageError(f"--dispatcher {dispatcher}: {exc}; give {flag} N") from None
    if plan.max_tokens_per_rank is not None and plan.max_tokens_per_rank < tokens:
        raise UsageError(f"{flag} {plan.max_tokens_per_rank} is below --tokens {tokens}: every rank would overflow "
                         f"the {dispatcher} dispatcher's capacity; give {tokens} or more")


def add_redundant_experts_flag(p: argparse.ArgumentParser, what_it_does: str) -> None:
    """`--redundant-experts R` (EPLB); `what_it_does`: what R does in this command."""
    p.add_argument("--redundant-experts", type=int, default=None, metavar="R", help=what_it_does)


def check_redundant_experts(redundant: int | None, cfg, world: int, flag: str = "--redundant-experts") -> None:
    """`--redundant-experts R`: replicas need several ranks and fit at most one per rank and expert."""
    if redundant is None:
        return
    if redundant < 0:
        raise UsageError(f"{flag} must be >= 0, got {redundant}")
    if world < 2:
        raise UsageError(f"{flag} needs expert parallelism (replicas live on other ranks): use --ranks 2 or more")
    from .balance.expert_map import ExpertMap
    try:
        ExpertMap.build(cfg.num_experts, redundant, world, 0)
    except ValueError as exc:
        raise UsageError(f"{flag} {redundant}: {exc}") from None


MICRO_BATCHES_HELP = ("split every forward in two micro-batches whose dispatch and combine run while the other's "
                      "experts compute (MoELayer(micro_batches=2); the dispatcher must declare two forwards in "
                      "flight, `epmoe info` column 'in flight')")
COMM_SMS_HELP = ("the most SMs the transfer kernels of the GPU-initiated dispatchers (symm_*) take, leaving the "
                 "rest to the experts (MoELayer(comm_sms=N); refused for dispatchers whose transfers are "
                 "collectives; default: as many as their rows need)")


def add_overlap_flags(p: argparse.ArgumentParser, several: bool = False) -> None:
    """`--micro-batches` and `--comm-sms`, the layer's overlap settings; `several`: --micro-batches takes a
    comma-separated list, each value measured in turn (benchmarks)."""
    if several:
        p.add_argument("--micro-batches", action=CsvList, default="1", metavar="M[,M]",
                       help=f"1 or 2, comma-separated to measure each (e.g. 1,2; default 1): {MICRO_BATCHES_HELP}")
    else:
        p.add_argument("--micro-batches", type=int, choices=(1, 2), default=1,
                       help=f"1 (default) or 2: {MICRO_BATCHES_HELP}")
    p.add_argument("--comm-sms", type=int, default=None, metavar="N", help=COMM_SMS_HELP)


def micro_batch_values(value) -> list[int]:
    """The values of a `--micro-batches` list flag (each 1 or 2, no repeats)."""
    try:
        vals = [int(v) for v in csv_values(value)]
    except ValueError:
        vals = []
    if not vals or any(v not in (1, 2) for v in vals) or len(set(vals)) != len(vals):
        raise UsageError(f"--micro-batches takes 1, 2 or 1,2, got {value!r}")
    return vals


def overlap_problem(dispatcher: str, micro_batches: int, comm_sms: int | None, cfg, world: int,
                    device_type: str) -> str | None:
    """Why `dispatcher` cannot take `--micro-batches` / `--comm-sms` as the contract rules it (naming the
    flag and the dispatchers that run here and take it), or None."""
    from . import contract
    from .errors import UnsupportedCombination
    for flag, value, m, c, undo in (("--micro-batches", micro_batches, micro_batches, None, "use --micro-batches 1"),
                                    ("--comm-sms", comm_sms, 1, comm_sms, "leave out --comm-sms")):
        try:
            contract.check_overlap(dispatcher, None, m, c)
        except UnsupportedCombination as exc:
            named = [a.split("'")[1] for a in exc.alternatives if a.startswith("dispatcher=")]
            here = [n for n in named if contract.dispatcher_problem(n, cfg, world, device_type) is None]
            use = f"use --dispatcher {' or '.join(here)}, or " if here else ""
            return f"{flag} {value} with --dispatcher {dispatcher}: {exc.reason}; {use}{undo}"
        except ValueError as exc:
            return f"{flag} {value}: {exc}"
    return None


def check_overlap(dispatcher: str, micro_batches: int, comm_sms: int | None, cfg, world: int,
                  device_type: str) -> None:
    """`--micro-batches` / `--comm-sms` for the resolved `dispatcher`, refused as the layer would refuse them."""
    problem = overlap_problem(dispatcher, micro_batches, comm_sms, cfg, world, device_type)
    if problem:
        raise UsageError(problem)


class CsvList(argparse.Action):
    """A list flag: comma-separated values, and the flag may repeat (`--formats a,b --formats c` is
    `a,b,c`); stored as one comma-separated string, the first use replacing the default."""

    SEEN = "_csv_flags_seen"    # on the namespace while parsing; `forget_parsing_state` removes it

    def __call__(self, parser, namespace, values, option_string=None):
        seen = getattr(namespace, self.SEEN, set())
        setattr(namespace, self.SEEN, seen | {self.dest})
        current = getattr(namespace, self.dest, None) if self.dest in seen else None
        setattr(namespace, self.dest, ",".join(v for v in (current, str(values)) if v))


def forget_parsing_state(args: argparse.Namespace) -> argparse.Namespace:
    """The parsed flags alone (what the commands pass on to their ranks)."""
    if hasattr(args, CsvList.SEEN):
        delattr(args, CsvList.SEEN)
    return args


def csv_values(value) -> list[str]:
    """The values of a list flag (`CsvList`, or its default string), blanks dropped."""
    return [v.strip() for v in str(value or "").split(",") if v.strip()]


def token_counts(value, flag: str = "--tokens") -> list[int]:
    """The positive token counts of a list flag; a `UsageError` naming the flag for anything else."""
    try:
        counts = [int(v) for v in csv_values(value)]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise UsageError(f"{flag} must be positive token counts, got {value!r}")
    return counts


class DeprecatedAlias(argparse.Action):
    """An old spelling of a flag: stores into the new flag's destination and prints a one-line note."""

    def __init__(self, option_strings, dest, new_flag: str, **kwargs):
        self.new_flag = new_flag
        kwargs.setdefault("help", f"deprecated spelling of {new_flag}")
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: {option_string} is deprecated, use {self.new_flag}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_verbosity(p: argparse.ArgumentParser) -> None:
    """-q / -v on every command: progress at the default, -q for warnings only, -v for detail."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=-1, default=0,
                   help="print only results and errors, no progress")
    g.add_argument("-v", "--verbose", dest="verbosity", action="count",
                   help="more detail (timestamps, each step; -vv more)")
