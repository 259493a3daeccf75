"""CPU pool rows with tails: the remote tier's trailer right after each block, nothing else disturbed."""
import numpy as np
import pytest
import torch

from kernels import gather_blocks, scatter_blocks
from flexkv_runtime.data.cpu_pool import PAGE, CpuPool
from flexkv_runtime.data.ssd_store import SsdStore


@pytest.mark.parametrize("block_bytes, stride", [(2 * PAGE, 3 * PAGE), (1000, 1088)])
def test_rows_and_tails_share_one_buffer_per_slot_and_rows_keep_their_alignment(block_bytes, stride):
    pool = CpuPool(4, block_bytes, tail_bytes=64, pin=False)
    assert pool.stride == stride and pool.nbytes == pool.memory.nbytes == 4 * stride
    alignment = PAGE if block_bytes % PAGE == 0 else 64
    rows, spans = pool.rows(range(4)), pool.rows_with_tails(range(4))
    assert all(row.ctypes.data % alignment == 0 and row.nbytes == block_bytes for row in rows)
    assert all(span.ctypes.data == row.ctypes.data and span.nbytes == block_bytes + 64 for row, span in zip(rows, spans))
    for slot, span in enumerate(spans):
        span[block_bytes:] = 0xA0 + slot  # tails written after the rows ...
    assert not pool.tensor.any()  # ... are outside every row
    for slot, row in enumerate(rows):
        row[:] = slot + 1
    assert [span[block_bytes:].tolist() for span in spans] == [[0xA0 + slot] * 64 for slot in range(4)]
    assert torch.equal(pool.tensor[:, 0], torch.arange(1, 5, dtype=torch.uint8))


def test_a_pool_without_tails_is_the_plain_contiguous_layout():
    pool = CpuPool(3, 4096, pin=False)
    assert pool.stride == 4096 and pool.tensor.is_contiguous()
    assert pool.rows_with_tails([1])[0].ctypes.data == pool.row(1).ctypes.data


def test_copies_between_engine_and_tailed_rows_are_byte_exact_and_leave_the_tails(kv):
    src, dst = kv.make_layers(seed=3), kv.make_layers(zero=True)
    block_bytes = sum(layer[0].nbytes for layer in src)
    pool = CpuPool(6, block_bytes, tail_bytes=64, pin=False)
    for span in pool.rows_with_tails(range(6)):
        span[block_bytes:] = 0x5A
    gather_blocks(src, torch.tensor([7, 2, 9]), pool.tensor, torch.tensor([4, 0, 1]), backend="torch")
    scatter_blocks(pool.tensor, torch.tensor([1, 4, 0]), dst, torch.tensor([3, 5, 6]), backend="torch")
    assert kv.same_blocks(dst, [3, 5, 6], src, [9, 7, 2])
    assert all((span[block_bytes:] == 0x5A).all() for span in pool.rows_with_tails(range(6)))


def test_the_ssd_store_writes_from_and_reads_into_tailed_rows(tmp_path):
    block_bytes = 2 * PAGE
    pool = CpuPool(4, block_bytes, tail_bytes=64, pin=False)
    data = np.random.default_rng(5).integers(0, 256, (2, block_bytes), np.uint8)
    pool.row(0)[:], pool.row(1)[:] = data
    store = SsdStore([str(tmp_path)], "ab" * 8, 8, block_bytes, io_threads=1, fsync="none")
    try:
        assert store.write([3, 5], [11, 12], [None, 11], pool.rows([0, 1])) == [True, True]
        assert store.read([3, 5], [11, 12], pool.rows([3, 2])) == [True, True]
    finally:
        store.close()
    assert (pool.row(3) == data[0]).all() and (pool.row(2) == data[1]).all()


def test_a_pool_larger_than_memory_fails_naming_the_tier_and_its_size():
    with pytest.raises(MemoryError, match=r"CPU tier's pool of 1099511627776 slots x 1048576 bytes \(1073741824\.0 "
                                          r"GiB\) cannot be allocated: .*lower the CPU tier's capacity"):
        CpuPool(1 << 40, 1 << 20, pin=False)  # 1 EiB
