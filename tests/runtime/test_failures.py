"""Damaged, torn or missing SSD blocks are reported as failed loads and dropped, never served;
a full disk costs only the blocks that do not fit."""
import contextlib
import os
import subprocess

import pytest

from flexkv_runtime.data.ssd_store import ALIGN, RECORD_BYTES


def _stored_then_evicted(make_driver, kv, cfg, src=None):
    """A driver whose request ``a`` (4 blocks) is on the SSD only."""
    d = make_driver(cfg, src)
    a = kv.keys_for(1, 4)
    d.store("a", a, [0, 1, 2, 3])
    d.store("b", kv.keys_for(2, 4), [4, 5, 6, 7])
    d.rt.flush()
    assert d.ready(a, kv.CPU) == [] and d.ready(a, kv.SSD) == a
    return d, a


def _damage(path, offset, nbytes=64):
    with open(path, "r+b") as f:
        f.seek(offset)
        data = bytearray(f.read(nbytes))
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


def test_corrupted_block_fails_its_load_and_is_dropped(make_driver, kv, tmp_path):
    src = kv.make_layers()
    d, a = _stored_then_evicted(make_driver, kv, kv.config(tmp_path / "ssd"), src)
    path, offset = d.rt.engine.ssd.location(d.slot(a[2]))
    _damage(path, offset + ALIGN + 1000)

    dst = kv.make_layers(zero=True)
    planned, failed = d.load("a", a, [0, 1, 2, 3], into=dst)
    assert planned == 4 and set(failed) == {a[2], a[3]}  # a prefix stops at its first hole
    assert kv.same_blocks(dst, [0, 1], src, [0, 1])
    assert all(not layer[2:4].any() for layer in dst)  # nothing of the bad block reached the engine
    assert a[2] not in d.ready(a, kv.SSD)
    assert d.rt.engine.ssd.snapshot().checksum_failures == 1
    assert d.mgr.pinned_blocks() == 0
    d.rt.shutdown()
    again = make_driver(kv.config(tmp_path / "ssd"))
    assert a[2] not in again.ready(a, kv.SSD)  # the tombstone keeps it away after a restart


def test_truncated_file_fails_loads_then_recovery_drops_the_lost_blocks(make_driver, kv, tmp_path):
    src = kv.make_layers()
    d, a = _stored_then_evicted(make_driver, kv, kv.config(tmp_path / "ssd"), src)
    store = d.rt.engine.ssd
    cut_slot = sorted(d.slot(k) for k in a)[2]
    path, offset = store.location(cut_slot)
    os.truncate(path, offset + ALIGN + 100)
    lost = [k for k in a if d.slot(k) >= cut_slot]

    dst = kv.make_layers(zero=True)
    planned, failed = d.load("a", a, [0, 1, 2, 3], into=dst)
    assert failed and set(lost) <= set(failed)
    loaded = [i for i, k in enumerate(a) if k not in failed]
    assert kv.same_blocks(dst, loaded, src, loaded)
    assert all(not layer[[i for i, k in enumerate(a) if k in failed]].any() for layer in dst)
    assert store.snapshot().read_errors >= 1
    d.rt.shutdown()

    os.truncate(path, offset + ALIGN + 100)
    again = make_driver(kv.config(tmp_path / "ssd"))
    assert not set(lost) & set(again.ready(a, kv.SSD))


@pytest.mark.parametrize("check, damage_header", [("header", True), ("full", True), ("full", False)])
def test_torn_write_is_dropped_at_recovery(make_driver, kv, tmp_path, check, damage_header):
    src = kv.make_layers()
    d, a = _stored_then_evicted(make_driver, kv, kv.config(tmp_path / "ssd", recovery_check=check), src)
    path, offset = d.rt.engine.ssd.location(d.slot(a[1]))
    d.rt.shutdown()
    # the log says the block is there, the data is not what was written
    _damage(path, offset if damage_header else offset + ALIGN, 256)

    again = make_driver(kv.config(tmp_path / "ssd", recovery_check=check), src)
    assert again.rt.engine.ssd.snapshot().dropped_at_recovery == 1
    assert again.rt.adopted == 7  # 8 written, 1 torn
    assert a[1] not in again.ready(a, kv.SSD)
    assert again.mgr.lookup(a).per_tier[kv.SSD] == 1


