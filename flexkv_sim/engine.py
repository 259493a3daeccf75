"""One inference engine instance: vLLM's continuous batching as a SimPy process.

Each step the scheduler gives the token budget to the running requests first
(one token per decoding request, a prefill chunk per prefilling one), then
admits queued requests in arrival order while the budget, ``max_num_seqs`` and
the GPU blocks allow. Admitting a request pins its GPU prefix hits, reserves
blocks for the rest of its sequence (no preemption), looks the next blocks up
in the control plane and starts their load; the request then waits for the
load while the others keep running (or, with layer-wise loading, runs at once
and its first step waits for the last layer). When its prefill ends it emits
the first token and offers its new full blocks for storing; its GPU blocks are
freed when it has finished and its stores are done.

Steps with prefill work are one event each. Runs of pure decode steps are
jumped over analytically (``DecodeRun``) up to the next finish, or cut short at
the step boundary after a wake-up (an arrival, a finished load, freed blocks).
"""
from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import simpy

from flexkv_runtime.control.manager import CacheManager
from flexkv_sim.gpu_cache import GpuPrefixCache
from flexkv_sim.model import StepTime
from flexkv_sim.workloads.request import Request

#: how often a request told to wait for in-flight blocks (prefetch stop rule) looks again
PREFETCH_RECHECK_S = 0.001


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_prefix_caching: bool = True
    gpu_eviction: Any = "lru"
    layerwise_load: bool = False
    step_profile: str | None = None  # CSV of tokens, context, seconds; None: roofline

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> EngineConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(cfg) - names
        if unknown:
            raise ValueError(f"unknown engine keys {sorted(unknown)}; valid: {sorted(names)}")
        return cls(**cfg)


