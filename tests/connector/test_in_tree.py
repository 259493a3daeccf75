"""vLLM's in-tree ``FlexKVConnectorV1`` around our connector, and settings from ``FLEXKV_CONFIG_PATH``.

The engine tests (test_engine.py) run both on real vLLM; these check, in
process, what the adapter relies on in vLLM's wrapper and what the config file
accepts and refuses.
"""
from __future__ import annotations

import json

import pytest

pytest.importorskip("vllm")

from connector.config_file import ENV_VAR, GIB, extra_config, read_config_file  # noqa: E402
from connector.flexkv_connector import FlexKVConnector  # noqa: E402
from connector.protocol import FlexKVMetadata  # noqa: E402
from flexkv.integration.vllm.vllm_v1_adapter import FlexKVConnectorV1Impl, unforwarded_hooks  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.flexkv_connector import FlexKVConnectorV1  # noqa: E402

#: hooks our connector needs that vLLM's wrapper does not forward
NEEDED = {"bind_connector_metadata", "clear_connector_metadata", "handle_preemptions", "build_connector_worker_meta",
          "has_pending_push_work", "on_new_request", "bind_kv_cache_manager", "reset_cache"}


@pytest.fixture
def engine(make_engine):
    return make_engine({"cpu_blocks": 8})


def wrap(engine, role: KVConnectorRole) -> FlexKVConnectorV1:
    """vLLM's wrapper for a role, built as vLLM's factory builds it, on a scheduler-test engine's configs."""
    return FlexKVConnectorV1(engine.config, role, engine.scheduler.kv_cache_config)


def test_every_hook_of_the_wrapper_runs_the_connector(engine):
    assert NEEDED <= set(unforwarded_hooks(FlexKVConnectorV1))
    worker = wrap(engine, KVConnectorRole.WORKER)
    impl = worker._flexkv_connector
    assert isinstance(impl, FlexKVConnector) and impl.worker is not None
    for name in unforwarded_hooks(FlexKVConnectorV1):
        assert getattr(worker, name).__self__ is impl, name

    meta = FlexKVMetadata(preempted=["r"])
    worker.bind_connector_metadata(meta)  # what vLLM's model runner does before each forward
    assert impl._metadata() is meta and worker.has_connector_metadata()
    worker.clear_connector_metadata()
    assert not impl.has_connector_metadata()

    scheduler = wrap(engine, KVConnectorRole.SCHEDULER)
    vllm_manager = engine.scheduler.kv_cache_manager
    scheduler.bind_kv_cache_manager(vllm_manager)  # what vLLM's Scheduler does once
    assert scheduler._flexkv_connector.scheduler.kv_cache_manager is vllm_manager
    assert scheduler.has_pending_push_work() is False


def test_the_impl_is_only_built_by_vllms_wrapper(engine):
    with pytest.raises(TypeError, match="built by vLLM's FlexKVConnectorV1"):
        FlexKVConnectorV1Impl(engine.config, KVConnectorRole.SCHEDULER)


# ------------------------------------------------------------ config file


def test_a_config_file_configures_an_engine_without_extra_config(make_engine, tmp_path, monkeypatch):
    path = tmp_path / "flexkv.yaml"
    path.write_text("cpu_blocks: 12\neviction: s3fifo\n")
    monkeypatch.setenv(ENV_VAR, str(path))
    settings = make_engine({}).flexkv.settings
    assert settings.cpu_blocks == 12 and settings.runtime["eviction"]["name"] == "s3fifo"
    assert make_engine({"cpu_blocks": 20}).flexkv.settings.cpu_blocks == 20  # the extra config wins


def test_numbers_in_exponent_form_are_numbers(tmp_path):
    path = tmp_path / "flexkv.yaml"
    path.write_text("cpu_bytes: 8.0e9\nssd_bytes: 2e+11\nssd_dirs: [/nvme/kv]\neviction: 1e-3x\n")
    assert read_config_file(path) == {"cpu_bytes": 8e9, "ssd_bytes": 2e11, "ssd_dirs": ["/nvme/kv"],
                                      "eviction": "1e-3x"}


def test_without_a_file_the_extra_config_is_all(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert extra_config({"cpu_blocks": 3}) == {"cpu_blocks": 3}


def test_tencent_flexkv_keys_mean_the_same_here(tmp_path):
    path = tmp_path / "flexkv_config.json"
    path.write_text(json.dumps({"cpu_cache_gb": 2, "ssd_cache_gb": 0.5, "ssd_cache_dir": "/a/; /b/",
                                "enable_gds": False, "eviction": "lru"}))
    assert read_config_file(path) == {"cpu_bytes": 2 * GIB, "ssd_bytes": GIB // 2, "ssd_dirs": ["/a/", "/b/"],
                                      "eviction": "lru"}
    path.write_text(json.dumps({"cpu_cache_gb": 1, "ssd_cache_gb": 0, "ssd_cache_dir": "/a"}))
    assert read_config_file(path) == {"cpu_bytes": GIB}  # Tencent's ssd_cache_gb 0: no SSD tier


@pytest.mark.parametrize("name, text, message", [
    ("c.yaml", "cpu_size: 1\ncpu_bytes: 1\n", r"unknown keys \['cpu_size'\]; valid keys:\n(.|\n)*cpu_cache_gb"),
    ("c.yaml", "cpu_bytes: [1\n", "cannot read"),
    ("c.json", "{'cpu_bytes': 1}", "cannot read"),
    ("nope.yaml", None, "cannot read"),
    ("c.yaml", "- cpu_bytes\n", "must hold a mapping"),
    ("c.yaml", "enable_gds: true\n", "GPU Direct Storage is not supported"),
    ("c.yaml", "cpu_cache_gb: '32'\n", "cpu_cache_gb must be a number of GiB"),
    ("c.yaml", "cpu_cache_gb: 1\ncpu_bytes: 1\n", "given both"),
])
def test_a_bad_config_file_fails_naming_it(tmp_path, monkeypatch, name, text, message):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    monkeypatch.setenv(ENV_VAR, str(path))
    with pytest.raises(ValueError, match=message) as failed:
        extra_config({})
    assert f"{ENV_VAR}={path}" in str(failed.value)
