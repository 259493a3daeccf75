"""What a model costs: KV bytes per token and the time of one engine step.

A step's time is ``overhead + max(line(T, A, K) for line in lines)``, each line
linear in the step's tokens ``T``, its attention pairs ``A`` (new token x context
token, summed over the batch) and the KV tokens ``K`` it reads. The roofline has
two lines (compute, memory); a measured profile has one, fitted by least squares.
Lines keep decode analytic: with ``B`` sequences decoding, ``A = K`` grows by
``B`` per step, so the time of ``n`` steps is a sum of arithmetic series and the
engine can jump over a run of decode steps in one event (``DecodeRun``).
"""
from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from flexkv_sim.checks import require

if TYPE_CHECKING:
    from flexkv_sim.hardware import GpuSpec

#: (constant, per token, per attention pair, per KV token read), in seconds
Line = tuple[float, float, float, float]


@dataclass(frozen=True)
class ModelSpec:
    """Architecture figures that set KV size and FLOPs.

    ``mla_latent_dim`` (DeepSeek MLA) replaces K and V by one latent per token
    and layer; attention then runs over the latent (``mla_value_dim`` for PV).
    """

    name: str
    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    params: float
    active_params: float | None = None  # MoE: parameters used per token
    weight_bytes_per_param: float = 2.0
    kv_bytes_per_element: float = 2.0
    mla_latent_dim: int | None = None
    mla_value_dim: int | None = None

    def __post_init__(self) -> None:
        require(self, positive=["params", "active_params", "weight_bytes_per_param", "kv_bytes_per_element"],
                whole=["layers", "q_heads", "kv_heads", "head_dim", "mla_latent_dim", "mla_value_dim"])

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> ModelSpec:
        names = {f.name for f in fields(cls)}
        unknown = set(cfg) - names
        if unknown:
            raise ValueError(f"unknown model keys {sorted(unknown)}; valid: {sorted(names)}")
        try:
            return cls(**cfg)
        except ValueError as exc:
            raise ValueError(f"model {cfg.get('name', '')}: {exc}") from None

    @property
    def kv_bytes_per_token(self) -> float:
        if self.mla_latent_dim:
            return self.layers * self.mla_latent_dim * self.kv_bytes_per_element
        return 2 * self.layers * self.kv_heads * self.head_dim * self.kv_bytes_per_element

    def block_bytes(self, tokens_per_block: int) -> int:
        return int(self.kv_bytes_per_token * tokens_per_block)

    @property
    def weight_bytes(self) -> float:
        return self.params * self.weight_bytes_per_param

    @property
    def flops_per_token(self) -> float:
        """Dense FLOPs of one token through the weights (2 per multiply-add)."""
        return 2.0 * (self.active_params or self.params)

    @property
    def flops_per_attention_pair(self) -> float:
        """FLOPs of one query token attending to one context token: QK^T and PV."""
        if self.mla_latent_dim:
            qk, v = self.mla_latent_dim, self.mla_value_dim or self.mla_latent_dim
        else:
            qk = v = self.head_dim
        return 2.0 * self.layers * self.q_heads * (qk + v)


