"""The runtime config's ``remote`` section: checked once, then turned into a guarded backend.

::

    remote:
      capacity_blocks: 1000000   # or capacity_bytes: REMOTE blocks this engine keeps track of (bookkeeping:
                                 # the store holds the data and evicts on its own)
      eviction: lru              # optional, which tracked blocks to forget first
      backend: mooncake          # mooncake | redis
      timeout_s: 1.0             # bound on every store call; past it the call is a miss for all its blocks
      breaker_failures: 3        # failed calls in a row that stop the engine asking the store ...
      breaker_cooldown_s: 5.0    # ... for this long, then one call probes it
      batch_bytes: 67108864      # most bytes per store call (one call must fit in timeout_s)
      discovery_max_blocks: 512  # most blocks of one request asked about in the store
      mooncake:
        master: 127.0.0.1:50051  # mooncake_master's RPC address
        local_hostname: 127.0.0.1  # this host's address as the store's peers reach it
        protocol: tcp            # tcp | rdma
        device: ""               # RDMA devices, for protocol rdma
      redis:
        url: redis://127.0.0.1:6379/0
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flexkv_runtime.data.remote.backend import RemoteBackend
from flexkv_runtime.data.remote.guard import CircuitBreaker, GuardedBackend

BACKEND_OPTIONS = {
    "mooncake": {"master", "local_hostname", "protocol", "device", "metadata_server"},
    "redis": {"url"},
}
_REQUIRED = {"mooncake": {"master"}, "redis": set()}
DEFAULTS: dict[str, Any] = {
    "timeout_s": 1.0,
    "breaker_failures": 3,
    "breaker_cooldown_s": 5.0,
    "batch_bytes": 64 << 20,
    "discovery_max_blocks": 512,
}
#: every key of the section; capacity and policy keys are the control plane's
REMOTE_KEYS = {"capacity_bytes", "capacity_blocks", "eviction", "admission", "backend"} | set(DEFAULTS) | set(
    BACKEND_OPTIONS)


def validated_remote(section: Mapping[str, Any]) -> dict[str, Any]:
    """The section with defaults filled in; a bad backend, option or number fails here, naming the key."""
    cfg = {**DEFAULTS, **section}
    backend = cfg.get("backend")
    if backend not in BACKEND_OPTIONS:
        raise ValueError(f"remote.backend must be one of {sorted(BACKEND_OPTIONS)}, got {backend!r}")
    options = cfg.get(backend) or {}
    if not isinstance(options, Mapping):
        raise ValueError(f"remote.{backend} must be a mapping of options, got {options!r}")
    unknown = set(options) - BACKEND_OPTIONS[backend]
    if unknown:
        valid = sorted(BACKEND_OPTIONS[backend])
        raise ValueError(f"unknown remote.{backend} options {sorted(unknown)}; valid: {valid}")
    missing = _REQUIRED[backend] - set(options)
    if missing:
        raise ValueError(f"remote.{backend} needs {sorted(missing)}")
    cfg[backend] = dict(options)
    for key in DEFAULTS:
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (
            value == 0 and key != "breaker_cooldown_s"
        ):
            raise ValueError(f"remote.{key} must be a positive number, got {value!r}")
    for key in ("breaker_failures", "batch_bytes", "discovery_max_blocks"):
        if cfg[key] != int(cfg[key]):
            raise ValueError(f"remote.{key} must be a whole number, got {cfg[key]!r}")
        cfg[key] = int(cfg[key])
    return cfg


def make_backend(cfg: Mapping[str, Any]) -> RemoteBackend:
    """The backend a validated section names (its client library is imported only now)."""
    options = cfg[cfg["backend"]]
    if cfg["backend"] == "mooncake":
        from flexkv_runtime.data.remote.mooncake_store import MooncakeBackend

        return MooncakeBackend(**options)
    from flexkv_runtime.data.remote.redis_store import RedisBackend

    return RedisBackend(**options, timeout_s=cfg["timeout_s"])


def open_store(cfg: Mapping[str, Any]) -> GuardedBackend:
    """A guarded backend for a validated section; connects on its first call, so the store may be down now."""
    breaker = CircuitBreaker(cfg["breaker_failures"], cfg["breaker_cooldown_s"])
    return GuardedBackend(make_backend(cfg), timeout_s=cfg["timeout_s"], breaker=breaker)
