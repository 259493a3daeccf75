"""What the REMOTE tier needs from a shared key-value store: three batch calls.

Every value is a block's bytes followed by a small trailer (see ``trailer.py``),
one contiguous buffer: a CPU pool row and its tail. ``get_into`` lands values in
such buffers, ``put_from`` sends them from there, ``exists`` asks about keys
without moving data. Each returns one ``Status`` per key, so a
caller can tell a block the store does not have (``MISSING``: evicted, never
stored) from one it could not ask about (``FAILED``). A backend may raise
instead of answering: the caller (``guard.GuardedBackend``) then treats every
key of the call as ``FAILED``.

Backends are called from several threads at once and must be thread-safe.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from enum import Enum

import numpy as np


class Status(Enum):
    OK = "ok"  # stored, found, or read back whole
    MISSING = "missing"  # the store does not hold the key
    REFUSED = "refused"  # put: the store would not take it (full); the block is simply not stored
    CORRUPT = "corrupt"  # get: a value is there but it is not a whole block of this size
    FAILED = "failed"  # the store could not be asked: error, timeout, open circuit breaker


class RemoteBackend(ABC):
    #: short name for logs and metrics
    name: str = "remote"

    def register(self, buffer: np.ndarray) -> None:
        """Memory that later calls land in or send from (zero-copy stores map it once); default: nothing to do."""

    @abstractmethod
    def get_into(self, keys: Sequence[str], values: Sequence[np.ndarray]) -> list[Status]:
        """Read each key's value into its buffer (``OK`` only when the value fills it exactly)."""

    @abstractmethod
    def put_from(self, keys: Sequence[str], values: Sequence[np.ndarray]) -> list[Status]:
        """Store each buffer under its key, best effort (``REFUSED`` when the store is full)."""

    @abstractmethod
    def exists(self, keys: Sequence[str]) -> list[Status]:
        """``OK`` or ``MISSING`` per key, without reading values."""

    def close(self) -> None:
        """Drop connections; calls after this may fail."""
