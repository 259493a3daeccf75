"""Admit only blocks of long enough prompts, and only their first ``max_depth`` blocks.

Short prompts are cheap to recompute and long tails are rarely shared, so a
tier small compared with the working set does better keeping the heads of long
prompts (system prompts, documents) than everything.
"""
from __future__ import annotations

from flexkv_runtime.policies.base import AdmissionPolicy


class SizeThresholdAdmission(AdmissionPolicy):
    name = "size_threshold"

    def __init__(self, min_request_tokens: int = 0, max_depth: int | None = None) -> None:
        super().__init__()
        if max_depth is not None and max_depth < 1:
            raise ValueError(f"size_threshold max_depth must be >= 1 or null, got {max_depth}")
        self.min_request_tokens = min_request_tokens
        self.max_depth = max_depth

    def admit(self, key, block, request_tokens: int) -> bool:
        if request_tokens < self.min_request_tokens:
            return False
        return self.max_depth is None or block.depth < self.max_depth
