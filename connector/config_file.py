"""The connector's settings from the file ``FLEXKV_CONFIG_PATH`` names, as Tencent's FlexKV configures its own.

Users of vLLM's in-tree ``FlexKVConnectorV1`` pass only ``kv_connector`` and
``kv_role``, so the settings have to come from elsewhere: a YAML or JSON file
(``.json`` is read as JSON, anything else as YAML) holding the keys of
``kv_connector_extra_config`` (``settings.EXTRA_KEYS``). A file written for
Tencent's FlexKV works too as far as its documented basic keys mean the same
here (``TENCENT_KEYS``). Keys given in ``kv_connector_extra_config`` win over
the file's; with neither, the ``default`` preset applies. A file that cannot be
read, or holds any other key, stops the engine with an error naming the file.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from connector.settings import EXTRA_KEYS


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2's numbers: PyYAML (YAML 1.1) reads ``8e9`` and ``8.0e9`` as strings."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)[eE][-+]?\d+$"),
    list("-+0123456789."),
)

ENV_VAR = "FLEXKV_CONFIG_PATH"
GIB = 1 << 30

#: Tencent FlexKV's basic keys, and what each becomes here
TENCENT_KEYS = {
    "cpu_cache_gb": "cpu_bytes (GiB, per worker)",
    "ssd_cache_gb": "ssd_bytes (GiB, per worker; 0: no SSD tier)",
    "ssd_cache_dir": "ssd_dirs (a list, or paths separated by ';')",
    "enable_gds": "false only (GPU Direct Storage is not supported)",
}


def extra_config(given: Mapping[str, Any]) -> dict[str, Any]:
    """``kv_connector_extra_config`` over the settings of the file ``FLEXKV_CONFIG_PATH`` names, if it is set."""
    path = os.environ.get(ENV_VAR)
    return {**(read_config_file(Path(path)) if path else {}), **given}


def read_config_file(path: Path) -> dict[str, Any]:
    """The file's settings as ``kv_connector_extra_config`` keys."""
    try:
        text = path.read_text()
        raw = json.loads(text) if path.suffix == ".json" else yaml.load(text, Loader=_Loader)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise ValueError(f"{ENV_VAR}={path}: cannot read the FlexKV config file: {exc}") from exc
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ValueError(f"{ENV_VAR}={path}: the FlexKV config file must hold a mapping of settings, "
                         f"not {type(raw).__name__}")
    unknown = set(raw) - set(EXTRA_KEYS) - set(TENCENT_KEYS)
    if unknown:
        valid = "\n".join(f"  {key}: {meaning}" for key, meaning in {**EXTRA_KEYS, **TENCENT_KEYS}.items())
        raise ValueError(f"{ENV_VAR}={path}: unknown keys {sorted(unknown)}; valid keys:\n{valid}")
    try:
        return _from_tencent(raw)
    except ValueError as exc:
        raise ValueError(f"{ENV_VAR}={path}: {exc}") from exc


def _from_tencent(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Tencent's keys translated; each may not be given together with the key it becomes."""
    settings = {key: value for key, value in raw.items() if key not in TENCENT_KEYS}
    if raw.get("enable_gds"):
        raise ValueError("enable_gds: GPU Direct Storage is not supported; remove it or set it to false")
    translated: dict[str, Any] = {}
    if "cpu_cache_gb" in raw:
        translated["cpu_bytes"] = _gib(raw, "cpu_cache_gb")
    if raw.get("ssd_cache_gb"):
        translated["ssd_bytes"] = _gib(raw, "ssd_cache_gb")
        if "ssd_cache_dir" in raw:
            dirs = raw["ssd_cache_dir"]
            if isinstance(dirs, str):
                dirs = [d.strip() for d in dirs.split(";") if d.strip()]
            translated["ssd_dirs"] = list(dirs)
    both = sorted(set(translated) & set(settings))
    if both:
        raise ValueError(f"{both} given both as such and as Tencent FlexKV keys; keep one")
    return {**settings, **translated}


def _gib(raw: Mapping[str, Any], key: str) -> int:
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key} must be a number of GiB, got {value!r}")
    return int(value * GIB)
