"""Our block-FP8 expert GEMMs beside vLLM's fused-MoE Triton kernel, at the same rows and weights, kernel time
against kernel time.

vLLM is not a dependency and none of its code is in this repository. The caller unpacks a vLLM wheel's
fused-MoE folder and names it; this script reads vLLM's own functions out of its files (the Triton kernel
`fused_moe_kernel` and the `write_zeros_to_output` it calls, the launch `invoke_fused_moe_triton_kernel`,
`_prepare_expert_assignment`, `get_default_config`, `enable_swap_ab`), compiles them as they are and runs them
as vLLM's functional path (`fused_experts_impl`) runs block-FP8 weights: one tile configuration for both GEMMs
from vLLM's JSON table for the GPU's name at the closest batch size, else vLLM's default; the weights by TMA
descriptor where vLLM's launch allows it; swap-AB where it asks for it. What those functions import from the
rest of vLLM is stood in for here (`_STUBS`: the platform as this GPU, the layout of pairs vLLM builds in a
CUDA op written in PyTorch from its docstring: pairs sorted by expert, each expert padded to BLOCK_SIZE_M
with the pad id T*k). The activation and the quantization between the two GEMMs and the slot sum after them
are ours (not timed).

    pip download --no-deps -d /tmp/vllm vllm==0.34.0
    unzip -q /tmp/vllm/vllm-0.34.0-*.whl 'vllm/model_executor/layers/fused_moe/fused_moe.py' \\
        'vllm/model_executor/layers/fused_moe/utils.py' 'vllm/model_executor/layers/fused_moe/configs/*' \\
        -d .anchors/vllm-0.34.0
    python3 benchmarks/vllm_gemms.py --vllm .anchors/vllm-0.34.0/vllm/model_executor/layers/fused_moe \\
        --shapes "deepseek-v3:32:4096,gpt-oss-120b::1024" --output vllm_gemms.json

(`.anchors/` is ignored by git: the device tool's `carry` takes it to a GPU machine with no network.)

Under Nsight Compute, `--once` makes each side's checked call its only one (the PyTorch profiler, whose CUPTI
use may not coexist with ncu's, is not started): ncu's launches of one point are then ours first (the GEMM
kernels of one forward; before them, once per process, the Gluon GEMM's self-check where the table has a Gluon
entry for the shape), then vLLM's two, once per table configuration:

    ncu -k regex:'^(moe_gemm|ws_grouped_gemm|gemv_gate_up|gemv_down_sum|fused_moe)_kernel$' \\
        python3 benchmarks/vllm_gemms.py --vllm ... --once --shapes qwen3-30b-a3b:16:128 --vllm-tables this

Both sides are timed the same way: eager calls under the PyTorch profiler's CUDA trace, each behind an L2
flush and a GPU sleep (`profile_experts_steps.profile_runs`), the kernels' own durations summed per call: for
vLLM its two `fused_moe_kernel` launches; for us the GEMM kernels of one whole `triton` forward
(`moe_gemm_kernel`, the Gluon `ws_grouped_gemm_kernel`, or at decode `gemv_gate_up_kernel` and
`gemv_down_sum_kernel`), whichever our tuning table picks (its entry is recorded). The split is not even either
way: ours do more in those launches (the gate+up GEMM applies the activation and quantizes its output to FP8,
which vLLM leaves to kernels not timed here; the decode path's down GEMM sums the slots), while vLLM's GEMMs
gather the token rows in their own launch and the Gluon GEMMs read them from a copy into their layout made by a
kernel of its own: each point also gives our GEMMs with that copy (`gemm_and_copy_us`) and our whole op
(`kernel_us`), and every kernel's share. Where the tiles need two launches per GEMM (tail tiles) the first half
of the launches is the gate+up. Both pipelines are checked end to end against the float64 oracle on sampled rows
(3e-2): vLLM's with our activation, quantization and slot sum between and after its two GEMMs; and each of vLLM's
GEMMs on its own against float64 products of its FP8 operands on the pairs of up to 32 sampled tokens (1e-2).
Unlike a deployment: the shards are whole models here (vLLM's small-batch path for T * k * 4 <= E applies to them),
weights of padded width (gpt-oss-120b's 2880 to 2944, where vLLM's TMA path then qualifies), and every input
L2-cold before each call on both sides. `--vllm-tables` names whose JSON tables vLLM looks in: `this` (this GPU's
name, as vLLM does) and, e.g., `NVIDIA_H200` (its H200 tables on another GPU); a table that gives the same
configuration as one before it is not timed again.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.util
import json
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_experts_steps import kernel_family, parse_shapes, profile_runs, summarize

OUR_GEMMS = ("moe_gemm_kernel", "ws_grouped_gemm_kernel", "gemv_gate_up_kernel", "gemv_down_sum_kernel")
# our copies of the token rows into the Gluon GEMMs' layout (the tile kernels gather rows in their own launch)
OUR_ROW_COPIES = ("pairs_to_layout_kernel", "rows_to_layout_kernel")
VLLM_GEMM = "fused_moe_kernel"
BLOCK_SHAPE = [128, 128]
CHECK_TOLERANCE = 3e-2
# each of vLLM's GEMMs against float64 products of its own FP8 operands on sampled pairs (bfloat16 outputs)
PAIR_TOLERANCE = 1e-2
PAIR_CHECK_TOKENS = 32
SCALE_GROUP = 128
METHOD = ("eager calls under the PyTorch profiler's CUDA trace, each behind an L2 flush and a GPU sleep; per call the "
          "GEMM kernels' own durations summed (ours: the GEMM launches of one whole `triton` forward; vLLM: its two "
          "fused_moe_kernel launches), the first half of the launches the gate+up; ours also with the copy of the "
          "token rows into the layout (gemm_and_copy_us), which vLLM's GEMM does in its launch; means over the calls")
# vLLM's functions run here, by file (relative to the fused-MoE folder)
VLLM_FUNCTIONS = {"utils.py": ("enable_swap_ab",),
                  "fused_moe.py": ("write_zeros_to_output", "fused_moe_kernel", "invoke_fused_moe_triton_kernel",
                                   "_prepare_expert_assignment", "get_default_config", "_moe_config_shape")}
# what those functions import from the rest of vLLM, stood in for on this GPU
_STUBS = '''
import functools
import types
from typing import Any

import torch
import triton
import triton.language as tl

envs = types.SimpleNamespace(VLLM_BATCH_INVARIANT=False)


class _Platform:
    """vLLM's `current_platform` on this CUDA GPU (`capability`: another GPU's, e.g. for a run under Triton's
    interpreter on the CPU)."""
    capability = None

    def _capability(self):
        return self.capability or torch.cuda.get_device_capability()

    def is_cuda(self):
        return True

    def is_rocm(self):
        return False

    def is_device_capability(self, cap):
        major, minor = self._capability()
        return major * 10 + minor == cap

    def is_device_capability_family(self, cap):
        return self._capability()[0] == cap // 10


current_platform = _Platform()


class _Logger:
    """vLLM's logger: its messages (which table it read, a fallback it took) are what this script records
    itself."""

    def warning_once(self, *args, **kwargs):
        """Says nothing."""

    info_once = warning_once


logger = _Logger()


def warn_if_moe_use_td_ineffective(*args, **kwargs):
    """vLLM warns here when its tensor-descriptor gather is asked for where it cannot help; it is off here
    (resolve_moe_use_td)."""


def resolve_moe_use_td():
    return False


def set_triton_allocator(device):
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=device))


def next_power_of_2(n):
    return 1 << (int(n) - 1).bit_length()


def should_moe_wna16_use_cuda(*args, **kwargs):
    return False


def moe_align_block_size(topk_ids, block_size, num_experts, expert_map=None, pad_sorted_ids=False,
                         ignore_invalid_experts=False, return_scatter_idx=False):
    """vLLM's layout of pairs (a CUDA op there), from its docstring: the flat pair ids sorted by expert (stable),
    each expert's run padded to a multiple of block_size with the id numel; the expert of each block; the
    padded length. The buffers are as long as vLLM allocates them."""
    assert expert_map is None and not pad_sorted_ids and not return_scatter_idx
    flat = topk_ids.reshape(-1).long()
    numel = flat.numel()
    longest = numel + num_experts * (block_size - 1)
    if numel < num_experts:
        longest = min(numel * block_size, longest)
    counts = torch.bincount(flat, minlength=num_experts)
    padded = (counts + block_size - 1) // block_size * block_size
    starts = torch.cumsum(padded, 0) - padded
    order = torch.sort(flat, stable=True).indices
    first_of_expert = torch.cumsum(counts, 0) - counts
    rank = torch.arange(numel, device=flat.device) - first_of_expert[flat[order]]
    sorted_ids = torch.full((longest,), numel, dtype=torch.int32, device=flat.device)
    sorted_ids[starts[flat[order]] + rank] = order.to(torch.int32)
    blocks = triton.cdiv(longest, block_size)
    expert_ids = torch.full((blocks,), -1, dtype=torch.int32, device=flat.device)
    block_expert = torch.repeat_interleave(torch.arange(num_experts, device=flat.device), padded // block_size)
    expert_ids[:block_expert.numel()] = block_expert.to(torch.int32)
    total = padded.sum().reshape(1).to(torch.int32)
    return sorted_ids, expert_ids, total
'''


def vllm_functions(folder: Path, workdir: Path):
    """vLLM's functions (VLLM_FUNCTIONS) read out of its files under `folder`, written with the stand-ins into one
    module under `workdir` (Triton compiles a kernel from its source file) and imported; and the sha256 of each
    file read."""
    pieces, digests = [], {}
    for name, functions in VLLM_FUNCTIONS.items():
        path = folder / name
        if not path.is_file():
            raise SystemExit(f"--vllm: no {path} (name a vLLM wheel's folder vllm/model_executor/layers/fused_moe)")
        text = path.read_text()
        digests[name] = hashlib.sha256(text.encode()).hexdigest()
        lines = text.splitlines()
        found = {}
        for node in ast.parse(text).body:
            if isinstance(node, ast.FunctionDef) and node.name in functions:
                first = min([d.lineno for d in node.decorator_list] + [node.lineno])
                found[node.name] = "\n".join(lines[first - 1:node.end_lineno])
        missing = [f for f in functions if f not in found]
        if missing:
            raise SystemExit(f"--vllm: {path} has no {', '.join(missing)} (a vLLM this script does not know)")
        pieces += [found[f] for f in functions]
    module_path = workdir / "vllm_fused_moe_functions.py"
    module_path.write_text(_STUBS + "\n\n" + "\n\n\n".join(pieces) + "\n")
    spec = importlib.util.spec_from_file_location("vllm_fused_moe_functions", module_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, digests


def device_file_name(gpu_name: str) -> str:
    """The device part of vLLM's table names for a GPU (its H200 family shares one)."""
    name = re.sub(r"[\s/]+", "_", gpu_name)
    return "NVIDIA_H200" if "H200" in name.split("_") else name


