"""The Mooncake loader: the real trace's figures, and a located error for each bad line."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from flexkv_sim.workloads import TraceFormatError, find_chain_violation, load_mooncake_trace

REAL_TRACE = Path(__file__).resolve().parents[2].parent / "shared" / "traces" / "mooncake_conversation_trace.jsonl"


@pytest.fixture(scope="module")
def real_trace() -> Path:
    if not REAL_TRACE.is_file():
        pytest.skip(f"real Mooncake trace not present at {REAL_TRACE} (it lives outside the project)")
    return REAL_TRACE


def test_real_trace_figures(real_trace: Path) -> None:
    start = time.perf_counter()
    workload = load_mooncake_trace(real_trace)
    elapsed = time.perf_counter() - start
    assert len(workload) == 12_031
    assert workload.num_block_refs() == 288_500
    assert workload.num_unique_blocks() == 182_790
    assert workload.infinite_cache_hit_ratio() == pytest.approx(0.366, abs=1e-3)
    assert workload.duration_s == pytest.approx(3536.999)
    assert find_chain_violation(workload) is None
    assert elapsed < 5.0, f"loading took {elapsed:.2f} s (about 0.15 s expected)"


def test_real_trace_limit_and_time_scale(real_trace: Path) -> None:
    full = load_mooncake_trace(real_trace, limit=500)
    fast = load_mooncake_trace(real_trace, limit=500, time_scale=0.5)
    assert len(full) == len(fast) == 500
    assert [r.block_ids for r in full] == [r.block_ids for r in fast]
    assert fast.duration_s == pytest.approx(full.duration_s / 2)


def _line(timestamp: object = 1000, input_length: object = 600, output_length: object = 10,
          hash_ids: object = (0, 1)) -> str:
    return json.dumps({"timestamp": timestamp, "input_length": input_length, "output_length": output_length,
                       "hash_ids": list(hash_ids) if isinstance(hash_ids, tuple) else hash_ids})


def test_small_trace_skips_empty_lines(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    trace.write_text("\n".join([_line(0), "", _line(1500, 100, 5, (0,)), "   ", ""]) + "\n")
    workload = load_mooncake_trace(trace)
    assert [r.arrival_s for r in workload] == [0.0, 1.5]
    assert [r.request_id for r in workload] == [0, 1]
    assert workload.requests[1].block_ids == (0,)
    assert workload.requests[0].full_blocks == 1  # 600 tokens = one full 512-token block + a partial one
    assert workload.name == "mooncake:t"


@pytest.mark.parametrize(
    ("bad_line", "problem"),
    [
        ("{not json", "bad JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"timestamp": 5, "input_length": 600, "output_length": 1}), "missing field(s) hash_ids"),
        (_line(timestamp="5"), "timestamp must be a finite number"),
        (_line(timestamp=float("nan")), "timestamp must be a finite number"),
        (_line(input_length=600.0), "input_length must be an integer"),
        (_line(output_length=True), "output_length must be an integer"),
        (_line(hash_ids=[0, "1"]), "hash_ids must be a list of integers"),
        (_line(hash_ids={"0": 1}), "hash_ids must be a list of integers"),
        (_line(input_length=-3, hash_ids=()), "input_length must be >= 1"),
        (_line(output_length=-1), "output_length must be >= 0"),
        (_line(hash_ids=(0, 1, 2)), "3 block ids for 600 tokens"),
        (_line(timestamp=999), "timestamp 999 goes back from 1000"),
        (_line(hash_ids=(7, 1)), "chained-prefix rule: block id 1 at position 1 follows 7"),
        (_line(hash_ids=(0, 2**64)), "hash_ids must be in [0, 2**64), got 0 .. 18446744073709551616"),
        (_line(hash_ids=(-1, 0)), "hash_ids must be in [0, 2**64)"),
        ("\udcff\udc8b", "not UTF-8 text (invalid start byte at byte 0); a compressed trace must be decompressed"),
    ],
)
def test_bad_line_is_reported_with_file_and_line(tmp_path: Path, bad_line: str, problem: str) -> None:
    trace = tmp_path / "bad.jsonl"
    trace.write_bytes(("\n".join([_line(0), "", _line(1000), bad_line, _line(2000)]) + "\n").encode(
        "utf-8", "surrogateescape"))  # a surrogate escape stands for a byte that is not UTF-8
    with pytest.raises(TraceFormatError) as caught:
        load_mooncake_trace(trace)
    error = caught.value
    assert isinstance(error, ValueError)
    assert error.line_number == 4
    assert f"{trace}, line 4: " in str(error)
    assert problem in str(error)


def test_limit_stops_before_a_later_bad_line(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    trace.write_text("\n".join([_line(), "{broken"]) + "\n")
    assert len(load_mooncake_trace(trace, limit=1)) == 1


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_mooncake_trace(missing)
    with pytest.raises(IsADirectoryError, match="is a directory: pass the .jsonl file in it"):
        load_mooncake_trace(tmp_path)


def test_a_trace_with_no_requests_is_an_error(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    trace.write_text("\n  \n")
    with pytest.raises(ValueError, match="holds no requests"):
        load_mooncake_trace(trace)


@pytest.mark.parametrize("kwargs, message", [
    ({"tokens_per_block": 0}, "tokens_per_block must be a whole number >= 1"),
    ({"tokens_per_block": "512"}, "tokens_per_block must be a whole number >= 1, got '512'"),
    ({"limit": -1}, "limit must be a whole number >= 0"),
    ({"limit": 2.5}, "limit must be a whole number >= 0 or None, got 2.5"),
    ({"time_scale": 0.0}, "time_scale must be a positive finite number"),
    ({"time_scale": float("inf")}, "time_scale must be a positive finite number, got inf"),
])
def test_bad_arguments(tmp_path: Path, kwargs: dict[str, float], message: str) -> None:
    trace = tmp_path / "t.jsonl"
    trace.write_text(_line() + "\n")
    with pytest.raises(ValueError, match=message):
        load_mooncake_trace(trace, **kwargs)
