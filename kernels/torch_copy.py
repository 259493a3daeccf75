"""Torch fallback for block copies: one large index op per batch, never a Python loop per block.

A chunk (one layer's block, or its K or V half) is the unit: contiguous on both sides.  On
CPU every chunk of every layer is a row of one `[rows, chunk_words]` view of the address range
that spans all the layers (non-owning: the layers may be separate allocations).  Rows of that
view overlap (row `r` starts at word `r`), so any chunk of any layer is the row whose number
is its address, and one `index_select` (gather) or `index_copy_` (scatter) with the
`batch x layers x chunks` row numbers moves the whole batch in one parallel op, like the
contiguous `copy_` it is measured against.  Many smaller ops (one per layer) would each end in
a barrier of torch's intra-op threads, and on a busy machine every barrier waits for a thread
that lost its core: measured 3-5x slower than one op on 2 shared cores.

Torch has no "copy rows `src[i]` to rows `dst[j]`" op, so the pool side must be a slice:
sorting the pairs by slot makes one of each run of consecutive slots, one op per run.  When
the slots are too scattered for that to pay, the batch goes a few blocks at a time through a
small reused buffer that stays in cache (two ops per piece, hardly more memory traffic).

Rows move as 16-byte words (complex128, copied bit for bit) where alignment allows:
`index_select` into contiguous rows is a `memcpy` per row, but `index_copy_` copies word by
word, so wide words double its speed.

Engine tensors on another device (the torch backend asked for on CUDA) or a pool whose slots
are not back to back go the general way: one op per layer and segment.
"""
from __future__ import annotations

import ctypes
import itertools
import math
import threading
from typing import NamedTuple, Sequence, Union

import torch

from kernels.layout import WORD_DTYPES, KVLayout

# Runs of consecutive pool slots are worth an op each when they average at least this many
# bytes; shorter ones go through the cached stage.  Measured on a 2-core EPYC: 512 scattered
# slots of 0.125-0.5 MiB are 1.3-1.7x faster staged, of 1 MiB even, of 2 MiB 1.2x faster as runs.
_RUN_BYTES = 1 << 20

# The same trade-off for the general path, where each run costs one op per layer: measured on
# a 2-core EPYC, runs beat the temporary from ~3 consecutive 64 KiB chunks or ~14 of 8 KiB.
_OP_COST_BYTES = 160 * 1024

# A batch whose pool slots are too scattered for runs goes through a buffer of this size
# (at least one block), small enough to stay in cache between its two passes.
_STAGE_BYTES = 8 << 20

# Torch moves words of up to this many bytes (complex128); see WORD_DTYPES.
_MAX_WORD_BYTES = 16

Rows = Union[slice, torch.Tensor]


class _Segment(NamedTuple):
    """Engine rows and pool rows that pair up one to one."""

    engine: Rows
    pool: Rows


def copy_blocks(
    layers: Sequence[torch.Tensor],
    layout: KVLayout,
    pool: torch.Tensor,
    block_ids: torch.Tensor,
    slot_ids: torch.Tensor,
    *,
    to_pool: bool,
) -> None:
    """Copy engine block `block_ids[i]` <-> pool slot `slot_ids[i]` for every layer.

    Ids are CPU int64 tensors, already validated, with unique destination ids.
    """
    chunks = _ChunkRows.of(layers, layout, pool)
    if chunks is None:
        word_bytes = layout.word_bytes(layers, pool, _MAX_WORD_BYTES)
        _copy_per_layer(layers, layout, pool, block_ids, slot_ids, word_bytes, to_pool=to_pool)
        return
    runs = _pool_runs(block_ids, slot_ids, layout.block_bytes)
    if runs is None:
        _copy_through_stage(chunks, block_ids, slot_ids, layout.block_bytes, to_pool=to_pool)
        return
    for blocks, slots in runs:
        engine_rows = chunks.engine_rows(blocks)
        pool_chunks = chunks.pool[slots.start * chunks.per_block : slots.stop * chunks.per_block]
        if to_pool:
            torch.index_select(chunks.engine, 0, engine_rows, out=pool_chunks)
        else:
            chunks.engine.index_copy_(0, engine_rows, pool_chunks)


