"""The real data plane: moves blocks between the engine's KV cache, the CPU pool, the SSD store and a remote store.

One worker thread per link (GPU->CPU gather, CPU->GPU scatter, CPU->SSD write,
SSD->CPU read, CPU->REMOTE put, REMOTE->CPU get), so an SSD read never queues
behind a GPU copy and a slow remote store delays only its own links. The control
plane only submits runnable ops (it resolves ``op.after`` itself), so a worker
just executes its queue in order. Workers never touch the CacheManager, which is
not thread-safe: they queue ``(op_id, failed_keys)`` and the control-plane thread
drains them with ``poll()`` and calls ``manager.complete``. ``wait``/``flush``
block on a Condition until ops are done.

On CUDA, GPU copies run on a side stream per link, ordered after the work the
engine had queued on its current stream when the op was submitted.

With a remote tier, a block is sealed (its trailer written, checksum included)
once it is in the CPU pool, so puts send rows as they are and SSD writes reuse
the checksum: one hash per block, however many tiers it reaches. A block from
the engine is hashed by a sealer thread after its store op is reported done, so
the engine gets its KV blocks back at copy speed; a write out of a row waits for
the row's seal. An SSD read seals with the checksum it verified, and a remote
read brings its trailer along.

A remote get that outlives the tier's timeout is reported failed but may still
land in its CPU rows later; until it ends those rows are *fenced*: any op that
would write into one fails that block instead (a miss, never a torn block).
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace

import torch

import kernels
from flexkv_runtime.control.index import TierKind
from flexkv_runtime.control.ops import TransferOp, link_name
from flexkv_runtime.data.cpu_pool import CpuPool
from flexkv_runtime.data.remote.tier import RemoteTier
from flexkv_runtime.data.remote.trailer import TRAILER_BYTES
from flexkv_runtime.data.ssd_store import SsdStore

log = logging.getLogger(__name__)

GPU, CPU, SSD, REMOTE = TierKind.GPU, TierKind.CPU, TierKind.SSD, TierKind.REMOTE
GPU_TO_CPU, CPU_TO_GPU = link_name(GPU, CPU), link_name(CPU, GPU)
CPU_TO_SSD, SSD_TO_CPU = link_name(CPU, SSD), link_name(SSD, CPU)
CPU_TO_REMOTE, REMOTE_TO_CPU = link_name(CPU, REMOTE), link_name(REMOTE, CPU)
GPU_LINKS = (GPU_TO_CPU, CPU_TO_GPU)


@dataclass
class LinkStats:
    ops: int = 0
    blocks: int = 0
    #: bytes of blocks moved successfully
    bytes: int = 0
    failed_ops: int = 0
    failed_blocks: int = 0
    cancelled_ops: int = 0
    busy_seconds: float = 0.0
    #: ops waiting in the link's queue (not started)
    queued: int = 0
    #: 1 while an op runs on the link
    running: int = 0


@dataclass
class TransferStats:
    links: dict[str, LinkStats]
    #: the SSD store's counters, when there is one
    ssd: dict[str, int] | None
    #: the remote tier's block and call counters, when there is one
    remote: dict[str, int] | None = None


@dataclass(slots=True)
class _Job:
    op: TransferOp
    #: parent key of each block, for the SSD store's metadata (CPU->SSD only)
    parents: list[Hashable | None] | None
    #: CUDA event marking the engine's work queued before submission (GPU links on CUDA only)
    ready: object | None


class TransferEngine:
    """``DataPlane`` over real memory and files; see the module docstring for the threading contract."""

    def __init__(
        self,
        pool: CpuPool,
        ssd: SsdStore | None = None,
        *,
        remote: RemoteTier | None = None,
        parent_of: Callable[[Hashable], Hashable | None] = lambda key: None,
        backend: str = "auto",
    ) -> None:
        if ssd is not None and ssd.block_bytes != pool.block_bytes:
            raise ValueError(f"SSD blocks of {ssd.block_bytes} bytes but CPU pool slots of {pool.block_bytes}")
        if remote is not None and remote.block_bytes != pool.block_bytes:
            raise ValueError(f"remote blocks of {remote.block_bytes} bytes but CPU pool slots of {pool.block_bytes}")
        if remote is not None and pool.tail_bytes != TRAILER_BYTES:
            raise ValueError(f"a remote tier needs CPU pool rows with a {TRAILER_BYTES}-byte tail for its trailers, "
                             f"got {pool.tail_bytes}")
        self.pool = pool
        self.ssd = ssd
        self.remote = remote
        self.backend = backend
        self._parent_of = parent_of
        self._layers: list[torch.Tensor] | None = None
        self._streams: dict[str, object] = {}
        self._handlers: dict[str, Callable[[_Job], set[Hashable]]] = {
            GPU_TO_CPU: self._gather, CPU_TO_GPU: self._scatter,
        }
        if ssd is not None:
            self._handlers |= {CPU_TO_SSD: self._write_ssd, SSD_TO_CPU: self._read_ssd}
        if remote is not None:
            remote.attach(pool.memory)
            self._handlers |= {CPU_TO_REMOTE: self._write_remote, REMOTE_TO_CPU: self._read_remote}
        self._cv = threading.Condition()
        self._queues: dict[str, deque[_Job]] = {link: deque() for link in self._handlers}
        self._stats = {link: LinkStats() for link in self._handlers}
        self._pending: set[int] = set()  # submitted, not yet finished (queued or running)
        self._done: list[tuple[int, list[Hashable]]] = []
        self._logged: set[str] = set()
        #: CPU row -> remote gets past their deadline that may still write into it
        self._fenced: dict[int, int] = {}
        #: CPU row -> the sealing of the block last gathered into it (remote tier only)
        self._seals: dict[int, Future] = {}
        self._sealer = ThreadPoolExecutor(1, thread_name_prefix="flexkv-seal") if remote is not None else None
        self._stopping = False
        self._workers = [
            threading.Thread(target=self._work, args=(link,), name=f"flexkv-xfer-{link}", daemon=True)
            for link in self._handlers
        ]
        for worker in self._workers:
            worker.start()

    # -------------------------------------------------------------- set-up

    def register_kv_caches(self, layers: Sequence[torch.Tensor]) -> kernels.KVLayout:
        """The engine's per-layer KV tensors; their block size must match the pool's."""
        layout = kernels.KVLayout.from_layers(layers)
        if layout.block_bytes != self.pool.block_bytes:
            raise ValueError(
                f"KV caches hold {layout.block_bytes} bytes per block (all layers) but the CPU pool was sized "
                f"for {self.pool.block_bytes}"
            )
        if layout.device.type == "cuda":
            self._streams = {link: torch.cuda.Stream(layout.device) for link in GPU_LINKS}
        self._layers = list(layers)
        return layout

    # ----------------------------------------------------------- data plane

    def submit(self, op: TransferOp) -> None:
        """Queue an op on its link's worker; never blocks. Unknown links fail the op (reported by ``poll``)."""
        parents = [self._parent_of(key) for key in op.keys] if op.link == CPU_TO_SSD else None
        ready = None
        if op.link in self._streams:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self._layers[0].device))
        with self._cv:
            self._pending.add(op.op_id)
            if op.link not in self._queues:
                self._log_once(f"no-link-{op.link}", logging.ERROR, "no %s link in this data plane: op %d fails",
                               op.link, op.op_id)
                self._finish(op, set(op.keys), link=None)
                return
            self._queues[op.link].append(_Job(op, parents, ready))
            self._cv.notify_all()

    def cancel(self, op_id: int) -> bool:
        """Drop an op that has not started; True if it will never run (no completion is reported for it)."""
        with self._cv:
            for link, queue in self._queues.items():
                job = next((j for j in queue if j.op.op_id == op_id), None)
                if job is not None:
                    queue.remove(job)
                    self._pending.discard(op_id)
                    self._stats[link].cancelled_ops += 1
                    self._cv.notify_all()
                    return True
        return False

    def release(self, tier: TierKind, slots: list[int]) -> None:
        """The control plane evicted or dropped blocks of a slower tier: the SSD store
        tombstones them (one small log append) so a restart does not revive them.
        The remote store is left alone: other engines may still use the blocks, and
        it evicts on its own."""
        if tier == TierKind.SSD and self.ssd is not None:
            self.ssd.forget(list(slots))

    def poll(self) -> list[tuple[int, list[Hashable]]]:
        """Finished ops as ``(op_id, failed_keys)``, for the control-plane thread to pass to ``manager.complete``."""
        with self._cv:
            done, self._done = self._done, []
        return done

    def wait(self, op_ids: Iterable[int], timeout: float | None = None) -> bool:
        """Block until the given ops are finished (or cancelled); False on timeout."""
        ids = set(op_ids)
        with self._cv:
            return self._cv.wait_for(lambda: self._pending.isdisjoint(ids), timeout)

    def flush(self, timeout: float | None = None) -> bool:
        """Block until every submitted op is finished and every gathered block sealed; False on timeout."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._pending and not self._seals, timeout)

    @property
    def busy(self) -> bool:
        with self._cv:
            return bool(self._pending or self._seals)

    def shutdown(self) -> None:
        """Stop the workers after their current op and close the SSD store; queued ops are abandoned."""
        with self._cv:
            if self._stopping:
                return
            self._stopping = True
            abandoned = sum(len(q) for q in self._queues.values())
            self._cv.notify_all()
        if abandoned:
            log.warning("transfer engine shut down with %d ops still queued; they never run", abandoned)
        for worker in self._workers:
            worker.join()
        if self._sealer is not None:
            self._sealer.shutdown()
        if self.ssd is not None:
            self.ssd.close()
        if self.remote is not None:
            self.remote.close()

    # -------------------------------------------------------------- workers

    def _work(self, link: str) -> None:
        queue, stats, handler = self._queues[link], self._stats[link], self._handlers[link]
        while True:
            with self._cv:
                self._cv.wait_for(lambda: queue or self._stopping)
                if self._stopping:
                    return
                job = queue.popleft()
                stats.running = 1
            started = time.perf_counter()
            try:
                failed = self._run_unfenced(handler, job)
            except Exception:  # a broken op must not kill the link: fail its blocks, keep serving
                self._log_once(f"crash-{link}", logging.ERROR, "%s op %d failed", link, job.op.op_id, exc_info=True)
                failed = set(job.op.keys)
            with self._cv:
                stats.running = 0
                stats.busy_seconds += time.perf_counter() - started
                self._finish(job.op, failed, link)

    def _run_unfenced(self, handler: Callable[[_Job], set[Hashable]], job: _Job) -> set[Hashable]:
        """Run ``handler`` on the op's blocks whose CPU destination row is not fenced; the others fail."""
        op = job.op
        if op.dst != TierKind.CPU:
            return handler(job)
        with self._cv:
            fenced = {i for i, slot in enumerate(op.dst_slots) if slot in self._fenced}
        if not fenced:
            return handler(job)
        self._log_once("fenced", logging.WARNING, "%s op %d: %d blocks fail, their CPU rows may still receive a "
                       "remote get that timed out", op.link, op.op_id, len(fenced))
        kept = [i for i in range(len(op.keys)) if i not in fenced]
        failed = {op.keys[i] for i in fenced}
        if kept:
            subset = replace(op, keys=[op.keys[i] for i in kept], src_slots=[op.src_slots[i] for i in kept],
                             dst_slots=[op.dst_slots[i] for i in kept])
            failed |= handler(replace(job, op=subset))
        return failed

    def _fence(self, rows: list[int], straggler: Future) -> None:
        """Keep ``rows`` out of use until ``straggler``, a get that may still write into them, has ended."""
        with self._cv:
            for row in rows:
                self._fenced[row] = self._fenced.get(row, 0) + 1
        straggler.add_done_callback(lambda _: self._unfence(rows))

    def _unfence(self, rows: list[int]) -> None:
        with self._cv:
            for row in rows:
                left = self._fenced.pop(row) - 1
                if left:
                    self._fenced[row] = left

    def _finish(self, op: TransferOp, failed: set[Hashable], link: str | None) -> None:
        """Record an op's end (caller holds the condition) and wake waiters."""
        if link is not None:
            stats = self._stats[link]
            moved = len(op.keys) - len(failed)
            stats.ops += 1
            stats.blocks += moved
            stats.bytes += moved * op.block_bytes
            stats.failed_ops += bool(failed)
            stats.failed_blocks += len(failed)
        self._pending.discard(op.op_id)
        self._done.append((op.op_id, [k for k in op.keys if k in failed]))
        self._cv.notify_all()

    def _gpu_side(self, link: str, job: _Job) -> contextlib.AbstractContextManager:
        """On CUDA: the link's stream, ordered after the engine's work at submission; else nothing."""
        stream = self._streams.get(link)
        if stream is None:
            return contextlib.nullcontext()
        stream.wait_event(job.ready)
        return torch.cuda.stream(stream)

    def _engine_layers(self) -> list[torch.Tensor]:
        if self._layers is None:
            raise RuntimeError("no KV caches registered: call register_kv_caches before moving engine blocks")
        return self._layers

    def _gather(self, job: _Job) -> set[Hashable]:
        op = job.op
        with self._gpu_side(GPU_TO_CPU, job):
            kernels.gather_blocks(self._engine_layers(), op.src_slots, self.pool.tensor, op.dst_slots, self.backend)
        self._synchronize(GPU_TO_CPU)
        if self._sealer is not None:
            self._seal_later(list(op.dst_slots), list(op.keys))
        return set()

    def _seal_later(self, rows: list[int], keys: list[Hashable]) -> None:
        """Hash the rows into their trailers on the sealer thread; writes out of them wait (``_await_seals``)."""
        with self._cv:
            sealing = self._sealer.submit(self.remote.codec.seal, self.pool.rows_with_tails(rows), keys)
            for row in rows:
                self._seals[row] = sealing
        sealing.add_done_callback(lambda done: self._sealed(rows, done))

    def _sealed(self, rows: list[int], sealing: Future) -> None:
        with self._cv:
            for row in rows:
                if self._seals.get(row) is sealing:  # not yet another block's
                    del self._seals[row]
            self._cv.notify_all()

    def _await_seals(self, rows: Sequence[int]) -> None:
        with self._cv:
            pending = {self._seals[row] for row in rows if row in self._seals}
        for sealing in pending:
            sealing.result()

    def _scatter(self, job: _Job) -> set[Hashable]:
        op = job.op
        with self._gpu_side(CPU_TO_GPU, job):
            kernels.scatter_blocks(self.pool.tensor, op.src_slots, self._engine_layers(), op.dst_slots, self.backend)
        self._synchronize(CPU_TO_GPU)
        return set()

    def _synchronize(self, link: str) -> None:
        stream = self._streams.get(link)
        if stream is not None:
            stream.synchronize()

    def _write_ssd(self, job: _Job) -> set[Hashable]:
        op = job.op
        checksums = None
        if self.remote is not None:  # the rows' trailers carry their checksums
            self._await_seals(op.src_slots)
            checksums = self.remote.codec.carried(self.pool.rows_with_tails(op.src_slots), op.keys)
        ok = self.ssd.write(op.dst_slots, op.keys, job.parents, self.pool.rows(op.src_slots), checksums)
        return {key for key, good in zip(op.keys, ok) if not good}

    def _read_ssd(self, job: _Job) -> set[Hashable]:
        op = job.op
        if self.remote is not None:  # a late seal of the rows' last block must not land on this one's trailer
            self._await_seals(op.dst_slots)
        ok = self.ssd.read(op.src_slots, op.keys, self.pool.rows(op.dst_slots))
        if self.remote is not None:  # the read verified these checksums: seal the rows with them
            read = [i for i, good in enumerate(ok) if good]
            checksums = self.ssd.checksums([op.src_slots[i] for i in read])
            self.remote.codec.seal(self.pool.rows_with_tails([op.dst_slots[i] for i in read]),
                                   [op.keys[i] for i in read], checksums)
        return {key for key, good in zip(op.keys, ok) if not good}

    def _write_remote(self, job: _Job) -> set[Hashable]:
        op = job.op
        self._await_seals(op.src_slots)
        stored = self.remote.write(op.keys, self.pool.rows_with_tails(op.src_slots))
        return {key for key, good in zip(op.keys, stored) if not good}

    def _read_remote(self, job: _Job) -> set[Hashable]:
        op = job.op
        self._await_seals(op.dst_slots)
        hits, stragglers = self.remote.read(op.keys, self.pool.rows_with_tails(op.dst_slots))
        for straggler in stragglers:
            self._fence(list(op.dst_slots), straggler)
        return {key for key, good in zip(op.keys, hits) if not good}

    def _log_once(self, what: str, level: int, message: str, *args, exc_info: bool = False) -> None:
        first = what not in self._logged
        self._logged.add(what)
        log.log(level if first else logging.DEBUG, message, *args, exc_info=exc_info)

    # -------------------------------------------------------------- metrics

    def stats(self) -> TransferStats:
        """A consistent snapshot of per-link counters, queue depths and the SSD store's counters."""
        with self._cv:
            links = {}
            for link, stats in self._stats.items():
                links[link] = LinkStats(**asdict(stats))
                links[link].queued = len(self._queues[link])
        return TransferStats(links, self.ssd.snapshot().as_dict() if self.ssd is not None else None,
                             self.remote.snapshot() if self.remote is not None else None)

    def prometheus_text(self) -> str:
        """The stats in Prometheus text exposition format (for a ``/metrics`` endpoint)."""
        snapshot = self.stats()
        lines: list[str] = []
        gauges = {"queued", "running"}
        for field in LinkStats.__dataclass_fields__:
            kind = "gauge" if field in gauges else "counter"
            name = f"flexkv_transfer_{field}" + ("" if kind == "gauge" else "_total")
            lines += [f"# HELP {name} Transfer engine: {field.replace('_', ' ')} per link.", f"# TYPE {name} {kind}"]
            for link, stats in snapshot.links.items():
                src, dst = link.split("->")
                lines.append(f'{name}{{src="{src}",dst="{dst}"}} {getattr(stats, field)}')
        for store, counters in (("ssd", snapshot.ssd), ("remote", snapshot.remote)):
            for field, value in (counters or {}).items():
                kind = "gauge" if field == "breaker_open" else "counter"
                name = f"flexkv_{store}_{field}" + ("" if kind == "gauge" else "_total")
                lines += [f"# HELP {name} {store.upper()} store: {field.replace('_', ' ')}.", f"# TYPE {name} {kind}",
                          f"{name} {value}"]
        return "\n".join(lines) + "\n"
