"""Triton block copy: one launch moves a whole batch of blocks for every layer.

The per-layer tensors are separate allocations, so the kernel gets a small int64
table of their byte addresses and strides and turns an entry into a pointer itself;
that works both compiled for CUDA and under TRITON_INTERPRET=1 on CPU.  A pinned CPU
pool is written/read by the GPU directly (zero-copy), so D2H/H2D needs no staging.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Sequence

import torch
import triton
import triton.language as tl

from kernels.layout import KVLayout, LayerAddress

# Words moved per program; 1024 x 8 bytes keeps every thread busy with several wide accesses.
_MAX_BLOCK_WORDS = 1024


@triton.jit
def _block_copy_kernel(
    layer_table,  # int64 [num_layers, 3]: data_ptr, block_stride, chunk_stride (bytes)
    block_ids,  # int64 [pairs]
    pool,  # [.., chunk_words] words; its element type is the word moved
    slot_ids,  # int64 [pairs]
    slot_stride,  # words between pool slots
    chunk_words,
    CHUNKS: tl.constexpr,
    TO_POOL: tl.constexpr,
    BLOCK: tl.constexpr,
    ENGINE_ALIGN: tl.constexpr,  # bytes every engine chunk start is a multiple of (lets loads vectorize)
):
    pair = tl.program_id(0)
    layer_chunk = tl.program_id(1)  # layer * CHUNKS + chunk, also the chunk's index inside a slot
    offsets = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < chunk_words

    entry = layer_table + (layer_chunk // CHUNKS) * 3
    engine_address = (
        tl.load(entry)
        + tl.load(block_ids + pair) * tl.load(entry + 1)
        + (layer_chunk % CHUNKS) * tl.load(entry + 2)
    )
    engine = tl.multiple_of(engine_address.to(pool.dtype), ENGINE_ALIGN) + offsets
    slot = pool + tl.load(slot_ids + pair) * slot_stride + layer_chunk * chunk_words + offsets
    if TO_POOL:
        tl.store(slot, tl.load(engine, mask=mask), mask=mask)
    else:
        tl.store(engine, tl.load(slot, mask=mask), mask=mask)


@functools.lru_cache(maxsize=64)
def _layer_table(addresses: tuple[LayerAddress, ...], device: torch.device) -> torch.Tensor:
    """Device copy of the layer address table; cached because the engine's KV tensors never move."""
    return torch.tensor(addresses, dtype=torch.int64, device=device)


def copy_blocks(
    layers: Sequence[torch.Tensor],
    layout: KVLayout,
    pool: torch.Tensor,
    block_ids: torch.Tensor,
    slot_ids: torch.Tensor,
    *,
    to_pool: bool,
) -> None:
    """Same contract as `kernels.torch_copy.copy_blocks`, in one kernel launch.

    Runs on the CUDA device of the engine (or pool); with everything on CPU it
    needs TRITON_INTERPRET=1.  A CPU pool used from CUDA must be pinned.
    """
    device = layout.device if layout.device.type == "cuda" else pool.device
    for name, tensor in (("pool", pool), ("KV layers", layers[0])):
        if device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
            raise ValueError(f"the triton backend needs the {name} in pinned memory to reach it from {device}")
    word_bytes = layout.word_bytes(layers, pool)
    pool_words = layout.pool_words(pool, word_bytes)
    chunk_words = layout.chunk_bytes // word_bytes
    block = min(_MAX_BLOCK_WORDS, triton.next_power_of_2(chunk_words))
    table = _layer_table(tuple(layout.address(layer) for layer in layers), device)
    grid = (len(block_ids), layout.num_layers * layout.chunks_per_layer, triton.cdiv(chunk_words, block))
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        _block_copy_kernel[grid](
            table,
            block_ids.to(device),
            pool_words,
            slot_ids.to(device),
            pool_words.stride(0),
            chunk_words,
            CHUNKS=layout.chunks_per_layer,
            TO_POOL=to_pool,
            BLOCK=block,
            ENGINE_ALIGN=layout.engine_alignment(layers),
        )
