"""What the two halves of the connector tell each other every step, and the stats they report.

Scheduler -> workers (``FlexKVMetadata``, bound before each forward): the
transfer ops the control plane started since the last step, the slower-tier
slots it let go of, the requests whose
loads or stores are over, and the preempted requests whose in-flight copies
must finish before their blocks are reused. Workers -> scheduler
(``FlexKVWorkerMetadata``, summed over ranks by vLLM): the ops each worker
finished, with the blocks it could not move, and once, the blocks its SSD
store found at start. Everything here is plain data: it is pickled across
processes.
"""
from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import connector._vllm_guard  # noqa: F401
from flexkv_runtime.control.index import TierKind
from flexkv_runtime.control.ops import TransferOp
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, KVConnectorWorkerMetadata
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

#: (key, parent key, slot) of a block an SSD store recovered, as ``CacheManager.adopt`` takes them
Recovered = tuple[int, int | None, int]


@dataclass
class LoadDone:
    """A request's load is over; vLLM recomputes from the first block it could not load."""

    failed_block_ids: list[int]
    #: tier name -> tokens this load took from that tier
    hit_tokens: dict[str, int]
    seconds: float


@dataclass
class FlexKVMetadata(KVConnectorMetadata):
    ops: list[TransferOp] = field(default_factory=list)
    #: slots of slower tiers the manager let go without an op (evicted, dropped): the SSD store forgets them
    released: list[tuple[TierKind, list[int]]] = field(default_factory=list)
    #: parent key of each block an op writes to SSD (the store persists it for recovery)
    parents: dict[Hashable, Hashable | None] = field(default_factory=dict)
    loads_done: dict[str, LoadDone] = field(default_factory=dict)
    #: finished requests whose stores are over: vLLM may now free their blocks
    stores_done: list[str] = field(default_factory=list)
    #: requests preempted this step: their copies still running must end before the forward reuses their blocks
    preempted: list[str] = field(default_factory=list)
    #: no tokens scheduled this step (nothing runs but transfers)
    idle: bool = False
    #: the control plane still waits for transfers or has news for the workers
    busy: bool = False


@dataclass
class FlexKVWorkerMetadata(KVConnectorWorkerMetadata):
    #: op id -> (workers that finished it, keys any of them failed to move)
    completed: dict[int, tuple[int, frozenset]] = field(default_factory=dict)
    #: rank -> blocks its SSD store recovered at start (sent once)
    recovered: dict[int, list[Recovered]] = field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> FlexKVWorkerMetadata:
        assert isinstance(other, FlexKVWorkerMetadata)
        completed = dict(self.completed)
        for op_id, (count, failed) in other.completed.items():
            mine = completed.get(op_id, (0, frozenset()))
            completed[op_id] = (mine[0] + count, mine[1] | failed)
        return FlexKVWorkerMetadata(completed, {**self.recovered, **other.recovered})


@dataclass
class FlexKVStats(KVConnectorStats):
    """Counters since the last report, summed over workers: hit tokens per tier, bytes per link, load time."""

    data: dict[str, Any] = field(default_factory=dict)

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> FlexKVStats:
        merged = dict(self.data)
        for name, value in other.data.items():
            merged[name] = merged.get(name, 0) + value
        return FlexKVStats(merged)

    def reduce(self) -> dict[str, int | float]:
        summary = dict(self.data)
        loads = self.data.get("loads", 0)
        if loads:
            summary["avg_load_ms"] = round(1000 * self.data.get("load_seconds", 0.0) / loads, 3)
        return summary

    def is_empty(self) -> bool:
        return not any(self.data.values())
