"""The hit_density eviction and admission policies: through their interface, through the
CacheManager on a long replay, and against LRU on small synthetic workloads where learning
the block classes must pay."""
import random

import pytest

from flexkv_runtime.control.config import build_manager
from flexkv_runtime.control.index import Block, TierKind
from flexkv_runtime.control.ops import ImmediateDataPlane
from flexkv_runtime.policies import PolicyContext, make_policy
from flexkv_runtime.policies.hit_density import TAIL, partner_for
from flexkv_sim.replay import capacity_from_fraction, replay, workload_keys
from flexkv_sim.workloads import build_workload

CPU = TierKind.CPU


class Tier:
    """One hit_density policy (and its admission) fed by hand, as the manager would."""

    def __init__(self, capacity=8, **params):
        self.policy = make_policy("eviction", {"name": "hit_density", **params}, capacity_blocks=capacity)
        self.admission = make_policy("admission", "hit_density")
        ctx = PolicyContext(tier="CPU")
        self.policy.bind(ctx)
        self.admission.bind(ctx)
        self.blocks = {}

    def chain(self, *keys, parent=None):
        """Store ``keys`` as one request's blocks after ``parent`` (a key or None)."""
        for key in keys:
            block = Block(key, self.blocks.get(parent), 1.0)
            self.blocks[key] = block
            self.policy.on_insert(key, block)
            parent = key

    def hit(self, *keys):
        for key in keys:
            self.policy.on_hit(key, self.blocks[key])

    def victims(self, n, pinned=()):
        return [self.policy.victim(lambda key: key not in pinned) for _ in range(n)]


def test_prefixes_shrink_from_their_ends():
    t = Tier(capacity=16)
    t.chain(1, 2, 3, 4)
    t.chain(10, 11, parent=2)  # a branch off block 2
    victims = t.victims(6)
    assert sorted(victims) == [1, 2, 3, 4, 10, 11]
    assert victims[0] == 4  # the tail of the request that ended
    children = {1: [2], 2: [3, 10], 3: [4], 10: [11]}
    for i, key in enumerate(victims):  # never a block while one of its children is resident
        assert set(children.get(key, ())) <= set(victims[:i])


def test_pinned_blocks_are_never_chosen_and_none_when_all_are():
    t = Tier(capacity=8)
    t.chain(1, 2, 3)
    t.chain(5, 6)
    assert t.victims(1, pinned={1, 2, 3, 5, 6}) == [None]
    assert t.victims(1, pinned={3, 6}) not in ([3], [6])
    # only an inner block is free: it goes rather than nothing
    t2 = Tier(capacity=8)
    t2.chain(1, 2)
    assert t2.victims(1, pinned={2}) == [1]
    assert len(t2.policy) == 1 and t2.victims(1) == [2]


def test_a_request_tail_is_classed_apart_and_reuse_is_remembered():
    t = Tier(capacity=8)
    t.chain(1, 2, 3)
    t.chain(7)  # another request: 3 ended the first one
    assert t.policy._meta[3][0] == TAIL and t.policy._meta[2][0] != TAIL
    t.hit(1)
    assert t.policy._meta[1][0] == t.policy._reuse_base + 1  # seen twice
    while len(t.policy):
        t.victims(1)
    t.chain(1)  # back from the ghost: it keeps its count, and keeping it would have been a hit
    assert t.policy._meta[1][1] == 3
    assert sum(map(sum, t.policy._hits)) >= 2


def test_first_seen_blocks_learn_their_request_size_up_to_a_block_that_left():
    t = Tier(capacity=32, size_classes=3)
    meta = t.policy._meta
    t.chain(1, 2, 3, 4, 5)
    assert [meta[k][0] for k in (1, 2, 3, 4)] == [1, 2, 2, 3]  # for now: at least as long as their depth
    t.chain(9)  # the request ended at 5 blocks: its blocks are of the largest size class, 5 a tail
    assert [meta[k][0] for k in (1, 2, 3, 4)] == [3, 3, 3, 3] and meta[5][0] == TAIL
    t.chain(11, 12, 13, 14)
    t.policy.on_remove(12)  # gone mid-request: 11 is no longer a prefix of what the request stores
    t.chain(15, parent=14)
    t.chain(30)
    assert (meta[11][0], meta[13][0], meta[14][0], meta[15][0]) == (1, 3, 3, TAIL)


