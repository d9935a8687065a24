"""benchmarks/vllm_gemms.py without a GPU and without vLLM: the stand-in for vLLM's layout of pairs, the reading
of named functions out of a folder's files, the table lookup, and the per-call GEMM sums."""
import json
import textwrap

import pytest
import torch


def stand_ins(benchmark_script):
    namespace = {}
    exec(benchmark_script("vllm_gemms")._STUBS, namespace)
    return namespace


@pytest.mark.parametrize("T,k,E,block", [(37, 8, 32, 16), (300, 2, 8, 64), (3, 4, 128, 16), (1, 1, 4, 64)])
def test_layout_stand_in_puts_every_pair_once_in_its_experts_padded_run(benchmark_script, T, k, E, block):
    align = stand_ins(benchmark_script)["moe_align_block_size"]
    gen = torch.Generator().manual_seed(T)
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]).int()
    sorted_ids, expert_ids, total = align(ids, block, E)
    numel = T * k
    flat = ids.reshape(-1).long()
    counts = torch.bincount(flat, minlength=E)
    padded = (counts + block - 1) // block * block
    assert int(total) == int(padded.sum())
    # the buffers as long as vLLM makes them
    longest = numel + E * (block - 1)
    assert sorted_ids.numel() == (min(numel * block, longest) if numel < E else longest)
    assert expert_ids.numel() == -(-sorted_ids.numel() // block)
    used = sorted_ids[:int(total)]
    real = used[used < numel].long()
    assert sorted(real.tolist()) == list(range(numel))          # every pair exactly once
    assert bool((sorted_ids[int(total):] == numel).all())       # nothing but pads past the used length
    for b in range(int(total) // block):
        rows = used[b * block:(b + 1) * block].long()
        e = int(expert_ids[b])
        mine = rows[rows < numel]
        assert mine.numel() > 0 and bool((flat[mine] == e).all())      # a block holds one expert's pairs
        assert bool((rows[:mine.numel()] == mine).all())               # its pads after them
        assert mine.tolist() == sorted(mine.tolist())                  # in pair order (a stable sort)
    assert expert_ids[:int(total) // block].tolist() == sorted(expert_ids[:int(total) // block].tolist())


def test_stand_in_platform_answers_for_the_capability_it_is_given(benchmark_script):
    platform = stand_ins(benchmark_script)["current_platform"]
    platform.capability = (9, 0)
    assert platform.is_device_capability(90) and not platform.is_device_capability(100)
    assert platform.is_device_capability_family(90) and not platform.is_device_capability_family(100)
    platform.capability = (10, 0)
    assert platform.is_device_capability_family(100) and not platform.is_device_capability(90)


def fake_vllm(tmp_path, drop=None):
    folder = tmp_path / "fused_moe"
    (folder / "configs").mkdir(parents=True)
    bodies = {
        "utils.py": """
            import functools

            @functools.lru_cache
            def enable_swap_ab(BLOCK_SIZE_M: int, BLOCK_SIZE_N: int) -> bool:
                return current_platform.is_device_capability(90) and BLOCK_SIZE_M < 64

            def not_wanted():
                raise AssertionError("read although not named")
            """,
        "fused_moe.py": """
            import triton

            @triton.jit
            def write_zeros_to_output(x):
                return x

            @triton.jit
            def fused_moe_kernel(x):
                return x

            def invoke_fused_moe_triton_kernel(*args, **kwargs):
                return "launched"

            def _prepare_expert_assignment(topk_ids, config, *args, **kwargs):
                return moe_align_block_size(topk_ids, config["BLOCK_SIZE_M"], 4)

            def get_default_config(M, E, N, K, topk, dtype, block_shape=None):
                return {"BLOCK_SIZE_M": 16 if M <= 64 else 64, "from": "default", "args": [M, E, N, K, topk]}

            def _moe_config_shape(w2_shape, dtype):
                E, _, N = w2_shape
                return E, N
            """,
    }
    for name, body in bodies.items():
        text = textwrap.dedent(body)
        if drop:
            text = text.replace(f"def {drop}(", f"def renamed_{drop}(")
        (folder / name).write_text(text)
    return folder


def test_named_functions_are_read_out_with_their_decorators_and_the_stand_ins(benchmark_script, tmp_path):
    t = benchmark_script("vllm_gemms")
    vk, digests = t.vllm_functions(fake_vllm(tmp_path), tmp_path)
    assert set(digests) == {"utils.py", "fused_moe.py"} and all(len(d) == 64 for d in digests.values())
    assert not hasattr(vk, "not_wanted")
    assert type(vk.fused_moe_kernel).__name__ == "JITFunction"
    assert hasattr(vk.enable_swap_ab, "cache_info")                  # its lru_cache kept
    vk.current_platform.capability = (9, 0)
    assert vk.enable_swap_ab(16, 64) and not vk.enable_swap_ab(64, 64)
    assert vk.invoke_fused_moe_triton_kernel() == "launched"
    # the read function calls the stand-in layout
    _, expert_ids, total = vk._prepare_expert_assignment(torch.tensor([[0, 1], [1, 3]]), {"BLOCK_SIZE_M": 4})
    assert int(total) == 12 and expert_ids[:3].tolist() == [0, 1, 3]


def test_a_missing_function_or_file_is_named(benchmark_script, tmp_path):
    t = benchmark_script("vllm_gemms")
    with pytest.raises(SystemExit, match="no get_default_config"):
        t.vllm_functions(fake_vllm(tmp_path, drop="get_default_config"), tmp_path)
    with pytest.raises(SystemExit, match="utils.py"):
        folder = fake_vllm(tmp_path / "other")
        (folder / "utils.py").unlink()
        t.vllm_functions(folder, tmp_path)


def test_device_names_as_vllm_spells_them_in_its_tables(benchmark_script):
    t = benchmark_script("vllm_gemms")
    assert t.device_file_name("NVIDIA H100 80GB HBM3") == "NVIDIA_H100_80GB_HBM3"
    assert t.device_file_name("NVIDIA H200") == "NVIDIA_H200"
    assert t.device_file_name("NVIDIA H200 NVL") == "NVIDIA_H200"
    assert t.device_file_name("NVIDIA A100-SXM4/80GB") == "NVIDIA_A100-SXM4_80GB"


def test_the_table_gives_the_closest_batch_and_no_table_the_default(benchmark_script, tmp_path):
    t = benchmark_script("vllm_gemms")
    folder = fake_vllm(tmp_path)
    vk, _ = t.vllm_functions(folder, tmp_path)
    name = "E=32,N=2048,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128,128].json"
    (folder / "configs" / name).write_text(json.dumps({"triton_version": "3.6", "16": {"BLOCK_SIZE_M": 16},
                                                      "1024": {"BLOCK_SIZE_M": 64}, "4096": {"BLOCK_SIZE_M": 128}}))
    w13, w2 = (32, 4096, 7168), (32, 7168, 2048)
    assert t.vllm_config(vk, folder, "NVIDIA_H200", w13, w2, 8, 3000) == ({"BLOCK_SIZE_M": 128}, f"{name} [4096]")
    assert t.vllm_config(vk, folder, "NVIDIA_H200", w13, w2, 8, 100)[0] == {"BLOCK_SIZE_M": 16}
    config, source = t.vllm_config(vk, folder, "NVIDIA_H100_80GB_HBM3", w13, w2, 8, 100)
    assert source == "vLLM's default" and config["from"] == "default" and config["args"] == [100, 32, 2048, 7168, 8]


def test_gemm_times_sum_the_named_kernels_per_call(benchmark_script):
    t = benchmark_script("vllm_gemms")
    runs = [[("moe_gemm_kernel", 0, 100), ("_fp8_quant_kernel", 100, 110), ("moe_gemm_kernel", 110, 160),
             ("sum_slots_kernel", 160, 170)],
            [("moe_gemm_kernel", 0, 120), ("_fp8_quant_kernel", 120, 130), ("moe_gemm_kernel", 130, 170),
             ("sum_slots_kernel", 170, 180)]]
    s = t.gemm_times(runs, t.OUR_GEMMS, t.OUR_ROW_COPIES)
    assert s["calls"] == 2 and s["gemm_launches"] == [2]
    assert s["gemm_us"] == pytest.approx(155) and s["gate_up_us"] == pytest.approx(110)
    assert s["down_us"] == pytest.approx(45) and s["kernel_us"] == pytest.approx(175)
    assert s["gemm_and_copy_us"] == pytest.approx(155)                  # no copy kernel in these calls
    assert {k["kernel"] for k in s["kernels"]} == {"moe_gemm_kernel", "_fp8_quant_kernel", "sum_slots_kernel"}
    assert t.split(s) == "110.0 + 45.0"
    assert t.gemm_times(runs, (t.VLLM_GEMM,))["gemm_us"] == 0.0


def test_tail_tiles_split_the_launches_in_halves_and_the_row_copy_counts_beside(benchmark_script):
    """With tail tiles the tile path launches gate+up body, gate+up tail, down body, down tail: the gate+up is
    the first half (the first launch alone would call the gate+up's tail a down); the Gluon pipeline's copy of the
    rows into its layout is counted in `gemm_and_copy_us`, not in the GEMMs."""
    t = benchmark_script("vllm_gemms")
    run = [("pairs_to_layout_kernel", 0, 30), ("moe_gemm_kernel", 30, 330), ("moe_gemm_kernel", 330, 370),
           ("moe_gemm_kernel", 370, 520), ("moe_gemm_kernel", 520, 540), ("gather_sum_kernel", 540, 560)]
    s = t.gemm_times([run], t.OUR_GEMMS, t.OUR_ROW_COPIES)
    assert s["gemm_launches"] == [4]
    assert s["gate_up_us"] == pytest.approx(340) and s["down_us"] == pytest.approx(170)
    assert s["gemm_us"] == pytest.approx(510) and s["gemm_and_copy_us"] == pytest.approx(540)
    odd = t.gemm_times([run[:4]], t.OUR_GEMMS)
    assert odd["gate_up_us"] is None and odd["down_us"] is None and t.split(odd) == "[3] launches"
    mixed = t.gemm_times([run, run[:3] + run[4:]], t.OUR_GEMMS)          # 4 launches in one call, 3 in the other
    assert mixed["gemm_launches"] == [3, 4] and mixed["gate_up_us"] is None


def test_layout_stand_in_gives_vllms_docstring_example(benchmark_script):
    """The example of vLLM's moe_align_block_size docstring (experts 1-4, so five ids), literally."""
    align = stand_ins(benchmark_script)["moe_align_block_size"]
    ids = torch.tensor([[2, 3, 4], [1, 2, 4], [1, 3, 4], [1, 2, 3]], dtype=torch.int32)
    sorted_ids, expert_ids, total = align(ids, 4, 5)
    assert int(total) == 16
    assert sorted_ids[:16].tolist() == [3, 6, 9, 12, 0, 4, 10, 12, 1, 7, 11, 12, 2, 5, 8, 12]
    assert expert_ids[:4].tolist() == [1, 2, 3, 4]


def test_pair_check_measures_a_gemm_against_its_dequantized_operands(benchmark_script):
    """The per-GEMM check of vLLM's launches: near zero for the right products (bfloat16 outputs), and a
    misread scale group (one weight block's scale doubled) or a wrong routing weight fails it."""
    from epmoe.quant.fp8 import fp8_quantize, quantize_weight
    t = benchmark_script("vllm_gemms")
    gen = torch.Generator().manual_seed(0)
    E, N, K, P = 3, 256, 384, 12
    w = torch.randn(E, N, K, generator=gen) * 0.05
    qs = [quantize_weight(w[e], "block", (128, 128)) for e in range(E)]
    w_q, w_s = torch.stack([q for q, _ in qs]), torch.stack([s for _, s in qs])
    a_q, a_s = fp8_quantize(torch.randn(5, K, generator=gen).bfloat16(), 128, impl="torch")
    rows = torch.randint(0, 5, (P,), generator=gen)
    experts = torch.randint(0, E, (P,), generator=gen)
    weight = torch.rand(P, generator=gen) + 0.5
    a = (a_q.float() * a_s.repeat_interleave(128, dim=1))[rows]
    from epmoe.quant.fp8 import dequantize_weight
    c = torch.stack([dequantize_weight(w_q[e], w_s[e], (128, 128)) @ a[i] for i, e in enumerate(experts.tolist())])
    c = (c * weight[:, None]).bfloat16()
    assert t.pair_check(c, a_q, a_s, w_q, w_s, rows, experts, weight) < 4e-3
    assert t.pair_check(c, a_q, a_s, w_q, w_s, rows, experts, weight * 1.05) > t.PAIR_TOLERANCE
    bad = w_s.clone()
    bad[int(experts[0]), 0, 1] *= 2
    assert t.pair_check(c, a_q, a_s, w_q, bad, rows, experts, weight) > t.PAIR_TOLERANCE
