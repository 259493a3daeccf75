"""SSD store throughput (checksummed block writes and verified reads) against `dd` on the same directory.

`python -m experiments bench ssd [--dir D --gib 1 --block-mib 2 --threads 4 --rounds 5]`.
Writes then reads back `--gib` of `--block-mib` blocks through the SsdStore (every
block read passes its checksum), and has `dd` write and read a file of the same
size with the same I/O size (`oflag=direct`/`iflag=direct`, or buffered where the
filesystem refuses O_DIRECT). A virtual disk's speed swings by tens of percent
from one second to the next, so one pass of each says little: each of `--rounds`
rounds writes with both, then reads with both, alternating which goes first, and
the rates reported are the medians over rounds (every pass is listed in `runs`).
dd reads into one reused buffer, the store into distinct CPU-pool rows; on a virtio
disk a read into physically scattered pages is slower (more descriptors per request),
so one dd process may read at half the store's rate and another at 1.3x, by the luck
of the pages its buffer gets (seen on a Firecracker guest): hence the medians.
The page cache is dropped before every pass when permitted. With `--fsync batch`
the store syncs each batch and dd ends with `conv=fdatasync`. GB/s are 1e9
bytes of block payload per second. The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from experiments.bench._args import positive, whole
from experiments.common import PROJECT_ROOT
from flexkv_runtime.control.keys import Namespace
from flexkv_runtime.data.cpu_pool import CpuPool
from flexkv_runtime.data.ssd_store import SsdStore

MIB = 1 << 20


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments bench ssd", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=PROJECT_ROOT / "outputs" / "bench" / "ssd",
                        help="directory on the filesystem to measure (a scratch subdirectory is removed afterwards)")
    parser.add_argument("--gib", type=positive, default=1.0, help="data written and read back, GiB")
    parser.add_argument("--block-mib", type=positive, default=2.0, help="block (and dd I/O) size, MiB")
    parser.add_argument("--threads", type=whole, default=4, help="store reader threads, and as many writers")
    parser.add_argument("--batch", type=whole, default=16, help="blocks per store call (one transfer op)")
    parser.add_argument("--files-per-dir", type=whole, default=1)
    parser.add_argument("--fsync", choices=["batch", "none"], default="batch")
    parser.add_argument("--rounds", type=whole, default=5, help="passes of each kind; rates are their medians")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    args.block_bytes = int(args.block_mib * MIB)
    args.blocks = int(args.gib * 1024 * MIB) // args.block_bytes
    if args.block_bytes < 1 or args.blocks < 1:
        parser.error(f"--gib {args.gib} does not hold one block of --block-mib {args.block_mib}")
    if args.dir.exists() and not args.dir.is_dir():
        parser.error(f"--dir {args.dir} is not a directory")
    return args


def _drop_page_cache() -> bool:
    """Empty the page cache so reads come from the device; False where not permitted."""
    subprocess.run(["sync"], check=False)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


def _store_phase(args, what: str, call: Callable[[list[int]], list[bool]]) -> float:
    """Run ``call`` over the blocks in batches; returns seconds. Every block must succeed."""
    batches = [list(range(i, min(i + args.batch, args.blocks))) for i in range(0, args.blocks, args.batch)]
    bar = tqdm(total=args.blocks * args.block_bytes, unit="B", unit_scale=True, desc=f"store {what}",
               disable=args.no_progress)
    start = time.perf_counter()
    for slots in batches:
        ok = call(slots)
        if not all(ok):
            raise RuntimeError(f"store {what}: {ok.count(False)} blocks failed; see the log")
        bar.update(len(slots) * args.block_bytes)
    seconds = time.perf_counter() - start
    bar.close()
    return seconds


def _dd(args, path: Path, write: bool, direct: bool) -> tuple[float, bool]:
    """Time one dd pass; retries without O_DIRECT if the filesystem refuses it. Returns (seconds, direct)."""
    flag = ("oflag=direct" if write else "iflag=direct") if direct else None
    ends = ["if=/dev/zero", f"of={path}"] if write else [f"if={path}", "of=/dev/null"]
    # later rounds overwrite the file in place, as the store overwrites its slots
    conv = ["conv=notrunc,fdatasync" if args.fsync == "batch" else "conv=notrunc"] if write else []
    command = ["dd", *ends, f"bs={args.block_bytes}", f"count={args.blocks}", "status=none", *conv]
    start = time.perf_counter()
    done = subprocess.run(command + ([flag] if flag else []), capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        if direct and "Invalid argument" in done.stderr:
            print(f"dd {'write' if write else 'read'}: the filesystem refuses O_DIRECT; measuring buffered I/O")
            return _dd(args, path, write, direct=False)
        raise RuntimeError(f"dd failed: {done.stderr.strip()}")
    return seconds, direct


def main(argv: list[str]) -> int:
    args = _parse(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="flexkv-bench-ssd-", dir=args.dir))
    nbytes = args.blocks * args.block_bytes
    seconds: dict[str, list[float]] = {"write": [], "dd_write": [], "read": [], "dd_read": []}
    dd_direct = True

    def dd_pass(write: bool) -> float:
        nonlocal dd_direct
        took, dd_direct = _dd(args, work / "dd.bin", write, dd_direct)
        return took

    try:
        pool = CpuPool(args.blocks, args.block_bytes, pin=False)
        pool.tensor.random_(0, 256)  # incompressible payload
        keys = list(range(1, args.blocks + 1))
        store = SsdStore([work / "store"], Namespace(model="bench-ssd").tag, args.blocks, args.block_bytes,
                         io_threads=args.threads, files_per_dir=args.files_per_dir, fsync=args.fsync)
        passes = {
            "write": lambda: _store_phase(args, "write", lambda slots: store.write(
                slots, [keys[s] for s in slots], [None] * len(slots), pool.rows(slots))),
            "read": lambda: _store_phase(args, "read", lambda slots: store.read(
                slots, [keys[s] for s in slots], pool.rows(slots))),
            "dd_write": lambda: dd_pass(write=True),
            "dd_read": lambda: dd_pass(write=False),
        }
        try:
            for round_ in range(args.rounds):
                # alternating who goes first spreads the disk's drift, and the age of the data read, evenly
                order = ["", "dd_"] if round_ % 2 == 0 else ["dd_", ""]
                for phase in ("write", "read"):
                    for who in order:
                        dropped = _drop_page_cache()
                        seconds[who + phase].append(passes[who + phase]())
            direct = store.direct_io
        finally:
            store.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rates = {name: statistics.median(nbytes / s / 1e9 for s in taken) for name, taken in seconds.items()}
    runs = {name: [round(nbytes / s / 1e9, 4) for s in taken] for name, taken in seconds.items()}
    print(f"{args.blocks} blocks x {args.block_bytes / MIB:g} MiB = {nbytes / 2**30:.2f} GiB in {args.dir}; "
          f"store O_DIRECT={direct}, dd O_DIRECT={dd_direct}, fsync={args.fsync}, "
          f"{args.threads} reader + {args.threads} writer threads; page cache dropped={dropped}; "
          f"every block read back passed its checksum; medians of {args.rounds} rounds")
    print(f"{'phase':<8}{'store GB/s':>12}{'dd GB/s':>10}{'store/dd':>10}   passes (store | dd)")
    for phase in ("write", "read"):
        ours, theirs = rates[phase], rates["dd_" + phase]
        print(f"{phase:<8}{ours:>12.3f}{theirs:>10.3f}{ours / theirs:>10.2f}   {runs[phase]} | {runs['dd_' + phase]}")
    print(json.dumps({
        "write_gbps": round(rates["write"], 4),
        "read_gbps": round(rates["read"], 4),
        "dd_write_gbps": round(rates["dd_write"], 4),
        "dd_read_gbps": round(rates["dd_read"], 4),
        "read_ratio": round(rates["read"] / rates["dd_read"], 4),
        "write_ratio": round(rates["write"] / rates["dd_write"], 4),
        "direct_io": direct,
        "dd_direct_io": dd_direct,
        "page_cache_dropped": dropped,
        "fsync": args.fsync,
        "bytes": nbytes,
        "rounds": args.rounds,
        "runs": runs,
    }))
    return 0
