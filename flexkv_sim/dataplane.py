"""The simulated data plane: transfer ops become SimPy processes over modelled links.

The control plane hands an op to ``submit``; a process then reserves the op's
link (PCIe H2D for loads, D2H for stores, NVMe reads for promotions, NVMe
writes for demotions, the NIC for the remote pool), waits for the transfer to
end and reports back through ``CacheManager.complete``. The ``RequestDone``
events that completion yields go to ``on_done`` (the simulator routes them to
the request's engine).
"""
from __future__ import annotations

from collections.abc import Callable

import simpy

from flexkv_runtime.control.manager import CacheManager, RequestDone
from flexkv_runtime.control.ops import TransferOp

#: (op, now) -> the simulated time the op's bytes have arrived
Route = Callable[[TransferOp, float], float]


class SimDataPlane:
    def __init__(self, env: simpy.Environment, route: Route, on_done: Callable[[RequestDone], None]) -> None:
        self.env = env
        self.route = route
        self.on_done = on_done
        self.manager: CacheManager | None = None  # set once the manager built on this data plane exists
        self._not_started: set[int] = set()

    def submit(self, op: TransferOp) -> None:
        self._not_started.add(op.op_id)
        self.env.process(self._move(op))

    def cancel(self, op_id: int) -> bool:
        """An op can be dropped until its process has reserved its link (the same instant it was submitted)."""
        if op_id in self._not_started:
            self._not_started.discard(op_id)
            return True
        return False

    def release(self, tier, slots: list[int]) -> None:
        """A simulated store keeps nothing across runs: nothing to forget."""

    def _move(self, op: TransferOp):
        if op.op_id not in self._not_started:
            return  # cancelled before it started
        self._not_started.discard(op.op_id)
        env = self.env
        yield env.timeout(self.route(op, env.now) - env.now)
        for done in self.manager.complete(op.op_id):
            self.on_done(done)
