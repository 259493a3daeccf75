"""The simulated data plane: transfer ops become SimPy timeouts over modelled links.

The control plane hands an op to ``submit``; it then reserves the op's
link (PCIe H2D for loads, D2H for stores, NVMe reads for promotions, NVMe
writes for demotions, the NIC for the remote pool), waits for the transfer to
end and reports back through ``CacheManager.complete``. The ``RequestDone``
events that completion yields go to ``on_done`` (the simulator routes them to
the request's engine).

The engine an op belongs to paces it, as a step-synchronous connector does
(``Engine.start_transfer``, ``Engine.report``): a store's copies start when the
forward computing its blocks has run, and a finished transfer is reported at
the end of the step in progress.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import simpy

from flexkv_runtime.control.manager import CacheManager, RequestDone
from flexkv_runtime.control.ops import TransferOp

if TYPE_CHECKING:
    from flexkv_sim.engine import Engine

#: (op, now) -> the simulated time the op's bytes have arrived
Route = Callable[[TransferOp, float], float]


class SimDataPlane:
    def __init__(self, env: simpy.Environment, route: Route, on_done: Callable[[RequestDone], None]) -> None:
        self.env = env
        self.route = route
        self.on_done = on_done
        self.manager: CacheManager | None = None  # set once the manager built on this data plane exists
        self.engine_of: Callable[[TransferOp], Engine] | None = None  # set once the engines exist
        self._not_started: set[int] = set()

    def submit(self, op: TransferOp) -> None:
        self._not_started.add(op.op_id)
        self.engine_of(op).start_transfer(op, lambda: self._start(op))

    def cancel(self, op_id: int) -> bool:
        """An op can be dropped until it has reserved its link."""
        if op_id in self._not_started:
            self._not_started.discard(op_id)
            return True
        return False

    def release(self, tier, slots: list[int]) -> None:
        """A simulated store keeps nothing across runs: nothing to forget."""

    def _start(self, op: TransferOp) -> None:
        """Reserve the op's link; one timeout brings its end (the link resolves its queue in closed form)."""
        not_started = self._not_started
        if op.op_id not in not_started:
            return  # cancelled before it started
        not_started.remove(op.op_id)
        env = self.env
        now = env.now
        env.timeout(self.route(op, now) - now).callbacks.append(lambda _event: self._arrived(op))

    def _arrived(self, op: TransferOp) -> None:
        self.engine_of(op).report(lambda: self._complete(op.op_id))

    def _complete(self, op_id: int) -> None:
        for done in self.manager.complete(op_id):
            self.on_done(done)
