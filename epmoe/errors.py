"""Errors raised by epmoe.

`UnsupportedCombination` is the contract check's refusal: a dispatcher, an experts backend, a
quantization scheme, a device or a rank count that do not work together. It is raised when a layer is
built, never in the middle of a forward pass.
"""
from __future__ import annotations


class UnsupportedCombination(ValueError):
    """A pairing of pipeline parts that the contract refuses.

    Attributes name both parts, the reason and the alternatives that would work, so a caller (or a test
    enumerating the support matrix) can act on the refusal without parsing the message.
    """

    def __init__(self, dispatcher: str, experts: str, reason: str, alternatives: list[str] | None = None):
        self.dispatcher = dispatcher
        self.experts = experts
        self.reason = reason
        self.alternatives = list(alternatives or [])
        msg = f"dispatcher={dispatcher!r} with experts={experts!r} is not supported: {reason}"
        if self.alternatives:
            msg += ". What would work: " + "; ".join(self.alternatives)
        super().__init__(msg)


class RankMismatch(RuntimeError):
    """Ranks of one expert-parallel group disagree (config, placement, backends, or a runtime limit)."""
