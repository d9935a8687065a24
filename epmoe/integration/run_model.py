"""`epmoe run --model PATH`: load a local transformers MoE checkpoint with its experts over N ranks,
generate greedily from a prompt, print the text, tokens/s and what each rank holds.

Every rank loads the non-expert weights and only its own experts, and runs the same prompt; in EP all
ranks take part in every MoE layer's dispatch, so each generates exactly `max_new_tokens` tokens (no
early stop at end-of-sequence, which would leave the other ranks waiting) and the printed text is cut
at the first end-of-sequence token.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from .. import contract
from ..usage import UsageError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@torch.no_grad()
def greedy_generate(model, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Exactly `max_new_tokens` greedy steps with the KV cache; returns the new ids [B, max_new_tokens]."""
    if max_new_tokens < 1:
        return input_ids.new_zeros(input_ids.shape[0], 0)
    out = model(input_ids=input_ids, use_cache=True)
    past, new = out.past_key_values, [out.logits[:, -1].argmax(-1)]
    for _ in range(max_new_tokens - 1):
        out = model(input_ids=new[-1][:, None], past_key_values=past, use_cache=True)
        past = out.past_key_values
        new.append(out.logits[:, -1].argmax(-1))
    return torch.stack(new, dim=1)


def _experts_backend(args) -> str:
    """The experts backend name: `args.experts` when it is a name, else `args.backend` (the CLI's flag)."""
    experts = getattr(args, "experts", None)
    if isinstance(experts, str):
        return experts
    if experts is not None:
        raise UsageError(f"--experts {experts} (shrink a preset to N experts) has no meaning for a "
                         "checkpoint; choose the experts backend with --backend")
    backend = getattr(args, "backend", None)
    return backend if isinstance(backend, str) else "auto"


def _device_type(args, ranks: int) -> str:
    device = getattr(args, "device", None)
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() and torch.cuda.device_count() >= ranks else "cpu"
    if device not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu, cuda or auto, got {device!r}")
    if device == "cuda" and torch.cuda.device_count() < ranks:
        raise UsageError(f"{ranks} ranks on cuda need {ranks} GPUs, found {torch.cuda.device_count()}")
    return device


def _dtype_name(args) -> str | None:
    dtype = getattr(args, "dtype", None)
    if dtype is None:
        return None
    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return dtype


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def check_model_dir(path: Path, prompt: str) -> None:
    """What `--model` needs, checked once in the launching process: a directory with config.json of a
    model with MoE blocks epmoe converts, and a tokenizer that turns the prompt into tokens."""
    import json

    from .families import FAMILIES
    if not path.is_dir():
        raise UsageError(f"--model {path} is not a directory; give a local transformers checkpoint directory "
                         "(config.json, *.safetensors, tokenizer files)")
    try:
        with open(path / "config.json") as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError) as exc:
        raise UsageError(f"--model {path}: no readable config.json ({type(exc).__name__}: {exc})") from None
    families = [f.name for f in FAMILIES]
    if model_type not in families:
        raise UsageError(f"--model {path}: model_type {model_type!r} has no MoE block epmoe converts; "
                         f"epmoe runs {', '.join(families)}")
    if not any((path / name).exists() for name in TOKENIZER_FILES):
        raise UsageError(f"--model {path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); copy them from "
                         "the model's original repository into the directory")
    from transformers import AutoTokenizer
    try:
        ids = AutoTokenizer.from_pretrained(path, local_files_only=True)(prompt).input_ids
    except Exception as exc:   # whatever the tokenizer's own dependencies raise (sentencepiece, tiktoken, ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UsageError(f"--model {path}: its tokenizer does not load ({type(exc).__name__}: {first[:200]})") from None
    if len(ids) == 0:
        raise UsageError(f"--model {path}: the tokenizer turns --prompt {prompt!r} into no tokens; give another prompt")


