"""The trailer every remote value ends with, and the keys values live under.

A shared store holds blocks of many engines, and any of them may be stale,
torn by a crashed writer, or written by another model. So a value carries the
namespace digest, the block key, its length and an xxh3-64 checksum of the
block seeded with the key (as the SSD store's headers do); a read that does not
match all four is a miss, never served. Keys carry the namespace tag too, so
engines of different models, dtypes, layouts or TP ranks never even look at
each other's values.

It trails the block rather than heading it: a value whose big part starts at
offset 0 keeps Mooncake's transfers aligned (a 64-byte header in front cost a
sixth of its put throughput over TCP).
"""
from __future__ import annotations

import struct

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
    """Writes and checks trailers for one namespace's blocks of one size."""

    def __init__(self, namespace: Namespace, block_bytes: int) -> None:
        self.digest = namespace.digest
        self.block_bytes = block_bytes

    def pack(self, key: int, payload: np.ndarray) -> bytes:
        checksum = xxhash.xxh3_64_intdigest(payload, seed=key)
        return _LAYOUT.pack(MAGIC, self.digest, key, self.block_bytes, checksum).ljust(TRAILER_BYTES, b"\0")

    def pack_into(self, trailer: np.ndarray, key: int, payload: np.ndarray) -> None:
        trailer[:] = np.frombuffer(self.pack(key, payload), np.uint8)

    def matches(self, trailer: np.ndarray, key: int, payload: np.ndarray) -> bool:
        """Every byte of the trailer is what this block, of this namespace, would have written."""
        return trailer.tobytes() == self.pack(key, payload)
