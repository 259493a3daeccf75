"""`python -m experiments.policy_research`, run as a user runs it, on small workloads."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.policy_research import gap_closed, split_in_time
from flexkv_sim.workloads import build_workload

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "experiments.policy_research", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_evaluate_writes_the_table_the_plot_and_a_summary(tmp_path):
    proc = run("workloads=[chat]", "capacity_fractions=[0.05]", "jobs=1", "timing.enabled=false",
               "candidates=[hit_density+adm]", "run_policies=[lru,belady,hit_density+adm]",
               f"hydra.run.dir={tmp_path}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["runs"] == 3
    table = (tmp_path / "results.md").read_text()
    assert "| chat | 5% |" in table and "hit_density+adm" in table and "%)" in table
    assert (tmp_path / "prefix_hit.png").stat().st_size > 0
    assert len((tmp_path / "results.csv").read_text().splitlines()) == 4


def test_tune_mode_returns_the_objective(tmp_path):
    proc = run("mode=tune", "tune.workloads=[system_prompt]", "tune.capacity_fractions=[0.01]",
               f"hydra.run.dir={tmp_path}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["eviction"]["name"] == "hit_density"
    assert result["objective"] > 0  # it closes part of the LRU -> Belady gap there


def test_time_split_and_gap_share():
    workload = build_workload({"type": "system_prompt", "num_requests": 50})
    first, second = split_in_time(workload, "first"), split_in_time(workload, "second")
    assert len(first) + len(second) == len(workload) and len(first) and len(second)
    assert max(r.arrival_s for r in first) < min(r.arrival_s for r in second)
    assert gap_closed(0.3, 0.2, 0.4) == pytest.approx(0.5)
    assert math.isnan(gap_closed(0.3, 0.2, 0.201))


def test_the_class_ttl_bound_orders_feature_sets():
    from experiments.policy_research import FEATURE_SETS, _references, _ttl_bound

    workload = build_workload({"type": "chat", "num_sessions": 40})
    refs = _references(workload)
    capacity = max(1, workload.num_unique_blocks() // 20)
    one = _ttl_bound(refs, FEATURE_SETS["none (one class: ~LRU)"], capacity)
    seen = _ttl_bound(refs, FEATURE_SETS["times seen (<=3)"], capacity)
    oracle_refs = {**refs, "features": [(g != float("inf"),) for g in refs["next_gap"]]}
    oracle = _ttl_bound(oracle_refs, lambda f: f[0], capacity)
    assert 0 < one <= seen + 1e-9 <= oracle + 1e-9 <= workload.infinite_cache_hit_ratio() + 1e-9
    huge = _ttl_bound(refs, FEATURE_SETS["none (one class: ~LRU)"], 10 * workload.num_unique_blocks())
    assert huge == pytest.approx(workload.infinite_cache_hit_ratio())


def test_held_out_ttls_keep_only_what_the_features_predict():
    import numpy as np

    from experiments.policy_research import FEATURE_SETS, _references, _ttl_bound, _ttl_held_out

    workload = build_workload({"type": "chat", "num_sessions": 60})
    refs = _references(workload)
    capacity = max(1, workload.num_unique_blocks() // 20)
    rich, noisy = FEATURE_SETS["+ conversation turn and pace (rich)"], FEATURE_SETS["rich + noise, 7 values (control)"]
    assert _ttl_bound(refs, noisy, capacity) >= _ttl_bound(refs, rich, capacity) - 1e-9  # finer classes fit more
    second = refs["times"] >= refs["split_s"]
    assert 0 < second.sum() < len(second)
    for classify in (FEATURE_SETS["none (one class: ~LRU)"], rich):
        assert 0 < _ttl_held_out(refs, classify, capacity) < 1
        # room for everything: (nearly) every second-half reference that is used again is a hit (the model
        # charges a block never used again its whole TTL, even past the end of the workload)
        everything = _ttl_held_out(refs, classify, 10 * workload.num_unique_blocks())
        reused = np.isfinite(refs["next_gap"][second]).mean()
        assert reused * 0.99 < everything <= reused + 1e-9
    one_request = build_workload({"type": "chat", "num_sessions": 1, "mean_turns": 1})
    assert math.isnan(_ttl_held_out(_references(one_request), rich, capacity))  # no first half to fit on


def test_latency_mode_reports_the_simulator_figures_of_each_policy_and_hierarchy(tmp_path):
    """Each row is the simulation `python -m experiments simulate` runs with that policy and hierarchy."""
    small = "gpu: {kv_capacity_blocks: 48}, cpu: {capacity_blocks: 24, capacity_bytes: null}"
    proc = run("mode=latency", "latency.workload=chat", "latency.instances=1", "jobs=1", "candidates=[hit_density]",
               "~latency.hierarchies", f"+latency.hierarchies={{small: {{{small}}}, small_cpu_only: {{{small}, ssd: {{capacity_bytes: 0}}}}}}",
               f"hydra.run.dir={tmp_path}")
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(figures) == {"output_dir", "small/lru", "small/hit_density", "small_cpu_only/lru",
                            "small_cpu_only/hit_density"}
    assert figures["small/lru"]["hit_ratio_cpu"] > 0 and figures["small/lru"]["hit_ratio_ssd"] > 0
    assert figures["small_cpu_only/lru"]["hit_ratio_ssd"] == 0
    assert figures["small/lru"]["hit_ratio_cpu"] != figures["small/hit_density"]["hit_ratio_cpu"]  # the policy acts
    table = (tmp_path / "latency.md").read_text()
    assert "| small_cpu_only | hit_density |" in table

    direct = subprocess.run(
        [sys.executable, "-m", "experiments", "simulate", "workload=chat", "eviction=hit_density",
         "simulate.progress=false", "simulate.sample_interval_s=0", "hierarchy.gpu.kv_capacity_blocks=48",
         "+hierarchy.cpu.capacity_blocks=24", "hierarchy.cpu.capacity_bytes=null", f"hydra.run.dir={tmp_path / 'direct'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert direct.returncode == 0, direct.stderr[-3000:]
    summary = json.loads(direct.stdout.strip().splitlines()[-1])
    for key in ("ttft_p50_s", "ttft_p90_s", "prefix_token_hit_ratio", "hit_ratio_cpu", "hit_ratio_ssd"):
        assert figures["small/hit_density"][key] == round(summary[key], 4), key


def test_evaluate_puts_an_engine_cache_of_gpu_fraction_in_front_of_the_tier(tmp_path):
    from flexkv_sim.replay import capacity_from_fraction, replay
    from omegaconf import OmegaConf

    proc = run("workloads=[chat]", "capacity_fractions=[0.05]", "gpu_fraction=0.02", "jobs=1", "timing.enabled=false",
               "candidates=[]", "run_policies=[lru,belady]", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0
    row = next(r for r in (tmp_path / "results.csv").read_text().splitlines()[1:] if ",lru," in r)
    chat = build_workload(OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "workload" / "chat.yaml")))
    fronted = replay(chat, capacity_blocks=capacity_from_fraction(chat, 0.05), eviction="lru",
                     gpu_blocks=capacity_from_fraction(chat, 0.02))
    alone = replay(chat, capacity_blocks=capacity_from_fraction(chat, 0.05), eviction="lru")
    assert fronted.prefix_token_hit_ratio != alone.prefix_token_hit_ratio
    assert f"{fronted.prefix_token_hit_ratio}" in row.split(",")
