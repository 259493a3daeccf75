"""The connector inside real vLLM (CPU build, a tiny Llama with dummy weights, greedy decoding).

Each engine runs in a process of its own (``engine_job.py``); the outputs of a
run without the connector are the reference every other run must reproduce
token for token, and their logprobs to within what vLLM's own compute paths
move them by (``LOGPROB_ATOL``). Every run with the connector runs twice: loaded by module
path, and through vLLM's in-tree ``FlexKVConnectorV1`` name with its settings
in a ``FLEXKV_CONFIG_PATH`` file.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from flexkv_runtime.data.ssd_store import ALIGN, SsdStore

BLOCK = 32


CORRUPT_BLOCK = 3
#: On an AVX2-only CPU vLLM's logprobs move by up to 0.013 between its own compute paths, before any block
#: is offloaded: a prefix-cache hit against a full prefill, another chunk size, an engine with a KV connector
#: against one without (on the machines of earlier sessions they matched to the last bit). The greedy
#: tokens, which follow every block read (the model is sharpened for that), are still compared exactly.
LOGPROB_ATOL = 0.03
IN_TREE_CLASS = "vllm.distributed.kv_transfer.kv_connector.v1.flexkv_connector.FlexKVConnectorV1"


@pytest.fixture(scope="module", params=["module_path", "in_tree"])
def loading(request):
    """How vLLM finds the connector (see engine_job.py); module-scoped, so each way reuses its SSD engines."""
    return request.param


def connector_run(run_engine, loading, job):
    """An engine job with the connector loaded ``loading``'s way, checked to be the class vLLM runs."""
    result = run_engine({**job, "loading": loading})
    in_tree = result["connector_class"] == IN_TREE_CLASS
    assert in_tree == (loading == "in_tree"), result["connector_class"]
    return result


@pytest.fixture(scope="module")
def p(make_prompt):
    """The prompts: A (64 full blocks), B (24 and a bit) and a batch sharing a 16-block system prompt."""
    system = make_prompt(23, 16 * BLOCK)
    return SimpleNamespace(A=make_prompt(21, 64 * BLOCK), B=make_prompt(22, 24 * BLOCK + 10),
                           batch=[system + make_prompt(30 + i, 8 * BLOCK + 5 * i) for i in range(8)])


def ssd_config(directory, cpu_blocks=24):
    return {"config": "cpu_ssd", "cpu_blocks": cpu_blocks, "ssd_dirs": [str(directory)], "ssd_blocks": 256,
            "overrides": ["ssd.fsync=none"]}


@pytest.fixture(scope="module")
def reference(run_engine, p):
    """Outputs without the connector: what every run with it must reproduce."""
    return run_engine({"connector": None, "actions": [
        {"do": "generate", "name": "A", "prompts": [p.A]},
        {"do": "generate", "name": "B", "prompts": [p.B]},
        {"do": "generate", "name": "batch", "prompts": p.batch, "max_tokens": 48},
    ]})


@pytest.fixture(scope="module")
def ssd_runs(run_engine, loading, tmp_path_factory, p):
    """One engine fills the SSD tier and serves A back from it; a second one, started on the same
    directory after the first exited and after one of B's blocks was corrupted, serves A and B."""
    directory = tmp_path_factory.mktemp("ssd")
    job = {"connector": ssd_config(directory), "engine_id": "restart-test", "max_num_batched_tokens": 128}
    first = connector_run(run_engine, loading, {**job, "actions": [
        {"do": "generate", "name": "A", "prompts": [p.A]},
        {"do": "flush"},
        {"do": "generate", "name": "B", "prompts": [p.B]},
        {"do": "flush"},
        {"do": "reset"},
        {"do": "totals", "name": "before"},
        {"do": "generate", "name": "A again", "prompts": [p.A]},
        {"do": "totals", "name": "after"},
    ]})
    corrupt_block(directory, chain=1, depth=CORRUPT_BLOCK)
    second = connector_run(run_engine, loading, {**job, "actions": [
        {"do": "generate", "name": "A", "prompts": [p.A]},
        {"do": "totals", "name": "A"},
        {"do": "generate", "name": "B", "prompts": [p.B]},
        {"do": "totals", "name": "B"},
    ]})
    return first, second


