"""First in, first out: evict the block resident longest, however often it is used.

The baseline every recency policy improves on; it is LRU without the move on a hit.
"""
from __future__ import annotations

from flexkv_runtime.policies.lru import LRU


class FIFO(LRU):
    name = "fifo"

    def on_hit(self, key, block) -> None:
        pass  # insertion order alone decides
