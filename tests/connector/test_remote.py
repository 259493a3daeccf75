"""The connector's remote tier under vLLM's real Scheduler, on real stores (Redis, Mooncake Store) on loopback.

Engines here share one store as engines on different hosts would: what one
stores, another discovers and loads (the harness checks every block a request
reads). A store killed mid-run costs hits, never a stalled step.
"""
from __future__ import annotations

import itertools
import threading
import time

import pytest

from connector.settings import compose_config
from experiments import local_stores
from flexkv_runtime.control.index import TierKind
from flexkv_runtime.data.remote.trailer import remote_key
from vllm.v1.request import RequestStatus

BLOCK = 32
CPU, REMOTE = TierKind.CPU, TierKind.REMOTE
TIMEOUT_S = 0.5
#: slack over the configured timeout for scheduling on a busy 2-core machine
SLACK_S = 0.75


@pytest.fixture(params=["redis", "mooncake"])
def store(request, tmp_path):
    """A running store of each backend, killed at the end."""
    try:
        started = local_stores.start_store(request.param, tmp_path, segment="256 MB")
    except local_stores.StoreUnavailable as exc:
        pytest.skip(f"{exc}; .ci/run installs it")
    yield started
    started.kill()


@pytest.fixture(autouse=True)
def no_leaked_threads():
    """Closing an engine stops its discovery thread and its store calls (scheduler side and workers)."""
    yield
    left = [t.name for t in threading.enumerate() if t.name.startswith("flexkv-")]
    assert not left, f"threads left running: {left}"


def remote_extra(store, cpu_blocks=32, **remote) -> dict:
    return {"cpu_blocks": cpu_blocks,
            "remote": {"name": store.backend, "timeout_s": TIMEOUT_S, "breaker_failures": 2,
                       "breaker_cooldown_s": 0.3, **remote},
            "remote_address": next(iter(store.options.values()))}


def delete_value(store, name: str) -> None:
    if store.backend == "redis":
        store.raw().delete(name)
    else:
        assert store.raw().remove(name, True) == 0


def remote_stats(engine) -> dict[str, int]:
    return engine.workers[0].worker.engine.stats().remote


def test_blocks_one_engine_stored_are_discovered_and_loaded_by_another(make_engine, make_prompt, store):
    tokens = make_prompt(41, 10 * BLOCK + 5)
    a = make_engine(remote_extra(store))
    a.add("x", tokens, max_tokens=2)
    a.run()  # runs until the connector is quiet: the copies down to the store are over
    assert remote_stats(a)["puts_stored"] == 10
    a.assert_clean()

    b = make_engine(remote_extra(store))
    request = b.add("x", tokens, max_tokens=2)
    out = b.step()
    assert "x" not in out.num_scheduled_tokens and request.status == RequestStatus.WAITING  # the store is asked
    b.run()  # the harness checks every block x reads
    assert b.outputs["x"] == a.outputs["x"]
    totals = b.totals()
    assert totals["hit_tokens_remote"] == 10 * BLOCK and totals.get("load_failed_blocks", 0) == 0
    assert totals["remote_to_cpu_bytes"] == 10 * b.flexkv.settings.block_bytes
    assert b.flexkv.discovery.stats["blocks_adopted"] == 10
    b.assert_clean()


def test_two_ranks_each_share_their_slice_and_a_block_counts_only_with_both(make_engine, make_prompt, store):
    tokens = make_prompt(47, 7 * BLOCK + 2)
    a = make_engine(remote_extra(store), world_size=2)
    x = a.add("x", tokens, max_tokens=2)
    a.run()
    b = make_engine(remote_extra(store), world_size=2)
    b.add("x", tokens, max_tokens=2)
    b.run()  # both ranks' blocks checked
    assert b.outputs["x"] == a.outputs["x"]
    assert b.totals()["hit_tokens_remote"] == 7 * BLOCK  # counted once, not per rank

    keys = a.flexkv.keyer.from_block_hashes(x.block_hashes)
    delete_value(store, remote_key(a.flexkv.settings.rank_namespace(1), keys[3]))
    c = make_engine(remote_extra(store), world_size=2)
    c.add("x", tokens, max_tokens=2)
    c.run()
    assert c.totals()["hit_tokens_remote"] == 3 * BLOCK  # the blocks before the one rank 1 lacks


def test_a_request_vllm_or_the_cpu_tier_serves_does_not_wait_for_the_store(make_engine, make_prompt, store):
    engine = make_engine(remote_extra(store))
    tokens = make_prompt(42, 6 * BLOCK + 1)
    engine.add("a", tokens, max_tokens=2)
    engine.run()
    asks = engine.flexkv.discovery.stats["asks"]
    assert engine.scheduler.reset_prefix_cache()
    engine.add("b", tokens, max_tokens=2)
    assert "b" not in engine.step().num_scheduled_tokens  # waits for its load from the CPU tier, not the store
    engine.run()
    assert engine.flexkv.discovery.stats["asks"] == asks
    assert engine.totals()["hit_tokens_cpu"] == 6 * BLOCK
    engine.assert_clean()


