"""REMOTE tier throughput (batch store and load through our tier code) against each store's own client.

`python -m experiments bench remote [--backends mooncake,redis --value-mib 1,4 --batch 16 --ops 4 --reps 12]`.
Starts each store on free loopback ports (Mooncake: a master and one storage
node, TCP, P2P handshake; Redis without persistence), then, for every value
size, alternates in each repetition, each side running ``--ops`` ops of
``--batch`` blocks back to back:

- ours: ``RemoteTier.write`` and ``read`` of each op's blocks from and into a
  CPU pool, the calls ``TransferEngine``'s CPU->REMOTE and REMOTE->CPU workers
  make (trailers, the reader's checksums, the timeout guard and its thread).
  The runtime seals a block (hashes it into its trailer) once it is in the CPU
  pool, on a sealer thread that runs alongside the links. ``store`` times the
  link alone (the blocks sealed beforehand); ``store+seal`` times the ops as the
  runtime runs them, a sealer thread sealing the next op's blocks while this
  op's are put, the first op's sealing included;
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
import itertools
import json
import statistics
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from flexkv_runtime.control.keys import Namespace
from flexkv_runtime.data.cpu_pool import CpuPool
from flexkv_runtime.data.remote import RemoteTier, open_store, validated_remote
from flexkv_runtime.data.remote.trailer import TRAILER_BYTES, remote_key
from experiments.bench._args import positive, whole
from experiments.local_stores import LocalStore, start_store

MIB = 1 << 20
NAMESPACE = Namespace(model="bench-remote")
OPS = ("store", "store+seal", "load")


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments bench remote", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="mooncake,redis", help="comma-separated: mooncake, redis")
    parser.add_argument("--value-mib", default="1,4", help="comma-separated block sizes, MiB")
    parser.add_argument("--batch", type=whole, default=16, help="blocks per batch call (one transfer op)")
    parser.add_argument("--ops", type=whole, default=4, help="ops per side and repetition, back to back")
    parser.add_argument("--reps", type=whole, default=12, help="repetitions per size, ours and raw alternating")
    parser.add_argument("--batch-mib", type=positive, default=None,
                        help="the tier's remote.batch_bytes, MiB (default: the runtime's default)")
    args = parser.parse_args(argv)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    args.block_bytes = [int(float(v) * MIB) for v in args.value_mib.split(",")]
    args.batch_bytes = None if args.batch_mib is None else int(args.batch_mib * MIB)
    if not args.backends or min(args.block_bytes) <= 0:
        parser.error("--value-mib must be positive, --backends not empty")
    return args


class Ours:
    """The REMOTE tier's own calls, as ``TransferEngine``'s CPU<->REMOTE workers make them for its ops."""

    def __init__(self, store: LocalStore, block_bytes: int, batch: int, ops: int, batch_bytes: int | None) -> None:
        self.pool = CpuPool((ops + 1) * batch, block_bytes, tail_bytes=TRAILER_BYTES, pin=False)
        self.pool.tensor.random_(0, 256)
        remote = validated_remote(store.remote(timeout_s=30.0, **({} if batch_bytes is None else
                                                                   {"batch_bytes": batch_bytes})))
        self.tier = RemoteTier(open_store(remote), NAMESPACE, block_bytes, batch_bytes=remote["batch_bytes"])
        self.tier.attach(self.pool.memory)
        self.sources = [self.pool.rows_with_tails(list(range(op * batch, (op + 1) * batch))) for op in range(ops)]
        self.targets = self.pool.rows_with_tails(list(range(ops * batch, (ops + 1) * batch)))
        self.sealer = ThreadPoolExecutor(1, thread_name_prefix="flexkv-seal")

    def seal(self, keys: list[list[int]]) -> None:
        """What the runtime's sealer thread does once the ops' blocks from the engine are in the pool."""
        for rows, op_keys in zip(self.sources, keys):
            self.tier.codec.seal(rows, op_keys)

    def store(self, keys: list[list[int]]) -> None:
        for rows, op_keys in zip(self.sources, keys):
            self._write(op_keys, rows)

    def store_sealing(self, keys: list[list[int]]) -> None:
        """The ops as the runtime runs them: the sealer seals the next op's blocks while this op's are put."""
        seal = self.tier.codec.seal
        sealing = self.sealer.submit(seal, self.sources[0], keys[0])
        for op, (rows, op_keys) in enumerate(zip(self.sources, keys)):
            sealing.result()
            if op + 1 < len(keys):
                sealing = self.sealer.submit(seal, self.sources[op + 1], keys[op + 1])
            self._write(op_keys, rows)

    def _write(self, keys: list[int], rows: list[np.ndarray]) -> None:
        if not all(self.tier.write(keys, rows)):
            raise RuntimeError("store: blocks failed; see the log")

    def load(self, keys: list[list[int]]) -> None:
        for op_keys in keys:
            hits, _ = self.tier.read(op_keys, self.targets)
            if not all(hits):
                raise RuntimeError("load: blocks failed; see the log")

    def check(self) -> None:
        """The last op loaded is the last one stored: its blocks are back, byte for byte."""
        if not all(np.array_equal(a, b) for a, b in zip(self.sources[-1], self.targets)):
            raise RuntimeError("blocks loaded back differ from those stored")

    def close(self) -> None:
        self.sealer.shutdown()
        self.tier.close()


class Raw(ABC):
    """The backend's own client: ``ops`` batches of source rows and one of target rows."""

    def __init__(self, block_bytes: int, batch: int, ops: int) -> None:
        self.block_bytes, self.batch = block_bytes, batch
        self.rows = np.random.default_rng(0).integers(0, 256, ((ops + 1) * batch, block_bytes), dtype=np.uint8)
        self.sources = [self.rows[op * batch : (op + 1) * batch] for op in range(ops)]
        self.targets = self.rows[ops * batch :]

    def store(self, names: list[list[str]]) -> None:
        for rows, op_names in zip(self.sources, names):
            self.put(op_names, rows)

    def load(self, names: list[list[str]]) -> None:
        for op_names in names:
            self.get(op_names)

    @abstractmethod
    def put(self, names: list[str], rows: np.ndarray) -> None:
        """From ``rows``."""

    @abstractmethod
    def get(self, names: list[str]) -> None:
        """Into the target rows."""

    @abstractmethod
    def delete(self, names: list[str]) -> None:
        """The values a repetition stored, ours and raw."""

    @abstractmethod
    def close(self) -> None:
        """Give back what the client holds."""


