"""The control plane's contract, op by op, with completions driven by the test."""
import pytest

from flexkv_runtime.control.config import build_manager
from flexkv_runtime.control.index import TierKind
from flexkv_runtime.control.ops import ImmediateDataPlane, OpKind
from flexkv_runtime.control.oracle import FutureOracle

CPU, SSD = TierKind.CPU, TierKind.SSD


def test_store_is_in_flight_until_complete_then_ready(harness):
    h = harness(tiers={"cpu": 8})
    assert h.mgr.plan_store("r", [1, 2, 3], [5, 6, 7]) == 3
    [op] = h.take()
    assert (op.kind, op.src, op.dst, op.src_slots) == (OpKind.STORE, TierKind.GPU, CPU, [5, 6, 7])
    found = h.mgr.lookup([1, 2, 3])
    assert (found.ready_blocks, found.pending_blocks) == (0, 3)
    [done] = h.finish(op)
    assert (done.request_id, done.kind, done.failed_keys) == ("r", OpKind.STORE, [])
    found = h.mgr.lookup([1, 2, 3, 4])
    assert (found.ready_blocks, found.pending_blocks, found.per_tier[CPU]) == (3, 3, 3)


def test_load_pins_blocks_until_done_and_eviction_skips_them(harness):
    h = harness(tiers={"cpu": 3})
    h.store("a", [1, 2, 3])
    assert h.mgr.plan_load("b", [1, 2, 3], 0, [0, 1, 2]) == 3
    [load] = h.take()
    assert load.kind is OpKind.LOAD and load.dst_slots == [0, 1, 2]
    # every resident block is pinned by the load: a new store finds no room
    assert h.mgr.plan_store("c", [9], [0]) == 0
    assert h.mgr.cpu.stats.rejected == 1
    [done] = h.finish(load)
    assert done.kind is OpKind.LOAD and h.mgr.pinned_blocks() == 0
    n, _ = h.store("c", [9])
    assert n == 1 and 9 in h.resident("CPU")


def test_lru_eviction_order_through_manager(harness):
    h = harness(tiers={"cpu": 3})
    h.store("a", [1, 2, 3])
    h.mgr.plan_load("b", [1], 0, [0])
    h.settle()
    h.store("c", [7])  # evicts 2, the least recently used
    assert h.resident("CPU") == [1, 3, 7]
    assert h.mgr.cpu.stats.evictions == 1


def test_write_through_cascades_to_ssd_and_loads_promote_back(harness):
    h = harness(tiers={"cpu": 2, "ssd": 10}, write_policy="write_through")
    h.store("a", [1, 2])
    assert h.resident("SSD") == [1, 2]
    h.store("b", [3, 4])  # pushes 1, 2 out of the CPU tier; SSD keeps them
    assert h.resident("CPU") == [3, 4] and h.resident("SSD") == [1, 2, 3, 4]
    found = h.mgr.lookup([1, 2, 5])
    assert found.ready_blocks == 2 and found.per_tier[CPU] == 0 and found.per_tier[SSD] == 2
    assert h.mgr.plan_load("c", [1, 2], 0, [40, 41]) == 2
    ops = h.take()
    assert [o.kind for o in ops] == [OpKind.PROMOTE]  # the load waits for the promotion
    [promote] = ops
    assert (promote.src, promote.dst) == (SSD, CPU)
    assert h.finish(promote) == []
    [load] = h.take()
    assert load.kind is OpKind.LOAD and load.after == [promote.op_id]
    [done] = h.finish(load)
    assert done.kind is OpKind.LOAD and done.failed_keys == []
    assert h.mgr.stats.block_hits["SSD"] == 2


@pytest.mark.parametrize("write_policy", ["write_through", "write_back"])
def test_a_slower_tier_admits_by_the_length_of_the_prompt_that_stored_the_block(harness, write_policy):
    long_only = {"name": "size_threshold", "min_request_tokens": 1000}
    h = harness(tiers={"cpu": 2, "ssd": {"capacity_blocks": 10, "admission": long_only}}, write_policy=write_policy)
    for rid, keys, tokens in (("long", [1, 2], 5000), ("short", [3, 4], 300), ("next", [5, 6], 5000)):
        h.mgr.plan_store(rid, keys, [100, 101], request_tokens=tokens)
        h.settle()
    # the long prompts' blocks reached the SSD tier (on their way down or when evicted), the short one's did not
    assert h.resident("SSD") == ([1, 2, 5, 6] if write_policy == "write_through" else [1, 2])
    assert h.mgr.tiers[SSD].stats.rejected == 2


