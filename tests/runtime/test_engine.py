"""The transfer engine's contract (queues, waits, cancel, shutdown, metrics) and the runtime's config checks."""
import threading

import pytest

from flexkv_runtime.control.index import TierKind
from flexkv_runtime.control.ops import OpKind, TransferOp
from flexkv_runtime.data.cpu_pool import CpuPool
from flexkv_runtime.data.transfer import TransferEngine
from flexkv_runtime.runtime import KVRuntime

GPU, CPU, SSD, REMOTE = TierKind.GPU, TierKind.CPU, TierKind.SSD, TierKind.REMOTE


def _op(op_id, src, dst, n, block_bytes, kind=OpKind.STORE):
    return TransferOp(op_id, kind, src, dst, list(range(100, 100 + n)), list(range(n)), list(range(n)), block_bytes)


def test_engine_runs_ops_and_reports_them_through_poll(kv):
    layers = kv.make_layers()
    block_bytes = sum(layer[0].nbytes for layer in layers)
    engine = TransferEngine(CpuPool(8, block_bytes))
    engine.register_kv_caches(layers)
    try:
        engine.submit(_op(1, GPU, CPU, 4, block_bytes))
        engine.submit(_op(2, CPU, REMOTE, 2, block_bytes, OpKind.DEMOTE))  # no such link here: fails whole
        assert engine.wait([1, 2], timeout=10)
        assert sorted(engine.poll()) == [(1, []), (2, [100, 101])]
        assert engine.poll() == []
        assert engine.flush(timeout=10) and not engine.busy
        text = engine.prometheus_text()
        assert f'flexkv_transfer_bytes_total{{src="GPU",dst="CPU"}} {4 * block_bytes}' in text
        assert 'flexkv_transfer_queued{src="CPU",dst="GPU"} 0' in text
    finally:
        engine.shutdown()


def test_engine_fails_gpu_ops_before_kv_caches_are_registered(kv, caplog):
    engine = TransferEngine(CpuPool(4, 4096))
    try:
        engine.submit(_op(7, CPU, GPU, 2, 4096, OpKind.LOAD))
        assert engine.wait([7], timeout=10)
        assert engine.poll() == [(7, [100, 101])]
        assert "register_kv_caches" in caplog.text
        assert engine.stats().links["CPU->GPU"].failed_blocks == 2
    finally:
        engine.shutdown()


def test_register_kv_caches_checks_the_block_size(kv):
    engine = TransferEngine(CpuPool(4, 4096))
    try:
        with pytest.raises(ValueError, match="bytes per block"):
            engine.register_kv_caches(kv.make_layers())
    finally:
        engine.shutdown()


def _hold_ssd_reads(store):
    """Make the store's reads wait for the returned gate; ``started`` is set once one is waiting."""
    started, gate = threading.Event(), threading.Event()
    read = store.read

    def held_read(*args):
        started.set()
        gate.wait()
        return read(*args)

    store.read = held_read
    return started, gate


def test_an_ssd_read_does_not_hold_up_gpu_copies(make_driver, kv, tmp_path):
    d = make_driver(kv.config(tmp_path / "ssd", cpu_blocks=8))
    a = kv.keys_for(1, 4)
    for rid, keys in enumerate([a, kv.keys_for(2, 4), kv.keys_for(3, 4)]):
        d.store(rid, keys, [0, 1, 2, 3])  # a ends up on the SSD only
    started, gate = _hold_ssd_reads(d.rt.engine.ssd)
    try:
        assert d.mgr.plan_load("a", a, 0, [8, 9, 10, 11]) == 4
        assert started.wait(10)
        engine, submitted = d.rt.engine, []
        submit = engine.submit
        engine.submit = lambda op: (submitted.append(op.op_id), submit(op))
        assert d.mgr.plan_store("c", kv.keys_for(4, 1), [12]) == 1
        assert engine.wait(submitted, timeout=10)  # the store ran while the SSD read is still held
        assert engine.stats().links["SSD->CPU"].running == 1
    finally:
        gate.set()
    assert {(e.request_id, e.kind) for e in d.rt.flush(timeout=30)} == {("a", OpKind.LOAD), ("c", OpKind.STORE)}


def test_cancel_releases_pins_of_ops_not_started(make_driver, kv, tmp_path):
    src = kv.make_layers()
    d = make_driver(kv.config(tmp_path / "ssd", cpu_blocks=8), src)
    a, b = kv.keys_for(1, 4), kv.keys_for(2, 4)
    for rid, keys in enumerate([a, b, kv.keys_for(3, 4), kv.keys_for(4, 4)]):
        d.store(rid, keys, [0, 1, 2, 3])  # a and b end up on the SSD only
    assert d.ready(a + b, kv.CPU) == []
    started, gate = _hold_ssd_reads(d.rt.engine.ssd)
    try:
        assert d.mgr.plan_load("la", a, 0, [8, 9, 10, 11]) == 4
        assert started.wait(10)  # a's promotion is running (held), b's will queue behind it
        assert d.mgr.plan_load("lb", b, 0, [12, 13, 14, 15]) == 4
        assert d.mgr.pinned_blocks() == 8
        assert d.mgr.cancel("lb") is True
        assert d.mgr.pinned_blocks() == 4
        assert d.rt.engine.stats().links["SSD->CPU"].cancelled_ops == 1
    finally:
        gate.set()
    events = d.rt.flush(timeout=30)
    assert [(e.request_id, e.kind, e.failed_keys) for e in events] == [("la", OpKind.LOAD, [])]
    assert kv.same_blocks(d.layers, [8, 9, 10, 11], src, [0, 1, 2, 3])  # every request stored blocks 0-3
    assert d.mgr.pinned_blocks() == 0
    assert d.ready(b, kv.SSD) == b  # cancelling a promotion does not lose the source


