import pytest

from flexkv_runtime.control.config import build_manager
from flexkv_runtime.control.ops import ImmediateDataPlane


class Harness:
    """A manager over a data plane whose ops complete only when the test says so."""

    def __init__(self, **kwargs):
        self.dp = ImmediateDataPlane()
        self.now = 0.0
        kwargs.setdefault("eviction", "lru")
        self.mgr = build_manager(data_plane=self.dp, clock=lambda: self.now, block_bytes=10, **kwargs)
        self.pending = {}

    def take(self):
        """Ops submitted since the last call: they count as started."""
        for op in self.dp.drain():
            self.pending[op.op_id] = op
        return list(self.pending.values())

    def finish(self, op, failed=()):
        self.pending.pop(op.op_id)
        return self.mgr.complete(op.op_id, failed)

    def settle(self):
        events = []
        while self.take():
            for op in list(self.pending.values()):
                events += self.finish(op)
        return events

    def store(self, rid, keys, start=0):
        n = self.mgr.plan_store(rid, keys, list(range(100, 100 + len(keys) - start)), start=start)
        return n, self.settle()

    def resident(self, tier):
        from flexkv_runtime.control.index import TierKind

        kind = TierKind[tier]
        return sorted(b.key for b in self.mgr.index.blocks() if b.ready_in(kind))


@pytest.fixture
def harness():
    return Harness
