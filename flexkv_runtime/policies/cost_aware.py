"""Cost-aware eviction: keep the blocks whose reuse saves the most prefill time.

A block's value is the prefill time it saves per byte (blocks are one size, so
its ``prefill_cost_s``, which grows with depth as attention does), halved every
``half_life_s`` seconds since its last use; the lowest value goes. Only leaves
of the cached prefix tree are candidates, as in prefix_lru: evicting an inner
block would strand every cached block after it, whatever their value.

log(value) = [log(cost) + ln2 * last_use / half_life] - ln2 * now / half_life;
the last term is common to every block, so the bracket is a priority fixed at
each use and a lazy heap ranks the leaves in O(log n).
"""
from __future__ import annotations

import math

from flexkv_runtime.policies.prefix_lru import PrefixLRU

MIN_COST_S = 1e-12  # a free block is worth almost nothing, and log() needs > 0


class CostAware(PrefixLRU):
    name = "cost_aware"

    def __init__(self, capacity_blocks: int, half_life_s: float = 60.0) -> None:
        super().__init__(capacity_blocks)
        if half_life_s <= 0:
            raise ValueError(f"cost_aware half_life_s must be positive, got {half_life_s}")
        self.half_life_s = half_life_s

    def _priority(self, block) -> float:
        decay = math.log(2) * self.ctx.clock() / self.half_life_s
        return math.log(max(block.prefill_cost_s, MIN_COST_S)) + decay
