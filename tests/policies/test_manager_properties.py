"""Random programs of stores, loads, lookups, queue events, completions, failures, cancels and
resets through the real CacheManager, for every online eviction policy (belady needs an oracle
of the program's future and is left to replay tests).

Ops are completed only when the program says so, in any order, so blocks stay pinned or in
flight for a while. Every victim a policy returns is checked as it is returned: resident, not
pinned, ready (not in flight) and, for prefix_lru, without a resident child in the tier; and
``None`` only when no such block exists; hit_density takes an inner block only when no leaf can
go. prefix_lru's contiguity is checked there, at the
eviction, because other manager paths can leave a child without its parent whatever the policy
does (reset, failures and cancels of a parent still in flight).
"""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexkv_runtime.control.config import build_manager
from flexkv_runtime.control.index import TierKind
from flexkv_runtime.control.ops import ImmediateDataPlane
from flexkv_runtime.policies import available

CPU = TierKind.CPU
ONLINE = [name for name in available("eviction") if name != "belady"]


def key_of(path):
    """A distinct int per prefix path: its digits in base 3 behind a leading 1."""
    key = 1
    for step in path:
        key = key * 3 + step
    return key


def prompt(root, branches):
    """The block keys of a prompt: a root, then one block per branch choice."""
    return [key_of((root, *branches[:i])) for i in range(len(branches) + 1)]


# three roots and up to five binary branch choices: prompts share prefixes
prompts = st.builds(prompt, st.integers(0, 2), st.lists(st.integers(0, 1), max_size=5))
ARGUMENTS = {
    "store": (prompts, st.integers(0, 2), st.sampled_from([0, 600])),  # start, prompt tokens
    "load": (prompts,),
    "lookup": (prompts,),
    "wait": (prompts,),
    "run": (st.integers(0, 7),),
    "start": (),
    "complete": (st.integers(0, 7), st.booleans()),  # which started op, whether half of it fails
    "settle": (),
    "cancel": (st.integers(0, 7),),
    "tick": (),
    "reset": (),
}
# how often each op is drawn: mostly traffic, now and then a completion, rarely a reset
MIX = ["store"] * 8 + ["load"] * 5 + ["lookup", "wait", "run", "start"] * 2 + ["complete"] * 4
MIX += ["settle"] * 3 + ["cancel"] * 2 + ["tick", "reset"]
ops = st.sampled_from(MIX).flatmap(lambda name: st.tuples(st.just(name), *ARGUMENTS[name]))
setups = st.fixed_dictionaries(
    {
        "cpu": st.integers(2, 6),
        "ssd": st.sampled_from([0, 4, 10]),
        "write_policy": st.sampled_from(["write_through", "write_back", "selective"]),
        "admission": st.sampled_from(["always", "frequency", "hit_density"]),
        "prefetch": st.sampled_from(["none", "promote_on_lookup", "lookahead"]),
    }
)


class Program:
    def __init__(self, eviction, cpu, ssd, write_policy, admission, prefetch):
        self.now = 0.0
        self.dp = ImmediateDataPlane()
        self.mgr = build_manager(
            tiers={"cpu": cpu, "ssd": ssd},
            eviction=eviction,
            admission=admission,
            prefetch=prefetch,
            write_policy=write_policy,
            data_plane=self.dp,
            clock=lambda: self.now,
            block_bytes=1,
        )
        self.leaf_first = eviction in ("prefix_lru", "cost_aware")
        self.leaves_first = eviction == "hit_density"  # an inner block only when no leaf can go
        self.running = []  # ops the data plane has started: no longer cancellable
        self.requests = []
        self.waiting = []
        for kind, tier in self.mgr.tiers.items():
            tier.eviction.victim = self._checked(kind, tier.eviction.victim)

    def _is_leaf(self, block, kind):
        """No child resident in the tier; a child passing through the CPU tier is no resident of it."""
        return not any(
            b.parent is block and kind in b.slots and not (kind == TierKind.CPU and self.mgr.is_passing(b.key))
            for b in self.mgr.index.blocks())

    def _evictable(self, block, kind):
        leaf = not self.leaf_first or self._is_leaf(block, kind)
        return kind in block.slots and block.pins == 0 and block.ready_in(kind) and leaf

    def _checked(self, kind, choose):
        def victim(can_evict):
            key = choose(can_evict)
            if key is None:
                held = [b for b in self.mgr.index.blocks() if self._evictable(b, kind)]
                assert not held, f"no victim in {kind.name}, but {held} could go"
            else:
                block = self.mgr.index.get(key)
                assert block is not None and self._evictable(block, kind), f"{block} evicted from {kind.name}"
                if self.leaves_first and not self._is_leaf(block, kind):
                    leaves = [b for b in self.mgr.index.blocks() if self._evictable(b, kind) and self._is_leaf(b, kind)]
                    assert not leaves, f"{block} evicted from {kind.name} before the leaves {leaves}"
            return key

        return victim

    def _request(self):
        self.requests.append(f"r{len(self.requests)}")
        return self.requests[-1]

    def step(self, op):
        mgr, name = self.mgr, op[0]
        if name == "store":
            _, keys, start, tokens = op
            start = min(start, len(keys) - 1)
            mgr.plan_store(self._request(), keys, list(range(len(keys) - start)), start=start, request_tokens=tokens)
        elif name == "load":
            ready = self.mgr.lookup(op[1]).ready_blocks
            if ready:
                mgr.plan_load(self._request(), op[1], 0, list(range(ready)))
        elif name == "lookup":
            mgr.lookup(op[1], request_id=self._request())
        elif name == "wait":
            self.waiting.append(self._request())
            mgr.on_request_waiting(self.waiting[-1], op[1])
        elif name == "run" and self.waiting:
            mgr.on_request_running(self.waiting.pop(op[1] % len(self.waiting)))
        elif name == "start":
            self.running += self.dp.drain()
        elif name == "complete" and self.running:
            done = self.running.pop(op[1] % len(self.running))
            mgr.complete(done.op_id, done.keys[len(done.keys) // 2 :] if op[2] else ())
        elif name == "settle":
            self.complete_all()
        elif name == "cancel" and self.requests:
            mgr.cancel(self.requests[op[1] % len(self.requests)])
        elif name == "tick":
            self.now += 7.0
        elif name == "reset":
            mgr.reset()

    def check(self):
        """Occupancy within capacity, and index, tiers and policy agree on what each tier holds."""
        self.mgr.check_invariants()

    def complete_all(self):
        """Start and complete every op, and the ops their completion releases."""
        while True:
            self.running += self.dp.drain()
            if not self.running:
                return
            self.mgr.complete(self.running.pop().op_id)

    def drain(self):
        """Cancel every request, then complete whatever had already started."""
        for request_id in self.requests:
            self.mgr.cancel(request_id)
        self.complete_all()
        assert self.mgr.ops_in_flight == 0
        assert [b for b in self.mgr.index.blocks() if b.pins] == []


@pytest.mark.parametrize("eviction", ONLINE)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(setup=setups, program=st.lists(ops, min_size=10, max_size=80))
def test_random_programs_keep_the_invariants(eviction, setup, program):
    run = Program(eviction, **setup)
    for op in program:
        run.step(op)
        run.check()
    run.drain()
    run.check()
