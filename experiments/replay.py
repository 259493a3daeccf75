"""`python -m experiments replay`: hit ratios of one policy and capacity, no timing.

Example: python -m experiments replay workload=mooncake
  workload.path=../shared/traces/mooncake_conversation_trace.jsonl eviction=lru replay.capacity_blocks=9139
"""
from __future__ import annotations

import json

import hydra
from omegaconf import DictConfig, OmegaConf

from experiments.common import CONF_DIR, load_workload
from flexkv_sim.replay import replay


REPLAY_KEYS = {"capacity_blocks", "ssd_capacity_blocks", "write_policy", "progress"}


@hydra.main(config_path=CONF_DIR, config_name="replay", version_base=None)
def main(cfg: DictConfig) -> None:
    r = cfg.replay
    unknown = set(r) - REPLAY_KEYS
    if unknown:
        raise ValueError(f"unknown replay keys {sorted(unknown)}; valid: {sorted(REPLAY_KEYS)}")
    workload = load_workload(cfg.workload)
    result = replay(
        workload,
        capacity_blocks=r.capacity_blocks,
        ssd_capacity_blocks=r.ssd_capacity_blocks,
        eviction=OmegaConf.to_container(cfg.eviction),
        admission=OmegaConf.to_container(cfg.admission),
        prefetch=OmegaConf.to_container(cfg.prefetch),
        write_policy=r.write_policy,
        progress=bool(r.progress),
    )
    print(f"workload {workload.name}: {result.requests} requests, {result.block_refs} block refs, "
          f"{result.unique_blocks} unique blocks")
    print(f"policy {result.policy}, CPU tier {result.capacity_blocks} blocks"
          + (f", SSD tier {result.ssd_capacity_blocks} blocks" if result.ssd_capacity_blocks else ""))
    for tier, ratio in result.block_hit_ratio_by_tier.items():
        print(f"  {tier:>6} block hit ratio {ratio:.4f}")
    print(f"  block hit ratio (all tiers) {result.block_hit_ratio:.4f}")
    print(f"  prefix-token hit ratio     {result.prefix_token_hit_ratio:.4f}")
    print(json.dumps(result.as_dict()))
