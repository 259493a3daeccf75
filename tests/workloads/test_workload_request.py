"""Request/Workload invariants and the chained-prefix checker."""
from __future__ import annotations

import pytest

from flexkv_sim.workloads import Request, Workload, find_chain_violation


def _request(request_id: int, block_ids: tuple[int, ...], input_length: int | None = None,
             arrival_s: float = 0.0) -> Request:
    tokens = 4 * len(block_ids) if input_length is None else input_length
    return Request(request_id, arrival_s, tokens, 1, block_ids, tokens_per_block=4)


def test_block_count_must_cover_the_prompt() -> None:
    assert _request(0, (1, 2, 3), input_length=9).full_blocks == 2
    with pytest.raises(ValueError, match="need 3"):
        _request(0, (1, 2), input_length=9)


def test_request_is_frozen_and_slotted() -> None:
    request = _request(0, (1,))
    with pytest.raises(AttributeError):
        request.arrival_s = 1.0  # type: ignore[misc]
    assert not hasattr(request, "__dict__")


def test_workload_counts() -> None:
    workload = Workload("w", 4, [_request(0, (1, 2, 3)), _request(1, (1, 2, 4)), _request(2, (5,))])
    assert len(workload) == 3
    assert workload.num_block_refs() == 7
    assert workload.num_unique_blocks() == 5
    assert workload.infinite_cache_hit_ratio() == pytest.approx(2 / 7)
    assert Workload("empty", 4, []).infinite_cache_hit_ratio() == 0.0


def test_workload_rejects_unsorted_arrivals_and_mixed_block_sizes() -> None:
    with pytest.raises(ValueError, match="not sorted"):
        Workload("w", 4, [_request(0, (1,), arrival_s=2.0), _request(1, (2,), arrival_s=1.0)])
    with pytest.raises(ValueError, match="tokens per block"):
        Workload("w", 8, [_request(0, (1,))])


@pytest.mark.parametrize(
    ("prompts", "problem"),
    [
        ([(1, 2), (1, 2, 3), (4,)], None),
        ([(1, 2), (3, 2)], "block id 2 at position 1 follows 3, but earlier followed 1"),
        ([(1, 2), (2,)], "block id 2 at position 0 follows None"),
        ([(1, 1)], "block id 1 at position 1 follows 1"),
    ],
)
def test_find_chain_violation(prompts: list[tuple[int, ...]], problem: str | None) -> None:
    requests = [_request(i, ids) for i, ids in enumerate(prompts)]
    found = find_chain_violation(requests)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found