def vllm_config(vk, folder: Path, device: str, w13_shape, w2_shape, top_k: int, M: int) -> tuple[dict, str]:
    """The tile configuration vLLM's `try_get_optimal_moe_config` gives block-FP8 weights for M tokens when it
    looks for tables named after `device`, and where it came from."""
    E, N = vk._moe_config_shape(tuple(w2_shape), "fp8_w8a8")
    name = f"E={E},N={N},device_name={device},dtype=fp8_w8a8,block_shape=[128,128].json"
    path = folder / "configs" / name
    if path.is_file():
        table = {int(b): c for b, c in json.loads(path.read_text()).items() if b != "triton_version"}
        batch = min(table, key=lambda b: abs(b - M))
        return dict(table[batch]), f"{name} [{batch}]"
    return vk.get_default_config(M, E, N, w13_shape[2], top_k, "fp8_w8a8", BLOCK_SHAPE), "vLLM's default"


def gemm_times(runs, families, copies=()) -> dict:
    """Per call: the GEMM kernels' microseconds (those whose family is in `families`), the gate+up's (the first
    half of those launches: the gate+up runs before the down, each in one launch or, with tail tiles, two) and the
    down's (None where the count is odd), the GEMMs with the kernels of `copies` (the copy of the token rows
    into the layout, which vLLM's GEMM does inside its launch), and every kernel's; means over the calls."""
    gemm, first, rest, with_copy, total, counts = [], [], [], [], [], set()
    for kernels in runs:
        durations = [(kernel_family(n), e - s) for n, s, e in kernels]
        launches = [us for fam, us in durations if fam in families]
        counts.add(len(launches))
        half = len(launches) // 2
        gemm.append(sum(launches))
        first.append(sum(launches[:half]))
        rest.append(sum(launches[half:]))
        with_copy.append(sum(launches) + sum(us for fam, us in durations if fam in copies))
        total.append(sum(us for _, us in durations))
    n = max(len(runs), 1)
    split = len(counts) == 1 and min(counts) % 2 == 0
    return {"calls": len(runs), "gemm_launches": sorted(counts), "gemm_us": sum(gemm) / n,
            "gate_up_us": sum(first) / n if split else None, "down_us": sum(rest) / n if split else None,
            "gemm_and_copy_us": sum(with_copy) / n, "kernel_us": sum(total) / n, "kernels": summarize(runs)["kernels"]}


