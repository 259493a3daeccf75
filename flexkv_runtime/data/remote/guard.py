"""Bounded calls to a store that may be slow, dead or coming back.

A remote store that hangs must not hang the engine: every backend call runs on
a small pool of threads and the caller waits at most ``timeout_s``; past that
the call counts as failed (every key ``FAILED``: a miss) and is left to finish
on its own. Such a *straggler* may still write into the buffers it was given,
so its future is handed back to the caller, who must keep those buffers out of
use until it ends (``TransferEngine`` fences the CPU rows).

A circuit breaker stops asking a store that keeps failing: after
``failures`` failed calls in a row it opens, and calls fail at once, without
touching the store, until ``cooldown_s`` has passed; then one call goes
through as a probe (half-open), and its outcome closes the breaker or opens it
for another cooldown. "Later" is a timestamp compared on the next call, never a
sleep. The backends' clients reconnect by themselves, so a probe that finds the
store back simply succeeds.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures import wait as wait_for_futures
from dataclasses import asdict, dataclass

import numpy as np

from flexkv_runtime.data.remote.backend import RemoteBackend, Status

log = logging.getLogger(__name__)

#: threads that run backend calls: the two transfer links, discovery, and room for stragglers
CALL_THREADS = 6


class CircuitBreaker:
    """Closed -> open after ``failures`` failures in a row -> one probe after ``cooldown_s`` -> closed or open."""

    def __init__(self, failures: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if failures < 1 or cooldown_s < 0:
            raise ValueError(f"circuit breaker needs failures >= 1 and cooldown_s >= 0, got {failures}, {cooldown_s}")
        self.failures = failures
        self.cooldown_s = cooldown_s
        self.clock = clock
        self._lock = threading.Lock()
        self._failed = 0
        self._opened_at: float | None = None
        self._probing = False
        #: times the breaker opened (closed -> open), for metrics
        self.opened = 0

    @property
    def is_open(self) -> bool:
        with self._lock:
            return self._opened_at is not None

    @property
    def refusing(self) -> bool:
        """Whether a call now would be refused without reaching the store: open and cooling down, or a probe
        is out. Unlike ``allow`` it claims nothing, so a caller may check it before handing a call on."""
        with self._lock:
            return self._opened_at is not None and (self._probing or self.clock() - self._opened_at < self.cooldown_s)

    def allow(self) -> bool:
        """Whether a call may go to the store now (in the half-open state, only the one probe may)."""
        with self._lock:
            if self._opened_at is None:
                return True
            if self._probing or self.clock() - self._opened_at < self.cooldown_s:
                return False
            self._probing = True
            return True

    def record(self, ok: bool) -> None:
        with self._lock:
            was_probe, self._probing = self._probing, False
            if ok:
                if self._opened_at is not None:
                    log.info("remote store answers again: circuit breaker closed")
                self._failed, self._opened_at = 0, None
                return
            self._failed += 1
            if was_probe or (self._opened_at is None and self._failed >= self.failures):
                if self._opened_at is None:
                    self.opened += 1
                    log.warning("remote store failed %d calls in a row: not asking it for %.1f s",
                                self._failed, self.cooldown_s)
                self._opened_at = self.clock()


@dataclass
class CallStats:
    calls: int = 0
    #: calls that raised or failed every key
    failed_calls: int = 0
    #: calls abandoned at the deadline
    timeouts: int = 0
    #: calls refused at once by the open circuit breaker
    short_circuited: int = 0
    breaker_opens: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(slots=True)
class Answer:
    statuses: list[Status]
    #: the call itself when it outlived its deadline: it may still write into its buffers until it ends
    straggler: Future | None = None


@dataclass(slots=True)
class Call:
    """A call on its way; ``GuardedBackend.answer`` waits for it until its deadline."""

    keys: int
    future: Future | None  # None: refused at once (breaker open, closed)
    deadline: float = 0.0


class GuardedBackend:
    """A ``RemoteBackend`` whose calls end within ``timeout_s``, behind a circuit breaker; thread-safe.

    ``start_*`` hands a call to the pool and returns at once, so a caller can
    have the next batch on its way while it checks the last one; ``answer``
    collects it. The plain methods do both.
    """

    def __init__(self, backend: RemoteBackend, *, timeout_s: float, breaker: CircuitBreaker) -> None:
        if timeout_s <= 0:
            raise ValueError(f"remote timeout_s must be positive, got {timeout_s}")
        self.backend = backend
        self.timeout_s = timeout_s
        self.breaker = breaker
        self._pool = ThreadPoolExecutor(CALL_THREADS, thread_name_prefix=f"flexkv-remote-{backend.name}")
        self._lock = threading.Lock()
        self._stats = CallStats()
        self._logged: set[str] = set()
        self._running: set[Future] = set()
        self._closed = False

    def register(self, buffer: np.ndarray) -> None:
        self.backend.register(buffer)

    def start_get_into(self, keys: Sequence[str], values: Sequence[np.ndarray]) -> Call:
        return self._start(self.backend.get_into, keys, values)

    def start_put_from(self, keys: Sequence[str], values: Sequence[np.ndarray]) -> Call:
        return self._start(self.backend.put_from, keys, values)

    def exists(self, keys: Sequence[str]) -> Answer:
        return self.answer(self._start(self.backend.exists, keys))

    def _start(self, method: Callable[..., list[Status]], keys: Sequence[str], *buffers: Sequence[np.ndarray]) -> Call:
        if not keys:
            return Call(0, None)
        if self._closed or not self.breaker.allow():
            self._count(short_circuited=1)
            return Call(len(keys), None)
        try:
            future = self._pool.submit(method, keys, *buffers)
        except RuntimeError:  # closed meanwhile
            self._settle(False)
            return Call(len(keys), None)
        with self._lock:
            self._running.add(future)
        future.add_done_callback(self._ended)
        return Call(len(keys), future, time.monotonic() + self.timeout_s)

    def answer(self, call: Call) -> Answer:
        """The call's statuses, or every key ``FAILED`` when it was refused, raised or ran past its deadline."""
        failed = [Status.FAILED] * call.keys
        if call.future is None:
            return Answer(failed)
        try:
            statuses = call.future.result(max(0.0, call.deadline - time.monotonic()))
        except FutureTimeout:
            self._log_once("timeout", logging.WARNING, "%s call on %d keys took over %.2f s: counted as failed",
                           self.backend.name, call.keys, self.timeout_s)
            self._settle(False, timeouts=1)
            return Answer(failed, call.future)
        except Exception as exc:  # the store could not answer: a miss for every key, never an engine error
            self._log_once(f"error-{type(exc).__name__}", logging.WARNING, "%s call failed: %s",
                           self.backend.name, exc, exc_info=True)
            self._settle(False)
            return Answer(failed)
        self._settle(any(s is not Status.FAILED for s in statuses))
        return Answer(statuses)

    def _ended(self, future: Future) -> None:
        with self._lock:
            self._running.discard(future)

    def _settle(self, ok: bool, **counts: int) -> None:
        opened_before = self.breaker.opened
        self.breaker.record(ok)
        self._count(calls=1, failed_calls=int(not ok), breaker_opens=self.breaker.opened - opened_before, **counts)

    def _count(self, **counts: int) -> None:
        with self._lock:
            for name, n in counts.items():
                setattr(self._stats, name, getattr(self._stats, name) + n)

    def _log_once(self, what: str, level: int, message: str, *args, exc_info: bool = False) -> None:
        with self._lock:
            first = what not in self._logged
            self._logged.add(what)
        log.log(level if first else logging.DEBUG, message, *args, exc_info=exc_info and first)

    def snapshot(self) -> CallStats:
        with self._lock:
            return CallStats(**self._stats.as_dict())

    def close(self, wait_s: float = 60.0) -> None:
        """Stop taking calls and close the backend once the calls still running (stragglers) have ended.

        A client closed under a running call may crash the process, so after
        ``wait_s`` a backend with calls still running is left open (and logged).
        Idempotent.
        """
        if self._closed:
            return
        self._closed = True
        with self._lock:
            running = set(self._running)
        _, stuck = wait_for_futures(running, wait_s)
        self._pool.shutdown(wait=not stuck, cancel_futures=True)
        if stuck:
            log.error("%d %s calls still running after %.0f s: the client is left open", len(stuck),
                      self.backend.name, wait_s)
            return
        self.backend.close()