def test_corrupt_ssd_block_fails_the_load_from_there_on_and_is_dropped(harness):
    h = harness(tiers={"cpu": 3, "ssd": 10})
    h.store("a", [1, 2, 3])
    h.store("b", [7, 8, 9])  # 1, 2, 3 now only on SSD
    assert h.mgr.plan_load("c", [1, 2, 3], 0, [0, 1, 2]) == 3
    [promote] = h.take()
    h.finish(promote, failed=[2])  # block 2's checksum failed
    [load] = h.take()
    assert load.keys == [1]  # nothing past the hole is loaded
    [done] = h.finish(load)
    assert sorted(done.failed_keys) == [2, 3]
    assert 2 not in h.resident("SSD") and 2 not in h.resident("CPU")
    assert h.mgr.lookup([1, 2, 3]).ready_blocks == 1
    assert h.mgr.pinned_blocks() == 0 and h.mgr.ops_in_flight == 0


def test_write_back_demotes_on_eviction_before_the_slot_is_reused(harness):
    h = harness(tiers={"cpu": 2, "ssd": 10}, write_policy="write_back")
    h.store("a", [1, 2])
    assert h.resident("SSD") == []  # nothing goes down until evicted
    assert h.mgr.plan_store("b", [3], [0]) == 1
    ops = h.take()
    assert [o.kind for o in ops] == [OpKind.DEMOTE]
    [demote] = ops
    assert demote.keys == [1] and demote.src == CPU and demote.dst == SSD
    h.finish(demote)
    [store] = h.take()
    assert store.after == [demote.op_id] and store.dst_slots == demote.src_slots  # same slot, reused after
    h.finish(store)
    assert h.resident("SSD") == [1] and h.resident("CPU") == [2, 3]


def test_selective_writes_to_ssd_after_enough_hits(harness):
    h = harness(tiers={"cpu": 4, "ssd": 10}, write_policy="selective", selective_hits=2)
    h.store("a", [1])
    h.store("b", [1])
    assert h.resident("SSD") == []
    h.store("c", [1])
    assert h.resident("SSD") == [1]


def test_cancel_drops_unstarted_ops_and_releases_every_pin(harness):
    h = harness(tiers={"cpu": 3, "ssd": 10})
    h.store("a", [1, 2, 3])
    h.store("b", [4, 5, 6])
    h.mgr.plan_load("c", [1, 2], 0, [0, 1])  # promote (submitted, not started) + held load
    assert h.mgr.pinned_blocks() == 2
    assert h.mgr.cancel("c") is True
    assert h.mgr.pinned_blocks() == 0 and h.mgr.ops_in_flight == 0
    assert h.take() == []
    assert h.resident("SSD") == [1, 2, 3, 4, 5, 6]


def test_cancel_leaves_started_ops_to_finish(harness):
    h = harness(tiers={"cpu": 4})
    h.store("a", [1, 2])
    h.mgr.plan_load("c", [1, 2], 0, [0, 1])
    [load] = h.take()  # started: the data plane can no longer drop it
    assert h.mgr.cancel("c") is False
    [done] = h.finish(load)
    assert done.request_id == "c" and h.mgr.pinned_blocks() == 0


def test_a_refused_block_stops_storing_the_rest_of_the_prefix(harness):
    h = harness(tiers={"cpu": 2})
    h.mgr.plan_store("a", [1, 2, 3, 4], [0, 1, 2, 3])  # room for two, both in flight
    [op] = h.take()
    assert op.keys == [1, 2]
    h.finish(op)
    h = harness(tiers={"cpu": 4}, admission={"name": "frequency", "min_hits": 2}, write_policy="write_back")
    assert h.mgr.plan_store("x", [4], [0]) == 0  # block 4 seen once
    # 3 is refused on its first sighting; 4, on its second, would be admitted, but past a hole it is no use
    assert h.mgr.plan_store("a", [3, 4], [0, 1]) == 0
    assert h.take() == [] and h.mgr.cpu.stats.rejected == 2


