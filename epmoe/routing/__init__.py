"""Routing: router logits -> (topk_ids, topk_weights), and the validator every routing passes."""
from .router import Routing, route, softmax_topk, sigmoid_grouped_topk, validate_routing

__all__ = ["Routing", "route", "softmax_topk", "sigmoid_grouped_topk", "validate_routing"]
