"""The command-line jobs, run as a user runs them: a subprocess, output parsed."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TRACE = ROOT.parent / "shared" / "traces" / "mooncake_conversation_trace.jsonl"


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "experiments", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_replay_prints_hit_ratios_and_ends_with_json(tmp_path):
    out = run("replay", "workload=chat", "eviction=lru", "replay.capacity_blocks=300", "replay.progress=false",
              f"hydra.run.dir={tmp_path}")
    result = last_json(out.stdout)
    for key in ("policy", "capacity_blocks", "requests", "block_hit_ratio", "prefix_token_hit_ratio"):
        assert key in result
    assert result["policy"] == "lru" and result["capacity_blocks"] == 300
    assert 0 < result["prefix_token_hit_ratio"] <= result["block_hit_ratio"] + 0.05
    assert "prefix-token hit ratio" in out.stdout


def test_replay_of_the_mooncake_trace_with_an_ssd_tier(tmp_path):
    if not TRACE.exists():
        pytest.skip(f"the shared Mooncake trace is not at {TRACE}")
    out = run("replay", "workload=mooncake", f"workload.path={TRACE}", "workload.limit=2000", "eviction=arc",
              "replay.capacity_blocks=500", "replay.ssd_capacity_blocks=5000", "replay.progress=false",
              f"hydra.run.dir={tmp_path}")
    result = last_json(out.stdout)
    assert result["requests"] == 2000
    by_tier = result["block_hit_ratio_by_tier"]
    assert by_tier["SSD"] > 0 and by_tier["CPU"] > 0
    assert result["block_hit_ratio"] == pytest.approx(by_tier["CPU"] + by_tier["SSD"])


def test_unknown_policy_fails_listing_the_choices(tmp_path):
    proc = run("replay", "eviction=nope", f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode != 0
    assert "nope" in proc.stderr and "lru" in proc.stderr


def test_impossible_capacity_fails_clearly(tmp_path):
    proc = run("replay", "workload=chat", "replay.capacity_blocks=0", f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode != 0
    assert "capacity" in proc.stderr


def test_sweep_writes_table_csv_plot_and_belady_is_the_ceiling(tmp_path):
    out = run("sweep", "workload=chat", "sweep.policies=[lru,arc,belady]", "sweep.capacity_fractions=[0.02,0.1]",
              "sweep.jobs=1", f"hydra.run.dir={tmp_path}")
    summary = last_json(out.stdout)
    assert summary["runs"] == 6
    assert summary["belady_prefix_token_hit_ratio"] >= summary["best_online_prefix_token_hit_ratio"]
    assert (tmp_path / "results.csv").stat().st_size > 0
    assert (tmp_path / "prefix_hit_vs_capacity.png").stat().st_size > 10_000
    import pandas as pd

    frame = pd.read_csv(tmp_path / "results.csv")
    assert len(frame) == 6 and set(frame.policy) == {"lru", "arc", "belady"}


def test_unknown_command_and_benchmark_are_refused():
    assert run("nope", check=False).returncode == 2
    proc = run("bench", "nope", check=False)
    assert proc.returncode == 2 and "control_plane" in proc.stderr
