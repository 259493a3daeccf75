"""Blocks travel engine -> CPU -> SSD -> CPU -> engine byte-exactly, and survive a restart."""
import os
import stat

import pytest

from flexkv_runtime.control.keys import Namespace


@pytest.mark.parametrize(
    "head_size, direct_io, write_policy",
    [
        (128, "auto", "write_through"),  # block of 24 KiB: O_DIRECT straight into the pool
        (80, "auto", "write_through"),  # block of 15 KiB: O_DIRECT through an aligned staging buffer
        (128, False, "write_through"),  # buffered I/O
        (128, "auto", "write_back"),  # demotion on eviction, ordered before the slot's reuse
    ],
)
def test_round_trip_is_byte_exact(make_driver, kv, tmp_path, head_size, direct_io, write_policy):
    src = kv.make_layers(head_size=head_size)
    d = make_driver(kv.config(tmp_path / "ssd", direct_io=direct_io, write_policy=write_policy), src)
    a, b = kv.keys_for(1, 4), kv.keys_for(2, 4)
    d.store("a", a, [0, 1, 2, 3])
    if write_policy == "write_through":
        assert d.ready(a, kv.SSD) == a
    d.store("b", b, [4, 5, 6, 7])  # the CPU tier holds 4 blocks: a leaves it
    d.rt.flush()
    assert d.ready(a, kv.CPU) == [] and d.ready(a, kv.SSD) == a
    assert d.mgr.lookup(a).per_tier[kv.SSD] == 4

    dst = kv.make_layers(head_size=head_size, zero=True)
    planned, failed = d.load("a-again", a, [10, 11, 12, 13], into=dst)
    assert (planned, failed) == (4, [])
    assert kv.same_blocks(dst, [10, 11, 12, 13], src, [0, 1, 2, 3])
    untouched = [i for i in range(16) if i not in (10, 11, 12, 13)]
    assert all(not layer[untouched].any() for layer in dst)
    assert d.mgr.pinned_blocks() == 0


def test_blocks_the_cpu_tier_refuses_pass_through_it_to_the_ssd_byte_exactly(make_driver, kv, tmp_path):
    cfg = kv.config(tmp_path / "ssd") | {"admission": {"name": "frequency", "min_hits": 2}}
    src = kv.make_layers(seed=3)
    d = make_driver(cfg, src)
    a = kv.keys_for(3, 4)
    d.store("a", a, [0, 1, 2, 3])  # first sighting: not kept in the CPU tier, written through
    assert d.ready(a, kv.CPU) == [] and d.ready(a, kv.SSD) == a
    assert d.mgr.cpu.used_blocks == 0 and d.mgr.cpu.stats.rejected == 4
    dst = kv.make_layers(zero=True)
    assert d.load("a-again", a, [8, 9, 10, 11], into=dst) == (4, [])
    assert kv.same_blocks(dst, [8, 9, 10, 11], src, [0, 1, 2, 3])
    d.mgr.check_invariants()
    assert d.mgr.pinned_blocks() == 0


def test_restart_adopts_blocks_of_the_same_namespace_only(make_driver, kv, tmp_path):
    src = kv.make_layers()
    a = kv.keys_for(1, 4)
    first = make_driver(kv.config(tmp_path / "ssd"), src)
    first.store("a", a, [3, 2, 1, 0])
    first.rt.shutdown()

    other = make_driver(kv.config(tmp_path / "ssd"), namespace=Namespace(model="another-model"))
    assert other.rt.adopted == 0
    assert other.mgr.lookup(a).ready_blocks == 0
    other.rt.shutdown()

    again = make_driver(kv.config(tmp_path / "ssd"))
    assert again.rt.adopted == 4
    assert again.mgr.lookup(a).per_tier[kv.SSD] == 4
    assert again.mgr.index.get(a[3]).parent.key == a[2]  # the prefix chain came back too
    dst = kv.make_layers(zero=True)
    assert again.load("a", a, [8, 9, 10, 11], into=dst) == (4, [])
    assert kv.same_blocks(dst, [8, 9, 10, 11], src, [3, 2, 1, 0])


