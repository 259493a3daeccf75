"""S3-FIFO (Yang et al., "FIFO queues are all you need for cache eviction", SOSP'23).

Most blocks are used once. New blocks enter a small FIFO (``small_fraction`` of
the tier); one that leaves it after at least ``move_to_main_threshold`` hits
moves to the main FIFO, the others are evicted and remembered in a ghost FIFO
of keys, so a block that comes back soon goes straight to main. Main is a
FIFO with a 2-bit use counter: a block at its head with uses left is
reinserted with one use fewer. Until the first eviction, blocks that find the
small queue full go to main, as libCacheSim's S3FIFO does: before the tier is
full there is nothing to filter.

A block that cannot be evicted now (pinned, in flight) is passed over and goes
back to the tail of its queue with its counter unchanged.
"""
from __future__ import annotations

from collections import OrderedDict

from flexkv_runtime.policies.base import EvictionPolicy

MAX_FREQ = 3  # a 2-bit counter


class S3FIFO(EvictionPolicy):
    name = "s3fifo"

    def __init__(
        self,
        capacity_blocks: int,
        small_fraction: float = 0.1,
        ghost_fraction: float = 0.9,
        move_to_main_threshold: int = 2,
    ) -> None:
        super().__init__(capacity_blocks)
        if not 0.0 < small_fraction < 1.0:
            raise ValueError(f"s3fifo small_fraction must be in (0, 1), got {small_fraction}")
        if ghost_fraction < 0:
            raise ValueError(f"s3fifo ghost_fraction must be >= 0, got {ghost_fraction}")
        if move_to_main_threshold < 1:
            raise ValueError(f"s3fifo move_to_main_threshold must be >= 1, got {move_to_main_threshold}")
        self.small_fraction = small_fraction
        self.ghost_fraction = ghost_fraction
        self.move_to_main_threshold = move_to_main_threshold
        self._small_blocks = max(1, int(capacity_blocks * small_fraction))
        self._main_blocks = capacity_blocks - self._small_blocks
        self._ghost_blocks = int(capacity_blocks * ghost_fraction)
        # key -> uses since it entered its queue; each queue oldest first
        self._small: OrderedDict = OrderedDict()
        self._main: OrderedDict = OrderedDict()
        self._ghost: OrderedDict = OrderedDict()  # keys only
        self._evicted_once = False

    def on_insert(self, key, block) -> None:
        if key in self._ghost:
            del self._ghost[key]
            self._main[key] = 0
        elif not self._evicted_once and len(self._small) >= self._small_blocks:
            self._main[key] = 0
        else:
            self._small[key] = 0
        # trimmed only now: the victim that made room for this block must not push it out of the ghost
        while len(self._ghost) > self._ghost_blocks:
            self._ghost.popitem(last=False)

    def on_hit(self, key, block) -> None:
        queue = self._small if key in self._small else self._main
        queue[key] = min(queue[key] + 1, MAX_FREQ)

    def on_remove(self, key) -> None:
        self._small.pop(key, None)
        self._main.pop(key, None)

    def victim(self, can_evict):
        self._evicted_once = True
        if len(self._main) > self._main_blocks or not self._small:
            order = (True, False, True)  # a pass over small may move blocks to main: try main again
        else:
            order = (False, True)
        for from_main in order:
            key = self._evict_main(can_evict) if from_main else self._evict_small(can_evict)
            if key is not None:
                return key
        return None

    def _evict_small(self, can_evict):
        """Move used blocks from the head of small to main until one unused block can go to the ghost."""
        small, main = self._small, self._main
        for _ in range(len(small)):
            key, uses = small.popitem(last=False)
            if uses >= self.move_to_main_threshold:
                main[key] = 0
            elif can_evict(key):
                self._ghost[key] = None
                return key
            else:
                small[key] = uses
        return None

    def _evict_main(self, can_evict):
        """Clock over main: a used block loses one use and goes round; an unused one is evicted.

        Every counter reaches zero within MAX_FREQ rounds, so one more round
        finds any evictable block.
        """
        main = self._main
        for _ in range((MAX_FREQ + 1) * len(main)):
            key, uses = main.popitem(last=False)
            if uses == 0 and can_evict(key):
                return key
            main[key] = max(uses - 1, 0)
        return None

    def __len__(self) -> int:
        return len(self._small) + len(self._main)
