"""Our control plane vs libCacheSim on the real Mooncake conversation trace.

The block stream of the trace (one reference per block, in request order) goes
through libCacheSim's policies and, request by request, through our replay
(lookup, load the ready prefix, store the rest) in ``demand_paging`` mode:
block-by-block stores, no protection of the prefix being extended. Both are
then demand paging with forced insertion, so lru, fifo, belady, s3fifo and sieve must agree
exactly; arc within 0.5 percentage points (see CLOSE).
"""
from pathlib import Path

import pytest

lcs = pytest.importorskip("libcachesim", reason="libcachesim is a test dependency (make test installs it)")

from flexkv_sim.replay import replay, workload_keys  # noqa: E402
from flexkv_sim.workloads.mooncake import load_mooncake_trace  # noqa: E402

TRACE = Path(__file__).resolve().parents[2].parent / "shared" / "traces" / "mooncake_conversation_trace.jsonl"
FRACTIONS = (0.01, 0.05, 0.10)
EXACT = {"lru": "LRU", "fifo": "FIFO", "belady": "Belady", "s3fifo": "S3FIFO", "sieve": "Sieve"}
# ARC adapts its target on the miss before choosing a victim; our interface tells the
# policy of the new block only after the victim is chosen (on_insert), so the
# adaptation lands one miss late: within 0.5 points, not exact.
CLOSE = {"arc": "ARC"}


@pytest.fixture(scope="module")
def trace():
    if not TRACE.exists():
        pytest.skip(f"the shared Mooncake trace is not at {TRACE} (../shared beside the project)")
    workload = load_mooncake_trace(TRACE)
    return workload, workload_keys(workload)


def libcachesim_hit_ratio(policy: str, stream: list[int], capacity: int) -> float:
    cache = getattr(lcs, policy)(cache_size=capacity)
    next_use = [0] * len(stream)
    if policy == "Belady":
        last_seen: dict[int, int] = {}
        for i in range(len(stream) - 1, -1, -1):
            next_use[i] = last_seen.get(stream[i], 1 << 62)
            last_seen[stream[i]] = i
    req = lcs.Request()
    hits = 0
    for i, key in enumerate(stream):
        req.obj_id, req.obj_size, req.clock_time = key, 1, i
        if policy == "Belady":
            req.next_access_vtime = next_use[i]
        hits += bool(cache.get(req))
    return hits / len(stream)


def ours_hit_ratio(workload, keys, policy: str, capacity: int) -> float:
    return replay(workload, keys=keys, capacity_blocks=capacity, eviction=policy, demand_paging=True).block_hit_ratio


@pytest.mark.parametrize("fraction", FRACTIONS)
@pytest.mark.parametrize("policy", [*EXACT, *CLOSE])
def test_hit_ratio_matches_libcachesim(trace, policy, fraction):
    workload, keys = trace
    stream = [h for r in workload.requests for h in r.block_ids]
    capacity = round(workload.num_unique_blocks() * fraction)
    theirs = libcachesim_hit_ratio({**EXACT, **CLOSE}[policy], stream, capacity)
    ours = ours_hit_ratio(workload, keys, policy, capacity)
    if policy in EXACT:
        assert ours == pytest.approx(theirs, abs=1e-9), (policy, fraction, ours, theirs)
    else:
        assert abs(ours - theirs) <= 0.005, (policy, fraction, ours, theirs)


def test_reference_figures_at_five_percent(trace):
    """The figures the project quotes: belady .366 and lru .195 at 9,139 blocks."""
    workload, keys = trace
    assert round(ours_hit_ratio(workload, keys, "belady", 9139), 3) == 0.366
    assert round(ours_hit_ratio(workload, keys, "lru", 9139), 3) == 0.195
