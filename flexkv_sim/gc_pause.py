"""Runs with Python's cyclic garbage collector paused.

A simulation or a replay builds up many long-lived records and almost no
reference cycles: the collector's rescans of the growing heap cost up to a third
of the time, grow superlinearly and find next to nothing to free. Reference
counting still frees whatever is dropped.
"""
from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def gc_paused() -> Iterator[None]:
    """Disable the cyclic collector for the block; restore its previous state after."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()
