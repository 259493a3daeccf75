"""Seeded synthetic workloads for the three reuse patterns that make KV offloading pay.

- ``chat``: multi-turn sessions whose context grows turn by turn, so each turn reuses
  the previous turn's prompt after a think time (reuse distance in seconds).
- ``system_prompt``: many users behind a few shared system prompts (hot, short prefix).
- ``doc_qa``: questions over long documents with Zipf popularity (big, skewed prefixes).
- ``mixed``: the three together; the project's default workload, no download needed.

A prompt is built from segments (a document, a user message, an answer), each a fixed
run of tokens, and ``ChainedBlockIds`` cuts it into Mooncake-style chained block ids.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, NamedTuple, get_type_hints

import numpy as np

from flexkv_sim.workloads.request import Request, Workload

ARRIVAL_PROCESSES = ("poisson", "bursty")

# Lognormal spread of every token length; capped at _LENGTH_CAP x the mean so one
# outlier cannot dominate a small workload.
_LENGTH_SIGMA = 0.6
_LENGTH_CAP = 4

Segment = tuple[int, int]
"""(content id, tokens): a fixed run of tokens; equal ids mean equal tokens."""


class ChainedBlockIds:
    """Cuts segment lists into chained block ids shared exactly where prompts agree.

    A full block's id is keyed by (parent id, the segment pieces it covers), so two
    prompts get the same id at a position iff they agree token for token up to the end
    of that block. A partial last block always gets a fresh id: its content is not
    final, and vLLM does not cache it.
    """

    def __init__(self, tokens_per_block: int) -> None:
        self.tokens_per_block = tokens_per_block
        self._full_block_ids: dict[tuple[int, tuple[tuple[int, int, int], ...]], int] = {}
        self._next_block_id = 0
        self._next_segment_id = 0

    def new_segment(self, tokens: int) -> Segment:
        """A fresh run of content, equal to no other."""
        segment = (self._next_segment_id, tokens)
        self._next_segment_id += 1
        return segment

    def _fresh_block_id(self) -> int:
        block_id = self._next_block_id
        self._next_block_id += 1
        return block_id

    def block_ids(self, segments: Iterable[Segment]) -> tuple[int, ...]:
        """One chained id per block of the prompt made of ``segments`` in order."""
        tokens_per_block = self.tokens_per_block
        known = self._full_block_ids
        ids: list[int] = []
        parent = -1
        pieces: list[tuple[int, int, int]] = []  # (segment id, offset, tokens) in the open block
        filled = 0
        for segment_id, length in segments:
            offset = 0
            while offset < length:
                take = min(length - offset, tokens_per_block - filled)
                pieces.append((segment_id, offset, take))
                offset += take
                filled += take
                if filled == tokens_per_block:
                    key = (parent, tuple(pieces))
                    parent = known.get(key, -1)
                    if parent < 0:
                        parent = known[key] = self._fresh_block_id()
                    ids.append(parent)
                    pieces.clear()
                    filled = 0
        if filled:
            ids.append(self._fresh_block_id())
        return tuple(ids)


def arrival_times(
    rng: np.random.Generator, count: int, rate: float, process: str = "poisson", burst_cv: float = 3.0
) -> np.ndarray:
    """``count`` arrival times from 0 s at mean ``rate`` per second.

    ``bursty`` draws Gamma gaps with coefficient of variation ``burst_cv`` (> 1): the
    same mean rate, but arrivals bunch into bursts separated by long lulls, which is
    what stresses queues and prefetch.
    """
    if count <= 0:
        return np.zeros(0)
    if process == "poisson":
        gaps = rng.exponential(1.0 / rate, count - 1)
    elif process == "bursty":
        shape = burst_cv**-2
        gaps = rng.gamma(shape, 1.0 / (rate * shape), count - 1)
    else:
        raise ValueError(f"unknown arrival process {process!r}; valid: {list(ARRIVAL_PROCESSES)}")
    return np.concatenate(([0.0], np.cumsum(gaps)))


def _param(default: Any, *, least: float | None = None, above: float | None = None,
           choices: Sequence[str] | None = None) -> Any:
    """A dataclass field with the bounds ``_Params`` enforces."""
    return field(default=default, metadata={"least": least, "above": above, "choices": choices})


def reject_unknown(what: str, given: Iterable[str], valid: Iterable[str]) -> None:
    """ValueError naming unknown keys and listing the valid ones."""
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise ValueError(f"unknown {what} parameter(s) {unknown}; valid: {sorted(valid)}")


class _Params:
    """Checks types and bounds on construction, so a bad config fails naming the parameter."""

    def __post_init__(self) -> None:
        hints = get_type_hints(type(self))
        for spec_field in fields(self):  # type: ignore[arg-type]
            value = getattr(self, spec_field.name)
            expected = hints[spec_field.name]
            where = f"{type(self).__name__}.{spec_field.name}"
            if expected is float and type(value) is int:
                value = float(value)
                object.__setattr__(self, spec_field.name, value)
            if type(value) is not expected:
                raise ValueError(f"{where} must be {expected.__name__}, got {value!r}")
            bounds = spec_field.metadata
            if bounds.get("least") is not None and not value >= bounds["least"]:
                raise ValueError(f"{where} must be >= {bounds['least']}, got {value}")
            if bounds.get("above") is not None and not value > bounds["above"]:
                raise ValueError(f"{where} must be > {bounds['above']}, got {value}")
            if bounds.get("choices") is not None and value not in bounds["choices"]:
                raise ValueError(f"{where} must be one of {list(bounds['choices'])}, got {value!r}")

    @classmethod
    def from_mapping(cls, params: Mapping[str, Any]) -> Any:
        """Build from config keys; nested mappings become nested parameter objects."""
        valid = {spec_field.name for spec_field in fields(cls)}  # type: ignore[arg-type]
        reject_unknown(getattr(cls, "name", cls.__name__), params, valid)
        hints = get_type_hints(cls)
        values = {
            name: hints[name].from_mapping(value)
            if isinstance(value, Mapping) and issubclass(hints[name], _Params) else value
            for name, value in params.items()
        }
        return cls(**values)


@dataclass(frozen=True)
class GeneratorSettings(_Params):
    """What every generator shares: block size, arrival process and seed."""

    tokens_per_block: int = _param(256, least=1)
    arrivals: str = _param("poisson", choices=ARRIVAL_PROCESSES)
    burst_cv: float = _param(3.0, least=1)
    seed: int = _param(0, least=0)


class _Draft(NamedTuple):
    """A request before it gets its id, which depends on the merged arrival order."""

    arrival_s: float
    input_length: int
    output_length: int
    block_ids: tuple[int, ...]
    session_id: int | None
    kind: str


class _Draw:
    """One generator's random stream, plus the settings and block ids of the whole workload."""

    def __init__(self, rng: np.random.Generator, settings: GeneratorSettings, blocks: ChainedBlockIds) -> None:
        self.rng = rng
        self.settings = settings
        self.blocks = blocks

    def arrival_times(self, count: int, rate: float) -> list[float]:
        return arrival_times(self.rng, count, rate, self.settings.arrivals, self.settings.burst_cv).tolist()

    def lengths(self, mean: int, count: int) -> list[int]:
        """Lognormal token counts with the given mean, at least 1."""
        mu = math.log(mean) - _LENGTH_SIGMA**2 / 2
        draws = self.rng.lognormal(mu, _LENGTH_SIGMA, count)
        return np.clip(np.rint(draws), 1, _LENGTH_CAP * mean).astype(np.int64).tolist()

    def prefix_then_unique(
        self, prefixes: Sequence[Segment], picks: Sequence[int], rate: float, suffix_mean: int, output_mean: int,
        kind: str,
    ) -> list[_Draft]:
        """Single-turn requests: shared prefix ``prefixes[pick]``, then a fresh suffix."""
        count = len(picks)
        arrivals = self.arrival_times(count, rate)
        suffixes = self.lengths(suffix_mean, count)
        outputs = self.lengths(output_mean, count)
        drafts = []
        for arrival, pick, suffix, output in zip(arrivals, picks, suffixes, outputs):
            prefix = prefixes[pick]
            block_ids = self.blocks.block_ids((prefix, self.blocks.new_segment(suffix)))
            drafts.append(_Draft(arrival, prefix[1] + suffix, output, block_ids, None, kind))
        return drafts


