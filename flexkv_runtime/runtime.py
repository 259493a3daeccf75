"""KVRuntime: the control plane wired to the real data plane, for the vLLM connector and tests.

It builds the CacheManager (online policies only) over a TransferEngine with a
CPU pool and, optionally, an SSD store and a remote store shared with other
engines; adopts the blocks the SSD store recovers from a previous run and those
``discover`` finds in the remote store; and turns the engine's completions into
``manager.complete`` calls on the caller's thread. Everything here, like the
manager itself, must be called from one control-plane thread.

Config (a plain mapping, or an OmegaConf one; the keys of the Hydra
``hierarchy``/policy groups)::

    cpu:                      # required
      capacity_bytes: 8e9     # or capacity_blocks: N
      pin_memory: auto        # auto (pinned when CUDA is available) | true | false
      eviction: ...           # optional, this tier's own eviction (and admission) policy
    ssd:                      # optional; omit or null for a CPU-only hierarchy
      capacity_bytes: 100e9   # or capacity_blocks: N; on disk each block takes 4 KiB more (header), rounded up
      dirs: [/nvme0/kv, /nvme1/kv]  # blocks stripe round-robin over them
      io_threads: 4           # reader threads, and as many writer threads
      files_per_dir: 1
      direct_io: auto         # auto (O_DIRECT where the filesystem allows) | true | false
      fsync: batch            # batch (fdatasync data before logging it) | none
      preallocate: true       # posix_fallocate the data files at start
      max_bytes: null         # cap on bytes written, to emulate a small filesystem
      recovery_check: header  # header (4 KiB per block at start) | full (re-checksum every block)
      compact_min_records: 4096
    remote:                   # optional; a pool shared across engines and hosts (flexkv_runtime.data.remote.config)
      capacity_blocks: 1000000  # or capacity_bytes: blocks this engine keeps track of in the store
      backend: mooncake       # mooncake | redis
      timeout_s: 1.0          # bound on every store call: past it, a miss
      mooncake: {master: 127.0.0.1:50051}   # or redis: {url: redis://127.0.0.1:6379/0}
    eviction: lru             # a policy name or {name: ..., params...}; offline policies are refused
    admission: always         # guards the CPU tier; slower tiers take what the write policy sends
    prefetch: none
    write_policy: write_through   # write_through | write_back | selective
    selective_hits: 2
    transfer:
      backend: auto           # copy kernels: auto | torch | triton

Names and keys are checked at construction. Capacities need the block size,
which comes from the constructor or from the first ``register_kv_caches``; the
tiers (and SSD recovery) start then.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import asdict
from typing import Any

import torch

import kernels
from flexkv_runtime.control.config import build_manager, tier_capacity_blocks, whole_number
from flexkv_runtime.control.index import TierKind
from flexkv_runtime.control.keys import Namespace
from flexkv_runtime.control.manager import CacheManager, RequestDone
from flexkv_runtime.control.ops import ImmediateDataPlane
from flexkv_runtime.data.cpu_pool import CpuPool
from flexkv_runtime.data.remote import RemoteDiscovery, RemoteTier, open_store, validated_remote
from flexkv_runtime.data.remote.config import REMOTE_KEYS
from flexkv_runtime.data.remote.trailer import TRAILER_BYTES
from flexkv_runtime.data.ssd_store import SsdStore
from flexkv_runtime.data.transfer import TransferEngine

log = logging.getLogger(__name__)

_CAPACITY_KEYS = {"capacity_bytes", "capacity_blocks"}
#: what a tier section gives the control plane; the rest of it is for the data plane
_TIER_POLICY_KEYS = {"eviction", "admission"}
_KEYS = {
    "": {"cpu", "ssd", "remote", "eviction", "admission", "prefetch", "write_policy", "selective_hits", "transfer"},
    "cpu": _CAPACITY_KEYS | _TIER_POLICY_KEYS | {"pin_memory"},
    "ssd": _CAPACITY_KEYS | _TIER_POLICY_KEYS | {"dirs", "io_threads", "files_per_dir", "direct_io", "fsync",
                                                 "preallocate", "max_bytes", "recovery_check", "compact_min_records"},
    "remote": REMOTE_KEYS,
    "transfer": {"backend"},
}
_LOWER_TIERS = ("ssd", "remote")
_BACKENDS = ("auto", "torch", "triton")
_POLICY_DEFAULTS = {"eviction": "lru", "admission": "always", "prefetch": "none", "write_policy": "write_through",
                    "selective_hits": 2}


class KVRuntime:
    def __init__(
        self,
        config: Mapping[str, Any],
        *,
        namespace: Namespace,
        block_bytes: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = _validated(config)
        self.namespace = namespace
        self.clock = clock
        self._manager: CacheManager | None = None
        self.engine: TransferEngine | None = None
        self.discovery: RemoteDiscovery | None = None
        self.layout: kernels.KVLayout | None = None
        #: blocks found in the SSD store at start and taken into the manager
        self.adopted = 0
        if block_bytes is not None:
            self._start(block_bytes)

    # ---------------------------------------------------------------- set-up

    def _start(self, block_bytes: int) -> None:
        cfg = self.config
        policies = {name: cfg[name] for name in _POLICY_DEFAULTS}
        blocks = {name: tier_capacity_blocks(name, _capacity(cfg[name], name), block_bytes)
                  for name in ("cpu", *_LOWER_TIERS) if cfg.get(name)}
        engine = start_data_plane(cfg, namespace=self.namespace, block_bytes=block_bytes, blocks=blocks,
                                  ssd_dirs=cfg["ssd"]["dirs"] if cfg.get("ssd") else (), parent_of=self._parent_of)
        store, tier, remote = engine.ssd, engine.remote, cfg.get("remote")
        try:
            manager = build_manager(tiers=_tier_specs(cfg, blocks), **policies, data_plane=engine,
                                    clock=self.clock, block_bytes=block_bytes, allow_offline=False)
            if store is not None:
                self.adopted = manager.adopt(TierKind.SSD, store.recovered)
        except BaseException:
            engine.shutdown()
            raise
        self.engine, self._manager = engine, manager
        if tier is not None:
            self.discovery = RemoteDiscovery(tier.store, [self.namespace], max_blocks=remote["discovery_max_blocks"],
                                             clock=self.clock)
        log.info("KV runtime %s: blocks of %d bytes, tier capacities %s; %d blocks adopted from SSD",
                 self.namespace.tag, block_bytes, blocks, self.adopted)

    def register_kv_caches(self, layers: Sequence[torch.Tensor]) -> kernels.KVLayout:
        """Register the engine's per-layer KV tensors (starting the tiers if the block size was not given)."""
        layout = kernels.KVLayout.from_layers(layers)
        if self._manager is None:
            self._start(layout.block_bytes)
        self.layout = self.engine.register_kv_caches(layers)
        return self.layout

    @property
    def manager(self) -> CacheManager:
        if self._manager is None:
            raise RuntimeError("KV runtime not started: pass block_bytes or call register_kv_caches first")
        return self._manager

    @property
    def block_bytes(self) -> int:
        return self.manager.block_bytes

    def _parent_of(self, key: Hashable) -> Hashable | None:
        """Parent key of a block, for the SSD metadata; called by the engine's ``submit``, i.e. on this thread."""
        block = self._manager.index.get(key)
        return block.parent.key if block is not None and block.parent is not None else None

    # ---------------------------------------------------------------- discovery

    def discover(self, request_id: Hashable, keys: Sequence[Hashable]) -> int | None:
        """Look for a request's blocks in the remote store, which other engines fill too.

        None while the store is being asked (in the background): call again
        (or ``poll``) later. Then the number of blocks adopted into the REMOTE
        tier, which the next ``manager.lookup`` sees; 0 without a remote tier.
        One ask per request id (see ``RemoteDiscovery.find``).
        """
        if self.discovery is None:
            return 0
        return self.discovery.find(self.manager, request_id, keys)

    # ------------------------------------------------------------- completions

    def poll(self) -> list[RequestDone]:
        """Hand every finished transfer to the manager and adopt what discovery found;
        returns the requests whose loads/stores are done."""
        if self.discovery is not None:
            self.discovery.settle(self.manager)
        return self._drain()[1]

    def _drain(self) -> tuple[int, list[RequestDone]]:
        """(transfers handed to the manager, requests done)."""
        manager = self.manager
        finished = self.engine.poll()
        events: list[RequestDone] = []
        for op_id, failed in finished:
            events.extend(manager.complete(op_id, failed))
        return len(finished), events

    def flush(self, timeout: float | None = None) -> list[RequestDone]:
        """Run every op to the end, including those that completions start (write-through copies), then poll.

        Stops early (with a warning) on timeout; ``manager.ops_in_flight`` then says what is left.
        """
        manager = self.manager
        deadline = None if timeout is None else time.monotonic() + timeout
        events: list[RequestDone] = []
        while True:
            busy = self.engine.busy  # read before draining: an idle engine has queued all its completions
            finished, done = self._drain()
            events.extend(done)
            if not manager.ops_in_flight:
                return events
            if not busy and not finished:
                log.error("%d ops held by the control plane, none running: nothing can finish them",
                          manager.ops_in_flight)
                return events
            remaining = None if deadline is None else deadline - time.monotonic()
            if (remaining is not None and remaining <= 0) or not self.engine.flush(remaining):
                log.warning("flush timed out with %d ops in flight", manager.ops_in_flight)
                return events

    def shutdown(self, timeout: float | None = 60.0) -> list[RequestDone]:
        """Finish in-flight ops (releasing their pins), then stop every thread and close the stores."""
        if self.engine is None:
            return []
        events = self.flush(timeout)
        if self.discovery is not None:
            self.discovery.close()
            self.discovery = None
        self.engine.shutdown()
        self.engine = None
        if self._manager.ops_in_flight:
            log.warning("shut down with %d ops unfinished", self._manager.ops_in_flight)
        return events

    def __enter__(self) -> KVRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ----------------------------------------------------------------- metrics

    def prometheus_text(self) -> str:
        """Transfer, SSD and remote metrics plus per-tier occupancy and counters, in Prometheus text format."""
        lines = [self.engine.prometheus_text().rstrip("\n")]
        lines += ["# HELP flexkv_tier_used_blocks Blocks resident or in flight per tier.",
                  "# TYPE flexkv_tier_used_blocks gauge"]
        lines += [f'flexkv_tier_used_blocks{{tier="{tier}"}} {used}' for tier, used in self.manager.occupancy().items()]
        tier_stats = {kind.name: tier.stats.as_dict() for kind, tier in self.manager.tiers.items()}
        for field in next(iter(tier_stats.values())):
            name = f"flexkv_tier_{field}_total"
            lines += [f"# HELP {name} Control plane: {field.replace('_', ' ')} per tier.", f"# TYPE {name} counter"]
            lines += [f'{name}{{tier="{tier}"}} {stats[field]}' for tier, stats in tier_stats.items()]
        manager_stats = asdict(self.manager.stats)
        name = "flexkv_block_hits_total"
        lines += [f"# HELP {name} Control plane: block accesses served, by the fastest tier holding the block.",
                  f"# TYPE {name} counter"]
        lines += [f'{name}{{tier="{tier}"}} {hits}' for tier, hits in manager_stats.pop("block_hits").items()]
        for field, value in manager_stats.items():
            name = f"flexkv_{field}_total"
            lines += [f"# HELP {name} Control plane: {field.replace('_', ' ')}.", f"# TYPE {name} counter",
                      f"{name} {value}"]
        for field, value in (self.discovery.stats if self.discovery is not None else {}).items():
            name = f"flexkv_remote_discovery_{field}_total"
            lines += [f"# HELP {name} Remote discovery: {field.replace('_', ' ')}.", f"# TYPE {name} counter",
                      f"{name} {value}"]
        return "\n".join(lines) + "\n"