def test_a_store_killed_mid_run_costs_misses_within_the_timeout_and_hits_resume_after_a_restart(make_engine, make_prompt, store):
    engine = make_engine(remote_extra(store, cpu_blocks=8))
    served = make_prompt(43, 8 * BLOCK + 3)
    a = engine.add("a", served, max_tokens=2)
    engine.run()
    engine.add("filler", make_prompt(45, 8 * BLOCK + 3), max_tokens=2)
    engine.run()
    keys = engine.flexkv.keyer.from_block_hashes(a.block_hashes)
    assert engine.flexkv.manager.lookup(keys).per_tier == {CPU: 0, REMOTE: 8}  # pushed out of the CPU tier
    store.kill()
    assert engine.scheduler.reset_prefix_cache()

    slowest = 0.0
    engine.add("a again", served, max_tokens=2)  # its first blocks are only in the store now
    engine.add("new", make_prompt(44, 9 * BLOCK + 7), max_tokens=2)  # discovery asks the dead store
    for _ in range(3000):
        if not engine.scheduler.has_requests():
            break
        started = time.monotonic()
        engine.step()  # the harness checks that what each request reads is right: loaded or recomputed
        slowest = max(slowest, time.monotonic() - started)
    assert slowest < TIMEOUT_S + SLACK_S
    assert engine.outputs["a again"] == engine.outputs["a"] and len(engine.outputs["new"]) == 2
    totals, stats = engine.totals(), remote_stats(engine)
    assert totals["load_failed_blocks"] > 0 and "hit_tokens_remote" not in totals
    assert stats["gets_hit"] == 0 and stats["breaker_open"] == 1
    engine.assert_clean()

    store.start()  # empty, on the same ports; another engine fills it
    other = make_engine(remote_extra(store))
    deadline = time.monotonic() + 30
    for attempt in itertools.count():
        tokens = make_prompt(60 + attempt, 4 * BLOCK + 1)
        other.add("r", tokens, max_tokens=2)
        other.run()
        time.sleep(0.3)  # the breakers' cooldown: the next call of each side of the engine probes the store
        engine.add(f"r{attempt}", tokens, max_tokens=2)
        engine.run()
        if "hit_tokens_remote" in engine.totals() or time.monotonic() > deadline:
            break
    assert engine.totals()["hit_tokens_remote"] == 4 * BLOCK and remote_stats(engine)["breaker_open"] == 0
    engine.assert_clean()


def test_real_engines_in_two_processes_share_a_prompt_through_the_store(run_engine, make_prompt, store, tmp_path):
    """Engine A (real vLLM, CPU) serves X and exits; engine B, a new process with empty CPU and SSD tiers,
    serves X from the store, with the same greedy tokens and logprobs (which follow every KV block read)."""
    tokens = make_prompt(46, 48 * BLOCK + 7)

    def job(name: str) -> dict:
        extra = {**remote_extra(store, cpu_blocks=256), "config": "cpu_ssd", "ssd_dirs": [str(tmp_path / name)],
                 "ssd_blocks": 256, "overrides": ["ssd.fsync=none"]}
        extra["remote"]["timeout_s"] = 5.0  # a busy machine must not turn this test's puts and gets into misses
        return {"connector": extra, "engine_id": f"engine-{name}", "actions": [
            {"do": "generate", "name": "X", "prompts": [tokens]},
            {"do": "flush"},
            {"do": "totals", "name": "end"},
        ]}

    a = run_engine(job("a"))
    b = run_engine(job("b"))
    assert b["outputs"]["X"] == a["outputs"]["X"] and b["logprobs"]["X"] == a["logprobs"]["X"]
    assert "hit_tokens_remote" not in a["totals"]["end"] and a["totals"]["end"]["cpu_to_remote_bytes"] > 0
    end = b["totals"]["end"]
    assert end["hit_tokens_remote"] == 48 * BLOCK
    assert end.get("load_failed_blocks", 0) == 0 and "hit_tokens_cpu" not in end and "hit_tokens_ssd" not in end


def test_the_extra_config_picks_a_remote_preset_and_overrides_its_keys():
    cfg = compose_config({"remote": {"name": "mooncake", "timeout_s": 0.25, "capacity_bytes": 1 << 30,
                                     "mooncake": {"protocol": "rdma"}}, "remote_address": "10.0.0.1:50051"})
    remote = cfg["remote"]
    assert remote["backend"] == "mooncake" and remote["timeout_s"] == 0.25 and remote["capacity_bytes"] == 1 << 30
    assert "capacity_blocks" not in remote
    assert remote["mooncake"] == {"master": "10.0.0.1:50051", "local_hostname": "127.0.0.1", "protocol": "rdma",
                                  "device": ""}
    assert compose_config({"overrides": ["remote=redis"]})["remote"]["redis"] == {"url": "redis://127.0.0.1:6379/0"}
    assert compose_config({}).get("remote") is None


@pytest.mark.parametrize("extra, message", [
    ({"remote": "memcached"}, r"remote must be one of \['mooncake', 'redis'\]"),
    ({"remote": {"timeout_s": 1.0}}, "with such a 'name'"),
    ({"remote_address": "redis://127.0.0.1:6379/0"}, "remote_address needs a remote tier"),
    ({"remote": {"name": "redis", "timeout_s": -1}}, "remote.timeout_s must be a positive number"),
    ({"remote": {"name": "redis", "redis": {"host": "x"}}}, r"unknown remote.redis options \['host'\]"),
])
def test_bad_remote_settings_fail_at_start(make_engine, extra, message):
    with pytest.raises(ValueError, match=message):
        make_engine(extra)
