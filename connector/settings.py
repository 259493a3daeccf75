"""The connector's configuration, settled once per engine before anything starts.

A preset from ``conf/connector/`` is composed with Hydra (so it draws its
policies from the same ``conf/eviction``, ``conf/admission`` and
``conf/prefetch`` groups as the simulator), then the keys of vLLM's
``kv_connector_extra_config`` override it, and the result goes through the
runtime's own validation. Any bad name or value stops the engine at start with
the valid choices in the message. Both halves of the connector derive the same
settings from the same vLLM configs; only ``settings_from_vllm`` imports vLLM.
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flexkv_runtime.control.config import tier_capacity_blocks
from flexkv_runtime.control.keys import Namespace

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
PRESET_DIR = CONF_DIR / "connector"
POLICY_KINDS = ("eviction", "admission", "prefetch")

#: kv_connector_extra_config keys, and what each overrides in the preset
EXTRA_KEYS = {
    "config": "preset name in conf/connector (default: 'default')",
    "cpu_bytes": "CPU tier capacity per worker, bytes",
    "cpu_blocks": "CPU tier capacity per worker, blocks",
    "ssd_dirs": "SSD tier directories (enables the SSD tier)",
    "ssd_bytes": "SSD tier capacity per worker, bytes",
    "ssd_blocks": "SSD tier capacity per worker, blocks",
    "eviction": "eviction policy: a name or {name: ..., params...}",
    "admission": "admission policy: a name or {name: ..., params...}",
    "prefetch": "prefetch policy: a name or {name: ..., params...}",
    "write_policy": "write_through | write_back | selective",
    "selective_hits": "hits before a block is copied down under write_policy=selective",
    "overrides": "list of Hydra overrides for anything else, e.g. ['ssd.fsync=none']",
}


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def compose_config(extra: Mapping[str, Any]) -> dict[str, Any]:
    """The runtime config (``cpu``, ``ssd``, policies, ``transfer``) for one ``kv_connector_extra_config``."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    unknown = set(extra) - set(EXTRA_KEYS)
    if unknown:
        valid = "\n".join(f"  {key}: {meaning}" for key, meaning in EXTRA_KEYS.items())
        raise ValueError(f"unknown kv_connector_extra_config keys {sorted(unknown)}; valid keys:\n{valid}")
    preset = extra.get("config", "default")
    if preset not in presets():
        raise ValueError(f"unknown FlexKV connector preset {preset!r}; valid choices: {presets()} (in {PRESET_DIR})")

    overrides: list[str] = []
    policy_params: dict[str, dict[str, Any]] = {}
    for kind in POLICY_KINDS:
        spec = extra.get(kind)
        if spec is None:
            continue
        params = {"name": spec} if isinstance(spec, str) else dict(spec)
        name = params.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{kind} must be a policy name or a mapping with a 'name', got {spec!r}")
        if (CONF_DIR / kind / f"{name}.yaml").exists():
            overrides.append(f"{kind}={name}")  # the group's YAML supplies the defaults
            del params["name"]
        policy_params[kind] = params  # a name the registry knows without a YAML is checked by validation
    raw = extra.get("overrides", [])
    if isinstance(raw, str) or not isinstance(raw, Sequence):
        raise ValueError(f"overrides must be a list of Hydra override strings, got {raw!r}")
    overrides += [str(o) for o in raw]

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = OmegaConf.to_container(compose(config_name=f"connector/{preset}", overrides=overrides), resolve=True)

    for kind, params in policy_params.items():
        cfg[kind] = params if "name" in params else {**cfg[kind], **params}
    cfg["cpu"] = _with_capacity(cfg["cpu"], "cpu", extra)
    if any(key in extra for key in ("ssd_dirs", "ssd_bytes", "ssd_blocks")):
        ssd = _with_capacity(cfg.get("ssd") or {}, "ssd", extra)
        if "ssd_dirs" in extra:
            ssd["dirs"] = extra["ssd_dirs"]
        cfg["ssd"] = ssd
    if cfg.get("ssd") and not cfg["ssd"].get("dirs"):
        raise ValueError(f"preset {preset!r} has an SSD tier but no directories: "
                         "set ssd_dirs in kv_connector_extra_config")
    for key in ("write_policy", "selective_hits"):
        if key in extra:
            cfg[key] = extra[key]
    return cfg


