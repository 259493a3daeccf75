"""Scenarios that reproduce published setups, built as workloads (contents only: they run closed loop).

``flexkv_pr34328``: the setup behind FlexKV's numbers in vLLM PR #34328 (ISL 21K,
OSL 1K, batch 8: TTFT -60%, TPOT +13%, QPM +16%). The PR does not publish its
dataset, so this is the pattern such a gain needs: long contexts revisited, too
many of them for the GPU prefix cache, few enough for CPU DRAM + SSD. Each
request is one of ``num_contexts`` shared contexts plus a fresh question; the
contexts are visited in turn, ``rounds`` times, so a context comes back after
``num_contexts - 1`` others (LRU on a GPU holding fewer than that always misses).
Eight closed-loop clients (``simulate.clients``) give the batch of 8.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from flexkv_sim.workloads.request import Request, Workload


def flexkv_pr34328(
    num_contexts: int = 128,
    rounds: int = 4,
    context_tokens: int = 20480,
    question_tokens: int = 1024,
    output_tokens: int = 1024,
    tokens_per_block: int = 256,
) -> Workload:
    if min(num_contexts, rounds, context_tokens, question_tokens, tokens_per_block) < 1 or output_tokens < 0:
        raise ValueError("flexkv_pr34328 needs positive counts and lengths")
    context_blocks = context_tokens // tokens_per_block  # the shared part: whole blocks only
    input_length = context_tokens + question_tokens
    own_blocks = -(-input_length // tokens_per_block) - context_blocks
    next_id = num_contexts * context_blocks
    requests = []
    for round_index in range(rounds):
        for context in range(num_contexts):
            first = context * context_blocks
            own = tuple(range(next_id, next_id + own_blocks))
            next_id += own_blocks
            requests.append(Request(
                request_id=len(requests), arrival_s=0.0, input_length=input_length,
                output_length=output_tokens, block_ids=tuple(range(first, first + context_blocks)) + own,
                tokens_per_block=tokens_per_block, session_id=context, kind=f"round{round_index}",
            ))
    return Workload(name="flexkv_pr34328", tokens_per_block=tokens_per_block, requests=requests)


SCENARIOS: dict[str, Callable[..., Workload]] = {"flexkv_pr34328": flexkv_pr34328}


def build_scenario(cfg: Mapping[str, Any]) -> Workload:
    params = dict(cfg)
    name = params.pop("name", None)
    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; valid choices: {sorted(SCENARIOS)}")
    return SCENARIOS[name](**params)
