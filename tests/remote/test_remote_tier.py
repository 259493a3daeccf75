"""The REMOTE tier's logic against an in-memory store: trailers, timeouts, the breaker, fenced rows, discovery."""
import threading
import time

import pytest
import xxhash

from flexkv_runtime.control.index import TierKind
from flexkv_runtime.control.keys import Namespace
from flexkv_runtime.control.ops import OpKind
from flexkv_runtime.data.remote import CircuitBreaker, GuardedBackend, RemoteDiscovery, Status
from flexkv_runtime.data.remote.trailer import remote_key
from flexkv_runtime.runtime import KVRuntime

CPU, REMOTE = TierKind.CPU, TierKind.REMOTE
TIMEOUT_S = 0.3


def config(cpu_blocks=4, remote_blocks=32, **remote):
    return {"cpu": {"capacity_blocks": cpu_blocks}, "eviction": "lru",
            "remote": {"capacity_blocks": remote_blocks, "backend": "redis", "timeout_s": TIMEOUT_S,
                       "breaker_failures": 2, "breaker_cooldown_s": 0.2, **remote}}


@pytest.fixture
def memory(rk, monkeypatch):
    """One in-memory store shared by every runtime the test makes (as engines share a real one)."""
    backend = rk.MemoryBackend()

    def open_store(cfg):
        return GuardedBackend(backend, timeout_s=cfg["timeout_s"],
                              breaker=CircuitBreaker(cfg["breaker_failures"], cfg["breaker_cooldown_s"]))

    monkeypatch.setattr("flexkv_runtime.runtime.open_store", open_store)
    return backend


def test_blocks_one_engine_stores_are_discovered_and_loaded_by_another(rk, memory, make_runtime):
    src = rk.make_layers(seed=1)
    a = make_runtime(config(), src)
    keys = rk.keys_for(1, 4)
    rk.store(a, "r", keys, [0, 1, 2, 3])
    assert a.engine.stats().remote["puts_stored"] == 4

    dst = rk.make_layers(zero=True)
    b = make_runtime(config(), dst)
    assert b.manager.lookup(keys).ready_blocks == 0
    assert rk.discover(b, "r", keys) == 4
    assert b.discover("r", keys) == 4  # settled: not asked again
    assert b.manager.lookup(keys).per_tier == {CPU: 0, REMOTE: 4}
    assert rk.load(b, "r", keys, [5, 6, 7, 8]) == (4, [])
    assert rk.same_blocks(dst, [5, 6, 7, 8], src, [0, 1, 2, 3])
    b.manager.check_invariants()
    text = b.prometheus_text()
    assert "flexkv_remote_gets_hit_total 4" in text and "flexkv_remote_discovery_blocks_adopted_total 4" in text
    assert 'flexkv_transfer_blocks_total{src="REMOTE",dst="CPU"} 4' in text
    # the adopted chain links to its parents, as if B had stored it
    assert [b.manager.index.get(k).depth for k in keys] == [0, 1, 2, 3]


def test_discovery_stops_at_the_first_block_the_store_lacks_and_links_to_known_parents(rk, memory, make_runtime):
    src = rk.make_layers(seed=2)
    a = make_runtime(config(), src)
    keys = rk.keys_for(2, 6)
    rk.store(a, "r", keys[:4], [0, 1, 2, 3])
    del memory.values[remote_key(rk.NS, keys[3])]

    b = make_runtime(config(), rk.make_layers(seed=3))
    rk.store(b, "own", keys[:1], [9])  # B computed the first block itself
    assert rk.discover(b, "r", keys) == 2
    assert b.manager.lookup(keys).ready_blocks == 3
    assert b.manager.index.get(keys[1]).parent is b.manager.index.get(keys[0])


def test_discovery_needs_every_tensor_parallel_rank(rk, memory, make_runtime):
    ranks = [Namespace(model="tp", tp_rank=r, tp_size=2) for r in range(2)]
    rt = make_runtime(config(), namespace=ranks[0])
    keys = rk.keys_for(3, 3)
    rk.store(rt, "r", keys, [0, 1, 2])
    discovery = RemoteDiscovery(rt.engine.remote.store, ranks)
    try:
        fresh = make_runtime(config())
        while (found := discovery.find(fresh.manager, "r", keys)) is None:
            time.sleep(0.01)
        assert found == 0  # rank 1 never stored its slices
    finally:
        discovery.close()


