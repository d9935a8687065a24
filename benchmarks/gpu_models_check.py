"""transformers models with their experts over 2 GPUs (NCCL): real-size layers and whole tiny models.

Usage (a machine with 2 CUDA GPUs, transformers and safetensors installed, from the repository root):
    python benchmarks/gpu_models_check.py [--out DIR] [--families mixtral,deepseek_v3] [--skip-tests]

Writes DIR/gpu_models_check.json and DIR/gpu_models_check.md (DIR: --out, else $OUT, else
benchmarks/results). Three parts:

1. `pytest tests/test_models_*.py` on this machine's transformers (log: DIR/gpu_models_tests.log).
2. Real-size layers: for each family, one transformers MoE block at the size of a real model (random BF16
   weights, identical on both ranks from a seed) is converted with `from_transformers(block, ep_group)`
   on 2 ranks, for each communicating dispatcher. Each rank runs its own tokens; a sample of rows is
   compared with the float64 oracle (routed experts by `reference_moe` on the block's own router
   logits, plus the shared experts in float64). transformers' own BF16 block is measured against the
   same oracle, and both are timed (CUDA events, median of 10): epmoe with half the experts per GPU,
   transformers with all of them on one.
3. Whole tiny models (float32 and bfloat16): saved with save_pretrained, loaded with
   `load_model(ep_group)` on 2 GPUs (each rank its own prompt) and without EP on one GPU; greedy tokens
   must be the same, and equal transformers' unpatched model's, in float32. In bfloat16 the agreement is
   reported, not required: when a token's k experts sit on different ranks, each rank's partial sum is
   rounded to bfloat16 before the cross-rank sum (one rounding more than on one GPU), which can flip a
   greedy choice at a near-tie.

--smoke runs the whole script on a CPU machine (Gloo, layers shrunk 16x) to check the script itself.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import types

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from epmoe import contract, reference_moe  # noqa: E402
from epmoe.integration import from_transformers  # noqa: E402
from epmoe.integration.families import block_expert  # noqa: E402
from epmoe.testing import compare, run_on_ranks  # noqa: E402

WORLD = 2
SEED = 1234
BF16_BOUND = 1e-2

# One MoE layer of each family at a real model's size: (transformers module, block class, config class, config)
REAL_LAYERS = {
    "mixtral": ("mixtral", "MixtralSparseMoeBlock", "MixtralConfig",        # Mixtral-8x7B
                dict(hidden_size=4096, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2)),
    "qwen2_moe": ("qwen2_moe", "Qwen2MoeSparseMoeBlock", "Qwen2MoeConfig",   # Qwen1.5-MoE-A2.7B
                  dict(hidden_size=2048, moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
                       num_experts=60, num_experts_per_tok=4, norm_topk_prob=False)),
    "qwen3_moe": ("qwen3_moe", "Qwen3MoeSparseMoeBlock", "Qwen3MoeConfig",   # Qwen3-30B-A3B
                  dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                       norm_topk_prob=True)),
    "deepseek_v3": ("deepseek_v3", "DeepseekV3MoE", "DeepseekV3Config",      # DeepSeek-V3
                    dict(hidden_size=7168, moe_intermediate_size=2048, n_routed_experts=256, num_experts_per_tok=8,
                         n_group=8, topk_group=4, n_shared_experts=1, routed_scaling_factor=2.5,
                         norm_topk_prob=True)),
    "olmoe": ("olmoe", "OlmoeSparseMoeBlock", "OlmoeConfig",                # OLMoE-1B-7B
              dict(hidden_size=2048, intermediate_size=1024, num_experts=64, num_experts_per_tok=8,
                   norm_topk_prob=False)),
    "gpt_oss": ("gpt_oss", "GptOssMLP", "GptOssConfig",                     # gpt-oss-120b
                dict(hidden_size=2880, intermediate_size=2880, num_local_experts=128, num_experts_per_tok=4)),
}


def ep_dispatchers() -> list[str]:
    """The registered dispatchers that move tokens with a variable size (no fixed capacity to choose)."""
    return [d for d, cls in contract.DISPATCHERS.items() if cls.CAPS.communicates and not cls.CAPS.needs_max_tokens]


def run_tests(log_path: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "tests/test_models_patch.py",
                           "tests/test_models_checkpoint.py", "tests/test_models_ep.py", "tests/test_models_run.py"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    with open(log_path, "w") as f:
        f.write(proc.stdout + proc.stderr)
    tail = [ln for ln in proc.stdout.splitlines() if ln.strip()][-1:]
    return tail[0] if tail else f"pytest exited {proc.returncode}"


def this_device(opts: dict) -> torch.device:
    """This rank's GPU (run_on_ranks made it current), or the CPU for a smoke run."""
    return torch.device("cuda", torch.cuda.current_device()) if not opts["smoke"] else torch.device("cpu")


def empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_ms(fn, device: torch.device, iters: int = 10, warmup: int = 3) -> float:
    if device.type != "cuda":
        import time
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


# ------------------------------------------------------------------------------------- real-size layers
def layer_sizes(family: str, smoke: bool) -> dict:
    """The real layer's sizes; for a CPU smoke run of this script, sizes / 16 (kept multiples of 16, as
    torch._grouped_mm needs 16-byte row strides) and at most 16 experts."""
    sizes = dict(REAL_LAYERS[family][3])
    if smoke:
        for k in ("hidden_size", "intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size"):
            if k in sizes:
                sizes[k] = max(16, sizes[k] // 256 * 16)
        for k in ("num_local_experts", "num_experts", "n_routed_experts"):
            if k in sizes:
                sizes[k] = min(sizes[k], 16)
    return sizes


def build_real_block(family: str, device: torch.device, smoke: bool = False) -> torch.nn.Module:
    """The family's transformers MoE block at real size, BF16, random weights identical on every rank."""
    import importlib

    import transformers
    module, block_cls, config_cls, _ = REAL_LAYERS[family]
    config = getattr(transformers, config_cls)(num_hidden_layers=1, **layer_sizes(family, smoke))
    cls = getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), block_cls)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            block = cls(config)
    finally:
        torch.set_default_dtype(old)
    g = torch.Generator(device=device).manual_seed(SEED)
    in_first = family == "gpt_oss"      # gpt-oss experts are [in, out]
    with torch.no_grad():
        for name, p in block.named_parameters():
            if p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g, device=device, dtype=torch.float32))
            else:
                experts = name.endswith(("experts.gate_up_proj", "experts.down_proj"))
                fan_in = p.shape[-2] if experts and in_first else p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g, device=device, dtype=torch.float32) * fan_in ** -0.5)
        for name, b in block.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=g, device=device, dtype=torch.float32))
    return block.eval()


def shared_oracle(module, x: torch.Tensor) -> torch.Tensor | None:
    """The shared experts' contribution in float64 (copies of the block's shared modules)."""
    family = module.family
    if family.shared_output is None:
        return None
    copies = types.SimpleNamespace(**{n: copy.deepcopy(getattr(module, n)).double() for n in family.shared_attrs})
    return family.shared_output(copies, x.double())


def first(out):
    return out[0] if isinstance(out, tuple) else out


def real_layers_rank(rank: int, world: int, opts: dict) -> list[dict]:
    import torch.distributed as dist
    device = this_device(opts)
    results = []
    for family in opts["families"]:
        block = build_real_block(family, device, opts["smoke"])
        T, S = opts["tokens"], opts["sample"]
        g = torch.Generator(device=device).manual_seed(SEED + 1 + rank)
        hidden = layer_sizes(family, opts["smoke"])["hidden_size"]
        x = torch.randn(1, T, hidden, generator=g, device=device, dtype=torch.float32).to(torch.bfloat16)
        sample = torch.randperm(T, generator=g, device=device)[:S].sort().values
        with torch.no_grad():
            hf_out = first(block(x))
            hf_ms = time_ms(lambda: block(x), device)
        for dispatcher in opts["dispatchers"]:
            module = from_transformers(block, ep_group=dist.group.WORLD, dispatcher=dispatcher)
            layer = module.experts
            xs = x[0, sample]
            with torch.no_grad():
                out = first(module(x))
                ms = time_ms(lambda: module(x), device)
                logits = first(module.router_module(xs))
                experts = [tuple(block_expert(module.family, block, e).values()) for e in range(layer.cfg.num_experts)]
                ref = reference_moe(xs, logits, experts, layer.cfg, score_correction_bias=layer.score_correction_bias,
                                    device=device)
                shared = shared_oracle(module, xs)
                if shared is not None:
                    ref = ref + shared
            ep_err = compare(out[0, sample], ref)
            hf_err = compare(hf_out[0, sample], ref)
            results.append({
                "family": family, "dispatcher": dispatcher, "experts": layer.experts_name, "rank": rank,
                "config": layer.cfg.describe(), "tokens": T, "sampled": S,
                "local_experts": layer.num_local_experts,
                "expert_bytes": sum(p.numel() * p.element_size() for p in layer.parameters(recurse=False)),
                "rel_err": ep_err.rel_err, "max_abs": ep_err.max_abs, "transformers_rel_err": hf_err.rel_err,
                "ok": ep_err.finite and ep_err.rel_err <= BF16_BOUND,
                "ms": ms, "transformers_ms_one_gpu_all_experts": hf_ms,
            })
            del module, layer
            empty_cache(device)
        del block, hf_out
        empty_cache(device)
        dist.barrier()
    return results


