"""Synthetic generators: determinism, chained ids, and the reuse pattern each one promises."""
from __future__ import annotations

import math
from collections import Counter, defaultdict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flexkv_sim.workloads import (
    GENERATORS,
    ChainedBlockIds,
    ChatSpec,
    DocQASpec,
    GeneratorSettings,
    MixedSpec,
    SystemPromptSpec,
    Workload,
    WorkloadSpec,
    arrival_times,
    find_chain_violation,
    generate,
)

SMALL_SPECS: dict[str, WorkloadSpec] = {
    "chat": ChatSpec(num_sessions=40, session_rate=1.0, think_time_s=5.0),
    "system_prompt": SystemPromptSpec(num_requests=300, rate=5.0),
    "doc_qa": DocQASpec(num_requests=300, rate=5.0, num_documents=50),
    "mixed": MixedSpec(ChatSpec(num_sessions=20), SystemPromptSpec(num_requests=150), DocQASpec(num_requests=150)),
}


@pytest.fixture(scope="module", params=[(name, arrivals) for name in SMALL_SPECS for arrivals in ("poisson", "bursty")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def small_workload(request: pytest.FixtureRequest) -> Workload:
    name, arrivals = request.param
    return generate(SMALL_SPECS[name], GeneratorSettings(tokens_per_block=64, arrivals=arrivals, seed=7))


def test_every_generator_has_a_small_spec() -> None:
    assert set(SMALL_SPECS) == set(GENERATORS)


def test_requests_are_numbered_in_arrival_order(small_workload: Workload) -> None:
    assert [r.request_id for r in small_workload] == list(range(len(small_workload)))
    arrivals = [r.arrival_s for r in small_workload]
    assert arrivals == sorted(arrivals) and arrivals[0] == 0.0


def test_block_ids_are_chained_prefix_consistent(small_workload: Workload) -> None:
    assert find_chain_violation(small_workload) is None


def test_partial_last_blocks_are_never_shared(small_workload: Workload) -> None:
    uses = Counter(b for r in small_workload for b in r.block_ids)
    partial_last = [r.block_ids[-1] for r in small_workload if r.input_length % r.tokens_per_block]
    assert partial_last and all(uses[b] == 1 for b in partial_last)


def test_kinds_and_sessions(small_workload: Workload) -> None:
    for request in small_workload:
        assert request.kind in GENERATORS
        assert (request.session_id is not None) == (request.kind == "chat")


@pytest.mark.parametrize("name", sorted(SMALL_SPECS))
def test_same_seed_same_workload_other_seed_differs(name: str) -> None:
    spec = SMALL_SPECS[name]
    first = generate(spec, GeneratorSettings(seed=3))
    assert generate(spec, GeneratorSettings(seed=3)) == first
    assert generate(spec, GeneratorSettings(seed=4)) != first


def test_mixed_parts_keep_their_streams() -> None:
    """Changing one part of the mix leaves another part's arrivals and lengths alone."""
    def chat_shape(mixed: MixedSpec) -> list[tuple[float, int, int]]:
        return [(r.arrival_s, r.input_length, r.output_length) for r in generate(mixed) if r.kind == "chat"]

    base = SMALL_SPECS["mixed"]
    assert isinstance(base, MixedSpec)
    assert chat_shape(base) == chat_shape(MixedSpec(base.chat, base.system_prompt, DocQASpec(num_requests=10)))


def test_chat_turn_extends_previous_prompt_and_answer() -> None:
    workload = generate(ChatSpec(num_sessions=60, mean_turns=5.0), GeneratorSettings(tokens_per_block=32, seed=1))
    sessions: dict[int, list] = defaultdict(list)
    for request in workload:
        assert request.session_id is not None
        sessions[request.session_id].append(request)
    assert max(len(turns) for turns in sessions.values()) >= 5
    for turns in sessions.values():
        for previous, turn in zip(turns, turns[1:]):
            assert turn.arrival_s >= previous.arrival_s
            assert turn.input_length > previous.input_length + previous.output_length
            reused = (previous.input_length + previous.output_length) // turn.tokens_per_block
            assert turn.block_ids[:previous.full_blocks] == previous.block_ids[:previous.full_blocks]
            shared = len(set(turn.block_ids) & set(previous.block_ids))
            assert shared == previous.full_blocks <= reused


def test_chat_context_cap_ends_sessions() -> None:
    workload = generate(ChatSpec(num_sessions=30, mean_turns=20.0, max_context_tokens=2000))
    assert max(r.input_length for r in workload) <= 2000


def test_system_prompt_requests_share_few_prefixes() -> None:
    spec = SystemPromptSpec(num_requests=400, num_system_prompts=3, system_prompt_tokens_mean=3000)
    workload = generate(spec, GeneratorSettings(tokens_per_block=256))
    assert len({r.block_ids[0] for r in workload}) == 3
    assert workload.infinite_cache_hit_ratio() > 0.5


def _first_block_counts_by_rank(zipf_a: float, num_documents: int = 100, num_requests: int = 3000) -> np.ndarray:
    spec = DocQASpec(num_requests=num_requests, num_documents=num_documents, zipf_a=zipf_a)
    workload = generate(spec, GeneratorSettings(tokens_per_block=256, seed=5))
    return np.array(sorted(Counter(r.block_ids[0] for r in workload).values(), reverse=True))


def test_doc_qa_zipf_popularity() -> None:
    """Rank-frequency falls like rank ** -zipf_a; zipf_a = 0 is flat."""
    zipf_a, num_documents, num_requests = 1.2, 100, 3000
    counts = _first_block_counts_by_rank(zipf_a, num_documents, num_requests)
    top_share = 1.0 / np.sum(np.arange(1, num_documents + 1, dtype=float) ** -zipf_a)
    assert counts[0] / num_requests == pytest.approx(top_share, rel=0.15)
    ranks = np.arange(1, 21)
    slope = np.polyfit(np.log(ranks), np.log(counts[:20]), 1)[0]
    assert slope == pytest.approx(-zipf_a, abs=0.3)
    flat = _first_block_counts_by_rank(0.0, num_documents, num_requests)
    assert flat[0] < 2.5 * num_requests / num_documents < counts[0]


def test_doc_qa_documents_are_long() -> None:
    workload = generate(DocQASpec(num_requests=300))
    lengths = sorted(r.input_length for r in workload)
    assert 2000 < lengths[len(lengths) // 10] and lengths[-1] > 15_000


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rate=st.floats(0.05, 200.0))
def test_poisson_arrivals_match_rate(seed: int, rate: float) -> None:
    times = arrival_times(np.random.default_rng(seed), 3000, rate, "poisson")
    gaps = np.diff(times)
    assert times[0] == 0.0 and np.all(gaps >= 0)
    assert (len(gaps) / times[-1]) / rate == pytest.approx(1.0, abs=0.12)  # ~5.5 sigma
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.2)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rate=st.floats(0.05, 200.0), burst_cv=st.floats(2.0, 4.0))
def test_bursty_arrivals_match_rate_and_are_bursty(seed: int, rate: float, burst_cv: float) -> None:
    times = arrival_times(np.random.default_rng(seed), 3000, rate, "bursty", burst_cv)
    gaps = np.diff(times)
    assert (len(gaps) / times[-1]) / rate == pytest.approx(1.0, abs=0.4)  # CV/sqrt(n) <= 7.3 %
    assert gaps.std() / gaps.mean() > 1.5


