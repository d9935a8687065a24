"""The GPU-initiated dispatchers' Triton kernels compile for Hopper (sm_90), without a GPU.

Cross-compiling with Triton's CUDA backend checks what the interpreter cannot: the inline PTX of the
bounded wait compiles, the flags are written and read with release / acquire semantics at system scope
(visible across GPUs), and a row moves with 16-byte vector stores (the NVLink rate depends on it).
"""
import importlib.util
import re

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed (pip install 'epmoe[triton]')")


def _compile(fn, types: list[str], const: dict, ints16=("H",)):
    from epmoe.kernels.xcompile import CrossCompileUnavailable, compile_for_hopper
    try:
        return compile_for_hopper(fn, types, const, ints16).asm["ptx"]
    except CrossCompileUnavailable as exc:     # a Triton build without the CUDA backend's tools
        pytest.skip(str(exc))


def _stores(ptx: str) -> set:
    return set(re.findall(r"st\.global[\.\w]*", ptx))


def test_exchange_kernel_publishes_and_waits_at_system_scope():
    from epmoe.kernels import symm_dispatch as k
    ptx = _compile(k.exchange_flags_kernel, ["*i32"] * 3 + ["*i64"] + ["*i32"] * 6 + ["i32"] * 7 + ["i64"] + ["i32"] * 3,
                   dict(EP=2, EP_P2=2, HW=7, HW_P2=8, HAS_COUNTS=True, PUBLISH=True, WAIT=True, ADVANCE=True, CHECK_HEADS=True,
                        TIMED=True, MAX_SPINS=0, ZERO_BLOCK=256))
    assert "atom.global.sys.release.exch" in ptx.replace(".release.sys.", ".sys.release.")
    assert re.search(r"atom\.global\.(sys\.acquire|acquire\.sys)\.add", ptx)
    assert "%globaltimer" in ptx
    # the collective markers: stored into every peer with release semantics at system scope
    ptx = _compile(k.mark_collective_kernel, ["*i32", "*i64", "i32", "i32"], dict(EP=2, EP_P2=2))
    assert "atom.global.sys.release.exch" in ptx.replace(".release.sys.", ".sys.release.")


@pytest.mark.parametrize("wire,quant", [("bf16", False), ("fp8e4nv", False), ("fp8e4nv", True)])
def test_high_throughput_rows_move_in_16_byte_stores(wire, quant):
    """Rows (FP8 ones quantized before the kernel, or inside it) leave in 16-byte vector stores."""
    from epmoe.kernels import symm_dispatch as k
    fp8 = wire == "fp8e4nv"
    types = ([f"*{'bf16' if quant else wire}", "*fp32", "*i32", "*i32", "*i32", "*fp32", "*i64", "*i32", "*i64",
              f"*{wire}", "*fp32", "*i32", "*fp32", "*i64", "*i32"] + ["i32"] * 6)
    ptx = _compile(k.ht_dispatch_kernel, types, dict(EP=2, HW=7, K=8, X_ITEM=1 if fp8 else 2, BLOCK_H=8192, K_P2=8,
                                                      G_P2=64 if fp8 else 1, HAS_SCALES=fp8 and not quant,
                                                      PAD_BLOCK=256, QUANT=quant, GROUP=128 if quant else 1,
                                                      PULL=not quant))
    assert "st.global.v4.b32" in _stores(ptx)
    ptx = _compile(k.ht_combine_kernel, ["*bf16", "*i32", "*bf16", "*i64", "*i32", "i32", "i32", "i32", "i32"],
                   dict(EP=2, HW=7, ITEM=2, BLOCK_H=8192))
    assert _stores(ptx) == {"st.global.v4.b32"}


def test_pull_combine_reads_the_peers_rows_in_16_byte_loads():
    """The pull combine (`gather_sum` over the peers' buffers) reads each rank's row with 16-byte vector
    loads and writes the sum with 16-byte stores."""
    from epmoe.kernels.token_rows import gather_sum_kernel
    ptx = _compile(gather_sum_kernel, ["*bf16", "*i64", "*i64", "*bf16", "*i32", "*i64", "i32", "i32", "i32"],
                   dict(N_TERMS=2, WEIGHTED=False, DIRECT=False, PEERS=True, ITEM=2, BLOCK_H=1024))
    assert "ld.global.v4.b32" in set(re.findall(r"ld\.global[\.\w]*", ptx))
    assert _stores(ptx) == {"st.global.v4.b32"}


def test_low_latency_rows_move_in_16_byte_stores_after_one_atomic_per_row():
    from epmoe.kernels import symm_dispatch as k
    ptx = _compile(k.ll_dispatch_kernel, ["*bf16", "*fp32", "*i32", "*i32", "*i32", "*bf16", "*fp32", "*i32", "*i32",
                                          "*i64", "*i32"] + ["i32"] * 7,
                   dict(X_ITEM=2, BLOCK_H=8192, G_P2=1, HAS_SCALES=False))
    assert "st.global.v4.b32" in _stores(ptx)
    claims = re.findall(r"@%p\d+ atom\.global\.sys\.relaxed\.add", ptx)
    assert len(claims) == 1            # predicated: one thread of the program claims the row
    ptx = _compile(k.ll_combine_kernel, ["*bf16", "*i32", "*i32", "*bf16", "*i64", "*i32"] + ["i32"] * 5,
                   dict(ITEM=2, BLOCK_H=8192, SPLIT=4))
    assert "st.global.v4.b32" in _stores(ptx)


@pytest.mark.parametrize("quant", [False, True])
def test_alltoall_pack_kernels_compile_for_hopper(quant):
    """The `alltoall` pack kernel (packed or fixed regions: `region` is a runtime argument, the padding
    programs included), BF16 or quantizing to FP8, and the unpack kernel without the hidden vectors,
    compile for sm_90; with row strides and offsets divisible by 16 (as the JIT specializes them: rows are
    16-byte aligned) the hidden vectors leave in 16-byte stores."""
    from epmoe.kernels import alltoall_pack as k
    wire = "fp8e4nv" if quant else "bf16"
    types = (["*bf16", "*i32", "*fp32", "*i32", "*i32", "*i64", "*i32", "*i64", f"*{wire}", "*i32", "*fp32", "*fp32"]
             + ["i32"] * 13)
    const = dict(EP=2, K=8, K_P2=8, QUANT=quant, GROUP=128 if quant else 1024, BLOCK=128 if quant else 1024,
                 GROUPS=32 if quant else 1, PAD_BLOCK=256)
    ptx = _compile(k.a2a_pack_kernel, types, const, ints16=("HP", "x_stride", "X_ROW", "X_OFF"))
    assert "st.global.v4.b32" in _stores(ptx), _stores(ptx)
    ptx = _compile(k.a2a_unpack_kernel, ["*i32", "*i32", "*fp32", "*fp32", "*i32", "*i32", "*fp32", "*fp32"]
                   + ["i32"] * 10, dict(K=8, K_P2=8, G_P2=64, HAS_SCALES=True, HAS_X=False, BLOCK_H=16))
    assert _stores(ptx)
