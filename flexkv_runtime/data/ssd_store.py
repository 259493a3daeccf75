"""The SSD tier: block slots in preallocated files, checksummed and recoverable.

Layout. Each store directory ``D`` gets a private subdirectory
``D/flexkv-<namespace tag>/`` (mode 0700, checked on every start) holding
``blocks-<i>.dat`` data files, ``meta.log``, ``geometry.json`` and ``lock``.
Slot ``s`` lives in data file ``s % F`` (files interleaved over directories, so
blocks stripe round-robin over files and disks) at offset ``(s // F) * stride``.
A slot is a 4 KiB header page (magic, namespace tag, slot, key, generation,
checksum) followed by the block, padded to 4 KiB: O_DIRECT-friendly, and one
``pwritev``/``preadv`` per block. A different namespace uses a different
subdirectory and tag, so it never reads another namespace's blocks.

Integrity. Keys are unsigned 64-bit integers (what ``BlockKeyer`` makes). The
checksum is xxh3-64 of the block's bytes seeded with its key, so a block written
for one key never verifies as another. Every read checks the header and the
checksum; a block that fails is reported as failed (the control plane then
drops it) and a tombstone goes into the log.

Persistence. ``meta.log`` is an append-only log of fixed-size, CRC-protected
records (put: slot, key, parent key, checksum, generation; or delete: slot).
A put record is appended only after its data write has returned and, with
``fsync="batch"`` (the default), after ``fdatasync`` of the data files the batch
touched; the log itself is not fsync'd, since losing its tail only loses blocks.
With ``fsync="none"`` nothing is synced: safe against process crashes, and after
a power loss torn blocks are still caught by the checks below. At start the last
record of each slot wins (highest generation); each surviving block is checked
against its on-disk header (``recovery_check="header"``, one 4 KiB read per
block) or fully re-checksummed (``"full"``), so a torn write is dropped at
recovery, and anything that slips through is still caught on its first read. The
log is rewritten with only live records after recovery and whenever it grows past
``max(compact_min_records, 2 x live blocks)`` records; that much room is reserved
for it up front (``fallocate(KEEP_SIZE)``), so data filling a disk cannot starve
it. The control plane tells the store when it evicts or drops a block
(``forget``, through ``TransferEngine.release``), so a restart does not bring
it back.
A change of geometry (block size, slot count, directories) discards the blocks.

Failures. Out of space (ENOSPC, a short write, or the ``max_bytes`` cap that
emulates a tiny filesystem: a slot's space counts once it has been written) and
I/O errors fail only the block concerned; each kind is counted and logged once.

Concurrency. ``write``/``read`` take a batch, sort it by file offset and spread
it over a pool of writer (resp. reader) threads; they block until the batch is
done and are meant to be called from the transfer engine's worker threads. Two
stores may not open the same directory and namespace at once (``flock``).
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import logging
import math
import mmap
import os
import stat
import struct
import threading
import zlib
from collections.abc import Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import xxhash

log = logging.getLogger(__name__)

#: on-disk alignment unit: header page size, slot stride granularity, O_DIRECT alignment
ALIGN = 4096
FORMAT_VERSION = 1
_BLOCK_MAGIC = b"FKVBLK01"
_HEADER = struct.Struct("<8s8sQQQQQ")  # magic, namespace tag, slot, key, generation, checksum, block_bytes
_RECORD = struct.Struct("<4sBBxxQQQQQ")  # magic, kind, has_parent, slot, key, parent, checksum, generation
_RECORD_MAGIC = b"FKVL"
_CRC = struct.Struct("<I")
RECORD_BYTES = _RECORD.size + _CRC.size
_PUT, _DELETE = 1, 2
_FALLOC_FL_KEEP_SIZE = 1
_LIBC = ctypes.CDLL(None, use_errno=True)
DIRECT_IO_CHOICES = ("auto", True, False)
FSYNC_CHOICES = ("batch", "none")
RECOVERY_CHECKS = ("header", "full")


@dataclass
class SsdStats:
    blocks_written: int = 0
    blocks_read: int = 0
    bytes_written: int = 0
    bytes_read: int = 0
    #: writes refused for lack of space (ENOSPC, short write, max_bytes cap)
    no_space: int = 0
    write_errors: int = 0
    #: read I/O errors and short reads (a truncated file)
    read_errors: int = 0
    #: blocks whose header or checksum did not match what was written
    checksum_failures: int = 0
    #: reads of a slot that holds no block for that key
    unknown_blocks: int = 0
    recovered: int = 0
    dropped_at_recovery: int = 0
    bad_log_records: int = 0
    log_compactions: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(slots=True)
class _Entry:
    key: int
    parent: int | None
    checksum: int
    generation: int


class _StoreDir:
    """One directory's share of the store: its log, lock and counts."""

    def __init__(self, path: Path, direct: bool) -> None:
        self.path = path
        self.direct = direct
        self.log_path = path / "meta.log"
        self.lock = threading.Lock()  # log appends and compaction
        self.log_fd = -1
        self.log_size = 0
        self.records = 0
        self.live = 0