# -------------------------------------------------------------------- config


def _validated(config: Mapping[str, Any]) -> dict[str, Any]:
    """Plain dict with defaults filled in; unknown keys, bad names and bad policies fail here, clearly."""
    try:
        from omegaconf import DictConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf ships with hydra
        DictConfig = ()
    if isinstance(config, DictConfig):
        config = OmegaConf.to_container(config, resolve=True)
    cfg = {**_POLICY_DEFAULTS, "transfer": {"backend": "auto"}, **config}
    for section, allowed in _KEYS.items():
        value = cfg.get(section) if section else cfg
        if section in _LOWER_TIERS and value is None:
            continue
        if section == "cpu" and value is None:
            raise ValueError("runtime config needs a 'cpu' tier: {capacity_bytes: ...} or {capacity_blocks: ...}")
        if not isinstance(value, Mapping):
            raise ValueError(f"runtime config {section or 'root'!r} must be a mapping, got {value!r}")
        unknown = set(value) - allowed
        if unknown:
            raise ValueError(f"unknown runtime config keys {sorted(unknown)} in {section or 'root'!r}; "
                             f"valid keys: {sorted(allowed)}")
    cfg["cpu"], cfg["transfer"] = dict(cfg["cpu"]), {"backend": "auto", **cfg["transfer"]}
    if cfg["transfer"]["backend"] not in _BACKENDS:
        raise ValueError(f"transfer.backend must be one of {list(_BACKENDS)}, got {cfg['transfer']['backend']!r}")
    _capacity(cfg["cpu"], "cpu")
    if cfg.get("ssd"):
        ssd = cfg["ssd"] = dict(cfg["ssd"])
        _capacity(ssd, "ssd")
        dirs = ssd.get("dirs")
        if isinstance(dirs, str) or not isinstance(dirs, Sequence) or not dirs:
            raise ValueError(f"ssd.dirs must be a non-empty list of directories, got {dirs!r}")
        ssd["dirs"] = [str(d) for d in dirs]
    if cfg.get("remote"):
        cfg["remote"] = validated_remote(cfg["remote"])
        _capacity(cfg["remote"], "remote")
        if cfg.get("ssd") and cfg["write_policy"] == "write_back":
            raise ValueError("write_policy write_back cannot run with both an ssd and a remote tier: blocks evicted "
                             "from the SSD would move SSD->REMOTE, a link the data plane does not have")
    # A dry run on the real code path checks policy names, parameters and that none needs the future.
    build_manager(tiers=_tier_specs(cfg, {name: 1 for name in ("cpu", *_LOWER_TIERS) if cfg.get(name)}),
                  **{name: cfg[name] for name in _POLICY_DEFAULTS},
                  data_plane=ImmediateDataPlane(), clock=lambda: 0.0, block_bytes=1, allow_offline=False)
    return cfg


