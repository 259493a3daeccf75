"""The CPU tier's memory: one preallocated, block-first uint8 pool.

Slot ``s`` of the CPU tier (as numbered by the control plane) is row ``s``: all
layers of one block back to back, so a row goes to an SSD in one I/O. Rows start
on page boundaries whenever ``block_bytes`` is a multiple of the page size, which
lets the SSD store do O_DIRECT I/O straight into the pool without a staging copy.

A row may be followed by a tail of ``tail_bytes`` (the remote tier's trailer), so
that a block and its trailer are one contiguous buffer: a zero-copy store moves
them in one piece instead of two (Mooncake's multi-buffer calls cost about a
tenth of its throughput). The tail is padded so rows stay page-aligned.
"""
from __future__ import annotations

import logging
import mmap

import numpy as np
import torch

log = logging.getLogger(__name__)

PAGE = mmap.PAGESIZE
#: rows that cannot be page-aligned still start on a cache line
LINE = 64


class CpuPool:
    """``num_slots`` rows of ``block_bytes`` (each with ``tail_bytes`` after it); pinned when CUDA is there."""

    def __init__(self, num_slots: int, block_bytes: int, *, tail_bytes: int = 0, pin: bool | str = "auto") -> None:
        if num_slots <= 0 or block_bytes <= 0 or tail_bytes < 0:
            raise ValueError(f"CPU pool needs positive slots and block size, got {num_slots} x {block_bytes} "
                             f"(+{tail_bytes} tail bytes)")
        if pin not in ("auto", True, False):
            raise ValueError(f"pin_memory must be 'auto', true or false, got {pin!r}")
        self.num_slots = num_slots
        self.block_bytes = block_bytes
        self.tail_bytes = tail_bytes
        align = PAGE if block_bytes % PAGE == 0 else LINE
        self.stride = -(-(block_bytes + tail_bytes) // align) * align if tail_bytes else block_bytes
        self.pinned = torch.cuda.is_available() if pin == "auto" else bool(pin)
        nbytes = num_slots * self.stride
        try:
            if self.pinned:
                # cudaHostAlloc hands out page-aligned memory the GPU can DMA from.
                memory = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            else:
                # An anonymous mapping is page-aligned (unlike malloc) and only backed once touched.
                self._mapping = mmap.mmap(-1, nbytes)
                memory = torch.frombuffer(self._mapping, dtype=torch.uint8)
        except (OSError, RuntimeError) as exc:
            raise MemoryError(f"the CPU tier's pool of {num_slots} slots x {self.stride} bytes ({nbytes / 2**30:.1f} "
                              f"GiB{', pinned' if self.pinned else ''}) cannot be allocated: {exc}; lower the CPU "
                              "tier's capacity") from exc
        #: every byte of the pool, tails and padding included (what a zero-copy store registers)
        self.memory: np.ndarray = memory.numpy()
        #: ``[num_slots, block_bytes]``, rows ``stride`` bytes apart: what the copy kernels move
        self.tensor = memory.as_strided((num_slots, block_bytes), (self.stride, 1))
        self.array: np.ndarray = self.tensor.numpy()
        self._with_tails = self.memory.reshape(num_slots, self.stride)[:, : block_bytes + tail_bytes]
        log.debug("CPU pool: %d slots x %d bytes (+%d tail, stride %d), pinned=%s",
                  num_slots, block_bytes, tail_bytes, self.stride, self.pinned)

    @property
    def nbytes(self) -> int:
        return self.num_slots * self.stride

    def row(self, slot: int) -> np.ndarray:
        """The slot's bytes as a writable 1-D array aliasing the pool (no copy)."""
        return self.array[slot]

    def rows(self, slots: list[int]) -> list[np.ndarray]:
        return [self.array[s] for s in slots]

    def rows_with_tails(self, slots: list[int]) -> list[np.ndarray]:
        """Each slot's row and its tail, ``block_bytes + tail_bytes`` contiguous bytes (no copy)."""
        return [self._with_tails[s] for s in slots]