def test_corrupt_and_foreign_values_are_misses_never_served(rk, memory, make_runtime):
    src = rk.make_layers(seed=4)
    a = make_runtime(config(), src)
    keys = rk.keys_for(4, 3)
    rk.store(a, "r", keys, [0, 1, 2])
    name = remote_key(rk.NS, keys[1])
    value = bytearray(memory.values[name])
    value[-10] ^= 0xFF
    memory.values[name] = bytes(value)
    other = Namespace(model="another-model")
    memory.values[remote_key(other, keys[0])] = memory.values[remote_key(rk.NS, keys[0])]

    dst = rk.make_layers(zero=True)
    b = make_runtime(config(), dst)
    assert rk.discover(b, "r", keys) == 3
    planned, failed = rk.load(b, "r", keys, [4, 5, 6])
    assert planned == 3 and set(failed) == set(keys[1:])
    assert rk.same_blocks(dst, [4], src, [0]) and not any(layer[5:7].any() for layer in dst)
    assert b.engine.stats().remote["gets_corrupt"] == 1
    assert b.manager.lookup(keys).per_tier[REMOTE] == 1  # the bad block was dropped from the tier

    stranger = make_runtime(config(), rk.make_layers(zero=True), namespace=other)
    assert rk.discover(stranger, "r", keys) == 1
    assert rk.load(stranger, "r", keys[:1], [0]) == (1, keys[:1])
    assert stranger.engine.stats().remote["gets_corrupt"] == 1


def test_a_block_is_sealed_on_arrival_so_bytes_damaged_in_dram_later_are_never_served(rk, memory, make_runtime):
    src = rk.make_layers(seed=15)
    a = make_runtime(config(), src)
    keys = rk.keys_for(15, 2)
    assert a.manager.plan_store("r", keys, [0, 1]) == 2
    assert a.engine.flush(timeout=30)  # in A's CPU pool; the manager has not heard, so no put has started
    a.engine.pool.row(a.manager.index.get(keys[1]).slots[CPU])[5] ^= 0xFF  # a bit flip in DRAM
    a.flush(timeout=30)
    assert a.engine.stats().remote["puts_stored"] == 2

    dst = rk.make_layers(zero=True)
    b = make_runtime(config(), dst)
    assert rk.discover(b, "r", keys) == 2
    assert rk.load(b, "r", keys, [4, 5]) == (2, keys[1:])  # the put sent the damage with the arrival checksum
    assert rk.same_blocks(dst, [4], src, [0]) and b.engine.stats().remote["gets_corrupt"] == 1


def test_a_store_is_done_before_its_blocks_are_hashed_and_their_put_waits_for_the_seal(rk, memory, make_runtime):
    src = rk.make_layers(seed=19)
    a = make_runtime(config(timeout_s=10.0), src)
    keys = rk.keys_for(19, 2)
    sealer_free = threading.Event()
    a.engine._sealer.submit(sealer_free.wait)  # the sealer thread is busy elsewhere
    try:
        assert a.manager.plan_store("r", keys, [0, 1]) == 2
        deadline = time.monotonic() + 10
        done = []
        while not done:  # the engine has its blocks back: the copy is done, the hashing is not
            assert time.monotonic() < deadline, "the store never finished"
            done = [e for e in a.poll() if e.kind is OpKind.STORE]
            time.sleep(0.01)
        assert a.engine.busy and memory.calls == 0  # the put waits for the seal
    finally:
        sealer_free.set()
    a.flush(timeout=30)
    assert a.engine.stats().remote["puts_stored"] == 2
    dst = rk.make_layers(zero=True)
    b = make_runtime(config(), dst)
    assert rk.discover(b, "r", keys) == 2
    assert rk.load(b, "r", keys, [4, 5]) == (2, [])
    assert rk.same_blocks(dst, [4, 5], src, [0, 1])


