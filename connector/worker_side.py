"""The connector's worker half: this rank's CPU pool, SSD store and transfer engine.

It runs every op the scheduler ships, on this rank's slice of the KV cache
(its heads, its layers): copies out of the engine's blocks once the forward
that computes them has run, copies into blocks of requests that wait for
them, and moves blocks between the CPU pool and the SSD store. It decides
nothing; it reports which ops ended and which blocks failed.
"""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence

import torch

import connector._vllm_guard  # noqa: F401
import kernels
from connector.protocol import FlexKVMetadata, FlexKVStats, FlexKVWorkerMetadata, Recovered
from connector.settings import ConnectorSettings
from flexkv_runtime.control.ops import OpKind, TransferOp
from flexkv_runtime.data.transfer import TransferEngine
from flexkv_runtime.runtime import start_data_plane

log = logging.getLogger(__name__)

#: On a step with nothing to compute, how long to wait for a transfer to end before
#: answering: vLLM steps again at once, so this keeps an idle engine from spinning.
IDLE_WAIT_S = 0.005
SHUTDOWN_FLUSH_S = 60.0


class FlexKVWorker:
    def __init__(self, settings: ConnectorSettings, rank: int) -> None:
        self.settings = settings
        self.rank = rank
        self.engine: TransferEngine | None = None
        self._unsent_recovered: list[Recovered] | None = None
        #: op id -> request id, for ops submitted and not yet reported
        self._in_flight: dict[int, str | None] = {}
        self._completed: dict[int, tuple[int, frozenset]] = {}
        #: parent keys the SSD store records with each block it writes, until the op is submitted
        self._parents: dict[Hashable, Hashable | None] = {}
        self._load_errors: set[int] = set()
        self._stats: Counter = Counter()
        self.totals: Counter = Counter()
        self._link_totals: dict[str, tuple[int, float]] = {}
        #: the last metadata said the scheduler waits for nothing (true before any step: nothing shipped yet)
        self._quiet = True

    def register_kv_caches(self, layers: Sequence[torch.Tensor]) -> None:
        """Start this rank's tiers for the engine's per-layer KV tensors."""
        settings, cfg = self.settings, self.settings.runtime
        layout = kernels.KVLayout.from_layers(layers)
        if layout.block_bytes != settings.block_bytes:
            raise ValueError(f"KV caches hold {layout.block_bytes} bytes per block on rank {self.rank}, but the KV "
                             f"cache config says {settings.block_bytes}")
        self.engine = start_data_plane(
            cfg, namespace=settings.rank_namespace(self.rank), block_bytes=settings.block_bytes,
            blocks={"cpu": settings.cpu_blocks, "ssd": settings.ssd_blocks},
            ssd_dirs=settings.ssd_dirs() if settings.ssd_blocks else (),
            parent_of=lambda key: self._parents.pop(key, None),
        )
        store = self.engine.ssd
        if store is not None:
            self._unsent_recovered = store.recovered
        self.engine.register_kv_caches(layers)
        log.info("FlexKV rank %d: %d CPU blocks%s of %d bytes", self.rank, settings.cpu_blocks,
                 f", {settings.ssd_blocks} SSD blocks in {settings.ssd_dirs()}" if store else "", settings.block_bytes)

    # ------------------------------------------------------------- one step

    def fence(self, meta: FlexKVMetadata) -> None:
        """Before the forward: copies out of a preempted request's blocks must end before the blocks are reused."""
        fenced = set(meta.preempted)
        waiting = [op_id for op_id, rid in self._in_flight.items() if rid in fenced]
        if waiting:
            self.engine.wait(waiting)

    def start_transfers(self, meta: FlexKVMetadata) -> None:
        """After the forward was launched: loads into waiting requests' blocks and moves between tiers.

        Released slots are forgotten first: an op of this step may write one of them again.
        """
        for tier, slots in meta.released:
            self.engine.release(tier, slots)
        self._parents.update(meta.parents)
        self._submit(op for op in meta.ops if op.kind is not OpKind.STORE)

    def start_stores(self, meta: FlexKVMetadata) -> None:
        """After the forward: copies of the blocks it just computed (they stay allocated until reported)."""
        self._submit(op for op in meta.ops if op.kind is OpKind.STORE)

    def _submit(self, ops: Iterable[TransferOp]) -> None:
        for op in ops:
            self._in_flight[op.op_id] = op.request_id
            self.engine.submit(op)

    def transfer_results(self, meta: FlexKVMetadata) -> tuple[set[str], set[str]]:
        """(requests whose stores are over, requests whose loads are over), as the scheduler reports them.

        The scheduler reports a finished request's stores only after vLLM listed it as finished
        (``request_finished`` runs first), as vLLM requires of ``finished_sending``.
        """
        for done in meta.loads_done.values():
            self._load_errors.update(done.failed_block_ids)
            if self.rank == 0:  # every rank loads its slice; the tokens are counted once
                self._count(loads=1, load_seconds=done.seconds, load_failed_blocks=len(done.failed_block_ids),
                            **{f"hit_tokens_{tier.lower()}": n for tier, n in done.hit_tokens.items()})
        if self.rank == 0 and meta.preempted:
            self._count(preemptions=len(meta.preempted))
        self._collect(wait=meta.idle)
        self._quiet = not meta.busy
        return set(meta.stores_done), set(meta.loads_done)

    def _collect(self, wait: bool) -> None:
        finished = self.engine.poll()
        if not finished and wait and self._in_flight:
            self.engine.wait([next(iter(self._in_flight))], timeout=IDLE_WAIT_S)
            finished = self.engine.poll()
        for op_id, failed in finished:
            self._in_flight.pop(op_id, None)
            self._completed[op_id] = (1, frozenset(failed))

    def load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def worker_meta(self) -> FlexKVWorkerMetadata | None:
        recovered = {} if self._unsent_recovered is None else {self.rank: self._unsent_recovered}
        if not self._completed and not recovered:
            return None
        meta = FlexKVWorkerMetadata(self._completed, recovered)
        self._completed, self._unsent_recovered = {}, None
        return meta

    def stats(self) -> FlexKVStats | None:
        """Counters since the last call: this step's hits and loads, and bytes and busy time per link."""
        for link, stats in self.engine.stats().links.items():
            name = link.replace("->", "_to_").lower()
            bytes_before, busy_before = self._link_totals.get(link, (0, 0.0))
            self._link_totals[link] = (stats.bytes, stats.busy_seconds)
            self._count(**{f"{name}_bytes": stats.bytes - bytes_before,
                           f"{name}_seconds": stats.busy_seconds - busy_before})
        step, self._stats = self._stats, Counter()
        data = {name: value for name, value in step.items() if value}
        return FlexKVStats(data) if data else None

    def _count(self, **values: float) -> None:
        self._stats.update(values)
        self.totals.update(values)

    # ---------------------------------------------------------------- admin

    def flush(self, timeout: float | None = None) -> bool:
        """Wait for every transfer this worker runs; True when neither side has anything left to do."""
        self.engine.flush(timeout)
        self._collect(wait=False)
        return self._quiet and not self._in_flight and not self._completed

    def shutdown(self) -> None:
        if self.engine is None:
            return
        if not self.engine.flush(SHUTDOWN_FLUSH_S):
            log.warning("FlexKV rank %d: transfers still running at shutdown are abandoned", self.rank)
        self.engine.shutdown()
        self.engine = None
