"""Batch copies of KV blocks between vLLM's paged KV cache and the block-first CPU pool.

The front end validates ids once and resolves repeated destinations, so that every
backend sees the same clean batch and gives byte-identical results.
"""
from __future__ import annotations

import functools
from typing import Literal, Sequence, Union

import torch

from kernels import torch_copy
from kernels.layout import KVLayout

Ids = Union[torch.Tensor, Sequence[int]]
Backend = Literal["auto", "torch", "triton"]


def gather_blocks(
    layers: Sequence[torch.Tensor], block_ids: Ids, pool: torch.Tensor, slot_ids: Ids, backend: Backend = "auto"
) -> None:
    """Copy engine block `block_ids[i]` of every layer into pool slot `slot_ids[i]`.

    Ids may come unsorted and a block may be read several times; if a slot is
    named several times, the last pair wins.  `backend="auto"` uses Triton when a
    tensor is on CUDA (the CPU pool then pinned) and Triton imports, else torch.
    Triton's copy is queued on the current CUDA stream: synchronize before the CPU
    reads the pool (or before reusing a slot that a scatter still reads).
    """
    _copy(layers, block_ids, pool, slot_ids, to_pool=True, backend=backend)


def scatter_blocks(
    pool: torch.Tensor, slot_ids: Ids, layers: Sequence[torch.Tensor], block_ids: Ids, backend: Backend = "auto"
) -> None:
    """Copy pool slot `slot_ids[i]` into engine block `block_ids[i]` of every layer.

    The reverse of `gather_blocks`; if a block is named several times, the last pair wins.
    """
    _copy(layers, block_ids, pool, slot_ids, to_pool=False, backend=backend)


@functools.cache
def triton_available() -> bool:
    """Whether Triton imports here (imported on first use only, so `kernels` works without it)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _copy(
    layers: Sequence[torch.Tensor],
    block_ids: Ids,
    pool: torch.Tensor,
    slot_ids: Ids,
    *,
    to_pool: bool,
    backend: Backend,
) -> None:
    layout = KVLayout.from_layers(layers)
    layout.check_pool(pool)
    copy_blocks = _implementation(backend, layers[0], pool)
    blocks = _as_ids(block_ids, "block_ids", layout.num_blocks)
    slots = _as_ids(slot_ids, "slot_ids", pool.shape[0])
    if len(blocks) != len(slots):
        raise ValueError(f"got {len(blocks)} block ids but {len(slots)} slot ids")
    if len(blocks) == 0:
        return
    if to_pool:
        slots, blocks = _last_writer_wins(slots, blocks)
    else:
        blocks, slots = _last_writer_wins(blocks, slots)
    copy_blocks(layers, layout, pool, blocks, slots, to_pool=to_pool)


def _as_ids(ids: Ids, name: str, bound: int) -> torch.Tensor:
    """Ids as a CPU int64 tensor, or ValueError: an id out of range would corrupt memory."""
    ids = torch.as_tensor(ids)
    if ids.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(ids.shape)}")
    if ids.numel() == 0:
        return torch.empty(0, dtype=torch.int64)
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"{name} must be integers, got {ids.dtype}")
    ids = ids.to("cpu", torch.int64)
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= bound:
        raise ValueError(f"{name} must lie in [0, {bound}), got ids from {low} to {high}")
    return ids


def _last_writer_wins(dst: torch.Tensor, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop pairs whose destination is written again later, so no backend races on it."""
    if len(dst.unique()) == len(dst):
        return dst, src
    last_pair = dict(zip(dst.tolist(), range(len(dst))))
    keep = torch.tensor(sorted(last_pair.values()))
    return dst[keep], src[keep]


def _implementation(backend: Backend, engine: torch.Tensor, pool: torch.Tensor):
    if backend == "auto":
        tensors = (engine, pool)
        on_cuda = any(t.device.type == "cuda" for t in tensors)
        reachable = all(t.device.type == "cuda" or t.is_pinned() for t in tensors)
        backend = "triton" if on_cuda and reachable and triton_available() else "torch"
    if backend == "torch":
        return torch_copy.copy_blocks
    if backend == "triton":
        if not triton_available():
            raise ImportError("backend='triton' needs the triton package, which does not import here")
        from kernels import triton_copy

        return triton_copy.copy_blocks
    raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