class StepTime:
    """Seconds of one forward pass over a batch: the largest of its lines (``c + t tokens + a attention pairs
    + k KV tokens``) plus a fixed overhead.

    ``decode_lines``, when given, time the steps where every sequence decodes one token (``decode_run``):
    those read weights and KV for few tokens, a regime one line fitted across 1-token and 512-token
    steps got wrong by 15-17% on a measured CPU profile.
    """

    def __init__(self, lines: Sequence[Line], overhead_s: float = 0.0,
                 decode_lines: Sequence[Line] | None = None) -> None:
        if not lines:
            raise ValueError("a step-time model needs at least one line")
        self.lines = tuple(tuple(float(c) for c in line) for line in lines)
        self.decode_lines = tuple(tuple(float(c) for c in line) for line in decode_lines) if decode_lines \
            else self.lines
        self.overhead_s = overhead_s

    def __call__(self, tokens: float, attention_pairs: float, kv_tokens: float) -> float:
        longest = 0.0
        for c, t, a, k in self.lines:
            seconds = c + t * tokens + a * attention_pairs + k * kv_tokens
            if seconds > longest:
                longest = seconds
        return self.overhead_s + longest

    def of_row(self, tokens: float, attention_pairs: float, kv_tokens: float) -> float:
        """The time of a step as a profile row describes it: by the decode lines when it only decodes."""
        if decode_only(attention_pairs, kv_tokens):
            return self.decode_run(int(tokens), int(kv_tokens)).elapsed(1)
        return self(tokens, attention_pairs, kv_tokens)

    def prefill_chunk(self, chunk: int, context: int) -> tuple[int, int, int]:
        """(tokens, attention pairs, KV tokens) of ``chunk`` new tokens after ``context`` cached ones."""
        return chunk, chunk * context + chunk * (chunk + 1) // 2, context + chunk

    def decode_run(self, batch: int, context_sum: int) -> DecodeRun:
        """Steps of ``batch`` sequences decoding together, their contexts summing to ``context_sum``."""
        return DecodeRun(self, batch, context_sum)


class DecodeRun:
    """Cumulative time of consecutive decode steps with a fixed batch, in closed form.

    Step ``k`` (0-based) reads ``context_sum + batch * k`` KV tokens; its time is
    ``overhead + max_i(a_i + b_i k)``. The upper envelope of the lines is split
    into segments, each an arithmetic series.
    """

    def __init__(self, model: StepTime, batch: int, context_sum: int) -> None:
        self.overhead_s = model.overhead_s
        lines = [(c + t * batch + (a + k) * context_sum, (a + k) * batch) for c, t, a, k in model.decode_lines]
        #: (first step, a, b, first step of the next segment or None): the envelope, in order
        self.segments: list[tuple[int, float, float, int | None]] = []
        k = 0
        while k is not None:
            a, b = max(lines, key=lambda line: (line[0] + line[1] * k, line[1]))
            end = None
            for a2, b2 in lines:
                if b2 > b:  # a steeper line overtakes this one at the first k where it is larger
                    cross = max(k + 1, math.floor((a - a2) / (b2 - b)) + 1)
                    end = cross if end is None else min(end, cross)
            self.segments.append((k, a, b, end))
            k = end
        #: steps -> elapsed(steps): the engine asks for the same boundaries many times over (every
        #: transfer ending inside the run, ``steps_by``'s checks)
        self._elapsed: dict[int, float] = {}

    def elapsed(self, steps: int) -> float:
        """Seconds taken by the first ``steps`` steps."""
        total = self._elapsed.get(steps)
        if total is not None:
            return total
        total = steps * self.overhead_s
        for k, a, b, end in self.segments:
            if k >= steps:
                break
            if end is None or end > steps:
                end = steps
            n = end - k
            total += n * a + b * (k + end - 1) * n / 2
        self._elapsed[steps] = total
        return total

    def steps_by(self, seconds: float, limit: int) -> int:
        """Fewest steps (at least 1, at most ``limit``) whose time reaches ``seconds``: the step running then ends.

        Solved in the segment where ``seconds`` falls, then checked against ``elapsed`` step by step.
        """
        overhead, k, a, b = self.overhead_s, 0, 0.0, 0.0
        for k, a, b, end in self.segments:
            if end is None or end >= limit or self.elapsed(end) >= seconds:
                break
        # after the first k steps, m more take m (first + b (m - 1) / 2), first = overhead + a + b k
        left, first = max(seconds - self.elapsed(k), 0.0), overhead + a + b * k
        if b > 0:
            half = first - b / 2
            guess = (math.sqrt(half * half + 2 * b * left) - half) / b
        else:
            guess = left / first if first > 0 else 0.0
        steps = min(max(1, k + math.ceil(guess)), limit)
        while steps > 1 and self.elapsed(steps - 1) >= seconds:
            steps -= 1
        while steps < limit and self.elapsed(steps) < seconds:
            steps += 1
        return steps


