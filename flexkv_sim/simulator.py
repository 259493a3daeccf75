"""The digital twin: engine instances with their own tiers and links, a router, a shared remote pool.

Each instance is one engine (one or more GPUs in tensor parallel) with its own
host: a CacheManager over the host's CPU DRAM and local SSDs, driven through a
simulated data plane on that host's links. The optional remote pool is shared
by all instances and is simply a second CacheManager whose only tier (its CPU
tier) stands for the pool's DRAM: engines look it up after their own tiers,
load from it and store into it over their own NIC, as a Mooncake-store or
LMCache remote backend would. Every hit/miss decision is the control plane's.

Requests arrive open loop (at their ``arrival_s``) or, with ``clients=N``,
closed loop: N clients each send the next request as soon as their previous one
has finished.
"""
from __future__ import annotations

import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import simpy

from flexkv_runtime.control.config import build_manager
from flexkv_runtime.control.index import TierKind
from flexkv_runtime.control.manager import CacheManager, RequestDone
from flexkv_runtime.control.ops import OpKind, TransferOp
from flexkv_runtime.control.oracle import FutureOracle
from flexkv_runtime.policies.base import PolicyContext, policy_class, policy_name
from flexkv_sim.dataplane import SimDataPlane
from flexkv_sim.engine import Engine, EngineConfig, SimRequest
from flexkv_sim.gc_pause import gc_paused
from flexkv_sim.gpu_cache import GpuPrefixCache
from flexkv_sim.hardware import HardwareSpec, Link, Striped
from flexkv_sim.model import ModelSpec, profile, roofline
from flexkv_sim.replay import workload_keys
from flexkv_sim.router import make_router
from flexkv_sim.workloads.request import Workload

GPU, SSD = TierKind.GPU, TierKind.SSD
PROGRESS_EVERY = 256  # finished requests per progress-bar update


@dataclass
class InstanceLinks:
    """The links of one instance's host; H2D and D2H scale with its GPU count (one PCIe link per GPU)."""

    h2d: Link
    d2h: Link
    ssd_read: Striped | None
    ssd_write: Striped | None
    nic_rx: Link | None
    nic_tx: Link | None

    @classmethod
    def build(cls, name: str, hw: HardwareSpec) -> InstanceLinks:
        ssd, remote = hw.ssd, hw.remote
        return cls(
            h2d=Link(f"{name}/pcie_h2d", hw.h2d, scale=hw.gpu.count),
            d2h=Link(f"{name}/pcie_d2h", hw.d2h, scale=hw.gpu.count),
            ssd_read=Striped([Link(f"{name}/nvme{i}_read", ssd.read) for i in range(ssd.devices)]) if ssd else None,
            ssd_write=Striped([Link(f"{name}/nvme{i}_write", ssd.write) for i in range(ssd.devices)]) if ssd else None,
            nic_rx=Link(f"{name}/nic_rx", remote.network) if remote else None,
            nic_tx=Link(f"{name}/nic_tx", remote.network) if remote else None,
        )

    def all(self) -> list[Link]:
        links = [self.h2d, self.d2h, self.nic_rx, self.nic_tx]
        for array in (self.ssd_read, self.ssd_write):
            if array is not None:
                links.extend(array.devices)
        return [link for link in links if link is not None]

    def local_route(self, op: TransferOp, now: float) -> float:
        """Loads over H2D, stores over D2H, promotions over NVMe reads, demotions over NVMe writes."""
        if op.dst is GPU:
            return self.h2d.reserve(op.nbytes, now)
        if op.src is GPU:
            return self.d2h.reserve(op.nbytes, now)
        if op.src is SSD:
            return self.ssd_read.reserve(op.src_slots, op.block_bytes, now)
        return self.ssd_write.reserve(op.dst_slots, op.block_bytes, now)


@dataclass
class SimResult:
    requests: list[SimRequest]  # finished ones, by index
    rejected: int
    tokens_per_block: int
    end_s: float  # simulated time when the last request or transfer ended
    wall_s: float
    engines: list[Engine]
    links: list[Link]
    managers: list[CacheManager]
    pool: CacheManager | None
    samples: list[tuple[float, int]] = field(default_factory=list)  # (time, requests in the system)