def run_rank(rank: int, world: int, opts: dict) -> dict:
    """One rank: load (own experts only), generate, report. Runs under run_on_ranks, torchrun or alone."""
    from transformers import AutoTokenizer

    from .block import expert_memory_bytes, moe_blocks
    from .checkpoint import load_model

    group = None
    if world > 1:
        import torch.distributed as dist
        group = dist.group.WORLD
    # run_on_ranks and torchrun have set this rank's GPU as the current device
    device = torch.device("cuda", torch.cuda.current_device()) if opts["device"] == "cuda" else torch.device("cpu")
    path = Path(opts["model"])
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    ids = tokenizer(opts["prompt"], return_tensors="pt").input_ids.to(device)
    capacity = opts.get("max_tokens_per_rank")
    if capacity is None and contract.needs_capacity(opts["dispatcher"]):   # fixed capacity: the most tokens
        capacity = ids.numel()                                             # one forward passes, the prompt
    t0 = time.perf_counter()
    model = load_model(path, ep_group=group, dtype=DTYPES.get(opts["dtype"]) if opts["dtype"] else None,
                       device=device, dispatcher=opts["dispatcher"], experts=opts["experts"],
                       allow_pickle=opts["allow_pickle"], progress=rank == 0 and opts.get("verbosity", 0) >= 0,
                       **({"max_tokens_per_rank": capacity} if capacity else {}))
    load_s = time.perf_counter() - t0

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    sync()
    t0 = time.perf_counter()
    new = greedy_generate(model, ids, opts["max_new_tokens"])
    sync()
    gen_s = time.perf_counter() - t0
    tokens = new[0].tolist()
    eos = tokenizer.eos_token_id
    shown = tokens[:tokens.index(eos)] if eos is not None and eos in tokens else tokens
    blocks = moe_blocks(model)
    layer = blocks[0][1].experts
    per_expert = expert_memory_bytes(model) / max(1, sum(b.experts.num_local_experts for _, b in blocks))
    return {"rank": rank, "text": tokenizer.decode(shown, skip_special_tokens=True), "tokens": tokens,
            "prompt_tokens": ids.shape[1], "generate_s": gen_s, "load_s": load_s,
            "tokens_per_s": len(tokens) / gen_s if gen_s > 0 else float("inf"),
            "expert_bytes": expert_memory_bytes(model),
            "total_expert_bytes": int(per_expert * sum(b.experts.cfg.num_experts for _, b in blocks)),
            "local_experts": [int(e) for e in layer.local_experts], "moe_layers": len(blocks),
            "dispatcher": layer.dispatcher_name, "experts": layer.experts_name, "device": str(device),
            "config": layer.cfg.describe(), "family": blocks[0][1].family.name}


def _gib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def main(args) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    path = Path(args.model)
    check_model_dir(path, args.prompt)
    ranks = getattr(args, "ranks", None)
    torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ and ranks is None
    ranks = ranks or 1
    if ranks < 1:
        raise UsageError("--ranks must be >= 1")
    max_new = getattr(args, "max_new_tokens", 16)
    if max_new is None or max_new < 1:
        raise UsageError("--max-new-tokens must be >= 1")
    device_type = _device_type(args, 1 if torchrun else ranks)
    opts = {"verbosity": getattr(args, "verbosity", 0), "model": str(path), "prompt": args.prompt, "max_new_tokens": int(max_new), "dtype": _dtype_name(args),
            "device": device_type, "dispatcher": getattr(args, "dispatcher", None) or "auto",
            "experts": _experts_backend(args), "allow_pickle": bool(getattr(args, "allow_pickle", False)),
            "max_tokens_per_rank": getattr(args, "max_tokens_per_rank", None)}
    from ..log import get_logger
    from ..testing.distributed import launch
    if not torchrun or os.environ.get("RANK") == "0":
        get_logger("run").info("epmoe run --model %s: loading on %s %s rank(s), then %d greedy tokens", path,
                               os.environ.get("WORLD_SIZE") if torchrun else ranks, device_type, int(max_new))
    reports = launch(run_rank, None if torchrun else ranks, opts, device_type,
                     timeout_s=float(getattr(args, "timeout", 600.0) or 600.0))
    if reports is None:  # a torchrun rank other than 0
        return 0

    console = Console(width=None if sys.stdout.isatty() else 140)
    first = reports[0]
    console.print(f"[bold]epmoe run[/bold] --model {escape(str(path))} ({first['family']}, {first['moe_layers']} "
                  f"MoE layers: {first['config']})")
    console.print(f"device {first['device'].split(':')[0]}, ranks {len(reports)}, dispatcher {first['dispatcher']}, "
                  f"experts {first['experts']}")
    console.print(f"prompt ({first['prompt_tokens']} tokens): {escape(repr(args.prompt))}")   # text, not markup
    console.print(f"output: {escape(repr(first['text']))}")
    agree = all(r["tokens"] == first["tokens"] for r in reports)
    if len(reports) > 1:
        console.print("every rank generated the same tokens" if agree else
                      "[red]ranks generated different tokens[/red] (see the table)")
    table = Table(title="per rank")
    for col in ("rank", "experts held", "expert memory", "share of all experts", "load s", "new tokens",
                "tokens/s"):
        table.add_column(col, justify="right")
    for r in reports:
        held = r["local_experts"]
        table.add_row(str(r["rank"]), f"{held[0]}..{held[-1]} ({len(held)}/layer)", _gib(r["expert_bytes"]),
                      f"{r['expert_bytes'] / max(1, r['total_expert_bytes']):.3f}", f"{r['load_s']:.2f}",
                      str(len(r["tokens"])), f"{r['tokens_per_s']:.1f}")
    console.print(table)
    if not agree:
        for r in reports:
            console.print(f"  rank {r['rank']}: {escape(repr(r['text']))}")
    json_path = getattr(args, "json", None)
    if json_path:
        import json
        with open(json_path, "w") as f:
            json.dump({"model": str(path), "prompt": args.prompt, "ranks": reports}, f, indent=1)
    return 0 if agree else 1
