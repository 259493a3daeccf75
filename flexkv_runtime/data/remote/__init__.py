"""The REMOTE tier: a KV block pool shared by engines on many hosts, on Mooncake Store or Redis.

- ``backend``: the three batch calls a store must offer (get into buffers, best-effort put, exists).
- ``mooncake_store``, ``redis_store``: the two backends.
- ``guard``: every call bounded by a timeout, behind a circuit breaker.
- ``trailer``: the checksummed, namespaced trailer after every value, and the keys values live under.
- ``tier``: the data side used by ``TransferEngine``'s CPU<->REMOTE links.
- ``discovery``: finds blocks other engines stored and adopts them into the control plane.
- ``config``: the runtime config's ``remote`` section.
"""
from flexkv_runtime.data.remote.backend import RemoteBackend, Status
from flexkv_runtime.data.remote.config import open_store, validated_remote
from flexkv_runtime.data.remote.discovery import RemoteDiscovery
from flexkv_runtime.data.remote.guard import CircuitBreaker, GuardedBackend
from flexkv_runtime.data.remote.tier import RemoteTier

__all__ = ["CircuitBreaker", "GuardedBackend", "RemoteBackend", "RemoteDiscovery", "RemoteTier", "Status",
           "open_store", "validated_remote"]