class _StoreError(Exception):
    """A block-level failure, tagged with the ``SsdStats`` counter it belongs to."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class SsdStore:
    def __init__(
        self,
        dirs: Sequence[str | os.PathLike],
        namespace_tag: str,
        num_slots: int,
        block_bytes: int,
        *,
        io_threads: int = 4,
        files_per_dir: int = 1,
        direct_io: bool | str = "auto",
        fsync: str = "batch",
        max_bytes: int | None = None,
        preallocate: bool = True,
        recovery_check: str = "header",
        compact_min_records: int = 4096,
    ) -> None:
        _check_args(dirs, namespace_tag, num_slots, block_bytes, io_threads, files_per_dir, direct_io, fsync,
                    max_bytes, recovery_check, compact_min_records)
        self.tag = namespace_tag
        self._tag_bytes = bytes.fromhex(namespace_tag)
        self.num_slots = num_slots
        self.block_bytes = block_bytes
        self.stride = ALIGN + _round_up(block_bytes, ALIGN)
        if max_bytes is not None and max_bytes < self.stride:
            raise ValueError(f"SSD max_bytes {max_bytes} cannot hold one block: a slot takes {self.stride} bytes "
                             f"({block_bytes} of data, header and alignment)")
        self.fsync = fsync
        self.max_bytes = max_bytes
        self.recovery_check = recovery_check
        self.compact_min_records = compact_min_records
        self.stats = SsdStats()
        self._lock = threading.Lock()  # stats, live entries, generations, occupancy
        self._logged: set[str] = set()
        self._live: dict[int, _Entry] = {}
        self._occupied: set[int] = set()
        self._generation = 0
        self._tls = threading.local()
        self._lock_fds: list[int] = []
        self._file_fds: list[int] = []
        self.dirs: list[_StoreDir] = []
        self._closed = False
        # threads start on first use, so a failed start below has none to stop
        self._readers = ThreadPoolExecutor(io_threads, thread_name_prefix="flexkv-ssd-read")
        self._writers = ThreadPoolExecutor(io_threads, thread_name_prefix="flexkv-ssd-write")
        self._num_files = len(dirs) * files_per_dir
        self._slots_per_file = math.ceil(num_slots / self._num_files)
        # the log of a directory may grow to this before compaction (plus one batch) and is given the room up front
        slots_per_dir = math.ceil(num_slots / len(dirs))
        self._log_reserve = (max(compact_min_records, 2 * slots_per_dir) + slots_per_dir) * RECORD_BYTES
        try:
            for d in dirs:
                self._open_dir(Path(d), direct_io)
            # global file j lives in directory j % D, so consecutive slots alternate directories
            self._file_dirs = [self.dirs[j % len(self.dirs)] for j in range(self._num_files)]
            self._file_paths = [d.path / f"blocks-{j // len(self.dirs)}.dat" for j, d in enumerate(self._file_dirs)]
            self._open_files(preallocate)
            #: ``(key, parent_key, slot)`` of every block that survived recovery, for ``CacheManager.adopt``
            self.recovered: list[tuple[int, int | None, int]] = self._recover()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ set-up

    def _open_dir(self, base: Path, direct_io: bool | str) -> None:
        if not base.exists():
            base.mkdir(mode=0o700, parents=True)
            os.chmod(base, 0o700)
        path = base / f"flexkv-{self.tag}"
        if not path.exists():
            path.mkdir(mode=0o700)
            os.chmod(path, 0o700)  # the umask may have narrowed it further
        _check_private(path)
        lock_fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise RuntimeError(f"SSD store {path} is already open (another process or store object holds its lock)")
        self._lock_fds.append(lock_fd)
        direct = direct_io is not False and _supports_direct_io(path)
        if direct_io is True and not direct:
            raise ValueError(f"direct_io=true but the filesystem of {path} refuses O_DIRECT; use 'auto' or false")
        if direct_io == "auto" and not direct:
            log.warning("filesystem of %s refuses O_DIRECT; using buffered I/O (page cache) there", path)
        self.dirs.append(_StoreDir(path, direct))

    def _geometry(self, index: int) -> dict:
        return {
            "format": FORMAT_VERSION, "namespace": self.tag, "block_bytes": self.block_bytes, "stride": self.stride,
            "num_slots": self.num_slots, "num_files": self._num_files, "num_dirs": len(self.dirs), "dir_index": index,
        }

    def _open_files(self, preallocate: bool) -> None:
        """Open (creating or, on a geometry change, recreating) the data files of every directory."""
        for index, d in enumerate(self.dirs):
            geometry_path = d.path / "geometry.json"
            wanted = self._geometry(index)
            try:
                found = json.loads(geometry_path.read_text())
            except FileNotFoundError:
                found = None
            except (OSError, ValueError):
                found = "unreadable"
            if found != wanted:
                if found is not None:
                    log.warning("SSD store %s: geometry changed (%s -> %s); discarding its blocks",
                                d.path, found, wanted)
                for stale in [*d.path.glob("blocks-*.dat"), d.log_path]:
                    stale.unlink(missing_ok=True)
                _write_atomically(geometry_path, json.dumps(wanted).encode())
            self._open_log(d)
        file_bytes = self._slots_per_file * self.stride
        for path, d in zip(self._file_paths, self._file_dirs):
            flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | (os.O_DIRECT if d.direct else 0)
            fd = os.open(path, flags, 0o600)
            self._file_fds.append(fd)
            size = os.fstat(fd).st_size
            if size < file_bytes and preallocate:
                try:
                    os.posix_fallocate(fd, size, file_bytes - size)
                except OSError as exc:
                    log.warning("could not preallocate %s (%s); it stays sparse and writes may run out of space",
                                path, exc.strerror)
            if os.fstat(fd).st_size != file_bytes:
                os.ftruncate(fd, file_bytes)

    def _open_log(self, d: _StoreDir) -> None:
        """Open ``d``'s log for appending, with its room reserved first: data that fills the disk must not
        leave the log unable to record it (only where the data files could not be preallocated)."""
        d.log_fd = os.open(d.log_path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        d.log_size = os.fstat(d.log_fd).st_size
        try:
            _reserve_space(d.log_fd, self._log_reserve)
        except OSError as exc:
            log.warning("could not reserve %d bytes for %s (%s); a full disk may then refuse log records",
                        self._log_reserve, d.log_path, exc.strerror)

    # ---------------------------------------------------------------- placement

    def _place(self, slot: int) -> tuple[int, int]:
        """(global file index, byte offset of the slot's header page)."""
        return slot % self._num_files, (slot // self._num_files) * self.stride

    def location(self, slot: int) -> tuple[Path, int]:
        """Data file and byte offset of a slot's header page; the block follows ``ALIGN`` bytes later."""
        file, offset = self._place(slot)
        return self._file_paths[file], offset

    def _dir_of(self, slot: int) -> _StoreDir:
        return self._file_dirs[slot % self._num_files]

    def _staging(self) -> memoryview:
        """This thread's aligned staging buffer of one slot stride (header page first)."""
        staging = getattr(self._tls, "staging", None)
        if staging is None:
            staging = self._tls.staging = memoryview(mmap.mmap(-1, self.stride))
        return staging

    def _zero_copy(self, slot: int, buffer: np.ndarray) -> bool:
        """Whether I/O can go straight to/from ``buffer`` (O_DIRECT wants aligned addresses and sizes)."""
        if not self._dir_of(slot).direct:
            return True
        return self.block_bytes % ALIGN == 0 and buffer.ctypes.data % ALIGN == 0

    # ------------------------------------------------------------------- writes

    def write(
        self,
        slots: Sequence[int],
        keys: Sequence[Hashable],
        parents: Sequence[Hashable | None],
        sources: Sequence[np.ndarray],
        checksums: Sequence[int | None] | None = None,
    ) -> list[bool]:
        """Write blocks (uint8 arrays of ``block_bytes``) into slots; True where the block is now stored.

        ``checksums`` are the blocks' xxh3 (seeded with the key) where already known, taken when they
        arrived in DRAM; None entries are computed here."""
        order = sorted(range(len(slots)), key=lambda i: self._place(slots[i]))
        known = checksums or [None] * len(slots)
        futures = {i: self._writers.submit(self._write_one, slots[i], keys[i], sources[i], known[i]) for i in order}
        written: dict[int, tuple[int, int]] = {}
        for i, future in futures.items():
            try:
                written[i] = future.result()
            except _StoreError as exc:
                self._count_failure(exc.kind, f"write of slot {slots[i]}: {exc}")
        if self.fsync == "batch":
            self._sync_files(written, slots)
        by_dir: dict[_StoreDir, list[int]] = {}
        for i in written:
            by_dir.setdefault(self._dir_of(slots[i]), []).append(i)
        for d, items in by_dir.items():
            puts = [(slots[i], _Entry(keys[i], parents[i], *written[i])) for i in items]
            try:
                self._append(d, puts)
            except OSError as exc:
                self._count_failure("no_space" if exc.errno == errno.ENOSPC else "write_errors",
                                    f"metadata log {d.log_path}: {exc}")
                for i in items:
                    del written[i]
        failed_slots = [slots[i] for i in range(len(slots)) if i not in written]
        self.forget(failed_slots)
        with self._lock:
            self.stats.blocks_written += len(written)
            self.stats.bytes_written += len(written) * self.block_bytes
        return [i in written for i in range(len(slots))]

    def _write_one(self, slot: int, key: Hashable, source: np.ndarray, checksum: int | None) -> tuple[int, int]:
        """Write one block with its header; returns (checksum, generation)."""
        if not isinstance(key, int) or not 0 <= key < 1 << 64:
            raise _StoreError("write_errors", f"key {key!r} is not an unsigned 64-bit integer")
        if source.nbytes != self.block_bytes:
            raise _StoreError("write_errors", f"source holds {source.nbytes} bytes, blocks are {self.block_bytes}")
        with self._lock:
            if self.max_bytes is not None and slot not in self._occupied:
                if (len(self._occupied) + 1) * self.stride > self.max_bytes:
                    raise _StoreError("no_space", f"store capped at {self.max_bytes} bytes is full")
            self._occupied.add(slot)
            self._generation += 1
            generation = self._generation
        if checksum is None:
            checksum = xxhash.xxh3_64_intdigest(source, seed=key)
        staging = self._staging()
        _HEADER.pack_into(staging, 0, _BLOCK_MAGIC, self._tag_bytes, slot, key, generation, checksum, self.block_bytes)
        if self._zero_copy(slot, source):
            iov, expected = [staging[:ALIGN], memoryview(source)], ALIGN + self.block_bytes
        else:
            np.frombuffer(staging, np.uint8, self.block_bytes, ALIGN)[:] = source
            iov, expected = [staging], self.stride
        file, offset = self._place(slot)
        try:
            done = os.pwritev(self._file_fds[file], iov, offset)
        except OSError as exc:
            raise _StoreError("no_space" if exc.errno == errno.ENOSPC else "write_errors", str(exc)) from None
        if done != expected:
            raise _StoreError("no_space", f"short write ({done} of {expected} bytes)")
        return checksum, generation

    def _sync_files(self, written: dict[int, tuple[int, int]], slots: Sequence[int]) -> None:
        """fdatasync each data file the batch wrote; a file that fails to sync loses the batch's blocks in it."""
        files = {self._place(slots[i])[0] for i in written}
        for file in files:
            try:
                os.fdatasync(self._file_fds[file])
            except OSError as exc:
                self._count_failure("write_errors", f"fdatasync of {self._file_paths[file]}: {exc}")
                for i in [i for i in written if self._place(slots[i])[0] == file]:
                    del written[i]

    # -------------------------------------------------------------------- reads

    def read(self, slots: Sequence[int], keys: Sequence[Hashable], targets: Sequence[np.ndarray]) -> list[bool]:
        """Read blocks into uint8 arrays of ``block_bytes``; False where the block is missing, unreadable or
        fails its checksum (such a block is forgotten; the target's bytes are then meaningless)."""
        order = sorted(range(len(slots)), key=lambda i: self._place(slots[i]))
        futures = {i: self._readers.submit(self._read_one, slots[i], keys[i], targets[i]) for i in order}
        ok = [False] * len(slots)
        damaged = []
        for i, future in futures.items():
            try:
                future.result()
                ok[i] = True
            except _StoreError as exc:
                self._count_failure(exc.kind, f"read of slot {slots[i]}: {exc}")
                if exc.kind != "unknown_blocks":  # that slot may hold another key's good block
                    damaged.append(slots[i])
        self.forget(damaged)
        with self._lock:
            self.stats.blocks_read += sum(ok)
            self.stats.bytes_read += sum(ok) * self.block_bytes
        return ok

    def checksums(self, slots: Sequence[int]) -> list[int | None]:
        """The recorded checksum of each slot's block (None for an empty slot): what a read verified."""
        with self._lock:
            return [entry.checksum if (entry := self._live.get(slot)) is not None else None for slot in slots]

    def _read_one(self, slot: int, key: Hashable, target: np.ndarray) -> None:
        with self._lock:
            entry = self._live.get(slot)
        if entry is None or entry.key != key:
            raise _StoreError("unknown_blocks", f"slot holds no block for key {key!r}")
        if target.nbytes != self.block_bytes:
            raise _StoreError("read_errors", f"target holds {target.nbytes} bytes, blocks are {self.block_bytes}")
        staging = self._staging()
        if self._zero_copy(slot, target):
            self._pread(slot, [staging[:ALIGN], memoryview(target)], ALIGN + self.block_bytes)
            data = target
        else:
            self._pread(slot, [staging], self.stride)
            data = np.frombuffer(staging, np.uint8, self.block_bytes, ALIGN)
        self._verify(slot, entry, staging, data)
        if data is not target:
            target[:] = data

    def _pread(self, slot: int, iov: list[memoryview], expected: int) -> None:
        file, offset = self._place(slot)
        try:
            done = os.preadv(self._file_fds[file], iov, offset)
        except OSError as exc:
            raise _StoreError("read_errors", str(exc)) from None
        if done != expected:
            raise _StoreError("read_errors", f"short read ({done} of {expected} bytes): file truncated?")

    def _verify(self, slot: int, entry: _Entry, header: memoryview, data: np.ndarray | None) -> None:
        """Header fields must match the entry, and the data (when given) its checksum."""
        fields = _HEADER.unpack_from(header, 0)
        wanted = (_BLOCK_MAGIC, self._tag_bytes, slot, entry.key, entry.generation, entry.checksum, self.block_bytes)
        if fields != wanted:
            raise _StoreError("checksum_failures", "block header does not match its metadata (torn or foreign write)")
        if data is not None and xxhash.xxh3_64_intdigest(data, seed=entry.key) != entry.checksum:
            raise _StoreError("checksum_failures", "checksum mismatch")

    # ------------------------------------------------------------ metadata log

    def _append(self, d: _StoreDir, records: list[tuple[int, _Entry | int]]) -> None:
        """Log puts ``(slot, entry)`` and deletes ``(slot, generation)`` for slots of ``d``; apply them."""
        payload = b"".join(_encode_record(slot, what) for slot, what in records)
        with d.lock:
            try:
                done = os.write(d.log_fd, payload)
            except OSError:
                os.ftruncate(d.log_fd, d.log_size)
                raise
            if done != len(payload):
                os.ftruncate(d.log_fd, d.log_size)  # keep records aligned: no partial record may stay
                raise OSError(errno.ENOSPC, f"short write to {d.log_path}")
            d.log_size += done
            d.records += len(records)
            with self._lock:
                for slot, what in records:
                    had = self._live.pop(slot, None) is not None
                    put = isinstance(what, _Entry)
                    if put:
                        self._live[slot] = what
                    d.live += put - had
            if d.records > max(self.compact_min_records, 2 * d.live):
                try:
                    self._compact(d)
                except OSError as exc:  # the records are in; the log just stays long
                    self._count_failure("write_errors", f"compaction of {d.log_path}: {exc}")

    def forget(self, slots: list[int]) -> None:
        """Tombstone slots whose block failed or was evicted, so a restart does not bring them back."""
        by_dir: dict[_StoreDir, list[tuple[int, int]]] = {}
        with self._lock:
            for slot in slots:
                if slot in self._live:
                    self._generation += 1
                    by_dir.setdefault(self._dir_of(slot), []).append((slot, self._generation))
        for d, deletes in by_dir.items():
            try:
                self._append(d, deletes)
            except OSError as exc:
                self._count_failure("write_errors", f"tombstone in {d.log_path}: {exc}")
                with self._lock:  # still never served in this process
                    for slot, _ in deletes:
                        self._live.pop(slot, None)

    def _compact(self, d: _StoreDir) -> None:
        """Rewrite ``d``'s log with only its live records (caller holds ``d.lock``)."""
        with self._lock:
            live = {slot: e for slot, e in self._live.items() if self._dir_of(slot) is d}
        payload = b"".join(_encode_record(slot, entry) for slot, entry in sorted(live.items()))
        _write_atomically(d.log_path, payload)
        os.close(d.log_fd)
        self._open_log(d)
        d.records = d.live = len(live)
        with self._lock:
            self.stats.log_compactions += 1

    def _recover(self) -> list[tuple[int, int | None, int]]:
        """Replay every log, keep each slot's newest put, check it on disk, then compact."""
        newest: dict[int, tuple[int, _Entry | None]] = {}
        for d in self.dirs:
            raw = os.pread(d.log_fd, d.log_size, 0)
            for start in range(0, len(raw) - RECORD_BYTES + 1, RECORD_BYTES):
                decoded = _decode_record(raw[start : start + RECORD_BYTES])
                if decoded is None or not 0 <= decoded[0] < self.num_slots or self._dir_of(decoded[0]) is not d:
                    self.stats.bad_log_records += 1
                    continue
                slot, generation, entry = decoded
                self._generation = max(self._generation, generation)
                if slot not in newest or generation > newest[slot][0]:
                    newest[slot] = (generation, entry)
            if len(raw) % RECORD_BYTES:
                self.stats.bad_log_records += 1  # a torn final append
        candidates = {slot: entry for slot, (_, entry) in newest.items() if entry is not None}
        checks = {slot: self._readers.submit(self._check_at_rest, slot, e) for slot, e in candidates.items()}
        for slot, check in checks.items():
            try:
                check.result()
            except _StoreError as exc:
                log.info("SSD store: dropping slot %d at recovery: %s", slot, exc)
                self.stats.dropped_at_recovery += 1
                continue
            self._live[slot] = candidates[slot]
            self._occupied.add(slot)
        for d in self.dirs:
            with d.lock:
                try:
                    self._compact(d)
                except OSError as exc:
                    self._count_failure("write_errors", f"compaction of {d.log_path}: {exc}")
        self.stats.recovered = len(self._live)
        if newest:  # blocks lost at a restart (a data file removed or cut short) deserve more than INFO
            log.log(logging.WARNING if self.stats.dropped_at_recovery else logging.INFO,
                    "SSD store %s: recovered %d blocks, dropped %d", self.tag, len(self._live),
                    self.stats.dropped_at_recovery)
        return [(e.key, e.parent, slot) for slot, e in sorted(self._live.items())]

    def _check_at_rest(self, slot: int, entry: _Entry) -> None:
        staging = self._staging()
        if self.recovery_check == "full":
            self._pread(slot, [staging], self.stride)
            self._verify(slot, entry, staging, np.frombuffer(staging, np.uint8, self.block_bytes, ALIGN))
        else:
            self._pread(slot, [staging[:ALIGN]], ALIGN)
            self._verify(slot, entry, staging, None)

    # ------------------------------------------------------------------ admin

    def _count_failure(self, kind: str, message: str) -> None:
        with self._lock:
            setattr(self.stats, kind, getattr(self.stats, kind) + 1)
            first = kind not in self._logged
            self._logged.add(kind)
        if first:
            log.warning("SSD store %s: %s (%s; further ones are counted, logged at debug level)",
                        self.tag, message, kind)
        else:
            log.debug("SSD store %s: %s (%s)", self.tag, message, kind)

    def snapshot(self) -> SsdStats:
        with self._lock:
            return SsdStats(**self.stats.as_dict())

    @property
    def live_blocks(self) -> int:
        with self._lock:
            return len(self._live)

    @property
    def direct_io(self) -> bool:
        """True when every directory uses O_DIRECT."""
        return all(d.direct for d in self.dirs)

    def close(self) -> None:
        """Stop the I/O threads and release files and locks; the blocks stay for the next start."""
        if self._closed:
            return
        self._closed = True
        self._readers.shutdown(wait=True)
        self._writers.shutdown(wait=True)
        for fd in [*self._file_fds, *(d.log_fd for d in self.dirs if d.log_fd >= 0), *self._lock_fds]:
            os.close(fd)


# ---------------------------------------------------------------------- helpers


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def _encode_record(slot: int, what: _Entry | int) -> bytes:
    """A put (``what`` is the entry) or a delete (``what`` is its generation)."""
    if isinstance(what, _Entry):
        has_parent = isinstance(what.parent, int) and 0 <= what.parent < 1 << 64
        body = _RECORD.pack(_RECORD_MAGIC, _PUT, has_parent, slot, what.key, what.parent if has_parent else 0,
                            what.checksum, what.generation)
    else:
        body = _RECORD.pack(_RECORD_MAGIC, _DELETE, 0, slot, 0, 0, 0, what)
    return body + _CRC.pack(zlib.crc32(body))


def _decode_record(raw: bytes) -> tuple[int, int, _Entry | None] | None:
    """(slot, generation, entry or None for a delete), or None for a damaged record."""
    body, (crc,) = raw[: _RECORD.size], _CRC.unpack_from(raw, _RECORD.size)
    if zlib.crc32(body) != crc:
        return None
    magic, kind, has_parent, slot, key, parent, checksum, generation = _RECORD.unpack(body)
    if magic != _RECORD_MAGIC or kind not in (_PUT, _DELETE):
        return None
    if kind == _DELETE:
        return slot, generation, None
    return slot, generation, _Entry(key, parent if has_parent else None, checksum, generation)


def _reserve_space(fd: int, nbytes: int) -> None:
    """Allocate ``nbytes`` of disk for ``fd`` without growing it (``fallocate(FALLOC_FL_KEEP_SIZE)``)."""
    fallocate = getattr(_LIBC, "fallocate", None)
    if fallocate is None:
        raise OSError(errno.ENOTSUP, "fallocate is not available on this platform")
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if fallocate(fd, _FALLOC_FL_KEEP_SIZE, 0, nbytes) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _write_atomically(path: Path, payload: bytes) -> None:
    """Replace ``path`` with ``payload`` so a crash leaves the old or the new file, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, payload)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _check_private(path: Path) -> None:
    """The store directory must be a real directory owned by us with no group/other access."""
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise PermissionError(f"SSD store path {path} is not a directory (a symlink?)")
    if st.st_uid != os.geteuid():
        raise PermissionError(f"SSD store directory {path} belongs to uid {st.st_uid}, not to us ({os.geteuid()})")
    if st.st_mode & 0o077:
        raise PermissionError(f"SSD store directory {path} has mode {st.st_mode & 0o777:o}; it must be 0700")


def _supports_direct_io(path: Path) -> bool:
    """Probe with one aligned O_DIRECT write (tmpfs refuses the open, some filesystems the write)."""
    probe = path / ".direct-io-probe"
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_DIRECT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    try:
        page = mmap.mmap(-1, ALIGN)
        return os.pwrite(fd, page, 0) == ALIGN
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)


def _check_args(dirs, tag, num_slots, block_bytes, io_threads, files_per_dir, direct_io, fsync, max_bytes,
                recovery_check, compact_min_records) -> None:
    if isinstance(dirs, (str, os.PathLike)) or not dirs:
        raise ValueError(f"SSD store needs a non-empty list of directories, got {dirs!r}")
    if len({os.path.realpath(d) for d in dirs}) != len(dirs):
        raise ValueError(f"SSD store directories must be distinct, got {list(dirs)}")
    try:
        if len(bytes.fromhex(tag)) != 8:
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"namespace tag must be 16 hex digits (Namespace.tag), got {tag!r}") from None
    for name, value in (("num_slots", num_slots), ("block_bytes", block_bytes), ("io_threads", io_threads),
                        ("files_per_dir", files_per_dir), ("compact_min_records", compact_min_records)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"SSD store {name} must be a positive integer, got {value!r}")
    if direct_io not in DIRECT_IO_CHOICES:
        raise ValueError(f"SSD direct_io must be one of {list(DIRECT_IO_CHOICES)}, got {direct_io!r}")
    if fsync not in FSYNC_CHOICES:
        raise ValueError(f"SSD fsync must be one of {list(FSYNC_CHOICES)}, got {fsync!r}")
    if recovery_check not in RECOVERY_CHECKS:
        raise ValueError(f"SSD recovery_check must be one of {list(RECOVERY_CHECKS)}, got {recovery_check!r}")
    if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes <= 0):
        raise ValueError(f"SSD max_bytes must be a positive integer or null, got {max_bytes!r}")
