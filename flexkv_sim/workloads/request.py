"""Requests as the cache sees them: arrival time, lengths and one chained id per block.

Block ids follow the Mooncake trace convention: an id names a whole prefix, so equal
ids at equal positions mean the same tokens up to and including that block, and an id
never follows two different parents. The control plane namespaces these ids into block
keys (``BlockKeyer.from_hash_ids``); nothing here hashes tokens.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Request:
    """One prompt to prefill and answer.

    ``block_ids`` holds one id per block of ``tokens_per_block`` tokens, so
    ``len(block_ids) == ceil(input_length / tokens_per_block)``: the last block is
    partial when ``input_length`` is not a multiple of ``tokens_per_block``
    (see ``full_blocks``). vLLM only caches full blocks, so a consumer that models
    it should not count a hit on that partial block.
    """

    request_id: int
    arrival_s: float
    input_length: int
    output_length: int
    block_ids: tuple[int, ...]
    tokens_per_block: int
    session_id: int | None = None
    kind: str = ""

    def __post_init__(self) -> None:
        expected = -(-self.input_length // self.tokens_per_block)
        if len(self.block_ids) != expected:
            raise ValueError(
                f"request {self.request_id}: {len(self.block_ids)} block ids for "
                f"{self.input_length} tokens at {self.tokens_per_block} per block (need {expected})"
            )

    @property
    def full_blocks(self) -> int:
        """Blocks completely filled by the prompt (all but a partial last one)."""
        return self.input_length // self.tokens_per_block


@dataclass(frozen=True)
class Workload:
    """A named, arrival-ordered request stream sharing one block size."""

    name: str
    tokens_per_block: int
    requests: tuple[Request, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "requests", tuple(self.requests))
        previous = float("-inf")
        for request in self.requests:
            if request.tokens_per_block != self.tokens_per_block:
                raise ValueError(
                    f"request {request.request_id} has {request.tokens_per_block} tokens per block, "
                    f"workload {self.name!r} has {self.tokens_per_block}"
                )
            if request.arrival_s < previous:
                raise ValueError(f"workload {self.name!r} is not sorted by arrival at request {request.request_id}")
            previous = request.arrival_s

    def __len__(self) -> int:
        return len(self.requests)

    def __iter__(self) -> Iterator[Request]:
        return iter(self.requests)

    @property
    def duration_s(self) -> float:
        """Time from the first arrival to the last."""
        return self.requests[-1].arrival_s - self.requests[0].arrival_s if self.requests else 0.0

    def num_block_refs(self) -> int:
        """Block references over all prompts, repeats included."""
        return sum(len(r.block_ids) for r in self.requests)

    def num_unique_blocks(self) -> int:
        """Distinct block ids: what an infinite cache would end up holding."""
        return len({b for r in self.requests for b in r.block_ids})

    def infinite_cache_hit_ratio(self) -> float:
        """Share of block references seen earlier: the ceiling for any cache size."""
        refs = self.num_block_refs()
        return 1.0 - self.num_unique_blocks() / refs if refs else 0.0


class PrefixChainChecker:
    """Checks the chained-prefix rule incrementally, one prompt at a time.

    Checking parents is enough: an id with one parent (None at position 0) has one
    position, by induction along its chain.
    """

    def __init__(self) -> None:
        self._parent_of: dict[int, int | None] = {}

    def violation(self, block_ids: Iterable[int]) -> str | None:
        """Record a prompt's ids; describe the first one that breaks the rule, if any."""
        parent_of = self._parent_of
        parent: int | None = None
        for position, block_id in enumerate(block_ids):
            known = parent_of.setdefault(block_id, parent)
            if known != parent:
                return f"block id {block_id} at position {position} follows {parent}, but earlier followed {known}"
            parent = block_id
        return None


def find_chain_violation(requests: Iterable[Request]) -> str | None:
    """Describe the first request whose ids break the chained-prefix rule, or None."""
    checker = PrefixChainChecker()
    for request in requests:
        problem = checker.violation(request.block_ids)
        if problem:
            return f"request {request.request_id}: {problem}"
    return None
