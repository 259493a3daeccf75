"""The fidelity check's parts on synthetic inputs, its simulate-and-compare half end to end on
measurements it is handed, and (where vLLM is installed) a short run against real vLLM."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from experiments.common import CONF_DIR, load_workload
from experiments.fidelity import (DECISION_COLUMNS, cold_start_factor, compare, contested, load_latency, median_run,
                                  plot_ttft, prompts_of, rerun_error, served_from, step_profile)
from flexkv_sim.model import StepTime, profile

ROOT = Path(__file__).resolve().parents[2]
#: a workload of 14 requests with shared prefixes, a few seconds long
SMALL = ("workload.chat.num_sessions=2", "workload.system_prompt.num_requests=5", "workload.doc_qa.num_requests=5")


def side(ttft, gpu, cpu, ssd):
    return pd.DataFrame({"request_id": [str(i) for i in range(len(ttft))], "ttft_s": ttft, "gpu_hit_blocks": gpu,
                         "cpu_hit_blocks": cpu, "ssd_hit_blocks": ssd})


def test_compare_reports_relative_ttft_error_and_per_tier_agreement():
    real = side([0.10, 0.20, 0.40, 1.00], [0, 4, 0, 0], [0, 0, 6, 2], [0, 0, 0, 3])
    sim = side([0.11, 0.20, 0.30, 1.50], [0, 4, 0, 0], [0, 0, 6, 5], [0, 0, 0, 0])
    frame, summary = compare(real, sim.iloc[::-1])  # joined by request id, not by position
    assert frame.set_index("request_id").ttft_err.round(6).to_dict() == {"0": 0.1, "1": 0.0, "2": 0.25, "3": 0.5}
    assert summary["ttft_err_median"] == pytest.approx(0.175)
    assert summary["ttft_err_p90"] == pytest.approx(np.percentile([0.1, 0.0, 0.25, 0.5], 90), abs=1e-4)
    assert not summary["decisions_agree"] and summary["decisions_agreeing"] == 3
    assert summary["hit_blocks_agreeing"] == 4  # request 3: 5 blocks cached either way, split differently
    assert summary["cpu_hit_blocks_real"] == 8 and summary["ssd_hit_blocks_sim"] == 0
    assert served_from(frame).tolist() == ["miss", "GPU hit", "CPU hit", "SSD hit"]
    assert compare(real, real)[1]["decisions_agree"]


def test_real_runs_count_as_their_per_request_median_and_each_against_the_others_is_the_floor():
    blocks = ([0, 4, 0], [0, 0, 6], [0, 0, 0])
    runs = [side([0.10, 0.20, 0.40], *blocks), side([0.12, 0.20, 0.80], *blocks), side([0.11, 0.30, 0.40], *blocks)]
    reference = median_run([runs[2], runs[0], runs[1].iloc[::-1]])  # by request id, not by position
    assert reference.set_index("request_id").ttft_s.round(6).to_dict() == {"0": 0.11, "1": 0.2, "2": 0.4}
    assert reference.cpu_hit_blocks.tolist() == [0, 0, 6]
    floor = rerun_error(runs)
    # run 1 against the median of runs 2 and 3: 0.1/0.115, 0.2/0.25, 0.4/0.6; and so on for the others
    errors = [0.015 / 0.115, 0.05 / 0.25, 0.2 / 0.6, 0.015 / 0.105, 0.05 / 0.25, 0.4 / 0.4,
              0.005 / 0.11, 0.1 / 0.2, 0.2 / 0.6]
    assert floor["real_rerun_ttft_err_median"] == pytest.approx(np.median(errors), abs=1e-4)
    assert floor["real_rerun_ttft_err_p90"] == pytest.approx(np.percentile(errors, 90), abs=1e-4)
    assert floor["real_rerun_decisions_agree"]
    assert not rerun_error([runs[0], side([0.1, 0.2, 0.4], [0, 4, 0], [0, 0, 3], [0, 0, 3])])["real_rerun_decisions_agree"]


def test_the_reference_decision_is_the_one_most_real_runs_made_and_a_split_one_is_contested():
    ttft = [0.1, 0.2, 0.3]
    runs = [side(ttft, [0, 5, 0], [0, 0, 2], [0, 0, 0]),  # request 1: vLLM's cache in runs 1 and 4 ...
            side(ttft, [0, 0, 0], [0, 0, 2], [0, 5, 0]),  # ... the SSD tier in runs 2 and 3
            side(ttft, [0, 0, 0], [0, 0, 2], [0, 5, 0]),
            side(ttft, [0, 5, 0], [0, 0, 2], [0, 0, 0])]
    assert contested(runs) == ["1"] and contested(runs[1:3]) == []
    reference = median_run(runs)  # a tie: the earliest run's decision
    assert reference.gpu_hit_blocks.tolist() == [0, 5, 0] and reference.ssd_hit_blocks.tolist() == [0, 0, 0]
    reference = median_run(runs[1:])  # two runs of three: the SSD tier
    assert reference.gpu_hit_blocks.tolist() == [0, 0, 0] and reference.ssd_hit_blocks.tolist() == [0, 5, 0]
    assert reference.cpu_hit_blocks.tolist() == [0, 0, 2]


def test_compare_refuses_runs_of_different_requests_or_columns():
    real = side([0.1, 0.2], [0, 0], [0, 0], [0, 0])
    with pytest.raises(ValueError, match="only one side"):
        compare(real, real.iloc[:1])
    with pytest.raises(ValueError, match="ssd_hit_blocks"):
        compare(real, real.drop(columns="ssd_hit_blocks"))


def test_step_profile_keeps_shape_medians_and_drops_steps_slowed_by_others(tmp_path):
    rng = np.random.default_rng(0)
    truth = lambda tokens, context: 0.004 + 8e-5 * tokens + 2e-6 * context  # noqa: E731
    shapes = [(t, c) for t in (1, 2, 4, 32, 128, 256, 512) for c in (64, 512, 1024, 2048)]
    steps = [(t, c, truth(t, c) * rng.uniform(0.97, 1.03)) for t, c in shapes for _ in range(3)]
    steps += [(t, c, 0.8) for t, c in shapes[::5]]  # one stalled repeat of some shapes: the median ignores it
    steps += [(3, 100, 0.9), (0, 0, 0.0004)]  # a lone stalled shape, and an idle step
    table = pd.read_csv(step_profile(steps, tmp_path / "profile.csv"))
    assert len(table) == len(shapes) and (table.tokens > 0).all()
    (c0, c1, _, c2), = profile(tmp_path / "profile.csv").lines
    assert c0 == pytest.approx(0.004, rel=0.05) and c1 == pytest.approx(8e-5, rel=0.05)
    assert c2 == pytest.approx(2e-6, rel=0.2)


def test_step_profile_fits_the_attention_of_prefills_behind_a_cached_prefix(tmp_path):
    # new tokens cost 100 us each and 50 ns per token they attend to (behind 0 to 1536 cached ones)
    truth = lambda tokens, pairs: 0.004 + 1e-4 * tokens + 5e-8 * pairs  # noqa: E731
    steps = []
    for t in (32, 128, 320):
        for cached in (0, 512, 1536):
            pairs = t * cached + t * (t + 1) // 2
            steps += [(t, cached + t, pairs, truth(t, pairs))] * 3
    steps += [(b, 300 * b, 300 * b, truth(b, 300 * b)) for b in (1, 2, 4, 8)]  # decodes: one pair per KV token
    (c0, c1, a, k), = profile(step_profile(steps, tmp_path / "profile.csv")).lines
    assert c0 == pytest.approx(0.004) and c1 == pytest.approx(1e-4) and a == pytest.approx(5e-8)
    assert abs(k) < 1e-9


def test_cold_start_factor_is_the_median_ratio_of_cold_first_steps_to_the_profile():
    step = StepTime([(0.002, 1e-4, 0.0, 0.0)])  # 12, 22 and 32 ms for 100, 200 and 300 tokens
    cold = [(100, 100, 5050, 1.5 * 0.012), (200, 200, 20100, 1.4 * 0.022), (300, 300, 45150, 1.6 * 0.032)]
    assert cold_start_factor(cold, step) == pytest.approx(1.5)
    assert cold_start_factor([], step) == 1.0 and cold_start_factor([(100, 100, 5050, 0.006)], step) == 1.0


def test_step_profile_drops_the_shapes_its_own_fit_cannot_follow_in_either_regime(tmp_path):
    # decodes and prefills cost differently (a line each, no one line within 10% of both); one decode shape
    # and one prefill shape stalled
    decode = lambda tokens, context: 0.008 + 0.002 * tokens + 2e-6 * context  # noqa: E731
    prefill = lambda tokens, pairs: 0.040 + 0.0017 * tokens + 2e-7 * pairs  # noqa: E731
    steps = [(b, c, c, decode(b, c)) for b in (1, 2, 4, 8) for c in (100 * b, 1000 * b)]
    for tokens in (32, 128, 320, 512):
        for cached in (0, 1024):
            pairs = tokens * cached + tokens * (tokens + 1) // 2
            steps.append((tokens, cached + tokens, pairs, prefill(tokens, pairs)))
    steps += [(3, 900, 900, 2 * decode(3, 900)), (64, 64, 2080, 2 * prefill(64, 2080))]
    table = pd.read_csv(step_profile(steps, tmp_path / "profile.csv"))
    assert len(table) == len(steps) - 2 and 3 not in table.tokens.tolist() and 64 not in table.tokens.tolist()
    step = profile(tmp_path / "profile.csv")
    assert step.decode_run(2, 700).elapsed(1) == pytest.approx(decode(2, 700))
    assert step(200, 200 * 201 // 2, 200) == pytest.approx(prefill(200, 200 * 201 // 2))


def test_load_latency_is_the_time_beyond_the_copy():
    assert load_latency([(10, 0.003), (20, 0.004), (40, 0.006)], 1000, 1e7) == pytest.approx(0.002)
    assert load_latency([(1000, 0.001)], 1000, 1e7) == 0.0 and load_latency([], 1000, 1e7) == 0.0


def test_prompts_share_tokens_exactly_where_the_workload_shares_block_ids():
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        workload = load_workload(compose("fidelity", overrides=list(SMALL)).workload)
    tpb = workload.tokens_per_block
    prompts = {p.request_id: p for p in prompts_of(workload, 2048)}
    requests = workload.requests
    assert all(len(prompts[str(r.request_id)].tokens) == r.input_length for r in requests)
    for a in requests:
        for b in requests:
            blocks = min(a.full_blocks, b.full_blocks)
            shared = next((i for i in range(blocks) if a.block_ids[i] != b.block_ids[i]), blocks)
            ta, tb = prompts[str(a.request_id)].tokens, prompts[str(b.request_id)].tokens
            assert ta[:shared * tpb] == tb[:shared * tpb]
            if shared < blocks:
                assert ta[shared * tpb:(shared + 1) * tpb] != tb[shared * tpb:(shared + 1) * tpb]


def test_plot_of_simulated_against_measured_ttft(tmp_path):
    real = side([0.02, 0.05, 0.3, 1.0], [0, 4, 0, 0], [0, 0, 6, 0], [0, 0, 0, 3])
    frame, summary = compare(real, side([0.022, 0.05, 0.25, 1.1], [0, 4, 0, 0], [0, 0, 3, 0], [0, 0, 3, 3]))
    summary |= {"real_rerun_ttft_err_median": 0.05, "real_rerun_ttft_err_p90": 0.2}
    assert plot_ttft(frame, summary, tmp_path / "ttft.png").stat().st_size > 10_000


def fidelity(*overrides: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "experiments", "fidelity", *overrides], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_simulate_and_compare_on_given_measurements_agrees_with_itself(tmp_path):
    """Handed measurements whose 'real' runs are the simulator's own answers, the comparison is exact."""
    steps = [(t, c, 0.004 + 8e-5 * t + 1e-6 * c) for t in (1, 8, 64, 512) for c in (64, 1024, 2048)]
    measured = {"steps": steps, "loads": [[8, 0.002]], "gpu_blocks": 97, "block_bytes": 65536, "load_average": [0, 0],
                "links": {"h2d_gbps": 5.0, "d2h_gbps": 5.0, "load_latency_s": 0.001, "ssd_read_gbps": 1.0,
                          "ssd_write_gbps": 0.5},
                "runs": [{"ttft": {}, "decisions": {}}]}
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        workload = load_workload(compose("fidelity", overrides=list(SMALL)).workload)
    measured["runs"][0]["ttft"] = {str(r.request_id): 1.0 for r in workload.requests}
    (tmp_path / "guess.json").write_text(json.dumps(measured))
    first = fidelity(*SMALL, f"fidelity.measured={tmp_path / 'guess.json'}", f"hydra.run.dir={tmp_path / 'a'}")
    assert first["requests"] == len(workload) and not first["meets_targets"]

    sim = pd.read_csv(tmp_path / "a" / "comparison.csv", dtype={"request_id": str})
    tiers = [column.removesuffix("_hit_blocks") for column in DECISION_COLUMNS]
    measured["runs"] = [{"ttft": dict(zip(sim.request_id, sim.ttft_sim_s)),
                         "decisions": {row.request_id: {t: int(getattr(row, f"{t}_hit_blocks_sim")) for t in tiers}
                                       for row in sim.itertuples()}}] * 2
    (tmp_path / "self.json").write_text(json.dumps(measured))
    second = fidelity(*SMALL, f"fidelity.measured={tmp_path / 'self.json'}", f"hydra.run.dir={tmp_path / 'b'}")
    assert second["ttft_err_median"] == second["ttft_err_p90"] == 0.0
    assert second["decisions_agree"] and second["meets_targets"] and second["real_rerun_ttft_err_p90"] == 0.0
    assert sum(second[f"{t}_hit_blocks_sim"] for t in ("gpu", "cpu", "ssd")) > 0  # the workload does hit
    assert (tmp_path / "b" / "ttft_sim_vs_real.png").exists()

    # two real runs of three take a request's hit blocks from another tier than the twin did: it is contested,
    # the majority disagrees with the twin, yet hit or miss agrees, so the targets are still met
    hit = next(row for row in sim.itertuples() if row.gpu_hit_blocks_sim + row.cpu_hit_blocks_sim > 0)
    other = dict(measured["runs"][0]["decisions"][hit.request_id])
    other["ssd"] += other["gpu"] + other["cpu"]
    other["gpu"] = other["cpu"] = 0
    split = {**measured["runs"][0]["decisions"], hit.request_id: other}
    measured["runs"] = [measured["runs"][0], {**measured["runs"][0], "decisions": split},
                        {**measured["runs"][0], "decisions": split}]
    (tmp_path / "split.json").write_text(json.dumps(measured))
    third = fidelity(*SMALL, f"fidelity.measured={tmp_path / 'split.json'}", f"hydra.run.dir={tmp_path / 'c'}")
    assert third["decisions_contested"] == [hit.request_id] and not third["decisions_agree"]
    assert third["decisions_agree_uncontested"] and third["meets_targets"]


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_against_real_vllm_on_a_short_workload(tmp_path):
    """Real vLLM (CPU build, dummy weights) with the connector, on a workload squeezed into ~25 s: about a minute."""
    result = fidelity("workload.chat.num_sessions=4", "workload.chat.session_rate=1.0", "workload.chat.think_time_s=2",
                      "workload.system_prompt.num_requests=12", "workload.system_prompt.rate=1.0",
                      "workload.doc_qa.num_requests=12", "workload.doc_qa.rate=1.0", "fidelity.real_runs=1",
                      "calibration.repeats=2", "calibration.prefill_lengths=[32,128,320,512,1024]",
                      "calibration.decode_batches=[1,4]", "calibration.load_blocks=[4,32]", "calibration.ssd_mib=16",
                      f"hydra.run.dir={tmp_path}")
    assert result["requests"] >= 30
    assert result["hit_blocks_agreeing"] >= 0.9 * result["requests"]
    assert result["ttft_err_median"] < 0.5  # the check itself is the benchmark; this only catches a broken twin
    assert (tmp_path / "ttft_sim_vs_real.png").exists() and (tmp_path / "step_profile.csv").exists()
