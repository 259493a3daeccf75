"""The CPU tier's memory: one preallocated, block-first uint8 pool.

Slot ``s`` of the CPU tier (as numbered by the control plane) is row ``s``: all
layers of one block back to back, so a row goes to an SSD in one I/O. Rows start
on page boundaries whenever ``block_bytes`` is a multiple of the page size, which
lets the SSD store do O_DIRECT I/O straight into the pool without a staging copy.
"""
from __future__ import annotations

import logging
import mmap

import numpy as np
import torch

log = logging.getLogger(__name__)


class CpuPool:
    """``num_slots`` rows of ``block_bytes``; pinned when CUDA is there (``pin="auto"``)."""

    def __init__(self, num_slots: int, block_bytes: int, *, pin: bool | str = "auto") -> None:
        if num_slots <= 0 or block_bytes <= 0:
            raise ValueError(f"CPU pool needs positive slots and block size, got {num_slots} x {block_bytes}")
        if pin not in ("auto", True, False):
            raise ValueError(f"pin_memory must be 'auto', true or false, got {pin!r}")
        self.num_slots = num_slots
        self.block_bytes = block_bytes
        self.pinned = torch.cuda.is_available() if pin == "auto" else bool(pin)
        if self.pinned:
            # cudaHostAlloc hands out page-aligned memory the GPU can DMA from.
            self.tensor = torch.empty(num_slots, block_bytes, dtype=torch.uint8, pin_memory=True)
        else:
            # An anonymous mapping is page-aligned (unlike malloc) and only backed once touched.
            self._mapping = mmap.mmap(-1, num_slots * block_bytes)
            self.tensor = torch.frombuffer(self._mapping, dtype=torch.uint8).view(num_slots, block_bytes)
        self.array: np.ndarray = self.tensor.numpy()
        log.debug("CPU pool: %d slots x %d bytes, pinned=%s", num_slots, block_bytes, self.pinned)

    @property
    def nbytes(self) -> int:
        return self.num_slots * self.block_bytes

    def row(self, slot: int) -> np.ndarray:
        """The slot's bytes as a writable 1-D array aliasing the pool (no copy)."""
        return self.array[slot]

    def rows(self, slots: list[int]) -> list[np.ndarray]:
        return [self.array[s] for s in slots]
