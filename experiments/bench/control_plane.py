"""`python -m experiments bench control_plane`: our control plane vs vLLM's CPUOffloadingManager.

Both replay the same key stream (the Mooncake conversation trace by default,
CPU tier at 5% of its unique blocks, LRU) with the same sequence per request:
look up the prefix, load the ready prefix (pin, touch, unpin), offer the rest
for storing, complete the store. Both sides get their keys precomputed, so the
timing is the cache managers' own work, in CPU seconds of this process
(process time, so other load on the machine does not skew the ratio), runs
interleaved. Reports block operations per second
(one block reference through lookup and load-or-store), their ratio, and both
hit ratios, which must agree. Ends with one JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from experiments.bench._args import whole, positive
from experiments.common import PROJECT_ROOT
from flexkv_runtime.control.config import build_manager
from flexkv_runtime.control.ops import ImmediateDataPlane
from flexkv_sim.replay import workload_keys
from flexkv_sim.workloads.mooncake import load_mooncake_trace

DEFAULT_TRACE = PROJECT_ROOT.parent / "shared" / "traces" / "mooncake_conversation_trace.jsonl"


def run_ours(keys: list[list[int]], capacity: int) -> tuple[float, int, int]:
    """Returns (CPU seconds, block hits, block references)."""
    data_plane = ImmediateDataPlane()
    manager = build_manager(tiers={"cpu": capacity}, eviction="lru", data_plane=data_plane,
                            clock=lambda: 0.0, block_bytes=1)
    lookup, plan_load, plan_store = manager.lookup, manager.plan_load, manager.plan_store
    complete, drain = manager.complete, data_plane.drain
    started = time.process_time()
    for rid, request_keys in enumerate(keys):
        ready = lookup(request_keys).ready_blocks
        loaded = plan_load(rid, request_keys, 0, range(ready)) if ready else 0
        for op in drain():
            complete(op.op_id)
        plan_store(rid, request_keys, range(loaded, len(request_keys)), start=loaded)
        for op in drain():
            complete(op.op_id)
    wall = time.process_time() - started
    stats = manager.stats
    return wall, sum(stats.block_hits.values()), stats.block_accesses


def run_vllm(keys: list[list[bytes]], capacity: int) -> tuple[float, int, int]:
    """The same stream through vLLM's manager and its built-in ``lru`` policy.

    vLLM's ``lru`` touches a batch tail first (the head ends most recent); the
    batch is handed over reversed so recency follows prefix order, the order our
    manager uses, and both make the same eviction decisions with one call per
    batch, as vLLM's connector makes them.
    """
    from vllm.v1.kv_offload.base import LookupResult, ReqContext
    from vllm.v1.kv_offload.cpu.manager import CPUOffloadingManager

    manager = CPUOffloadingManager(num_chunks=capacity, cache_policy="lru")
    hit = LookupResult.HIT
    hits = refs = 0
    started = time.process_time()
    for rid, request_keys in enumerate(keys):
        ctx = ReqContext(req_id=str(rid))
        manager.on_new_request(ctx)
        ready = 0
        for key in request_keys:
            if manager.lookup(key, ctx) is not hit:
                break
            ready += 1
        if ready:
            prefix = request_keys[:ready]
            manager.prepare_load(prefix, ctx)
            manager.touch(prefix[::-1], ctx)
            manager.complete_load(prefix, ctx)
        rest = request_keys[ready:]
        resident = [key for key in rest if manager._policy.get(key) is not None]
        out = manager.prepare_store(rest, ctx)
        if resident:
            manager.touch(resident[::-1], ctx)
        if out is not None:
            manager.complete_store(out.keys_to_store, ctx)
        hits += ready + len(resident)
        refs += len(request_keys)
    wall = time.process_time() - started
    return wall, hits, refs


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments bench control_plane", description=__doc__)
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    parser.add_argument("--capacity-fraction", type=positive, default=0.05)
    parser.add_argument("--repeats", type=whole, default=3, help="runs per side; the best is reported")
    args = parser.parse_args(argv)
    if args.capacity_fraction > 1:
        parser.error(f"--capacity-fraction must be at most 1 (the whole trace), got {args.capacity_fraction}")
    if not args.trace.exists():
        print(f"trace not found: {args.trace} (pass --trace PATH)", file=sys.stderr)
        return 2
    try:
        from vllm.v1.kv_offload.base import make_offload_key
    except ImportError as exc:
        print(f"vLLM is needed for this benchmark ({exc}); install it with `make install-test`", file=sys.stderr)
        return 2

    workload = load_mooncake_trace(args.trace)
    ours_keys = workload_keys(workload)
    vllm_keys = [[make_offload_key(k.to_bytes(8, "little"), 0) for k in ks] for ks in ours_keys]
    capacity = max(1, round(workload.num_unique_blocks() * args.capacity_fraction))

    # interleaved, best of each: both sides see the same machine load
    runs = [(run_ours(ours_keys, capacity), run_vllm(vllm_keys, capacity)) for _ in range(args.repeats)]
    ours = min((r[0] for r in runs), key=lambda r: r[0])
    vllm = min((r[1] for r in runs), key=lambda r: r[0])
    ours_ops, vllm_ops = ours[2] / ours[0], vllm[2] / vllm[0]
    result = {
        "trace": args.trace.name,
        "capacity_blocks": capacity,
        "block_refs": ours[2],
        "ours_ops_per_s": round(ours_ops),
        "vllm_ops_per_s": round(vllm_ops),
        "ratio": round(ours_ops / vllm_ops, 3),
        "ours_hit_ratio": round(ours[1] / ours[2], 6),
        "vllm_hit_ratio": round(vllm[1] / vllm[2], 6),
        "hit_ratios_agree": abs(ours[1] / ours[2] - vllm[1] / vllm[2]) < 1e-3,
        "ours_cpu_s": round(ours[0], 3),
        "vllm_cpu_s": round(vllm[0], 3),
    }
    print(f"{'':12}{'ops/s':>12}{'hit ratio':>12}{'cpu s':>10}")
    print(f"{'ours':12}{result['ours_ops_per_s']:>12,}{result['ours_hit_ratio']:>12.4f}{result['ours_cpu_s']:>10.3f}")
    print(f"{'vllm':12}{result['vllm_ops_per_s']:>12,}{result['vllm_hit_ratio']:>12.4f}{result['vllm_cpu_s']:>10.3f}")
    print(f"ratio ours/vllm: {result['ratio']:.2f}x (target >= 1.5x)")
    print(json.dumps(result))
    return 0
