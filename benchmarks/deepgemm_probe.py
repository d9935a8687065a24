"""Can DeepGEMM's grouped contiguous GEMMs (the `sgl-deep-gemm` wheel from PyPI, or DeepGEMM built from sources
over it by `deepgemm_build.py`: the log and JSON say which) run on this GPU, and how fast:
block-FP8 (activations per token-group of 128, 128 x 128 weight blocks) and BF16 at the deepseek-v3 32-expert
shard's and mixtral's expert GEMM shapes, T = 8192, each checked against a float32 product of the dequantized
operands (a relative error above 1e-2 is marked, and the script exits 1) and timed (do_bench medians, L2
flushed), the BF16 ones beside `torch._grouped_mm` on the same rows. Every expert gets the same row count here
(2048), where `benchmarks/profile_ws_gemm.py` times ours on a random routing's rows; the A scales are handed over
row-major, so DeepGEMM's own layout change of them is inside the timed call. Results: $OUT/dg_probe.json.
`--profile NAMES` (shape names below, comma-separated, e.g. "ds32 T=8192 gate_up"): instead, each named FP8 call
checked, then launched once inside an NVTX range `profiled` (its A scales MN-major already, so that DeepGEMM runs
no layout change of them there), for `ncu --nvtx --nvtx-include profiled/`."""
import json
import os
import subprocess
import sys
import time
import traceback

import torch
import triton

OUT = os.environ.get("OUT", "/tmp")
res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
       "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": []}


def log(*a):
    print(*a, flush=True)


log(f"# {' '.join(sys.argv)}; commit {os.environ.get('EPMOE_COMMIT', 'unknown')}; {res['gpu']}; torch {res['torch']}; "
    f"triton {res['triton']}; {res['date']}")
res["command"], res["commit"] = " ".join(sys.argv), os.environ.get("EPMOE_COMMIT", "unknown")
for cmd in ["which nvcc", "ls /usr/local", "nvcc --version", "echo CUDA_HOME=$CUDA_HOME"]:
    log("$", cmd, "->", subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip()[:400])
try:
    import deep_gemm
    log("deep_gemm imported from", deep_gemm.__file__)
    source = os.path.join(os.path.dirname(deep_gemm.__file__), "SOURCE")      # written by deepgemm_build.py
    res["deep_gemm"] = {"version": getattr(deep_gemm, "__version__", None),
                        "built_from": open(source).read().strip() if os.path.exists(source) else None}
    log("deep_gemm", res["deep_gemm"]["version"], "built from",
        res["deep_gemm"]["built_from"] or "no sources here (no SOURCE beside it): the wheel's own module")
    log("mk alignment", deep_gemm.get_mk_alignment_for_contiguous_layout())
except Exception:
    traceback.print_exc()
    json.dump(res, open(f"{OUT}/dg_probe.json", "w"), indent=1)
    sys.exit(1)

dev = torch.device("cuda")
gen = torch.Generator(device=dev).manual_seed(0)
try:
    import tvm_ffi
    log("tvm_ffi", getattr(tvm_ffi, "__version__", "?"), "from", tvm_ffi.__file__)
except ImportError as e:          # DeepGEMM 0.2.x needs none
    log("tvm_ffi not importable:", e)
# the plainest call first: one dense BF16 GEMM of 2-D tensors (tells a refusal of the grouped call's arguments
# from a library that cannot read any tensor it is handed)
try:
    a2, b2 = torch.randn(256, 512, device=dev).bfloat16(), torch.randn(384, 512, device=dev).bfloat16()
    d2 = torch.empty(256, 384, device=dev, dtype=torch.bfloat16)
    deep_gemm.bf16_gemm_nt(a2, b2, d2)
    torch.cuda.synchronize()
    ref2 = a2.float() @ b2.float().t()
    log(f"deepgemm dense bf16 256x384x512: rel err {((d2.float() - ref2).norm() / ref2.norm()).item():.2e}")
except Exception:
    traceback.print_exc()