# ------------------------------------------------------------------------------------- whole tiny models
PROMPTS = [[1, 5, 9, 14, 22, 31], [1, 40, 3, 17, 8]]


def tiny_models_rank(rank: int, world: int, opts: dict) -> dict:
    """EP over `world` ranks (rank r generates PROMPTS[r]) or, with world == 1, no EP and every prompt."""
    from transformers import AutoModelForCausalLM

    from epmoe.integration import load_model
    from epmoe.integration.run_model import greedy_generate
    device = this_device(opts)
    group = None
    if world > 1:
        import torch.distributed as dist
        group = dist.group.WORLD
    mine = PROMPTS if world == 1 else [PROMPTS[rank]]
    out = {}
    for key, spec in opts["runs"].items():
        dtype = getattr(torch, spec["dtype"])
        for dispatcher in (["local"] if world == 1 else opts["dispatchers"]):
            model = load_model(spec["dir"], ep_group=group, dtype=dtype, device=device, dispatcher=dispatcher,
                               progress=False)
            for i, prompt in enumerate(mine):
                idx = i if world == 1 else rank
                ids = torch.tensor([prompt], device=device)
                out[f"{key}|{dispatcher}|{idx}"] = greedy_generate(model, ids, opts["new_tokens"])[0].tolist()
            del model
        if world == 1:
            hf = AutoModelForCausalLM.from_pretrained(spec["dir"], dtype=dtype).to(device).eval()
            for idx, prompt in enumerate(PROMPTS):
                ids = torch.tensor([prompt], device=device)
                out[f"{key}|transformers|{idx}"] = greedy_generate(hf, ids, opts["new_tokens"])[0].tolist()
            del hf
        empty_cache(device)
    return out


def check_tiny_models(families, dispatchers, new_tokens: int, smoke: bool) -> list[dict]:
    from epmoe.integration.tiny import save_tiny_checkpoint, tiny_model
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for family in families:
            for dtype in ("float32", "bfloat16"):
                d = os.path.join(tmp, f"{family}-{dtype}")
                model = tiny_model(family, seed=SEED, dtype=getattr(torch, dtype), hidden=256, layers=4,
                                   experts=8, intermediate=128, vocab=128)
                save_tiny_checkpoint(model, d, max_shard_size="2MB", with_tokenizer=False)
                runs[f"{family}|{dtype}"] = {"dir": d, "dtype": dtype}
        opts = {"runs": runs, "dispatchers": dispatchers, "new_tokens": new_tokens, "smoke": smoke}
        backend = "gloo" if smoke else "nccl"
        single = run_on_ranks(tiny_models_rank, 1, opts, backend=backend, timeout_s=600)[0]
        ep = {}
        for part in run_on_ranks(tiny_models_rank, WORLD, opts, backend=backend, timeout_s=600):
            ep.update(part)
    for key in runs:
        family, dtype = key.split("|")
        for dispatcher in dispatchers:
            for idx in range(len(PROMPTS)):
                no_ep, with_ep = single[f"{key}|local|{idx}"], ep[f"{key}|{dispatcher}|{idx}"]
                hf = single[f"{key}|transformers|{idx}"]
                same = with_ep == no_ep and with_ep == hf
                rows.append({"family": family, "dtype": dtype, "dispatcher": dispatcher, "prompt": idx,
                             "tokens_no_ep": no_ep, "tokens_ep": with_ep, "tokens_transformers": hf,
                             "ep_equals_no_ep": with_ep == no_ep, "equals_transformers": with_ep == hf,
                             "required": dtype == "float32", "ok": same or dtype != "float32"})
    return rows