def test_ssd_and_remote_copies_share_the_checksum_taken_on_arrival_and_ssd_reads_reseal(rk, memory, make_runtime,
                                                                                        tmp_path):
    cfg = config(cpu_blocks=2) | {"ssd": {"capacity_blocks": 8, "dirs": [str(tmp_path)], "fsync": "none"}}
    rt = make_runtime(cfg, rk.make_layers(seed=16))
    codec, pool, ssd = rt.engine.remote.codec, rt.engine.pool, rt.engine.ssd

    def check(keys):
        """Each CPU row's trailer carries the xxh3 of its bytes, which the SSD's copy recorded too."""
        blocks = [rt.manager.index.get(k) for k in keys]
        rows = pool.rows_with_tails([b.slots[CPU] for b in blocks])
        expected = [xxhash.xxh3_64_intdigest(row[: pool.block_bytes], seed=k) for row, k in zip(rows, keys)]
        assert codec.carried(rows, keys) == expected
        assert ssd.checksums([b.slots[TierKind.SSD] for b in blocks]) == expected

    a, b = rk.keys_for(16, 2), rk.keys_for(17, 2)
    rk.store(rt, "a", a, [0, 1])
    check(a)
    rk.store(rt, "b", b, [2, 3])  # a leaves the CPU tier; its rows now hold b, sealed for b
    check(b)
    assert rk.load(rt, "a", a, [4, 5]) == (2, [])  # promoted from the SSD, not the store
    assert rt.engine.stats().ssd["blocks_read"] == 2 and rt.engine.stats().remote["gets_hit"] == 0
    check(a)

    c = rk.keys_for(18, 2)
    assert rt.manager.plan_store("c", c, [6, 7]) == 2
    assert rt.engine.flush(timeout=30)  # in the CPU pool, not yet written to the SSD
    pool.row(rt.manager.index.get(c[0]).slots[CPU])[9] ^= 0xFF
    rt.flush(timeout=30)
    rk.store(rt, "b", b, [2, 3])  # c leaves the CPU tier
    assert rk.load(rt, "c", c, [8, 9]) == (2, c)  # the SSD's copy fails the arrival checksum, and takes c[1] along
    assert rt.engine.stats().ssd["checksum_failures"] == 1


def test_a_full_store_refuses_puts_and_the_runtime_keeps_serving(rk, memory, make_runtime):
    memory.capacity = 2
    src = rk.make_layers(seed=5)
    rt = make_runtime(config(cpu_blocks=8), src)
    keys = rk.keys_for(5, 4)
    rk.store(rt, "r", keys, [0, 1, 2, 3])
    remote = rt.engine.stats().remote
    assert (remote["puts_stored"], remote["puts_refused"], remote["breaker_open"]) == (2, 2, 0)
    assert rt.manager.lookup(keys).per_tier == {CPU: 4, REMOTE: 2}
    dst = rk.make_layers(zero=True)
    rt.register_kv_caches(dst)
    assert rk.load(rt, "r", keys, [8, 9, 10, 11]) == (4, [])
    assert rk.same_blocks(dst, [8, 9, 10, 11], src, [0, 1, 2, 3])


def test_a_hung_store_costs_one_timeout_per_call_then_the_breaker_answers_at_once(rk, memory, make_runtime):
    src = rk.make_layers(seed=6)
    rt = make_runtime(config(), src)
    a, b = rk.keys_for(6, 4), rk.keys_for(7, 4)
    rk.store(rt, "a", a, [0, 1, 2, 3])
    rk.store(rt, "b", b, [4, 5, 6, 7])  # evicts a from the CPU tier: it is in the store only
    assert rt.manager.lookup(a).per_tier == {CPU: 0, REMOTE: 4}

    memory.gate = threading.Event()
    try:
        started = time.monotonic()
        planned, failed = rk.load(rt, "a", a, [8, 9, 10, 11])
        assert time.monotonic() - started < TIMEOUT_S + 0.5
        assert planned == 4 and failed == a
        stats = rt.engine.stats().remote
        assert (stats["timeouts"], stats["gets_failed"], stats["breaker_open"]) == (1, 4, 0)
        # the rows the timed-out get may still write into are fenced: a store into them fails, whole
        c = rk.keys_for(8, 4)
        assert rt.manager.plan_store("c", c, [12, 13, 14, 15]) == 4
        [done] = [e for e in rt.flush(timeout=30) if e.kind is OpKind.STORE]
        assert done.failed_keys == c
        # a second timeout (discovery's) opens the breaker; from then on nothing waits for the store
        assert rt.discover("x", rk.keys_for(9, 2)) is None
        assert rk.discover(rt, "x", rk.keys_for(9, 2)) == 0
        assert rt.engine.stats().remote["breaker_open"] == 1
        calls = memory.calls
        started = time.monotonic()
        assert rt.discover("y", rk.keys_for(10, 2)) == 0
        assert rk.load(rt, "b", b, [0, 1, 2, 3]) == (4, b)  # evicted from the CPU by a's promotion: a miss, at once
        assert time.monotonic() - started < 0.2 and memory.calls == calls
    finally:
        memory.gate.set()
    memory.gate = None
    time.sleep(0.25)  # past the cooldown: the next call is the probe
    rk.store(rt, "d", rk.keys_for(11, 2), [2, 3])  # the fence is gone with the straggler
    stats = rt.engine.stats().remote
    assert (stats["breaker_open"], stats["breaker_opens"], stats["puts_stored"]) == (0, 1, 10)
    rt.manager.check_invariants()
    assert rt.manager.pinned_blocks() == 0


