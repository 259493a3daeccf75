"""The machine under the cache: GPUs, tier capacities and the links between tiers.

A ``Link`` is one direction of one path (PCIe host-to-device, one NVMe device's
reads, a NIC's receive side). Ops queue for one of ``queue_depth`` slots, pay
their per-op latency in parallel and then share the bandwidth first come, first
served. ``Striped`` spreads an op's blocks over several devices (an SSD array).
"""
from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from flexkv_sim.checks import require


def _build(cls: type, cfg: Mapping[str, Any], where: str) -> Any:
    """``cls`` from a config section; errors name the section (``hierarchy.pcie.h2d: ...``)."""
    names = {f.name for f in fields(cls)}
    unknown = set(cfg) - names
    if unknown:
        raise ValueError(f"unknown {where} keys {sorted(unknown)}; valid: {sorted(names)}")
    try:
        return cls(**cfg)
    except ValueError as exc:
        raise ValueError(f"hierarchy.{where}: {exc}") from None


@dataclass(frozen=True)
class LinkSpec:
    bandwidth: float  # bytes per second
    latency_s: float = 0.0  # per op: launch, seek or round trip
    queue_depth: int = 1  # ops in flight at once

    def __post_init__(self) -> None:
        require(self, positive=["bandwidth"], non_negative=["latency_s"], whole=["queue_depth"])