def roofline(model: ModelSpec, gpu: GpuSpec) -> StepTime:
    """Step time as the larger of compute time and HBM time, at the configured efficiencies."""
    flops = gpu.count * gpu.peak_flops * gpu.mfu
    bandwidth = gpu.count * gpu.hbm_bandwidth * gpu.mbu
    compute: Line = (0.0, model.flops_per_token / flops, model.flops_per_attention_pair / flops, 0.0)
    memory: Line = (model.weight_bytes / bandwidth, 0.0, 0.0, model.kv_bytes_per_token / bandwidth)
    return StepTime([compute, memory], gpu.step_overhead_s)


def _is_number(text: str | None) -> bool:
    try:
        float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return True


def profile(path: str | Path) -> StepTime:
    """Step time fitted to a measured table with columns ``tokens, context, seconds`` and optionally
    ``attention``.

    ``tokens`` are the batch's new tokens, ``context`` the KV tokens its sequences
    attend to in total, ``attention`` its attention pairs (a prefill chunk's new
    tokens times the tokens before each). The fit is ``seconds = c0 + c1 tokens +
    c2 context (+ c3 attention)``, which keeps decode runs analytic, by least
    squares of the relative error: steps span 10 ms decodes to 1 s prefills, and
    a decode mispredicted by a fifth matters as much as a prefill. With an
    ``attention`` column, decode-only steps (each new token attends only to its
    own context: pairs == context) get a line of their own, ``d0 + d1 tokens +
    d2 context``, where there are enough of both kinds to fit each.
    """
    with Path(path).open(newline="") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        records = list(reader)
    missing = [name for name in ("tokens", "context", "seconds") if name not in header]
    if missing:
        raise ValueError(f"profile {path}: the header {header} lacks the column(s) {missing} "
                         "(tokens, context, [attention,] seconds)")
    columns = ["tokens", "context", *(["attention"] if "attention" in header else [])]
    if len(records) < len(columns) + 1:
        raise ValueError(f"profile {path} needs at least {len(columns) + 1} rows of {', '.join(columns)}, seconds; "
                         f"got {len(records)}")
    try:
        table = np.array([[float(r[c]) for c in columns] for r in records])
        seconds = np.array([float(r["seconds"]) for r in records])
    except (TypeError, ValueError):
        row = next(i for i, r in enumerate(records) if not all(_is_number(r[c]) for c in [*columns, "seconds"]))
        raise ValueError(f"profile {path}, row {row + 2}: every cell must be a number, got {records[row]}") from None
    if (seconds <= 0).any():
        raise ValueError(f"profile {path}: step times must be positive, row {int(np.argmax(seconds <= 0)) + 2} "
                         f"has {seconds[seconds <= 0][0]}")

    def fit(rows: np.ndarray, width: int) -> np.ndarray:
        """Coefficients of the intercept and the first ``width`` columns; a term that comes out negative (noise,
        or two columns that move together) is left out and the rest refitted: no step takes negative time."""
        design = np.column_stack([np.ones(rows.sum()), table[rows, :width]]) / seconds[rows, None]
        kept = np.ones(width + 1, dtype=bool)
        while True:
            coefficients = np.zeros(width + 1)
            coefficients[kept] = np.linalg.lstsq(design[:, kept], np.ones(rows.sum()), rcond=None)[0]
            if coefficients.min() >= 0 or kept.sum() == 1:
                return coefficients
            kept[np.argmin(coefficients)] = False

    if "attention" in columns:
        decode = decode_only(table[:, 2], table[:, 1])
        if decode.sum() >= 3 and (~decode).sum() >= len(columns) + 1:
            d0, d1, d2 = fit(decode, 2)
            c0, c1, c2, c3 = fit(~decode, 3)
            return StepTime([(c0, c1, c3, c2)], decode_lines=[(d0, d1, 0.0, d2)])
    c0, c1, c2, *c3 = fit(np.ones(len(table), dtype=bool), len(columns))
    return StepTime([(c0, c1, c3[0] if c3 else 0.0, c2)])


def decode_only(attention_pairs, kv_tokens):
    """Whether a step (or an array of them) only decodes: each new token attends to its context alone."""
    return attention_pairs <= kv_tokens