def pair_check(c, a_q, a_scale, w_q, w_scale, rows, experts, weight=None) -> float:
    """rel_err of GEMM outputs `c` [P, N] of sampled pairs against float64 products of the dequantized operands:
    A's rows `rows` by expert `experts`'s weights, times the routing `weight` where given (the down GEMM's)."""
    import torch
    from epmoe.bench.experts import rel_err
    from epmoe.quant.fp8 import dequantize_weight, fp8_dequantize
    a = fp8_dequantize(a_q[rows], a_scale[rows], SCALE_GROUP).double()
    ref = torch.empty(len(rows), w_q.shape[1], dtype=torch.float64, device=c.device)
    for e in experts.unique().tolist():
        sel = experts == e
        ref[sel] = a[sel] @ dequantize_weight(w_q[e], w_scale[e], tuple(BLOCK_SHAPE)).double().T
    if weight is not None:
        ref *= weight.double()[:, None]
    return rel_err(c, ref)


def split(times: dict) -> str:
    """'gate+up + down' microseconds, or the launch count where the launches do not split in two halves."""
    if times["gate_up_us"] is None:
        return f"{times['gemm_launches']} launches"
    return f"{times['gate_up_us']:.1f} + {times['down_us']:.1f}"


def file_digests(paths) -> dict:
    """{file name: sha256} of the files given (the tuning tables our lookup read)."""
    return {Path(f).name: hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in paths}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--vllm", required=True, type=Path,
                   help="a vLLM wheel's folder vllm/model_executor/layers/fused_moe (fused_moe.py, utils.py, configs/)")
    p.add_argument("--shapes", default=",".join(f"{s}:{T}" for s in ("deepseek-v3:32", "qwen3-30b-a3b:16",
                                                                     "gpt-oss-120b:", "mixtral-8x7b:")
                                                for T in (1, 16, 128, 512, 1024, 2048, 4096, 8192)),
                   help="PRESET:LOCAL_EXPERTS:T, comma-separated (default: four presets at eight T)")
    p.add_argument("--vllm-tables", default="this,NVIDIA_H200",
                   help="whose tables vLLM looks in: 'this' (this GPU's name) or a device part of vLLM's table names "
                        "(default: %(default)s)")
    p.add_argument("--forwards", type=int, default=5, help="profiled calls per side and point (default: %(default)s)")
    p.add_argument("--once", action="store_true",
                   help="for ncu: each side's checked call is its only one at each point (ours one forward, vLLM its "
                        "two GEMMs); nothing timed, the PyTorch profiler not started")
    p.add_argument("--output", help="write the results as JSON here")
    args = p.parse_args(argv)
    shapes = parse_shapes(args.shapes)
    if args.forwards < 1:
        p.error("--forwards: at least 1")
    import torch
    if not torch.cuda.is_available():
        print("vllm_gemms: needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton.language as tl
    from epmoe import contract
    from epmoe.activations import gated_activation
    from epmoe.bench.experts import bench_config, environment, make_routing, make_weights, rel_err, sample_rows
    from epmoe.bench.gpu_state import GpuStateSampler, nvidia_smi_id
    from epmoe.bench.gpu_timing import CudaClock
    from epmoe.kernels.tuning_table import lookup_config, table_paths_for_device
    from epmoe.layouts import FlatBatch
    from epmoe.quant.fp8 import fp8_quantize
    from epmoe.reference import reference_moe
    from epmoe.routing import Routing

    workdir = Path(tempfile.mkdtemp(prefix="vllm_gemms_"))
    vk, digests = vllm_functions(args.vllm, workdir)
    device = torch.device("cuda", torch.cuda.current_device())
    this_gpu = device_file_name(torch.cuda.get_device_name(device))
    tables = [this_gpu if t == "this" else t for t in args.vllm_tables.split(",")]
    clock = CudaClock(device)
    results, failed = [], 0

    def vllm_gemm(A, B, C, A_scale, B_scale, tw, layout, mul_routed_weight, top_k, config):
        vk.invoke_fused_moe_triton_kernel(A, B, C, A_scale, B_scale, tw, *layout, mul_routed_weight, top_k, config,
                                          compute_type=tl.bfloat16, use_fp8_w8a8=True, use_int8_w8a8=False,
                                          use_int8_w8a16=False, use_int4_w4a16=False, per_channel_quant=False,
                                          block_shape=BLOCK_SHAPE)

    def timed(run, families, copies=()):
        """`gemm_times` of `run`'s profiled calls and the GPU's clocks; under --once nothing (ncu counts the
        checked call's launches, which came before)."""
        if args.once:
            return {}, None
        runs, gpu_state = profile_runs(run, clock, sampler, args.forwards)
        return gemm_times(runs, families, copies), gpu_state

    made = {}       # (preset, experts) -> its config, weights and oracle, made once for all its T
    with GpuStateSampler(nvidia_smi_id(device)) as sampler:
        for preset, experts, T in shapes:
            if (preset, experts) not in made:
                made.clear()
                torch.cuda.empty_cache()
                cfg = bench_config(preset, "fp8_block", experts)
                gen = torch.Generator(device=device).manual_seed(0)
                made[(preset, experts)] = (cfg, *make_weights(cfg, device, gen))
            cfg, weights, oracle = made[(preset, experts)]
            gen = torch.Generator(device=device).manual_seed(T)
            E, k = cfg.num_experts, cfg.top_k
            H, Hp, Ip = cfg.hidden_size, cfg.padded_hidden_size, cfg.padded_intermediate_size
            ids, tw = make_routing("balanced", T, E, k, gen, device)
            x = torch.randn(T, H, generator=gen, device=device).to(torch.bfloat16)
            xp = torch.nn.functional.pad(x, (0, Hp - H))
            sample = sample_rows(T, gen, device)
            ref = reference_moe(x[sample], None, oracle, cfg, routing=Routing(ids[sample], tw[sample]), device=device)
            flops = 6.0 * T * k * H * cfg.intermediate_size
            point = dict(preset=preset, experts=E, T=T, top_k=k, hidden=Hp, intermediate=Ip, flops=flops)

            why = contract.experts_problem("triton", cfg, device.type)
            if why:
                print(f"skip {preset} E={E} T={T}: {why}", flush=True)
                continue
            backend = contract.experts_class("triton")(cfg, device)
            batch = FlatBatch(xp, ids, tw)
            err = rel_err(backend(batch, weights)[:, :H][sample], ref)
            times, gpu_state = timed(lambda: backend(batch, weights), OUR_GEMMS, OUR_ROW_COPIES)
            table_cfg, table_source = lookup_config(T, E, Hp, Ip, k, "fp8_block", device=device)
            ours = dict(times, check_rel_err=err,
                        check_ok=err <= CHECK_TOLERANCE, gpu_state=gpu_state, table_config=table_cfg.to_dict(),
                        table_source=table_source)
            failed += not ours["check_ok"]
            del backend

            xq, xs = fp8_quantize(xp, 128)
            c1 = torch.empty(T, k, 2 * Ip, dtype=torch.bfloat16, device=device)
            c3 = torch.empty(T, k, Hp, dtype=torch.bfloat16, device=device)
            timed_configs, vllm_rows = [], []
            for table in tables:
                config, source = vllm_config(vk, args.vllm, table, weights.w13.shape, weights.w2.shape, k, T)
                if config in timed_configs:
                    continue
                timed_configs.append(config)
                layout = vk._prepare_expert_assignment(ids, config, T, k, E, None, block_shape=BLOCK_SHAPE,
                                                       ignore_invalid_experts=True)
                vllm_gemm(xq, weights.w13, c1, xs, weights.w13_scale, tw, layout, False, k, config)
                act = gated_activation(cfg.activation, c1[..., :Ip].float(), c1[..., Ip:].float())
                aq, a_s = fp8_quantize(act.to(torch.bfloat16).reshape(T * k, Ip), 128)
                vllm_gemm(aq, weights.w2, c3, a_s, weights.w2_scale, tw, layout, True, 1, config)
                verr = rel_err(c3.float().sum(1)[:, :H][sample], ref)
                # each GEMM on its own against its FP8 operands (a misread scale would hide in the end-to-end
                # check's margin, which another rounding of the intermediate takes half of)
                tokens = sample[:PAIR_CHECK_TOKENS]
                pairs_e = ids[tokens].reshape(-1).long()
                rows = tokens.repeat_interleave(k)
                gate_up_err = pair_check(c1[tokens].reshape(-1, 2 * Ip), xq, xs, weights.w13, weights.w13_scale,
                                         rows, pairs_e)
                down_err = pair_check(c3[tokens].reshape(-1, Hp), aq, a_s, weights.w2, weights.w2_scale,
                                      rows * k + torch.arange(k, device=device).repeat(len(tokens)), pairs_e,
                                      tw[tokens].reshape(-1))

                def both():
                    vllm_gemm(xq, weights.w13, c1, xs, weights.w13_scale, tw, layout, False, k, config)
                    vllm_gemm(aq, weights.w2, c3, a_s, weights.w2_scale, tw, layout, True, 1, config)

                times, vstate = timed(both, (VLLM_GEMM,))
                row = dict(times, table=table, config=config, config_source=source,
                           check_rel_err=verr, gate_up_rel_err=gate_up_err, down_rel_err=down_err,
                           check_ok=verr <= CHECK_TOLERANCE and max(gate_up_err, down_err) <= PAIR_TOLERANCE,
                           gpu_state=vstate)
                failed += not row["check_ok"]
                vllm_rows.append(row)
            results.append(dict(point, ours=ours, vllm=vllm_rows))
            if args.once:
                line = (f"{preset:14s} E={E:<3d} T={T:<5d} ours one call, not timed (check {err:.1e}"
                        f"{'' if ours['check_ok'] else ' FAILED'})  [{table_source}]")
            else:
                line = (f"{preset:14s} E={E:<3d} T={T:<5d} ours GEMMs {ours['gemm_us']:9.1f} us ({split(ours)}; with "
                        f"the row copy {ours['gemm_and_copy_us']:.1f}; whole op {ours['kernel_us']:.1f}; check "
                        f"{err:.1e}{'' if ours['check_ok'] else ' FAILED'})  [{table_source}]")
            for row in vllm_rows:
                checks = (f"checks {row['check_rel_err']:.1e}, GEMMs {row['gate_up_rel_err']:.1e} "
                          f"{row['down_rel_err']:.1e}{'' if row['check_ok'] else ' FAILED'}")
                config = f"[{row['config_source']}: {json.dumps(row['config'], sort_keys=True)}]"
                if args.once:
                    line += f"\n{'':24s}vLLM {row['table']:22s} one call, not timed ({checks})  {config}"
                else:
                    line += (f"\n{'':24s}vLLM {row['table']:22s} {row['gemm_us']:9.1f} us ({split(row)}; {checks})"
                             f"  vLLM / ours {row['gemm_us'] / ours['gemm_us']:.2f}, with our row copy "
                             f"{row['gemm_us'] / ours['gemm_and_copy_us']:.2f}  {config}")
            print(line, flush=True)
            del c1, c3
    if sampler.error:
        print(f"# no clocks recorded: {sampler.error}", file=sys.stderr)
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"environment": environment(), "command": " ".join(sys.argv), "vllm_files_sha256": digests,
                       "tables_sha256": file_digests(table_paths_for_device(device)),
                       "method": "one checked call per side, not timed (--once)" if args.once else METHOD,
                       "results": results}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
