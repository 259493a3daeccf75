"""Analytic cases: one or two requests whose load, prefill and decode times are known exactly."""
from __future__ import annotations

import dataclasses

import pytest

from flexkv_sim.engine import EngineConfig


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
    result = sim(requests, hardware=tiny.hardware(cpu_blocks=None)).run()
    second = result.requests[1]
    # vLLM's prefix cache leaves at least the last token to compute, so the last block is prefilled again
    assert second.gpu_hit == 3 and second.cached == 3
    assert ttft(second) == pytest.approx(0.016)
    assert not second.tier_hits and second.load_end_s is None


def test_connector_loads_every_full_block_and_only_the_last_token_is_recomputed(sim, tiny):
    # the connector's lookup is not capped like vLLM's own cache: a block-aligned prompt found whole
    # in the CPU tier is loaded whole (4 blocks at 1 block/s), and vLLM recomputes its last token
    requests = tiny.workload([(0.0, (0, 1, 2, 3), 64, 1), (100.0, (0, 1, 2, 3), 64, 1)])
    second = sim(requests, prefix_caching=False).run().requests[1]
    assert second.tier_hits["CPU"] == 4 and second.cached == 4
    assert ttft(second) == pytest.approx(4.0 + 0.001)


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
    with pytest.raises(ValueError, match=r"all 1 requests were rejected: .* GPU pool holds \(4\)"):
        sim(tiny.workload([(0.0, tuple(range(8)), 128, 1)]), hardware=tiny.hardware(gpu_blocks=4)).run()


def test_no_requests_and_a_negative_sample_interval_are_refused(sim, tiny):
    with pytest.raises(ValueError, match="has no requests: nothing to simulate"):
        sim(tiny.workload([]))
    with pytest.raises(ValueError, match="sample_interval_s must be >= 0"):
        sim(tiny.workload([(0.0, (50,), 16, 1)]), sample_interval_s=-1)  # used to turn sampling off silently


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


def test_each_prefill_chunk_caches_its_blocks_for_requests_admitted_while_the_prompt_is_still_prefilling(sim, tiny):
    # 64-token steps: request 0's 160 tokens take chunks of 64, 64 and 32; request 1, sharing its
    # first 4 blocks, gets the 32 tokens left in the third step, and as in vLLM hits the blocks
    # the first chunk computed although request 0's prefill has not ended
    requests = tiny.workload([(0.0, tuple(range(10)), 160, 1), (0.010, (0, 1, 2, 3, 50, 51), 96, 1)])
    first, second = sim(requests, max_tokens=64, hardware=tiny.hardware(cpu_blocks=None)).run().requests
    assert second.admitted_s == pytest.approx(0.128) and first.first_token_s == pytest.approx(0.192)
    assert second.gpu_hit == 4
    assert ttft(second) == pytest.approx(0.192 - 0.010)  # its last 32 tokens, in the same step


@pytest.mark.parametrize("overlap, scheduled", [(True, 103.023), (False, 103.024)])
def test_a_load_is_reported_after_the_step_it_ends_in_and_scheduled_one_step_later(sim, tiny, overlap, scheduled):
    # request 1 decodes in 1 ms steps; request 2 arrives mid-step, is admitted at 100.021 and loads 3
    # blocks (0.3 ms + 3 s). The workers report the load at the end of the step it ends in, vLLM learns
    # of it a step later, and then schedules the request. Where copies cannot overlap the forward (a
    # CPU engine), the load itself starts only when the admitting step ends.
    h2d = tiny.link(blocks_per_s=1.0, latency_s=0.0003)
    requests = tiny.workload([(0.0, (0, 1, 2, 3), 64, 1), (100.0, (20,), 16, 10_000),
                              (100.0205, (0, 1, 2, 9), 64, 1)])
    hw = tiny.hardware(h2d=h2d, copies_overlap_compute=overlap)
    third = sim(requests, prefix_caching=False, hardware=hw).run().requests[2]
    assert third.admitted_s == pytest.approx(100.021) and third.cached == 3
    assert third.load_end_s == pytest.approx(scheduled - 0.001)
    assert third.first_token_s == pytest.approx(scheduled + 0.017)  # 16 tokens and the decoding one


