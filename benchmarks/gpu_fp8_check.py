"""FP8 on one GPU: the FP8 test files, then the FP8 layer's time against BF16 at the DeepSeek-V3 shape.

Usage (on a CUDA machine, from the repository root):
    python benchmarks/gpu_fp8_check.py --out benchmarks/results/fp8_h200.json [--skip-tests]

For each T: every experts backend that the contract accepts for the BF16 layer and for the FP8 layers
(row-wise FP8 for torch._scaled_grouped_mm, block FP8 as in DeepSeek-V3 checkpoints) is built with the
same random weights, checked against the float64 oracle (FP8: on the dequantized weights), and its whole
forward (route, dispatch, experts, combine) timed: CUDA events, median of 20 after 5 warm-ups, the L2
flushed and the GPU kept busy before each timed run so that Python launch time does not leak in. Each
time is reported against two floors: the hit experts' weight bytes at the measured copy bandwidth, and
the FLOPs at the measured matrix rate (BF16, or FP8 through torch._scaled_mm).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from epmoe import Fp8Config, MoELayer, contract, reference_moe  # noqa: E402
from epmoe.presets import preset_config  # noqa: E402
from epmoe.testing import LayerExperts, compare  # noqa: E402


def backends_for(cfg) -> list[str]:
    """Experts backends the contract accepts for `cfg` on this GPU; the reference loop (256 experts in
    Python) only where nothing else runs the config (block FP8 until a Triton FP8 backend is registered)."""
    ok = [n for n in contract.EXPERTS if contract.pairing_problem("local", n, cfg, 1, "cuda") is None]
    fast = [n for n in ok if n != "reference"]
    return fast or ok


def run_tests(log_path: str) -> str:
    files = sorted(f"tests/{f}" for f in os.listdir(os.path.join(ROOT, "tests")) if f.startswith("test_fp8_"))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", *files], cwd=ROOT, capture_output=True,
                          text=True, timeout=400)
    with open(log_path, "w") as f:
        f.write(proc.stdout + proc.stderr)
    tail = [ln for ln in proc.stdout.splitlines() if ln.strip()][-1:]
    return tail[0] if tail else f"pytest exited {proc.returncode}"


def _busy(a: torch.Tensor) -> None:
    for _ in range(4):
        a @ a


def time_ms(fn, iters: int = 20, warmup: int = 5) -> float:
    flush = torch.empty(512 * 2 ** 20, dtype=torch.uint8, device="cuda")
    busy = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        flush.zero_()
        _busy(busy)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def ceilings() -> dict:
    n = 2 ** 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), iters=10, warmup=2)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    bf16_ms = time_ms(lambda: a @ b, iters=10, warmup=2)
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t().contiguous().t()
    one = torch.ones((), device="cuda")
    fp8_ms = time_ms(lambda: torch._scaled_mm(a8, b8, one, one, out_dtype=torch.bfloat16), iters=10, warmup=2)
    flops = 2 * 8192 ** 3
    return {"copy_TBps": 2 * n / copy_ms / 1e9, "bf16_TFLOPs": flops / bf16_ms / 1e9,
            "fp8_TFLOPs": flops / fp8_ms / 1e9}


def real_weights(layer, e):
    """Expert e of an unquantized layer at the real sizes (gate [I, H], up [I, H], down [H, I])."""
    H, I, Ip = layer.cfg.hidden_size, layer.cfg.intermediate_size, layer.w2.shape[2]
    return layer.w13[e, :I, :H], layer.w13[e, Ip:Ip + I, :H], layer.w2[e, :H, :I]


def build_layers(cfg_bf16, quants: dict, seed: int = 0):
    """The BF16 weights (random, fan-in scaled) and, per FP8 config, the same weights quantized on load."""
    bf16 = {}
    base = None
    for name in backends_for(cfg_bf16):
        try:
            layer = MoELayer(cfg_bf16, experts=name, device="cuda")
        except Exception as exc:
            bf16[name] = f"{type(exc).__name__}: {exc}"
            continue
        if base is None:
            g = torch.Generator(device="cuda").manual_seed(seed)
            H, I = cfg_bf16.hidden_size, cfg_bf16.intermediate_size
            for e in range(cfg_bf16.num_experts):
                layer.load_expert(e, gate_proj=torch.randn(I, H, generator=g, device="cuda") * H ** -0.5,
                                  up_proj=torch.randn(I, H, generator=g, device="cuda") * H ** -0.5,
                                  down_proj=torch.randn(H, I, generator=g, device="cuda") * I ** -0.5)
            base = layer
        else:
            for e in range(cfg_bf16.num_experts):
                layer.load_expert(e, *real_weights(base, e))
        bf16[name] = layer
    fp8 = {}
    for qname, quant in quants.items():
        cfg = dataclasses.replace(cfg_bf16, quant=quant)
        for name in backends_for(cfg):
            try:
                layer = MoELayer(cfg, experts=name, device="cuda")
                for e in range(cfg.num_experts):
                    layer.load_expert(e, *real_weights(base, e))
            except Exception as exc:     # record it; the other layers still run
                fp8[f"{qname}/{name}"] = f"{type(exc).__name__}: {exc}"
                continue
            fp8[f"{qname}/{name}"] = layer
    return base, bf16, fp8


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks/results/fp8_h200.json"))
    ap.add_argument("--tokens", default="128,4096")
    ap.add_argument("--skip-tests", action="store_true")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    t0 = time.time()
    result = {"what": "FP8 vs BF16 MoE layer forward, DeepSeek-V3 shape (E=256, H=7168, I=2048, k=8), one GPU",
              "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": __import__("triton").__version__ if __import__("importlib").util.find_spec("triton") else None,
              "date": datetime.date.today().isoformat(), "method": __doc__.split("\n\n")[1].replace("\n", " ")}
    if not args.skip_tests:
        result["tests"] = run_tests(os.path.join(os.path.dirname(args.out), "fp8_pytest.log"))
        print("tests:", result["tests"], flush=True)
    result["ceilings"] = ceil = ceilings()
    print("ceilings:", ceil, flush=True)

    cfg = preset_config("deepseek-v3")
    quants = {"fp8_channel_token": Fp8Config(weight_block=None, per_channel_weights=True, activation="per_token"),
              "fp8_block128_group128": Fp8Config()}
    base, bf16, fp8 = build_layers(cfg, quants)
    H, I, k = cfg.hidden_size, cfg.intermediate_size, cfg.top_k
    rows = []
    for T in [int(t) for t in args.tokens.split(",")]:
        g = torch.Generator(device="cuda").manual_seed(T)
        x = torch.randn(T, H, generator=g, device="cuda").to(cfg.dtype)
        logits = torch.randn(T, cfg.num_experts, generator=g, device="cuda")
        routing = base.compute_routing(x, logits)
        hit = int(torch.unique(routing.topk_ids).numel())
        flops = 6 * T * k * H * I
        for label, layer in [*((f"bf16/{n}", l) for n, l in bf16.items()), *fp8.items()]:
            if isinstance(layer, str):
                rows.append({"T": T, "layer": label, "error": layer})
                continue
            try:
                rows.append(measure(layer, label, x, logits, T, hit, flops, ceil))
            except Exception as exc:
                rows.append({"T": T, "layer": label, "error": f"{type(exc).__name__}: {exc}"[:500]})
            print(json.dumps(rows[-1]), flush=True)
        ok = [r for r in rows if r["T"] == T and "ms" in r]
        baseline = min((r["ms"] for r in ok if r["quant"] == "bf16"), default=None)
        for r in ok:
            if baseline:
                r["speedup_vs_best_bf16"] = round(baseline / r["ms"], 2)
    result["results"] = rows
    lines = []
    for r in rows:
        if "ms" not in r:
            lines.append(f"T={r['T']:>5} {r['layer']:<40} FAILED: {r['error'][:150]}")
            continue
        lines.append(f"T={r['T']:>5} {r['layer']:<40} {r['ms']:8.3f} ms  x{r.get('speedup_vs_best_bf16', 0):.2f} vs "
                     f"best BF16  {r['ratio_to_floor']:.2f}x floor  err {r['rel_err_vs_oracle']:.1e}")
    result["summary"] = lines
    result["wall_s"] = round(time.time() - t0, 1)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print("\n".join(lines))


def measure(layer, label, x, logits, T, hit, flops, ceil) -> dict:
    """Check one layer against the oracle on the first 128 tokens, then time its whole forward."""
    cfg = layer.cfg
    H, I = cfg.hidden_size, cfg.intermediate_size
    is_fp8 = cfg.quant is not None
    wbytes = hit * 3 * H * I * (1 if is_fp8 else 2)
    with torch.no_grad():
        out = layer(x, logits)
        n = min(T, 128)
        experts = LayerExperts(layer)
        ref = reference_moe(x[:n], logits[:n], experts, cfg, score_correction_bias=layer.score_correction_bias,
                            device="cuda")
        err = compare(out[:n], ref)
        ms = time_ms(lambda: layer(x, logits))
    floor_bytes_ms = wbytes / (ceil["copy_TBps"] * 1e12) * 1e3
    floor_flops_ms = flops / ((ceil["fp8_TFLOPs"] if is_fp8 else ceil["bf16_TFLOPs"]) * 1e12) * 1e3
    floor = max(floor_bytes_ms, floor_flops_ms)
    return {"T": T, "layer": label, "quant": cfg.quant_scheme.name if is_fp8 else "bf16",
            "experts": layer.experts_name, "activation_handoff": layer.activation_handoff,
            "ms": round(ms, 4), "experts_hit": hit, "weight_GB_read": round(wbytes / 1e9, 3),
            "hit_weight_TBps": round(wbytes / ms / 1e9, 3), "TFLOPs": round(flops / ms / 1e9, 1),
            "floor_ms": round(floor, 4), "floor_is": "bytes" if floor_bytes_ms >= floor_flops_ms else "flops",
            "ratio_to_floor": round(ms / floor, 2), "rel_err_vs_oracle": float(f"{err.rel_err:.3e}"),
            "finite": err.finite}


if __name__ == "__main__":
    main()
