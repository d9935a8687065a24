"""The dispatcher interface: dispatch -> experts -> combine."""
from __future__ import annotations

from typing import Any

import torch

from ..contract import DispatcherCaps
from ..placement import Placement
from ..routing import Routing


class Dispatcher:
    """Moves tokens to the experts' ranks (`dispatch`) and their outputs back (`combine`).

    `dispatch(x [T, H], routing)` returns `(batch, handle)`: `batch` in the layout the class declares,
    holding the rows for this rank's experts; `handle` is whatever `combine` needs to return
    `[T, H]` to the rank that owns the tokens.
    """

    CAPS: DispatcherCaps
    name: str = ""

    def __init__(self, cfg, placement: Placement, group=None, max_tokens_per_rank: int | None = None,
                 device: torch.device | None = None):
        self.cfg = cfg
        self.placement = placement
        self.group = group
        self.max_tokens_per_rank = max_tokens_per_rank
        self.device = device

    def dispatch(self, x: torch.Tensor, routing: Routing) -> tuple[Any, Any]:
        raise NotImplementedError(f"{type(self).__name__} must implement dispatch()")

    def combine(self, expert_out: torch.Tensor, handle: Any) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement combine()")

    def abort(self) -> None:
        """Take part in the current forward for a rank that cannot compute it (bad input or routing), so
        its peers raise instead of waiting. Nothing to do without peers."""
