"""The engine's own KV blocks, vLLM-style: the top tier of the hierarchy.

Built from the control plane's pieces rather than a second cache manager: each
cached block is a ``Block`` record (its parent, depth and ``pins``, which count
the running requests using it) and an eviction policy from
``flexkv_runtime.policies`` picks which unpinned cached block to reuse when
empty blocks run out. As in vLLM's block pool, a block becomes a candidate when
its last user frees it, and a request frees its blocks from the last to the
first: the policy hears of a block (``on_insert`` the first time, ``on_hit``
after) when it is freed, so LRU evicts as vLLM does, a prompt's tail before its
head. Blocks without a key (a partial last block, decode tokens, a second copy
of a block another request cached first) are only counted, and reused first.

A request is admitted only if its whole sequence fits (the simulator does not
preempt), but, as in vLLM, it takes its blocks only when its tokens need them
(``take``): a cached block is evicted when a block is written, not before.
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
        self.reserved = 0  # blocks promised to admitted requests, not taken yet
        self.evictions = 0
        blocks = self.blocks
        self._can_evict = lambda key: blocks[key].pins == 0

    @property
    def available(self) -> int:
        return self.free + self.unpinned

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

    def can_admit(self, hit: Sequence[Block], new_blocks: int) -> bool:
        revived = sum(1 for block in hit if block.pins == 0)
        return self.available - self.reserved - revived >= new_blocks

    def admit(self, hit: Sequence[Block], new_blocks: int) -> None:
        """Pin the hit blocks and promise ``new_blocks`` more."""
        for block in hit:
            if block.pins == 0:
                self.unpinned -= 1
            block.pins += 1
        self.reserved += new_blocks

    def take(self, new_blocks: int) -> None:
        """Take ``new_blocks`` promised blocks to write into: empty ones first, then evicted cached ones."""
        self.reserved -= new_blocks
        shortfall = new_blocks - self.free
        if shortfall > 0:
            victims = self.policy.victims(shortfall, self._can_evict)
            if len(victims) < shortfall:
                raise RuntimeError(f"GPU cache: {shortfall} blocks promised, only {len(victims)} evictable")
            blocks = self.blocks
            for key in victims:
                del blocks[key]
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
        blocks = self.blocks
        parent = blocks.get(keys[start - 1]) if start else None
        named = []
        for key in keys[start:end]:
            block = blocks.get(key)
            if block is None:
                block = blocks[key] = Block(key, parent, 0.0)
                block.pins = 1
                named.append(block)
            parent = block
        return named

    def release(self, blocks: Sequence[Block], anonymous: int, untaken: int = 0) -> None:
        """A request is done with its blocks (in prefix order): named ones stay cached, anonymous ones are
        freed, and ``untaken`` promised ones are no longer promised.

        ``Block.hits`` counts the times a block was freed: the policy is told of it the first time.
        """
        self.reserved -= untaken
        on_hit, on_insert = self.policy.on_hit, self.policy.on_insert
        unpinned = 0
        for block in reversed(blocks):
            block.pins -= 1
            if block.pins == 0:
                unpinned += 1
                if block.hits:
                    on_hit(block.key, block)
                else:
                    on_insert(block.key, block)
                block.hits += 1
        self.unpinned += unpinned
        self.free += anonymous
