"""Any FlexKV eviction policy as a ``CachePolicy`` of vLLM's own CPU offloading.

vLLM resolves an out-of-tree policy by name in a module::

    CPUOffloadingManager(num_chunks, cache_policy="flexkv_s3fifo",
                         cache_policy_module_path="connector.cache_policy")

(or ``"cache_policy": "flexkv_s3fifo", "cache_policy_module_path": "connector.cache_policy"``
in the OffloadingConnector's extra config). ``flexkv_<name>`` is the eviction
policy ``<name>`` of the FlexKV registry with the parameters of
``conf/eviction/<name>.yaml``, the file the simulator composes. The names carry
a prefix because vLLM's own ``lru`` and ``arc`` are found first.

vLLM's manager inserts a chunk when a store is prepared and reports the chunks
a request reused when the request finishes; the FlexKV policy hears the first
as ``on_insert`` and the second as ``on_hit``, in prefix order. Chunks have no
parents here, so prefix-aware policies see every chunk as a root.
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from functools import cache
from typing import Any, ClassVar

import connector._vllm_guard  # noqa: F401
from connector.settings import CONF_DIR
from flexkv_runtime.control.index import Block
from flexkv_runtime.policies.base import EvictionPolicy, PolicyContext, available, make_policy
from vllm.v1.kv_offload.base import OffloadKey, ReqContext
from vllm.v1.kv_offload.cpu.policies.base import CachePolicy, ChunkStatus

PREFIX = "flexkv_"


class FlexKVCachePolicy(CachePolicy):
    """A FlexKV eviction policy deciding for vLLM's CPUOffloadingManager; subclasses name the policy."""

    eviction: ClassVar[dict[str, Any]] = {"name": "lru"}

    def __init__(self, cache_capacity: int) -> None:
        super().__init__(cache_capacity)
        self.clear()

    def clear(self) -> None:
        """Forget every chunk and start the policy afresh (ghost lists and adaptive state too)."""
        policy = make_policy("eviction", self.eviction, capacity_blocks=self.cache_capacity)
        assert isinstance(policy, EvictionPolicy)
        if policy.offline:
            raise ValueError(f"eviction policy {policy.name!r} needs the future; vLLM's offloading runs online")
        policy.bind(PolicyContext(clock=time.monotonic, tier="CPU"))
        self.policy = policy
        self.chunks: dict[OffloadKey, ChunkStatus] = {}
        #: what the policy is told about each chunk (hits, last access)
        self._blocks: dict[OffloadKey, Block] = {}
        #: chunks no transfer uses (vLLM says so through mark_evictable / mark_non_evictable)
        self._evictable: set[OffloadKey] = set()

    def get(self, key: OffloadKey) -> ChunkStatus | None:
        return self.chunks.get(key)

    def insert(self, key: OffloadKey, chunk: ChunkStatus) -> None:
        block = Block(key, None, 1.0)
        block.last_access = time.monotonic()
        self.chunks[key], self._blocks[key] = chunk, block
        if chunk.ref_cnt == 0:
            self._evictable.add(key)
        self.policy.on_insert(key, block)

    def remove(self, key: OffloadKey) -> None:
        del self.chunks[key], self._blocks[key]
        self._evictable.discard(key)
        self.policy.on_remove(key)

    def touch(self, keys: Iterable[OffloadKey], req_context: ReqContext) -> None:
        now = time.monotonic()
        for key in keys:
            block = self._blocks.get(key)
            if block is not None:
                block.hits += 1
                block.last_access = now
                self.policy.on_hit(key, block)

    def on_store_miss(self, keys: Iterable[OffloadKey], req_context: ReqContext) -> None:
        """A miss is not a use: the insert that follows tells the policy (ghost lists included)."""

    def on_request_finished(
        self,
        key_groups: Sequence[Sequence[OffloadKey]],
        insertion_only_keys: set[OffloadKey],
        reused_keys: set[OffloadKey],
        req_context: ReqContext,
    ) -> None:
        for keys in key_groups:
            self.touch([key for key in keys if key in reused_keys], req_context)

    def evict(self, n: int, protected: set[OffloadKey]) -> list[tuple[OffloadKey, ChunkStatus]] | None:
        """``n`` victims chosen by the policy, or None and no change when fewer can go."""
        if n == 0:
            return []
        evictable = self._evictable
        if len(evictable) - sum(1 for key in protected if key in evictable) < n:
            return None
        chosen: list[OffloadKey] = []

        def can_evict(key: OffloadKey) -> bool:
            return key in evictable and key not in protected and key not in chosen

        while len(chosen) < n:
            key = self.policy.victim(can_evict)
            assert key is not None, f"{self.policy.name} found no victim among {len(evictable)} evictable chunks"
            chosen.append(key)
        victims = [(key, self.chunks[key]) for key in chosen]
        for key in chosen:  # the policy forgot them already
            del self.chunks[key], self._blocks[key]
            evictable.discard(key)
        return victims

    def mark_evictable(self, key: OffloadKey) -> None:
        self._evictable.add(key)

    def mark_non_evictable(self, key: OffloadKey) -> None:
        self._evictable.discard(key)


@cache
def policy_for(name: str) -> type[FlexKVCachePolicy]:
    """The ``CachePolicy`` class for FlexKV eviction policy ``name``, parameters from its YAML if any."""
    from omegaconf import OmegaConf

    if name not in available("eviction"):
        raise AttributeError(f"no FlexKV eviction policy {name!r}; valid choices: {available('eviction')}")
    path = CONF_DIR / "eviction" / f"{name}.yaml"
    spec = OmegaConf.to_container(OmegaConf.load(path)) if path.exists() else {"name": name}
    return type(f"{PREFIX}{name}", (FlexKVCachePolicy,), {"eviction": spec, "__module__": __name__})


def __getattr__(attribute: str) -> type[FlexKVCachePolicy]:
    """``flexkv_<policy>``: how vLLM's CachePolicyFactory finds a policy in this module."""
    if attribute.startswith(PREFIX):
        return policy_for(attribute.removeprefix(PREFIX))
    raise AttributeError(f"module {__name__!r} has no attribute {attribute!r}")
