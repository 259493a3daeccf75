"""Model figures and the closed-form decode runs."""
from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from flexkv_sim.hardware import GpuSpec, HardwareSpec
from flexkv_sim.model import ModelSpec, StepTime, profile, roofline

CONF = Path(__file__).resolve().parents[2] / "conf"
KIB = 1024


def model(name: str) -> ModelSpec:
    return ModelSpec.from_config(OmegaConf.to_container(OmegaConf.load(CONF / "model" / f"{name}.yaml")))


@pytest.mark.parametrize("name, per_token", [
    ("llama3_1_8b", 128 * KIB), ("qwen3_8b", 144 * KIB), ("qwen3_32b", 256 * KIB), ("llama3_70b", 320 * KIB),
    ("deepseek_v3", 61 * 576 * 2),  # MLA latent: 68.6 KiB
])
def test_kv_bytes_per_token_match_the_reference_figures(name, per_token):
    spec = model(name)
    assert spec.kv_bytes_per_token == per_token
    assert spec.block_bytes(16) == 16 * per_token


@pytest.mark.parametrize("path", sorted((CONF / "hierarchy").glob("*.yaml")), ids=lambda p: p.stem)
def test_hierarchies_parse_and_leave_room_for_kv(path):
    hw = HardwareSpec.from_config(OmegaConf.to_container(OmegaConf.load(path)))
    assert hw.name == path.stem and hw.cpu is not None and hw.ssd is not None
    assert hw.gpu.kv_blocks(weight_bytes=1e9, block_bytes=2**20) > 0


def test_roofline_is_compute_bound_for_prefill_and_memory_bound_for_decode():
    spec, gpu = model("llama3_1_8b"), GpuSpec(step_overhead_s=0.0)
    step = roofline(spec, gpu)
    prefill = step(*step.prefill_chunk(8192, 0))
    assert prefill == pytest.approx(8192 * spec.flops_per_token / (gpu.peak_flops * gpu.mfu), rel=0.15)
    decode = step(1, 1000, 1000)
    assert decode == pytest.approx((spec.weight_bytes + 1000 * spec.kv_bytes_per_token)
                                   / (gpu.hbm_bandwidth * gpu.mbu))


lines = st.tuples(*(st.floats(0.0, 1e-3) for _ in range(4)))


@settings(max_examples=200, deadline=None)
@given(st.lists(lines, min_size=1, max_size=3), st.integers(1, 64), st.integers(0, 10_000), st.integers(1, 300),
       st.floats(0.0, 1e-3))
def test_decode_run_equals_the_steps_one_by_one(step_lines, batch, context, steps, overhead):
    step = StepTime(step_lines, overhead)
    run = step.decode_run(batch, context)
    total = 0.0
    for k in range(steps):
        total += step(batch, context + batch * k, context + batch * k)
        assert run.elapsed(k + 1) == pytest.approx(total, rel=1e-9, abs=1e-12)
    # a moment inside step k is found to belong to step k
    for k in (1, steps // 2, steps):
        if k and run.elapsed(k) - run.elapsed(k - 1) > 1e-9 * run.elapsed(k):
            assert run.steps_by((run.elapsed(k - 1) + run.elapsed(k)) / 2, steps) == k


def test_profile_fit_recovers_a_linear_table(tmp_path):
    path = tmp_path / "profile.csv"
    rows = [(t, c, 0.002 + 1e-5 * t + 1e-7 * c) for t in (1, 8, 512, 4096) for c in (100, 5000, 50000)]
    path.write_text("tokens,context,seconds\n" + "\n".join(f"{t},{c},{s}" for t, c, s in rows))
    step = profile(path)
    assert step(2048, 0, 20_000) == pytest.approx(0.002 + 1e-5 * 2048 + 1e-7 * 20_000)


def test_a_misspelt_tier_key_fails_instead_of_dropping_the_tier():
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "hierarchy" / "h100_pcie5_nvme4.yaml"))
    cfg["cpu"] = {"capacity_byte": 1e9}
    with pytest.raises(ValueError, match="unknown cpu keys"):
        HardwareSpec.from_config(cfg)


def _write_profile(path, rows, attention=True):
    head = "tokens,context,attention,seconds" if attention else "tokens,context,seconds"
    path.write_text(head + "\n" + "\n".join(",".join(str(v) for v in row) for row in rows))
    return path


