"""Segmented LRU (Karedla, Love & Wherry 1994): a probationary and a protected LRU.

New blocks enter probation; a hit there promotes a block to the protected segment,
whose overflow is demoted back to the head of probation. Victims come from the
tail of probation first, so blocks used once (a long document read a single
time) cannot flush the ones reused.
"""
from __future__ import annotations

from collections import OrderedDict

from flexkv_runtime.policies.base import EvictionPolicy


class SLRU(EvictionPolicy):
    name = "slru"

    def __init__(self, capacity_blocks: int, protected_fraction: float = 0.8) -> None:
        super().__init__(capacity_blocks)
        if not 0.0 <= protected_fraction < 1.0:
            raise ValueError(f"slru protected_fraction must be in [0, 1), got {protected_fraction}")
        self.protected_fraction = protected_fraction
        self._protected_blocks = int(capacity_blocks * protected_fraction)
        self._probation: OrderedDict = OrderedDict()  # oldest first
        self._protected: OrderedDict = OrderedDict()

    def on_insert(self, key, block) -> None:
        self._probation[key] = None

    def on_hit(self, key, block) -> None:
        if key in self._protected:
            self._protected.move_to_end(key)
            return
        del self._probation[key]
        self._protected[key] = None
        while len(self._protected) > self._protected_blocks:
            demoted, _ = self._protected.popitem(last=False)
            self._probation[demoted] = None

    def on_remove(self, key) -> None:
        self._probation.pop(key, None)
        self._protected.pop(key, None)

    def victim(self, can_evict):
        for segment in (self._probation, self._protected):
            for key in segment:
                if can_evict(key):
                    del segment[key]
                    return key
        return None

    def __len__(self) -> int:
        return len(self._probation) + len(self._protected)
