"""Routers in front of several engine instances."""
from __future__ import annotations

from collections.abc import Sequence

from flexkv_sim.engine import Engine, SimRequest


class RoundRobin:
    def __init__(self, engines: Sequence[Engine]) -> None:
        self.engines = list(engines)
        self._next = 0

    def choose(self, sr: SimRequest) -> Engine:
        engine = self.engines[self._next]
        self._next = (self._next + 1) % len(self.engines)
        return engine


class PrefixAware:
    """Send a request where it is cheapest, counting both reuse and load (as Dynamo's KV router does).

    Cost of an instance = the blocks it would have to prefill (the prompt less the
    prefix its GPU cache and its own tiers hold) + the blocks of the requests
    already queued or running there. Pure longest-prefix routing
    would send every request sharing a hot system prompt to one instance; the
    load term spreads them once that instance is busier than a prefill is worth.
    Ties go to the lowest-numbered instance.
    """

    def __init__(self, engines: Sequence[Engine]) -> None:
        self.engines = list(engines)

    def choose(self, sr: SimRequest) -> Engine:
        if len(self.engines) == 1:
            return self.engines[0]
        blocks = len(sr.keys)
        return min(self.engines, key=lambda e: blocks - e.cached_prefix(sr) + e.load_blocks)


ROUTERS = {"round_robin": RoundRobin, "prefix_aware": PrefixAware}


def make_router(name: str, engines: Sequence[Engine]) -> RoundRobin | PrefixAware:
    if name not in ROUTERS:
        raise ValueError(f"unknown router {name!r}; valid choices: {sorted(ROUTERS)}")
    return ROUTERS[name](engines)
