"""Byte-exact checks of KV block gather/scatter against a naive per-block reference.

The torch fallback runs in this process.  The Triton kernel can only run on CPU
under TRITON_INTERPRET=1, which must be set before triton is imported, so
`test_triton_backend_under_interpreter` reruns this very module in a subprocess
with it set, where every backend-parametrized case then uses Triton instead.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kernels import KVLayout, gather_blocks, scatter_blocks, torch_copy, triton_available

REPO = Path(__file__).resolve().parents[2]
UNDER_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
# The torch fallback has two plans (runs of consecutive ids vs the scattered batch through a
# temporary, in pieces of some blocks or of one block); each backend-parametrized test runs
# every one, whatever the size-based choice would be.
BACKENDS = ["triton"] if UNDER_INTERPRETER else ["torch/runs", "torch/staged", "torch/staged-per-block"]
DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn, torch.uint8]
LAYOUTS = ["blocks-first", "kv-first"]
parent_only = pytest.mark.skipif(UNDER_INTERPRETER, reason="backend-independent; the parent pytest process runs it")


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch) -> str:
    name, _, plan = request.param.partition("/")
    if plan:
        for threshold in ("_RUN_BYTES", "_OP_COST_BYTES"):
            monkeypatch.setattr(torch_copy, threshold, 0 if plan == "runs" else 1 << 62)
        if plan == "staged-per-block":
            monkeypatch.setattr(torch_copy, "_STAGE_BYTES", 1)
    return name


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random bytes (NaN patterns included), so any value-level copy would show up."""
    size = torch.empty((), dtype=dtype).element_size()
    generator = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (*shape[:-1], shape[-1] * size), dtype=torch.uint8, generator=generator)
    return raw.view(dtype)


def layer_shape(layout: str, num_blocks: int, kv_heads: int, block_size: int, head_dim: int) -> tuple[int, ...]:
    if layout == "blocks-first":
        return (num_blocks, kv_heads, block_size, 2 * head_dim)
    return (2, num_blocks, block_size, kv_heads, head_dim)


def make_layers(
    layout: str = "blocks-first",
    dtype: torch.dtype = torch.bfloat16,
    *,
    num_layers: int = 3,
    num_blocks: int = 9,
    kv_heads: int = 2,
    block_size: int = 3,
    head_dim: int = 65,
    shared_buffer: bool = False,
    seed: int = 0,
) -> list[torch.Tensor]:
    """Per-layer engine tensors: separate allocations, or strided views into one buffer
    (layers interleaved right after the block dim, as an engine with one big KV buffer has)."""
    shape = layer_shape(layout, num_blocks, kv_heads, block_size, head_dim)
    if not shared_buffer:
        return [random_tensor(shape, dtype, seed + layer) for layer in range(num_layers)]
    layer_dim = 1 if layout == "blocks-first" else 2
    big = random_tensor((*shape[:layer_dim], num_layers, *shape[layer_dim:]), dtype, seed)
    return list(big.unbind(layer_dim))


def chunks_of(layer: torch.Tensor, block: int) -> list[torch.Tensor]:
    return [layer[block]] if layer.dim() == 4 else [layer[0, block], layer[1, block]]


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(-1).view(torch.uint8)


def reference_gather(layers, block_ids, pool, slot_ids) -> torch.Tensor:
    """Expected pool bytes, straight from the definition of a slot."""
    expected = as_bytes(pool).reshape(pool.shape[0], -1).clone()
    for block, slot in zip(block_ids, slot_ids):
        expected[slot] = torch.cat([as_bytes(chunk) for layer in layers for chunk in chunks_of(layer, block)])
    return expected


def reference_scatter(pool, slot_ids, layers, block_ids) -> list[torch.Tensor]:
    """Expected engine bytes per layer, one chunk at a time."""
    expected = [layer.clone().contiguous() for layer in layers]
    slots = as_bytes(pool).reshape(pool.shape[0], -1)
    for slot, block in zip(slot_ids, block_ids):
        offset = 0
        for layer in expected:
            for chunk in chunks_of(layer, block):
                size = chunk.numel() * chunk.element_size()
                chunk.view(-1).view(torch.uint8).copy_(slots[slot, offset : offset + size])
                offset += size
    return [as_bytes(layer) for layer in expected]


def random_pool(layers: list[torch.Tensor], num_slots: int, seed: int = 99) -> torch.Tensor:
    return random_tensor((num_slots, KVLayout.from_layers(layers).block_bytes), torch.uint8, seed)


