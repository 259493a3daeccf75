"""Block gather/scatter between vLLM's paged KV cache and the block-first CPU tier.

Importing this package never imports Triton; only `backend="triton"` (or "auto" on CUDA) does.
"""
from kernels.block_copy import gather_blocks, scatter_blocks, triton_available
from kernels.layout import KVLayout

__all__ = ["KVLayout", "gather_blocks", "scatter_blocks", "triton_available"]
