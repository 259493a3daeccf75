"""Promote a request's blocks from slower tiers as soon as it is looked up.

The scheduler looks a request up before it can run it; starting the SSD or
remote reads then overlaps them with the wait instead of the load. The manager
promotes only the returned blocks that are in a slower tier and not in CPU.
"""
from __future__ import annotations

from flexkv_runtime.policies.base import PrefetchPolicy


class PromoteOnLookup(PrefetchPolicy):
    name = "promote_on_lookup"

    def __init__(self, stop_rule: str = "best_effort", timeout_s: float = 0.0, max_blocks: int | None = None) -> None:
        super().__init__(stop_rule, timeout_s)
        if max_blocks is not None and max_blocks < 0:
            raise ValueError(f"promote_on_lookup max_blocks must be >= 0 or null, got {max_blocks}")
        self.max_blocks = max_blocks

    def on_lookup(self, request_id, keys):
        return keys if self.max_blocks is None else keys[: self.max_blocks]