class WorkloadSpec(_Params):
    """A generator's parameters; ``generate`` turns one into a Workload."""

    name: ClassVar[str]

    def parts(self) -> tuple[WorkloadSpec, ...]:
        """The single generators to run, each with its own random stream."""
        return (self,)

    def drafts(self, draw: _Draw) -> list[_Draft]:
        raise NotImplementedError


@dataclass(frozen=True)
class ChatSpec(WorkloadSpec):
    """Multi-turn chat: turn k's prompt is turn k-1's prompt + its answer + a new message.

    Sessions start at ``session_rate`` per second; a session has a geometric number of
    turns (mean ``mean_turns``) and ends early once its context would pass
    ``max_context_tokens``. ``think_time_s`` (exponential mean) counts from the previous
    turn's arrival, so it includes the time to answer: the replay is open-loop.
    """

    name: ClassVar[str] = "chat"
    num_sessions: int = _param(150, least=1)
    session_rate: float = _param(0.15, above=0)
    mean_turns: float = _param(6.0, least=1)
    think_time_s: float = _param(30.0, least=0)
    user_tokens_mean: int = _param(300, least=1)
    output_tokens_mean: int = _param(350, least=1)
    max_context_tokens: int = _param(32768, least=1)

    def drafts(self, draw: _Draw) -> list[_Draft]:
        blocks = draw.blocks
        starts = draw.arrival_times(self.num_sessions, self.session_rate)
        turn_counts = draw.rng.geometric(1.0 / self.mean_turns, self.num_sessions).tolist()
        drafts: list[_Draft] = []
        for session_id, (arrival, turns) in enumerate(zip(starts, turn_counts)):
            context: list[Segment] = []
            context_tokens = 0
            for message, answer, think_s in zip(
                draw.lengths(self.user_tokens_mean, turns), draw.lengths(self.output_tokens_mean, turns),
                draw.rng.exponential(self.think_time_s, turns).tolist(),
            ):
                context_tokens += message
                if context_tokens > self.max_context_tokens:
                    break
                context.append(blocks.new_segment(message))
                drafts.append(_Draft(arrival, context_tokens, answer, blocks.block_ids(context), session_id, self.name))
                context.append(blocks.new_segment(answer))
                context_tokens += answer
                arrival += think_s
        return drafts


