"""Admission and prefetch policies, alone and through the manager."""
import pytest

from flexkv_runtime.control.config import build_manager
from flexkv_runtime.control.index import Block, TierKind
from flexkv_runtime.control.ops import ImmediateDataPlane, OpKind
from flexkv_runtime.policies import make_policy

CPU, SSD = TierKind.CPU, TierKind.SSD


def chain(n):
    blocks, parent = [], None
    for key in range(n):
        parent = Block(key, parent, 1.0)
        blocks.append(parent)
    return blocks


def test_frequency_admits_on_the_nth_sighting():
    policy = make_policy("admission", {"name": "frequency", "min_hits": 3})
    [block] = chain(1)
    assert [policy.admit(0, block, 100) for _ in range(4)] == [False, False, True, True]


def test_frequency_forgets_the_least_recently_seen():
    policy = make_policy("admission", {"name": "frequency", "table_size": 2})
    blocks = chain(3)
    assert not policy.admit(0, blocks[0], 0)
    assert not policy.admit(1, blocks[1], 0)
    assert policy.admit(0, blocks[0], 0)  # second sighting of 0
    assert not policy.admit(2, blocks[2], 0)  # the table is full: 1, least recently seen, goes
    assert not policy.admit(1, blocks[1], 0)  # so 1 starts over
    assert policy.admit(1, blocks[1], 0)


def test_size_threshold_on_prompt_length_and_depth():
    policy = make_policy("admission", {"name": "size_threshold", "min_request_tokens": 512, "max_depth": 2})
    blocks = chain(3)
    assert not policy.admit(0, blocks[0], 511)
    assert [policy.admit(b.key, b, 512) for b in blocks] == [True, True, False]
    assert make_policy("admission", "size_threshold").admit(2, blocks[2], 0)


def test_promote_on_lookup_offers_the_request_prefix():
    assert make_policy("prefetch", "promote_on_lookup").on_lookup("r", [1, 2, 3]) == [1, 2, 3]
    capped = make_policy("prefetch", {"name": "promote_on_lookup", "max_blocks": 2})
    assert capped.on_lookup("r", [1, 2, 3]) == [1, 2]


def test_lookahead_prefetch_reads_the_head_of_the_queue():
    policy = make_policy("prefetch", {"name": "lookahead", "depth": 2, "max_blocks": 4})
    waiting = [("a", [1, 2]), ("b", [1, 3, 4]), ("c", [9])]
    assert policy.on_waiting(waiting) == [1, 2, 3, 4]
    policy.max_blocks = 2
    assert policy.on_waiting(waiting) == [1, 2]


@pytest.mark.parametrize(
    ("stop_rule", "timeout_s", "waits"),
    [("best_effort", 0.0, [False, False]), ("wait_complete", 0.0, [True, True]), ("timeout", 1.0, [True, False])],
)
def test_stop_rules(stop_rule, timeout_s, waits):
    for name in ("promote_on_lookup", "lookahead"):
        policy = make_policy("prefetch", {"name": name, "stop_rule": stop_rule, "timeout_s": timeout_s})
        assert [policy.should_wait(0.5), policy.should_wait(1.5)] == waits


def test_timeout_rule_needs_a_timeout():
    with pytest.raises(ValueError, match="timeout_s"):
        make_policy("prefetch", {"name": "lookahead", "stop_rule": "timeout"})


def settle(mgr, dp):
    while ops := dp.drain():
        for op in ops:
            mgr.complete(op.op_id)


def manager(prefetch):
    dp = ImmediateDataPlane()
    mgr = build_manager(
        tiers={"cpu": 2, "ssd": 8}, eviction="lru", prefetch=prefetch, data_plane=dp, clock=lambda: 0.0, block_bytes=1
    )
    mgr.plan_store("old", [1, 2], [0, 1])
    settle(mgr, dp)
    mgr.plan_store("new", [5, 6], [0, 1])  # pushes 1 and 2 out of CPU; the SSD keeps them
    settle(mgr, dp)
    assert mgr.lookup([1, 2]).per_tier == {CPU: 0, SSD: 2}
    return mgr, dp


def test_promote_on_lookup_through_the_manager():
    mgr, dp = manager("promote_on_lookup")
    mgr.lookup([1, 2], request_id="r")
    ops = dp.drain()
    assert [(op.kind, op.keys) for op in ops] == [(OpKind.PROMOTE, [1, 2])]
    mgr.complete(ops[0].op_id)
    assert mgr.lookup([1, 2]).per_tier == {CPU: 2, SSD: 2}


def test_lookahead_prefetch_through_the_manager():
    mgr, dp = manager({"name": "lookahead", "depth": 1})
    mgr.on_request_waiting("r", [1])
    mgr.on_request_waiting("s", [2])  # second in the queue: beyond depth 1
    ops = dp.drain()
    assert [(op.kind, op.keys) for op in ops] == [(OpKind.PROMOTE, [1])]
