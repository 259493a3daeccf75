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


@pytest.mark.parametrize("override, message", [
    ("replay.capacity_blocks=0", "cpu tier capacity_blocks must be positive, got 0"),
    ("replay.capacity_blocks=10GB", "cpu tier capacity_blocks must be a whole number, got '10GB'"),
    ("+replay.capcity_blocks=10", "unknown replay keys ['capcity_blocks']"),
])
def test_impossible_capacity_fails_clearly(tmp_path, override, message):
    proc = run("replay", "workload=chat", override, f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode != 0
    assert message in proc.stderr


#: a grid small enough for a test where the policies still differ: a GPU cache of 48 blocks, small tiers
TINY_GRID = ("workload=chat", "workload.num_sessions=30", "hierarchy.gpu.kv_capacity_blocks=48",
             "hierarchy.ssd.capacity_bytes=2e9", "eviction=lru,arc,belady", "hierarchy.cpu.capacity_bytes=1e9,3e9")
PLOTS = ("prefix_hit_vs_capacity.png", "ttft_vs_capacity.png", "ttft_cdf_best_worst.png", "link_bytes.png")


def test_sweep_is_a_parallel_multirun_with_a_tidy_table_plots_and_belady_on_top(tmp_path):
    out = run("sweep", *TINY_GRID, f"hydra.sweep.dir={tmp_path}")
    summary = last_json(out.stdout)
    assert summary["runs"] == 12  # 3 policies x 2 capacities x the default grid's 2 write policies
    assert summary["belady_is_ceiling"] and summary["output_dir"] == str(tmp_path)
    assert f"sweep: 12 runs into {tmp_path}" in out.stdout and str(tmp_path / "results.csv") in out.stdout

    import pandas as pd

    frame = pd.read_parquet(tmp_path / "results.parquet")
    assert len(frame) == len(pd.read_csv(tmp_path / "results.csv")) == 12
    assert frame.job.nunique() == 12 and set(frame.eviction) == {"lru", "arc", "belady"}
    for column in ("hierarchy.cpu.capacity_bytes", "simulate.write_policy", "workload.num_sessions", "model.layers",
                   "eviction.name", "ttft_p90_s", "link_bytes.pcie_h2d", "prefix_token_hit_ratio"):
        assert column in frame.columns, column
    assert set(frame["simulate.write_policy"]) == {"write_through", "write_back"}
    for _, point in frame.groupby(["simulate.write_policy", "cpu_capacity_gb"]):
        belady = point[point.eviction == "belady"].prefix_token_hit_ratio.item()
        assert belady >= point.prefix_token_hit_ratio.max()
    for plot in PLOTS:
        assert (tmp_path / plot).stat().st_size > 10_000, plot


def test_simulate_multirun_is_the_same_run_and_report(tmp_path):
    out = run("simulate", "--multirun", "workload=chat", "workload.num_sessions=10", "eviction=lru,s3fifo",
              "simulate.progress=false", "+hydra.callbacks.report._target_=experiments.sweep.SweepReport",
              f"hydra.sweep.dir={tmp_path}")
    assert last_json(out.stdout)["runs"] == 2
    assert (tmp_path / "0" / "summary.json").exists() and (tmp_path / "results.parquet").exists()


def test_a_failing_run_fails_the_sweep(tmp_path):
    proc = run("sweep", "eviction=lru,nope", "hierarchy.cpu.capacity_bytes=1e9", f"hydra.sweep.dir={tmp_path}",
               check=False)
    assert proc.returncode != 0 and "nope" in proc.stderr


def test_unknown_command_and_benchmark_are_refused():
    assert run("nope", check=False).returncode == 2
    proc = run("bench", "nope", check=False)
    assert proc.returncode == 2 and "control_plane" in proc.stderr


@pytest.mark.parametrize("args, message", [
    (("control_plane", "--repeats", "0"), "argument --repeats: must be a whole number >= 1, got '0'"),
    (("control_plane", "--capacity-fraction", "1.5"), "--capacity-fraction must be at most 1"),
    (("simulator", "--scales", "1,x"), "argument --scales: must be comma-separated whole numbers >= 1, got '1,x'"),
    (("ssd", "--gib", "0.0001"), "--gib 0.0001 does not hold one block of --block-mib 2.0"),
])
def test_bad_benchmark_arguments_are_refused_naming_the_option(args, message):
    proc = run("bench", *args, check=False)
    assert proc.returncode == 2 and message in proc.stderr


def test_simulator_benchmark_counts_the_block_operations_of_each_copy(tmp_path):
    if not TRACE.exists():
        pytest.skip(f"the shared Mooncake trace is not at {TRACE}")
    head = tmp_path / "head.jsonl"
    with TRACE.open() as lines:
        head.write_text("".join(line for _, line in zip(range(300), lines)))
    out = run("bench", "simulator", "--trace", str(head), "--instances", "1", "--scales", "1,2")
    summary = last_json(out.stdout)
    assert summary["requests"] == 300 and set(summary["walls_s"]) == set(summary["block_ops"]) == {"1", "2"}
    ops = summary["block_ops"]
    assert 0 < ops["1"] < ops["2"]  # the second copy has fresh block ids: it inserts its own blocks
    per_op = summary["walls_s"]["2"] / ops["2"] / (summary["walls_s"]["1"] / ops["1"])
    assert summary["wall_per_block_op_2x_over_1x"] == pytest.approx(per_op, rel=0.05)  # walls are rounded
