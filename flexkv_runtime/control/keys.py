"""Block keys: one 64-bit integer per full block, chained over the prefix and
scoped by a namespace, so two models (or dtypes, layouts, TP ranks) never share
a block and a key names its whole prefix, not just its own tokens.

Keys come from three sources and are stable across processes (no Python
``hash()``): token ids (hashed here), Mooncake trace ``hash_ids`` (already
chained prefix ids, only namespaced here) and vLLM ``request.block_hashes``
(chained ``bytes``, only namespaced here).
"""
from __future__ import annotations

import hashlib
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64 finaliser: a cheap, well-spread bijection on 64-bit ints."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


@dataclass(frozen=True)
class Namespace:
    """What must match for two engines to share KV blocks."""

    model: str = "default"
    dtype: str = "bfloat16"
    layout: str = "paged"
    tp_rank: int = 0
    tp_size: int = 1

    @property
    def digest(self) -> bytes:
        text = f"{self.model}|{self.dtype}|{self.layout}|{self.tp_rank}/{self.tp_size}"
        return hashlib.blake2b(text.encode(), digest_size=16).digest()

    @property
    def seed(self) -> int:
        return int.from_bytes(self.digest[:8], "little")

    @property
    def tag(self) -> str:
        """Short printable id, for remote keys and file names."""
        return self.digest[:8].hex()


class BlockKeyer:
    """Turns a request's blocks into chained, namespaced keys."""

    def __init__(self, namespace: Namespace, tokens_per_block: int) -> None:
        if tokens_per_block <= 0:
            raise ValueError(f"tokens_per_block must be positive, got {tokens_per_block}")
        self.namespace = namespace
        self.tokens_per_block = tokens_per_block
        self._seed = namespace.seed
        self._digest = namespace.digest

    def from_token_ids(self, token_ids: Sequence[int]) -> list[int]:
        """One key per *full* block; a trailing partial block gets none."""
        keys: list[int] = []
        parent = self._digest
        tpb = self.tokens_per_block
        for start in range(0, len(token_ids) - tpb + 1, tpb):
            chunk = array("q", token_ids[start : start + tpb]).tobytes()
            parent = hashlib.blake2b(parent + chunk, digest_size=8).digest()
            keys.append(int.from_bytes(parent, "little"))
        return keys

    def from_hash_ids(self, hash_ids: Iterable[int]) -> list[int]:
        """Mooncake-style chained ids: already unique per prefix, only namespaced."""
        seed = self._seed
        return [_mix64(seed ^ h) for h in hash_ids]

    def from_block_hashes(self, block_hashes: Iterable[bytes]) -> list[int]:
        """vLLM's chained ``bytes`` block hashes, namespaced."""
        digest = self._digest
        return [
            int.from_bytes(hashlib.blake2b(digest + bytes(h), digest_size=8).digest(), "little") for h in block_hashes
        ]