def test_admission_defers_to_the_densities_and_counts_refused_sightings():
    t = Tier(capacity=2)
    block = Block(99, None, 1.0)
    assert t.admission.admit(99, block, 512)  # room left: always
    t.chain(1)
    t.chain(2)
    policy = t.policy
    policy._peak = [0.0] * len(policy._peak)
    policy._threshold = 1.0
    assert not t.admission.admit(99, block, 512)
    assert policy._offered_class(99, block) == policy._reuse_base + 1  # refused, but seen
    policy._peak[policy._reuse_base + 1] = 2.0
    assert t.admission.admit(99, block, 512)  # the second sighting is in a class worth its slot


def test_a_refused_block_that_returns_counts_as_a_hit_of_its_class():
    """Refusals do not censor what the policy learns: a refused block is remembered as stored and
    evicted at once, so its return is a hit of its class at the age it would have had."""
    t = Tier(capacity=2)
    t.chain(1)
    t.chain(2)
    policy = t.policy
    policy._peak = [0.0] * len(policy._peak)
    policy._threshold = 1.0
    block = Block(99, None, 1.0)
    first_seen = policy._offered_class(99, block)
    hits_before = sum(policy._hits[first_seen])
    assert not t.admission.admit(99, block, 512)
    assert sum(policy._hits[first_seen]) == hits_before  # not back yet
    t.hit(1, 2)  # time passes
    policy._threshold = 1.0
    assert not t.admission.admit(99, block, 512)  # back, refused again
    assert sum(policy._hits[first_seen]) == hits_before + 1


def test_admission_without_its_eviction_partner_admits_everything():
    admission = make_policy("admission", "hit_density")
    ctx = PolicyContext(tier="CPU")
    lru = make_policy("eviction", "lru", capacity_blocks=2)
    lru.bind(ctx)
    admission.bind(ctx)
    assert partner_for(ctx) is None
    assert admission.admit(1, Block(1, None, 1.0), 0)


def test_bad_parameters_name_the_policy():
    with pytest.raises(ValueError, match="hit_density"):
        make_policy("eviction", {"name": "hit_density", "decay": 0.0}, capacity_blocks=4)
    with pytest.raises(ValueError, match="hit_density"):
        make_policy("eviction", {"name": "hit_density", "age_bins": 4}, capacity_blocks=4)


def ranked_victim(policy, can_evict):
    """The victim hit_density's rule names, found by ranking every resident leaf directly: in each
    class the least recently used leaf, valued at its age; the lowest value goes (ties: the lower
    class). None when that block is pinned (the policy then takes its slow path) or there is none."""
    heads = {}
    for key, meta in policy._meta.items():
        if key in policy._kids or (key == policy._pending and not policy._pending_queued):
            continue  # not a leaf, or the block being stored (it competes only when nothing else can)
        cls, last = meta[0], meta[2]
        if cls not in heads or (last, key) < heads[cls][:2]:
            heads[cls] = (last, key, policy._density[cls][policy._bin(policy._now - last)])
    best = min(((density, cls, key) for cls, (_, key, density) in heads.items()), default=None)
    return best[2] if best is not None and can_evict(best[2]) else None


def checking_victims(policy):
    """Make every ``policy.victim`` call assert that it chose the ranked victim; returns the ones checked."""
    choose, checked = policy.victim, []

    def victim(can_evict):
        expected = ranked_victim(policy, can_evict)
        key = choose(can_evict)
        if expected is not None:
            assert key == expected, (len(checked), key, expected)
            checked.append(key)
        return key

    policy.victim = victim
    return checked