def start_data_plane(
    cfg: Mapping[str, Any],
    *,
    namespace: Namespace,
    block_bytes: int,
    blocks: Mapping[str, int],
    ssd_dirs: Sequence[str],
    parent_of: Callable[[Hashable], Hashable | None],
) -> TransferEngine:
    """The CPU pool, SSD store, remote tier and transfer engine of one process (one TP rank),
    from a validated config and the tiers' capacities in blocks. KVRuntime and the vLLM
    connector's worker side both start theirs here."""
    remote = cfg.get("remote")
    pool = CpuPool(blocks["cpu"], block_bytes, tail_bytes=TRAILER_BYTES if remote else 0,
                   pin=cfg["cpu"].get("pin_memory", "auto"))
    store = None
    if blocks.get("ssd"):
        store = SsdStore(list(ssd_dirs), namespace.tag, blocks["ssd"], block_bytes, **ssd_store_options(cfg["ssd"]))
    tier = None
    if remote:
        tier = RemoteTier(open_store(remote), namespace, block_bytes, batch_bytes=remote["batch_bytes"])
    return TransferEngine(pool, store, remote=tier, parent_of=parent_of, backend=cfg["transfer"]["backend"])


def ssd_store_options(ssd: Mapping[str, Any]) -> dict[str, Any]:
    """``SsdStore`` keyword arguments from a validated ``ssd`` section (not its capacity, dirs or policies)."""
    return {k: v for k, v in ssd.items() if k not in _CAPACITY_KEYS | _TIER_POLICY_KEYS | {"dirs"}}


def _tier_specs(cfg: Mapping[str, Any], blocks: Mapping[str, int]) -> dict[str, dict[str, Any]]:
    """``build_manager``'s view of the tiers: capacity in blocks plus any per-tier policy."""
    return {name: {"capacity_blocks": n, **{k: cfg[name][k] for k in _TIER_POLICY_KEYS if cfg[name].get(k)}}
            for name, n in blocks.items()}


def _capacity(spec: Mapping[str, Any], name: str) -> dict[str, int]:
    """The tier's capacity keys alone, as integers (YAML may give ``8e9`` as a float)."""
    capacity = {key: whole_number(f"{name}.{key}", spec[key]) for key in _CAPACITY_KEYS & set(spec)}
    if not capacity:
        raise ValueError(f"{name} tier needs capacity_bytes or capacity_blocks")
    return capacity
