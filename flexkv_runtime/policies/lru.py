"""Least recently used: evict the block untouched for longest."""
from __future__ import annotations

from collections import OrderedDict

from flexkv_runtime.policies.base import EvictionPolicy


class LRU(EvictionPolicy):
    name = "lru"

    def __init__(self, capacity_blocks: int) -> None:
        super().__init__(capacity_blocks)
        self._order: OrderedDict = OrderedDict()  # oldest first

    def on_insert(self, key, block) -> None:
        self._order[key] = None

    def on_hit(self, key, block) -> None:
        self._order.move_to_end(key)

    def on_remove(self, key) -> None:
        self._order.pop(key, None)

    def victim(self, can_evict):
        order = self._order
        if order:
            oldest = order.popitem(last=False)[0]
            if can_evict(oldest):  # nearly always: pinned blocks are recent
                return oldest
            order[oldest] = None
            order.move_to_end(oldest, last=False)
        for key in order:
            if can_evict(key):
                del order[key]
                return key
        return None

    def __len__(self) -> int:
        return len(self._order)