@pytest.mark.parametrize("seed", range(12))
def test_every_victim_of_a_random_program_is_the_ranked_one(seed):
    """Branching prefixes, hits, refusals, removals in mid-request and pinned blocks, fed to the policy
    directly: the paths a replay rarely takes (stale heap entries older than a new head among them)."""
    rng = random.Random(seed)
    capacity = rng.choice([8, 16, 40])
    t = Tier(capacity, size_classes=rng.choice([1, 3, 5]), max_reuse=rng.choice([1, 2, 3]))
    policy = t.policy
    checked = checking_victims(policy)
    resident = set()
    chains = [[] for _ in range(6)]
    for step in range(1500):
        chain = chains[rng.randrange(len(chains))]
        if rng.random() < 0.3:
            chain.clear()  # a new conversation
        elif chain and rng.random() < 0.3:
            del chain[rng.randrange(len(chain)):]  # the next request branches off an inner block
        pinned = set(rng.sample(sorted(resident), min(len(resident), rng.choice([0, 0, 1, 3]))))
        parent = None
        for depth in range(len(chain) + rng.randint(1, 6)):
            if depth == len(chain):
                chain.append((step, depth))
            key = chain[depth]
            if key in resident:
                t.hit(key)
            else:
                if len(resident) >= capacity:
                    gone = policy.victim(lambda k: k not in pinned)
                    if gone is None:
                        break
                    resident.discard(gone)
                if rng.random() < 0.05 and resident:
                    gone = rng.choice(sorted(resident))
                    policy.on_remove(gone)  # dropped: a failed copy, a reset
                    resident.discard(gone)
                if rng.random() < 0.03:
                    policy.sighted(key, Block(key, t.blocks.get(parent), 1.0))  # refused
                    break
                t.chain(key, parent=parent)
                resident.add(key)
            parent = key
    assert len(policy) == len(resident) and len(checked) > 1000


# ------------------------------------------------------ through the manager
# (random programs through the manager: tests/policies/test_manager_properties.py)


@pytest.mark.parametrize("admission", ["always", "hit_density"])
def test_a_long_replay_keeps_the_policy_consistent(admission):
    """Thousands of evictions, reconfigurations and ghost turnovers, each victim the ranked one (the
    class heads, lazy heaps and cached head densities are shortcuts), then a full consistency check."""
    workload = build_workload({"type": "chat", "num_sessions": 150, "seed": 3})
    dp = ImmediateDataPlane()
    mgr = build_manager(tiers={"cpu": 40}, eviction="hit_density", admission=admission, data_plane=dp,
                        clock=lambda: 0.0, block_bytes=1)
    checked = checking_victims(mgr.cpu.eviction)
    for i, keys in enumerate(workload_keys(workload)):
        loaded = mgr.plan_load(i, keys, 0, range(mgr.lookup(keys).ready_blocks))
        mgr.plan_store(i, keys, range(len(keys) - loaded), start=loaded, request_tokens=256 * len(keys))
        while ops := dp.drain():
            for op in ops:
                mgr.complete(op.op_id)
    mgr.check_invariants()
    assert mgr.cpu.stats.evictions > 2000 and len(checked) > 0.9 * mgr.cpu.stats.evictions
    policy = mgr.cpu.eviction
    assert set(policy._meta) == {b.key for b in mgr.index.blocks() if CPU in b.slots}
    for key in policy._meta:  # its own child counts match the index's
        assert policy._kids.get(key, 0) == mgr.index.resident_children(mgr.index.get(key), CPU)


# ------------------------------------------------------------ it pays off


@pytest.mark.parametrize(
    ("spec", "fraction"),
    [
        ({"type": "doc_qa", "num_requests": 600, "num_documents": 200}, 0.05),
        ({"type": "system_prompt", "num_requests": 600, "num_system_prompts": 8}, 0.02),
    ],
)
def test_beats_lru_where_blocks_differ_in_worth(spec, fraction):
    """Zipf-popular documents and shared system prompts among one-off questions: a policy that
    learns that reused and first-seen blocks differ keeps the shared prefixes; LRU flushes them."""
    workload = build_workload(spec)
    keys = workload_keys(workload)
    capacity = capacity_from_fraction(workload, fraction)
    lru = replay(workload, keys=keys, capacity_blocks=capacity, eviction="lru")
    ours = replay(workload, keys=keys, capacity_blocks=capacity, eviction="hit_density", admission="hit_density")
    assert ours.prefix_token_hit_ratio > lru.prefix_token_hit_ratio + 0.03, (ours, lru)
    assert ours.block_hit_ratio > lru.block_hit_ratio