def test_a_dead_store_fails_fast_and_discovery_does_not_wait_for_it(rk, memory, make_runtime):
    rt = make_runtime(config())
    keys = rk.keys_for(12, 2)
    memory.down = True
    rk.store(rt, "a", keys, [0, 1])
    rk.store(rt, "b", rk.keys_for(13, 2), [2, 3])
    assert rt.engine.stats().remote["breaker_open"] == 1
    started = time.monotonic()
    assert rt.discover("x", rk.keys_for(14, 3)) == 0
    assert time.monotonic() - started < 0.1
    assert rt.manager.lookup(keys).per_tier == {CPU: 2, REMOTE: 0}


@pytest.mark.parametrize("change, message", [
    ({"backend": "memcached"}, "remote.backend"),
    ({"backend": "mooncake"}, r"remote.mooncake needs \['master'\]"),
    ({"redis": {"host": "x"}}, "unknown remote.redis options"),
    ({"timeout_s": 0}, "remote.timeout_s"),
    ({"breaker_failures": 1.5}, "remote.breaker_failures"),
    ({"eviction": "nonesuch"}, "unknown eviction policy"),
    ({"capacity_blocks": None}, "remote.capacity_blocks must be a whole number"),
    ({"colour": "blue"}, "unknown runtime config keys"),
])
def test_bad_remote_config_fails_at_start(change, message):
    cfg = config()
    cfg["remote"] = {**cfg["remote"], **change}
    with pytest.raises(ValueError, match=message):
        KVRuntime(cfg, namespace=Namespace(), block_bytes=4096)


def test_write_back_cannot_skip_from_ssd_to_remote(tmp_path):
    cfg = config() | {"write_policy": "write_back", "ssd": {"capacity_blocks": 4, "dirs": [str(tmp_path)]}}
    with pytest.raises(ValueError, match="SSD->REMOTE"):
        KVRuntime(cfg, namespace=Namespace(), block_bytes=4096)


def test_breaker_opens_after_failures_in_a_row_and_lets_one_probe_through_after_the_cooldown():
    now = [0.0]
    breaker = CircuitBreaker(2, 5.0, clock=lambda: now[0])
    breaker.record(False)
    breaker.record(True)
    breaker.record(False)
    assert breaker.allow() and not breaker.is_open
    breaker.record(False)
    assert breaker.is_open and breaker.refusing and not breaker.allow()
    now[0] = 5.0
    assert not breaker.refusing  # a caller may look without taking the probe
    assert breaker.allow() and breaker.refusing and not breaker.allow()  # one probe at a time
    breaker.record(False)
    assert not breaker.allow()
    now[0] = 10.0
    assert breaker.allow()
    breaker.record(True)
    assert not breaker.is_open and breaker.allow() and breaker.opened == 1


def test_guard_fails_every_key_of_a_call_that_raises(rk):
    backend = rk.MemoryBackend()
    backend.down = True
    guard = GuardedBackend(backend, timeout_s=1.0, breaker=CircuitBreaker(5, 1.0))
    try:
        assert guard.exists(["a", "b"]).statuses == [Status.FAILED, Status.FAILED]
        assert guard.snapshot().failed_calls == 1
    finally:
        guard.close()
