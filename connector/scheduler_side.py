"""The connector's scheduler half: the one CacheManager of the engine and the bookkeeping around it.

vLLM's scheduler asks it which prefix it can serve (``lookup``), hands it the
blocks it allocated (``plan_load``), tells it each step which requests ran
(``plan_store`` of the full blocks they just computed) and which were preempted
or finished. The ops the manager starts are only queued here: they travel to
every worker in the next step's metadata, and come back, one report per
worker, through vLLM's worker metadata, when the manager hears of them
(``complete``). Loads are asynchronous: a request waits, holding its blocks,
until the workers report its load over.

A load larger than the CPU tier goes through it in rounds: the manager pins
every block of a load in the CPU tier, so one round takes what fits and the
next starts when it is done.

With a remote tier, the manager also knows the blocks other engines put in the
shared store: before it answers a request's first lookup, a background thread
asks the store about the blocks past those known here (``RemoteDiscovery``,
one call bounded by the store's timeout), and vLLM is told to ask again
meanwhile. Blocks the store holds join the REMOTE tier and load like any other;
blocks stored here reach the store through the write policy's copies down.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass, field

import connector._vllm_guard  # noqa: F401
from connector.protocol import FlexKVMetadata, FlexKVWorkerMetadata, LoadDone, Recovered
from connector.settings import ConnectorSettings
from flexkv_runtime.control.config import build_manager
from flexkv_runtime.control.index import TierKind
from flexkv_runtime.control.keys import BlockKeyer
from flexkv_runtime.control.manager import RequestDone
from flexkv_runtime.control.ops import OpKind, TransferOp, link_name
from flexkv_runtime.data.remote import RemoteDiscovery, open_store
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.request import Request, RequestStatus

log = logging.getLogger(__name__)

CPU_TO_SSD = link_name(TierKind.CPU, TierKind.SSD)


class OutboundOps:
    """The manager's data plane on the scheduler: ops and releases wait here for the next step's metadata."""

    def __init__(self) -> None:
        self._ops: dict[int, TransferOp] = {}
        self._released: list[tuple[TierKind, list[int]]] = []

    def submit(self, op: TransferOp) -> None:
        self._ops[op.op_id] = op

    def cancel(self, op_id: int) -> bool:
        """Only an op no worker has seen yet can still be dropped."""
        return self._ops.pop(op_id, None) is not None

    def release(self, tier: TierKind, slots: list[int]) -> None:
        self._released.append((tier, list(slots)))

    def take(self) -> tuple[list[TransferOp], list[tuple[TierKind, list[int]]]]:
        """Everything since the last call; releases first on the workers, as they came first here."""
        taken = list(self._ops.values()), self._released
        self._ops, self._released = {}, []
        return taken

    def __len__(self) -> int:
        return len(self._ops) + len(self._released)


@dataclass
class _Load:
    """An asynchronous load of blocks ``[start, end)`` of a request into ``gpu_block_ids``."""

    start: int
    end: int
    #: GPU block of each block index, from 0 (the request's whole block table so far)
    gpu_block_ids: list[int]
    #: tier each block comes from: expected at first, then as planned, round by round
    sources: list[str]
    started: float
    #: first block index not planned yet
    next: int
    failed_at: int | None = None


@dataclass
class _Request:
    request: Request
    keys: list[int] = field(default_factory=list)
    first_lookup: float | None = None
    #: leading blocks vLLM had computed when it last asked for a match
    local_blocks: int = 0
    #: first block not yet offered to the store; -1 until the request is scheduled
    next_store: int = -1
    #: store ops of the request are in flight
    storing: bool = False
    #: finished; vLLM keeps its blocks until its stores are over
    finished: bool = False
    load: _Load | None = None
    #: tokens per hit source of the last load plan (vLLM asks right after it)
    hit_sources: dict[str, int] = field(default_factory=dict)


class FlexKVScheduler:
    def __init__(self, settings: ConnectorSettings, clock=time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        self.tokens_per_block = settings.tokens_per_block
        self.keyer = BlockKeyer(settings.namespace, settings.tokens_per_block)
        self.outbound = OutboundOps()
        cfg = settings.runtime
        self.manager = build_manager(
            # capacities in blocks as the workers count them
            tiers={"cpu": cfg["cpu"], "ssd": cfg.get("ssd"), "remote": cfg.get("remote")},
            eviction=cfg["eviction"],
            admission=cfg["admission"],
            prefetch=cfg["prefetch"],
            write_policy=cfg["write_policy"],
            selective_hits=cfg["selective_hits"],
            data_plane=self.outbound,
            clock=clock,
            block_bytes=settings.block_bytes,
            allow_offline=False,
        )
        self.kv_cache_manager = None  # vLLM's, bound after construction
        self.discovery = None
        if settings.remote_blocks:
            remote = cfg["remote"]
            self.discovery = RemoteDiscovery(open_store(remote), settings.rank_namespaces(),
                                             max_blocks=remote["discovery_max_blocks"], clock=clock)
        self._requests: dict[str, _Request] = {}
        #: op id -> (workers that reported it, failed keys so far)
        self._reports: dict[int, tuple[int, frozenset]] = {}
        #: until every worker has said what its SSD store holds, lookups would miss it
        self._recovered: dict[int, list[Recovered]] | None = {} if settings.ssd_blocks else None
        self._stalled: set[str] = set()
        self._loads_done: dict[str, LoadDone] = {}
        self._stores_done: list[str] = []
        self._preempted: list[str] = []
        self._shipped_busy = False

    # ------------------------------------------------------------- requests

    def _state(self, request: Request) -> _Request:
        """The request's record, its keys extended to every full block it has now (decoding adds blocks)."""
        state = self._requests.get(request.request_id)
        if state is None:
            state = self._requests[request.request_id] = _Request(request)
        hashes = request.block_hashes
        if len(state.keys) < len(hashes):
            state.keys += self.keyer.from_block_hashes(hashes[len(state.keys):])
        return state

    def on_new_request(self, request: Request) -> None:
        state = self._state(request)
        self.manager.on_request_waiting(request.request_id, state.keys)

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        if self._recovered is not None:
            return None, False  # ask again once the SSD tier's blocks are known
        if request.skip_reading_prefix_cache:
            return 0, False
        state = self._state(request)
        if self._discovering(state, num_computed_tokens):
            return None, False  # ask again once the remote store has answered (within its timeout)
        now = self.clock()
        if state.first_lookup is None:
            state.first_lookup = now
        found = self.manager.lookup(state.keys, request_id=request.request_id)
        if self.manager.should_wait(found, now - state.first_lookup):
            return None, False  # the prefetch policy waits for blocks still on their way
        state.local_blocks = num_computed_tokens // self.tokens_per_block
        hit_blocks = found.ready_blocks - state.local_blocks
        return (hit_blocks * self.tokens_per_block, True) if hit_blocks > 0 else (0, False)

    def _discovering(self, state: _Request, num_computed_tokens: int) -> bool:
        """Whether the remote store is still being asked about the request's blocks that vLLM lacks."""
        if self.discovery is None or num_computed_tokens >= len(state.keys) * self.tokens_per_block:
            return False
        return self.discovery.find(self.manager, state.request.request_id, state.keys) is None

    def update_state_after_alloc(self, request: Request, gpu_block_ids: list[int], num_external_tokens: int) -> None:
        if num_external_tokens == 0:
            return
        state = self._state(request)
        start = state.local_blocks
        end = start + num_external_tokens // self.tokens_per_block
        sources = [self._source(key) for key in state.keys[start:end]]
        state.hit_sources = {tier: n * self.tokens_per_block for tier, n in Counter(sources).items()}
        state.load = _Load(start, end, list(gpu_block_ids), sources, self.clock(), next=start)
        self._plan_round(state)

    def _source(self, key: int) -> str:
        """The fastest tier whose copy of a block is complete (a block just planned for promotion is not
        complete in the CPU tier yet: its source is the tier it comes from)."""
        block = self.manager.index.get(key)
        ready = [kind for kind in self.manager.tiers if block is not None and block.ready_in(kind)]
        return TierKind(min(ready)).name if ready else "UNKNOWN"

    def _plan_round(self, state: _Request) -> None:
        """Plan the next round of a load; finish it when nothing more can ever come."""
        load, rid = state.load, state.request.request_id
        planned = self.manager.plan_load(rid, state.keys, load.next, load.gpu_block_ids[load.next:load.end])
        self._stalled.discard(rid)
        if planned:
            for i in range(load.next, load.next + planned):  # a round may evict blocks it was to find in CPU
                load.sources[i - load.start] = self._source(state.keys[i])
            load.next += planned
        elif self.manager.ops_in_flight and self._source(state.keys[load.next]) != "UNKNOWN":
            self._stalled.add(rid)  # the CPU tier is pinned by other transfers: try again next step
        else:
            load.failed_at = load.next
            self._end_load(state)

    def _end_load(self, state: _Request) -> None:
        load, rid = state.load, state.request.request_id
        state.load = None
        self._stalled.discard(rid)
        loaded = (load.failed_at if load.failed_at is not None else load.end) - load.start
        hits = Counter(load.sources[:loaded])
        # an aborted request's blocks are freed anyway: only a live one must recompute
        failed = [] if load.failed_at is None or state.finished else load.gpu_block_ids[load.failed_at:load.end]
        if failed:
            log.warning("request %s: %d of %d blocks could not be loaded; vLLM recomputes them", rid,
                        len(failed), load.end - load.start)
        self._loads_done[rid] = LoadDone(failed, {tier: n * self.tokens_per_block for tier, n in hits.items()},
                                         self.clock() - load.started)
        if state.finished:
            del self._requests[rid]

    def hit_sources(self, request: Request) -> dict[str, int]:
        state = self._requests.get(request.request_id)
        return state.hit_sources if state is not None else {}

    def request_finished(self, request: Request) -> bool:
        """Whether vLLM must keep the request's blocks until the workers report its stores done."""
        rid = request.request_id
        if self.discovery is not None:
            self.discovery.forget(rid)
        state = self._requests.get(rid)
        if state is None:
            return False
        state.finished = True
        if state.load is not None:  # aborted while loading: vLLM frees the blocks once the load is over
            if self.manager.cancel(rid):
                self._end_load(state)
            return False
        if request.status == RequestStatus.FINISHED_ABORTED:
            if self.manager.cancel(rid):
                state.storing = False
        else:
            self.manager.on_request_finished(rid)
        if state.storing:
            return True
        del self._requests[rid]
        return False

    # ----------------------------------------------------------------- steps

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> FlexKVMetadata:
        for rid in scheduler_output.preempted_req_ids or ():
            self._preempt(rid)
        for rid in list(self._stalled):
            self._plan_round(self._requests[rid])
        resumed = scheduler_output.scheduled_cached_reqs.resumed_req_ids
        for rid, num_tokens in scheduler_output.num_scheduled_tokens.items():
            if rid in self._requests:
                self._store_computed(self._requests[rid].request, num_tokens, rid in resumed)
        ops, released = self.outbound.take()
        meta = FlexKVMetadata(
            ops=ops,
            released=released,
            parents={key: self._parent_key(key) for op in ops if op.link == CPU_TO_SSD for key in op.keys},
            loads_done=self._loads_done,
            stores_done=self._stores_done,
            preempted=self._preempted,
            idle=scheduler_output.total_num_scheduled_tokens == 0,
        )
        self._loads_done, self._stores_done, self._preempted = {}, [], []
        meta.busy = self._shipped_busy = self._busy()
        return meta

    def _store_computed(self, request: Request, num_tokens: int, resumed: bool) -> None:
        """Offer the full blocks this step computes to the CPU tier, as soon as they are computed."""
        state, rid = self._state(request), request.request_id
        if state.next_store < 0 or resumed:
            # blocks vLLM already had (its own cache hits, or loaded) were offered when first computed
            state.next_store = request.num_computed_tokens // self.tokens_per_block
            self.manager.on_request_running(rid)
        full = min((request.num_computed_tokens + num_tokens) // self.tokens_per_block, len(state.keys))
        if full <= state.next_store:
            return
        gpu_block_ids = self.kv_cache_manager.get_block_ids(rid)[0]
        if self.manager.plan_store(rid, state.keys, gpu_block_ids[state.next_store:full], start=state.next_store,
                                   request_tokens=request.num_prompt_tokens):
            state.storing = True
        state.next_store = full

    def _preempt(self, rid: str) -> None:
        """vLLM freed the request's blocks: drop its queued copies, fence the running ones."""
        state = self._requests.get(rid)
        if state is None:
            return
        if self.manager.cancel(rid):
            state.storing = False
        self._preempted.append(rid)
        state.next_store = -1
        state.first_lookup = None
        self.manager.on_request_waiting(rid, state.keys)

    def _parent_key(self, key: Hashable) -> Hashable | None:
        block = self.manager.index.get(key)
        return block.parent.key if block is not None and block.parent is not None else None

    def update_connector_output(self, worker_meta: FlexKVWorkerMetadata | None) -> None:
        if worker_meta is None:
            return
        if self._recovered is not None and worker_meta.recovered:
            self._recovered.update(worker_meta.recovered)
            if len(self._recovered) == self.settings.world_size:
                self._adopt(self._recovered)
                self._recovered = None
        for op_id, (count, failed) in worker_meta.completed.items():
            seen, failed_so_far = self._reports.pop(op_id, (0, frozenset()))
            count, failed = seen + count, failed_so_far | failed
            if count < self.settings.world_size:
                self._reports[op_id] = (count, failed)
                continue
            for done in self.manager.complete(op_id, failed):
                self._request_done(done)

    def _adopt(self, recovered: dict[int, list[Recovered]]) -> None:
        """Take in the blocks every worker's SSD store still holds, in the same slot."""
        ranks = iter(recovered.values())
        common = set(next(ranks))
        for entries in ranks:
            common &= set(entries)
        adopted = self.manager.adopt(TierKind.SSD, sorted(common, key=lambda e: e[2]))
        log.info("FlexKV: %d blocks found in the SSD tier at start", adopted)

    def _request_done(self, done: RequestDone) -> None:
        state = self._requests.get(done.request_id)
        if state is None:
            return
        if done.kind is OpKind.STORE:
            state.storing = False
            if state.finished and state.load is None:
                self._stores_done.append(done.request_id)
                del self._requests[done.request_id]
            return
        load = state.load
        if load is None:
            return
        if done.failed_keys:
            failed = set(done.failed_keys)
            load.failed_at = next((i for i in range(load.start, load.next) if state.keys[i] in failed), load.start)
        if load.failed_at is None and load.next < load.end and not state.finished:
            self._plan_round(state)
        else:
            self._end_load(state)

    # ---------------------------------------------------------------- admin

    def _busy(self) -> bool:
        return bool(self.manager.ops_in_flight or len(self.outbound) or self._loads_done or self._stores_done
                    or self._preempted or self._stalled or self._recovered is not None)

    def has_pending_work(self) -> bool:
        """Keep vLLM stepping while transfers run, and one step more to tell the workers all is quiet."""
        return self._busy() or self._shipped_busy

    def shutdown(self) -> None:
        """Stop the discovery thread and drop its store connection (the workers close their own)."""
        if self.discovery is not None:
            self.discovery.close()
            self.discovery.store.close()
            self.discovery = None

    def reset_cache(self) -> bool:
        dropped = self.manager.reset()
        log.info("FlexKV: cache reset, %d block copies dropped (blocks in use stay)", dropped)
        return True
