"""Geometry of vLLM's paged KV tensors and of the block-first CPU pool.

Both copy backends address memory the same way: a layer's block is one or two
contiguous *chunks* of bytes somewhere in the engine tensor, and a pool slot is
all chunks of all layers of one block back to back, so one slot is one
contiguous run of bytes that can go to an SSD in a single I/O.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

# Byte width -> dtype used to move that many bytes per element.  Torch copies every one of
# them bit for bit (complex128 is two doubles moved as one 16-byte word, never computed on);
# Triton has no 16-byte type, so its kernel stops at 8.
WORD_DTYPES = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64, 16: torch.complex128}


class LayerAddress(NamedTuple):
    """Where one layer's chunks live: chunk `c` of block `b` starts at
    `data_ptr + b * block_stride + c * chunk_stride` (all in bytes)."""

    data_ptr: int
    block_stride: int
    chunk_stride: int


def _is_dense(shape: Sequence[int], strides: Sequence[int]) -> bool:
    """True when a tensor with these sizes/strides is one contiguous run (size-1 dims ignored)."""
    expected = 1
    for size, stride in zip(reversed(shape), reversed(strides)):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


@dataclass(frozen=True)
class KVLayout:
    """Shape of the engine's per-layer KV tensors, as far as block copies care.

    Two engine layouts are understood:

    * 4-D `[num_blocks, kv_heads, block_size, head_k + head_v]`: a layer's block
      is one chunk (`chunks_per_layer == 1`);
    * 5-D `[2, num_blocks, block_size, kv_heads, head_dim]` (K at 0, V at 1): a
      layer's block is a K chunk and a V chunk (`chunks_per_layer == 2`).

    Dim 0 (resp. 1) may have any stride, so per-layer views into one big buffer
    work, but each chunk must itself be contiguous.  A pool slot holds
    `block_bytes`: layer 0's chunks, then layer 1's, ...
    """

    num_layers: int
    num_blocks: int
    chunks_per_layer: int
    chunk_bytes: int
    dtype: torch.dtype
    device: torch.device

    @property
    def layer_block_bytes(self) -> int:
        return self.chunks_per_layer * self.chunk_bytes

    @property
    def block_bytes(self) -> int:
        return self.num_layers * self.layer_block_bytes

    @classmethod
    def from_layers(cls, layers: Sequence[torch.Tensor]) -> KVLayout:
        if len(layers) == 0:
            raise ValueError("need at least one layer tensor")
        first = layers[0]
        for i, layer in enumerate(layers):
            if (layer.shape, layer.dtype, layer.device) != (first.shape, first.dtype, first.device):
                raise ValueError(
                    f"layer {i} is {tuple(layer.shape)} {layer.dtype} on {layer.device}, but layer 0 is "
                    f"{tuple(first.shape)} {first.dtype} on {first.device}; all layers must match"
                )
        if first.dim() == 4:
            chunks, block_dim = 1, 0
        elif first.dim() == 5 and first.shape[0] == 2:
            chunks, block_dim = 2, 1
        else:
            raise ValueError(
                f"unsupported KV layer shape {tuple(first.shape)}: expected "
                "[num_blocks, kv_heads, block_size, head_k + head_v] or [2, num_blocks, block_size, kv_heads, head_dim]"
            )
        inner = block_dim + 1
        for i, layer in enumerate(layers):
            if not _is_dense(layer.shape[inner:], layer.stride()[inner:]):
                raise ValueError(
                    f"layer {i}: each block's data must be contiguous, got strides {layer.stride()} "
                    f"for shape {tuple(layer.shape)}"
                )
        return cls(
            num_layers=len(layers),
            num_blocks=first.shape[block_dim],
            chunks_per_layer=chunks,
            chunk_bytes=math.prod(first.shape[inner:]) * first.element_size(),
            dtype=first.dtype,
            device=first.device,
        )

    def address(self, layer: torch.Tensor) -> LayerAddress:
        """Byte address and strides of one layer tensor that `from_layers` accepted."""
        size = layer.element_size()
        if self.chunks_per_layer == 1:
            return LayerAddress(layer.data_ptr(), layer.stride(0) * size, 0)
        return LayerAddress(layer.data_ptr(), layer.stride(1) * size, layer.stride(0) * size)

    def check_pool(self, pool: torch.Tensor) -> None:
        """Raise ValueError unless `pool[s]` is one contiguous slot of `block_bytes`."""
        if pool.dim() < 2:
            raise ValueError(f"pool must be [num_slots, ...] with one slot per row, got shape {tuple(pool.shape)}")
        slot_bytes = math.prod(pool.shape[1:]) * pool.element_size()
        if slot_bytes != self.block_bytes:
            raise ValueError(f"pool slots hold {slot_bytes} bytes but one block of all layers is {self.block_bytes}")
        if not _is_dense(pool.shape[1:], pool.stride()[1:]):
            raise ValueError(f"each pool slot must be contiguous, got strides {pool.stride()}")

    def empty_pool(self, num_slots: int, *, pin_memory: bool = False) -> torch.Tensor:
        """A CPU pool `[num_slots, block_bytes]` of uint8 (pinned so a GPU can DMA/zero-copy into it)."""
        return torch.empty(num_slots, self.block_bytes, dtype=torch.uint8, pin_memory=pin_memory)

    def engine_alignment(self, layers: Sequence[torch.Tensor]) -> int:
        """Largest power of two (<= 16) that every chunk start in the engine tensors is a multiple of."""
        return math.gcd(16, *(number for layer in layers for number in self.address(layer)))

    def word_bytes(self, layers: Sequence[torch.Tensor], pool: torch.Tensor, max_bytes: int = 8) -> int:
        """Widest power-of-two word (<= `max_bytes`) that every chunk start and length is aligned
        to; moving wide words instead of bytes is what makes both backends fast."""
        storages = [tensor.untyped_storage().data_ptr() for tensor in (*layers, pool)]
        pool_numbers = (pool.data_ptr(), pool.stride(0) * pool.element_size())
        return math.gcd(max_bytes, self.chunk_bytes, self.engine_alignment(layers), *pool_numbers, *storages)

    def block_rows(self, layer: torch.Tensor, word_bytes: int) -> torch.Tensor:
        """`layer` as `[num_blocks, chunks_per_layer, chunk_words]` words (aliasing its memory)."""
        address = self.address(layer)
        return _word_alias(layer, word_bytes).as_strided(
            (self.num_blocks, self.chunks_per_layer, self.chunk_bytes // word_bytes),
            (address.block_stride // word_bytes, address.chunk_stride // word_bytes, 1),
            (address.data_ptr - layer.untyped_storage().data_ptr()) // word_bytes,
        )

    def pool_words(self, pool: torch.Tensor, word_bytes: int) -> torch.Tensor:
        """`pool` as `[num_slots, num_layers, chunks_per_layer, chunk_words]` words (aliasing it)."""
        chunk_words = self.chunk_bytes // word_bytes
        words = _word_alias(pool, word_bytes)
        return words.as_strided(
            (pool.shape[0], self.num_layers, self.chunks_per_layer, chunk_words),
            (pool.stride(0) * pool.element_size() // word_bytes, self.chunks_per_layer * chunk_words, chunk_words, 1),
            (pool.data_ptr() - pool.untyped_storage().data_ptr()) // word_bytes,
        )


def _word_alias(tensor: torch.Tensor, word_bytes: int) -> torch.Tensor:
    """The whole storage of `tensor` as a flat tensor of `word_bytes`-wide words."""
    alias = torch.empty(0, dtype=WORD_DTYPES[word_bytes], device=tensor.device)
    return alias.set_(tensor.untyped_storage())
