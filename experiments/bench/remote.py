"""REMOTE tier throughput (batch store and load through our tier code) against each store's own client.

`python -m experiments bench remote [--backends mooncake,redis --value-mib 1,4 --batch 16 --reps 6]`.
Starts each store on free loopback ports (Mooncake: a master and one storage
node, TCP, P2P handshake; Redis without persistence), then, for every value
size, alternates in each repetition:

- ours: ``RemoteTier.write`` and ``read`` of ``--batch`` blocks from and into a
  CPU pool, the calls ``TransferEngine``'s CPU->REMOTE and REMOTE->CPU workers
  make for one op (trailers, the reader's checksums, the timeout guard and its
  thread). The runtime seals a block (hashes it into its trailer) once it is in
  the CPU pool, on a sealer thread that runs alongside the links, not in the
  put; so the sealing of each repetition's blocks is timed apart, before the
  store, and ``store+seal`` counts it in, as if the put paid for it;
- raw: the backend's own client doing the same batch calls on the same bytes:
  Mooncake ``batch_put_from`` / ``batch_get_into`` on a registered buffer
  (zero-copy), Redis a pipeline of ``SET``s from the buffer rows and one
  ``MGET`` whose values are copied into the rows (a get into preallocated
  buffers, which is the job).

Keys are fresh for every repetition and deleted after it. GB/s are 1e9 bytes of
block payload per second, the median over repetitions and sizes; a ratio is the
median of ours / raw within each repetition, where both ran back to back, so
other load on the machine cancels out. The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from flexkv_runtime.control.keys import Namespace
from flexkv_runtime.data.cpu_pool import CpuPool
from flexkv_runtime.data.remote import RemoteTier, open_store, validated_remote
from flexkv_runtime.data.remote.trailer import TRAILER_BYTES, remote_key
from experiments.local_stores import LocalStore, start_store

MIB = 1 << 20
NAMESPACE = Namespace(model="bench-remote")


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments bench remote", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="mooncake,redis", help="comma-separated: mooncake, redis")
    parser.add_argument("--value-mib", default="1,4", help="comma-separated block sizes, MiB")
    parser.add_argument("--batch", type=int, default=16, help="blocks per batch call (one transfer op)")
    parser.add_argument("--reps", type=int, default=8, help="repetitions per size, ours and raw alternating")
    parser.add_argument("--batch-mib", type=float, default=None,
                        help="the tier's remote.batch_bytes, MiB (default: the runtime's default)")
    args = parser.parse_args(argv)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    args.block_bytes = [int(float(v) * MIB) for v in args.value_mib.split(",")]
    args.batch_bytes = None if args.batch_mib is None else int(args.batch_mib * MIB)
    if args.batch <= 0 or args.reps <= 0 or not args.backends or min(args.block_bytes) <= 0:
        parser.error("--batch, --reps and --value-mib must be positive, --backends not empty")
    return args


class Ours:
    """The REMOTE tier's own calls, as ``TransferEngine``'s CPU<->REMOTE workers make them for an op."""

    def __init__(self, store: LocalStore, block_bytes: int, batch: int, batch_bytes: int | None) -> None:
        self.pool = CpuPool(2 * batch, block_bytes, tail_bytes=TRAILER_BYTES, pin=False)
        self.pool.tensor.random_(0, 256)
        remote = validated_remote(store.remote(timeout_s=30.0, **({} if batch_bytes is None else
                                                                   {"batch_bytes": batch_bytes})))
        self.tier = RemoteTier(open_store(remote), NAMESPACE, block_bytes, batch_bytes=remote["batch_bytes"])
        self.tier.attach(self.pool.memory)
        self.sources = self.pool.rows_with_tails(list(range(batch)))
        self.targets = self.pool.rows_with_tails(list(range(batch, 2 * batch)))

    def arrive(self, keys: list[int]) -> None:
        """What the sealer thread does once blocks from the engine are in the pool."""
        self.tier.codec.seal(self.sources, keys)

    def store(self, keys: list[int]) -> None:
        if not all(self.tier.write(keys, self.sources)):
            raise RuntimeError("store: blocks failed; see the log")

    def load(self, keys: list[int]) -> None:
        hits, _ = self.tier.read(keys, self.targets)
        if not all(hits):
            raise RuntimeError("load: blocks failed; see the log")

    def check(self) -> None:
        if not all(np.array_equal(a, b) for a, b in zip(self.sources, self.targets)):
            raise RuntimeError("blocks loaded back differ from those stored")

    def close(self) -> None:
        self.tier.close()


class RawMooncake:
    def __init__(self, store: LocalStore, block_bytes: int, batch: int) -> None:
        self.client = store.raw()
        self.block_bytes = block_bytes
        self.rows = np.random.default_rng(0).integers(0, 256, (2 * batch, block_bytes), dtype=np.uint8)
        if self.client.register_buffer(self.rows.ctypes.data, self.rows.nbytes) != 0:
            raise RuntimeError("Mooncake register_buffer failed")
        self.src = [row.ctypes.data for row in self.rows[:batch]]
        self.dst = [row.ctypes.data for row in self.rows[batch:]]

    def store(self, names: list[str]) -> None:
        codes = self.client.batch_put_from(names, self.src, [self.block_bytes] * len(names))
        if any(codes):
            raise RuntimeError(f"raw Mooncake put failed: {codes}")

    def load(self, names: list[str]) -> None:
        codes = self.client.batch_get_into(names, self.dst, [self.block_bytes] * len(names))
        if any(code != self.block_bytes for code in codes):
            raise RuntimeError(f"raw Mooncake get failed: {codes}")

    def delete(self, names: list[str]) -> None:
        self.client.batch_remove(names, True)

    def close(self) -> None:
        self.client.unregister_buffer(self.rows.ctypes.data)


class RawRedis:
    def __init__(self, store: LocalStore, block_bytes: int, batch: int) -> None:
        self.client = store.raw()
        self.rows = np.random.default_rng(0).integers(0, 256, (2 * batch, block_bytes), dtype=np.uint8)
        self.batch = batch

    def store(self, names: list[str]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for name, row in zip(names, self.rows):
            pipe.set(name, memoryview(row))
        if not all(pipe.execute()):
            raise RuntimeError("raw Redis SET failed")

    def load(self, names: list[str]) -> None:
        for value, row in zip(self.client.mget(names), self.rows[self.batch :]):
            row[:] = np.frombuffer(value, np.uint8)

    def delete(self, names: list[str]) -> None:
        self.client.delete(*names)

    def close(self) -> None:
        """The client belongs to the local store."""


RAW = {"mooncake": RawMooncake, "redis": RawRedis}


def _timed(call: Callable[[], None]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def bench_backend(backend: str, args: argparse.Namespace, log_dir: Path) -> dict[str, dict[str, list[float]]]:
    """GB/s per op and side, one figure per repetition (sizes one after the other)."""
    rates = {op: {"ours": [], "raw": []} for op in ("store", "store+seal", "load")}
    with start_store(backend, log_dir, segment="2 GB") as store:
        for block_bytes in args.block_bytes:
            ours = Ours(store, block_bytes, args.batch, args.batch_bytes)
            raw = RAW[backend](store, block_bytes, args.batch)
            try:
                for rep in range(-1, args.reps):  # rep -1 warms connections and the store's memory up
                    keys = [(rep + 2) * 1_000_003 + block_bytes + i for i in range(args.batch)]
                    raw_names = [f"bench-raw/{block_bytes}/{rep}/{i}" for i in range(args.batch)]
                    sides = [("ours", ours, keys), ("raw", raw, raw_names)]
                    for op in ("store", "load"):
                        for side, impl, names in sides if rep % 2 else sides[::-1]:
                            sealing = _timed(lambda: ours.arrive(keys)) if op == "store" and side == "ours" else 0.0
                            took = _timed(lambda: getattr(impl, op)(names))
                            if rep >= 0:
                                rates[op][side].append(args.batch * block_bytes / took / 1e9)
                                if op == "store":
                                    rates["store+seal"][side].append(args.batch * block_bytes / (took + sealing) / 1e9)
                    if rep == -1:
                        ours.check()
                    raw.delete(raw_names + [remote_key(NAMESPACE, k) for k in keys])
            finally:
                ours.close()
                raw.close()
    return rates


def main(argv: list[str]) -> int:
    args = _parse(argv)
    result: dict[str, float | int | str] = {}
    with tempfile.TemporaryDirectory(prefix="flexkv-bench-remote-") as log_dir:
        for backend in args.backends:
            rates = bench_backend(backend, args, Path(log_dir))
            print(f"{backend}: {args.batch} blocks per batch, sizes {args.value_mib} MiB, {args.reps} repetitions")
            print(f"{'op':<11}{'ours GB/s':>11}{'raw GB/s':>10}{'ours/raw':>10}")
            for op, sides in rates.items():
                ours, raw = statistics.median(sides["ours"]), statistics.median(sides["raw"])
                ratio = statistics.median(o / r for o, r in zip(sides["ours"], sides["raw"]))
                print(f"{op:<11}{ours:>11.3f}{raw:>10.3f}{ratio:>10.2f}")
                name = op.replace("+", "_with_")
                result[f"{backend}_{name}_ratio"] = round(ratio, 4)
                result[f"{backend}_{name}_gbps"] = round(ours, 4)
                if op != "store+seal":
                    result[f"{backend}_raw_{op}_gbps"] = round(raw, 4)
    result |= {"batch": args.batch, "value_mib": args.value_mib, "reps": args.reps}
    print(json.dumps(result))
    return 0
