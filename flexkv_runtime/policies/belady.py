"""Belady's MIN: evict the block whose next use is farthest in the future.

Offline: it reads the future from the oracle that replay and simulation provide,
and the runtime refuses it. It is the ceiling online policies are measured
against.
"""
from __future__ import annotations

from flexkv_runtime.policies.base import EvictionPolicy
from flexkv_runtime.policies.lazy_heap import LazyMinHeap


class Belady(EvictionPolicy):
    name = "belady"
    offline = True

    def __init__(self, capacity_blocks: int) -> None:
        super().__init__(capacity_blocks)
        self._by_next_use = LazyMinHeap()  # priority: minus the next use, so the farthest comes first

    def on_insert(self, key, block) -> None:
        self._by_next_use.set(key, -self.ctx.oracle.next_use(key))

    def on_hit(self, key, block) -> None:
        self._by_next_use.set(key, -self.ctx.oracle.next_use(key))

    def on_remove(self, key) -> None:
        self._by_next_use.discard(key)

    def victim(self, can_evict):
        return self._by_next_use.pop_min(can_evict)

    def __len__(self) -> int:
        return len(self._by_next_use)
