"""Torch fallback for block copies: a few large index ops per layer, never a Python loop per block.

Torch has no "copy rows `src[i]` to rows `dst[j]`" op, so a copy where both sides are
scattered needs a temporary (twice the memory traffic).  Sorting the pairs by one
side turns that side into runs of consecutive rows; each run is then a strided view
and one `index_select(out=...)` / `index_copy_` moves it without a temporary.  That
pays off unless the runs are so short that per-op overhead dominates.  Ops move
8-byte words rather than bytes where alignment allows, which torch copies faster.
"""
from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple, Sequence, Union

import torch

from kernels.layout import WORD_DTYPES, KVLayout

# Runs are worth it when each of their ops moves at least this many bytes: measured on a
# 2-core EPYC, runs beat the temporary from ~3 consecutive 64 KiB chunks or ~14 of 8 KiB.
_OP_COST_BYTES = 160 * 1024

# The layers are shared out over this many threads, each issuing its own torch ops.  One
# thread issuing dozens of short parallel ops stalls at every op whenever another process
# holds a core (measured 3-5x slower than one memcpy on 2 cores); two independent streams
# of ops ride that out.  More would only multiply torch's own intra-op threads.
_WORKERS = 2

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
    word_bytes = layout.word_bytes(layers, pool)
    pool_words = layout.pool_words(pool, word_bytes)
    segments = _plan(block_ids, slot_ids, layout, pool.device)
    stage_shape = (len(block_ids), layout.chunk_bytes // word_bytes)
    stage_device = layout.device if to_pool else pool.device

    def copy_layers(layer_indices: range) -> None:
        # Scattered rows go through `stage`; reused for every layer so its pages fault in once.
        stage = torch.empty(stage_shape, dtype=WORD_DTYPES[word_bytes], device=stage_device)
        for layer_index in layer_indices:
            for chunk, engine_rows in enumerate(layout.chunk_rows(layers[layer_index], word_bytes)):
                pool_rows = pool_words[:, layer_index, chunk]
                for segment in segments:
                    if to_pool:
                        _copy_rows(pool_rows, segment.pool, engine_rows, segment.engine, stage)
                    else:
                        _copy_rows(engine_rows, segment.engine, pool_rows, segment.pool, stage)

    shares = [range(first, len(layers), _WORKERS) for first in range(min(_WORKERS, len(layers)))]
    list(_executor().map(copy_layers, shares))


@functools.cache
def _executor() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(_WORKERS, thread_name_prefix="kv-block-copy")


def _copy_rows(dst: torch.Tensor, dst_rows: Rows, src: torch.Tensor, src_rows: Rows, stage: torch.Tensor) -> None:
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
    block_ids: torch.Tensor, slot_ids: torch.Tensor, layout: KVLayout, pool_device: torch.device
) -> list[_Segment]:
    """Cut the pairs into runs of consecutive ids on whichever side has fewer runs,
    or keep them as one scattered segment when the runs are too short to pay for their ops."""
    engine_device = layout.device
    pool_runs, engine_runs = _count_runs(slot_ids), _count_runs(block_ids)
    ops_per_run = layout.num_layers * layout.chunks_per_layer
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
