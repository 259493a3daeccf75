"""FlexKV as a vLLM KV connector: a CPU (and SSD, and shared remote) tier under vLLM's own prefix cache.

Load it with::

    --kv-transfer-config '{"kv_connector": "FlexKVConnector",
                           "kv_connector_module_path": "connector.flexkv_connector",
                           "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
                           "kv_connector_extra_config": {"config": "cpu_ssd", "cpu_bytes": 8e9,
                                                         "ssd_dirs": ["/nvme/kv"], "ssd_bytes": 200e9}}'

or by vLLM's in-tree name, ``{"kv_connector": "FlexKVConnectorV1", "kv_role": "kv_both"}``, with the
settings in the file ``FLEXKV_CONFIG_PATH`` names (``flexkv.integration.vllm.vllm_v1_adapter``,
``config_file``).

The scheduler-side instance owns the engine's one CacheManager
(``scheduler_side``); each worker runs the transfers on its own slice
(``worker_side``); ``protocol`` is what passes between them. Loads are
asynchronous, stores start as soon as a forward has computed full blocks, and a
block that cannot be loaded is reported so that vLLM recomputes it (with
``kv_load_failure_policy: recompute``; vLLM's default fails the request).

``FlexKVWorkerExtension`` (vLLM's ``worker_extension_cls``) adds the
``collective_rpc`` calls behind ``wait_for_offloads`` and ``connector_totals``.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

import torch

from connector._vllm_guard import check_connector_class
from connector.protocol import FlexKVMetadata, FlexKVStats
from connector.scheduler_side import FlexKVScheduler
from connector.settings import settings_from_vllm
from connector.worker_side import FlexKVWorker
from vllm.config import VllmConfig
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
    SupportsHMA,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
from vllm.forward_context import ForwardContext
from vllm.v1.attention.backend import AttentionMetadata
from vllm.v1.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.kv_cache_interface import KVCacheConfig
from vllm.v1.metrics.cache_hit_source import CacheHitSource
from vllm.v1.outputs import KVConnectorOutput
from vllm.v1.request import Request

log = logging.getLogger(__name__)

_HIT_SOURCES = {"CPU": CacheHitSource.HOST, "SSD": CacheHitSource.DISK, "REMOTE": CacheHitSource.P2P}


class FlexKVConnector(KVConnectorBase_V1, SupportsHMA):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        settings = settings_from_vllm(vllm_config, kv_cache_config)
        self._layer_names = list(kv_cache_config.kv_cache_groups[0].layer_names)
        self.scheduler: FlexKVScheduler | None = None
        self.worker: FlexKVWorker | None = None
        if role == KVConnectorRole.SCHEDULER:
            self.scheduler = FlexKVScheduler(settings)
            if self._kv_transfer_config.kv_load_failure_policy != "recompute":
                log.warning("FlexKV: kv_load_failure_policy is %r, so a block that cannot be loaded (a corrupt SSD "
                            "block) fails its request; set it to 'recompute' to recompute instead",
                            self._kv_transfer_config.kv_load_failure_policy)
        else:
            self.worker = FlexKVWorker(settings, vllm_config.parallel_config.rank)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a cache: a copy lost to a preemption is only a future miss

    # ================================================================ worker

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.worker.register_kv_caches([kv_caches[name] for name in self._layer_names])

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        self.worker.fence(kv_connector_metadata)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        self.worker.start_transfers(self._metadata())

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Nothing to wait for: loads are asynchronous, a request runs only once its load is reported done."""

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata,
                      **kwargs: Any) -> None:
        """Nothing per layer: a store copies whole blocks of every layer once the forward is over."""

    def wait_for_save(self) -> None:
        self.worker.start_stores(self._metadata())

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return self.worker.transfer_results(self._metadata())

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.load_errors()

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        return self.worker.worker_meta() if self.worker is not None else None

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        return self.worker.stats() if self.worker is not None and self.worker.engine is not None else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return FlexKVStats(dict(data or {}))

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.shutdown()
        if self.scheduler is not None:
            self.scheduler.shutdown()

    def _metadata(self) -> FlexKVMetadata:
        meta = self._get_connector_metadata()
        assert isinstance(meta, FlexKVMetadata)
        return meta

    # ============================================================= scheduler

    def bind_kv_cache_manager(self, kv_cache_manager: KVCacheManager) -> None:
        super().bind_kv_cache_manager(kv_cache_manager)
        self.scheduler.kv_cache_manager = kv_cache_manager

    def on_new_request(self, request: Request) -> None:
        self.scheduler.on_new_request(request)

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        self.scheduler.update_state_after_alloc(request, blocks.get_block_ids()[0], num_external_tokens)

    def get_external_cache_hit_sources(self, request: Request, num_external_tokens: int) -> dict[CacheHitSource, int]:
        sources: Counter = Counter()
        for tier, tokens in self.scheduler.hit_sources(request).items():
            sources[_HIT_SOURCES.get(tier, CacheHitSource.EXTERNAL_UNSPECIFIED)] += tokens
        return dict(sources)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return self.scheduler.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        self.scheduler.update_connector_output(connector_output.kv_connector_worker_meta)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self.scheduler.request_finished(request), None

    def request_finished_all_groups(self, request: Request,
                                    block_ids: tuple[list[int], ...]) -> tuple[bool, dict[str, Any] | None]:
        return self.scheduler.request_finished(request), None

    def has_pending_push_work(self) -> bool:
        return self.scheduler.has_pending_work()

    def reset_cache(self) -> bool | None:
        return self.scheduler.reset_cache()


check_connector_class(FlexKVConnector)


class FlexKVWorkerExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``) for ``LLM.collective_rpc``."""

    def flexkv_flush(self, timeout: float | None = None) -> bool:
        return _worker_connector().flush(timeout)

    def flexkv_totals(self) -> dict[str, float]:
        return dict(_worker_connector().totals)


WORKER_EXTENSION = f"{__name__}.{FlexKVWorkerExtension.__name__}"


def _worker_connector() -> FlexKVWorker:
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    connector = get_kv_transfer_group()
    connector = getattr(connector, "_flexkv_connector", connector)  # under vLLM's in-tree FlexKVConnectorV1
    if not isinstance(connector, FlexKVConnector):
        raise RuntimeError(f"the engine's KV connector is {type(connector).__name__}, not FlexKVConnector")
    return connector.worker


def wait_for_offloads(llm: Any, timeout: float = 120.0) -> None:
    """Block until every copy the connector started has landed and its scheduler knows it.

    Needs ``worker_extension_cls=WORKER_EXTENSION``. Each call waits on the workers'
    transfers; between calls vLLM steps, which hands the news to the scheduler.
    """
    deadline = time.monotonic() + timeout
    while not all(llm.collective_rpc("flexkv_flush", args=(max(deadline - time.monotonic(), 0.0),))):
        if time.monotonic() >= deadline:
            raise TimeoutError(f"FlexKV transfers still running after {timeout} s")


def connector_totals(llm: Any) -> dict[str, float]:
    """The connector's counters since start, summed over workers (hit tokens per tier, bytes, load time)."""
    totals: Counter = Counter()
    for rank_totals in llm.collective_rpc("flexkv_totals"):
        totals.update(rank_totals)
    return dict(totals)
