"""Prefix-aware LRU: evict only leaves of the cached prefix tree, least recent first.

A block is reusable only if every block before it in its prompt is cached too,
so evicting a parent while a child stays strands the child. This policy never
evicts a block while one of its children is resident in the same tier; among
the leaves the least recently used goes, so cached prefixes stay contiguous
and shrink from their ends.

It keeps its own count of resident children per parent key (updated on insert,
remove and eviction), because the index's ``child_records`` count records, not
resident blocks, and change when the manager attaches and detaches, which the
policy is not told about. Leaves wait
in a lazy heap ordered by ``_priority`` (here: order of last use; cost_aware
ranks by value instead); a parent joins it when its last child goes.
"""
from __future__ import annotations

import itertools

from flexkv_runtime.policies.base import EvictionPolicy
from flexkv_runtime.policies.lazy_heap import LazyMinHeap


class PrefixLRU(EvictionPolicy):
    name = "prefix_lru"

    def __init__(self, capacity_blocks: int) -> None:
        super().__init__(capacity_blocks)
        self._uses = itertools.count()  # order of use: exact where clock readings tie
        self._rank: dict = {}  # resident key -> its priority at its last use
        self._parent: dict = {}  # resident key -> its parent's key (None for a first block)
        self._children: dict = {}  # key -> resident children, for any key that has some
        self._leaves = LazyMinHeap()  # resident keys with no resident child, by rank

    def on_insert(self, key, block) -> None:
        parent = block.parent.key if block.parent is not None else None
        self._parent[key] = parent
        if parent is not None:
            self._children[parent] = self._children.get(parent, 0) + 1
            self._leaves.discard(parent)
        self.on_hit(key, block)

    def _priority(self, block) -> float:
        """Lower goes first."""
        return next(self._uses)

    def on_hit(self, key, block) -> None:
        rank = self._rank[key] = self._priority(block)
        if key not in self._children:
            self._leaves.set(key, rank)

    def on_remove(self, key) -> None:
        if key in self._rank:
            self._leaves.discard(key)
            self._forget(key)

    def victim(self, can_evict):
        key = self._leaves.pop_min(can_evict)
        if key is not None:
            self._forget(key)
        return key

    def _forget(self, key) -> None:
        """Drop a block that left the tier; its parent becomes a leaf when this was its last child."""
        del self._rank[key]
        parent = self._parent.pop(key)
        if parent is None:
            return
        left = self._children[parent] - 1
        if left:
            self._children[parent] = left
            return
        del self._children[parent]
        if parent in self._rank:
            self._leaves.set(parent, self._rank[parent])

    def __len__(self) -> int:
        return len(self._rank)
