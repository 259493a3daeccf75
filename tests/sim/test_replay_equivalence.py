"""With timing unable to reorder anything, the simulator and the timing-free replay agree exactly.

Requests are spaced far apart (every load, store and demotion ends before the next
arrival), the GPU prefix cache is off, and every prompt ends with a full block of
its own: vLLM never reuses a prompt's last block (it recomputes the last token),
while replay would, so such blocks must never repeat for the call sequences to match.
"""
from __future__ import annotations

import pytest

from flexkv_sim.replay import replay
from flexkv_sim.workloads import ChatSpec, GeneratorSettings, generate
from flexkv_sim.workloads.request import Request, Workload

TPB = 16


def spaced_full_block_workload() -> Workload:
    chat = generate(ChatSpec(num_sessions=40, user_tokens_mean=40, output_tokens_mean=30, think_time_s=5.0),
                    GeneratorSettings(tokens_per_block=TPB, seed=3))
    fresh = 1 + max(b for r in chat for b in r.block_ids)
    requests = []
    for i, r in enumerate(chat):
        ids = r.block_ids[: r.full_blocks] + (fresh + i,)
        requests.append(Request(i, i * 1000.0, len(ids) * TPB, 2, ids, TPB))
    return Workload("spaced", TPB, requests)


@pytest.mark.parametrize("eviction, write_policy", [("lru", "write_through"), ("belady", "write_through"),
                                                    ("s3fifo", "write_through"), ("lru", "write_back")])
def test_simulator_makes_the_same_hit_and_miss_decisions_as_replay(sim, tiny, eviction, write_policy):
    workload = spaced_full_block_workload()
    unique = workload.num_unique_blocks()
    cpu, ssd = max(4, unique // 20), max(8, unique // 6)
    expected = replay(workload, capacity_blocks=cpu, ssd_capacity_blocks=ssd, eviction=eviction,
                      write_policy=write_policy)
    result = sim(workload, prefix_caching=False, eviction=eviction, write_policy=write_policy,
                 hardware=tiny.hardware(cpu_blocks=cpu, ssd_blocks=ssd, gpu_blocks=10_000)).run()
    (manager,) = result.managers
    stats = manager.stats
    assert stats.block_accesses == expected.block_refs
    assert {tier: hits / stats.block_accesses for tier, hits in stats.block_hits.items()} == \
        expected.block_hit_ratio_by_tier
    assert sum(t.stats.evictions for t in manager.tiers.values()) == expected.evictions
    assert sum(sr.cached for sr in result.requests) * TPB == expected.prefix_hit_tokens
    assert expected.prefix_hit_tokens > 0 and expected.evictions > 0  # the case is not vacuous


def test_a_workload_with_no_requests_is_refused_not_reported_as_zero_hits(tiny):
    with pytest.raises(ValueError, match="workload test has no requests: nothing to replay"):
        replay(tiny.workload([]), capacity_blocks=4)
