"""Knowledge of the future, for offline policies (Belady) in replay and simulation.

The oracle is built from the whole workload's key lists. The driver says which
request is being served (``begin``); ``next_use(key)`` is then the global
block-reference index at which ``key`` is next read after the current request's
own reference to it — exactly the "next access time" of a block-stream Belady.
"""
from __future__ import annotations

from bisect import bisect_right
from collections.abc import Hashable, Sequence

NEVER = float("inf")


class FutureOracle:
    def __init__(self, key_lists: Sequence[Sequence[Hashable]]) -> None:
        self._key_lists = key_lists
        self._refs: dict[Hashable, list[int]] = {}
        self._starts: list[int] = []
        position = 0
        for keys in key_lists:
            self._starts.append(position)
            for key in keys:
                self._refs.setdefault(key, []).append(position)
                position += 1
        self._base = -1
        self._positions: dict[Hashable, int] = {}

    def begin(self, request_index: int) -> None:
        """The driver is now serving request ``request_index`` of the key lists."""
        self._base = self._starts[request_index]
        self._positions = {key: j for j, key in enumerate(self._key_lists[request_index])}

    def next_use(self, key: Hashable) -> float:
        refs = self._refs.get(key)
        if refs is None:
            return NEVER
        now = self._base + self._positions.get(key, -1)
        i = bisect_right(refs, now)
        return refs[i] if i < len(refs) else NEVER
