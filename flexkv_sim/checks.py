"""Range checks for the numbers of hardware, model and engine specs.

A zero layer count or an MFU of 5 would otherwise run and give figures that look
plausible (or divide by zero, or hang the engine loop) far from the setting at
fault; checked here, they fail at start naming it.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import fields
from typing import Any


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def require(
    spec: Any,
    *,
    positive: Iterable[str] = (),
    non_negative: Iterable[str] = (),
    whole: Iterable[str] = (),
    fraction: Iterable[str] = (),
) -> None:
    """Raise ValueError for the first field of the dataclass ``spec`` out of its range.

    ``positive``: > 0; ``non_negative``: >= 0; ``whole``: an integer >= 1; ``fraction``: in (0, 1].
    None passes only where it is the field's default (an optional figure).
    """
    optional = {f.name for f in fields(spec) if f.default is None}
    rules = [(positive, lambda v: v > 0, "a positive number"),
             (non_negative, lambda v: v >= 0, "a number >= 0"),
             (whole, lambda v: v >= 1 and v == int(v), "a whole number >= 1"),
             (fraction, lambda v: 0 < v <= 1, "a fraction in (0, 1]")]
    for names, ok, what in rules:
        for name in names:
            value = getattr(spec, name)
            if value is None and name in optional:
                continue
            if not (_number(value) and value == value and ok(value)):
                raise ValueError(f"{name} must be {what}, got {value!r}")
