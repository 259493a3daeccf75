"""Belady's MIN: evict the block whose next use is farthest in the future.

Offline: it reads the future from the oracle that replay and simulation provide,
and the runtime refuses it. It is the ceiling online policies are measured
against.
"""
from __future__ import annotations

import heapq
import itertools

from flexkv_runtime.policies.base import EvictionPolicy


class Belady(EvictionPolicy):
    name = "belady"
    offline = True

    def __init__(self, capacity_blocks: int) -> None:
        super().__init__(capacity_blocks)
        self._next: dict = {}  # key -> its current next use
        self._heap: list = []  # (-next use, tie, key), stale entries skipped lazily
        self._tie = itertools.count()

    def _note(self, key) -> None:
        nxt = self.ctx.oracle.next_use(key)
        self._next[key] = nxt
        heapq.heappush(self._heap, (-nxt, next(self._tie), key))

    def on_insert(self, key, block) -> None:
        self._note(key)

    def on_hit(self, key, block) -> None:
        self._note(key)

    def on_remove(self, key) -> None:
        self._next.pop(key, None)

    def victim(self, can_evict):
        heap, skipped, chosen = self._heap, [], None
        while heap:
            entry = heapq.heappop(heap)
            neg_next, _, key = entry
            if self._next.get(key) != -neg_next:
                continue  # stale: the key was used again or left
            if can_evict(key):
                chosen = key
                del self._next[key]
                break
            skipped.append(entry)
        for entry in skipped:
            heapq.heappush(heap, entry)
        if len(heap) > 4 * len(self._next) + 64:
            self._heap = [(-n, next(self._tie), k) for k, n in self._next.items()]
            heapq.heapify(self._heap)
        return chosen

    def __len__(self) -> int:
        return len(self._next)
