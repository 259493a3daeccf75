"""The closed-form link equals a literal SimPy model: a Resource(queue_depth) before a FIFO pipe."""
from __future__ import annotations

import simpy
from hypothesis import given, settings
from hypothesis import strategies as st

from flexkv_sim.hardware import Link, LinkSpec, Striped


def literal_link(spec: LinkSpec, ops: list[tuple[float, int]]) -> list[float]:
    """End times of ``ops`` (submit time, bytes) through SimPy resources, the textbook way."""
    env = simpy.Environment()
    slots, pipe = simpy.Resource(env, spec.queue_depth), simpy.Resource(env, 1)
    ends = [0.0] * len(ops)

    def op(i, at, nbytes):
        yield env.timeout(at)
        with slots.request() as slot:
            yield slot
            yield env.timeout(spec.latency_s)
            with pipe.request() as turn:
                yield turn
                yield env.timeout(nbytes / spec.bandwidth)
        ends[i] = env.now

    for i, (at, nbytes) in enumerate(ops):
        env.process(op(i, at, nbytes))
    env.run()
    return ends


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 4), st.sampled_from([0.0, 0.25, 1.0]),
       st.lists(st.tuples(st.integers(0, 20), st.integers(1, 8)), min_size=1, max_size=12))
def test_closed_form_link_matches_resources(queue_depth, latency, raw_ops):
    spec = LinkSpec(bandwidth=2.0, latency_s=latency, queue_depth=queue_depth)
    ops = sorted((at / 4, nbytes) for at, nbytes in raw_ops)
    link = Link("l", spec)
    assert [link.reserve(nbytes, at) for at, nbytes in ops] == literal_link(spec, ops)


def test_two_transfers_on_one_link_take_twice_as_long_as_one():
    link = Link("l", LinkSpec(bandwidth=100.0, latency_s=0.0, queue_depth=8))
    assert link.reserve(100, 0.0) == 1.0
    assert link.reserve(100, 0.0) == 2.0
    assert link.busy_s == 2.0 and link.bytes == 200


def test_latency_overlaps_up_to_the_queue_depth():
    link = Link("l", LinkSpec(bandwidth=1e12, latency_s=1.0, queue_depth=2))
    assert [round(link.reserve(1, 0.0)) for _ in range(4)] == [1, 1, 2, 2]


def test_striped_blocks_go_to_their_devices_in_parallel():
    devices = [Link(f"d{i}", LinkSpec(bandwidth=10.0)) for i in range(2)]
    array = Striped(devices)
    assert array.reserve([0, 1, 2, 3], block_bytes=10, now=0.0) == 2.0  # 2 blocks per device
    assert [d.bytes for d in devices] == [20, 20]
