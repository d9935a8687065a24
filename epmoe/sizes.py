"""Integer size arithmetic the layouts share: blocks, alignment, FP8 scale groups."""
from __future__ import annotations


def ceil_div(n: int, m: int) -> int:
    """ceil(n / m) for ints, m > 0."""
    return -(-n // m)


def round_up(n: int, m: int) -> int:
    """The smallest multiple of m that is >= n."""
    return ceil_div(n, m) * m


def scale_groups(width: int, group: int | None) -> int:
    """FP8 scales per row of `width` columns: one per `group` columns (the last group may be partial), or
    one per row when `group` is None."""
    return 1 if group is None else ceil_div(width, group)
