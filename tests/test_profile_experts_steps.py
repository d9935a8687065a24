"""benchmarks/profile_experts_steps.py's bookkeeping on a made-up trace: forwards cut at the sleep / flush
marks, kernels grouped by family, shares of the forward's kernel time, and bad --shapes refused."""
import pytest


def test_forwards_are_cut_at_the_marks_and_summed_by_family(benchmark_script):
    t = benchmark_script("profile_experts_steps")
    trace = [
        ("void at::native::vectorized_elementwise_kernel<4, at::native::bitwise_not_kernel_cuda>(...)", 0, 50),
        ("spin_kernel(long)", 50, 550),
        ("ws_grouped_gemm_kernel", 560, 760),
        ("void at::native::index_elementwise_kernel<128, 4>(int, ...)", 765, 785),
        ("gather_sum_kernel", 790, 810),
        ("void at::native::vectorized_elementwise_kernel<4, at::native::bitwise_not_kernel_cuda>(...)", 900, 950),
        ("spin_kernel(long)", 950, 1450),
        ("ws_grouped_gemm_kernel", 1460, 1640),
        ("gather_sum_kernel", 1650, 1670),
        ("void at::native::vectorized_elementwise_kernel<4, at::native::bitwise_not_kernel_cuda>(...)", 1700, 1750),
        ("ws_grouped_gemm_kernel", 1800, 1900),       # after the last flush, before no sleep: not a forward
    ]
    fwds = t.forwards_of(trace)
    assert [len(f) for f in fwds] == [3, 2]
    s = t.summarize(fwds)
    assert s["forwards"] == 2
    assert s["kernel_us"] == pytest.approx((240 + 200) / 2)
    assert s["span_us"] == pytest.approx((250 + 210) / 2)
    by = {k["kernel"]: k for k in s["kernels"]}
    assert by["ws_grouped_gemm_kernel"]["us"] == pytest.approx(190)
    assert by["at::native::index_elementwise_kernel"]["us"] == pytest.approx(10)
    assert sum(k["share"] for k in s["kernels"]) == pytest.approx(1.0)
    assert s["kernels"][0]["kernel"] == "ws_grouped_gemm_kernel"


def test_shapes_are_parsed_and_bad_ones_refused(benchmark_script):
    t = benchmark_script("profile_experts_steps")
    assert t.parse_shapes("deepseek-v3:32:8192, mixtral-8x7b::4096") == [("deepseek-v3", 32, 8192),
                                                                          ("mixtral-8x7b", None, 4096)]
    for bad in ("deepseek-v3:32", "deepseek-v3:32:many", ":32:8"):
        with pytest.raises(SystemExit, match="PRESET:LOCAL_EXPERTS:T"):
            t.parse_shapes(bad)
