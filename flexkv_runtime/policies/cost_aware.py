"""Cost-aware eviction: keep the blocks whose reuse saves the most prefill time.

A block's value is the prefill time it saves per byte (blocks are one size, so
its ``prefill_cost_s``), halved every ``half_life_s`` seconds since its last
use; the lowest value goes. Deep blocks of long prompts cost more to recompute
than the shared first blocks are worth only if they are still being used.

log(value) = [log(cost) + ln2 * last_use / half_life] - ln2 * now / half_life;
the last term is common to every block, so the bracket is a priority fixed at
each use and a lazy heap ranks blocks in O(log n).
"""
from __future__ import annotations

import math

from flexkv_runtime.policies.base import EvictionPolicy
from flexkv_runtime.policies.lazy_heap import LazyMinHeap

MIN_COST_S = 1e-12  # a free block is worth almost nothing, and log() needs > 0


class CostAware(EvictionPolicy):
    name = "cost_aware"

    def __init__(self, capacity_blocks: int, half_life_s: float = 60.0) -> None:
        super().__init__(capacity_blocks)
        if half_life_s <= 0:
            raise ValueError(f"cost_aware half_life_s must be positive, got {half_life_s}")
        self.half_life_s = half_life_s
        self._by_value = LazyMinHeap()

    def _note_use(self, key, block) -> None:
        decay = math.log(2) * self.ctx.clock() / self.half_life_s
        self._by_value.set(key, math.log(max(block.prefill_cost_s, MIN_COST_S)) + decay)

    on_insert = _note_use
    on_hit = _note_use

    def on_remove(self, key) -> None:
        self._by_value.discard(key)

    def victim(self, can_evict):
        return self._by_value.pop_min(can_evict)

    def __len__(self) -> int:
        return len(self._by_value)
