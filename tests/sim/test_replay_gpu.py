"""Replay with an engine's own prefix cache in front of the tiers (``replay(gpu_blocks=...)``)."""
from __future__ import annotations

import pytest

from flexkv_sim.replay import replay
from flexkv_sim.workloads import ChatSpec, GeneratorSettings, generate
from flexkv_sim.workloads.request import Workload


@pytest.fixture(scope="module")
def chat() -> Workload:
    return generate(ChatSpec(num_sessions=60, think_time_s=5.0), GeneratorSettings(tokens_per_block=16, seed=5))


def test_blocks_the_engine_serves_never_reach_the_tiers(chat):
    capacity = chat.num_unique_blocks() // 20
    alone = replay(chat, capacity_blocks=capacity, eviction="lru")
    fronted = replay(chat, capacity_blocks=capacity, eviction="lru", gpu_blocks=capacity)
    served = fronted.extra["gpu_hit_blocks"]
    assert served > 0 and fronted.extra["gpu_evictions"] > 0
    assert fronted.block_refs + served == alone.block_refs
    # the engine serves the short reuses the tier would have served
    assert fronted.block_hit_ratio_by_tier["CPU"] * fronted.block_refs < alone.block_hit_ratio_by_tier["CPU"] * alone.block_refs


def test_an_engine_cache_that_holds_everything_leaves_the_tiers_only_new_blocks(chat):
    unique = chat.num_unique_blocks()
    everything_on_gpu = replay(chat, capacity_blocks=8, eviction="lru", gpu_blocks=unique)
    everything_on_cpu = replay(chat, capacity_blocks=unique, eviction="lru")
    assert everything_on_gpu.extra["gpu_evictions"] == 0
    assert everything_on_gpu.block_hit_ratio == 0
    assert everything_on_gpu.prefix_token_hit_ratio == everything_on_cpu.prefix_token_hit_ratio > 0