def test_header_check_lets_data_damage_through_to_the_load_check(make_driver, kv, tmp_path):
    src = kv.make_layers()
    d, a = _stored_then_evicted(make_driver, kv, kv.config(tmp_path / "ssd"), src)
    path, offset = d.rt.engine.ssd.location(d.slot(a[0]))
    d.rt.shutdown()
    _damage(path, offset + ALIGN + 7)

    again = make_driver(kv.config(tmp_path / "ssd"))
    assert again.rt.adopted == 8  # the header is intact: a cheap recovery cannot tell
    dst = kv.make_layers(zero=True)
    planned, failed = again.load("a", a, [0, 1, 2, 3], into=dst)
    assert failed == a and all(not layer.any() for layer in dst)


def test_torn_log_tail_and_bad_records_are_skipped(make_driver, kv, tmp_path):
    src = kv.make_layers()
    d, a = _stored_then_evicted(make_driver, kv, kv.config(tmp_path / "ssd"), src)
    log_path = d.rt.engine.ssd.dirs[0].log_path
    d.rt.shutdown()
    with open(log_path, "ab") as f:
        f.write(b"\x00" * RECORD_BYTES + b"half a record")
    again = make_driver(kv.config(tmp_path / "ssd"))
    assert again.rt.adopted == 8
    assert again.rt.engine.ssd.snapshot().bad_log_records == 2
    assert os.path.getsize(log_path) == 8 * RECORD_BYTES  # compacted at start


def test_log_is_compacted_as_it_grows(kv, tmp_path):
    import numpy as np

    from flexkv_runtime.data.ssd_store import SsdStore

    rows = np.arange(4 * 8192, dtype=np.uint32).view(np.uint8)[: 4 * 8192].reshape(4, 8192).copy()
    store = SsdStore([tmp_path], kv.NS.tag, 8, 8192, io_threads=1, compact_min_records=8)
    for round_ in range(10):
        keys = [round_ * 10 + i for i in range(4)]
        assert store.write([0, 1, 2, 3], keys, [None, *keys[:3]], list(rows))
    log_path = store.dirs[0].log_path
    assert store.snapshot().log_compactions >= 2
    assert os.path.getsize(log_path) <= (8 + 4) * RECORD_BYTES
    store.close()
    store = SsdStore([tmp_path], kv.NS.tag, 8, 8192, io_threads=1, compact_min_records=8)
    assert store.recovered == [(90, None, 0), (91, 90, 1), (92, 91, 2), (93, 92, 3)]
    out = np.zeros_like(rows)
    assert store.read([0, 1, 2, 3], [90, 91, 92, 93], list(out)) == [True] * 4
    assert np.array_equal(out, rows)
    store.close()


def test_read_of_a_slot_holding_another_key_fails_without_harming_it(kv, tmp_path):
    import numpy as np

    from flexkv_runtime.data.ssd_store import SsdStore

    block = np.full(8192, 7, dtype=np.uint8)
    store = SsdStore([tmp_path], kv.NS.tag, 4, 8192, io_threads=1)
    try:
        assert store.write([1], [11], [None], [block]) == [True]
        out = np.zeros_like(block)
        assert store.read([1], [12], [out]) == [False]
        assert store.read([1], [11], [out]) == [True] and np.array_equal(out, block)
        assert store.snapshot().unknown_blocks == 1
    finally:
        store.close()


def test_a_max_bytes_cap_below_one_slot_fails_at_start(tmp_path):
    from flexkv_runtime.data.ssd_store import SsdStore

    with pytest.raises(ValueError, match="SSD max_bytes 10 cannot hold one block: a slot takes 12288 bytes"):
        SsdStore([tmp_path], "ab" * 8, 4, 8192, io_threads=1, max_bytes=10)
    assert list(tmp_path.iterdir()) == []  # nothing created