# ------------------------------------------------------------------------------------- report
def markdown(report: dict) -> str:
    lines = [f"# transformers models with EP over {WORLD} GPUs", "",
             f"{report['date']}, {report['device']}, torch {report['torch']}, transformers {report['transformers']}",
             "", f"tests: {report['tests']}", "",
             "## Real-size layers (BF16, random weights): sampled rows vs the float64 oracle", "",
             "| family | dispatcher | experts | rank | local experts | rel err | transformers rel err | "
             "ms (EP, 2 GPUs) | transformers ms (1 GPU) | ok |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["real_layers"]:
        lines.append(f"| {r['family']} | {r['dispatcher']} | {r['experts']} | {r['rank']} | {r['local_experts']} | "
                     f"{r['rel_err']:.2e} | {r['transformers_rel_err']:.2e} | {r['ms']:.2f} | "
                     f"{r['transformers_ms_one_gpu_all_experts']:.2f} | {'yes' if r['ok'] else 'NO'} |")
    lines += ["", "## Whole tiny models: greedy tokens with and without EP", "",
              "| family | dtype | dispatcher | prompt | EP == no EP | == transformers | required | ok |",
              "|---|---|---|---|---|---|---|---|"]
    for r in report["tiny_models"]:
        lines.append(f"| {r['family']} | {r['dtype']} | {r['dispatcher']} | {r['prompt']} | {r['ep_equals_no_ep']} | "
                     f"{r['equals_transformers']} | {r['required']} | {'yes' if r['ok'] else 'NO'} |")
    lines += ["", f"all ok: {report['all_ok']}", ""]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--families", default=",".join(REAL_LAYERS))
    p.add_argument("--dispatchers", default=None, help="comma-separated (default: alltoall,allgather)")
    p.add_argument("--tokens", type=int, default=512, help="tokens per rank through each real-size layer")
    p.add_argument("--sample", type=int, default=32, help="rows per rank compared with the oracle")
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--skip-real", action="store_true")
    p.add_argument("--skip-tiny", action="store_true")
    p.add_argument("--smoke", action="store_true",
                   help="check this script on a CPU machine: Gloo, layers shrunk 16x (results are not GPU results)")
    args = p.parse_args()
    if not args.smoke and torch.cuda.device_count() < WORLD:
        print(f"needs {WORLD} CUDA GPUs, found {torch.cuda.device_count()}", file=sys.stderr)
        return 2
    families = [f for f in args.families.split(",") if f]
    unknown = sorted(set(families) - set(REAL_LAYERS))
    if unknown:
        print(f"unknown families {unknown}; known: {', '.join(REAL_LAYERS)}", file=sys.stderr)
        return 2
    dispatchers = args.dispatchers.split(",") if args.dispatchers else ep_dispatchers()
    os.makedirs(args.out, exist_ok=True)
    import transformers
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
              "device": "CPU smoke run (Gloo, shrunk layers)" if args.smoke else torch.cuda.get_device_name(0),
              "torch": torch.__version__,
              "transformers": transformers.__version__, "dispatchers": dispatchers,
              "tests": "skipped", "real_layers": [], "tiny_models": []}
    if not args.skip_tests:
        report["tests"] = run_tests(os.path.join(args.out, "gpu_models_tests.log"))
        print("tests:", report["tests"], flush=True)
    if not args.skip_real:
        opts = {"families": families, "dispatchers": dispatchers, "tokens": args.tokens, "sample": args.sample,
                "smoke": args.smoke}
        for part in run_on_ranks(real_layers_rank, WORLD, opts, backend="gloo" if args.smoke else "nccl",
                                 timeout_s=3000):
            report["real_layers"] += part
        for r in report["real_layers"]:
            print(f"{r['family']:12s} {r['dispatcher']:9s} rank {r['rank']}: rel err {r['rel_err']:.2e} "
                  f"(transformers {r['transformers_rel_err']:.2e}), {r['ms']:.2f} ms", flush=True)
    if not args.skip_tiny:
        report["tiny_models"] = check_tiny_models(families, dispatchers, args.new_tokens, args.smoke)
        for r in report["tiny_models"]:
            print(f"{r['family']:12s} {r['dtype']:9s} {r['dispatcher']:9s} prompt {r['prompt']}: EP == no EP "
                  f"{r['ep_equals_no_ep']}, == transformers {r['equals_transformers']}", flush=True)
    report["all_ok"] = all(r["ok"] for r in report["real_layers"] + report["tiny_models"]) and \
        ("failed" not in report["tests"] and "error" not in report["tests"])
    with open(os.path.join(args.out, "gpu_models_check.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(args.out, "gpu_models_check.md"), "w") as f:
        f.write(markdown(report))
    print(markdown(report))
    return 0 if report["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
