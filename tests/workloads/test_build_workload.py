"""build_workload and the conf/workload YAML files that feed it."""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from flexkv_sim.workloads import (
    GENERATORS,
    WORKLOAD_TYPES,
    DocQASpec,
    GeneratorSettings,
    MixedSpec,
    SystemPromptSpec,
    build_workload,
    generate,
)

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
REAL_TRACE = CONF_DIR.parent.parent / "shared" / "traces" / "mooncake_conversation_trace.jsonl"


def test_a_yaml_per_workload_type() -> None:
    assert {p.stem for p in (CONF_DIR / "workload").glob("*.yaml")} == set(WORKLOAD_TYPES)


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_generator_yaml_spells_out_every_default(name: str) -> None:
    yaml = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "workload" / f"{name}.yaml"))
    assert yaml == {"type": name, **asdict(GENERATORS[name]()), **asdict(GeneratorSettings())}


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_generator_yaml_builds_the_default_workload(name: str) -> None:
    workload = build_workload(OmegaConf.load(CONF_DIR / "workload" / f"{name}.yaml"))
    assert workload == generate(GENERATORS[name]())


def test_default_mixed_workload_is_modest() -> None:
    workload = build_workload({"type": "mixed"})
    assert 2000 <= len(workload) <= 4000
    blocks_per_request = sorted(len(r.block_ids) for r in workload)
    assert 5 <= blocks_per_request[len(blocks_per_request) // 2] <= 60


def test_mooncake_yaml_requires_a_path() -> None:
    cfg = OmegaConf.load(CONF_DIR / "workload" / "mooncake.yaml")
    assert OmegaConf.is_missing(cfg, "path")
    with pytest.raises(ValueError, match="path"):
        build_workload(cfg)
    with pytest.raises(ValueError, match="needs 'path'"):
        build_workload({"type": "mooncake"})


def test_mooncake_yaml_loads_the_real_trace() -> None:
    if not REAL_TRACE.is_file():
        pytest.skip(f"real Mooncake trace not present at {REAL_TRACE} (it lives outside the project)")
    cfg = OmegaConf.load(CONF_DIR / "workload" / "mooncake.yaml")
    cfg.path = str(REAL_TRACE)
    cfg.limit = 100
    workload = build_workload(cfg)
    assert len(workload) == 100 and workload.tokens_per_block == 512


def test_missing_trace_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no_such_trace.jsonl"):
        build_workload({"type": "mooncake", "path": str(tmp_path / "no_such_trace.jsonl")})


def test_hydra_overrides_reach_the_generator() -> None:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(overrides=["+workload=mixed", "workload.seed=9", "workload.arrivals=bursty",
                                 "workload.system_prompt.num_requests=5", "workload.doc_qa.num_requests=7"])
    workload = build_workload(cfg.workload)
    kinds = Counter(r.kind for r in workload)
    assert kinds["system_prompt"] == 5 and kinds["doc_qa"] == 7 and kinds["chat"] > 0
    expected = MixedSpec(system_prompt=SystemPromptSpec(num_requests=5), doc_qa=DocQASpec(num_requests=7))
    assert workload == generate(expected, GeneratorSettings(arrivals="bursty", seed=9))


@pytest.mark.parametrize(
    ("cfg", "error", "message"),
    [
        ({"type": "nope"}, ValueError, "valid: \\['mooncake', 'chat', 'system_prompt', 'doc_qa', 'mixed'\\]"),
        ({}, ValueError, "unknown workload type None"),
        ({"type": "chat", "num_sesions": 3}, ValueError, "unknown chat parameter.*num_sesions.*num_sessions"),
        ({"type": "mooncake", "path": "x", "rate": 1}, ValueError, "unknown mooncake parameter.*time_scale"),
        ({"type": "mixed", "chat": {"seed": 1}}, ValueError, "unknown chat parameter.*'seed'"),
        ({"type": "mixed", "doc_qa": {"zipf_a": -1}}, ValueError, "DocQASpec.zipf_a must be >= 0"),
        ({"type": "doc_qa", "num_requests": 2.5}, ValueError, "num_requests must be int"),
        ({"type": "system_prompt", "rate": 0}, ValueError, "rate must be > 0"),
        ({"type": "chat", "arrivals": "uniform"}, ValueError, "must be one of \\['poisson', 'bursty'\\]"),
        ({"type": "chat", "burst_cv": 0.5}, ValueError, "burst_cv must be >= 1"),
        ({"type": "chat", "tokens_per_block": True}, ValueError, "tokens_per_block must be int"),
        (["type", "chat"], TypeError, "mapping"),
    ],
)
def test_bad_configs(cfg: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        build_workload(cfg)