def test_under_write_through_a_block_the_cpu_admission_refuses_passes_through_to_the_ssd(harness):
    h = harness(tiers={"cpu": 4, "ssd": 16}, admission={"name": "frequency", "min_hits": 2})
    h.store("warm", [1, 2])
    h.store("warm", [1, 2])  # seen twice: residents
    lru = h.mgr.cpu.eviction
    assert h.mgr.plan_store("a", [1, 2, 3, 4], [0, 1, 2, 3], start=2) == 2  # refused by the CPU tier, still stored
    [store] = h.take()
    assert store.keys == [3, 4] and len(lru) == 2  # in CPU slots on their way down; its policy never hears
    h.finish(store)
    [demote] = h.take()
    assert (demote.kind, demote.dst, demote.keys) == (OpKind.DEMOTE, SSD, [3, 4])
    h.mgr.check_invariants()
    h.finish(demote)
    assert h.resident("CPU") == [1, 2] and h.resident("SSD") == [1, 2, 3, 4]
    assert h.mgr.cpu.used_blocks == 2 and h.mgr.cpu.stats.rejected == 2 + 2  # the first store's two too
    h.mgr.check_invariants()
    assert h.mgr.plan_load("b", [1, 2, 3, 4], 0, [0, 1, 2, 3]) == 4  # from the SSD, promoted
    assert [op.kind for op in h.take()] == [OpKind.PROMOTE]


def test_a_passing_block_asked_for_again_before_it_leaves_stays_in_the_cpu_tier(harness):
    h = harness(tiers={"cpu": 4, "ssd": 16}, admission={"name": "frequency", "min_hits": 2})
    assert h.mgr.plan_store("a", [1, 2], [0, 1]) == 2
    [store] = h.take()
    assert h.mgr.plan_load("b", [1, 2], 0, [4, 5]) == 2  # waits for the store
    h.settle()
    assert h.resident("CPU") == [1, 2] and len(h.mgr.cpu.eviction) == 2
    h.mgr.check_invariants()


def test_a_leaf_first_policy_does_not_count_a_child_passing_through_as_resident(harness):
    h = harness(tiers={"cpu": 2, "ssd": 8}, eviction="prefix_lru", admission={"name": "frequency", "min_hits": 2})
    h.store("a", [3])
    h.store("a", [3])  # a resident now
    assert h.mgr.plan_store("b", [3, 9, 27], [0, 1, 2]) == 2  # 9 and 27 pass through
    assert h.mgr.is_passing(9) and h.mgr.is_passing(27)
    h.mgr.check_invariants()
    h.settle()
    assert not h.mgr.is_passing(9) and h.mgr.cpu.used_blocks == len(h.mgr.cpu.eviction)
    assert h.resident("SSD") == [3, 9, 27]
    assert h.mgr.lookup([3, 9, 27]).ready_blocks == 3  # the whole prefix is still served, from the SSD as needed


@pytest.mark.parametrize("tiers, write_policy", [({"cpu": 4}, "write_through"),
                                                 ({"cpu": 4, "ssd": 16}, "write_back")])
def test_with_nothing_written_through_a_refused_block_is_not_stored(harness, tiers, write_policy):
    h = harness(tiers=tiers, write_policy=write_policy, admission={"name": "frequency", "min_hits": 2})
    n, _ = h.store("a", [1, 2])
    assert n == 0 and h.resident("CPU") == [] and h.mgr.cpu.stats.rejected == 1


def test_reset_forgets_everything_unpinned(harness):
    h = harness(tiers={"cpu": 4, "ssd": 4})
    h.store("a", [1, 2])
    h.mgr.plan_load("b", [1], 0, [0])
    assert h.mgr.reset() == 2  # block 2 in both tiers; block 1 pinned by the load
    assert h.resident("CPU") == [1]
    h.settle()
    assert h.mgr.lookup([1, 2]).ready_blocks == 1