def test_max_bytes_cap_fails_the_blocks_that_do_not_fit_and_keeps_serving(make_driver, kv, tmp_path):
    src = kv.make_layers()
    block_bytes = sum(layer[0].nbytes for layer in src)
    stride = ALIGN + -(-block_bytes // ALIGN) * ALIGN
    d = make_driver(kv.config(tmp_path / "ssd", max_bytes=3 * stride), src)
    a, b = kv.keys_for(1, 4), kv.keys_for(2, 4)
    d.store("a", a, [0, 1, 2, 3])  # stores to the CPU tier succeed; one demotion runs out of space
    d.store("b", b, [4, 5, 6, 7])
    d.rt.flush()
    store = d.rt.engine.ssd
    assert store.snapshot().no_space >= 5 and store.live_blocks == 3
    on_ssd = d.ready(a, kv.SSD)
    assert len(on_ssd) == 3 and d.mgr.tiers[kv.SSD].stats.failed >= 5

    dst = kv.make_layers(zero=True)
    planned, failed = d.load("a", a, [8, 9, 10, 11], into=dst)
    assert failed == [] and planned == d.mgr.lookup(a).ready_blocks == len(d.ready(a, kv.CPU))
    assert planned >= 1 or a[0] not in on_ssd
    assert kv.same_blocks(dst, range(8, 8 + planned), src, range(planned))
    text = d.rt.prometheus_text()
    assert "flexkv_ssd_no_space_total" in text
    assert f"flexkv_ops_failed_total {d.mgr.stats.ops_failed}" in text and d.mgr.stats.ops_failed >= 1


@contextlib.contextmanager
def mounted(where, fstype, *options):
    """A fresh filesystem at ``where`` for the test's duration; skips where mounting is not allowed."""
    where.mkdir()
    try:
        done = subprocess.run(["mount", "-t", fstype, *options, fstype, str(where)], capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no mount command in this sandbox")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a {fstype} here (needs root / CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_real_tiny_filesystem_runs_out_of_space_and_keeps_serving(make_driver, kv, tmp_path):
    with mounted(tmp_path / "tiny", "tmpfs", "-o", "size=2m") as mount_point:
        shape = dict(num_blocks=16, heads=8, head_size=256, num_layers=4)  # 256 KiB blocks: 7 fit in 2 MiB
        src = kv.make_layers(**shape)
        d = make_driver(kv.config(mount_point, cpu_blocks=8, ssd_blocks=16), src)
        store = d.rt.engine.ssd
        a, b = kv.keys_for(1, 8), kv.keys_for(2, 8)
        d.store("a", a, list(range(8)))
        d.store("b", b, list(range(8, 16)))  # evicts a from the CPU tier; its own copies find no space
        d.rt.flush()
        assert store.snapshot().no_space > 0
        on_ssd = d.ready(a, kv.SSD)
        assert 0 < len(on_ssd) < 8 and d.ready(b, kv.SSD) == []
        dst = kv.make_layers(**shape, zero=True)
        planned, failed = d.load("a", a, list(range(8)), into=dst)
        assert failed == []
        assert kv.same_blocks(dst, range(planned), src, range(planned))
        d.rt.shutdown()


def test_filesystem_without_direct_io_falls_back_to_buffered_io(make_driver, kv, tmp_path, caplog):
    # ramfs refuses O_DIRECT (so does tmpfs before Linux 6.6)
    with mounted(tmp_path / "ram", "ramfs") as mount_point:
        src = kv.make_layers()
        d = make_driver(kv.config(mount_point), src)
        assert not d.rt.engine.ssd.direct_io and "refuses O_DIRECT" in caplog.text
        a = kv.keys_for(1, 4)
        d.store("a", a, [0, 1, 2, 3])
        d.store("b", kv.keys_for(2, 4), [4, 5, 6, 7])
        dst = kv.make_layers(zero=True)
        assert d.load("a", a, [0, 1, 2, 3], into=dst) == (4, [])
        assert kv.same_blocks(dst, [0, 1, 2, 3], src, [0, 1, 2, 3])
        d.rt.shutdown()
        with pytest.raises(ValueError, match="refuses O_DIRECT"):
            make_driver(kv.config(mount_point, direct_io=True))
