"""Finding blocks that other engines put in the shared store.

An engine's CacheManager only knows the blocks it stored itself. Before it
answers a lookup, the caller (``KVRuntime.discover``, or the vLLM connector's
scheduler) asks here about the request's blocks past what the manager holds:
a background thread asks the store which of them exist (one batch ``exists``
call, bounded by the store's timeout), and the next ``find`` (or ``settle``)
on the control-plane thread adopts the leading run that exists into the
manager's REMOTE tier. From then on they are ordinary REMOTE blocks: loads
promote them through the CPU tier, and one the store has evicted meanwhile is
a failed read, dropped from the tier.

With tensor parallelism each rank keeps its own slice under its own namespace;
give every rank's namespace, and a block counts only when all ranks have it.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

from flexkv_runtime.control.index import TierKind
from flexkv_runtime.control.keys import Namespace
from flexkv_runtime.control.manager import CacheManager
from flexkv_runtime.data.remote.backend import Status
from flexkv_runtime.data.remote.guard import GuardedBackend
from flexkv_runtime.data.remote.trailer import remote_key

log = logging.getLogger(__name__)

REMOTE = TierKind.REMOTE


@dataclass(slots=True)
class _Ask:
    #: index in the request's keys of the first block asked about, and the parent key before it
    start: int
    parent: Hashable | None
    keys: list[Hashable]
    asked_at: float
    #: leading blocks the store holds; set by the discovery thread
    found: int | None = None
    #: blocks adopted into the manager; set once settled
    adopted: int | None = None


class RemoteDiscovery:
    """One ask per request (until ``forget``), answered in the background and adopted on the caller's thread."""

    def __init__(self, store: GuardedBackend, namespaces: Sequence[Namespace], *, max_blocks: int = 512,
                 remember: int = 4096, clock: Callable[[], float] = time.monotonic) -> None:
        if not namespaces:
            raise ValueError("remote discovery needs at least one namespace")
        self.store = store
        self.namespaces = list(namespaces)
        self.max_blocks = max_blocks
        self.remember = remember
        self.clock = clock
        #: an ask not answered by then is settled as a miss (the store call itself is bounded by the timeout;
        #: this also bounds the wait behind other asks)
        self.patience_s = 2 * store.timeout_s
        self.stats = {"asks": 0, "blocks_found": 0, "blocks_adopted": 0, "asks_given_up": 0}
        self._asks: OrderedDict[Hashable, _Ask] = OrderedDict()
        self._queue: deque[_Ask] = deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="flexkv-remote-discovery", daemon=True)
        self._thread.start()

    # ------------------------------------------------------- control thread

    def find(self, manager: CacheManager, request_id: Hashable, keys: Sequence[Hashable]) -> int | None:
        """Blocks of ``keys`` adopted from the store for this request, or None while the store is being asked.

        The first call for a request starts the ask and returns None (unless
        the manager already holds every block, or the circuit breaker refuses
        calls now: then 0; past its cooldown the ask is the probe). Later
        calls return None until the answer is in, then adopt it and return
        the number of blocks adopted into the REMOTE tier (0 when the store
        had none, did not answer in time, or the tier is full); from then on
        they return that number without asking again.
        """
        ask = self._asks.get(request_id)
        if ask is None:
            start = _known_prefix(manager, keys)
            wanted = list(keys[start : start + self.max_blocks])
            if not wanted or REMOTE not in manager.tiers or self.store.breaker.refusing:
                return 0
            ask = self._ask(request_id, start, keys[start - 1] if start else None, wanted)
            return None
        if ask.adopted is None:
            self._settle(manager, ask)
        return ask.adopted

    def settle(self, manager: CacheManager) -> int:
        """Adopt every answer that is in (for callers that poll rather than ask again); returns blocks adopted."""
        adopted = 0
        for ask in list(self._asks.values()):
            if ask.adopted is None:
                adopted += self._settle(manager, ask) or 0
        return adopted

    def forget(self, request_id: Hashable) -> None:
        """The request is over: a later request with the same id asks again."""
        self._asks.pop(request_id, None)

    def _ask(self, request_id: Hashable, start: int, parent: Hashable | None, keys: list[Hashable]) -> _Ask:
        ask = self._asks[request_id] = _Ask(start, parent, keys, self.clock())
        while len(self._asks) > self.remember:
            self._asks.popitem(last=False)
        self.stats["asks"] += 1
        with self._cv:
            self._queue.append(ask)
            self._cv.notify()
        return ask

    def _settle(self, manager: CacheManager, ask: _Ask) -> int | None:
        found = ask.found
        if found is None:
            if self.clock() - ask.asked_at < self.patience_s:
                return None
            self.stats["asks_given_up"] += 1
            found = 0
        ask.adopted = _adopt(manager, ask.parent, ask.keys[:found]) if found else 0
        self.stats["blocks_adopted"] += ask.adopted
        return ask.adopted

    # ---------------------------------------------------- discovery thread

    def _work(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._queue or self._stopping)
                if self._stopping:
                    return
                ask = self._queue.popleft()
            names = [remote_key(ns, key) for key in ask.keys for ns in self.namespaces]
            statuses = self.store.exists(names).statuses
            ranks = len(self.namespaces)
            found = 0
            while found < len(ask.keys) and all(
                s is Status.OK for s in statuses[found * ranks : (found + 1) * ranks]
            ):
                found += 1
            self.stats["blocks_found"] += found
            ask.found = found

    def close(self) -> None:
        """Stop the thread (it finishes its current ask, bounded by the store's timeout); the store stays open."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(self.patience_s)


def _known_prefix(manager: CacheManager, keys: Sequence[Hashable]) -> int:
    """Leading blocks the manager holds in some tier (complete or in flight): nothing to ask about."""
    get = manager.index.get
    for i, key in enumerate(keys):
        block = get(key)
        if block is None or not block.slots:
            return i
    return len(keys)


def _adopt(manager: CacheManager, parent: Hashable | None, keys: Sequence[Hashable]) -> int:
    """Take ``keys`` (a chain continuing ``parent``) into the REMOTE tier, as far as it has free slots.

    Blocks the manager learnt of meanwhile are kept as they are; the parent is
    passed along (with no slot) only so that the chain links to it.
    """
    get = manager.index.get
    free = manager.tiers[REMOTE].free_slots
    slots = iter(free[: len(keys)])
    entries = [(parent, None, -1)] if parent is not None and get(parent) is not None else []
    previous = parent
    for key in keys:
        if get(key) is not None:
            entries.append((key, previous, -1))
        else:
            slot = next(slots, None)
            if slot is None:
                break
            entries.append((key, previous, slot))
        previous = key
    return manager.adopt(REMOTE, entries)