def test_queue_events_count_waiting_references(harness):
    h = harness(tiers={"cpu": 4})
    h.mgr.on_request_waiting("a", [1, 2])
    h.mgr.on_request_waiting("b", [1, 3])
    assert h.mgr.waiting_refs == {1: 2, 2: 1, 3: 1}
    h.mgr.on_request_running("a")
    h.mgr.on_request_finished("b")
    assert h.mgr.waiting_refs == {} and h.mgr.waiting == {}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(tiers={"cpu": 4}, eviction="nope"), "valid choices"),
        (dict(tiers={"cpu": 4}, admission="nope"), "valid choices"),
        (dict(tiers={"cpu": 4}, prefetch="nope"), "valid choices"),
        (dict(tiers={"cpu": 4}, write_policy="nope"), "valid choices"),
        (dict(tiers={"cpu": 4}, selective_hits=0), "selective_hits must be a whole number >= 1, got 0"),
        (dict(tiers={"cpu": 4}, selective_hits="2"), "selective_hits must be a whole number >= 1, got '2'"),
        (dict(tiers={"cpu": -3}), "must be positive"),
        (dict(tiers={"cpu": "10GB"}), "cpu tier capacity_blocks must be a whole number, got '10GB'"),
        (dict(tiers={"cpu": 2.7}), "cpu tier capacity_blocks must be a whole number, got 2.7"),
        (dict(tiers={"cpu": True}), "cpu tier capacity_blocks must be a whole number, got True"),
        (dict(tiers={"cpu": {"capacity_bytes": "8GB"}}), "cpu tier capacity_bytes must be a whole number, got '8GB'"),
        (dict(tiers={"cpu": {"capacity_bytes": 5}}), "cannot hold one block"),
        (dict(tiers={"cpu": {"capacity_bytes": 0}}), "CPU tier capacity must be positive"),
        (dict(tiers={"cpu": 0, "ssd": 4}), "cpu tier capacity_blocks must be positive"),
        (dict(tiers={"gpu": 4}), "valid choices"),
        (dict(tiers={"ssd": 4}), "needs a CPU tier"),
        (dict(tiers={"cpu": 4}, eviction={"name": "lru", "bogus": 1}), "bad parameters"),
    ],
)
def test_bad_configs_fail_at_start_with_a_clear_message(kwargs, message):
    kwargs.setdefault("eviction", "lru")
    with pytest.raises(ValueError) as err:
        build_manager(data_plane=ImmediateDataPlane(), clock=lambda: 0.0, block_bytes=10, **kwargs)
    assert message in str(err.value)


def test_belady_needs_an_oracle_and_is_refused_by_the_runtime():
    common = dict(tiers={"cpu": 4}, eviction="belady", data_plane=ImmediateDataPlane(), clock=lambda: 0.0,
                  block_bytes=1)
    with pytest.raises(ValueError, match="oracle"):
        build_manager(**common)
    with pytest.raises(ValueError, match="only allowed in replay and simulation"):
        build_manager(**common, oracle=FutureOracle([[1]]), allow_offline=False)


def test_belady_keeps_the_block_needed_soonest(harness):
    streams = [[1], [2], [3], [1], [2], [1]]
    oracle = FutureOracle(streams)
    h = harness(tiers={"cpu": 2}, eviction="belady", oracle=oracle)
    lru = harness(tiers={"cpu": 2}, eviction="lru")
    for i, keys in enumerate(streams):
        lru.store(i, keys)
        oracle.begin(i)
        found = h.mgr.lookup(keys)
        loaded = h.mgr.plan_load(i, keys, 0, range(found.ready_blocks))
        h.settle()
        h.mgr.plan_store(i, keys, range(len(keys) - loaded), start=loaded)
        h.settle()
        if i == 2:  # block 3 came in: 1 (next used at 3) stays, 2 (next used at 4) goes
            assert h.resident("CPU") == [1, 3]
    assert h.mgr.stats.block_hits["CPU"] == 2  # requests 3 and 5; the optimum for this stream
    assert lru.mgr.stats.block_hits["CPU"] == 1


