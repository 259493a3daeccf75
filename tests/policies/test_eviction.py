"""Each eviction policy through its interface, on sequences small enough to follow by hand."""
import pytest

from flexkv_runtime.policies import available

ONLINE = [name for name in available("eviction") if name != "belady"]  # belady needs an oracle


@pytest.mark.parametrize("name", ONLINE)
def test_contract_len_pins_and_nothing_to_evict(tier, name):
    t = tier(name, capacity=4)
    assert len(t.policy) == 0 and t.policy.victim(lambda key: True) is None
    t.insert(1, 2, 3, 4)  # four first blocks: all leaves
    t.hit(2, 3)
    assert len(t.policy) == 4
    assert t.victims(1, pinned={1, 2, 3, 4}) == [None]  # every block pinned: nothing goes
    assert len(t.policy) == 4
    t.policy.on_remove(3)  # failed or reset: never chosen again
    assert len(t.policy) == 3
    first = t.victims(1, pinned={1, 2})
    assert first == [4]
    rest = t.victims(3)
    assert sorted(rest[:2]) == [1, 2] and rest[2] is None
    assert len(t.policy) == 0


@pytest.mark.parametrize("name", ONLINE)
def test_victims_are_resident_and_distinct(tier, name):
    t = tier(name, capacity=16)
    t.insert(*range(16))
    t.hit(*range(0, 16, 3))
    victims = t.victims(16)
    assert sorted(victims) == list(range(16))


@pytest.mark.parametrize("name", ONLINE)
def test_victims_in_one_call_match_victim_calls(tier, name):
    twins = [tier(name, capacity=16) for _ in range(2)]
    for t in twins:
        t.insert(*range(12))
        t.hit(*range(0, 12, 3))
        t.waiting.update({1: 1, 2: 1})  # blocks queued requests want: lookahead spares them
    pinned = {0, 4, 5}
    one_call = twins[0].policy.victims(6, lambda key: key not in pinned)
    assert one_call == twins[1].victims(6, pinned=pinned)
    assert twins[0].policy.victims(9, lambda key: key not in pinned) == twins[1].victims(3, pinned=pinned)
    assert len(twins[0].policy) == len(twins[1].policy) == 3


def test_fifo_ignores_hits_and_skips_pinned_in_place(tier):
    t = tier("fifo")
    t.insert(1, 2, 3)
    t.hit(1, 1)
    assert t.victims(1, pinned={1}) == [2]
    assert t.victims(2) == [1, 3]


def test_lru_evicts_least_recent(tier):
    t = tier("lru")
    t.insert(1, 2, 3)
    t.hit(1)
    assert t.victims(3) == [2, 3, 1]


def test_lfu_evicts_rarest_and_breaks_ties_by_recency(tier):
    t = tier("lfu")
    t.insert(1, 2, 3, 4)
    t.hit(1, 1, 3, 4, 3)  # counts 1:3, 2:1, 3:3, 4:2; among the 3s, 1 was used last before 3
    assert t.victims(4) == [2, 4, 1, 3]


def test_lfu_counts_only_while_resident(tier):
    t = tier("lfu")
    t.insert(1, 2)
    t.hit(1, 1, 1)
    assert t.victims(1, pinned={2}) == [1]
    t.insert(1)  # back with a count of one, and more recent than 2
    assert t.victims(2) == [2, 1]


def test_slru_promotes_on_hit_and_demotes_protected_overflow(tier):
    t = tier("slru", capacity=4, protected_fraction=0.5)  # two protected blocks
    t.insert(1, 2, 3, 4)
    t.hit(1, 2, 3)  # 1 and 2 protected, then 3 pushes 1 back to the head of probation
    assert t.victims(4) == [4, 1, 2, 3]


def test_slru_probation_goes_first_even_when_more_recent(tier):
    t = tier("slru", capacity=4)
    t.insert(1, 2)
    t.hit(1)
    t.insert(3)
    assert t.victims(1) == [2]
    assert t.victims(1, pinned={3}) == [1]


def test_arc_ghost_hits_adapt_p_and_return_to_t2(tier):
    t = tier("arc", capacity=4)
    arc = t.policy
    t.insert(1, 2, 3, 4)
    t.hit(3, 4)  # T1 = [1, 2], T2 = [3, 4]
    assert t.victims(1) == [1]  # |T1| > p = 0: LRU of T1, remembered in B1
    t.insert(5)
    assert t.victims(1) == [2]  # B1 = [1, 2]
    t.insert(1)  # B1 ghost hit: T1 was too small
    assert arc.p == 1 and len(arc) == 4
    assert t.victims(1) == [3]  # |T1| = 1 = p: now T2 gives way, 3 goes to B2
    t.insert(3)  # B2 ghost hit: T2 was too small
    assert arc.p == 0
    assert t.victims(1) == [5]  # the only block seen once


def test_arc_new_key_enters_t1_and_first_timers_go_first(tier):
    t = tier("arc", capacity=3)
    t.insert(1, 2)
    t.hit(1)
    t.insert(3)
    assert t.victims(3) == [2, 3, 1]


