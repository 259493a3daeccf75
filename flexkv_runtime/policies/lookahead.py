"""Lookahead LRU: LRU that spares the blocks queued requests are about to read.

The scheduler's queue is known before the requests run; evicting a block one of
them will load turns a sure hit into a miss. Such blocks (``waiting_refs`` > 0)
are passed over while an unprotected block can go among the ``max_scan`` least
recently used; past that, the least recent evictable block goes anyway, which
bounds the cost of a victim when most of the tier is wanted.
"""
from __future__ import annotations

from flexkv_runtime.policies.base import EvictionPolicy
from flexkv_runtime.policies.lru import LRU


class LookaheadLRU(LRU):
    name = "lookahead"

    def __init__(self, capacity_blocks: int, max_scan: int = 64) -> None:
        super().__init__(capacity_blocks)
        if max_scan < 0:
            raise ValueError(f"lookahead max_scan must be >= 0, got {max_scan}")
        self.max_scan = max_scan

    def victim(self, can_evict):
        wanted = self.ctx.waiting_refs
        spare = None  # the least recent evictable block a queued request wants
        for scanned, key in enumerate(self._order):
            if scanned >= self.max_scan and spare is not None:
                break
            if can_evict(key):
                if not wanted.get(key):
                    del self._order[key]
                    return key
                if spare is None:
                    spare = key
        if spare is not None:
            del self._order[spare]
        return spare

    victims = EvictionPolicy.victims  # one victim at a time: LRU's batch pass would ignore the queue
