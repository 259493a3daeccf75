"""Whole runs: determinism, Little's law, routing, the shared pool and closed-loop clients."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from experiments.common import load_workload
from flexkv_sim.metrics import request_frame, summarize
from flexkv_sim.simulator import simulation_from_config

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def configured(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return compose("simulate", overrides=["simulate.progress=false", *overrides])


def run_config(*overrides: str):
    cfg = configured(*overrides)
    return simulation_from_config(load_workload(cfg.workload), cfg).run()


SMALL_MIXED = ("workload.chat.num_sessions=20", "workload.system_prompt.num_requests=150",
               "workload.doc_qa.num_requests=150", "workload.doc_qa.document_tokens_mean=4000")


def test_same_config_and_seed_give_identical_results():
    first = request_frame(run_config(*SMALL_MIXED, "simulate.instances=2"))
    again = request_frame(run_config(*SMALL_MIXED, "simulate.instances=2"))
    pd.testing.assert_frame_equal(first, again)
    other = request_frame(run_config(*SMALL_MIXED, "simulate.instances=2", "workload.seed=1"))
    assert not first.equals(other)


def test_littles_law_holds_on_a_steady_run():
    result = run_config("workload=system_prompt", "workload.num_requests=600", "workload.rate=4.0",
                        "simulate.sample_interval_s=0.02")
    summary = summarize(result)
    frame = request_frame(result)
    arrival_rate = len(frame) / (frame.finish_s.max() - frame.arrival_s.min())
    assert summary["mean_in_system"] > 2  # a real queue, not an empty system
    assert summary["mean_in_system"] == pytest.approx(arrival_rate * frame.e2e_s.mean(), rel=0.03)


def test_prefix_aware_router_follows_the_cached_prefix(sim, tiny):
    shared = (0, 1, 2, 3)
    requests = tiny.workload([
        (0.0, shared, 64, 1),
        (0.0, (20, 21, 22, 23), 64, 200),  # busy instance 0 would be the alternative
        (100.0, shared[:3] + (30,), 64, 1),
        (200.0, shared[:3] + (31,), 64, 1),
    ])
    aware = sim(requests, instances=2, router="prefix_aware").run()
    assert [sr.engine.name for sr in aware.requests] == ["e0", "e1", "e0", "e0"]
    assert [sr.gpu_hit for sr in aware.requests[2:]] == [3, 3]
    robin = sim(requests, instances=2, router="round_robin").run()
    assert [sr.engine.name for sr in robin.requests] == ["e0", "e1", "e0", "e1"]
    assert robin.requests[3].gpu_hit == 0 and robin.requests[3].cached == 0


def test_remote_pool_is_shared_between_instances(sim, tiny):
    requests = tiny.workload([(0.0, (0, 1, 2, 3), 64, 1), (100.0, (0, 1, 2, 9), 64, 1)])
    result = sim(requests, instances=2, router="round_robin", hardware=tiny.hardware(remote_blocks=16)).run()
    first, second = result.requests
    assert second.engine.name == "e1"
    assert second.tier_hits == {} and second.cached - second.local_end == 3  # three blocks from the pool
    links = {link.name: link.bytes for link in result.links}
    assert links["e1/nic_rx"] == 3 * tiny.BLOCK_BYTES
    assert links["e0/nic_tx"] == 4 * tiny.BLOCK_BYTES
    assert result.pool.stats.block_hits["CPU"] == 3


def test_closed_loop_clients_send_the_next_request_when_theirs_finishes(sim, tiny):
    requests = tiny.workload([(0.0, (i,), 16, 5) for i in range(6)])
    result = sim(requests, clients=2).run()
    assert [sr.arrival_s for sr in result.requests[:2]] == [0.0, 0.0]
    finishes = sorted(sr.finish_s for sr in result.requests[:2])
    assert sorted(sr.arrival_s for sr in result.requests[2:4]) == finishes


def test_hydra_app_runs_single_multirun_and_the_pr34328_experiment(tmp_path):
    import json
    import subprocess
    import sys

    def app(*args: str, flags: tuple[str, ...] = ()) -> list[dict]:
        done = subprocess.run([sys.executable, "-m", "experiments.simulate", *flags, "simulate.progress=false", *args],
                              capture_output=True, text=True, cwd=Path(CONF_DIR).parent, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]

    (line,) = app("workload=system_prompt", "workload.num_requests=40", f"hydra.run.dir={tmp_path}/run")
    assert {"ttft_p50_s", "ttft_p90_s", "tpot_p50_s", "throughput_rps", "prefix_token_hit_ratio", "sim_wall_s",
            "requests"} <= set(line)
    assert line["requests"] == 40
    assert (tmp_path / "run" / "requests.parquet").exists() and (tmp_path / "run" / "requests.csv").exists()
    lines = app("workload=system_prompt", "workload.num_requests=20",
                "simulate.router=round_robin,prefix_aware", f"hydra.sweep.dir={tmp_path}/multi", flags=("--multirun",))
    assert len(lines) == 2
    (line,) = app("experiment=flexkv_pr34328", "scenario.num_contexts=4", "scenario.rounds=2",
                  "hierarchy.gpu.kv_capacity_blocks=200", f"hydra.run.dir={tmp_path}/pr")
    assert line["model"] == "qwen3_32b" and line["hierarchy"] == "h20"
    assert line["change_vs_without_offload"]["ttft_mean_s"] < 0