def assert_gather(layers, block_ids, pool, slot_ids, backend):
    expected = reference_gather(layers, block_ids, pool, slot_ids)
    gather_blocks(layers, block_ids, pool, slot_ids, backend=backend)
    assert torch.equal(as_bytes(pool).reshape(pool.shape[0], -1), expected)


def assert_scatter(pool, slot_ids, layers, block_ids, backend):
    expected = reference_scatter(pool, slot_ids, layers, block_ids)
    scatter_blocks(pool, slot_ids, layers, block_ids, backend=backend)
    for layer, want in zip(layers, expected):
        assert torch.equal(as_bytes(layer), want)


# (block_ids, slot_ids) batches for 9 engine blocks and 8 pool slots: consecutive ids on
# the pool side, the engine side, both or neither (the torch "runs" plan treats each
# differently), repeated ids, a single block.
BATCHES = {
    "unsorted-repeated-blocks": ([7, 2, 2, 8, 0], [3, 0, 6, 1, 5]),
    "slot-runs": ([5, 1, 8, 3], [2, 3, 4, 5]),
    "block-runs": ([3, 4, 5, 6], [7, 0, 4, 2]),
    "both-contiguous": ([2, 3, 4], [5, 6, 7]),
    "single": ([4], [6]),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gather_and_scatter_every_dtype(backend, layout, dtype):
    layers = make_layers(layout, dtype)
    block_ids, slot_ids = BATCHES["unsorted-repeated-blocks"]
    pool = random_pool(layers, 8)
    assert_gather(layers, block_ids, pool, slot_ids, backend)
    assert_scatter(random_pool(layers, 8, seed=5), slot_ids[::-1], layers, block_ids, backend)


@pytest.mark.parametrize("batch", BATCHES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_batch_shapes(backend, batch, layout):
    block_ids, slot_ids = BATCHES[batch]
    layers = make_layers(layout)
    assert_gather(layers, torch.tensor(block_ids), random_pool(layers, 8), torch.tensor(slot_ids), backend)
    assert_scatter(random_pool(layers, 8), slot_ids, layers, block_ids, backend)


@pytest.mark.parametrize("head_dim", [1, 65, 72, 80, 96, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn], ids=str)
def test_odd_head_dims(backend, head_dim, dtype):
    layers = make_layers("blocks-first", dtype, head_dim=head_dim, kv_heads=1, block_size=3)
    assert_gather(layers, [6, 1, 3], random_pool(layers, 4), [2, 0, 3], backend)
    assert_scatter(random_pool(layers, 4), [1, 3], layers, [0, 8], backend)


def test_repeated_destinations_last_writer_wins(backend):
    layers = make_layers()
    pool = random_pool(layers, 4)
    gather_blocks(layers, [1, 2, 3], pool, [0, 0, 0], backend=backend)
    assert torch.equal(pool[0], reference_gather(layers, [3], pool, [0])[0])
    scatter_blocks(pool, [1, 2, 0], layers, [5, 5, 5], backend=backend)
    for layer in layers:
        assert torch.equal(as_bytes(layer[5]), as_bytes(layer[3]))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_strided_views_into_one_buffer(backend, layout):
    layers = make_layers(layout, shared_buffer=True)
    assert not layers[0].is_contiguous()
    assert_gather(layers, [8, 0, 4], random_pool(layers, 5), [4, 1, 2], backend)
    assert_scatter(random_pool(layers, 5), [0, 3], layers, [2, 7], backend)


def test_every_other_block_and_unaligned_buffers(backend):
    """Odd dim-0 strides and byte offsets force narrow words; a typed pool view works too."""
    big = make_layers(num_blocks=18, dtype=torch.float8_e4m3fn, head_dim=65)
    layers = [layer[1::2] for layer in big]  # dim 0 stride of two blocks, not contiguous
    raw = random_tensor((5 * KVLayout.from_layers(layers).block_bytes + 1,), torch.uint8, 3)
    unaligned_pool = raw[1:].view(5, -1)
    assert_gather(layers, [8, 0, 4], unaligned_pool, [4, 1, 2], backend)
    assert_scatter(unaligned_pool, [0, 3], layers, [2, 7], backend)
    layers16 = make_layers(dtype=torch.bfloat16)
    typed_pool = random_pool(layers16, 4).view(torch.bfloat16)
    assert_gather(layers16, [3, 1], typed_pool, [2, 0], backend)


@pytest.mark.parametrize("order", ["ascending", "descending"])
def test_layer_major_buffer_in_any_address_order(backend, order):
    """Layers as `big[layer]` of one `[layers, blocks, ...]` buffer, listed in either address order."""
    big = random_tensor((4, *layer_shape("blocks-first", 9, 2, 4, 64)), torch.float16, 11)
    layers = list(big.unbind(0)) if order == "ascending" else list(big.unbind(0))[::-1]
    assert_gather(layers, [8, 0, 4, 5], random_pool(layers, 5), [4, 1, 2, 3], backend)
    assert_scatter(random_pool(layers, 5), [0, 3, 1], layers, [2, 7, 3], backend)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_pool_slots_with_gaps_between_them(backend, layout):
    """Slots need not be back to back; the bytes between them are never touched."""
    layers = make_layers(layout, head_dim=64)
    block_bytes = KVLayout.from_layers(layers).block_bytes
    padded = random_tensor((6, block_bytes + 48), torch.uint8, 7)
    pool = padded[:, 16 : 16 + block_bytes]
    gaps = torch.cat([padded[:, :16], padded[:, 16 + block_bytes :]], dim=1).clone()
    assert_gather(layers, [7, 2, 2, 8, 0], pool, [3, 0, 5, 1, 4], backend)
    assert_scatter(pool, [3, 0, 5], layers, [7, 2, 8], backend)
    assert torch.equal(torch.cat([padded[:, :16], padded[:, 16 + block_bytes :]], dim=1), gaps)


def test_float_bit_patterns_move_as_bits(backend):
    """Wide words may be float types (complex128 in the torch fallback): signalling and quiet
    NaNs, infinities, denormals and -0.0 must come through bit for bit."""
    words = np.array(
        [0x7FF0000000000001, 0x7FF4000000000000, 0xFFF8000000000000, 0x7FF8DEADBEEF0001,
         0x7FF0000000000000, 0x0000000000000001, 0x8000000000000000, 0x800FFFFFFFFFFFFF],
        dtype=np.uint64,
    ).view(np.int64)
    layers = make_layers(head_dim=64, block_size=4)  # 16-byte aligned chunks: the widest words
    for index, layer in enumerate(layers):
        flat = layer.view(-1).view(torch.int64)
        flat.copy_(torch.from_numpy(np.roll(words, index)).repeat(flat.numel() // len(words)))
    pool = random_pool(layers, 6)
    assert_gather(layers, [5, 1, 8, 0], pool, [2, 5, 3, 0], backend)
    pool.view(-1).view(torch.int64).copy_(torch.from_numpy(words[::-1].copy()).repeat(pool.numel() // 64))
    assert_scatter(pool, [1, 4, 0], layers, [3, 8, 6], backend)


@parent_only
def test_torch_fallback_moves_every_layer_as_16_byte_words_in_one_view():
    """The CPU path the benchmark measures: aligned chunks go as complex128 rows of one view."""
    layers = make_layers(head_dim=64, block_size=4)
    layout = KVLayout.from_layers(layers)
    chunks = torch_copy._ChunkRows.of(layers, layout, random_pool(layers, 3))
    assert chunks is not None and chunks.engine.dtype == torch.complex128
    assert chunks.engine.shape[1] * 16 == layout.chunk_bytes and chunks.per_block == 3
    padded = torch.zeros(3, layout.block_bytes + 16, dtype=torch.uint8)[:, : layout.block_bytes]
    assert torch_copy._ChunkRows.of(layers, layout, padded) is None  # slots not back to back


@pytest.mark.parametrize("layout", LAYOUTS)
def test_round_trip_into_fresh_cache(backend, layout):
    layers = make_layers(layout, num_blocks=12)
    block_ids = [11, 3, 7, 0, 5]
    pool = KVLayout.from_layers(layers).empty_pool(6)
    gather_blocks(layers, block_ids, pool, [5, 0, 2, 1, 4], backend=backend)
    fresh = [torch.zeros_like(layer) for layer in layers]
    scatter_blocks(pool, [5, 0, 2, 1, 4], fresh, block_ids, backend=backend)
    for original, restored in zip(layers, fresh):
        for block in range(12):
            for want_chunk, got_chunk in zip(chunks_of(original, block), chunks_of(restored, block)):
                want = as_bytes(want_chunk) if block in block_ids else torch.zeros_like(as_bytes(want_chunk))
                assert torch.equal(as_bytes(got_chunk), want), block


def test_empty_batch_is_a_no_op(backend):
    layers = make_layers()
    pool = random_pool(layers, 3)
    before = [pool.clone(), *(layer.clone() for layer in layers)]
    gather_blocks(layers, [], pool, [], backend=backend)
    no_ids = torch.tensor([], dtype=torch.int32)
    scatter_blocks(pool, no_ids, layers, no_ids, backend=backend)
    for tensor, saved in zip([pool, *layers], before):
        assert torch.equal(as_bytes(tensor), as_bytes(saved))


@pytest.mark.parametrize(
    "block_ids, slot_ids, message",
    [
        ([0, 9], [0, 1], "block_ids must lie in"),
        ([-1], [0], "block_ids must lie in"),
        ([0], [3], "slot_ids must lie in"),
        ([0, 1], [0], "2 block ids but 1 slot ids"),
        ([0.0], [0], "must be integers"),
        ([[0]], [0], "must be 1-D"),
    ],
)
def test_bad_ids_raise_and_touch_nothing(backend, block_ids, slot_ids, message):
    layers = make_layers()
    pool = random_pool(layers, 3)
    saved = pool.clone()
    with pytest.raises(ValueError, match=message):
        gather_blocks(layers, block_ids, pool, slot_ids, backend=backend)
    with pytest.raises(ValueError, match=message):
        scatter_blocks(pool, slot_ids, layers, block_ids, backend=backend)
    assert torch.equal(pool, saved)


def test_layout_describes_both_engine_layouts():
    joint = KVLayout.from_layers(make_layers("blocks-first", torch.float16, num_layers=4, head_dim=8))
    assert (joint.num_layers, joint.num_blocks, joint.chunks_per_layer, joint.chunk_bytes) == (4, 9, 1, 2 * 3 * 16 * 2)
    assert joint.block_bytes == 4 * joint.layer_block_bytes == 4 * 192
    split = KVLayout.from_layers(make_layers("kv-first", torch.float16, num_layers=4, head_dim=8))
    assert (split.chunks_per_layer, split.chunk_bytes, split.block_bytes) == (2, 3 * 2 * 8 * 2, joint.block_bytes)
    assert split.empty_pool(5).shape == (5, split.block_bytes)


@pytest.mark.parametrize(
    "layers, message",
    [
        ([], "at least one layer"),
        ([torch.zeros(4, 2, 3, 8), torch.zeros(5, 2, 3, 8)], "all layers must match"),
        ([torch.zeros(4, 2, 3, 8), torch.zeros(4, 2, 3, 8, dtype=torch.float16)], "all layers must match"),
        ([torch.zeros(4, 3, 8)], "unsupported KV layer shape"),
        ([torch.zeros(3, 4, 3, 2, 8)], "unsupported KV layer shape"),
        ([torch.zeros(4, 3, 2, 8).transpose(1, 2)], "must be contiguous"),
    ],
)
def test_bad_layers_raise(layers, message):
    with pytest.raises(ValueError, match=message):
        KVLayout.from_layers(layers)


def test_bad_pool_or_backend_raises():
    layers = make_layers()
    block_bytes = KVLayout.from_layers(layers).block_bytes
    for pool, message in [
        (torch.zeros(3, block_bytes + 1, dtype=torch.uint8), "slots hold"),
        (torch.zeros(block_bytes, 3, dtype=torch.uint8).t(), "must be contiguous"),
        (torch.zeros(block_bytes, dtype=torch.uint8), "one slot per row"),
    ]:
        with pytest.raises(ValueError, match=message):
            gather_blocks(layers, [0], pool, [0])
    with pytest.raises(ValueError, match="backend must be"):
        gather_blocks(layers, [0], random_pool(layers, 1), [0], backend="cuda")


@parent_only
def test_kernels_work_without_triton():
    """`import kernels` must not need triton; "auto" then uses torch and "triton" says why not."""
    script = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, kernels\n"
        "layers = [torch.full((4, 1, 2, 8), 7, dtype=torch.uint8)]\n"
        "pool = kernels.KVLayout.from_layers(layers).empty_pool(2).zero_()\n"
        "kernels.gather_blocks(layers, [3], pool, [1])\n"
        "assert bool((pool[1] == 7).all()) and not kernels.triton_available()\n"
        "try:\n"
        "    kernels.gather_blocks(layers, [3], pool, [1], backend='triton')\n"
        "except ImportError as error:\n"
        "    assert 'triton' in str(error)\n"
        "else:\n"
        "    raise AssertionError('backend=triton without triton must fail')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


@parent_only
@pytest.mark.skipif(not triton_available(), reason="triton cannot be imported here")
def test_triton_backend_under_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]


# --- on a CUDA machine (skipped elsewhere): the compiled Triton kernel against the references,
# with the engine on the GPU and the pool in pinned host memory (zero-copy D2H/H2D) or on the GPU.
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _cuda_backend(name: str) -> str:
    if name == "triton" and not triton_available():
        pytest.skip("triton cannot be imported here")
    return name


@parent_only
@cuda_only
@pytest.mark.parametrize("pool_on", ["pinned", "cuda"])
@pytest.mark.parametrize("cuda_backend", ["triton", "torch"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_engine_gather_scatter(cuda_backend, layout, dtype, pool_on):
    backend = _cuda_backend(cuda_backend)
    place = (lambda t: t.pin_memory()) if pool_on == "pinned" else (lambda t: t.cuda())
    for head_dim in (65, 128):
        layers = make_layers(layout, dtype, head_dim=head_dim)
        gpu_layers = [layer.cuda() for layer in layers]
        block_ids, slot_ids = BATCHES["unsorted-repeated-blocks"]
        pool = place(random_pool(layers, 8))
        expected = reference_gather(layers, block_ids, pool.cpu(), slot_ids)
        gather_blocks(gpu_layers, block_ids, pool, slot_ids, backend=backend)
        torch.cuda.synchronize()
        assert torch.equal(as_bytes(pool.cpu()).reshape(8, -1), expected)
        pool = place(random_pool(layers, 8, seed=5))
        expected_layers = reference_scatter(pool.cpu(), slot_ids[::-1], layers, block_ids)
        scatter_blocks(pool, slot_ids[::-1], gpu_layers, block_ids, backend=backend)
        torch.cuda.synchronize()
        for layer, want in zip(gpu_layers, expected_layers):
            assert torch.equal(as_bytes(layer.cpu()), want)


@parent_only
@cuda_only
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_vllm_sized_batch_matches_cpu_fallback(layout):
    """32 layers, 8 KV heads, head 128, 16 tokens: Triton on the GPU gives the CPU fallback's bytes."""
    _cuda_backend("triton")
    generator = torch.Generator().manual_seed(3)
    layers = make_layers(layout, torch.bfloat16, num_layers=32, num_blocks=96, kv_heads=8, block_size=16, head_dim=128)
    block_ids = torch.randperm(96, generator=generator)[:40]
    slot_ids = torch.randperm(64, generator=generator)[:40]
    pool = random_pool(layers, 64).pin_memory()
    want = pool.clone()
    gather_blocks(layers, block_ids, want, slot_ids, backend="torch")
    gpu_layers = [layer.cuda() for layer in layers]
    gather_blocks(gpu_layers, block_ids, pool, slot_ids)  # "auto": Triton, pinned pool
    torch.cuda.synchronize()
    assert torch.equal(pool, want)
    fresh = [torch.zeros_like(layer) for layer in gpu_layers]
    scatter_blocks(pool, slot_ids, fresh, block_ids)
    cpu_fresh = [torch.zeros_like(layer) for layer in layers]
    scatter_blocks(want, slot_ids, cpu_fresh, block_ids, backend="torch")
    torch.cuda.synchronize()
    for got, expected in zip(fresh, cpu_fresh):
        assert torch.equal(as_bytes(got.cpu()), as_bytes(expected))


@parent_only
@cuda_only
def test_cuda_triton_needs_a_pinned_pool():
    _cuda_backend("triton")
    gpu_layers = [layer.cuda() for layer in make_layers()]
    pageable = random_pool(gpu_layers, 3)  # built from the layout only; lives in pageable host memory
    with pytest.raises(ValueError, match="pinned"):
        gather_blocks(gpu_layers, [0], pageable, [0], backend="triton")
    gather_blocks(gpu_layers, [4], pageable, [1])  # "auto" falls back to torch, which stages the copy
    assert torch.equal(pageable[1], reference_gather([layer.cpu() for layer in gpu_layers], [4], pageable, [1])[1])
