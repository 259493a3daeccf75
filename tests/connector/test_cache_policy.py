"""FlexKV eviction policies inside vLLM's own CPU offloading manager (``cache_policy_module_path``)."""
from __future__ import annotations

import random

import pytest

pytest.importorskip("vllm")

from flexkv_sim.replay import replay  # noqa: E402
from flexkv_sim.workloads.request import Request, Workload  # noqa: E402
from vllm.v1.kv_offload.base import LookupResult, ReqContext, make_offload_key  # noqa: E402
from vllm.v1.kv_offload.cpu.manager import CPUOffloadingManager  # noqa: E402

MODULE = "connector.cache_policy"
TOKENS_PER_BLOCK = 16
POLICIES = ["lru", "fifo", "lfu", "arc", "s3fifo", "sieve", "slru", "prefix_lru", "cost_aware", "lookahead", "hit_density"]


def key_stream(seed: int, requests: int, documents: int, blocks: int) -> list[list[int]]:
    """Requests that each read the first few blocks of one of ``documents`` prefix chains, Zipf-like."""
    rng = random.Random(seed)
    weights = [1 / (d + 1) for d in range(documents)]
    stream = []
    for _ in range(requests):
        document = rng.choices(range(documents), weights)[0]
        stream.append([document * 1000 + b for b in range(rng.randint(1, blocks))])
    return stream


def drive(manager: CPUOffloadingManager, stream: list[list[int]]) -> tuple[int, int]:
    """What vLLM's offloading scheduler does per request: look up the ready prefix, load it, store the
    rest, finish. Returns (hit blocks, evicted blocks)."""
    hits = evicted = 0
    for i, ids in enumerate(stream):
        context = ReqContext(req_id=str(i))
        manager.on_new_request(context)
        keys = [make_offload_key(n.to_bytes(8, "big"), 0) for n in ids]
        found = 0
        while found < len(keys) and manager.lookup(keys[found], context) is LookupResult.HIT:
            found += 1
        if found:
            manager.prepare_load(keys[:found], context)
            manager.complete_load(keys[:found], context)
        stored = manager.prepare_store(keys[found:], context) if found < len(keys) else None
        if stored is not None:
            manager.complete_store(stored.keys_to_store, context)
            evicted += len(stored.evicted_keys)
        manager.on_request_finished(context)
        hits += found
    return hits, evicted


def replayed(stream: list[list[int]], capacity: int, eviction: str) -> tuple[int, int]:
    requests = tuple(Request(i, float(i), TOKENS_PER_BLOCK * len(ids), 1, tuple(ids), TOKENS_PER_BLOCK)
                     for i, ids in enumerate(stream))
    result = replay(Workload("stream", TOKENS_PER_BLOCK, requests), capacity_blocks=capacity, eviction=eviction)
    return round(result.block_hit_ratio * result.block_refs), result.evictions


@pytest.mark.parametrize("eviction", ["lru", "fifo", "lfu", "arc", "s3fifo", "sieve"])
def test_decides_like_the_flexkv_replay_on_single_block_requests(eviction):
    stream = key_stream(seed=1, requests=3000, documents=400, blocks=1)
    ours = drive(CPUOffloadingManager(64, cache_policy=f"flexkv_{eviction}", cache_policy_module_path=MODULE), stream)
    assert ours == replayed(stream, 64, eviction)
    assert ours[0] > 0 and ours[1] > 0


def test_flexkv_lru_agrees_with_vllms_lru_on_single_block_requests():
    stream = key_stream(seed=2, requests=3000, documents=400, blocks=1)
    ours = drive(CPUOffloadingManager(64, cache_policy="flexkv_lru", cache_policy_module_path=MODULE), stream)
    assert ours == drive(CPUOffloadingManager(64, cache_policy="lru"), stream)


@pytest.mark.parametrize("eviction", POLICIES)
def test_every_policy_runs_prefix_requests_within_capacity(eviction):
    manager = CPUOffloadingManager(48, cache_policy=f"flexkv_{eviction}", cache_policy_module_path=MODULE)
    hits, evicted = drive(manager, key_stream(seed=3, requests=1500, documents=60, blocks=12))
    policy = manager._policy
    assert len(policy.chunks) == len(policy.policy) <= 48
    assert hits > 0 and evicted > 0


def test_unknown_and_offline_policies_are_refused():
    with pytest.raises(AttributeError, match="valid choices"):
        CPUOffloadingManager(8, cache_policy="flexkv_nope", cache_policy_module_path=MODULE)
    with pytest.raises(ValueError, match="needs the future"):
        CPUOffloadingManager(8, cache_policy="flexkv_belady", cache_policy_module_path=MODULE)