@dataclass(frozen=True)
class GpuSpec:
    """The accelerators of one engine instance (``count`` GPUs in tensor parallel)."""

    name: str = "gpu"
    count: int = 1
    hbm_bytes: float = 80e9
    hbm_bandwidth: float = 3.35e12
    peak_flops: float = 989e12
    mfu: float = 0.5  # achieved share of peak FLOP/s
    mbu: float = 0.8  # achieved share of HBM bandwidth
    memory_utilization: float = 0.9  # share of HBM the engine may use (weights + KV)
    step_overhead_s: float = 0.001  # scheduling and launch cost of one step
    copies_overlap_compute: bool = True  # KV copies run beside the forward (copy engines); false on a CPU box
    kv_capacity_blocks: int | None = None  # fixes the KV pool instead of deriving it from HBM

    def __post_init__(self) -> None:
        require(self, positive=["hbm_bytes", "hbm_bandwidth", "peak_flops"], non_negative=["step_overhead_s"],
                whole=["count", "kv_capacity_blocks"], fraction=["mfu", "mbu", "memory_utilization"])

    def kv_blocks(self, weight_bytes: float, block_bytes: int) -> int:
        """GPU KV blocks: the HBM the engine may use, less the weights."""
        if self.kv_capacity_blocks is not None:
            return int(self.kv_capacity_blocks)
        blocks = int((self.count * self.hbm_bytes * self.memory_utilization - weight_bytes) // block_bytes)
        if blocks <= 0:
            raise ValueError(f"{weight_bytes / 1e9:.1f} GB of weights leave no KV room on {self.count} x "
                             f"{self.name} at memory_utilization {self.memory_utilization}")
        return blocks


@dataclass(frozen=True)
class SsdSpec:
    capacity: Mapping[str, Any]  # capacity_bytes or capacity_blocks, all devices together
    devices: int
    read: LinkSpec  # per device
    write: LinkSpec

    def __post_init__(self) -> None:
        require(self, whole=["devices"])
        object.__setattr__(self, "devices", int(self.devices))  # YAML may give 4.0


@dataclass(frozen=True)
class RemoteSpec:
    """A KV pool shared by all instances, reached over each instance's NIC."""

    capacity: Mapping[str, Any]
    network: LinkSpec  # per instance and direction


CAPACITY_KEYS = ("capacity_bytes", "capacity_blocks")


def _section(cfg: Mapping[str, Any], name: str, allowed: tuple[str, ...]) -> tuple[Mapping[str, Any], dict | None]:
    """A tier's section and its capacity keys (None when the tier is absent: missing or zero)."""
    section = cfg.get(name) or {}
    unknown = set(section) - set(CAPACITY_KEYS) - set(allowed)
    if unknown:
        raise ValueError(f"unknown {name} keys {sorted(unknown)}; valid: {sorted(CAPACITY_KEYS + allowed)}")
    capacity = {k: section[k] for k in CAPACITY_KEYS if section.get(k)}
    return section, capacity or None


@dataclass(frozen=True)
class HardwareSpec:
    """One engine instance's hardware; ``h2d``/``d2h`` are per GPU and scale with the GPU count."""

    name: str
    gpu: GpuSpec
    h2d: LinkSpec
    d2h: LinkSpec
    cpu: Mapping[str, Any] | None
    ssd: SsdSpec | None = None
    remote: RemoteSpec | None = None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> HardwareSpec:
        known = {"name", "gpu", "pcie", "cpu", "ssd", "remote"}
        unknown = set(cfg) - known
        if unknown:
            raise ValueError(f"unknown hierarchy keys {sorted(unknown)}; valid: {sorted(known)}")
        pcie = cfg["pcie"]
        _, cpu = _section(cfg, "cpu", ())
        ssd_cfg, ssd_capacity = _section(cfg, "ssd", ("devices", "read", "write"))
        remote_cfg, remote_capacity = _section(cfg, "remote", ("network",))
        ssd = remote = None
        if ssd_capacity:
            read, write = _build(LinkSpec, ssd_cfg["read"], "ssd.read"), _build(LinkSpec, ssd_cfg["write"], "ssd.write")
            try:
                ssd = SsdSpec(ssd_capacity, ssd_cfg.get("devices", 1), read, write)
            except ValueError as exc:
                raise ValueError(f"hierarchy.ssd: {exc}") from None
        if remote_capacity:
            remote = RemoteSpec(remote_capacity, _build(LinkSpec, remote_cfg["network"], "remote.network"))
        if cpu is None and (ssd or remote):
            raise ValueError(f"hierarchy.cpu has no capacity but the {'SSD' if ssd else 'remote'} tier has one: every "
                             "load and store goes through the CPU tier; give it a capacity, or set the slower tiers' "
                             "capacity to 0 too (GPU prefix cache only)")
        return cls(
            name=cfg.get("name", "hardware"),
            gpu=_build(GpuSpec, cfg.get("gpu") or {}, "gpu"),
            h2d=_build(LinkSpec, pcie["h2d"], "pcie.h2d"),
            d2h=_build(LinkSpec, pcie["d2h"], "pcie.d2h"),
            cpu=cpu,
            ssd=ssd,
            remote=remote,
        )


class Link:
    """One direction of one path, with a queue depth and a shared bandwidth.

    This is a SimPy ``Resource(capacity=queue_depth)`` in front of a
    first-come-first-served pipe, resolved in closed form: every op of a link
    pays the same latency, so ops reach the pipe, finish and free their slots in
    the order they were reserved. An op's end time is therefore known when it is
    reserved, and moving it costs the caller one timeout instead of a queue of
    resource events (``tests/sim/test_hardware.py`` checks the equivalence).
    """

    def __init__(self, name: str, spec: LinkSpec, scale: int = 1) -> None:
        self.name = name
        self.bandwidth = spec.bandwidth * scale
        self.latency_s = spec.latency_s
        self.queue_depth = spec.queue_depth
        self._ends: deque[float] = deque()  # ends of the ops holding a slot, ascending
        self._pipe_free = 0.0
        self.ops = 0
        self.bytes = 0
        self.busy_s = 0.0  # seconds the pipe moved bytes

    @property
    def last_end(self) -> float:
        """When the last op reserved so far ends."""
        return self._pipe_free

    def reserve(self, nbytes: int, now: float) -> float:
        """Queue an op of ``nbytes`` submitted at ``now``; returns when it ends."""
        ends = self._ends
        while ends and ends[0] <= now:
            ends.popleft()
        slot = ends[-self.queue_depth] if len(ends) >= self.queue_depth else now
        duration = nbytes / self.bandwidth
        start = slot + self.latency_s
        if start < self._pipe_free:
            start = self._pipe_free
        end = self._pipe_free = start + duration
        ends.append(end)
        self.ops += 1
        self.bytes += nbytes
        self.busy_s += duration
        return end


class Striped:
    """Blocks spread over devices by slot number, as a block store lays them out on an SSD array."""

    def __init__(self, devices: Sequence[Link]) -> None:
        self.devices = list(devices)

    def reserve(self, slots: Sequence[int], block_bytes: int, now: float) -> float:
        n = len(self.devices)
        if n == 1:
            return self.devices[0].reserve(len(slots) * block_bytes, now)
        counts = [0] * n
        for slot in slots:
            counts[slot % n] += 1
        latest = None
        for device, count in zip(self.devices, counts):
            if count:
                end = device.reserve(count * block_bytes, now)
                if latest is None or end > latest:
                    latest = end
        return latest