def corrupt_block(directory: Path, chain: int, depth: int) -> None:
    """Overwrite data of the block at ``depth`` of the ``chain``-th prompt written to the SSD tier."""
    [store_dir] = Path(directory).glob("*/flexkv-*")
    geometry = json.loads((store_dir / "geometry.json").read_text())
    store = SsdStore([store_dir.parent], geometry["namespace"], geometry["num_slots"], geometry["block_bytes"],
                     files_per_dir=geometry["num_files"] // geometry["num_dirs"], fsync="none", preallocate=False)
    try:
        parents = {key: (parent, slot) for key, parent, slot in store.recovered}
        roots = sorted((slot, key) for key, (parent, slot) in parents.items() if parent not in parents)
        children = {parent: key for key, (parent, _) in parents.items()}
        key = roots[chain][1]
        for _ in range(depth):
            key = children[key]
        path, offset = store.location(parents[key][1])
    finally:
        store.close()
    with open(path, "r+b") as f:
        f.seek(offset + ALIGN + 64)
        f.write(b"\x5a" * 512)


def assert_logprobs_match(got: list[list[float]], want: list[list[float]]) -> None:
    """Per prompt, per generated token: the same count, and values within ``LOGPROB_ATOL``."""
    assert [len(row) for row in got] == [len(row) for row in want]
    worst = max(abs(g - w) for got_row, want_row in zip(got, want) for g, w in zip(got_row, want_row))
    assert worst <= LOGPROB_ATOL, f"logprobs differ by up to {worst:.4f}"


def gained(totals: dict, before: dict, name: str) -> float:
    return totals.get(name, 0) - before.get(name, 0)


def test_cpu_tier_serves_a_repeated_prompt(run_engine, loading, reference, p):
    run = connector_run(run_engine, loading, {"connector": {"cpu_bytes": 64 << 20}, "actions": [
        {"do": "generate", "name": "A", "prompts": [p.A]},
        {"do": "flush"},
        {"do": "reset"},
        {"do": "generate", "name": "A again", "prompts": [p.A]},
        {"do": "totals", "name": "end"},
    ]})
    assert run["outputs"]["A"] == run["outputs"]["A again"] == reference["outputs"]["A"]
    assert_logprobs_match(run["logprobs"]["A again"], reference["logprobs"]["A"])
    assert run["totals"]["end"]["hit_tokens_cpu"] >= 0.9 * len(p.A)


def test_ssd_tier_serves_a_prompt_the_cpu_tier_cannot_hold(ssd_runs, reference, p):
    first, _ = ssd_runs
    assert first["outputs"]["A again"] == reference["outputs"]["A"]
    assert_logprobs_match(first["logprobs"]["A again"], reference["logprobs"]["A"])
    before, after = first["totals"]["before"], first["totals"]["after"]
    assert gained(after, before, "hit_tokens_ssd") >= 0.9 * len(p.A)


def test_ssd_tier_survives_a_restart(ssd_runs, reference, p):
    _, second = ssd_runs
    assert second["outputs"]["A"] == reference["outputs"]["A"]
    assert_logprobs_match(second["logprobs"]["A"], reference["logprobs"]["A"])
    assert second["totals"]["A"]["hit_tokens_ssd"] >= 0.9 * len(p.A)


def test_corrupt_ssd_block_is_recomputed(ssd_runs, reference, p):
    _, second = ssd_runs
    assert second["outputs"]["B"] == reference["outputs"]["B"]
    assert_logprobs_match(second["logprobs"]["B"], reference["logprobs"]["B"])
    before, after = second["totals"]["A"], second["totals"]["B"]
    assert gained(after, before, "load_failed_blocks") == len(p.B) // BLOCK - CORRUPT_BLOCK
    assert gained(after, before, "hit_tokens_ssd") + gained(after, before, "hit_tokens_cpu") == CORRUPT_BLOCK * BLOCK


def test_preemption_with_the_connector_changes_no_output(run_engine, loading, reference, p):
    run = connector_run(run_engine, loading, {
        "connector": {"cpu_bytes": 64 << 20}, "kv_cache_bytes": 80 * 32 * 1024, "max_model_len": 2048,
        "actions": [{"do": "generate", "name": "batch", "prompts": p.batch, "max_tokens": 48},
                    {"do": "totals", "name": "end"}]})
    assert run["outputs"]["batch"] == reference["outputs"]["batch"]
    assert_logprobs_match(run["logprobs"]["batch"], reference["logprobs"]["batch"])
    assert run["totals"]["end"]["preemptions"] > 0