def test_unknown_arrival_process() -> None:
    with pytest.raises(ValueError, match="poisson"):
        arrival_times(np.random.default_rng(0), 10, 1.0, "uniform")


@pytest.mark.parametrize("arrivals", ["poisson", "bursty"])
def test_generated_rate_matches_config(arrivals: str) -> None:
    workload = generate(SystemPromptSpec(num_requests=2000, rate=4.0), GeneratorSettings(arrivals=arrivals))
    assert (len(workload) - 1) / workload.duration_s == pytest.approx(4.0, rel=0.4)


@settings(max_examples=200, deadline=None)
@given(
    tokens_per_block=st.integers(1, 12),
    segment_lengths=st.lists(st.integers(1, 30), min_size=1, max_size=5),
    prompts=st.lists(st.lists(st.integers(0, 4), min_size=1, max_size=5), min_size=1, max_size=8),
)
def test_chained_ids_match_token_prefixes(tokens_per_block: int, segment_lengths: list[int],
                                          prompts: list[list[int]]) -> None:
    """Full blocks share an id exactly when the token prefixes up to them are equal."""
    blocks = ChainedBlockIds(tokens_per_block)
    segments = [blocks.new_segment(n) for n in segment_lengths]
    prefix_of_id: dict[int, tuple] = {}
    id_of_prefix: dict[tuple, int] = {}
    partial_ids: list[int] = []
    for picks in prompts:
        prompt = [segments[pick % len(segments)] for pick in picks]
        tokens = [(segment_id, offset) for segment_id, length in prompt for offset in range(length)]
        ids = blocks.block_ids(prompt)
        assert len(ids) == math.ceil(len(tokens) / tokens_per_block)
        full = len(tokens) // tokens_per_block
        for position, block_id in enumerate(ids[:full]):
            prefix = tuple(tokens[: (position + 1) * tokens_per_block])
            assert prefix_of_id.setdefault(block_id, prefix) == prefix
            assert id_of_prefix.setdefault(prefix, block_id) == block_id
        partial_ids.extend(ids[full:])
    assert len(set(partial_ids)) == len(partial_ids)
    assert not set(partial_ids) & set(prefix_of_id)
