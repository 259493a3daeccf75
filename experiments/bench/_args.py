"""argparse types the benchmarks share: a bad number stops the run with argparse's usage, naming the option."""
from __future__ import annotations

import argparse


def whole(text: str) -> int:
    """A whole number >= 1 (repetitions, blocks, threads)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


def wholes(text: str) -> list[int]:
    """Comma-separated whole numbers >= 1."""
    try:
        return [whole(part) for part in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be comma-separated whole numbers >= 1, got {text!r}") from None


def positive(text: str) -> float:
    """A number > 0 (sizes, fractions)."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value
