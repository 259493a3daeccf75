"""Adaptive Replacement Cache (Megiddo & Modha, FAST'03).

T1 holds blocks seen once recently, T2 blocks seen at least twice; the ghost lists
B1 and B2 remember the keys recently evicted from each. A block re-admitted from
B1 says T1 was too small, one from B2 that T2 was, and the target size ``p`` of
T1 moves accordingly, so the split between recency and frequency tunes itself
to the workload with no parameter.

The manager asks for a victim before it announces the incoming block, so REPLACE
here uses ``p`` as adapted by the previous miss and cannot apply the paper's
tie rule for an incoming B2 key (``|T1| == p``); ghost lists are trimmed on
insert instead of before REPLACE, which keeps the paper's invariants
(|T1|+|B1| <= c, all four lists <= 2c).
"""
from __future__ import annotations

from collections import OrderedDict

from flexkv_runtime.policies.base import EvictionPolicy


class ARC(EvictionPolicy):
    name = "arc"

    def __init__(self, capacity_blocks: int) -> None:
        super().__init__(capacity_blocks)
        self.p = 0  # target size of T1, in blocks
        self._t1: OrderedDict = OrderedDict()  # each list oldest first
        self._t2: OrderedDict = OrderedDict()
        self._b1: OrderedDict = OrderedDict()
        self._b2: OrderedDict = OrderedDict()

    def on_insert(self, key, block) -> None:
        c = self.capacity_blocks
        if key in self._b1:
            self.p = min(self.p + max(len(self._b2) // len(self._b1), 1), c)
            del self._b1[key]
            self._t2[key] = None
        elif key in self._b2:
            self.p = max(self.p - max(len(self._b1) // len(self._b2), 1), 0)
            del self._b2[key]
            self._t2[key] = None
        else:
            self._t1[key] = None
            if len(self._t1) + len(self._b1) > c and self._b1:
                self._b1.popitem(last=False)
            elif len(self._t1) + len(self._t2) + len(self._b1) + len(self._b2) > 2 * c and self._b2:
                self._b2.popitem(last=False)

    def on_hit(self, key, block) -> None:
        if key in self._t1:
            del self._t1[key]
        else:
            del self._t2[key]
        self._t2[key] = None

    def on_remove(self, key) -> None:
        self._t1.pop(key, None)
        self._t2.pop(key, None)

    def victim(self, can_evict):
        lists = ((self._t1, self._b1), (self._t2, self._b2))
        if not (self._t1 and len(self._t1) > self.p):
            lists = lists[::-1]
        for resident, ghost in lists:
            for key in resident:
                if can_evict(key):
                    del resident[key]
                    ghost[key] = None
                    return key
        return None

    def __len__(self) -> int:
        return len(self._t1) + len(self._t2)
