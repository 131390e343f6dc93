"""Values read from JSON that others wrote (a dump set's holds file, a sensor's answer): a
number must be a whole number in its range, never a float (1e400 is infinity), a string or
a bool that Python's json would hand over as it is."""

from __future__ import annotations


def whole(value: object, name: str, low: int, high: int) -> int:
    """`value` if it is a whole number from `low` to `high`, else ValueError naming it."""
    if type(value) is not int or not low <= value <= high:
        raise ValueError(f"{name} {str(value)[:40]} is not a whole number from {low} to {high}")
    return value