class SimRequest:
    """A request's life in the simulator: its blocks, what it hit where, and its timestamps."""

    __slots__ = (
        "request", "index", "keys", "arrival_s", "done", "engine", "max_hit", "total_blocks",
        "admitted_s", "load_end_s", "first_token_s", "finish_s",
        "gpu_hit", "local_end", "cached", "tier_hits", "prefill_left",
        "blocks", "anonymous", "loads", "stores", "loaded",
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
        #: vLLM recomputes at least the last prompt token, so at most this many blocks can hit
        self.max_hit = min(len(keys), (request.input_length - 1) // tpb)
        self.total_blocks = -(-(request.input_length + max(request.output_length, 1)) // tpb)
        self.admitted_s = self.load_end_s = self.first_token_s = self.finish_s = None
        self.gpu_hit = self.local_end = self.cached = 0  # prefix blocks: GPU hits, + local loads, + remote loads
        self.tier_hits: dict[str, int] = {}
        self.prefill_left = request.input_length
        self.blocks: list = []
        self.anonymous = 0
        self.loads = self.stores = 0  # control-plane transfers still running
        self.loaded: simpy.Event | None = None  # layer-wise loading: fires when the loads end


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
        self.waiting: deque[SimRequest] = deque()
        self.ready: deque[SimRequest] = deque()  # admitted, loads done, not yet scheduled
        self.prefilling: list[SimRequest] = []
        self.loading = 0
        self._decoding: list[tuple[int, int, SimRequest]] = []  # heap of (finish step, index, request)
        self.n_decoding = 0
        self.decode_context = 0  # KV tokens of all decoding requests
        self.decode_steps = 0  # decode steps so far: a decoding request's clock
        self.in_system = 0
        self.load_blocks = 0  # blocks of the requests queued or running here (router load)
        self.busy_s = 0.0
        self.steps = 0
        self.rejected = 0
        self._wake: simpy.Event | None = None
        self._recheck_pending = False
        self.process = env.process(self.run())

    # ------------------------------------------------------------ requests in

    def submit(self, sr: SimRequest) -> None:
        sr.engine = self
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
        if self.manager is not None and cached < sr.max_hit:
            cached += self.manager.lookup(sr.keys[cached:sr.max_hit]).ready_blocks
        return cached

    def _recheck(self, _event: simpy.Event) -> None:
        self._recheck_pending = False
        self._notify()

    def _notify(self) -> None:
        wake = self._wake
        if wake is not None:
            self._wake = None
            wake.succeed()

    # -------------------------------------------------------- control plane

    def _admit(self, sr: SimRequest) -> bool:
        """Give ``sr`` its GPU blocks and start its loads; False when it has to stay queued."""
        gpu, manager, pool = self.gpu, self.manager, self.pool
        keys, end, rid = sr.keys, sr.max_hit, sr.index
        hit = gpu.prefix(keys, end)
        start = len(hit)
        if not gpu.can_acquire(hit, sr.total_blocks - start):
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
        gpu.acquire(hit, sr.total_blocks - start)
        sr.blocks = hit
        sr.anonymous = sr.total_blocks - start
        sr.gpu_hit = start
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
        sr.cached = start
        if manager is not None:
            manager.on_request_running(rid)
        sr.prefill_left = sr.request.input_length - start * sr.request.tokens_per_block
        return True

    def on_loaded(self, sr: SimRequest) -> None:
        """One of the request's loads (local tiers or remote pool) has finished."""
        sr.loads -= 1
        if sr.loads:
            return
        sr.load_end_s = self.env.now
        if self.begin is not None:
            self.begin(sr.index)
        self._name_blocks(sr, sr.gpu_hit, sr.cached)
        if sr.loaded is not None:
            sr.loaded.succeed()
        else:
            self.loading -= 1
            self.ready.append(sr)
            self._notify()

    def on_stored(self, sr: SimRequest) -> None:
        sr.stores -= 1
        if not sr.stores and sr.finish_s is not None:
            self._release(sr)

    def _name_blocks(self, sr: SimRequest, start: int, end: int) -> None:
        named = self.gpu.register(sr.keys, start, end)
        sr.blocks.extend(named)
        sr.anonymous -= len(named)

    def _store(self, sr: SimRequest) -> None:
        """Offer the blocks this instance computed or fetched remotely to its tiers, and computed ones to the pool."""
        keys, rid, tokens = sr.keys, sr.index, sr.request.input_length
        full = len(keys)
        if self.manager is not None and full > sr.local_end:
            if self.manager.plan_store(rid, keys, range(full - sr.local_end), sr.local_end, tokens):
                sr.stores += 1
        if self.pool is not None and full > sr.cached:
            if self.pool.plan_store(rid, keys, range(full - sr.cached), sr.cached, tokens):
                sr.stores += 1

    def _release(self, sr: SimRequest) -> None:
        self.gpu.release(sr.blocks, sr.anonymous)
        sr.blocks = []
        if self.waiting or self.ready:
            self._notify()

    # ------------------------------------------------------------ scheduler

    def _plan(self) -> tuple[int, int, int, list[tuple[SimRequest, int]]] | None:
        """The next step: (tokens, attention pairs, KV tokens, prefill chunks), or None when idle."""
        budget = self.max_tokens - self.n_decoding
        tokens, attention, kv = self.n_decoding, self.decode_context, self.decode_context
        chunk_cost = self.step_time.prefill_chunk
        chunks = []
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
                        self.loading += 1
                        continue
                    sr.loaded = self.env.event()
                prefilling.append(sr)
            else:
                break
            scheduled += 1
            chunk = min(sr.prefill_left, budget)
            t, a, k = chunk_cost(chunk, sr.request.input_length - sr.prefill_left)
            tokens += t
            attention += a
            kv += k
            budget -= chunk
            chunks.append((sr, chunk))
        if not chunks and not self.n_decoding:
            return None
        return tokens, attention, kv, chunks

    def run(self):
        env = self.env
        while True:
            plan = self._plan()
            if plan is None:
                self._wake = env.event()
                yield self._wake
                continue
            started = env.now
            tokens, attention, kv, chunks = plan
            if not chunks:
                yield from self._decode_run()
            else:
                duration = self.step_time(tokens, attention, kv)
                yield env.timeout(duration)
                if self.layerwise and any(sr.loaded is not None for sr, _ in chunks):
                    yield from self._wait_for_layers(chunks, duration)
                self.steps += 1
                if self.n_decoding:
                    self._advance_decode(1)
                for sr, chunk in chunks:
                    sr.prefill_left -= chunk
                    if not sr.prefill_left:
                        self.prefilling.remove(sr)
                        self._prefilled(sr)
            self.busy_s += env.now - started

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
        """Decode steps until the next request finishes, or until the step boundary after a wake-up."""
        env = self.env
        steps = self._decoding[0][0] - self.decode_steps
        run = self.step_time.decode_run(self.n_decoding, self.decode_context)
        started = env.now
        wake = self._wake = env.event()
        yield env.timeout(run.elapsed(steps)) | wake
        if wake.triggered:
            steps = run.steps_by(env.now - started, steps)
            rest = started + run.elapsed(steps) - env.now
            if rest > 0:
                yield env.timeout(rest)
        else:
            self._wake = None
        self.steps += steps
        self._advance_decode(steps)

    def _advance_decode(self, steps: int) -> None:
        self.decode_steps += steps
        self.decode_context += steps * self.n_decoding
        heap, now_step = self._decoding, self.decode_steps
        while heap and heap[0][0] <= now_step:
            sr = heapq.heappop(heap)[2]
            self.n_decoding -= 1
            self.decode_context -= sr.request.input_length + sr.request.output_length
            self._finish(sr)

    def _prefilled(self, sr: SimRequest) -> None:
        sr.first_token_s = self.env.now
        if self.begin is not None:
            self.begin(sr.index)
        self._name_blocks(sr, sr.cached, len(sr.keys))
        self._store(sr)
        output = sr.request.output_length
        if output <= 1:
            self._finish(sr)
            return
        heapq.heappush(self._decoding, (self.decode_steps + output - 1, sr.index, sr))
        self.n_decoding += 1
        self.decode_context += sr.request.input_length + 1

    def _finish(self, sr: SimRequest) -> None:
        sr.finish_s = self.env.now
        if self.manager is not None:
            self.manager.on_request_finished(sr.index)
        if not sr.stores:
            self._release(sr)
        self.in_system -= 1
        self.load_blocks -= sr.total_blocks
        if sr.done is not None:
            sr.done.succeed(sr)
        self.on_finish(sr)
