"""Helpers for testing MoE backends: comparison with diagnostics, and running a function on N ranks."""
from .compare import BOUNDS, CompareResult, assert_close, bound_for, compare
from .distributed import RanksFailed, run_on_ranks
from .graphs import capture
from .layer_view import LayerExperts
from .random_moe import awkward_flat_batches, awkward_ids, fp16_range_case, load_experts, random_experts, random_inputs

__all__ = ["BOUNDS", "CompareResult", "LayerExperts", "RanksFailed", "assert_close", "bound_for", "capture", "compare",
           "run_on_ranks", "random_experts", "random_inputs", "load_experts", "fp16_range_case", "awkward_ids",
           "awkward_flat_batches"]