@dataclass(frozen=True)
class SystemPromptSpec(WorkloadSpec):
    """Single-turn requests from many users behind a few shared system prompts.

    Each request picks one of ``num_system_prompts`` prompts uniformly (lognormal
    lengths, mean ``system_prompt_tokens_mean``) and adds a unique user part.
    """

    name: ClassVar[str] = "system_prompt"
    num_requests: int = _param(1000, least=1)
    rate: float = _param(1.0, above=0)
    num_system_prompts: int = _param(4, least=1)
    system_prompt_tokens_mean: int = _param(3000, least=1)
    user_tokens_mean: int = _param(400, least=1)
    output_tokens_mean: int = _param(250, least=1)

    def drafts(self, draw: _Draw) -> list[_Draft]:
        prompts = [draw.blocks.new_segment(n) for n in draw.lengths(self.system_prompt_tokens_mean,
                                                                     self.num_system_prompts)]
        picks = draw.rng.integers(self.num_system_prompts, size=self.num_requests).tolist()
        return draw.prefix_then_unique(prompts, picks, self.rate, self.user_tokens_mean, self.output_tokens_mean,
                                       self.name)


@dataclass(frozen=True)
class DocQASpec(WorkloadSpec):
    """Short unique questions over long documents picked with Zipf popularity.

    Document i (0-based) is picked with probability proportional to
    ``(i + 1) ** -zipf_a``: document 0 is the hottest, ``zipf_a = 0`` is uniform.
    """

    name: ClassVar[str] = "doc_qa"
    num_requests: int = _param(1000, least=1)
    rate: float = _param(1.0, above=0)
    num_documents: int = _param(400, least=1)
    zipf_a: float = _param(1.0, least=0)
    document_tokens_mean: int = _param(8000, least=1)
    question_tokens_mean: int = _param(50, least=1)
    output_tokens_mean: int = _param(200, least=1)

    def drafts(self, draw: _Draw) -> list[_Draft]:
        documents = [draw.blocks.new_segment(n) for n in draw.lengths(self.document_tokens_mean, self.num_documents)]
        weights = np.arange(1, self.num_documents + 1, dtype=float) ** -self.zipf_a
        picks = draw.rng.choice(self.num_documents, size=self.num_requests, p=weights / weights.sum()).tolist()
        return draw.prefix_then_unique(documents, picks, self.rate, self.question_tokens_mean,
                                       self.output_tokens_mean, self.name)


@dataclass(frozen=True)
class MixedSpec(WorkloadSpec):
    """Chat, system-prompt and document traffic interleaved in one workload.

    The defaults give each part about 1,000 s of arrivals, so they overlap throughout.
    """

    name: ClassVar[str] = "mixed"
    chat: ChatSpec = field(default_factory=ChatSpec)
    system_prompt: SystemPromptSpec = field(default_factory=SystemPromptSpec)
    doc_qa: DocQASpec = field(default_factory=DocQASpec)

    def parts(self) -> tuple[WorkloadSpec, ...]:
        return (self.chat, self.system_prompt, self.doc_qa)


GENERATORS: dict[str, type[WorkloadSpec]] = {spec.name: spec for spec in (ChatSpec, SystemPromptSpec, DocQASpec,
                                                                          MixedSpec)}


def generate(spec: WorkloadSpec, settings: GeneratorSettings = GeneratorSettings()) -> Workload:
    """Run ``spec``'s generators with one shared block-id space; same seed, same workload.

    Part i draws from ``SeedSequence(seed).spawn(...)[i]``, so a part's arrivals and
    lengths do not change when another part's parameters do.
    """
    blocks = ChainedBlockIds(settings.tokens_per_block)
    parts = spec.parts()
    streams = np.random.SeedSequence(settings.seed).spawn(len(parts))
    drafts = [
        draft
        for part, stream in zip(parts, streams)
        for draft in part.drafts(_Draw(np.random.default_rng(stream), settings, blocks))
    ]
    drafts.sort(key=lambda draft: draft.arrival_s)
    requests = [
        Request(request_id, draft.arrival_s, draft.input_length, draft.output_length, draft.block_ids,
                settings.tokens_per_block, draft.session_id, draft.kind)
        for request_id, draft in enumerate(drafts)
    ]
    return Workload(name=spec.name, tokens_per_block=settings.tokens_per_block, requests=requests)
