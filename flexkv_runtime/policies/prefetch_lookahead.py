"""Promote the blocks of the first ``depth`` queued requests before they are scheduled.

Requests near the head of the queue will run soon; reading their prefixes from
slower tiers now hides that latency behind the queueing delay. At most
``max_blocks`` keys are returned per queue event, in queue and prefix order, so
one long queue cannot flush the CPU tier.
"""
from __future__ import annotations

from itertools import islice

from flexkv_runtime.policies.base import PrefetchPolicy


class LookaheadPrefetch(PrefetchPolicy):
    name = "lookahead"

    def __init__(
        self, stop_rule: str = "best_effort", timeout_s: float = 0.0, depth: int = 4, max_blocks: int = 256
    ) -> None:
        super().__init__(stop_rule, timeout_s)
        if depth < 0 or max_blocks < 0:
            raise ValueError(f"lookahead prefetch depth and max_blocks must be >= 0, got {depth}, {max_blocks}")
        self.depth = depth
        self.max_blocks = max_blocks

    def on_waiting(self, waiting):
        # an ordered set: requests that share a prefix name its blocks once
        wanted = dict.fromkeys(key for _, keys in waiting[: self.depth] for key in keys)
        return list(islice(wanted, self.max_blocks))
