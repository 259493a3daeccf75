"""The connector's configuration, settled once per engine before anything starts.

A preset from ``conf/connector/`` is composed with Hydra (so it draws its
policies from the same ``conf/eviction``, ``conf/admission`` and
``conf/prefetch`` groups as the simulator, and its remote tier from
``conf/remote``), then the keys of vLLM's
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
#: the option of each remote backend that ``remote_address`` sets
REMOTE_ADDRESS = {"redis": "url", "mooncake": "master"}

#: kv_connector_extra_config keys, and what each overrides in the preset
EXTRA_KEYS = {
    "config": "preset name in conf/connector (default: 'default')",
    "cpu_bytes": "CPU tier capacity per worker, bytes",
    "cpu_blocks": "CPU tier capacity per worker, blocks",
    "ssd_dirs": "SSD tier directories (enables the SSD tier)",
    "ssd_bytes": "SSD tier capacity per worker, bytes",
    "ssd_blocks": "SSD tier capacity per worker, blocks",
    "remote": "remote tier shared by engines: a preset in conf/remote (redis, mooncake), or {name: ..., keys of "
              "the runtime's remote section, e.g. timeout_s, capacity_blocks}",
    "remote_address": "the remote store: redis://HOST:PORT/DB (redis) or the mooncake_master's HOST:PORT (mooncake)",
    "eviction": "eviction policy: a name or {name: ..., params...}",
    "admission": "admission policy: a name or {name: ..., params...}",
    "prefetch": "prefetch policy: a name or {name: ..., params...}",
    "write_policy": "write_through | write_back | selective",
    "selective_hits": "hits before a block is copied down under write_policy=selective",
    "overrides": "list of Hydra overrides for anything else, e.g. ['ssd.fsync=none']",
}


def presets(group: str = "connector") -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def compose_config(extra: Mapping[str, Any]) -> dict[str, Any]:
    """The runtime config (``cpu``, ``ssd``, ``remote``, policies, ``transfer``) for one ``kv_connector_extra_config``."""
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
    remote_params = _remote_params(extra.get("remote"))
    if remote_params is not None:
        overrides.append(f"remote={remote_params.pop('name')}")
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
    if cfg.get("remote"):
        cfg["remote"] = _remote_section(cfg["remote"], remote_params or {}, extra.get("remote_address"))
    elif "remote_address" in extra:
        raise ValueError(f"remote_address needs a remote tier: set remote to one of {presets('remote')}")
    for key in ("write_policy", "selective_hits"):
        if key in extra:
            cfg[key] = extra[key]
    return cfg


def _remote_params(spec: Any) -> dict[str, Any] | None:
    """The extra config's ``remote``: a preset name, or a mapping naming one plus keys that override it."""
    if spec is None:
        return None
    params = {"name": spec} if isinstance(spec, str) else dict(spec) if isinstance(spec, Mapping) else {}
    if params.get("name") not in presets("remote"):
        raise ValueError(f"remote must be one of {presets('remote')} (in {CONF_DIR / 'remote'}) or a mapping "
                         f"with such a 'name', got {spec!r}")
    return params


def _remote_section(preset: Mapping[str, Any], params: Mapping[str, Any], address: str | None) -> dict[str, Any]:
    """The preset's remote section with the extra config's keys on top (backend options merged key by key)."""
    capacity = {"capacity_bytes", "capacity_blocks"}
    section = {k: v for k, v in preset.items() if not (capacity & set(params) and k in capacity)}
    for key, value in params.items():
        merge = isinstance(value, Mapping) and isinstance(section.get(key), Mapping)
        section[key] = {**section[key], **value} if merge else value
    if address is not None:
        backend = section.get("backend")
        if backend not in REMOTE_ADDRESS:
            raise ValueError(f"remote_address is for the backends {sorted(REMOTE_ADDRESS)}, not {backend!r}")
        section[backend] = {**(section.get(backend) or {}), REMOTE_ADDRESS[backend]: address}
    return section


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
    #: REMOTE blocks the scheduler keeps track of; 0 without a remote tier
    remote_blocks: int

    def rank_namespace(self, rank: int) -> Namespace:
        """Where one worker's slice lives: its SSD directory and block headers carry this tag."""
        ns = self.namespace
        return Namespace(model=ns.model, dtype=ns.dtype, layout=ns.layout, tp_rank=rank, tp_size=self.world_size)

    def rank_namespaces(self) -> list[Namespace]:
        """Every worker's namespace: a block is in the remote store only when each rank's slice is."""
        return [self.rank_namespace(rank) for rank in range(self.world_size)]

    def ssd_dirs(self) -> list[Path]:
        return [Path(d) / self.instance for d in self.runtime["ssd"]["dirs"]]


def instance_name(engine_id: str, data_parallel_rank: int, data_parallel_size: int) -> str:
    """A directory name unique per engine (vLLM's engine id, and its data-parallel rank when there are several)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", engine_id)
    return f"{name}-dp{data_parallel_rank}" if data_parallel_size > 1 else name


def settings_from_vllm(vllm_config: Any, kv_cache_config: Any) -> ConnectorSettings:
    """Settings for one engine from its ``VllmConfig`` and ``KVCacheConfig`` (same result on every side)."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, MLAAttentionSpec

    from connector.config_file import extra_config  # it reads EXTRA_KEYS from here
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
    runtime = KVRuntime(compose_config(extra_config(transfer.kv_connector_extra_config)), namespace=namespace).config
    unstable_hashes = cache.prefix_caching_hash_algo.startswith("xxhash") and "PYTHONHASHSEED" not in os.environ
    if (runtime.get("ssd") or runtime.get("remote")) and unstable_hashes:
        log.warning("FlexKV: with prefix_caching_hash_algo=%s and no PYTHONHASHSEED, vLLM's block hashes change "
                    "with every process: SSD blocks will not be found after a restart, nor remote blocks by "
                    "other engines", cache.prefix_caching_hash_algo)
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
        remote_blocks=tier_capacity_blocks("remote", runtime["remote"], block_bytes) if runtime.get("remote") else 0,
    )
