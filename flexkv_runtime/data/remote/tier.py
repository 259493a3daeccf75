"""The REMOTE tier's data side: one namespace's blocks between the CPU pool and a shared store.

``TransferEngine``'s CPU->REMOTE and REMOTE->CPU workers call ``write`` and
``read`` with the op's keys and its pool rows with their tails (``CpuPool`` made
with ``tail_bytes=TRAILER_BYTES``): a block and its trailer are one buffer. A
slot of the REMOTE tier is only the control plane's bookkeeping; the store
knows a block by its namespaced key (``trailer.remote_key``). Ops are cut into batches of at most ``batch_bytes``
(each store call must fit in the timeout), and the next batch's call is on
its way while the last one's checksums are checked; once the circuit breaker
opens, the rest of an op fails at once.

Writes are best effort: a refused or failed put just leaves the block out of
the tier. Reads check every trailer and checksum: anything but a whole, matching
block of this namespace is a miss, and the control plane drops it from the tier.
"""
from __future__ import annotations

import threading
from collections.abc import Hashable, Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass

import numpy as np

from flexkv_runtime.control.keys import Namespace
from flexkv_runtime.data.remote.backend import Status
from flexkv_runtime.data.remote.guard import Call, GuardedBackend
from flexkv_runtime.data.remote.trailer import TRAILER_BYTES, TrailerCodec, remote_key

#: at most this many blocks per store call, whatever their size
MAX_BATCH_KEYS = 1024


@dataclass
class RemoteStats:
    puts_stored: int = 0
    #: puts the store would not take (full)
    puts_refused: int = 0
    puts_failed: int = 0
    gets_hit: int = 0
    #: gets of blocks the store no longer holds (evicted, expired, never there)
    gets_missing: int = 0
    #: values that were there but failed the trailer or checksum check
    gets_corrupt: int = 0
    gets_failed: int = 0
    bytes_put: int = 0
    bytes_got: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class RemoteTier:
    """Thread-safe: both REMOTE links of a ``TransferEngine`` call it at once; it closes its store with it."""

    def __init__(self, store: GuardedBackend, namespace: Namespace, block_bytes: int, *,
                 batch_bytes: int = 64 << 20) -> None:
        self.store = store
        self.namespace = namespace
        self.block_bytes = block_bytes
        self.codec = TrailerCodec(namespace, block_bytes)
        self.batch_keys = max(1, min(MAX_BATCH_KEYS, batch_bytes // block_bytes))
        self._lock = threading.Lock()
        self._stats = RemoteStats()

    def attach(self, pool_memory: np.ndarray) -> None:
        """The CPU pool's memory (``CpuPool.memory``), which gets land in and puts send from."""
        self.store.register(pool_memory)

    # ------------------------------------------------------------------ I/O

    def write(self, keys: Sequence[int], values: Sequence[np.ndarray]) -> list[bool]:
        """Offer blocks to the store (each value a pool row and its tail); True where it stored them."""
        self._check(values)
        return self._pipelined(keys, values, self._start_write, self._finish_write)

    def read(self, keys: Sequence[int], values: Sequence[np.ndarray]) -> tuple[list[bool], list[Future]]:
        """Fetch blocks into ``values`` (pool rows and their tails); True where a whole, matching block arrived.

        Also returns the calls abandoned at their deadline: until they end they
        may still write into ``values``, which must not be reused before.
        """
        self._check(values)
        stragglers: list[Future] = []

        def finish(keys: Sequence[int], values: Sequence[np.ndarray], call: Call) -> list[bool]:
            hits, straggler = self._finish_read(keys, values, call)
            if straggler is not None:
                stragglers.append(straggler)
            return hits

        return self._pipelined(keys, values, self._start_read, finish), stragglers

    def _check(self, values: Sequence[np.ndarray]) -> None:
        wanted = self.block_bytes + TRAILER_BYTES
        if any(value.nbytes != wanted for value in values):
            raise ValueError(f"remote values are a {self.block_bytes}-byte block and its {TRAILER_BYTES}-byte "
                             f"trailer: got buffers of {sorted({value.nbytes for value in values})} bytes")

    def _pipelined(self, keys: Sequence[int], values: Sequence[np.ndarray], start, finish) -> list[bool]:
        """Run the op in batches, each one's store call on its way while the one before is checked.

        Batches are as large as ``batch_bytes`` allows: cutting an op finer to hide its checksums
        behind transfers made Mooncake slower (two calls in flight contend; each call costs a little)."""
        done: list[bool] = []
        ahead = None
        for first in range(0, len(keys), self.batch_keys):
            batch = slice(first, first + self.batch_keys)
            call = start(keys[batch], values[batch])
            if ahead is not None:
                done += finish(*ahead)
            ahead = (keys[batch], values[batch], call)
        if ahead is not None:
            done += finish(*ahead)
        return done

    def _start_write(self, keys: Sequence[int], values: Sequence[np.ndarray]) -> Call:
        self.codec.seal_unsealed(values, keys)
        return self.store.start_put_from(self._names(keys), values)

    def _finish_write(self, keys: Sequence[int], values: Sequence[np.ndarray], call: Call) -> list[bool]:
        statuses = self.store.answer(call).statuses
        stored, refused = statuses.count(Status.OK), statuses.count(Status.REFUSED)
        self._count(puts_stored=stored, puts_refused=refused, puts_failed=len(keys) - stored - refused,
                    bytes_put=stored * self.block_bytes)
        return [s is Status.OK for s in statuses]

    def _start_read(self, keys: Sequence[int], values: Sequence[np.ndarray]) -> Call:
        return self.store.start_get_into(self._names(keys), values)

    def _finish_read(self, keys: Sequence[int], values: Sequence[np.ndarray],
                     call: Call) -> tuple[list[bool], Future | None]:
        answer = self.store.answer(call)
        statuses = answer.statuses
        got = [i for i, status in enumerate(statuses) if status is Status.OK]
        matching = self.codec.matching([values[i] for i in got], [keys[i] for i in got])
        for i, match in zip(got, matching):
            if not match:
                statuses[i] = Status.CORRUPT
        counts = dict.fromkeys(_READ_COUNTERS.values(), 0)
        for status in statuses:
            counts[_READ_COUNTERS[status]] += 1
        hits = [status is Status.OK for status in statuses]
        self._count(**counts, bytes_got=counts["gets_hit"] * self.block_bytes)
        return hits, answer.straggler

    def _names(self, keys: Sequence[Hashable]) -> list[str]:
        return [remote_key(self.namespace, key) for key in keys]

    # -------------------------------------------------------------- metrics

    def _count(self, **counts: int) -> None:
        with self._lock:
            for name, n in counts.items():
                setattr(self._stats, name, getattr(self._stats, name) + n)

    def snapshot(self) -> dict[str, int]:
        """This tier's block counters plus the store's call counters (timeouts, breaker)."""
        with self._lock:
            stats = self._stats.as_dict()
        return stats | self.store.snapshot().as_dict() | {"breaker_open": int(self.store.breaker.is_open)}

    def close(self) -> None:
        self.store.close()
        self.codec.close()


_READ_COUNTERS = {Status.OK: "gets_hit", Status.MISSING: "gets_missing", Status.CORRUPT: "gets_corrupt",
                  Status.FAILED: "gets_failed", Status.REFUSED: "gets_failed"}