class Simulation:
    def __init__(
        self,
        workload: Workload,
        *,
        hardware: HardwareSpec,
        model: ModelSpec,
        engine: EngineConfig = EngineConfig(),
        instances: int = 1,
        router: str = "round_robin",
        eviction: Any = "lru",
        admission: Any = "always",
        prefetch: Any = "none",
        write_policy: str = "write_through",
        clients: int | None = None,
        sample_interval_s: float = 0.0,
        keys: Sequence[Sequence[Hashable]] | None = None,
        progress: bool = False,
    ) -> None:
        if instances < 1:
            raise ValueError(f"instances must be >= 1, got {instances}")
        if clients is not None and clients < 1:
            raise ValueError(f"clients must be >= 1 or null, got {clients}")
        if not sample_interval_s >= 0:
            raise ValueError(f"sample_interval_s must be >= 0 (0: no sampling), got {sample_interval_s}")
        if not len(workload):
            raise ValueError(f"workload {workload.name} has no requests: nothing to simulate")
        self.workload = workload
        self.env = env = simpy.Environment()
        self.clients = clients
        self.sample_interval_s = sample_interval_s
        self.progress = progress
        requests = workload.requests
        if keys is None:
            keys = [k[: r.full_blocks] for k, r in zip(workload_keys(workload), requests)]
        self.keys = keys
        tpb = workload.tokens_per_block
        block_bytes = model.block_bytes(tpb)
        step_time = profile(engine.step_profile) if engine.step_profile else roofline(model, hardware.gpu)
        offline = any(policy_class("eviction", policy_name(p)).offline for p in (eviction, engine.gpu_eviction))
        self.oracle = FutureOracle(keys) if offline else None
        begin = self.oracle.begin if self.oracle is not None else None
        chunk = step_time.prefill_chunk

        costs: dict[int, float] = {}

        def prefill_cost(depth: int) -> float:
            """Prefill seconds a cached block at ``depth`` saves (cost-aware policies weigh it); memoised."""
            cost = costs.get(depth)
            if cost is None:
                cost = costs[depth] = step_time(*chunk(tpb, depth * tpb)) - step_time.overhead_s
            return cost

        clock = lambda: env.now  # noqa: E731
        manager_args = dict(eviction=eviction, admission=admission, write_policy=write_policy,
                            clock=clock, block_bytes=block_bytes, prefill_cost=prefill_cost, oracle=self.oracle)
        self.pool = None
        if hardware.remote is not None:
            pool_plane = SimDataPlane(env, self._pool_route, self._dispatch_pool)
            pool_plane.engine_of = self._engine_of_request
            self.pool = pool_plane.manager = build_manager(tiers={"cpu": dict(hardware.remote.capacity)},
                                                           data_plane=pool_plane, **manager_args)
        gpu_blocks = hardware.gpu.kv_blocks(model.weight_bytes, block_bytes)
        self.engines: list[Engine] = []
        self.links: list[InstanceLinks] = []
        self.managers: list[CacheManager] = []
        for i in range(instances):
            name = f"e{i}"
            links = InstanceLinks.build(name, hardware)
            manager = None
            if hardware.cpu is not None:
                plane = SimDataPlane(env, links.local_route, self._dispatch)
                tiers = {"cpu": dict(hardware.cpu)}
                if hardware.ssd is not None:
                    tiers["ssd"] = dict(hardware.ssd.capacity)
                manager = plane.manager = build_manager(tiers=tiers, prefetch=prefetch, data_plane=plane,
                                                        **manager_args)
                self.managers.append(manager)
            context = PolicyContext(clock=clock, waiting_refs=manager.waiting_refs if manager else {},
                                    oracle=self.oracle, tier="GPU")
            gpu = GpuPrefixCache(gpu_blocks, engine.gpu_eviction, enabled=engine.enable_prefix_caching,
                                 context=context)
            self.engines.append(Engine(env, name, engine, step_time, model.layers, gpu, manager, self.pool,
                                       self._finished, begin, hardware.gpu.copies_overlap_compute))
            if manager is not None:
                manager.data_plane.engine_of = lambda op, engine=self.engines[-1]: engine
            self.links.append(links)
        self.router = make_router(router, self.engines)
        self.by_index: list[SimRequest | None] = [None] * len(requests)
        self.done: list[SimRequest] = []
        self.samples: list[tuple[float, int]] = []
        self._bar = None
        self._links_of = dict(zip(self.engines, self.links))
        self.gpu_blocks = gpu_blocks  # per instance
        self.block_bytes = block_bytes

    # ------------------------------------------------------------- plumbing

    def _pool_route(self, op: TransferOp, now: float) -> float:
        """Pool loads come in over the requesting instance's NIC, stores go out over it."""
        links = self._links_of[self.by_index[op.request_id].engine]
        return (links.nic_rx if op.dst is GPU else links.nic_tx).reserve(op.nbytes, now)

    def _engine_of_request(self, op: TransferOp) -> Engine:
        """The pool serves every instance: its ops follow the steps of their request's engine."""
        return self.by_index[op.request_id].engine

    def _dispatch(self, done: RequestDone, pool: bool = False) -> None:
        sr = self.by_index[done.request_id]
        if done.kind is OpKind.LOAD:
            sr.engine.on_loaded(sr)
        else:
            sr.engine.on_stored(sr, pool)

    def _dispatch_pool(self, done: RequestDone) -> None:
        self._dispatch(done, pool=True)

    def _finished(self, sr: SimRequest) -> None:
        self.done.append(sr)
        if self._bar is not None and len(self.done) % PROGRESS_EVERY == 0:
            self._bar.update(PROGRESS_EVERY)

    def submit(self, index: int, done: simpy.Event | None = None) -> SimRequest:
        """Request ``index`` of the workload arrives now."""
        sr = SimRequest(self.workload.requests[index], index, self.keys[index], self.env.now, done)
        self.by_index[index] = sr
        self.router.choose(sr).submit(sr)
        return sr

    # -------------------------------------------------------------- drivers

    def _open_loop(self):
        env = self.env
        for index, request in enumerate(self.workload.requests):
            delay = request.arrival_s - env.now
            if delay > 0:
                yield env.timeout(delay)
            self.submit(index)

    def _client(self, queue):
        """One closed-loop client: send, wait for the answer, send the next."""
        for index in queue:
            done = self.env.event()
            self.submit(index, done)
            yield done

    def _sampler(self):
        """Requests in the system every ``sample_interval_s`` (Little's law, occupancy)."""
        env, total = self.env, len(self.workload)
        while len(self.done) + self.rejected < total:
            self.samples.append((env.now, sum(e.in_system for e in self.engines)))
            yield env.timeout(self.sample_interval_s)

    @property
    def rejected(self) -> int:
        return sum(e.rejected for e in self.engines)

    def run(self) -> SimResult:
        env = self.env
        if self.clients is None:
            env.process(self._open_loop())
        else:
            queue = iter(range(len(self.workload)))
            for _ in range(self.clients):
                env.process(self._client(queue))
        if self.sample_interval_s > 0:
            env.process(self._sampler())
        if self.progress:
            from tqdm import tqdm

            self._bar = tqdm(total=len(self.workload), desc="simulate", unit="req", mininterval=0.5)
        with gc_paused():
            started = time.perf_counter()
            env.run()
            wall = time.perf_counter() - started
        if self._bar is not None:
            self._bar.update(len(self.done) - self._bar.n)
            self._bar.close()
        unfinished = len(self.workload) - len(self.done) - self.rejected
        if unfinished:
            raise RuntimeError(f"{unfinished} requests never finished: the simulation deadlocked")
        if not self.done:
            raise ValueError(f"all {self.rejected} requests were rejected: each needs more KV blocks than an "
                             f"engine's GPU pool holds ({self.engines[0].gpu.capacity})")
        links = [link for instance in self.links for link in instance.all()]
        return SimResult(
            requests=sorted(self.done, key=lambda sr: sr.index),
            rejected=self.rejected,
            tokens_per_block=self.workload.tokens_per_block,
            end_s=max([sr.finish_s for sr in self.done] + [link.last_end for link in links], default=0.0),
            wall_s=wall,
            engines=self.engines,
            links=links,
            managers=self.managers,
            pool=self.pool,
            samples=self.samples,
        )


def simulation_from_config(workload: Workload, cfg: Any, **overrides: Any) -> Simulation:
    """A Simulation from the Hydra config of ``conf/simulate.yaml`` (plain dicts work too)."""
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    sim = plain["simulate"]
    args = dict(
        hardware=HardwareSpec.from_config(plain["hierarchy"]),
        model=ModelSpec.from_config(plain["model"]),
        engine=EngineConfig.from_config(sim["engine"]),
        instances=int(sim["instances"]),
        router=sim["router"],
        eviction=plain["eviction"],
        admission=plain["admission"],
        prefetch=plain["prefetch"],
        write_policy=sim["write_policy"],
        clients=sim.get("clients"),
        sample_interval_s=float(sim.get("sample_interval_s") or 0.0),
        progress=bool(sim.get("progress", False)),
    )
    args.update(overrides)
    return Simulation(workload, **args)
