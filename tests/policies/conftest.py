import pytest

from flexkv_runtime.control.index import Block
from flexkv_runtime.policies.base import PolicyContext, make_policy


class Tier:
    """One eviction policy fed by hand: blocks by key, a clock and the waiting counts it reads."""

    def __init__(self, name, capacity=8, **params):
        self.now = 0.0
        self.waiting = {}
        self.policy = make_policy("eviction", {"name": name, **params}, capacity_blocks=capacity)
        self.policy.bind(PolicyContext(clock=lambda: self.now, waiting_refs=self.waiting, tier="CPU"))
        self.blocks = {}

    def insert(self, *keys, cost=1.0):
        """Insert ``keys`` as first blocks of unrelated prompts."""
        for key in keys:
            self.chain(key, cost=cost)

    def chain(self, *keys, parent=None, cost=1.0):
        """Insert ``keys`` as one prefix chain under ``parent`` (a key or None)."""
        for key in keys:
            block = Block(key, self.blocks.get(parent), cost)
            self.blocks[key] = block
            self.policy.on_insert(key, block)
            parent = key

    def hit(self, *keys):
        for key in keys:
            self.policy.on_hit(key, self.blocks[key])

    def victims(self, n, pinned=()):
        return [self.policy.victim(lambda key: key not in pinned) for _ in range(n)]


@pytest.fixture
def tier():
    return Tier
