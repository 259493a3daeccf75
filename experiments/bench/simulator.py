"""`python -m experiments bench simulator`: how many simulated requests per wall second the twin runs.

The full Mooncake conversation trace (12,031 requests) goes through the full
hierarchy model: instances of the chosen hardware, each with its GPU prefix
cache, CPU DRAM and NVMe tiers (write-through), behind the router, LRU
everywhere. Then 2x and 4x the trace (copies shifted past the end of the
previous one, each with its own block ids) show how the cost grows. The copies
are not the same work: the first starts with empty tiers, and from some copy on
the SSD tier is full and every store there evicts. So each run also counts its
block operations (tier inserts, evictions and hits), and the JSON gives the wall
time per block operation of the largest run over the smallest's too: linear cost
keeps it at 1. Wall time is the simulation run; loading the trace and
hashing its block keys are reported apart. For scale, the control plane alone
(timing-free replay of the same trace through one manager with one instance's
tiers) is timed too: it is the floor under the simulator's cost. Last line: JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from experiments.bench._args import whole, wholes
from experiments.common import CONF_DIR, PROJECT_ROOT
from flexkv_runtime.control.config import tier_capacity_blocks
from flexkv_sim.hardware import HardwareSpec
from flexkv_sim.model import ModelSpec
from flexkv_sim.replay import replay, workload_keys
from flexkv_sim.simulator import simulation_from_config
from flexkv_sim.workloads.mooncake import load_mooncake_trace
from flexkv_sim.workloads.request import Request, Workload

DEFAULT_TRACE = PROJECT_ROOT.parent / "shared" / "traces" / "mooncake_conversation_trace.jsonl"


def repeated(workload: Workload, copies: int) -> Workload:
    """``copies`` back-to-back copies of the trace, each shifted in time and given fresh block ids."""
    if copies == 1:
        return workload
    requests = workload.requests
    period = workload.duration_s + 1.0
    id_span = 1 + max(b for r in requests for b in r.block_ids)
    out = [
        Request(copy * len(requests) + r.request_id, copy * period + r.arrival_s, r.input_length, r.output_length,
                tuple(b + copy * id_span for b in r.block_ids), r.tokens_per_block, r.session_id, r.kind)
        for copy in range(copies) for r in requests
    ]
    return Workload(f"{workload.name}x{copies}", workload.tokens_per_block, out)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments bench simulator", description=__doc__)
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    parser.add_argument("--hierarchy", default="h100_pcie5_nvme4")
    parser.add_argument("--model", default="llama3_1_8b")
    parser.add_argument("--instances", type=whole, default=4)
    parser.add_argument("--router", default="prefix_aware", choices=["round_robin", "prefix_aware"])
    parser.add_argument("--scales", type=wholes, default="1,2,4", help="trace copies to run, comma separated")
    args = parser.parse_args(argv)
    if not args.trace.exists():
        print(f"trace not found: {args.trace} (pass --trace PATH)", file=sys.stderr)
        return 2
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose("simulate", overrides=[
            f"hierarchy={args.hierarchy}", f"model={args.model}", "eviction=lru", "simulate.progress=false",
            "simulate.sample_interval_s=0", f"simulate.instances={args.instances}", f"simulate.router={args.router}",
        ])

    started = time.perf_counter()
    trace = load_mooncake_trace(args.trace)
    load_s = time.perf_counter() - started
    scales = args.scales
    print(f"{trace.name}: {len(trace)} requests; {args.instances} x {args.hierarchy}, {args.model}, "
          f"router {args.router}, LRU; trace loaded in {load_s:.2f} s")
    print(f"{'copies':>6}{'requests':>10}{'keys s':>9}{'wall s':>9}{'cpu s':>8}{'req/wall s':>12}{'sim s':>10}"
          f"{'TTFT p50':>10}{'block ops':>11}{'evictions':>11}")
    runs = {}
    for copies in scales:
        workload = repeated(trace, copies)
        started = time.perf_counter()
        keys = [k[: r.full_blocks] for k, r in zip(workload_keys(workload), workload.requests)]
        keys_s = time.perf_counter() - started
        simulation = simulation_from_config(workload, cfg, keys=keys)
        cpu_started = time.process_time()
        result = simulation.run()
        cpu_s = time.process_time() - cpu_started
        ttft = sorted(sr.first_token_s - sr.arrival_s for sr in result.requests)[len(result.requests) // 2]
        stats = [tier.stats for manager in result.managers for tier in manager.tiers.values()]
        evictions = sum(s.evictions for s in stats)
        block_ops = sum(s.inserts + s.hits for s in stats) + evictions
        runs[copies] = (len(workload), result.wall_s, cpu_s, block_ops)
        print(f"{copies:>6}{len(workload):>10}{keys_s:>9.2f}{result.wall_s:>9.2f}{cpu_s:>8.2f}"
              f"{len(workload) / result.wall_s:>12,.0f}{result.end_s:>10.0f}{ttft:>10.3f}"
              f"{block_ops:>11,}{evictions:>11,}")

    hardware = HardwareSpec.from_config(OmegaConf.to_container(cfg.hierarchy, resolve=True))
    block_bytes = ModelSpec.from_config(OmegaConf.to_container(cfg.model)).block_bytes(trace.tokens_per_block)
    cpu = tier_capacity_blocks("cpu", dict(hardware.cpu), block_bytes)
    ssd = tier_capacity_blocks("ssd", dict(hardware.ssd.capacity), block_bytes) if hardware.ssd else 0
    floor = replay(trace, capacity_blocks=cpu, ssd_capacity_blocks=ssd, eviction="lru")
    print(f"control plane alone (replay, one manager, CPU {cpu} + SSD {ssd} blocks): {floor.wall_s:.2f} s, "
          f"{len(trace) / floor.wall_s:,.0f} req/s")

    base_n, base_wall, base_cpu, base_ops = runs[scales[0]]
    _, top_wall, top_cpu, top_ops = runs[scales[-1]]
    growth = f"growth_{scales[-1]}x_over_{scales[0]}x"
    summary = {
        "requests": base_n,
        "sim_wall_s": round(base_wall, 3),
        "sim_cpu_s": round(base_cpu, 3),
        "requests_per_wall_s": round(base_n / base_wall),
        "requests_per_cpu_s": round(base_n / base_cpu),
        "control_plane_replay_wall_s": round(floor.wall_s, 3),
        "walls_s": {str(copies): round(wall, 3) for copies, (_, wall, _, _) in runs.items()},
        "block_ops": {str(copies): ops for copies, (_, _, _, ops) in runs.items()},
        growth: round(top_wall / base_wall, 3),
        f"{growth}_cpu": round(top_cpu / base_cpu, 3),
        f"wall_per_block_op_{scales[-1]}x_over_{scales[0]}x": round(top_wall / top_ops / (base_wall / base_ops), 3),
        "target_requests_per_wall_s": 10_000,
    }
    print(json.dumps(summary))
    return 0
