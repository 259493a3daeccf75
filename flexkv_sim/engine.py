"""One inference engine instance: vLLM's continuous batching as a SimPy process.

Each step the scheduler gives the token budget to the running requests first
(one token per decoding request, a prefill chunk per prefilling one), then
admits queued requests in arrival order while the budget, ``max_num_seqs`` and
the GPU blocks allow. Admitting a request pins its GPU prefix hits, promises it
blocks for its whole sequence (no preemption) and takes them as its tokens need
them, looks the next blocks up in the control plane and starts their load; the
request then waits for the load while the others keep running (or, with
layer-wise loading, runs at once and its first step waits for the last layer).

As in vLLM and the connector, every scheduled chunk adds the full blocks it
computes (prompt or output) to the GPU prefix cache at once (a request admitted
later in the same step, or in any later one, hits them) and offers them to the
tiers; their copies start when the step's forward ends. The control plane hears
of a transfer at the end of the step in progress (the workers report after each
forward), and a request whose load was reported is scheduled one step later
(vLLM learns of it from the next step's output); an idle engine steps at once.
A request emits its first token when its last chunk ends; its GPU blocks are
freed, last first, when it has finished and its stores are done.

Steps with prefill work are one event each. Runs of pure decode steps are
jumped over analytically (``DecodeRun``) up to the next finish, the step before
one fills a block, or the step vLLM learns of a load; transfer events at the
steps' boundaries inside a run fire on their own, and the run is cut short at
the step boundary when the scheduler is needed (an arrival, a reported load,
freed blocks for a queued request).
"""
from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import simpy

from flexkv_runtime.control.manager import CacheManager
from flexkv_runtime.control.ops import OpKind, TransferOp
from flexkv_sim.checks import require
from flexkv_sim.gpu_cache import GpuPrefixCache
from flexkv_sim.model import DecodeRun, StepTime
from flexkv_sim.workloads.request import Request

#: how often a request told to wait for in-flight blocks (prefetch stop rule) looks again
PREFETCH_RECHECK_S = 0.001
#: ``SimRequest.storing`` bits: stores into the instance's own tiers, into the shared pool
STORING_LOCAL, STORING_POOL = 1, 2
#: keys of output blocks lie past every (64-bit) prompt block key: unique to their request and block
OUTPUT_KEYS = 1 << 64
#: slack when a simulated time is compared with a step boundary computed apart (float rounding)
EPS_S = 1e-9


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_prefix_caching: bool = True
    gpu_eviction: Any = "lru"
    layerwise_load: bool = False
    step_profile: str | None = None  # CSV of tokens, context[, attention], seconds; None: roofline
    #: a prefill step that comes ``cold_after_s`` or more after the last one takes this many times longer
    #: (the fidelity box's CPU engine, idle or only decoding meanwhile: about 1.5; a GPU engine: 1)
    cold_start_factor: float = 1.0
    cold_after_s: float = 0.1
    arrival_latency_s: float = 0.0  # from a request's arrival to the scheduler's queue (front end, IPC)

    def __post_init__(self) -> None:
        require(self, positive=["cold_start_factor"], non_negative=["cold_after_s", "arrival_latency_s"],
                whole=["max_num_seqs", "max_num_batched_tokens"])

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> EngineConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(cfg) - names
        if unknown:
            raise ValueError(f"unknown engine keys {sorted(unknown)}; valid: {sorted(names)}")
        try:
            return cls(**cfg)
        except ValueError as exc:
            raise ValueError(f"simulate.engine: {exc}") from None


