"""`python -m experiments simulate`: the SimPy digital twin of engines over a KV-cache hierarchy.

Examples:
  python -m experiments simulate                                   # mixed workload, H100 + Llama-3.1-8B
  python -m experiments simulate hierarchy=h200_nvme5 model=qwen3_8b simulate.instances=2
  python -m experiments simulate experiment=flexkv_pr34328        # PR #34328 scenario, with vs without offload
  python -m experiments simulate --multirun eviction=lru,s3fifo simulate.router=round_robin,prefix_aware

Prints a summary table, writes per-request rows (requests.csv, requests.parquet) and
summary.json to the Hydra output folder, and ends with one JSON line. `run` is the
per-run code path `python -m experiments sweep` shares; it returns the prefix-token
hit ratio, the objective a Hydra sweeper such as Optuna maximises.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from experiments.common import CONF_DIR, load_workload
from flexkv_sim.hardware import HardwareSpec
from flexkv_sim.metrics import print_summary, request_frame, summarize
from flexkv_sim.scenarios import build_scenario
from flexkv_sim.simulator import simulation_from_config

#: figures compared between a run with the offload tiers and one with the GPU prefix cache alone
COMPARED = ("ttft_mean_s", "ttft_p50_s", "tpot_mean_s", "tpot_p50_s", "e2e_mean_s", "qpm")


def _change(new: float, old: float) -> float | None:
    return new / old - 1.0 if old else None


def run(cfg: DictConfig) -> float:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.scenario:
        workload = build_scenario(OmegaConf.to_container(cfg.scenario, resolve=True))
    else:
        workload = load_workload(cfg.workload)
    hardware = HardwareSpec.from_config(OmegaConf.to_container(cfg.hierarchy, resolve=True))
    simulation = simulation_from_config(workload, cfg, hardware=hardware)
    result = simulation.run()
    frame = request_frame(result)
    summary = summarize(result, frame)
    title = (f"{workload.name} on {cfg.simulate.instances} x {hardware.name} ({hardware.gpu.count} x "
             f"{hardware.gpu.name}, {simulation.gpu_blocks} KV blocks of {simulation.block_bytes / 2**20:g} MiB), "
             f"{cfg.model.name}, eviction {cfg.eviction.name}")
    print_summary(summary, title)
    frame.to_csv(out_dir / "requests.csv", index=False)
    frame.to_parquet(out_dir / "requests.parquet", index=False)

    line: dict[str, Any] = {"workload": workload.name, "hierarchy": hardware.name, "model": cfg.model.name,
                            "eviction": cfg.eviction.name, **summary}
    if cfg.simulate.compare_without_offload:
        gpu_only = dataclasses.replace(hardware, cpu=None, ssd=None, remote=None)
        baseline = summarize(simulation_from_config(workload, cfg, hardware=gpu_only).run())
        print_summary(baseline, f"{title}\nGPU prefix cache only, no offload tiers")
        line["without_offload"] = {key: baseline[key] for key in (*COMPARED, "prefix_token_hit_ratio", "sim_wall_s")}
        line["change_vs_without_offload"] = {key: _change(summary[key], baseline[key]) for key in COMPARED}
        print("with offload vs GPU prefix cache only: " + ", ".join(
            f"{key} {value:+.1%}" for key, value in line["change_vs_without_offload"].items() if value is not None))
    line["output_dir"] = str(out_dir)
    (out_dir / "summary.json").write_text(json.dumps(line, indent=2))
    print(f"per-request results: {out_dir / 'requests.csv'} (and .parquet)")
    print(json.dumps(line))
    return float(summary["prefix_token_hit_ratio"])


main = hydra.main(config_path=CONF_DIR, config_name="simulate", version_base=None)(run)

if __name__ == "__main__":
    main()
