"""Least frequently used, ties broken by recency (the least recently used of the rarest goes).

Counts live only while a block is resident, as in libCacheSim's LFU. Blocks sit in
frequency buckets kept in a linked list ordered by count, each bucket an LRU, so
every call is O(1) apart from skipping blocks that cannot be evicted.
"""
from __future__ import annotations

from collections import OrderedDict

from flexkv_runtime.policies.base import EvictionPolicy


class _Bucket:
    """The resident blocks used exactly ``count`` times, oldest entry first."""

    __slots__ = ("count", "keys", "lower", "higher")

    def __init__(self, count: int, lower: _Bucket | None, higher: _Bucket | None) -> None:
        self.count = count
        self.keys: OrderedDict = OrderedDict()
        self.lower = lower
        self.higher = higher


class LFU(EvictionPolicy):
    name = "lfu"

    def __init__(self, capacity_blocks: int) -> None:
        super().__init__(capacity_blocks)
        self._bucket_of: dict = {}
        self._rarest: _Bucket | None = None

    def _bucket_after(self, lower: _Bucket | None, count: int) -> _Bucket:
        """The bucket for ``count`` just above ``lower`` (None: at the bottom), created if missing."""
        higher = self._rarest if lower is None else lower.higher
        if higher is not None and higher.count == count:
            return higher
        bucket = _Bucket(count, lower, higher)
        if lower is None:
            self._rarest = bucket
        else:
            lower.higher = bucket
        if higher is not None:
            higher.lower = bucket
        return bucket

    def _take(self, key) -> _Bucket:
        """Remove ``key`` from its bucket; an emptied bucket leaves the list. Returns the bucket."""
        bucket = self._bucket_of.pop(key)
        del bucket.keys[key]
        if not bucket.keys:
            if bucket.lower is None:
                self._rarest = bucket.higher
            else:
                bucket.lower.higher = bucket.higher
            if bucket.higher is not None:
                bucket.higher.lower = bucket.lower
        return bucket

    def on_insert(self, key, block) -> None:
        bucket = self._bucket_after(None, 1)
        bucket.keys[key] = None
        self._bucket_of[key] = bucket

    def on_hit(self, key, block) -> None:
        old = self._take(key)
        # an emptied bucket was unlinked, but its own links still point at its neighbours
        lower = old if old.keys else old.lower
        bucket = self._bucket_after(lower, old.count + 1)
        bucket.keys[key] = None
        self._bucket_of[key] = bucket

    def on_remove(self, key) -> None:
        if key in self._bucket_of:
            self._take(key)

    def victim(self, can_evict):
        bucket = self._rarest
        while bucket is not None:
            for key in bucket.keys:
                if can_evict(key):
                    self._take(key)
                    return key
            bucket = bucket.higher
        return None

    def __len__(self) -> int:
        return len(self._bucket_of)