def test_adopt_takes_in_persisted_blocks_with_their_prefix_links(harness):
    h = harness(tiers={"cpu": 2, "ssd": 8}, eviction="lru")
    # children listed before parents, one slot out of range
    assert h.mgr.adopt(SSD, [(3, 2, 5), (2, 1, 4), (1, None, 0), (9, None, 99)]) == 3
    assert h.mgr.lookup([1, 2, 3]).per_tier[SSD] == 3
    assert h.mgr.index.get(3).depth == 2 and h.mgr.index.resident_children(h.mgr.index.get(1), SSD) == 1
    assert h.mgr.tiers[SSD].used_blocks == 3
    assert h.mgr.plan_load("r", [1, 2], 0, [0, 1]) == 2


def test_adopt_skips_a_taken_slot_and_frees_the_slot_of_a_block_already_known(harness):
    h = harness(tiers={"cpu": 2, "ssd": 8}, eviction="lru")
    assert h.mgr.adopt(SSD, [(1, None, 0)]) == 1
    # slot 0 is block 1's; 5 and 6 share slot 3; block 1 is known, so its entry's slot 7 stays free
    assert h.mgr.adopt(SSD, [(5, None, 3), (6, None, 3), (1, None, 7), (8, None, 0)]) == 1
    ssd = h.mgr.tiers[SSD]
    assert ssd.used_blocks == 2 and 7 in ssd.free_slots and sorted(ssd.free_slots) == [1, 2, 4, 5, 6, 7]
    assert h.mgr.index.get(5).slots == {SSD: 3} and SSD not in h.mgr.index.get(6).slots
    h.mgr.check_invariants()


def test_adopting_blocks_scans_the_free_list_once_not_once_per_block():
    """A restart recovering 100k blocks of a 4M-slot SSD tier searched the free list once per block:
    ~50 ms each here, hours in all. Adoption must stay a fixed number of passes over it."""

    class FreeList(list):
        passes = 0

        def __iter__(self):
            FreeList.passes += 1
            return super().__iter__()

        def remove(self, slot):
            raise AssertionError("a search of the free list for one slot")

    mgr = build_manager(tiers={"cpu": 4, "ssd": 10_000}, eviction="lru", data_plane=ImmediateDataPlane(),
                        clock=lambda: 0.0, block_bytes=1)
    ssd = mgr.tiers[SSD]
    ssd.free_slots = FreeList(ssd.free_slots)
    assert mgr.adopt(SSD, [(key, None, slot) for key, slot in enumerate(range(0, 10_000, 4))]) == 2_500
    assert FreeList.passes <= 2 and ssd.used_blocks == 2_500 and 4 not in ssd.free_slots


def test_readmitting_a_block_whose_last_child_is_evicted_keeps_its_record(harness):
    # regression: making room for block 2 evicted its only resident child (3); the index then
    # forgot block 2's record while the tier and the policy still held it
    h = harness(tiers={"cpu": 3})
    h.store("a", [1, 2, 3])
    h.mgr.plan_load("b", [1], 0, [0])
    h.settle()
    h.store("c", [9])  # evicts 2; its record stays because child 3 is resident
    assert h.mgr.index.get(2) is not None and not h.mgr.index.get(2).slots
    h.mgr.plan_load("d", [1], 0, [0])
    h.settle()
    h.store("d", [1, 2], start=1)  # room for 2 evicts 3, its last child
    assert 2 in h.resident("CPU")
    h.mgr.check_invariants()


def test_trace_like_replay_keeps_index_tiers_and_policies_consistent(harness):
    import random

    rng = random.Random(7)
    h = harness(tiers={"cpu": 40, "ssd": 90})
    prefixes = [[rng.randrange(10**6) for _ in range(rng.randint(1, 12))] for _ in range(30)]
    for rid in range(400):
        base = rng.choice(prefixes)
        keys = base[: rng.randint(1, len(base))] + [rng.randrange(10**9) for _ in range(rng.randint(0, 4))]
        keys = [hash((tuple(keys[: i + 1]),)) for i in range(len(keys))]  # chained
        found = h.mgr.lookup(keys)
        loaded = h.mgr.plan_load(rid, keys, 0, range(found.ready_blocks))
        h.settle()
        h.store(rid, keys, start=loaded)
        if rid % 50 == 0:
            h.mgr.check_invariants()
    h.mgr.check_invariants()
    assert h.mgr.pinned_blocks() == 0 and h.mgr.ops_in_flight == 0
