"""Timing-free replay: a workload through the control plane, one request at a time.

Each request looks up its blocks, loads the longest ready prefix (promoting from
slower tiers through the CPU tier) and then offers the rest for storing, exactly
the calls the simulator and the vLLM connector make, with a data plane that
completes every op at once. The hit ratios are therefore those of the real
control plane with no timing effects; with ``demand_paging=True`` the
block-level figures match a demand-paging cache simulator (libCacheSim) fed the
same block stream.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from flexkv_runtime.control.config import build_manager
from flexkv_runtime.control.keys import BlockKeyer, Namespace
from flexkv_runtime.control.manager import CacheManager
from flexkv_runtime.control.ops import ImmediateDataPlane
from flexkv_runtime.control.oracle import FutureOracle
from flexkv_runtime.policies.base import policy_class, policy_name
from flexkv_sim.gc_pause import gc_paused
from flexkv_sim.gpu_cache import GpuPrefixCache
from flexkv_sim.workloads.request import Workload


@dataclass
class ReplayResult:
    policy: str
    capacity_blocks: int
    ssd_capacity_blocks: int
    requests: int
    block_refs: int
    unique_blocks: int
    block_hit_ratio: float
    block_hit_ratio_by_tier: dict[str, float]
    prefix_token_hit_ratio: float
    prompt_tokens: int
    prefix_hit_tokens: int
    evictions: int
    wall_s: float
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(out.pop("extra"))
        return out


def workload_keys(workload: Workload, namespace: Namespace | None = None) -> list[list[int]]:
    keyer = BlockKeyer(namespace or Namespace(), workload.tokens_per_block)
    return [keyer.from_hash_ids(r.block_ids) for r in workload.requests]


def replay(
    workload: Workload,
    *,
    capacity_blocks: int,
    ssd_capacity_blocks: int = 0,
    eviction: Any = "lru",
    admission: Any = "always",
    prefetch: Any = "none",
    write_policy: str = "write_through",
    keys: list[list[int]] | None = None,
    demand_paging: bool = False,
    gpu_blocks: int = 0,
    progress: bool = False,
) -> ReplayResult:
    """Replay ``workload`` through a fresh CacheManager and return its hit figures.

    ``gpu_blocks`` > 0 puts an engine's own prefix cache of that many blocks (vLLM's, LRU, as the
    simulator's) in front of the tiers: the leading blocks of a request it holds are served from it
    and the tiers see only the rest, as they do behind a real engine. The prefix-token hit ratio then
    counts both; the block figures stay those of the tiers.

    By default a request's new blocks are stored in one op, as the connector
    does after a prefill: they hold their slots (and cannot be evicted) until it
    completes, and a store never evicts the cached block it extends.
    ``demand_paging=True`` stores block by block with no such protection:
    textbook demand paging, libCacheSim's model, which differs when a request is
    large next to the tier (belady at 1% capacity of the Mooncake trace).
    """
    if not len(workload):
        raise ValueError(f"workload {workload.name} has no requests: nothing to replay")
    keys = keys if keys is not None else workload_keys(workload)
    offline = policy_class("eviction", policy_name(eviction)).offline
    oracle = FutureOracle(keys) if offline else None
    now = [0.0]
    data_plane = ImmediateDataPlane()
    manager = build_manager(
        tiers={"cpu": capacity_blocks, "ssd": ssd_capacity_blocks},
        eviction=eviction,
        admission=admission,
        prefetch=prefetch,
        write_policy=write_policy,
        data_plane=data_plane,
        clock=lambda: now[0],
        block_bytes=1,
        oracle=oracle,
        protect_prefix=not demand_paging,
    )

    def settle() -> None:
        while ops := data_plane.drain():
            for op in ops:
                manager.complete(op.op_id)

    gpu = GpuPrefixCache(gpu_blocks) if gpu_blocks > 0 else None
    gpu_hit_blocks = 0
    requests = workload.requests
    iterator = range(len(requests))
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc=f"replay {policy_name(eviction)}", unit="req", mininterval=0.5)
    tpb = workload.tokens_per_block
    prompt_tokens = hit_tokens = 0
    with gc_paused():
        started = time.perf_counter()
        for i in iterator:
            request, request_keys = requests[i], keys[i]
            now[0] = request.arrival_s
            if oracle is not None:
                oracle.begin(i)
            in_gpu = gpu.prefix(request_keys, len(request_keys)) if gpu is not None else []
            skip = len(in_gpu)
            manager.on_request_waiting(i, request_keys)
            found = manager.lookup(request_keys[skip:] if skip else request_keys, request_id=i)
            manager.on_request_running(i)
            loaded = skip + manager.plan_load(i, request_keys, skip, range(found.ready_blocks))
            settle()
            step = 1 if demand_paging else len(request_keys)
            for first in range(loaded, len(request_keys), step):
                last = min(first + step, len(request_keys))
                manager.plan_store(i, request_keys, range(first, last), start=first,
                                   request_tokens=request.input_length)
                settle()
            manager.on_request_finished(i)
            if gpu is not None:
                gpu_hit_blocks += skip
                _through_gpu(gpu, in_gpu, request_keys)
            prompt_tokens += request.input_length
            hit_tokens += min(loaded * tpb, request.input_length)
        wall = time.perf_counter() - started
    capacities = {tier.name: tier.capacity_blocks for tier in manager.tiers.values()}
    result = summarize(manager, workload, policy_name(eviction), capacities["CPU"], capacities.get("SSD", 0),
                       prompt_tokens, hit_tokens, wall)
    if gpu is not None:
        result.extra.update(gpu_blocks=gpu_blocks, gpu_hit_blocks=gpu_hit_blocks, gpu_evictions=gpu.evictions)
    return result


def _through_gpu(gpu: GpuPrefixCache, hit: list, keys: list) -> None:
    """The request ran on the engine: its blocks are cached there (LRU), or it bypasses a cache too small for it."""
    new = len(keys) - len(hit)
    if not gpu.can_admit(hit, new):
        return
    gpu.admit(hit, new)
    gpu.take(new)
    named = gpu.register(keys, len(hit), len(keys))
    gpu.release(hit + named, new - len(named))


def summarize(
    manager: CacheManager,
    workload: Workload,
    policy: str,
    capacity_blocks: int,
    ssd_capacity_blocks: int,
    prompt_tokens: int,
    hit_tokens: int,
    wall_s: float,
) -> ReplayResult:
    stats = manager.stats
    accesses = max(stats.block_accesses, 1)
    by_tier = {tier: hits / accesses for tier, hits in stats.block_hits.items()}
    return ReplayResult(
        policy=policy,
        capacity_blocks=capacity_blocks,
        ssd_capacity_blocks=ssd_capacity_blocks,
        requests=len(workload),
        block_refs=stats.block_accesses,
        unique_blocks=workload.num_unique_blocks(),
        block_hit_ratio=sum(stats.block_hits.values()) / accesses,
        block_hit_ratio_by_tier=by_tier,
        prefix_token_hit_ratio=hit_tokens / max(prompt_tokens, 1),
        prompt_tokens=prompt_tokens,
        prefix_hit_tokens=hit_tokens,
        evictions=sum(t.stats.evictions for t in manager.tiers.values()),
        wall_s=wall_s,
    )


def capacity_from_fraction(workload: Workload, fraction: float) -> int:
    """Capacity in blocks as a fraction of the workload's unique blocks (at least one)."""
    if fraction <= 0:
        raise ValueError(f"capacity fraction must be positive, got {fraction}")
    return max(1, round(workload.num_unique_blocks() * fraction))
