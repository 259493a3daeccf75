"""The engine's own KV blocks, vLLM-style: the top tier of the hierarchy.

Built from the control plane's pieces rather than a second cache manager: each
cached block is a ``Block`` record (its parent, depth and ``pins``, which count
the running requests using it) and an eviction policy from
``flexkv_runtime.policies`` picks which unpinned cached block to reuse when
empty blocks run out (LRU is vLLM's own behaviour). Blocks without a key (a
partial last block, decode tokens, a second copy of a block another request
cached first) are only counted.
"""
from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

from flexkv_runtime.control.index import Block
from flexkv_runtime.policies.base import PolicyContext, make_policy


class GpuPrefixCache:
    def __init__(self, capacity_blocks: int, eviction: Any = "lru", *, enabled: bool = True,
                 context: PolicyContext | None = None) -> None:
        if capacity_blocks <= 0:
            raise ValueError(f"the GPU needs at least one KV block, got {capacity_blocks}")
        self.capacity = capacity_blocks
        self.enabled = enabled
        self.blocks: dict[Hashable, Block] = {}  # the cached (named) blocks
        self.policy = make_policy("eviction", eviction, capacity_blocks=capacity_blocks)
        self.policy.bind(context or PolicyContext(tier="GPU"))
        self.free = capacity_blocks  # blocks holding nothing
        self.unpinned = 0  # cached blocks no request uses: reusable after eviction
        self.evictions = 0
        blocks = self.blocks
        self._can_evict = lambda key: blocks[key].pins == 0

    @property
    def available(self) -> int:
        return self.free + self.unpinned

    @property
    def used(self) -> int:
        return self.capacity - self.available

    def prefix(self, keys: Sequence[Hashable], limit: int) -> list[Block]:
        """Cached blocks at the start of ``keys``, at most ``limit``."""
        get = self.blocks.get
        hit = []
        for key in keys[:limit]:
            block = get(key)
            if block is None:
                break
            hit.append(block)
        return hit

    def can_acquire(self, hit: Sequence[Block], new_blocks: int) -> bool:
        revived = sum(1 for block in hit if block.pins == 0)
        return self.available - revived >= new_blocks

    def acquire(self, hit: Sequence[Block], new_blocks: int) -> None:
        """Pin the hit blocks and take ``new_blocks`` empty ones, evicting cached blocks as needed."""
        policy = self.policy
        for block in hit:
            if block.pins == 0:
                self.unpinned -= 1
            block.pins += 1
            policy.on_hit(block.key, block)
        shortfall = new_blocks - self.free
        if shortfall > 0:
            blocks, victim, can_evict = self.blocks, policy.victim, self._can_evict
            for _ in range(shortfall):
                del blocks[victim(can_evict)]
            self.unpinned -= shortfall
            self.free += shortfall
            self.evictions += shortfall
        self.free -= new_blocks

    def register(self, keys: Sequence[Hashable], start: int, end: int) -> list[Block]:
        """Name the request's freshly filled blocks ``keys[start:end]`` so later requests can hit them.

        Returns the blocks now cached, pinned for the caller; a key already
        cached keeps its first copy and the caller's block stays anonymous.
        """
        if not self.enabled or start >= end:
            return []
        blocks, on_insert = self.blocks, self.policy.on_insert
        parent = blocks.get(keys[start - 1]) if start else None
        named = []
        for key in keys[start:end]:
            block = blocks.get(key)
            if block is None:
                block = blocks[key] = Block(key, parent, 0.0)
                block.pins = 1
                on_insert(key, block)
                named.append(block)
            parent = block
        return named

    def release(self, blocks: Sequence[Block], anonymous: int) -> None:
        """A request is done with its blocks: named ones stay cached, anonymous ones are freed."""
        for block in blocks:
            block.pins -= 1
            if block.pins == 0:
                self.unpinned += 1
        self.free += anonymous