def test_profile_fits_decode_only_steps_with_a_line_of_their_own(tmp_path):
    # decodes: 8 ms + 2 ms per sequence + 2 us per KV token; prefills: 20 ms + 1.7 ms per token + attention
    decode = lambda tokens, context: 0.008 + 0.002 * tokens + 2e-6 * context  # noqa: E731
    prefill = lambda tokens, pairs: 0.020 + 0.0017 * tokens + 2e-7 * pairs  # noqa: E731
    rows = [(b, c, c, decode(b, c)) for b in (1, 2, 4, 8) for c in (100 * b, 1000 * b)]
    for tokens in (32, 128, 512):
        for cached in (0, 1024):
            pairs = tokens * cached + tokens * (tokens + 1) // 2
            rows.append((tokens, cached + tokens, pairs, prefill(tokens, pairs)))
    step = profile(_write_profile(tmp_path / "profile.csv", rows))
    assert step.decode_run(3, 4500).elapsed(1) == pytest.approx(decode(3, 4500))
    assert step.decode_run(3, 4500).elapsed(2) == pytest.approx(decode(3, 4500) + decode(3, 4503))
    assert step(256, 256 * 2000 + 256 * 257 // 2, 2256) == pytest.approx(prefill(256, 256 * 2000 + 256 * 257 // 2))


def test_profile_weighs_every_step_by_its_relative_error(tmp_path):
    # a 1-token step that costs 10 ms stays within a few percent, though 2-second steps dominate in seconds
    rows = [(t, t, t, 0.010 + 0.004 * t) for t in (1, 2, 3)]
    rows += [(t, t, t * (t + 1) // 2, (0.010 + 0.004 * t) * noise) for t, noise in ((256, 1.06), (384, 0.94), (512, 1.06))]
    step = profile(_write_profile(tmp_path / "profile.csv", rows))
    assert step(1, 1, 1) == pytest.approx(0.014, rel=0.03)


def test_profile_leaves_out_a_term_that_fits_negative(tmp_path):
    rows = [(t, c, 0.004 + 1e-4 * t - 1e-7 * c) for t in (1, 64, 512) for c in (100, 1000, 3000)]
    (c0, c1, a, k), = profile(_write_profile(tmp_path / "profile.csv", rows, attention=False)).lines
    assert k == 0 and a == 0 and c0 > 0 and c1 > 0


def test_profile_refuses_steps_that_take_no_time(tmp_path):
    rows = [(1, 10, 0.01), (8, 80, 0.0), (64, 640, 0.1)]
    with pytest.raises(ValueError, match="positive.*row 3"):
        profile(_write_profile(tmp_path / "profile.csv", rows, attention=False))


@pytest.mark.parametrize("text, message", [
    ("batch,ctx,time\n1,10,0.01\n", r"lacks the column\(s\) \['tokens', 'context', 'seconds'\]"),
    ("tokens,context,seconds\n1,10,0.01\n8,80,abc\n64,640,0.1\n", r"row 3: every cell must be a number"),
])
def test_a_malformed_profile_names_the_file_and_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "profile.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"profile {path}.*{message}"):
        profile(path)


def _hierarchy(**changes) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "hierarchy" / "h100_pcie5_nvme4.yaml"))
    for path, value in changes.items():
        *parents, key = path.split("__")
        section = cfg
        for parent in parents:
            section = section[parent]
        section[key] = value
    return cfg


@pytest.mark.parametrize("changes, message", [
    ({"gpu__mfu": 5}, "hierarchy.gpu: mfu must be a fraction in (0, 1], got 5"),
    ({"gpu__count": 0}, "hierarchy.gpu: count must be a whole number >= 1, got 0"),
    ({"gpu__step_overhead_s": -1}, "hierarchy.gpu: step_overhead_s must be a number >= 0, got -1"),
    ({"pcie__h2d__bandwidth": "50GB"}, "hierarchy.pcie.h2d: bandwidth must be a positive number, got '50GB'"),
    ({"ssd__devices": 0}, "hierarchy.ssd: devices must be a whole number >= 1, got 0"),
    ({"ssd__read__queue_depth": 0.5}, "hierarchy.ssd.read: queue_depth must be a whole number >= 1, got 0.5"),
    ({"cpu__capacity_bytes": 0}, "hierarchy.cpu has no capacity but the SSD tier has one"),
])
def test_impossible_hardware_fails_naming_the_setting(changes, message):
    with pytest.raises(ValueError) as err:
        HardwareSpec.from_config(_hierarchy(**changes))
    assert message in str(err.value)


@pytest.mark.parametrize("key, value, message", [
    ("layers", 0, "layers must be a whole number >= 1, got 0"),
    ("head_dim", 1.5, "head_dim must be a whole number >= 1, got 1.5"),
    ("params", -1, "params must be a positive number, got -1"),
    ("kv_heads", None, "kv_heads must be a whole number >= 1, got None"),
])
def test_impossible_models_fail_naming_the_setting(key, value, message):
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "model" / "llama3_1_8b.yaml"))
    with pytest.raises(ValueError, match=f"model llama3_1_8b: {message}"):
        ModelSpec.from_config({**cfg, key: value})