def quant_rows(x):          # [M, K] -> fp8, [M, K/128] per token-group of 128
    m, k = x.shape
    v = x.float().view(m, k // 128, 128)
    s = v.abs().amax(-1).clamp(1e-4) / 448.0
    return (v / s[..., None]).to(torch.float8_e4m3fn).view(m, k), s


def quant_blocks(w):        # [G, N, K] -> fp8, [G, N/128, K/128]
    g, n, k = w.shape
    v = w.float().view(g, n // 128, 128, k // 128, 128)
    s = v.abs().amax(dim=(2, 4)).clamp(1e-4) / 448.0
    return (v / s[:, :, None, :, None]).to(torch.float8_e4m3fn).view(g, n, k), s


def problem(G, rows, N, K):
    M = G * rows
    a = torch.randn(M, K, device=dev, generator=gen)
    w = torch.randn(G, N, K, device=dev, generator=gen) / K ** 0.5
    m_idx = torch.arange(G, device=dev, dtype=torch.int32).repeat_interleave(rows)
    return a, w, m_idx


def check_fp8(G, rows, N, K):
    a, w, m_idx = problem(G, rows, N, K)
    aq, asf = quant_rows(a)
    wq, wsf = quant_blocks(w)
    d = torch.empty(a.shape[0], N, device=dev, dtype=torch.bfloat16)
    deep_gemm.m_grouped_fp8_gemm_nt_contiguous((aq, asf), (wq, wsf), d, m_idx)
    torch.cuda.synchronize()
    ad = (aq.float().view(-1, K // 128, 128) * asf[..., None]).view(-1, K)
    wd = (wq.float().view(G, N // 128, 128, K // 128, 128) * wsf[:, :, None, :, None]).view(G, N, K)
    ref = torch.bmm(ad.view(G, rows, K), wd.transpose(1, 2)).view(-1, N)
    err = ((d.float() - ref).norm() / ref.norm()).item()
    return err, (aq, asf, wq, wsf, d, m_idx)


def timed(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


shapes = [("ds32 T=8192 gate_up", 32, 2048, 4096, 7168), ("ds32 T=8192 down", 32, 2048, 7168, 2048),
          ("mixtral T=8192 gate_up", 8, 2048, 28672, 4096), ("mixtral T=8192 down", 8, 2048, 4096, 14336)]
if "--profile" in sys.argv:    # the named FP8 shapes' calls once each inside an NVTX range `profiled`, for ncu
    at = sys.argv.index("--profile") + 1
    names = sys.argv[at].split(",") if at < len(sys.argv) else []
    unknown = [n for n in names if n not in [s[0] for s in shapes]]
    if unknown or not names:
        log(f"--profile takes shape names, comma-separated: {[s[0] for s in shapes]}"
            f"{f'; unknown: {unknown}' if unknown else ''}")
        sys.exit(2)
    bad = False
    for name, G, rows, N, K in shapes:
        if name not in names:
            continue
        checked, (aq, asf, wq, wsf, d, m_idx) = check_fp8(G, rows, N, K)
        first = d.clone()
        # the A scales in the layout DeepGEMM's SM90 kernel reads (MN-major), so the profiled launch is the GEMM's
        asf_mn = asf.t().contiguous().t()
        d.zero_()
        deep_gemm.m_grouped_fp8_gemm_nt_contiguous((aq, asf_mn), (wq, wsf), d, m_idx)
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_push("profiled")
        deep_gemm.m_grouped_fp8_gemm_nt_contiguous((aq, asf_mn), (wq, wsf), d, m_idx)
        torch.cuda.nvtx.range_pop()
        torch.cuda.synchronize()
        # the profiled call's output against the checked call's (row-major scales; checked against float32 there)
        err = ((d.float() - first.float()).norm() / first.float().norm()).item()
        ok = checked <= 1e-2 and err <= 1e-3
        bad = bad or not ok
        log(f"profiled deepgemm fp8 {name}: rel err {checked:.2e} (row-major scales, against float32); the profiled "
            f"call (MN-major scales) against it {err:.2e}{'' if ok else '  DISAGREES'}")
        del aq, asf, asf_mn, wq, wsf, d, first
        torch.cuda.empty_cache()
    sys.exit(1 if bad else 0)

bad = False
for name, G, rows, N, K in shapes:
    try:
        err, (aq, asf, wq, wsf, d, m_idx) = check_fp8(G, rows, N, K)
        ms = timed(lambda: deep_gemm.m_grouped_fp8_gemm_nt_contiguous((aq, asf), (wq, wsf), d, m_idx))
        tf = 2.0 * G * rows * N * K / ms / 1e9
        bad = bad or not err <= 1e-2
        log(f"deepgemm fp8 {name}: {ms:.3f} ms {tf:.0f} TFLOP/s rel err {err:.2e}"
            f"{'  DISAGREES' if not err <= 1e-2 else ''}")
        res["rows"].append({"what": f"deepgemm fp8 {name}", "ms": ms, "tflops": tf, "rel_err": err})
        del aq, asf, wq, wsf, d
    except Exception:
        traceback.print_exc()
        bad = True
    if "mixtral" in name:
        continue
    try:          # BF16 grouped: deepgemm and torch._grouped_mm on the same rows
        a, w, m_idx = problem(G, rows, N, K)
        a, w = a.bfloat16(), w.bfloat16()
        d = torch.empty(a.shape[0], N, device=dev, dtype=torch.bfloat16)
        deep_gemm.m_grouped_bf16_gemm_nt_contiguous(a, w, d, m_idx)
        torch.cuda.synchronize()
        ref = torch.bmm(a.float().view(G, rows, K), w.float().transpose(1, 2)).view(-1, N)
        err = ((d.float() - ref).norm() / ref.norm()).item()
        ms = timed(lambda: deep_gemm.m_grouped_bf16_gemm_nt_contiguous(a, w, d, m_idx))
        offs = (torch.arange(1, G + 1, device=dev, dtype=torch.int32) * rows)
        wt = w.transpose(1, 2)
        ms_t = timed(lambda: torch._grouped_mm(a, wt, offs=offs))
        fl = 2.0 * G * rows * N * K / 1e9
        bad = bad or not err <= 1e-2
        log(f"deepgemm bf16 {name}: {ms:.3f} ms {fl / ms:.0f} TFLOP/s rel err {err:.2e}"
            f"{'  DISAGREES' if not err <= 1e-2 else ''}; torch._grouped_mm {ms_t:.3f} ms {fl / ms_t:.0f}")
        res["rows"].append({"what": f"deepgemm bf16 {name}", "ms": ms, "tflops": fl / ms, "rel_err": err,
                            "grouped_mm_ms": ms_t})
        del a, w, d
    except Exception:
        traceback.print_exc()
        bad = True
    torch.cuda.empty_cache()
    json.dump(res, open(f"{OUT}/dg_probe.json", "w"), indent=1)
json.dump(res, open(f"{OUT}/dg_probe.json", "w"), indent=1)
sys.exit(1 if bad else 0)
