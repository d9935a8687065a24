"""benchmarks/decode_probe.py without a GPU: the swap-AB variants it times beside a table's entry."""
from dataclasses import replace

from epmoe.kernels.tuning_table import GemmConfig, GemvConfig, MoEKernelConfig


def test_swap_variants_time_plain_and_swapped_tiles_beside_the_entry(benchmark_script):
    """The table's tiles with plain and swap-AB products, leaving out the variant that is the entry itself (timed
    as "table"): beside a plain entry the three swaps; beside a decode entry (whose own time is the decode
    kernels') the plain tiles too; beside a swapped entry the plain tiles and the single swaps. A "rescale" GEMM
    keeps its products (no variant claims to swap it)."""
    swap_variants = benchmark_script("decode_probe").swap_variants
    tiles = MoEKernelConfig(16, GemmConfig(128, 128, 1, 4, 4), GemmConfig(64, 128, 1, 4, 4))
    labels = dict(swap_variants(tiles))
    assert list(labels) == ["swap gate_up", "swap down", "swap both"]
    assert labels["swap gate_up"].gate_up.swap_ab and not labels["swap gate_up"].down.swap_ab
    assert labels["swap both"].gate_up.swap_ab and labels["swap both"].down.swap_ab
    decode = replace(tiles, gemv=GemvConfig(8, 256, 8, 256))
    labels = dict(swap_variants(decode))
    assert labels["plain tiles"] == tiles and all(c.gemv is None for c in labels.values())
    swapped = labels["swap both"]
    labels = dict(swap_variants(swapped))
    assert list(labels) == ["plain tiles", "swap gate_up", "swap down"] and labels["plain tiles"] == tiles
    rescale = replace(tiles, gate_up=replace(tiles.gate_up, promote="rescale"))
    assert [(label, c.gate_up.swap_ab, c.down.swap_ab) for label, c in swap_variants(rescale)] == [
        ("swap down", False, True)]