def _with_capacity(tier: Mapping[str, Any], name: str, extra: Mapping[str, Any]) -> dict[str, Any]:
    """``tier`` with its capacity replaced by ``<name>_bytes`` or ``<name>_blocks`` from the extra config."""
    given = {unit: extra[f"{name}_{unit}"] for unit in ("bytes", "blocks") if f"{name}_{unit}" in extra}
    if not given:
        return dict(tier)
    if len(given) > 1:
        raise ValueError(f"give {name}_bytes or {name}_blocks, not both")
    (unit, value), = given.items()
    kept = {k: v for k, v in tier.items() if k not in ("capacity_bytes", "capacity_blocks")}
    return {**kept, f"capacity_{unit}": value}


@dataclass(frozen=True)
class ConnectorSettings:
    """Everything both sides of the connector must agree on, derived the same way on each."""

    #: validated runtime config (see ``flexkv_runtime.runtime``)
    runtime: dict[str, Any]
    #: the engine's key namespace; the one CacheManager's keys live in it
    namespace: Namespace
    #: bytes of one block on one worker (all its layers, its head slice)
    block_bytes: int
    tokens_per_block: int
    #: workers that each execute every transfer on their own slice
    world_size: int
    #: SSD subdirectory of this engine: its blocks are found again by an engine of the same name
    instance: str
    cpu_blocks: int
    #: 0 without an SSD tier
    ssd_blocks: int

    def rank_namespace(self, rank: int) -> Namespace:
        """Where one worker's slice lives: its SSD directory and block headers carry this tag."""
        ns = self.namespace
        return Namespace(model=ns.model, dtype=ns.dtype, layout=ns.layout, tp_rank=rank, tp_size=self.world_size)

    def ssd_dirs(self) -> list[Path]:
        return [Path(d) / self.instance for d in self.runtime["ssd"]["dirs"]]


def instance_name(engine_id: str, data_parallel_rank: int, data_parallel_size: int) -> str:
    """A directory name unique per engine (vLLM's engine id, and its data-parallel rank when there are several)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", engine_id)
    return f"{name}-dp{data_parallel_rank}" if data_parallel_size > 1 else name


def settings_from_vllm(vllm_config: Any, kv_cache_config: Any) -> ConnectorSettings:
    """Settings for one engine from its ``VllmConfig`` and ``KVCacheConfig`` (same result on every side)."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, MLAAttentionSpec

    from flexkv_runtime.runtime import KVRuntime  # its constructor validates; without a block size it starts nothing

    groups = kv_cache_config.kv_cache_groups
    spec = groups[0].kv_cache_spec if len(groups) == 1 else None
    if not isinstance(spec, FullAttentionSpec) or isinstance(spec, MLAAttentionSpec):
        kinds = [type(g.kv_cache_spec).__name__ for g in groups]
        raise ValueError(f"the FlexKV connector handles one full-attention KV cache group (no MLA, sliding window "
                         f"or hybrid models); this model has {kinds}")
    if spec.page_size_padded is not None:
        raise ValueError("the FlexKV connector does not handle padded KV cache pages")
    parallel = vllm_config.parallel_config
    cache = vllm_config.cache_config
    transfer = vllm_config.kv_transfer_config
    namespace = Namespace(
        model=str(vllm_config.model_config.model),
        dtype=str(spec.dtype).removeprefix("torch."),
        # block hashes depend on the block size and the hash function
        layout=f"vllm-paged/{spec.block_size}/{cache.prefix_caching_hash_algo}",
        tp_rank=0,
        tp_size=parallel.world_size,
    )
    runtime = KVRuntime(compose_config(transfer.kv_connector_extra_config), namespace=namespace).config
    if runtime.get("remote"):
        raise ValueError("the FlexKV connector runs CPU and SSD tiers; a remote tier is not wired into it yet")
    unstable_hashes = cache.prefix_caching_hash_algo.startswith("xxhash") and "PYTHONHASHSEED" not in os.environ
    if runtime.get("ssd") and unstable_hashes:
        log.warning("FlexKV: with prefix_caching_hash_algo=%s and no PYTHONHASHSEED, vLLM's block hashes change "
                    "with every process: the SSD tier's blocks will not be found after a restart",
                    cache.prefix_caching_hash_algo)
    block_bytes = spec.page_size_bytes * len(groups[0].layer_names)
    return ConnectorSettings(
        runtime=runtime,
        namespace=namespace,
        block_bytes=block_bytes,
        tokens_per_block=spec.block_size,
        world_size=parallel.world_size,
        instance=instance_name(transfer.engine_id, parallel.data_parallel_rank, parallel.data_parallel_size),
        cpu_blocks=tier_capacity_blocks("cpu", runtime["cpu"], block_bytes),
        ssd_blocks=tier_capacity_blocks("ssd", runtime["ssd"], block_bytes) if runtime.get("ssd") else 0,
    )
