"""A min-priority queue of keys whose priorities are replaced, not updated in place.

Shared by the policies that rank blocks by a value (cost_aware, prefix_lru, belady):
setting a key's priority pushes a new entry and leaves the old one to be
skipped when it surfaces, so every change is O(log n) and the heap is rebuilt
from the live entries when stale ones outnumber them.
"""
from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Hashable


class LazyMinHeap:
    def __init__(self) -> None:
        self._live: dict[Hashable, list] = {}  # key -> its current heap entry
        self._heap: list[list] = []  # [priority, insertion order, key]
        self._order = itertools.count()  # equal priorities leave oldest first

    def set(self, key: Hashable, priority: float) -> None:
        entry = [priority, next(self._order), key]
        self._live[key] = entry
        heapq.heappush(self._heap, entry)
        if len(self._heap) > 2 * len(self._live) + 64:
            self._heap = list(self._live.values())
            heapq.heapify(self._heap)

    def discard(self, key: Hashable) -> None:
        self._live.pop(key, None)

    def pop_min(self, accept: Callable[[Hashable], bool]) -> Hashable | None:
        """Remove and return the lowest-priority key that ``accept`` takes; None if it takes none."""
        heap, live, passed, chosen = self._heap, self._live, [], None
        while heap:
            entry = heapq.heappop(heap)
            key = entry[2]
            if live.get(key) is not entry:
                continue  # superseded or discarded
            if accept(key):
                del live[key]
                chosen = key
                break
            passed.append(entry)
        for entry in passed:
            heapq.heappush(heap, entry)
        return chosen

    def __contains__(self, key: Hashable) -> bool:
        return key in self._live

    def __len__(self) -> int:
        return len(self._live)
