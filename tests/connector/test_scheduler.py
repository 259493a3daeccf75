"""The connector under vLLM's real Scheduler, with no model: ordering of asynchronous loads,
stores per step, preemption, aborts during loads and saves, failed loads, two TP ranks.

Every step of the harness checks the KV each scheduled request reads (see conftest), so a
load that lands late or a copy of a reused block fails the step that would read it.
"""
from __future__ import annotations

from flexkv_runtime.control.index import TierKind
from vllm.v1.request import RequestStatus

BLOCK = 32
CPU, SSD = TierKind.CPU, TierKind.SSD


def offload_and_forget(engine, rid, tokens, max_tokens=2):
    """Run a request to the end, wait for its copies, then empty vLLM's own prefix cache."""
    engine.add(rid, tokens, max_tokens=max_tokens)
    engine.run()
    assert engine.scheduler.reset_prefix_cache()


def ready_blocks(engine, tier):
    return sum(1 for block in engine.flexkv.manager.index.blocks() if block.ready_in(tier))


def test_load_completes_before_the_request_runs(make_engine, make_prompt):
    engine = make_engine({"cpu_blocks": 32})
    tokens = make_prompt(1, 10 * BLOCK + 5)
    offload_and_forget(engine, "a", tokens)
    first = engine.outputs["a"]

    request = engine.add("b", tokens, max_tokens=2)
    waited = 0
    while "b" not in (out := engine.step()).num_scheduled_tokens:  # the harness checks its blocks when it runs
        assert request.status == RequestStatus.WAITING_FOR_REMOTE_KVS
        waited += 1
    assert waited >= 1
    assert out.num_scheduled_tokens["b"] == 5  # only the tail past the ten loaded blocks
    engine.run()
    assert engine.outputs["b"] == first
    totals = engine.totals()
    assert totals["hit_tokens_cpu"] == 10 * BLOCK and totals.get("load_failed_blocks", 0) == 0
    engine.assert_clean()


def test_blocks_are_stored_as_prefill_computes_them(make_engine, make_prompt):
    engine = make_engine({"cpu_blocks": 32})
    request = engine.add("a", make_prompt(2, 12 * BLOCK), max_tokens=1)
    engine.step()  # 4 blocks computed; their copy starts after the forward
    engine.workers[0].worker.engine.flush()
    engine.step()  # the copy is reported done
    assert ready_blocks(engine, CPU) == 4
    assert request.num_computed_tokens < request.num_prompt_tokens  # still in prefill
    engine.run()
    assert ready_blocks(engine, CPU) == 12
    engine.assert_clean()


def test_preempted_requests_reload_and_finish(make_engine, make_prompt):
    engine = make_engine({"cpu_blocks": 64}, num_gpu_blocks=18)
    system = make_prompt(3, 4 * BLOCK)
    for i in range(3):
        engine.add(f"r{i}", system + make_prompt(10 + i, 4 * BLOCK + 7), max_tokens=120)
    engine.run()
    assert engine.preempted, "the small KV cache should force preemptions"
    assert all(len(tokens) == 120 for tokens in engine.outputs.values())
    engine.assert_clean()


def test_abort_during_load_frees_blocks_after_the_load(make_engine, make_prompt):
    engine = make_engine({"cpu_blocks": 32})
    tokens = make_prompt(4, 8 * BLOCK + 3)
    offload_and_forget(engine, "a", tokens)

    def abort_b(out):
        if engine.scheduler.requests["b"].status == RequestStatus.WAITING_FOR_REMOTE_KVS:
            engine.scheduler.finish_requests("b", RequestStatus.FINISHED_ABORTED)
            engine.after_schedule = None

    engine.add("b", tokens)
    engine.after_schedule = abort_b
    engine.step()
    assert engine.scheduler.requests["b"].is_finished()  # aborted, its blocks still held for the load
    engine.run()
    assert engine.outputs["b"] == []
    engine.assert_clean()


def test_abort_during_promotion_from_ssd(make_engine, make_prompt, tmp_path):
    engine = make_engine({"config": "cpu_ssd", "cpu_blocks": 16, "ssd_dirs": [str(tmp_path)], "ssd_blocks": 128,
                          "overrides": ["ssd.fsync=none"]}, settle=True)
    tokens = make_prompt(5, 10 * BLOCK + 3)
    offload_and_forget(engine, "a", tokens)
    offload_and_forget(engine, "c", make_prompt(6, 12 * BLOCK + 1))  # pushes a's blocks out of the CPU tier
    manager = engine.flexkv.manager
    in_flight = []

    def abort_b(out):
        in_flight.append(manager.ops_in_flight)
        engine.scheduler.finish_requests("b", RequestStatus.FINISHED_ABORTED)
        in_flight.append(manager.ops_in_flight)
        engine.after_schedule = None

    engine.add("b", tokens)
    engine.after_schedule = abort_b
    engine.step()
    assert in_flight == [2, 1]  # the promotion had left and runs on; the load waiting for it is dropped
    engine.run()
    assert engine.outputs["b"] == []
    engine.assert_clean()


