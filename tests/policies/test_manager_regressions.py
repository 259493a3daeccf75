"""Manager behaviours found while testing the policies, each as its smallest reproduction
(regression tests for the fixes)."""

from flexkv_runtime.control.config import build_manager
from flexkv_runtime.control.index import TierKind
from flexkv_runtime.control.ops import ImmediateDataPlane

CPU = TierKind.CPU


def manager(eviction, tiers, admission="always"):
    dp = ImmediateDataPlane()
    mgr = build_manager(
        tiers=tiers, eviction=eviction, admission=admission, data_plane=dp, clock=lambda: 0.0, block_bytes=1
    )

    def settle():
        while ops := dp.drain():
            for op in ops:
                mgr.complete(op.op_id)

    return mgr, settle



def test_load_of_a_block_promoting_to_cpu():
    """plan_load used to test ``block.ready`` for CPU, not ``CPU in block.slots``: a second load (or
    a load after a promote-on-lookup prefetch) allocated a second CPU slot for the same block,
    overwrote ``slots[CPU]`` (the first slot leaked for good) and called ``on_insert`` twice."""
    mgr, settle = manager("lru", {"cpu": 2, "ssd": 4})
    mgr.plan_store("a", [1], [0])
    settle()
    mgr.plan_store("b", [2], [0])
    mgr.plan_store("c", [3], [0])
    settle()  # 1 has left CPU; the SSD keeps it
    mgr.plan_load("x", [1], 0, [0])  # promotes 1 back into CPU
    mgr.plan_load("y", [1], 0, [1])  # before that promotion completes
    settle()
    in_cpu = [b.key for b in mgr.index.blocks() if CPU in b.slots]
    assert mgr.cpu.used_blocks == len(in_cpu) == len(mgr.cpu.eviction)



def test_store_evicts_the_parent_of_the_block_it_makes_room_for():
    """The blocks a store found cached (hits) used not to be pinned while it allocated slots for
    the rest, and ``victim`` was not told which block the room was for. A leaf-first policy then
    rightly picked the request's own last cached block, the new block's parent, and the tier
    held a child without its parent: a prefix with a hole, never served."""
    mgr, settle = manager("prefix_lru", {"cpu": 2})
    mgr.plan_store("a", [1, 2], [0, 1])
    settle()
    mgr.plan_store("b", [1, 2, 3], [0, 1, 2])
    settle()
    holes = [b.key for b in mgr.index.blocks() if CPU in b.slots and b.parent and CPU not in b.parent.slots]
    assert holes == []



def test_frequency_admission_sees_every_block_of_a_repeated_prompt():
    """After one refusal plan_store offers no later block of the request to admission (a prefix
    with a hole is useless). It used not to count them as seen either: with ``min_hits=2`` a new
    n-block prompt needed n + 1 sightings to be cached whole instead of 2."""
    mgr, settle = manager("lru", {"cpu": 16}, admission="frequency")
    for request_id in ("first", "second"):
        mgr.plan_store(request_id, [1, 2, 3], [0, 1, 2])
        settle()
    assert mgr.lookup([1, 2, 3]).ready_blocks == 3



def test_store_from_an_offset_keeps_the_prefix_tree():
    """``index.chain`` used to return None when ``keys[start - 1]`` was not in the index, so the
    stored blocks became roots (depth 0, the prefill cost of a first block) and kept that parent for
    good: prefix_lru saw no parent to protect, cost_aware and size_threshold a wrong depth."""
    mgr, settle = manager("prefix_lru", {"cpu": 16})
    mgr.plan_store("a", [10, 11, 12], [5, 6], start=1)
    settle()
    mgr.plan_store("b", [10, 11, 12], [0, 1, 2])
    settle()
    assert mgr.index.get(11).depth == 1


def test_a_parent_record_is_kept_while_a_child_record_points_at_it():
    """A store from an offset made a record for block 15 (no data) under 5; evicting 5 then
    forgot 5's record while 15's still pointed at it, and 15 stored later counted itself as a
    child of the forgotten record: leaf-first policies and the index disagreed."""
    mgr, settle = manager("prefix_lru", {"cpu": 5})
    mgr.plan_store("a", [5], [0])
    mgr.plan_store("b", [5, 15, 45, 135], [0, 1], start=2)
    settle()
    mgr.plan_store("c", [3, 9, 27], [0, 1, 2])  # evicts 5
    settle()
    mgr.plan_store("d", [5, 15], [0, 1])
    settle()
    assert mgr.index.get(15).parent is mgr.index.get(5)
    mgr.check_invariants()