class SimRequest:
    """A request's life in the simulator: its blocks, what it hit where, and its timestamps."""

    __slots__ = (
        "request", "index", "keys", "arrival_s", "done", "engine", "max_hit", "total_blocks",
        "admitted_s", "load_end_s", "first_token_s", "finish_s",
        "gpu_hit", "local_end", "cached", "tier_hits", "prefill_left", "named", "offered",
        "blocks", "anonymous", "held", "promised", "loads", "storing", "loaded",
    )

    def __init__(self, request: Request, index: int, keys: Sequence[Hashable], arrival_s: float,
                 done: simpy.Event | None = None) -> None:
        self.request = request
        self.index = index  # the request's id in the control plane and the oracle
        self.keys = keys  # one key per full prompt block
        self.arrival_s = arrival_s
        self.done = done
        self.engine: Engine | None = None
        tpb = request.tokens_per_block
        #: vLLM's own prefix cache leaves at least the last prompt token to compute, so it serves at most
        #: this many blocks; the connector may load every full block (vLLM then recomputes the last token)
        self.max_hit = min(len(keys), (request.input_length - 1) // tpb)
        #: KV blocks of the whole sequence: the prompt and every output token but the last (never fed back)
        self.total_blocks = -(-(request.input_length + max(request.output_length, 1) - 1) // tpb)
        self.admitted_s = self.load_end_s = self.first_token_s = self.finish_s = None
        self.gpu_hit = self.local_end = self.cached = 0  # prefix blocks: GPU hits, + local loads, + remote loads
        self.tier_hits: dict[str, int] = {}
        self.prefill_left = request.input_length
        self.named = 0  # leading blocks named in the GPU cache (and offered to the pool)
        self.offered = 0  # leading blocks offered to the instance's own tiers
        self.blocks: list = []  # the named GPU blocks it pins, in prefix order
        self.anonymous = 0  # blocks it took that hold no key
        self.held = 0  # GPU blocks it holds: hits and taken ones
        self.promised = 0  # GPU blocks still to take as its tokens need them
        self.loads = 0  # loads still running
        self.storing = 0  # STORING_LOCAL | STORING_POOL: whose stores are still running
        self.loaded: simpy.Event | None = None  # layer-wise loading: fires when the loads end

    def keys_to(self, end: int) -> Sequence[Hashable]:
        """Keys of the request's first ``end`` blocks: its prompt's, then blocks its output filled."""
        keys = self.keys
        if end <= len(keys):
            return keys
        base = OUTPUT_KEYS + (self.index << 32)
        return [*keys, *range(base + len(keys), base + end)]


class Engine:
    def __init__(
        self,
        env: simpy.Environment,
        name: str,
        config: EngineConfig,
        step_time: StepTime,
        layers: int,
        gpu: GpuPrefixCache,
        manager: CacheManager | None,
        pool: CacheManager | None,
        on_finish: Callable[[SimRequest], None],
        begin: Callable[[int], None] | None = None,
        overlap: bool = True,
    ) -> None:
        self.env = env
        self.name = name
        self.step_time = step_time
        self.layers = layers
        self.gpu = gpu
        self.manager = manager
        self.pool = pool
        self.on_finish = on_finish
        self.begin = begin  # tells an offline policy's oracle which request is being served
        self.max_seqs = config.max_num_seqs
        self.max_tokens = config.max_num_batched_tokens
        self.layerwise = config.layerwise_load
        self.overlap = overlap
        self.waiting: deque[SimRequest] = deque()
        self.ready: deque[SimRequest] = deque()  # admitted, loads done and known, not yet scheduled
        self.prefilling: list[SimRequest] = []
        self._decoding: list[tuple[int, int, SimRequest]] = []  # heap of (finish step, index, request)
        #: heaps of (decode step, index, request, its last decode step): the step that needs a new block,
        #: the step that fills one (vLLM caches it and the connector stores it)
        self._growing: list[tuple[int, int, SimRequest, int]] = []
        self._filling: list[tuple[int, int, SimRequest, int]] = []
        self.n_decoding = 0
        self.decode_context = 0  # KV tokens of all decoding requests
        self.decode_steps = 0  # decode steps so far: a decoding request's clock
        self.in_system = 0
        self.cold_start_factor = config.cold_start_factor
        self.cold_after_s = config.cold_after_s
        self.arrival_latency_s = config.arrival_latency_s
        self._last_prefill = 0.0  # when the last step with prefill work ended
        self.load_blocks = 0  # blocks of the requests queued or running here (router load)
        self.busy_s = 0.0
        self.steps = 0
        self.rejected = 0
        self.stepping = False  # a step is planned or running: transfer events wait for its end
        self._at_step_end: list[Callable[[], None]] = []
        #: a run of decode steps in progress: (start, DecodeRun, steps); events at its inner step
        #: boundaries are [step, done, actions] batches that run on their own while it goes on
        self._run: tuple[float, DecodeRun, int] | None = None
        self._batches: list[list] = []
        self._cut = False  # the run in progress was told to stop at its step boundary
        #: (steps after which vLLM knows, request): loads the workers reported, not yet known to vLLM
        self._reported: list[tuple[int, SimRequest]] = []
        self._wake: simpy.Event | None = None
        self._recheck_pending = False
        self.process = env.process(self.run())

    # ------------------------------------------------------------ requests in

    def submit(self, sr: SimRequest) -> None:
        sr.engine = self
        if self.arrival_latency_s:
            self.env.timeout(self.arrival_latency_s).callbacks.append(lambda _event: self._enqueue(sr))
        else:
            self._enqueue(sr)

    def _enqueue(self, sr: SimRequest) -> None:
        if sr.total_blocks > self.gpu.capacity:
            self.rejected += 1  # vLLM refuses a request longer than its KV pool
            if sr.done is not None:
                sr.done.succeed(sr)
            return
        if self.manager is not None:
            self.manager.on_request_waiting(sr.index, sr.keys)
        self.waiting.append(sr)
        self.in_system += 1
        self.load_blocks += sr.total_blocks
        self._notify()

    def cached_prefix(self, sr: SimRequest) -> int:
        """Leading blocks this instance could serve without prefill: its GPU cache, then its own tiers."""
        cached = len(self.gpu.prefix(sr.keys, sr.max_hit))
        if self.manager is not None and cached < len(sr.keys):
            cached += self.manager.lookup(sr.keys[cached:]).ready_blocks
        return cached

    def _recheck(self, _event: simpy.Event) -> None:
        self._recheck_pending = False
        self._notify()

    def _notify(self) -> None:
        """Something for the scheduler: wake an idle engine, or end a run of decode steps at its step boundary."""
        wake = self._wake
        if wake is not None:
            self._wake = None
            wake.succeed()
        elif self._run is not None and not self._cut:
            self._cut = True
            self.process.interrupt()

    # -------------------------------------------------------- control plane

    def start_transfer(self, op: TransferOp, start: Callable[[], None]) -> None:
        """The workers get an op with the step's metadata. A store's copies start once the forward that
        computes its blocks has run; other copies start at once, or, where they cannot overlap the
        forward (a CPU engine: both need the cores), once it has run."""
        if op.kind is OpKind.STORE or not self.overlap:
            self._at_end_of_step(start)
        else:
            start()

    def report(self, action: Callable[[], None]) -> None:
        """The workers report a finished transfer after the forward in progress; with layer-wise
        loading the forward itself waits for the loads, so they are heard of at once."""
        if self.layerwise:
            action()
        else:
            self._at_end_of_step(action)

    def _at_end_of_step(self, action: Callable[[], None]) -> None:
        if not self.stepping:  # an idle engine steps at once
            action()
        elif self._run is None:  # planning, or a step with prefill work: the engine's next stop is its end
            self._at_step_end.append(action)
        else:
            started, run, steps = self._run
            # the step in progress (at a boundary, the one starting there)
            self._batch(run.steps_by(self.env.now - started + EPS_S, steps)).append(action)

    def _batch(self, step: int) -> list[Callable[[], None]]:
        """The actions to run when step ``step`` of the decode run in progress ends; the run goes on unless
        they call for the scheduler (``_notify``). The run's own end runs the batches left (``_end_run``)."""
        batches = self._batches
        if batches and batches[-1][0] == step:
            return batches[-1][2]
        started, run, _ = self._run
        batch = [step, False, []]
        batches.append(batch)
        decoded = self.decode_steps + step

        def fire(_event: simpy.Event) -> None:
            if not batch[1]:
                batch[1] = True
                self._grow_decodes(decoded)  # the blocks the steps so far took come first
                for action in batch[2]:
                    action()

        self.env.timeout(started + run.elapsed(step) - self.env.now).callbacks.append(fire)
        return batch[2]

    def _steps_done(self) -> int:
        """Steps the engine has finished by now."""
        if self._run is None:
            return self.steps
        started, run, steps = self._run
        return self.steps + run.steps_by(self.env.now - started - EPS_S, steps)

    def _step_ended(self, idle: bool = False) -> None:
        """What the step's end brings: vLLM learns of the loads reported a step before (an idle engine steps at
        once: of all), then the workers' copies start and their reports arrive (ops those release go out with
        the next step)."""
        if self._reported:
            self._schedule_reported(idle)
        actions, self._at_step_end = self._at_step_end, []
        for action in actions:
            action()

    def _schedule_reported(self, idle: bool) -> None:
        """vLLM knows of the loads: it caches the loaded blocks and may schedule the requests."""
        waiting = []
        for known, sr in self._reported:
            if known > self.steps and not idle:
                waiting.append((known, sr))
                continue
            if self.begin is not None:
                self.begin(sr.index)
            self._fill(sr, sr.gpu_hit, sr.cached)
            self.ready.append(sr)
        self._reported = waiting

    def _admit(self, sr: SimRequest) -> bool:
        """Give ``sr`` its GPU blocks and start its loads; False when it has to stay queued.

        The connector looks up all of the prompt's full blocks past vLLM's own hit, the last one
        included: a prompt loaded whole recomputes only its last token.
        """
        gpu, manager, pool = self.gpu, self.manager, self.pool
        keys, rid = sr.keys, sr.index
        end = len(keys)
        hit = gpu.prefix(keys, sr.max_hit)
        start = len(hit)
        if not gpu.can_admit(hit, sr.total_blocks - start):
            return False
        now = self.env.now
        if self.begin is not None:
            self.begin(rid)
        found = None
        if manager is not None and start < end:
            found = manager.lookup(keys[start:end], rid)
            if manager.should_wait(found, now - sr.arrival_s):
                if not self._recheck_pending:
                    self._recheck_pending = True
                    self.env.timeout(PREFETCH_RECHECK_S).callbacks.append(self._recheck)
                return False
        gpu.admit(hit, sr.total_blocks - start)
        sr.blocks = hit
        sr.held = sr.gpu_hit = start
        sr.promised = sr.total_blocks - start
        sr.admitted_s = now
        if found is not None and found.ready_blocks:
            hits = manager.stats.block_hits
            before = dict(hits)
            loaded = manager.plan_load(rid, keys, start, range(found.ready_blocks))
            if loaded:
                sr.tier_hits = {tier: hits[tier] - before[tier] for tier in hits}
                sr.loads += 1
                start += loaded
        sr.local_end = start
        if pool is not None and start < end:
            ready = pool.lookup(keys[start:end], rid).ready_blocks
            loaded = pool.plan_load(rid, keys, start, range(ready)) if ready else 0
            if loaded:
                sr.loads += 1
                start += loaded
        sr.cached = sr.named = start
        sr.offered = sr.local_end
        self._grow(sr, start)  # vLLM allocates the blocks a load fills with the request
        if manager is not None:
            manager.on_request_running(rid)
        sr.prefill_left = max(1, sr.request.input_length - start * sr.request.tokens_per_block)
        return True

    def on_loaded(self, sr: SimRequest) -> None:
        """One of the request's loads (local tiers or remote pool) has finished and been reported."""
        sr.loads -= 1
        if sr.loads:
            return
        sr.load_end_s = self.env.now
        if sr.loaded is None:
            self._reported.append((self._steps_done() + 1, sr))
            self._notify()
            return
        if self.begin is not None:
            self.begin(sr.index)
        self._fill(sr, sr.gpu_hit, sr.cached)
        sr.loaded.succeed()

    def on_stored(self, sr: SimRequest, pool: bool = False) -> None:
        sr.storing &= ~(STORING_POOL if pool else STORING_LOCAL)
        if not sr.storing and sr.finish_s is not None:
            self._release(sr)

    def _grow(self, sr: SimRequest, blocks: int) -> None:
        """The request's KV now needs ``blocks`` GPU blocks: take the ones it lacks."""
        new = blocks - sr.held
        if new > 0:
            self.gpu.take(new)
            sr.held += new
            sr.promised -= new
            sr.anonymous += new

    def _grow_decodes(self, step: int) -> None:
        """Decoding requests take a block at each decode step up to ``step`` whose token overflows their last one."""
        growing = self._growing
        while growing and growing[0][0] <= step:
            at, index, sr, last = heapq.heappop(growing)
            self._grow(sr, sr.held + 1)
            at += sr.request.tokens_per_block
            if at <= last:
                heapq.heappush(growing, (at, index, sr, last))

    def _fill_decodes(self, step: int, offers: list[tuple[SimRequest, int]]) -> None:
        """Decode steps up to ``step`` that fill an output block: cache it now, offer it with ``offers``."""
        filling = self._filling
        while filling and filling[0][0] <= step:
            at, index, sr, last = heapq.heappop(filling)
            full = sr.named + 1
            self._fill(sr, sr.named, full)
            offers.append((sr, full))
            at += sr.request.tokens_per_block
            if at <= last:
                heapq.heappush(filling, (at, index, sr, last))

    def _fill(self, sr: SimRequest, start: int, end: int) -> None:
        """Blocks ``[start, end)`` of the request now hold its KV: vLLM caches them (a key cached first keeps
        its copy)."""
        named = self.gpu.register(sr.keys_to(end), start, end)
        sr.blocks.extend(named)
        sr.anonymous -= len(named)

    def _offer(self, sr: SimRequest, end: int) -> None:
        """Offer the blocks up to ``end`` to this instance's tiers (computed here or fetched from the pool) and the
        computed ones to the pool."""
        rid, keys, tokens, local, start = sr.index, sr.keys_to(end), sr.request.input_length, sr.offered, sr.named
        if self.manager is not None and self.manager.plan_store(rid, keys, range(end - local), local, tokens):
            sr.storing |= STORING_LOCAL
        if self.pool is not None and end > start and self.pool.plan_store(rid, keys, range(end - start), start,
                                                                          tokens):
            sr.storing |= STORING_POOL
        sr.offered = sr.named = end

    def _release(self, sr: SimRequest) -> None:
        self.gpu.release(sr.blocks, sr.anonymous, sr.promised)
        sr.blocks = []
        sr.promised = 0
        if self.waiting or self.ready:
            self._notify()

    # ------------------------------------------------------------ scheduler

    def _plan(self) -> tuple[int, int, int, list[tuple[SimRequest, int]]] | None:
        """The next step: (tokens, attention pairs, KV tokens, prefill chunks), or None when idle.

        A chunk's full blocks join the GPU cache as it is scheduled, before the queue is looked at,
        and are offered to the tiers after it, as vLLM's scheduler and the connector do.
        """
        budget = self.max_tokens - self.n_decoding
        chunks = []
        offers = []
        if self.n_decoding:
            self._grow_decodes(self.decode_steps + 1)
            self._fill_decodes(self.decode_steps + 1, offers)
        tokens, attention, kv = self.n_decoding, self.decode_context, self.decode_context
        chunk_cost = self.step_time.prefill_chunk
        prefilling = self.prefilling
        scheduled = 0
        while budget > 0:
            if scheduled < len(prefilling):
                sr = prefilling[scheduled]
            elif len(prefilling) + self.n_decoding >= self.max_seqs:
                break
            elif self.ready:
                sr = self.ready.popleft()
                prefilling.append(sr)
            elif self.waiting and self._admit(self.waiting[0]):
                sr = self.waiting.popleft()
                if sr.loads:
                    if not self.layerwise:
                        continue
                    sr.loaded = self.env.event()
                prefilling.append(sr)
            else:
                break
            scheduled += 1
            chunk = min(sr.prefill_left, budget)
            request = sr.request
            computed = request.input_length - sr.prefill_left
            t, a, k = chunk_cost(chunk, computed)
            tokens += t
            attention += a
            kv += k
            budget -= chunk
            chunks.append((sr, chunk))
            tpb = request.tokens_per_block
            self._grow(sr, -(-(computed + chunk) // tpb))
            full = min(len(sr.keys), (computed + chunk) // tpb)
            if full > sr.offered:
                self._fill(sr, sr.named, full)
                offers.append((sr, full))
        for sr, full in offers:
            self._offer(sr, full)
        if not chunks and not self.n_decoding:
            return None
        return tokens, attention, kv, chunks

    def run(self):
        env = self.env
        while True:
            self.stepping = True
            plan = self._plan()
            if plan is None:
                self.stepping = False
                if self._at_step_end or self._reported:
                    self._step_ended(idle=True)
                    continue
                self._wake = env.event()
                yield self._wake
                continue
            started = env.now
            tokens, attention, kv, chunks = plan
            if not chunks:
                yield from self._decode_run()
            else:
                duration = self.step_time(tokens, attention, kv)
                if env.now - self._last_prefill >= self.cold_after_s:
                    duration *= self.cold_start_factor
                yield env.timeout(duration)
                if self.layerwise and any(sr.loaded is not None for sr, _ in chunks):
                    yield from self._wait_for_layers(chunks, duration)
                self.steps += 1
                self._last_prefill = env.now
                if self.n_decoding:
                    self._advance_decode(1)
                for sr, chunk in chunks:
                    sr.prefill_left -= chunk
                    if not sr.prefill_left:
                        self.prefilling.remove(sr)
                        self._prefilled(sr)
            self.busy_s += env.now - started
            self._step_ended()

    def _wait_for_layers(self, chunks: list[tuple[SimRequest, int]], duration: float):
        """Layer-wise loading: layer i's compute follows layer i's load, so the step ends one layer after the loads."""
        env = self.env
        pending = [sr for sr, _ in chunks if sr.loaded is not None]
        yield env.all_of([sr.loaded for sr in pending])
        end = max(sr.load_end_s for sr in pending) + duration / self.layers
        if end > env.now:
            yield env.timeout(end - env.now)
        for sr in pending:
            sr.loaded = None

    def _decode_run(self):
        """Decode steps until the next request finishes, the step before one fills a block, or the step
        vLLM learns of a reported load; cut short at the step boundary after a wake-up (``_notify``)."""
        env = self.env
        steps = self._decoding[0][0] - self.decode_steps
        if self._filling:
            steps = min(steps, self._filling[0][0] - 1 - self.decode_steps)
        if self._reported:
            steps = min(steps, min(known for known, _ in self._reported) - self.steps)
        run = self.step_time.decode_run(self.n_decoding, self.decode_context)
        started = env.now
        self._run = (started, run, steps)
        if self._at_step_end and steps > 1:  # what waits for the first forward runs at its end
            self._batch(1).extend(self._at_step_end)
            self._at_step_end = []
        try:
            yield env.timeout(run.elapsed(steps))
        except simpy.Interrupt:
            steps = run.steps_by(env.now - started - EPS_S, steps)  # the step in progress; at a boundary, this
            self._run = (started, run, steps)
            rest = started + run.elapsed(steps) - env.now
            if rest > EPS_S:
                yield env.timeout(rest)
        self._end_run(steps)

    def _end_run(self, steps: int) -> None:
        """The run's last step has ended: the batches of its boundaries that have not run go first."""
        left = [action for batch in self._batches if not batch[1] for action in batch[2]]
        for batch in self._batches:
            batch[1] = True
        self._at_step_end += left  # after what the planning left for the first step (a run of one step)
        self._batches = []
        self._run = None
        self._cut = False
        self.steps += steps
        self._advance_decode(steps)

    def _advance_decode(self, steps: int) -> None:
        self.decode_steps += steps
        self.decode_context += steps * self.n_decoding
        heap, now_step = self._decoding, self.decode_steps
        self._grow_decodes(now_step)
        while heap and heap[0][0] <= now_step:
            sr = heapq.heappop(heap)[2]
            self.n_decoding -= 1
            self.decode_context -= sr.request.input_length + sr.request.output_length
            self._finish(sr)

    def _prefilled(self, sr: SimRequest) -> None:
        sr.first_token_s = self.env.now
        output = sr.request.output_length
        if output <= 1:
            self._finish(sr)
            return
        first, last = self.decode_steps + 1, self.decode_steps + output - 1
        heapq.heappush(self._decoding, (last, sr.index, sr))
        # decode step k (from 1) writes KV token input + k: the first to need a block past those held,
        # and the first to fill the prompt's partial block (or, for a whole last block, the next)
        tpb, tokens = sr.request.tokens_per_block, sr.request.input_length
        grows = first + sr.held * tpb - tokens
        if grows <= last:
            heapq.heappush(self._growing, (grows, sr.index, sr, last))
        fills = first + (tokens // tpb + 1) * tpb - tokens - 1
        if fills <= last:
            heapq.heappush(self._filling, (fills, sr.index, sr, last))
        self.n_decoding += 1
        self.decode_context += sr.request.input_length + 1

    def _finish(self, sr: SimRequest) -> None:
        sr.finish_s = self.env.now
        if self.manager is not None:
            self.manager.on_request_finished(sr.index)
        if not sr.storing:
            self._release(sr)
        self.in_system -= 1
        self.load_blocks -= sr.total_blocks
        if sr.done is not None:
            sr.done.succeed(sr)
        self.on_finish(sr)
