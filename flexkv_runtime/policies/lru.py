"""Least recently used: evict the block untouched for longest."""
from __future__ import annotations

from collections import OrderedDict
from itertools import islice

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
        for key in order:  # oldest first; nearly always the first one
            if can_evict(key):
                del order[key]
                return key
        return None

    def victims(self, count, can_evict):
        """The ``count`` oldest evictable blocks in one pass: blocks kept (pinned) are looked at once."""
        order = self._order
        chosen = list(islice(filter(can_evict, order), count))
        for key in chosen:
            del order[key]
        return chosen

    def __len__(self) -> int:
        return len(self._order)
