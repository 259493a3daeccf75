"""Admit a block only on its ``min_hits``-th sighting.

Most blocks of a serving trace are never read again (unique questions, answers);
copying them in only evicts blocks that would be. Sightings are counted in a
table of at most ``table_size`` keys that forgets the least recently seen, so a
block must come back while it is still remembered.
"""
from __future__ import annotations

from collections import OrderedDict

from flexkv_runtime.policies.base import AdmissionPolicy


class FrequencyAdmission(AdmissionPolicy):
    name = "frequency"

    def __init__(self, min_hits: int = 2, table_size: int = 65536) -> None:
        super().__init__()
        if min_hits < 1:
            raise ValueError(f"frequency admission min_hits must be >= 1, got {min_hits}")
        if table_size < 1:
            raise ValueError(f"frequency admission table_size must be >= 1, got {table_size}")
        self.min_hits = min_hits
        self.table_size = table_size
        self._sightings: OrderedDict = OrderedDict()  # key -> times offered, least recent first

    def _sighted(self, key) -> int:
        seen = self._sightings.pop(key, 0) + 1
        self._sightings[key] = seen
        if len(self._sightings) > self.table_size:
            self._sightings.popitem(last=False)
        return seen

    def admit(self, key, block, request_tokens: int) -> bool:
        return self._sighted(key) >= self.min_hits

    def observe(self, key, block, request_tokens: int) -> None:
        self._sighted(key)