def test_shutdown_finishes_ops_in_flight_and_leaves_no_threads_or_pins(kv, tmp_path):
    before = set(threading.enumerate())
    rt = KVRuntime(kv.config(tmp_path / "ssd"), namespace=kv.NS)
    rt.register_kv_caches(kv.make_layers())
    for rid in range(3):
        rt.manager.plan_store(rid, kv.keys_for(rid, 4), [0, 1, 2, 3])  # no flush: ops are queued or running
    assert rt.manager.pinned_blocks() > 0
    rt.shutdown()
    assert rt.manager.pinned_blocks() == 0 and rt.manager.ops_in_flight == 0
    assert set(threading.enumerate()) <= before
    rt.shutdown()  # idempotent


def test_runtime_metrics_cover_links_store_and_tiers(make_driver, kv, tmp_path):
    d = make_driver(kv.config(tmp_path / "ssd"))
    d.store("a", kv.keys_for(1, 4), [0, 1, 2, 3])
    d.rt.flush()
    text = d.rt.prometheus_text()
    for line in (
        f'flexkv_transfer_bytes_total{{src="CPU",dst="SSD"}} {4 * d.rt.block_bytes}',
        "flexkv_ssd_blocks_written_total 4",
        'flexkv_tier_used_blocks{tier="SSD"} 4',
        "# TYPE flexkv_transfer_queued gauge",
        "flexkv_block_accesses_total 4",
        "flexkv_block_misses_total 4",
        "flexkv_ops_submitted_total 2",  # the store, then its copy down to the SSD tier
        "flexkv_ops_failed_total 0",
    ):
        assert line in text
    stats = d.rt.engine.stats()
    assert stats.links["GPU->CPU"].ops == 1 and stats.ssd["bytes_written"] == 4 * d.rt.block_bytes


@pytest.mark.parametrize(
    "change, message",
    [
        ({"cpu": None}, "needs a 'cpu' tier"),
        ({"cpu": {"capacity_gb": 3}}, "unknown runtime config keys"),
        ({"colour": "blue"}, "unknown runtime config keys"),
        ({"eviction": "nonesuch"}, "unknown eviction policy"),
        ({"cpu": {"capacity_blocks": 4, "eviction": "nonesuch"}}, "unknown eviction policy"),
        ({"eviction": "belady"}, "only allowed in replay"),
        ({"write_policy": "sometimes"}, "unknown write policy"),
        ({"transfer": {"backend": "cuda"}}, "transfer.backend"),
        ({"ssd": {"capacity_blocks": 4}}, "ssd.dirs"),
        ({"ssd": {"capacity_blocks": 4, "dirs": ["x"], "direct_io": "maybe"}}, "direct_io"),
        ({"ssd": {"capacity_blocks": 4, "dirs": ["x"], "fsync": "always"}}, "fsync"),
        ({"cpu": {"capacity_bytes": 100}}, "cannot hold one block"),
    ],
)
def test_bad_config_fails_at_start_with_a_clear_message(kv, tmp_path, change, message):
    cfg = {**kv.config(None), **change}
    if cfg.get("ssd") and cfg["ssd"].get("dirs"):
        cfg["ssd"]["dirs"] = [str(tmp_path / "ssd")]
    with pytest.raises(ValueError, match=message):
        KVRuntime(cfg, namespace=kv.NS, block_bytes=4096)


def test_tiers_may_name_their_own_policies(kv, tmp_path):
    cfg = kv.config(tmp_path / "ssd")
    cfg["ssd"]["eviction"] = "fifo"
    with KVRuntime(cfg, namespace=kv.NS, block_bytes=4096) as rt:
        assert (rt.manager.tiers[CPU].eviction.name, rt.manager.tiers[SSD].eviction.name) == ("lru", "fifo")


def test_omegaconf_config_is_accepted(kv, tmp_path):
    from omegaconf import OmegaConf

    # YAML reads 4e5 as a float
    cfg = OmegaConf.create(kv.config(tmp_path / "ssd") | {"eviction": {"name": "lru"}, "cpu": {"capacity_bytes": 4e5}})
    with KVRuntime(cfg, namespace=kv.NS, block_bytes=4096) as rt:
        assert rt.manager.occupancy() == {"CPU": 0, "SSD": 0} and rt.manager.tiers[CPU].capacity_blocks == 97


def test_manager_is_not_there_before_the_block_size_is_known(kv):
    rt = KVRuntime(kv.config(None), namespace=kv.NS)
    with pytest.raises(RuntimeError, match="register_kv_caches"):
        rt.manager
    rt.shutdown()
