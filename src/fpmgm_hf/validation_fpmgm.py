"""Config validation helpers shared by the Hub-side configs: every failure is a `ValueError` naming the
config class, the field, the value and what is allowed. NaN never passes a numeric check.

Hub-portable: standard library only.
"""

from __future__ import annotations

import math


def fail(owner: str, field: str, value, allowed) -> None:
    raise ValueError(f"{owner}: `{field}`={value!r} is invalid; allowed: {allowed}.")


def check_int(owner: str, field: str, value, low: int, high=None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        fail(owner, field, value, f"an integer >= {low}" + (f" and <= {high}" if high is not None else ""))


def check_float(owner: str, field: str, value, low: float, high: float, low_open=False, high_open=False) -> None:
    """`value` is a real number in the interval from `low` to `high` (open ends as flagged)."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and not math.isnan(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        fail(owner, field, value, f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}")


def check_range(owner: str, field: str, value, low: int) -> tuple[int, int]:
    """A pair (lo, hi) of integers with low <= lo <= hi; returned as a tuple (JSON gives lists)."""
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or any(isinstance(v, bool) or not isinstance(v, int) for v in value)
        or value[0] < low
        or value[0] > value[1]
    ):
        fail(owner, field, value, f"a pair (lo, hi) of integers with {low} <= lo <= hi")
    return (int(value[0]), int(value[1]))
