"""Transfer-op records: what the control plane asks a data plane to move.

The control plane never moves bytes. It hands each runnable op to the data
plane's ``submit`` and later hears back through ``CacheManager.complete``.
A simulated data plane turns an op into SimPy timeouts; the real one into
kernel launches and file I/O. Slots are tier-local indices (CPU pool slot,
SSD block slot); for the GPU they are the engine's own block ids.
"""
from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from flexkv_runtime.control.index import TierKind


class OpKind(str, Enum):
    LOAD = "load"  # to the engine (GPU)
    STORE = "store"  # from the engine into the CPU tier
    PROMOTE = "promote"  # a slower tier up into the CPU tier
    DEMOTE = "demote"  # the CPU tier down into a slower tier


#: "SRC->DST" per tier pair, built once: Enum ``.name`` is slow on a per-op path
_LINK_NAMES = {(a, b): f"{a.name}->{b.name}" for a in TierKind for b in TierKind}


def link_name(src: TierKind, dst: TierKind) -> str:
    """The name the data planes and metrics give the link from ``src`` to ``dst``, e.g. ``CPU->SSD``."""
    return _LINK_NAMES[src, dst]


@dataclass(slots=True)
class TransferOp:
    op_id: int
    kind: OpKind
    src: TierKind
    dst: TierKind
    keys: list[Hashable]
    src_slots: list[int]
    dst_slots: list[int]
    block_bytes: int
    request_id: Hashable | None = None
    #: op ids that must complete before this one may start (slot reuse, promote-then-load)
    after: list[int] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return len(self.keys) * self.block_bytes

    @property
    def link(self) -> str:
        return link_name(self.src, self.dst)


class DataPlane(Protocol):
    """What the control plane needs from whoever moves the bytes."""

    def submit(self, op: TransferOp) -> None:
        """Start (or queue) an op; must not block and must not call back into the manager."""

    def cancel(self, op_id: int) -> bool:
        """Drop an op that has not started; True if it will never run."""

    def release(self, tier: TierKind, slots: list[int]) -> None:
        """Blocks left a slower tier without an op (evicted, dropped, reset): a
        persistent store forgets them, so a restart does not bring them back."""


class ImmediateDataPlane:
    """Every op succeeds at once: the data plane of timing-free replay.

    ``drain()`` returns the ops submitted since the last call, for the caller
    to report back as completed.
    """

    def __init__(self) -> None:
        self._submitted: list[TransferOp] = []
        self.ops_by_link: dict[str, int] = {}
        self.bytes_by_link: dict[str, int] = {}

    def submit(self, op: TransferOp) -> None:
        self._submitted.append(op)
        link = op.link
        self.ops_by_link[link] = self.ops_by_link.get(link, 0) + 1
        self.bytes_by_link[link] = self.bytes_by_link.get(link, 0) + op.nbytes

    def cancel(self, op_id: int) -> bool:
        before = len(self._submitted)
        self._submitted = [op for op in self._submitted if op.op_id != op_id]
        return len(self._submitted) < before

    def release(self, tier: TierKind, slots: list[int]) -> None:
        """Nothing persists here."""

    def drain(self) -> list[TransferOp]:
        ops, self._submitted = self._submitted, []
        return ops