def test_store_directories_are_private(make_driver, kv, tmp_path):
    d = make_driver(kv.config(tmp_path / "new" / "ssd"))
    store = d.rt.engine.ssd
    for path in (tmp_path / "new" / "ssd", store.dirs[0].path):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    for path in store.dirs[0].path.iterdir():
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_loose_store_directory_is_refused(kv, tmp_path):
    from flexkv_runtime.runtime import KVRuntime

    loose = tmp_path / "ssd" / f"flexkv-{kv.NS.tag}"
    loose.mkdir(parents=True)
    os.chmod(loose, 0o755)
    with pytest.raises(PermissionError, match="must be 0700"):
        KVRuntime(kv.config(tmp_path / "ssd"), namespace=kv.NS, block_bytes=4096)


def test_second_runtime_on_an_open_store_is_refused(make_driver, kv, tmp_path):
    from flexkv_runtime.runtime import KVRuntime

    make_driver(kv.config(tmp_path / "ssd"))
    with pytest.raises(RuntimeError, match="already open"):
        KVRuntime(kv.config(tmp_path / "ssd"), namespace=kv.NS, block_bytes=kv.make_layers()[0][0].nbytes * 3)


def test_two_directories_stripe_blocks(make_driver, kv, tmp_path):
    src = kv.make_layers()
    cfg = kv.config(tmp_path / "one")
    cfg["ssd"]["dirs"] = [str(tmp_path / "one"), str(tmp_path / "two")]
    d = make_driver(cfg, src)
    a, b = kv.keys_for(1, 4), kv.keys_for(2, 4)
    d.store("a", a, [0, 1, 2, 3])
    d.store("b", b, [4, 5, 6, 7])
    store = d.rt.engine.ssd
    assert {store.location(d.slot(k))[0].parent for k in a} == {dir_.path for dir_ in store.dirs}
    dst = kv.make_layers(zero=True)
    assert d.load("a", a, [0, 1, 2, 3], into=dst) == (4, [])
    assert kv.same_blocks(dst, [0, 1, 2, 3], src, [0, 1, 2, 3])


def test_cpu_only_hierarchy(make_driver, kv):
    src = kv.make_layers()
    d = make_driver(kv.config(None, cpu_blocks=8), src)
    a = kv.keys_for(1, 4)
    d.store("a", a, [4, 5, 6, 7])
    dst = kv.make_layers(zero=True)
    assert d.load("a", a, [0, 1, 2, 3], into=dst) == (4, [])
    assert kv.same_blocks(dst, [0, 1, 2, 3], src, [4, 5, 6, 7])
    stats = d.rt.engine.stats()
    assert stats.ssd is None and stats.links["GPU->CPU"].bytes == 4 * d.rt.block_bytes
    assert stats.links["CPU->GPU"].blocks == 4


def test_blocks_evicted_from_ssd_do_not_come_back_after_a_restart(make_driver, kv, tmp_path):
    src = kv.make_layers()
    first = make_driver(kv.config(tmp_path / "ssd", cpu_blocks=4, ssd_blocks=4), src)
    a, b = kv.keys_for(1, 4), kv.keys_for(2, 4)
    first.store("a", a, [0, 1, 2, 3])
    first.store("b", b, [4, 5, 6, 7])  # the SSD holds 4 blocks: a is evicted there too
    first.rt.flush()
    assert first.ready(a, kv.SSD) == [] and first.ready(b, kv.SSD) == b
    first.mgr.reset()  # and a reset forgets b as well
    first.rt.shutdown()

    again = make_driver(kv.config(tmp_path / "ssd", cpu_blocks=4, ssd_blocks=4))
    assert again.rt.adopted == 0
    assert again.mgr.lookup(a).ready_blocks == 0 and again.mgr.lookup(b).ready_blocks == 0
