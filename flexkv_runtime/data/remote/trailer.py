"""The trailer every remote value ends with, and the keys values live under.

A shared store holds blocks of many engines, and any of them may be stale,
torn by a crashed writer, or written by another model. So a value carries the
namespace digest, the block key, its length and an xxh3-64 checksum of the
block seeded with the key (as the SSD store's headers do); a read that does not
match all four is a miss, never served. Keys carry the namespace tag too, so
engines of different models, dtypes, layouts or TP ranks never even look at
each other's values.

A block is sealed once it is in the CPU pool (the transfer engine's sealer
thread hashes blocks copied from the engine, an SSD read seals with the
checksum it verified, a remote read brings its trailer along). A put then sends the row as
it is, and an SSD write reuses the checksum, so a block is hashed once however
many tiers it goes to, and bytes that change in DRAM after arrival fail the
reader's check instead of being sealed as good.

It trails the block rather than heading it: a value whose big part starts at
offset 0 keeps Mooncake's transfers aligned (a 64-byte header in front cost a
sixth of its put throughput over TCP). It is written into and read from the
tail of the block's CPU pool row, so a value is one buffer in the pool.
"""
from __future__ import annotations

import struct
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import xxhash

from flexkv_runtime.control.keys import Namespace

MAGIC = b"FKVREM01"
_LAYOUT = struct.Struct("<8s16sQQQ")  # magic, namespace digest, block key, payload bytes, checksum
#: trailer bytes after every block (room to grow; a cache line)
TRAILER_BYTES = 64


def remote_key(namespace: Namespace, key: int) -> str:
    return f"flexkv/{namespace.tag}/{key:016x}"


class TrailerCodec:
    """Writes and checks the trailers of batches of one namespace's blocks of one size; thread-safe."""

    def __init__(self, namespace: Namespace, block_bytes: int) -> None:
        self.digest = namespace.digest
        self.block_bytes = block_bytes
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="flexkv-remote-checksum")

    def seal(self, values: Sequence[np.ndarray], keys: Sequence[int],
             checksums: Sequence[int] | None = None) -> None:
        """Write the trailer of each value (a block followed by ``TRAILER_BYTES`` of room) for its key.

        ``checksums``, when known (an SSD read just verified them), spare the hashing."""
        if checksums is None or None in checksums:
            checksums = self._checksums(keys, [value[: self.block_bytes] for value in values])
        packed = self._packed(keys, checksums)
        for at, value in zip(range(0, len(packed), TRAILER_BYTES), values):
            value[self.block_bytes :] = np.frombuffer(packed, np.uint8, TRAILER_BYTES, at)

    def carried(self, values: Sequence[np.ndarray], keys: Sequence[int]) -> list[int | None]:
        """Per value: the checksum its trailer carries when the trailer is this namespace's for that key
        and size, else None. Reads the trailers only; whether the block matches is the reader's check."""
        out: list[int | None] = []
        for value, key in zip(values, keys):
            magic, digest, sealed_key, size, checksum = _LAYOUT.unpack_from(value, self.block_bytes)
            ours = magic == MAGIC and digest == self.digest and sealed_key == key and size == self.block_bytes
            out.append(checksum if ours else None)
        return out

    def seal_unsealed(self, values: Sequence[np.ndarray], keys: Sequence[int]) -> None:
        """Seal the values whose trailer is not already theirs (rows filled outside the transfer engine)."""
        missing = [i for i, checksum in enumerate(self.carried(values, keys)) if checksum is None]
        if missing:
            self.seal([values[i] for i in missing], [keys[i] for i in missing])

    def matching(self, values: Sequence[np.ndarray], keys: Sequence[int]) -> list[bool]:
        """Per value: every byte of its trailer is what its block, under this key and namespace, would have written."""
        expected = self._packed(keys, self._checksums(keys, [value[: self.block_bytes] for value in values]))
        return [value[self.block_bytes :].tobytes() == expected[at : at + TRAILER_BYTES]
                for at, value in zip(range(0, len(expected), TRAILER_BYTES), values)]

    def _packed(self, keys: Sequence[int], checksums: Sequence[int]) -> bytes:
        pad = bytes(TRAILER_BYTES - _LAYOUT.size)
        return b"".join(_LAYOUT.pack(MAGIC, self.digest, key, self.block_bytes, checksum) + pad
                        for key, checksum in zip(keys, checksums))

    def _checksums(self, keys: Sequence[int], payloads: Sequence[np.ndarray]) -> list[int]:
        """Each block's xxh3-64 seeded with its key. xxhash lets go of the GIL, so a helper thread hashes
        half of a batch meanwhile: the hashing is on an op's critical path."""
        half = len(keys) // 2
        if half == 0:
            return _xxh3(keys, payloads)
        rest = self._hasher.submit(_xxh3, keys[half:], payloads[half:])
        return _xxh3(keys[:half], payloads[:half]) + rest.result()

    def close(self) -> None:
        self._hasher.shutdown()


def _xxh3(keys: Sequence[int], payloads: Sequence[np.ndarray]) -> list[int]:
    return [xxhash.xxh3_64_intdigest(payload, seed=key) for key, payload in zip(keys, payloads)]