class RawMooncake(Raw):
    def __init__(self, store: LocalStore, block_bytes: int, batch: int, ops: int) -> None:
        super().__init__(block_bytes, batch, ops)
        self.client = store.raw()
        if self.client.register_buffer(self.rows.ctypes.data, self.rows.nbytes) != 0:
            raise RuntimeError("Mooncake register_buffer failed")
        self.dst = [row.ctypes.data for row in self.targets]

    def put(self, names: list[str], rows: np.ndarray) -> None:
        codes = self.client.batch_put_from(names, [row.ctypes.data for row in rows], [self.block_bytes] * len(names))
        if any(codes):
            raise RuntimeError(f"raw Mooncake put failed: {codes}")

    def get(self, names: list[str]) -> None:
        codes = self.client.batch_get_into(names, self.dst, [self.block_bytes] * len(names))
        if any(code != self.block_bytes for code in codes):
            raise RuntimeError(f"raw Mooncake get failed: {codes}")

    def delete(self, names: list[str]) -> None:
        self.client.batch_remove(names, True)

    def close(self) -> None:
        self.client.unregister_buffer(self.rows.ctypes.data)


class RawRedis(Raw):
    def __init__(self, store: LocalStore, block_bytes: int, batch: int, ops: int) -> None:
        super().__init__(block_bytes, batch, ops)
        self.client = store.raw()

    def put(self, names: list[str], rows: np.ndarray) -> None:
        pipe = self.client.pipeline(transaction=False)
        for name, row in zip(names, rows):
            pipe.set(name, memoryview(row))
        if not all(pipe.execute()):
            raise RuntimeError("raw Redis SET failed")

    def get(self, names: list[str]) -> None:
        for value, row in zip(self.client.mget(names), self.targets):
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
    """GB/s per op kind and side, one figure per repetition (sizes one after the other)."""
    rates: dict[str, dict[str, list[float]]] = {op: {"ours": [], "raw": []} for op in OPS}
    batch, ops = args.batch, args.ops
    fresh = itertools.count(1)
    with start_store(backend, log_dir, segment="2 GB") as store:
        for block_bytes in args.block_bytes:
            ours = Ours(store, block_bytes, batch, ops, args.batch_bytes)
            raw = RAW[backend](store, block_bytes, batch, ops)
            payload = ops * batch * block_bytes
            try:
                for rep in range(-1, args.reps):  # rep -1 warms connections and the store's memory up
                    # fresh keys for both kinds of store (a put of a stored key is not a put); loads read the last
                    keys = {kind: [[next(fresh) for _ in range(batch)] for _ in range(ops)] for kind in OPS[:2]}
                    names = {kind: [[f"bench-raw/{next(fresh)}" for _ in range(batch)] for _ in range(ops)]
                             for kind in OPS[:2]}
                    ours.seal(keys["store"])
                    calls = {
                        "store": (lambda: ours.store(keys["store"]), lambda: raw.store(names["store"])),
                        "store+seal": (lambda: ours.store_sealing(keys["store+seal"]),
                                       lambda: raw.store(names["store+seal"])),
                        "load": (lambda: ours.load(keys["store+seal"]), lambda: raw.load(names["store+seal"])),
                    }
                    for kind, (ours_call, raw_call) in calls.items():
                        sides = [("ours", ours_call), ("raw", raw_call)]
                        for side, call in sides if rep % 2 else sides[::-1]:
                            took = _timed(call)
                            if rep >= 0:
                                rates[kind][side].append(payload / took / 1e9)
                    if rep == -1:
                        ours.check()
                    raw.delete([n for kind in names.values() for op_names in kind for n in op_names]
                               + [remote_key(NAMESPACE, k) for kind in keys.values() for op_keys in kind
                                  for k in op_keys])
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
            print(f"{backend}: {args.ops} ops of {args.batch} blocks, sizes {args.value_mib} MiB, "
                  f"{args.reps} repetitions")
            print(f"{'op':<11}{'ours GB/s':>11}{'raw GB/s':>10}{'ours/raw':>10}")
            for op, sides in rates.items():
                ours, raw = statistics.median(sides["ours"]), statistics.median(sides["raw"])
                ratio = statistics.median(o / r for o, r in zip(sides["ours"], sides["raw"]))
                print(f"{op:<11}{ours:>11.3f}{raw:>10.3f}{ratio:>10.2f}")
                name = op.replace("+", "_with_")
                result[f"{backend}_{name}_ratio"] = round(ratio, 4)
                result[f"{backend}_{name}_gbps"] = round(ours, 4)
                result[f"{backend}_raw_{name}_gbps"] = round(raw, 4)
    result |= {"batch": args.batch, "ops": args.ops, "value_mib": args.value_mib, "reps": args.reps}
    print(json.dumps(result))
    return 0