def test_abort_during_save_keeps_blocks_until_the_copy_ends(make_engine, make_prompt):
    engine = make_engine({"cpu_blocks": 32})
    tokens = make_prompt(7, 6 * BLOCK + 9)

    def abort_a(out):
        engine.scheduler.finish_requests("a", RequestStatus.FINISHED_ABORTED)
        engine.after_schedule = None

    engine.add("a", tokens)
    engine.after_schedule = abort_a
    engine.step()  # the first 4 blocks are computed and their copy starts, then the abort lands
    assert "a" in engine.scheduler.requests, "blocks being copied must stay allocated"
    engine.run()
    engine.assert_clean()

    assert engine.scheduler.reset_prefix_cache()
    engine.add("b", tokens, max_tokens=1)
    engine.run()  # the harness checks the four blocks b loads
    assert engine.totals()["hit_tokens_cpu"] == 4 * BLOCK
    engine.assert_clean()


def test_corrupt_ssd_block_is_recomputed(make_engine, make_prompt, tmp_path):
    engine = make_engine({"config": "cpu_ssd", "cpu_blocks": 16, "ssd_dirs": [str(tmp_path)], "ssd_blocks": 128,
                          "overrides": ["ssd.fsync=none"]}, settle=True)
    tokens = make_prompt(8, 10 * BLOCK + 3)
    a = engine.add("a", tokens, max_tokens=2)
    engine.run()
    offload_and_forget(engine, "c", make_prompt(9, 12 * BLOCK + 1))
    manager = engine.flexkv.manager
    keys = engine.flexkv.keyer.from_block_hashes(a.block_hashes)
    corrupt = next(i for i in range(3, len(keys)) if not manager.index.get(keys[i]).ready_in(CPU))
    store = engine.workers[0].worker.engine.ssd
    path, offset = store.location(manager.index.get(keys[corrupt]).slots[SSD])
    with open(path, "r+b") as f:
        f.seek(offset + 4096 + 64)
        f.write(b"\xff" * 256)

    engine.add("b", tokens, max_tokens=2)
    engine.run()
    assert engine.outputs["b"] == engine.outputs["a"]
    totals = engine.totals()
    assert totals["load_failed_blocks"] == len(keys) - corrupt
    assert totals.get("hit_tokens_cpu", 0) + totals["hit_tokens_ssd"] == corrupt * BLOCK
    engine.assert_clean()


def test_load_larger_than_the_cpu_tier_goes_in_rounds(make_engine, make_prompt, tmp_path):
    engine = make_engine({"config": "cpu_ssd", "cpu_blocks": 24, "ssd_dirs": [str(tmp_path)], "ssd_blocks": 128,
                          "overrides": ["ssd.fsync=none"]}, num_gpu_blocks=96, settle=True)
    tokens = make_prompt(11, 40 * BLOCK + 3)
    offload_and_forget(engine, "a", tokens)
    assert ready_blocks(engine, SSD) == 40

    engine.add("b", tokens, max_tokens=2)
    engine.run()
    assert engine.outputs["b"] == engine.outputs["a"]
    totals = engine.totals()
    assert totals["loads"] == 1 and totals["hit_tokens_ssd"] + totals.get("hit_tokens_cpu", 0) == 40 * BLOCK
    assert totals["hit_tokens_ssd"] >= 16 * BLOCK
    engine.assert_clean()


def test_two_ranks_each_move_their_slice(make_engine, make_prompt):
    engine = make_engine({"cpu_blocks": 32}, world_size=2)
    tokens = make_prompt(12, 9 * BLOCK + 1)
    offload_and_forget(engine, "a", tokens)
    engine.add("b", tokens, max_tokens=2)
    engine.run()  # both ranks' blocks checked
    assert engine.outputs["b"] == engine.outputs["a"]
    assert engine.totals()["hit_tokens_cpu"] == 9 * BLOCK  # counted once, not per rank
    engine.assert_clean()


def test_reset_cache_forgets_offloaded_blocks(make_engine, make_prompt):
    engine = make_engine({"cpu_blocks": 32})
    tokens = make_prompt(13, 5 * BLOCK + 2)
    offload_and_forget(engine, "a", tokens)
    assert engine.scheduler.reset_prefix_cache(reset_connector=True)
    assert ready_blocks(engine, CPU) == 0
    engine.add("b", tokens, max_tokens=2)
    engine.run()
    assert "hit_tokens_cpu" not in engine.totals()
    engine.assert_clean()
