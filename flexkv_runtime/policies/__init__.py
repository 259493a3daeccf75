"""Eviction, admission and prefetch policies: one class per file, found by name.

Add a policy by dropping a file here whose class sets ``name`` (and a YAML under
``conf/eviction``, ``conf/admission`` or ``conf/prefetch``); nothing else changes.
"""
from flexkv_runtime.policies.base import (
    AdmissionPolicy,
    EvictionPolicy,
    PolicyContext,
    PrefetchPolicy,
    available,
    make_policy,
    policy_class,
)

__all__ = [
    "AdmissionPolicy",
    "EvictionPolicy",
    "PolicyContext",
    "PrefetchPolicy",
    "available",
    "make_policy",
    "policy_class",
]
