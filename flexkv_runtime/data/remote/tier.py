"""The REMOTE tier's data side: one namespace's blocks between the CPU pool and a shared store.

``TransferEngine``'s CPU->REMOTE and REMOTE->CPU workers call ``write`` and
``read`` with the op's keys and pool rows. A slot of the REMOTE tier is only the
control plane's bookkeeping; the store knows a block by its namespaced key
(``trailer.remote_key``). Ops are cut into batches of at most ``batch_bytes``
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
from flexkv_runtime.data.remote.guard import CALL_THREADS, Answer, Call, GuardedBackend
from flexkv_runtime.data.remote.trailer import TRAILER_BYTES, TrailerCodec, remote_key

#: at most this many blocks per store call, whatever their size
MAX_BATCH_KEYS = 1024
#: a batch on its way: its trailer slot set, the trailers, the store call
_Started = tuple[int, list[np.ndarray], Call]


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


class _TrailerSlots:
    """Registered trailer buffers, one set per store call in flight; a straggler keeps its set until it ends."""

    def __init__(self, store: GuardedBackend, per_set: int, sets: int) -> None:
        self.per_set = per_set
        self._arena = np.zeros((sets, per_set, TRAILER_BYTES), np.uint8)
        store.register(self._arena)
        self._free = list(range(sets))
        self._lock = threading.Lock()

    def take(self) -> tuple[int, np.ndarray] | None:
        with self._lock:
            if not self._free:
                return None
            index = self._free.pop()
        return index, self._arena[index]

    def give_back(self, index: int, answer: Answer) -> None:
        if answer.straggler is None:
            self._give(index)
        else:
            answer.straggler.add_done_callback(lambda _: self._give(index))

    def _give(self, index: int) -> None:
        with self._lock:
            self._free.append(index)


class RemoteTier:
    """Thread-safe: both REMOTE links of a ``TransferEngine`` call it at once; it closes its store with it."""

    def __init__(self, store: GuardedBackend, namespace: Namespace, block_bytes: int, *,
                 batch_bytes: int = 64 << 20) -> None:
        self.store = store
        self.namespace = namespace
        self.block_bytes = block_bytes
        self.codec = TrailerCodec(namespace, block_bytes)
        self.batch_keys = max(1, min(MAX_BATCH_KEYS, batch_bytes // block_bytes))
        self._trailers = _TrailerSlots(store, self.batch_keys, CALL_THREADS + 2)
        self._lock = threading.Lock()
        self._stats = RemoteStats()

    def attach(self, pool_rows: np.ndarray) -> None:
        """The CPU pool's memory, which gets land in and puts send from."""
        self.store.register(pool_rows)

    # ------------------------------------------------------------------ I/O

    def write(self, keys: Sequence[int], rows: Sequence[np.ndarray]) -> list[bool]:
        """Offer blocks to the store; True where it stored them."""
        return self._pipelined(keys, rows, self._start_write, self._finish_write)

    def read(self, keys: Sequence[int], rows: Sequence[np.ndarray]) -> tuple[list[bool], list[Future]]:
        """Fetch blocks into ``rows``; True where a whole, matching block arrived.

        Also returns the calls abandoned at their deadline: until they end they
        may still write into ``rows``, which must not be reused before.
        """
        stragglers: list[Future] = []

        def finish(keys: Sequence[int], rows: Sequence[np.ndarray], started: _Started | None) -> list[bool]:
            hits, straggler = self._finish_read(keys, rows, started)
            if straggler is not None:
                stragglers.append(straggler)
            return hits

        return self._pipelined(keys, rows, self._start_read, finish), stragglers

    def _pipelined(self, keys: Sequence[int], rows: Sequence[np.ndarray], start, finish) -> list[bool]:
        """Run the op in batches, each one's store call on its way while the one before is checked."""
        done: list[bool] = []
        ahead = None
        for first in range(0, len(keys), self.batch_keys):
            batch = slice(first, first + self.batch_keys)
            started = start(keys[batch], rows[batch])
            if ahead is not None:
                done += finish(*ahead)
            ahead = (keys[batch], rows[batch], started)
        if ahead is not None:
            done += finish(*ahead)
        return done

    def _start_write(self, keys: Sequence[int], rows: Sequence[np.ndarray]) -> _Started | None:
        slots = self._trailers.take()
        if slots is None:
            return None
        index, trailers = slots
        self.codec.seal(trailers, keys, rows)
        trailers = list(trailers[: len(keys)])
        return index, trailers, self.store.start_put_from(self._names(keys), rows, trailers)

    def _finish_write(self, keys: Sequence[int], rows: Sequence[np.ndarray],
                      started: _Started | None) -> list[bool]:
        if started is None:  # no trailer slots left: stragglers hold them all
            self._count(puts_failed=len(keys))
            return [False] * len(keys)
        index, _, call = started
        answer = self.store.answer(call)
        self._trailers.give_back(index, answer)
        statuses = answer.statuses
        stored, refused = statuses.count(Status.OK), statuses.count(Status.REFUSED)
        self._count(puts_stored=stored, puts_refused=refused, puts_failed=len(keys) - stored - refused,
                    bytes_put=stored * self.block_bytes)
        return [s is Status.OK for s in statuses]

    def _start_read(self, keys: Sequence[int], rows: Sequence[np.ndarray]) -> _Started | None:
        slots = self._trailers.take()
        if slots is None:
            return None
        index, trailers = slots
        trailers = list(trailers[: len(keys)])
        return index, trailers, self.store.start_get_into(self._names(keys), rows, trailers)

    def _finish_read(self, keys: Sequence[int], rows: Sequence[np.ndarray],
                     started: _Started | None) -> tuple[list[bool], Future | None]:
        if started is None:  # no trailer slots left: stragglers hold them all
            self._count(gets_failed=len(keys))
            return [False] * len(keys), None
        index, trailers, call = started
        answer = self.store.answer(call)
        statuses = answer.statuses
        got = [i for i, status in enumerate(statuses) if status is Status.OK]
        matching = self.codec.matching([trailers[i] for i in got], [keys[i] for i in got], [rows[i] for i in got])
        for i, match in zip(got, matching):
            if not match:
                statuses[i] = Status.CORRUPT
        self._trailers.give_back(index, answer)
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
