"""A managed tier: a fixed number of block slots, an eviction policy and an
admission policy. Capacity is given in bytes and turned into whole blocks."""
from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from dataclasses import asdict, dataclass

from flexkv_runtime.control.index import TierKind
from flexkv_runtime.policies.base import AdmissionPolicy, EvictionPolicy


@dataclass
class TierStats:
    hits: int = 0  # block accesses that found the block here (first tier that had it)
    inserts: int = 0
    evictions: int = 0
    rejected: int = 0  # refused by admission or for lack of an evictable slot
    failed: int = 0  # transfers into or out of this tier that failed
    bytes_in: int = 0
    bytes_out: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def blocks_for_capacity(kind: TierKind, capacity_bytes: int, block_bytes: int) -> int:
    """Whole blocks that fit, with an error that names the tier when none does."""
    if block_bytes <= 0:
        raise ValueError(f"block size must be positive, got {block_bytes} bytes")
    if capacity_bytes <= 0:
        raise ValueError(f"{kind.name} tier capacity must be positive, got {capacity_bytes} bytes")
    blocks = capacity_bytes // block_bytes
    if blocks == 0:
        raise ValueError(
            f"{kind.name} tier of {capacity_bytes} bytes cannot hold one block of {block_bytes} bytes"
        )
    return blocks


class Tier:
    def __init__(
        self, kind: TierKind, capacity_blocks: int, eviction: EvictionPolicy, admission: AdmissionPolicy
    ) -> None:
        if capacity_blocks <= 0:
            raise ValueError(f"{kind.name} tier needs at least one block, got capacity {capacity_blocks}")
        self.kind = kind
        #: the kind as a plain int, its bit in ``Block.ready`` and its name: IntEnum arithmetic and
        #: ``.name`` cost several times more on the manager's per-block path
        self.slot_key = int(kind)
        self.bit = 1 << kind
        self.name = kind.name
        self.capacity_blocks = capacity_blocks
        self.eviction = eviction
        self.admission = admission
        self.stats = TierStats()
        #: free slot numbers; popped from the end, so slot 0 goes first
        self.free_slots = list(range(capacity_blocks - 1, -1, -1))
        #: set by the manager: whether a resident key may be evicted now (ready, unpinned)
        self.can_evict: Callable[[Hashable], bool] = lambda key: False
        #: lets the manager skip the admission call on its hot path
        self.admits_all = getattr(admission, "admits_everything", False)

    @property
    def used_blocks(self) -> int:
        return self.capacity_blocks - len(self.free_slots)

    def take_slots(self, slots: Iterable[int]) -> set[int]:
        """Claim particular free slots (blocks found on disk after a restart); returns those taken,
        leaving out any that is not free or out of range. One pass over the free list for them all:
        a search per slot made recovering a large SSD tier take hours."""
        taken = set(slots).intersection(self.free_slots)
        if taken:
            self.free_slots[:] = [slot for slot in self.free_slots if slot not in taken]
        return taken

    def release_slot(self, slot: int) -> None:
        self.free_slots.append(slot)

    def __repr__(self) -> str:
        return (
            f"Tier({self.kind.name}, {self.used_blocks}/{self.capacity_blocks} blocks, "
            f"eviction={self.eviction.name}, admission={self.admission.name})"
        )
