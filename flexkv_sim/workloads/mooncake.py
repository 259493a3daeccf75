"""Loader for the Mooncake trace format (JSON lines of timestamp, lengths and hash_ids).

A bad trace would silently skew every hit ratio measured on it, so each line is
checked, including the chained-prefix rule, and the first bad line is reported by
file and line number.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from flexkv_sim.workloads.request import PrefixChainChecker, Request, Workload

_FIELDS = ("timestamp", "input_length", "output_length", "hash_ids")


class TraceFormatError(ValueError):
    """A trace line that does not follow the format; names the file and 1-based line."""

    def __init__(self, path: Path, line_number: int, problem: str) -> None:
        super().__init__(f"{path}, line {line_number}: {problem}")
        self.path = path
        self.line_number = line_number
        self.problem = problem


def _is_int(value: object) -> bool:
    return type(value) is int  # bool is an int subclass but never a valid length


def _parse_record(line: str) -> tuple[int | float, int, int, list[int]]:
    """(timestamp_ms, input_length, output_length, hash_ids), or ValueError saying what is wrong."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"bad JSON: {error}") from None
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    missing = [name for name in _FIELDS if name not in record]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)}")
    timestamp, input_length, output_length, hash_ids = (record[name] for name in _FIELDS)
    if not (_is_int(timestamp) or type(timestamp) is float) or not math.isfinite(timestamp):
        raise ValueError(f"timestamp must be a finite number of ms, got {timestamp!r}")
    if timestamp < 0:
        raise ValueError(f"timestamp must be >= 0, got {timestamp}")
    for name, length, least in (("input_length", input_length, 1), ("output_length", output_length, 0)):
        if not _is_int(length):
            raise ValueError(f"{name} must be an integer, got {length!r}")
        if length < least:
            raise ValueError(f"{name} must be >= {least}, got {length}")
    if type(hash_ids) is not list or not all(map(_is_int, hash_ids)):
        raise ValueError("hash_ids must be a list of integers")
    if hash_ids and (min(hash_ids) < 0 or max(hash_ids) >= 1 << 64):  # block keys are 64-bit: more would collide
        raise ValueError(f"hash_ids must be in [0, 2**64), got {min(hash_ids)} .. {max(hash_ids)}")
    return timestamp, input_length, output_length, hash_ids


def load_mooncake_trace(
    path: str | os.PathLike[str],
    *,
    tokens_per_block: int = 512,
    limit: int | None = None,
    time_scale: float = 1.0,
) -> Workload:
    """Load a Mooncake-format trace; ``limit`` keeps the first N requests.

    ``arrival_s = timestamp_ms / 1000 * time_scale``: 0.5 replays twice as fast.
    Raises FileNotFoundError for a missing file and TraceFormatError for a bad line.
    """
    if type(tokens_per_block) is not int or tokens_per_block <= 0:
        raise ValueError(f"tokens_per_block must be a whole number >= 1, got {tokens_per_block!r}")
    if limit is not None and (type(limit) is not int or limit < 0):
        raise ValueError(f"limit must be a whole number >= 0 or None, got {limit!r}")
    if not (time_scale > 0 and math.isfinite(time_scale)):
        raise ValueError(f"time_scale must be a positive finite number, got {time_scale}")
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"Mooncake trace {path} is a directory: pass the .jsonl file in it")
    if not path.is_file():
        raise FileNotFoundError(f"Mooncake trace not found: {path} (resolved: {path.resolve()})")
    chain = PrefixChainChecker()
    requests: list[Request] = []
    previous_ms: int | float = 0
    with path.open("rb") as lines:
        for line_number, raw in enumerate(lines, start=1):
            if limit is not None and len(requests) >= limit:
                break
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise TraceFormatError(path, line_number, f"not UTF-8 text ({error.reason} at byte {error.start}); "
                                       "a compressed trace must be decompressed first") from None
            if not line.strip():
                continue
            try:
                timestamp, input_length, output_length, hash_ids = _parse_record(line)
                if timestamp < previous_ms:
                    raise ValueError(f"timestamp {timestamp} goes back from {previous_ms}")
                request = Request(
                    request_id=len(requests),
                    arrival_s=timestamp / 1000.0 * time_scale,
                    input_length=input_length,
                    output_length=output_length,
                    block_ids=tuple(hash_ids),
                    tokens_per_block=tokens_per_block,
                    kind="mooncake",
                )
                problem = chain.violation(hash_ids)
                if problem:
                    raise ValueError(f"hash_ids break the chained-prefix rule: {problem}")
            except ValueError as error:
                raise TraceFormatError(path, line_number, str(error)) from None
            previous_ms = timestamp
            requests.append(request)
    if not requests and limit != 0:
        raise ValueError(f"Mooncake trace {path} holds no requests")
    return Workload(name=f"mooncake:{path.stem}", tokens_per_block=tokens_per_block, requests=requests)
