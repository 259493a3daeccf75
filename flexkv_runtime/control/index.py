"""The prefix index: one record per block the hierarchy knows, linked to its parent.

A record says which tiers hold the block (and in which slot), which of those
copies are complete (``ready``), how many transfers or running requests use it
(``pins``: a pinned block is never evicted), and what a policy needs to value it
(depth in the prefix tree, access time and count, the prefill time its reuse
saves). Leaf-first policies keep their own counts of resident children: the
index does not, as the cheapest record is what makes the hot path fast.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from enum import IntEnum


class TierKind(IntEnum):
    """Tiers from fastest to slowest; also the bit index in ``Block.ready``."""

    GPU = 0
    CPU = 1
    SSD = 2
    REMOTE = 3


class Block:
    __slots__ = (
        "key", "parent", "depth", "slots", "ready", "pins",
        "last_access", "hits", "prefill_cost_s", "arriving", "child_records", "request_tokens",
    )

    def __init__(self, key: Hashable, parent: Block | None, prefill_cost_s: float) -> None:
        self.key = key
        self.parent = parent
        self.depth = parent.depth + 1 if parent is not None else 0
        #: tier -> slot of the copy there (present while in flight, too)
        self.slots: dict[int, int] = {}
        #: bit t set when the copy in tier t is complete and may be read
        self.ready = 0
        self.pins = 0
        self.last_access = 0.0
        self.hits = 0
        self.prefill_cost_s = prefill_cost_s
        #: the op bringing the CPU copy while it is in flight (loads wait for it)
        self.arriving = -1
        #: children the index holds a record of, resident or not: a block with any is
        #: never forgotten, or they would point at a record the index no longer has
        self.child_records = 0
        #: prompt length of the request that last stored it: the slower tiers' admission
        #: judges the block by it when the block is copied down, after that request is gone
        self.request_tokens = 0

    def ready_in(self, tier: int) -> bool:
        return bool(self.ready >> tier & 1)

    def __repr__(self) -> str:
        tiers = ",".join(TierKind(t).name + ("" if self.ready_in(t) else "*") for t in sorted(self.slots))
        key = f"{self.key:#x}" if isinstance(self.key, int) else repr(self.key)
        return f"Block({key}, depth={self.depth}, tiers=[{tiers}], pins={self.pins})"


class PrefixIndex:
    """Key -> Block, forgetting blocks no tier holds and nothing references."""

    def __init__(self, prefill_cost: Callable[[int], float]) -> None:
        self._blocks: dict[Hashable, Block] = {}
        self._prefill_cost = prefill_cost
        self._cost_by_depth: list[float] = []
        #: key -> Block or None; the dict's own method, as this is the hottest call
        self.get = self._blocks.get

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._blocks

    def get_or_create(self, key: Hashable, parent: Block | None) -> Block:
        block = self._blocks.get(key)
        return block if block is not None else self.create(key, parent)

    def create(self, key: Hashable, parent: Block | None) -> Block:
        """A new record for a key the index does not hold."""
        depth = parent.depth + 1 if parent is not None else 0
        costs = self._cost_by_depth
        while len(costs) <= depth:  # the cost model depends on depth alone: compute each once
            costs.append(self._prefill_cost(len(costs)))
        block = self._blocks[key] = Block(key, parent, costs[depth])
        if parent is not None:
            parent.child_records += 1
        return block

    def chain(self, keys: Sequence[Hashable], start: int) -> Block | None:
        """The record of ``keys[start - 1]``, the parent of the block at ``start``.

        Ancestors the index does not know get records (holding no data) so that
        blocks stored from an offset still know their depth and parent.
        """
        if start <= 0:
            return None
        known = start
        while known > 0 and keys[known - 1] not in self._blocks:
            known -= 1
        parent = self._blocks[keys[known - 1]] if known > 0 else None
        for key in keys[known:start]:
            parent = self.create(key, parent)
        return parent

    def detach(self, block: Block, tier: int) -> int:
        """Drop the tier's copy and return its slot; forget the block if nothing holds it."""
        slots = block.slots
        slot = slots.pop(tier)
        block.ready &= ~(1 << tier)
        if not slots and not block.pins and not block.child_records:
            self.forget_if_unused(block)
        return slot

    def forget_if_unused(self, block: Block | None) -> None:
        while (
            block is not None
            and not block.slots
            and block.pins == 0
            and block.child_records == 0
            and self._blocks.get(block.key) is block
        ):
            del self._blocks[block.key]
            block = block.parent
            if block is not None:
                block.child_records -= 1

    def blocks(self):
        return self._blocks.values()

    def resident_children(self, block: Block, tier: int) -> int:
        """Children of ``block`` with a copy in ``tier``: a full scan, for checks and tests."""
        return sum(1 for b in self._blocks.values() if b.parent is block and tier in b.slots)
