"""Expert-parallel load balancing (EPLB): logical experts in physical slots, placed from measured load.

`algorithm`: `balance_experts`, the pure placement function; `expert_map`: `ExpertMap`, which logical
expert each physical slot holds and the logical -> physical id rule of the forward; `rebalance`: moving
a layer's weights to a new placement online (`MoELayer.rebalance`).
"""
from .algorithm import balance_experts, max_over_mean, rank_loads
from .expert_map import ExpertMap

__all__ = ["ExpertMap", "balance_experts", "max_over_mean", "rank_loads"]
