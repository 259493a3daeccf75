"""The launcher and sweeper configs compose with the apps' configs; the Optuna sweeper tunes a policy.

The Ray launcher is not installed with the test dependencies (it pins cloudpickle 2.2): its
config must still compose, and it must name the plugin's launcher and only the plugin's fields.
"""
import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from experiments.common import CONF_DIR

ROOT = Path(__file__).resolve().parents[2]


def hydra_node(config: str, *overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return compose(config, overrides=list(overrides), return_hydra_config=True).hydra


def plugin_installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def test_the_sweep_runs_on_local_cores_by_default():
    hydra = hydra_node("sweep")
    assert hydra.mode.name == "MULTIRUN"
    assert hydra.launcher._target_.endswith("JoblibLauncher") and hydra.launcher.n_jobs == -1
    assert set(hydra.sweeper.params) == {"eviction", "hierarchy.cpu.capacity_bytes", "simulate.write_policy"}
    assert "belady" in hydra.sweeper.params.eviction


def test_the_slurm_launcher_config_composes_with_every_field_of_the_plugin():
    launcher = hydra_node("sweep", "hydra/launcher=submitit_slurm", "hydra.launcher.partition=cpu").launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.partition == "cpu" and launcher.cpus_per_task == 1
    if not plugin_installed("hydra_plugins.hydra_submitit_launcher"):
        pytest.skip("hydra-submitit-launcher is not installed: its schema cannot be checked")
    from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf

    assert set(launcher) == {field.name for field in dataclasses.fields(SlurmQueueConf)}


def test_the_ray_launcher_config_composes_without_the_plugin(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    launcher = hydra_node("sweep", "hydra/launcher=ray").launcher
    assert launcher._target_ == "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher"
    assert launcher.ray.init.address is None and launcher.ray.remote.num_cpus == 1
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert hydra_node("sweep", "hydra/launcher=ray").launcher.ray.init.address == "ray://head:10001"
    if plugin_installed("hydra_plugins.hydra_ray_launcher"):
        from hydra_plugins.hydra_ray_launcher.config import RayLauncherConf

        assert set(launcher) == {field.name for field in dataclasses.fields(RayLauncherConf)}


def test_the_launcher_configs_are_plain_yaml_naming_their_launcher():
    """What a machine without the plugins can still check: the files parse and name the right class."""
    for name, target in (("ray", "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher"),
                         ("submitit_slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher")):
        text = (Path(CONF_DIR) / "hydra" / "launcher" / f"{name}.yaml").read_text()
        assert text.startswith("# @package hydra.launcher")
        assert yaml.safe_load(text)["_target_"] == target


@pytest.mark.parametrize("sweeper, policy, parameters", [
    ("optuna_s3fifo", "s3fifo", {"small_fraction", "ghost_fraction", "move_to_main_threshold"}),
    ("optuna_slru", "slru", {"protected_fraction"}),
])
def test_the_optuna_configs_maximise_a_policys_parameters(sweeper, policy, parameters):
    if not plugin_installed("hydra_plugins.hydra_optuna_sweeper"):
        pytest.skip("hydra-optuna-sweeper is not installed")
    node = hydra_node("simulate", f"hydra/sweeper={sweeper}").sweeper
    assert node._target_.endswith("OptunaSweeper") and node.direction == "maximize"
    assert node.params.eviction == policy
    assert {key.split(".", 1)[1] for key in node.params if key.startswith("eviction.")} == parameters
    policy_yaml = OmegaConf.load(Path(CONF_DIR) / "eviction" / f"{policy}.yaml")
    assert parameters <= set(policy_yaml)  # each tuned key exists in the policy's config


def test_optuna_tunes_s3fifo_on_a_tiny_workload(tmp_path):
    if not plugin_installed("hydra_plugins.hydra_optuna_sweeper"):
        pytest.skip("hydra-optuna-sweeper is not installed")
    proc = subprocess.run(
        [sys.executable, "-m", "experiments", "simulate", "--multirun", "hydra/sweeper=optuna_s3fifo",
         "hydra.sweeper.n_trials=3", "workload=chat", "workload.num_sessions=15",
         "hierarchy.gpu.kv_capacity_blocks=48", "hierarchy.cpu.capacity_bytes=1e9", "hierarchy.ssd.capacity_bytes=0",
         "simulate.progress=false", f"hydra.sweep.dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert set(result["best_params"]) == {"eviction.small_fraction", "eviction.ghost_fraction",
                                          "eviction.move_to_main_threshold"}
    trials = sorted(tmp_path.glob("*/summary.json"))
    assert len(trials) == 3
    ratios = [json.loads(path.read_text())["prefix_token_hit_ratio"] for path in trials]
    assert result["best_value"] == pytest.approx(max(ratios))  # the objective is what the app returns