class _ChunkRows(NamedTuple):
    """Every chunk of the engine and of the pool as a row of `chunk_words` words."""

    engine: torch.Tensor  # [rows, chunk_words], rows overlapping: row r starts at word r
    first: torch.Tensor  # int64 [layers * chunks]: engine row of (layer, chunk) of block 0
    step: torch.Tensor  # int64 [layers * chunks]: engine rows from one block to the next
    pool: torch.Tensor  # [slots * layers * chunks, chunk_words], slot-major like a slot's bytes
    per_block: int  # layers * chunks

    @classmethod
    def of(cls, layers: Sequence[torch.Tensor], layout: KVLayout, pool: torch.Tensor) -> _ChunkRows | None:
        """The views, or None where they cannot be made (not on CPU, pool slots not back to back)."""
        if layout.device.type != "cpu" or pool.device.type != "cpu":
            return None
        pool_numbers = (pool.data_ptr(), pool.stride(0) * pool.element_size(), pool.untyped_storage().data_ptr())
        if pool.shape[0] > 1 and pool_numbers[1] != layout.block_bytes:
            return None
        addresses = [layout.address(layer) for layer in layers]
        # As KVLayout.word_bytes, but the engine side is addressed from the lowest chunk
        # start, not from the layers' storages, whose alignment therefore does not matter.
        word_bytes = math.gcd(_MAX_WORD_BYTES, layout.chunk_bytes, *pool_numbers, *itertools.chain(*addresses))
        chunk_words = layout.chunk_bytes // word_bytes
        per_block = layout.num_layers * layout.chunks_per_layer
        chunks = range(layout.chunks_per_layer)
        starts = [data + chunk * chunk_stride for data, _, chunk_stride in addresses for chunk in chunks]
        steps = [block_stride for _, block_stride, _ in addresses for _ in chunks]
        base = min(starts)
        last_start = max(start + (layout.num_blocks - 1) * step for start, step in zip(starts, steps))
        words = _alias_address_range(base, last_start + layout.chunk_bytes - base, WORD_DTYPES[word_bytes])
        return cls(
            engine=words.as_strided(((last_start - base) // word_bytes + 1, chunk_words), (1, 1)),
            first=torch.tensor([(start - base) // word_bytes for start in starts]),
            step=torch.tensor([step // word_bytes for step in steps]),
            pool=layout.pool_words(pool, word_bytes).view(-1, chunk_words),  # slots back to back, checked above
            per_block=per_block,
        )

    def engine_rows(self, blocks: torch.Tensor) -> torch.Tensor:
        """Engine rows of every chunk of `blocks`, block-major (the order of a pool slot)."""
        return torch.addcmul(self.first, blocks[:, None], self.step).flatten()

    def pool_rows(self, slots: torch.Tensor) -> torch.Tensor:
        return (slots[:, None] * self.per_block + torch.arange(self.per_block)).flatten()


_memory_view = ctypes.pythonapi.PyMemoryView_FromMemory
_memory_view.restype = ctypes.py_object
_memory_view.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int)
_PYBUF_WRITE = 0x200


def _alias_address_range(address: int, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat tensor over `nbytes` of CPU memory at `address`, owning nothing.

    The range spans separately allocated layers and whatever lies between them; only rows
    computed from the layers' own addresses and validated block ids are ever read or written,
    and the caller holds the layers for as long as the view is used (one copy call).
    """
    return torch.frombuffer(_memory_view(address, nbytes, _PYBUF_WRITE), dtype=dtype)


def _pool_runs(
    block_ids: torch.Tensor, slot_ids: torch.Tensor, block_bytes: int
) -> list[tuple[torch.Tensor, slice]] | None:
    """The batch sorted by slot and cut into runs of consecutive slots, as (blocks, slots) pairs,
    or None when the runs are too short to pay for an op each."""
    if len(slot_ids) == 1:
        return [(block_ids, slice(int(slot_ids[0]), int(slot_ids[0]) + 1))]
    slots, order = torch.sort(slot_ids)
    cuts = [0, *((slots.diff() != 1).nonzero().flatten() + 1).tolist(), len(slots)]
    if (len(cuts) - 1) * _RUN_BYTES > len(block_ids) * block_bytes:
        return None
    blocks, first_slots = block_ids[order], slots[cuts[:-1]].tolist()
    return [(blocks[a:b], slice(first, first + b - a)) for first, a, b in zip(first_slots, cuts, cuts[1:])]


def _copy_through_stage(
    chunks: _ChunkRows, block_ids: torch.Tensor, slot_ids: torch.Tensor, block_bytes: int, *, to_pool: bool
) -> None:
    """Both sides scattered: a few blocks at a time into a small reused buffer and out again.
    The buffer stays in cache, so the extra pass costs ops but hardly any memory traffic."""
    engine_rows, pool_rows = chunks.engine_rows(block_ids), chunks.pool_rows(slot_ids)
    blocks_per_piece = min(len(block_ids), max(1, _STAGE_BYTES // block_bytes))
    rows_per_piece = blocks_per_piece * chunks.per_block
    stage = _stage_buffer(blocks_per_piece * block_bytes).view(chunks.pool.dtype).view(rows_per_piece, -1)
    src, dst = (chunks.engine, chunks.pool) if to_pool else (chunks.pool, chunks.engine)
    src_rows, dst_rows = (engine_rows, pool_rows) if to_pool else (pool_rows, engine_rows)
    for first in range(0, len(src_rows), rows_per_piece):
        piece = slice(first, first + rows_per_piece)
        rows = torch.index_select(src, 0, src_rows[piece], out=stage[: len(src_rows[piece])])
        dst.index_copy_(0, dst_rows[piece], rows)


_local = threading.local()


def _stage_buffer(nbytes: int) -> torch.Tensor:
    """This thread's staging bytes (kept between calls: fresh pages would fault on every copy)."""
    buffer = getattr(_local, "stage", None)
    if buffer is None or buffer.numel() < nbytes:
        buffer = _local.stage = torch.empty(nbytes, dtype=torch.uint8)
    return buffer[:nbytes]


def _copy_per_layer(
    layers: Sequence[torch.Tensor],
    layout: KVLayout,
    pool: torch.Tensor,
    block_ids: torch.Tensor,
    slot_ids: torch.Tensor,
    word_bytes: int,
    *,
    to_pool: bool,
) -> None:
    """The general way, one op per layer and segment: a layer's block is a `[chunks, words]` row."""
    pool_words = layout.pool_words(pool, word_bytes)
    segments = _plan(block_ids, slot_ids, layout.num_layers, layout, pool.device)
    stage_shape = (len(block_ids), *pool_words.shape[2:])
    stage_device = layout.device if to_pool else pool.device
    stage = None  # scattered rows go through it, reused for every layer
    for index, layer in enumerate(layers):
        engine_rows, pool_rows = layout.block_rows(layer, word_bytes), pool_words[:, index]
        for segment in segments:
            if stage is None and not isinstance(segment.engine, slice) and not isinstance(segment.pool, slice):
                stage = torch.empty(stage_shape, dtype=WORD_DTYPES[word_bytes], device=stage_device)
            if to_pool:
                _copy_rows(pool_rows, segment.pool, engine_rows, segment.engine, stage)
            else:
                _copy_rows(engine_rows, segment.engine, pool_rows, segment.pool, stage)


def _copy_rows(
    dst: torch.Tensor, dst_rows: Rows, src: torch.Tensor, src_rows: Rows, stage: torch.Tensor | None
) -> None:
    """`dst[dst_rows] = src[src_rows]`, going through `stage` only when both sides are
    scattered (or live on different devices)."""
    if isinstance(dst_rows, slice) and isinstance(src_rows, torch.Tensor) and dst.device == src.device:
        torch.index_select(src, 0, src_rows, out=dst[dst_rows])
        return
    if isinstance(src_rows, slice):
        rows = src[src_rows]
    else:
        rows = torch.index_select(src, 0, src_rows, out=stage[: len(src_rows)])
    if isinstance(dst_rows, slice):
        dst[dst_rows].copy_(rows)
    else:
        dst.index_copy_(0, dst_rows, rows.to(dst.device))


def _plan(
    block_ids: torch.Tensor, slot_ids: torch.Tensor, ops_per_run: int, layout: KVLayout, pool_device: torch.device
) -> list[_Segment]:
    """Cut the pairs into runs of consecutive ids on whichever side has fewer runs,
    or keep them as one scattered segment when the runs are too short to pay for their ops."""
    engine_device = layout.device
    pool_runs, engine_runs = _count_runs(slot_ids), _count_runs(block_ids)
    if min(pool_runs, engine_runs) * ops_per_run * _OP_COST_BYTES > len(block_ids) * layout.block_bytes:
        return [_Segment(block_ids.to(engine_device), slot_ids.to(pool_device))]
    if pool_runs <= engine_runs:
        return [_Segment(engine, pool) for pool, engine in _runs(slot_ids, block_ids, engine_device)]
    return [_Segment(engine, pool) for engine, pool in _runs(block_ids, slot_ids, pool_device)]


def _count_runs(ids: torch.Tensor) -> int:
    return 1 + int((ids.sort().values.diff() != 1).sum())


def _runs(key: torch.Tensor, other: torch.Tensor, other_device: torch.device) -> list[tuple[slice, Rows]]:
    """Sort the pairs by `key` and split them into runs of consecutive keys: the key side
    of a run is a slice, the other side a slice too when its ids happen to be consecutive."""
    key, order = torch.sort(key, stable=True)
    other = other[order]
    cuts = [0, *((key.diff() != 1).nonzero().flatten() + 1).tolist(), len(key)]
    starts = key.tolist()
    return [(slice(starts[a], starts[a] + b - a), _as_rows(other[a:b], other_device)) for a, b in zip(cuts, cuts[1:])]


def _as_rows(ids: torch.Tensor, device: torch.device) -> Rows:
    """A slice when `ids` are consecutive (plain strided copy), else the ids on `device`."""
    first = int(ids[0])
    if bool((ids == torch.arange(first, first + len(ids))).all()):
        return slice(first, first + len(ids))
    return ids.to(device)
