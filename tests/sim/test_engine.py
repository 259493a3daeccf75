"""Analytic cases: one or two requests whose load, prefill and decode times are known exactly."""
from __future__ import annotations

import dataclasses

import pytest


def ttft(sr):
    return sr.first_token_s - sr.arrival_s


def test_cold_request_prefills_every_token_and_decodes_one_step_per_token(sim, tiny):
    # 64 prompt tokens at 1 ms each, then 10 more output tokens, one 1-token decode step each
    result = sim(tiny.workload([(0.0, (0, 1, 2, 3), 64, 11)])).run()
    sr = result.requests[0]
    assert ttft(sr) == pytest.approx(0.064)
    assert sr.finish_s - sr.first_token_s == pytest.approx(0.010)
    assert sr.cached == 0


def test_stored_prefix_is_loaded_at_link_speed_then_only_the_rest_is_prefilled(sim, tiny):
    # request 0 computes and stores 4 blocks; request 1 shares 3 and loads them over
    # H2D (0.5 s latency + 1 s per block), then prefills its last 16 tokens
    h2d = tiny.link(blocks_per_s=1.0, latency_s=0.5)
    requests = tiny.workload([(0.0, (0, 1, 2, 3), 64, 1), (100.0, (0, 1, 2, 9), 64, 1)])
    result = sim(requests, prefix_caching=False, hardware=tiny.hardware(h2d=h2d)).run()
    first, second = result.requests
    assert ttft(first) == pytest.approx(0.064)
    assert second.tier_hits["CPU"] == 3 and second.cached == 3
    assert second.load_end_s - second.admitted_s == pytest.approx(3.5)
    assert ttft(second) == pytest.approx(3.5 + 0.016)
    links = {link.name: link for link in result.links}
    assert links["e0/pcie_d2h"].bytes == (4 + 1) * tiny.BLOCK_BYTES  # request 1 stores its one new block
    assert links["e0/pcie_h2d"].bytes == 3 * tiny.BLOCK_BYTES


def test_layerwise_load_overlaps_prefill_and_ends_one_layer_after_the_load(sim, tiny):
    h2d = tiny.link(blocks_per_s=1.0, latency_s=0.5)
    requests = tiny.workload([(0.0, (0, 1, 2, 3), 64, 1), (100.0, (0, 1, 2, 9), 64, 1)])
    result = sim(requests, prefix_caching=False, layerwise=True, hardware=tiny.hardware(h2d=h2d)).run()
    second = result.requests[1]
    assert ttft(second) == pytest.approx(3.5 + 0.016 / tiny.model.layers)


def test_two_loads_contending_on_one_link_take_twice_as_long(sim, tiny):
    requests = tiny.workload([
        (0.0, (0, 1, 2, 3), 64, 1),
        (100.0, (0, 1, 2, 10), 64, 1),
        (100.0, (0, 1, 2, 11), 64, 1),
    ])
    result = sim(requests, prefix_caching=False).run()
    _, one, two = result.requests
    assert one.admitted_s == two.admitted_s == 100.0
    assert one.load_end_s - 100.0 == pytest.approx(3.0)  # 3 blocks at 1 block/s
    assert two.load_end_s - 100.0 == pytest.approx(6.0)  # the link moves both in twice the time


def test_full_gpu_hit_skips_prefill_of_the_cached_prefix(sim, tiny):
    requests = tiny.workload([(0.0, (0, 1, 2, 3), 64, 1), (100.0, (0, 1, 2, 3), 64, 1)])
    result = sim(requests).run()
    second = result.requests[1]
    # vLLM recomputes at least the last token, so the last block is prefilled again
    assert second.gpu_hit == 3 and second.cached == 3
    assert ttft(second) == pytest.approx(0.016)
    assert not second.tier_hits and second.load_end_s is None


def test_gpu_blocks_wait_for_the_store_before_they_are_freed(sim, tiny):
    # a slow D2H link keeps the request's blocks pinned after it finished
    hw = dataclasses.replace(tiny.hardware(gpu_blocks=4), d2h=tiny.link(blocks_per_s=0.1))
    requests = tiny.workload([(0.0, (0, 1, 2), 48, 1), (1.0, (5, 6, 7), 48, 1)])
    second = sim(requests, hardware=hw).run().requests[1]
    stored_at = 3 / 0.1 + 0.048  # three blocks at 0.1 block/s after the prefill
    assert second.admitted_s == pytest.approx(stored_at)


def test_requests_longer_than_the_gpu_pool_are_rejected(sim, tiny):
    requests = tiny.workload([(0.0, tuple(range(8)), 128, 1), (0.0, (50,), 16, 1)])
    result = sim(requests, hardware=tiny.hardware(gpu_blocks=4)).run()
    assert result.rejected == 1 and [sr.index for sr in result.requests] == [1]


def test_wait_complete_stop_rule_waits_for_blocks_in_flight_instead_of_recomputing(sim, tiny):
    # request 0's store crawls over a 0.1 block/s D2H link; request 1 shares its prefix
    hw = dataclasses.replace(tiny.hardware(), d2h=tiny.link(blocks_per_s=0.1))
    requests = tiny.workload([(0.0, (0, 1, 2, 3), 64, 1), (1.0, (0, 1, 2, 9), 64, 1)])
    impatient = sim(requests, prefix_caching=False, hardware=hw).run().requests[1]
    assert impatient.cached == 0 and ttft(impatient) == pytest.approx(0.064)
    wait = {"name": "none", "stop_rule": "wait_complete", "timeout_s": 0.0}
    patient = sim(requests, prefix_caching=False, hardware=hw, prefetch=wait).run().requests[1]
    stored = 0.064 + 4 / 0.1
    assert patient.cached == 3
    assert patient.first_token_s == pytest.approx(stored + 3.0 + 0.016, abs=0.002)  # + 3 blocks of H2D, 16 tokens