def test_a_finished_request_frees_its_blocks_tail_first_so_its_prefix_outlives_its_tail(sim, tiny):
    # 5 GPU blocks: request 1 needs 3 of them, so 2 of request 0's cached blocks go, its last two
    # (vLLM frees a request's blocks from the last), and request 2 still hits request 0's first two
    requests = tiny.workload([(0.0, (0, 1, 2, 3), 64, 1), (1.0, (10, 11, 12), 48, 1), (2.0, (0, 1, 2, 3), 64, 1)])
    third = sim(requests, hardware=tiny.hardware(cpu_blocks=None, gpu_blocks=5)).run().requests[2]
    assert third.gpu_hit == 2 and ttft(third) == pytest.approx(0.032)


def test_blocks_are_taken_when_the_tokens_need_them_not_at_admission(sim, tiny):
    # 7 GPU blocks, request 0's 4 cached. Request 1 (4 blocks in all: a prompt block and 39 output
    # tokens) takes one block per 16 tokens as it decodes; request 2 holds one block for 2 steps.
    # Taken at admission, request 1's blocks would evict two of request 0's; taken as decoding needs
    # them, they reuse request 2's freed block first and evict only request 0's last block
    requests = tiny.workload([(0.0, (0, 1, 2, 3), 64, 1), (1.0, (10,), 16, 40), (1.0, (11,), 8, 2),
                              (2.0, (0, 1, 2, 3), 64, 1)])
    last = sim(requests, hardware=tiny.hardware(cpu_blocks=None, gpu_blocks=7)).run().requests[3]
    assert last.gpu_hit == 3 and ttft(last) == pytest.approx(0.016)


def test_blocks_the_output_fills_are_cached_and_stored_like_prompt_blocks(sim, tiny):
    # 16 prompt tokens and 39 fed-back output tokens fill 3 blocks: vLLM caches all three and the
    # connector stores them as they fill
    result = sim(tiny.workload([(0.0, (0,), 16, 40)])).run()
    links = {link.name: link for link in result.links}
    assert links["e0/pcie_d2h"].bytes == 3 * tiny.BLOCK_BYTES
    assert len(result.engines[0].gpu.blocks) == 3
    assert result.requests[0].finish_s == pytest.approx(0.016 + 0.039)


def test_a_prefill_long_after_the_last_is_slower_and_requests_reach_the_scheduler_late(sim, tiny):
    # 1 ms from arrival to the scheduler; request 1's prefill starts 34 ms after request 0's ended (warm),
    # request 2's 10 s later: over 0.1 s after the last prefill, it takes 1.5 times as long
    requests = tiny.workload([(0.0, (0,), 16, 1), (0.05, (1,), 16, 1), (10.0, (2,), 16, 1)])
    engine = {"cold_start_factor": 1.5, "cold_after_s": 0.1, "arrival_latency_s": 0.001}
    first, second, third = sim(requests, engine=engine).run().requests
    assert first.admitted_s == pytest.approx(0.001)
    assert ttft(first) == pytest.approx(0.017) and ttft(second) == pytest.approx(0.017)
    assert ttft(third) == pytest.approx(0.001 + 1.5 * 0.016)


@pytest.mark.parametrize("key, value, message", [
    ("max_num_seqs", 0, "max_num_seqs must be a whole number >= 1, got 0"),  # the engine loop would never admit
    ("max_num_batched_tokens", 0, "max_num_batched_tokens must be a whole number >= 1, got 0"),
    ("arrival_latency_s", -5, "arrival_latency_s must be a number >= 0, got -5"),
])
def test_impossible_engine_settings_fail_naming_them(key, value, message):
    with pytest.raises(ValueError, match=f"simulate.engine: {message}"):
        EngineConfig.from_config({key: value})