def test_s3fifo_small_queue_ghost_and_main(tier):
    t = tier("s3fifo", capacity=10, small_fraction=0.3)  # small 3, main 7, ghost 9
    t.insert(*range(1, 11))  # 1-3 fill small; until the first eviction the rest go to main
    t.hit(2, 2)
    assert t.victims(1) == [1]  # unused at the head of small: out, into the ghost
    t.insert(11)
    assert t.victims(1) == [3]  # 2 was used twice: it moves to main, 3 goes
    t.insert(1)  # seen in the ghost: straight to main, which is now over its share
    assert t.victims(1) == [4]  # main's oldest unused block, not one of small's
    assert len(t.policy) == 9


def test_s3fifo_main_gives_used_blocks_another_round(tier):
    t = tier("s3fifo", capacity=10, small_fraction=0.3)
    t.insert(*range(1, 11))  # small [1, 2, 3], main [4 .. 10]
    t.hit(4, 5, 5, 5, 5, 2, 2, 3, 3)  # 5's count stops at 3
    assert t.victims(1) == [1]
    t.insert(11)
    assert t.victims(1) == [11]  # 2 and 3 move to main, pushing it over its share
    t.insert(12)
    assert t.victims(1) == [6]  # from main: 4 and 5 were used, so they go round
    t.insert(13)
    assert t.victims(1) == [7]


def test_sieve_hand_stays_where_it_stopped(tier):
    t = tier("sieve", capacity=3)
    t.insert(1, 2, 3)
    t.hit(1)
    assert t.victims(1) == [2]  # the hand clears 1's bit and takes 2
    t.insert(4)
    t.hit(3)
    # the hand resumes at 3 (clears it) and takes 4; starting over from 1 would take 1
    assert t.victims(1) == [4]
    assert t.victims(1) == [1]  # past the newest it wraps to the oldest


def test_sieve_passes_pinned_blocks(tier):
    t = tier("sieve", capacity=3)
    t.insert(1, 2, 3)
    assert t.victims(1, pinned={1, 2}) == [3]
    assert t.victims(1, pinned={1}) == [2]


def test_prefix_lru_evicts_leaves_only_least_recent_first(tier):
    t = tier("prefix_lru")
    t.chain(1, 2, 3)  # 1 -> 2 -> 3
    t.chain(4, parent=1)  # 1 -> 4
    t.hit(1, 2, 3)
    # leaves are 3 and 4; 4 is least recent. Then 1 still has 2 -> 3 below it.
    assert t.victims(1) == [4]
    assert t.victims(3) == [3, 2, 1]


def test_prefix_lru_never_strands_a_pinned_child(tier):
    t = tier("prefix_lru")
    t.chain(1, 2, 3)
    assert t.victims(1, pinned={3}) == [None]  # 1 and 2 have a resident child
    t.insert(5)
    assert t.victims(1, pinned={3}) == [5]


def test_prefix_lru_parent_returns_to_its_own_place_in_lru_order(tier):
    t = tier("prefix_lru")
    t.chain(1, 2)  # 1 -> 2
    t.insert(7)
    t.hit(7)
    t.policy.on_remove(2)  # 1 is a leaf again, used before 7
    assert t.victims(2) == [1, 7]


def test_prefix_lru_child_inserted_before_parent(tier):
    t = tier("prefix_lru")
    t.chain(1, 2)
    t.policy.on_remove(1)  # 1 dropped (failed), 2 stays
    t.policy.on_insert(1, t.blocks[1])  # 1 comes back: its child 2 is resident
    assert t.victims(2) == [2, 1]


def test_cost_aware_evicts_lowest_cost_then_decays_by_age(tier):
    t = tier("cost_aware", half_life_s=60.0)
    t.insert(1, cost=1.0)
    t.insert(2, cost=8.0)
    t.insert(3, cost=1.0)
    assert t.victims(1) == [1]  # cheapest and oldest of the cheapest
    t.now = 120.0  # two half-lives: 2 is now worth 8 / 4 = 2
    t.insert(4, cost=4.0)
    t.hit(3)  # worth 1 now
    assert t.victims(3) == [3, 2, 4]


def test_lookahead_spares_blocks_queued_requests_want(tier):
    t = tier("lookahead")
    t.insert(1, 2, 3)
    t.waiting.update({1: 1, 2: 2})
    assert t.victims(1) == [3]
    assert t.victims(1) == [1]  # only wanted blocks left: least recent first


def test_lookahead_scan_is_bounded(tier):
    t = tier("lookahead", max_scan=2)
    t.insert(*range(1, 6))
    t.waiting.update({1: 1, 2: 1})
    assert t.victims(1) == [1]  # nothing unwanted among the 2 least recent
    t.waiting.update({3: 1})
    assert t.victims(1, pinned={2, 3}) == [4]  # no evictable wanted block seen: keep looking


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("slru", {"protected_fraction": 1.0}),
        ("s3fifo", {"small_fraction": 0.0}),
        ("s3fifo", {"move_to_main_threshold": 0}),
        ("cost_aware", {"half_life_s": 0}),
        ("lookahead", {"max_scan": -1}),
    ],
)
def test_bad_parameters_fail_early(tier, name, params):
    with pytest.raises(ValueError, match=name):
        tier(name, **params)
