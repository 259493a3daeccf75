"""SIEVE (Zhang et al., "SIEVE is simpler than LRU", NSDI'24).

One FIFO queue, a visited bit per block and a hand. A hit only sets the bit; the
hand walks from the oldest block towards the newest, clearing set bits and
evicting the first block whose bit is clear, then stays where it stopped. New
blocks enter at the newest end, behind the hand, so one-hit blocks leave
quickly while popular ones are kept without moving them: lazy promotion and
quick demotion.

A block that cannot be evicted now (pinned, in flight) is passed over like a
visited one; two turns of the hand without a victim mean nothing can go.
"""
from __future__ import annotations

from flexkv_runtime.policies.base import EvictionPolicy


class Sieve(EvictionPolicy):
    name = "sieve"

    def __init__(self, capacity_blocks: int) -> None:
        super().__init__(capacity_blocks)
        self._visited: dict = {}  # key -> bit; also the set of resident keys
        self._newer: dict = {}  # key -> neighbour towards the newest end (None at it)
        self._older: dict = {}  # key -> neighbour towards the oldest end (None at it)
        self._newest = None
        self._oldest = None
        self._hand = None  # next block the hand looks at; None: start again from the oldest

    def on_insert(self, key, block) -> None:
        self._visited[key] = False
        self._older[key] = self._newest
        self._newer[key] = None
        if self._newest is None:
            self._oldest = key
        else:
            self._newer[self._newest] = key
        self._newest = key

    def on_hit(self, key, block) -> None:
        self._visited[key] = True

    def on_remove(self, key) -> None:
        if key in self._visited:
            self._unlink(key)

    def victim(self, can_evict):
        visited = self._visited
        key = self._hand
        for _ in range(2 * len(visited)):
            if key is None:
                key = self._oldest
            if visited[key]:
                visited[key] = False
            elif can_evict(key):
                self._hand = self._newer[key]
                self._unlink(key)
                return key
            key = self._newer[key]
        return None

    def _unlink(self, key) -> None:
        older, newer = self._older.pop(key), self._newer.pop(key)
        del self._visited[key]
        if older is None:
            self._oldest = newer
        else:
            self._newer[older] = newer
        if newer is None:
            self._newest = older
        else:
            self._older[newer] = older
        if self._hand == key:
            self._hand = newer

    def __len__(self) -> int:
        return len(self._visited)
