"""The one FP8 formula: exact values, rounding on the e4m3 grid, shapes, and bit-identical Triton and
torch implementations (Triton through TRITON_INTERPRET=1 on the CPU, natively on a GPU)."""
import json
import os
import subprocess
import sys

import pytest
import torch

import epmoe
from epmoe.quant.fp8 import (FP8_DTYPE, dequantize_weight, fp8_dequantize, fp8_quantize_torch, quantize_weight,
                             scale_from_amax)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == FP8_DTYPE else t.view(torch.int32)


def _e4m3_grid_probe() -> torch.Tensor:
    """One row whose first group has amax 448 (scale exactly 1.0), so the cast itself is probed: every
    e4m3fn value, every midpoint (ties), midpoints +-1 float32 ulp, signed zeros, tiny values."""
    values = torch.arange(0, 127, dtype=torch.uint8).view(FP8_DTYPE).float()    # 0 .. 448, all finite
    mids = (values[1:] + values[:-1]) / 2
    probe = torch.cat([values, mids, torch.nextafter(mids, torch.tensor(0.0)),
                       torch.nextafter(mids, torch.tensor(1e4)), torch.tensor([0.0, 2.0 ** -12, 2.0 ** -10, 3e-3])])
    probe = torch.cat([probe, -probe, torch.tensor([-0.0])])
    probe[0] = 448.0
    n = -(-probe.numel() // 128) * 128
    row = torch.zeros(n)
    row[:probe.numel()] = probe
    return row.unsqueeze(0)


def test_formula_by_hand():
    x = torch.tensor([[1.0, -2.0, 0.5, 300.0], [0.0, 0.0, 0.0, 0.0]])
    q, s = epmoe.fp8_quantize(x, group_size=None)
    amax = torch.tensor([300.0, 0.0])
    want_scale = torch.maximum(amax, torch.tensor(1e-12)) * torch.tensor(1.0 / 448.0, dtype=torch.float32)
    assert s.dtype == torch.float32 and s.shape == (2, 1)
    assert torch.equal(_bits(s[:, 0]), _bits(want_scale))
    want_q = (x / s).clamp(-448, 448).to(FP8_DTYPE)
    assert q.dtype == FP8_DTYPE and torch.equal(_bits(q), _bits(want_q))
    assert q[0, 3].float().item() == 448.0 and torch.all(q[1].float() == 0)


def test_scale_is_a_multiplication_not_a_division():
    """amax * (1/448) and amax / 448 differ in the last bit for some amax; we use the former."""
    amax = torch.rand(100_000) * 1000
    mult = scale_from_amax(amax)
    div = amax / 448.0
    assert torch.equal(_bits(mult), _bits(amax * torch.tensor(1.0 / 448.0, dtype=torch.float32)))
    assert not torch.equal(_bits(mult), _bits(div)), "the probe no longer separates the two formulas"


@pytest.mark.parametrize("shape,group", [((5, 256), 128), ((3, 200), 128), ((4, 200), None), ((0, 256), 128),
                                         ((2, 3, 300), 128), ((6, 96), 32)])
def test_shapes_and_round_trip(shape, group):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 5
    q, s = epmoe.fp8_quantize(x, group_size=group)
    H = shape[-1]
    n = 1 if group is None else -(-H // group)
    assert q.shape == x.shape and q.dtype == FP8_DTYPE
    assert s.shape == (*shape[:-1], n) and s.dtype == torch.float32
    d = fp8_dequantize(q, s, group)
    if x.numel():
        rel = ((d - x).norm() / x.norm()).item()
        assert rel < 0.04, rel           # 3 mantissa bits: ~2.6% rms for Gaussian groups
        # the largest magnitude of each group lands on +-448 (within one rounding)
        assert q.float().abs().max().item() == 448.0


def test_partial_last_group_equals_zero_padding():
    """A hidden size of 200 with groups of 128 and the same row padded to 256 with zeros agree."""
    x = torch.randn(7, 200)
    q, s = epmoe.fp8_quantize(x)
    qp, sp = epmoe.fp8_quantize(torch.nn.functional.pad(x, (0, 56)))
    assert torch.equal(_bits(q), _bits(qp[:, :200].contiguous())) and torch.equal(_bits(s), _bits(sp))


def test_rounding_on_the_e4m3_grid_is_nearest_even():
    row = _e4m3_grid_probe()
    q, s = fp8_quantize_torch(row, 128)
    assert s[0, 0].item() == 1.0
    # torch's cast is the reference for round-to-nearest-even; this pins the behaviour we rely on
    assert torch.tensor([1.0625]).to(FP8_DTYPE).float().item() == 1.0
    assert torch.tensor([1.1875]).to(FP8_DTYPE).float().item() == 1.25
    assert torch.equal(_bits(q[:, :128]), _bits(row[:, :128].clamp(-448, 448).to(FP8_DTYPE)))


def test_bad_arguments():
    with pytest.raises(ValueError, match="group_size"):
        epmoe.fp8_quantize(torch.randn(2, 8), group_size=0)
    with pytest.raises(TypeError, match="floating-point"):
        epmoe.fp8_quantize(torch.ones(2, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="impl"):
        epmoe.fp8_quantize(torch.randn(2, 8), impl="cuda")


@pytest.mark.parametrize("granularity,block", [("block", (128, 128)), ("block", (64, 32)), ("channel", None),
                                               ("tensor", None)])
def test_weight_quantization_layouts(granularity, block):
    w = torch.randn(200, 300) * 0.05
    w[:128, :128] = 0                      # an all-zero block
    q, s = quantize_weight(w, granularity, block)
    assert q.shape == w.shape and q.dtype == FP8_DTYPE
    if granularity == "block":
        assert s.shape == (-(-200 // block[0]), -(-300 // block[1]))
    elif granularity == "channel":
        assert s.shape == (200,)
    else:
        assert s.numel() == 1
    d = dequantize_weight(q, s, block)
    assert ((d - w).norm() / w.norm()).item() < 0.04
    assert torch.all(d[:128, :128] == 0)
    assert torch.isfinite(s).all() and (s > 0).all()


# ------------------------------------------------------------------------------- Triton vs torch
_TRITON_CASES = [((5, 256), 128, "randn"), ((3, 200), 128, "randn"), ((4, 200), None, "randn"),
                 ((0, 256), 128, "randn"), ((2, 3, 300), 128, "randn"), ((6, 1000), 64, "randn"),
                 ((4, 384), 128, "zero_groups"), ((1, 640), 128, "grid"), ((8, 512), 128, "wide"),
                 ((4, 256), 128, "tiny")]


def _case_input(shape, kind):
    g = torch.Generator().manual_seed(hash(kind) % 1000)
    if kind == "grid":
        return _e4m3_grid_probe()
    x = torch.randn(*shape, generator=g)
    if kind == "zero_groups":
        x[:, 128:256] = 0.0                 # all-zero groups: scale 1e-12/448, q = 0
        x[1] = 0.0
    if kind == "wide":                      # magnitudes from 1e-6 to 1e4 inside one row
        x = x * torch.logspace(-6, 4, shape[-1])
    if kind == "tiny":                      # quotients below float32's normal range, signed zeros, subnormal x
        x[0] = x[0] * 1e-40                 # subnormal values only: amax under the floor
        x[1, ::3] = x[1, ::3] * 1e-39       # subnormal values beside normal ones
        x[1, 1::7] = -0.0
        x[2] = x[2] * 1e-13                 # amax under the floor, normal values
        x[3, ::2] = x[3, ::2] * 1e-30       # normal values whose quotient underflows
        x[3, 5] = -0.0
    if kind == "nonfinite":                 # NaN and infinities: torch keeps them (NaN groups, x / inf)
        x[0, 5] = float("nan")
        x[1, 130] = float("inf")
        x[2, 300] = -float("inf")
        x[3, 7], x[3, 140] = float("inf"), float("nan")
    return x


def _same(a: torch.Tensor, b: torch.Tensor, finite_groups_only=None) -> bool:
    """Equal values, NaN where the other has NaN (whatever its sign bits); `finite_groups_only` (q [R, H],
    group): compare only the groups whose inputs are finite."""
    a, b = a.float(), b.float()
    same = (a == b) | (a.isnan() & b.isnan())
    if finite_groups_only is not None:
        x, group = finite_groups_only
        finite = x.reshape(x.shape[0], -1, group).isfinite().all(-1, keepdim=True)
        same = same.reshape(finite.shape[0], -1, group) | ~finite
    return bool(same.all())


def _compare_impls(device: str) -> dict:
    from epmoe.kernels.fp8_quant import fp8_quantize_triton
    out = {}
    for shape, group, kind in _TRITON_CASES:
        x = _case_input(shape, kind).to(device)
        q1, s1 = fp8_quantize_torch(x, group)
        q2, s2 = fp8_quantize_triton(x, group)
        out[f"{shape}-{group}-{kind}"] = [torch.equal(_bits(q1), _bits(q2)), torch.equal(_bits(s1), _bits(s2)),
                                          list(s2.shape) == list(s1.shape)]
        if device == "cuda":                # the default there is the GPU-only form: the portable one too
            q3, s3 = fp8_quantize_triton(x, group, gpu_rounding=False)
            out[f"{shape}-{group}-{kind}-portable"] = [torch.equal(_bits(q1), _bits(q3)),
                                                       torch.equal(_bits(s1), _bits(s3)), True]
        if device == "cuda":                # bf16 inputs too (the interpreter is float32-only)
            xb = x.to(torch.bfloat16)
            q1, s1 = fp8_quantize_torch(xb, group)
            q2, s2 = fp8_quantize_triton(xb, group)
            out[f"{shape}-{group}-{kind}-bf16"] = [torch.equal(_bits(q1), _bits(q2)),
                                                   torch.equal(_bits(s1), _bits(s2)), True]
    return out


def _compare_counted(device: str) -> dict:
    """Batched rows [L, C, H] with counts: the rows below each count bit for bit as torch quantizes them, the
    rows past them (padding) left as the output held them; counts that do not go with the rows are refused.
    With a program per row of the capacity (the default at these sizes) and with programs that walk several
    rows (`counted_slots` made to give 3 and 2 programs per block of 5 rows), a count of 0 and one past the
    capacity (all its rows)."""
    from epmoe.kernels import fp8_quant
    from epmoe.kernels.fp8_quant import fp8_quantize_triton
    x = _case_input((15, 384), "normal").reshape(3, 5, 384).to(device)
    out = {}
    defaults = fp8_quant.COUNTED_ROW_PROGRAMS, fp8_quant.COUNTED_SERIAL_ROWS
    try:
        for programs, serial, want_slots in ((*defaults, 5), (1, 2, 3), (6, 3, 2)):
            fp8_quant.COUNTED_ROW_PROGRAMS, fp8_quant.COUNTED_SERIAL_ROWS = programs, serial
            slots = fp8_quant.counted_slots(3, 5)
            for counts_list in ([5, 0, 2], [7, 1, 4]):
                counts = torch.tensor(counts_list, dtype=torch.int32, device=device)
                for group in (128, None):
                    q1, s1 = fp8_quantize_torch(x, group)
                    held = (torch.full(q1.shape, 3.0, device=device).to(q1.dtype),
                            torch.full(s1.shape, 5.0, device=device))
                    q2, s2 = fp8_quantize_triton(x, group, counts=counts, out=held)
                    out[f"counted-{group}-{counts_list}-{slots}-slots"] = [
                        slots == want_slots,
                        all(torch.equal(_bits(a[e, :n]), _bits(b[e, :n])) for a, b in ((q1, q2), (s1, s2))
                            for e, n in enumerate(counts_list)),
                        all(bool((q2[e, n:].float() == 3.0).all() and (s2[e, n:] == 5.0).all())
                            for e, n in enumerate(counts_list)),
                        q2.data_ptr() == held[0].data_ptr() and list(s2.shape) == list(s1.shape)]
    finally:
        fp8_quant.COUNTED_ROW_PROGRAMS, fp8_quant.COUNTED_SERIAL_ROWS = defaults
    counts = torch.tensor([5, 0, 2], dtype=torch.int32, device=device)
    refused = []
    for rows, c in ((x.reshape(15, 384), counts), (x, counts[:2]), (x, counts.to("meta"))):
        try:
            fp8_quantize_triton(rows, 128, counts=c)
            refused.append(False)
        except ValueError as e:
            refused.append("counts go with rows [L, C, H]" in str(e))
    out["refused"] = refused
    return out


def _assert_all_identical(result: dict):
    bad = {k: v for k, v in result.items() if not all(v)}
    assert not bad, f"Triton and torch differ: {bad} (each case's checks in order, False where one failed)"


def _under_the_interpreter(compare: str) -> dict:
    """This module's `compare('cpu')` in a child process with TRITON_INTERPRET=1 (set before Triton loads)."""
    pytest.importorskip("triton")
    code = ("import json, sys; sys.path.insert(0, %r); sys.path.insert(0, %r); "
            "import test_fp8_quantize as t; print('RESULT' + json.dumps(t.%s('cpu')))"
            % (ROOT, os.path.join(ROOT, "tests"), compare))
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


def test_triton_bit_identical_cpu_interpreter():
    _assert_all_identical(_under_the_interpreter("_compare_impls"))


def test_triton_quantizes_the_rows_below_each_count_cpu_interpreter():
    _assert_all_identical(_under_the_interpreter("_compare_counted"))


def test_counted_quantization_programs_per_block():
    """`counted_slots`: 2048 programs along the rows over the blocks, at least C / 16 a block (no program walks
    more than 16 rows), at most C (one a row): the low-latency layouts of 8 ranks at the deepseek-v3 shard
    (C = 8 x 128), a wide expert count with a small capacity, a tight layout, one row."""
    pytest.importorskip("triton", reason="the counted quantization lives in the Triton kernels' module")
    from epmoe.kernels.fp8_quant import counted_slots
    cases = {(32, 1024): 64, (4, 8192): 512, (32, 32768): 2048, (256, 16): 8, (32, 300): 64, (32, 40): 40,
             (8, 128): 128, (1, 1): 1, (0, 5): 5}
    assert {shape: counted_slots(*shape) for shape in cases} == cases


def _compare_nonfinite(device: str) -> dict:
    """Torch against Triton (and, on a GPU, its GPU form) on NaN and infinities: q and scales bit for bit in
    the finite groups, a NaN scale where torch's is NaN or infinite (the Triton form's), and the
    dequantized values q x scale NaN exactly where torch's are (the whole of each non-finite group)."""
    from epmoe.kernels.fp8_quant import fp8_quantize_triton
    from epmoe.quant.fp8 import fp8_dequantize
    x = _case_input((4, 384), "nonfinite").to(device)
    q1, s1 = fp8_quantize_torch(x, 128)
    assert s1.isnan().any() and s1.isinf().any()        # the case holds both kinds of group
    forms = {"triton": fp8_quantize_triton(x, 128)}
    if device == "cuda":               # the default there is the GPU-only form: the portable one too
        forms["portable"] = fp8_quantize_triton(x, 128, gpu_rounding=False)
    nan1 = fp8_dequantize(q1, s1).isnan()
    finite = s1.isfinite()
    return {name: [_same(q1, q, (x, 128)), torch.equal(_bits(s1[finite]), _bits(s[finite])),
                   bool(s[~finite].isnan().all()), torch.equal(fp8_dequantize(q, s).isnan(), nan1)]
            for name, (q, s) in forms.items()}


def test_triton_keeps_nonfinite_values_as_torch_does_cpu_interpreter():
    _assert_all_identical(_under_the_interpreter("_compare_nonfinite"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_bit_identical_gpu():
    pytest.importorskip("triton")
    _assert_all_identical(_compare_impls("cuda"))
    _assert_all_identical(_compare_nonfinite("cuda"))
    _assert_all_identical(_compare_counted("cuda"))
    x = torch.randn(4096, 7168, device="cuda", dtype=torch.bfloat16)
    for group in (128, None):
        a, b = fp8_quantize_torch(x, group), epmoe.fp8_quantize(x, group)      # auto = Triton on CUDA
        assert torch.equal(_bits(a[0]), _bits(b[0])) and torch.equal(_bits(a[1]), _bits(b[1]))


@pytest.mark.parametrize("case", ["gu_fp8_deepseek", "gu_fp8_deepseek_rescale"])
def test_the_formula_leaves_the_fp8_gate_up_k_loop_without_spills_sm90(case):
    """The library's FP8 gate+up kernel runs the formula in its epilogue, at 255 registers: how the formula's
    NaN-keeping maximum is written moves ptxas's spills into the K loop (`tl.maximum(..., propagate_nan=ALL)`
    as the reduction's combine put one there under Triton 3.6). Compiled for sm_90, no GPU needed."""
    pytest.importorskip("triton", reason="the sm_90 cross-compile needs Triton (the [triton] extra)")
    from epmoe.kernels.xcompile import CASES, CrossCompileUnavailable, compile_case, local_accesses_in_mma_loops
    try:
        compiled = compile_case(*CASES[case])
    except CrossCompileUnavailable as exc:
        pytest.skip(str(exc))
    assert local_accesses_in_mma_loops(compiled) in (0, None)
