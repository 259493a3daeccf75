"""Pieces every experiment shares: where the configs live and how a workload is built."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from flexkv_sim.workloads import build_workload
from flexkv_sim.workloads.request import Workload

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = str(PROJECT_ROOT / "conf")


def load_workload(cfg: DictConfig) -> Workload:
    """Build the configured workload; relative trace paths are taken from the project root."""
    spec = OmegaConf.to_container(cfg, resolve=True)
    path = spec.get("path")
    if path and not Path(path).is_absolute():
        spec["path"] = str(PROJECT_ROOT / path)
    return build_workload(spec)
