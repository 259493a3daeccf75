"""Request streams for the simulator and the runtime: a real trace or a seeded generator.

``build_workload`` is the one entry point configs use (``conf/workload/*.yaml``).
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from omegaconf import DictConfig, MissingMandatoryValue, OmegaConf

from flexkv_sim.workloads.mooncake import TraceFormatError, load_mooncake_trace
from flexkv_sim.workloads.request import PrefixChainChecker, Request, Workload, find_chain_violation
from flexkv_sim.workloads.synthetic import (
    ARRIVAL_PROCESSES,
    GENERATORS,
    ChainedBlockIds,
    ChatSpec,
    DocQASpec,
    GeneratorSettings,
    MixedSpec,
    SystemPromptSpec,
    WorkloadSpec,
    arrival_times,
    generate,
    reject_unknown,
)

__all__ = [
    "ARRIVAL_PROCESSES", "GENERATORS", "WORKLOAD_TYPES", "ChainedBlockIds", "ChatSpec", "DocQASpec",
    "GeneratorSettings", "MixedSpec", "PrefixChainChecker", "Request", "SystemPromptSpec", "TraceFormatError",
    "Workload", "WorkloadSpec", "arrival_times", "build_workload", "find_chain_violation", "generate",
    "load_mooncake_trace",
]

WORKLOAD_TYPES = ("mooncake", *GENERATORS)
_MOONCAKE_PARAMS = tuple(inspect.signature(load_mooncake_trace).parameters)
_SETTING_NAMES = tuple(setting.name for setting in fields(GeneratorSettings))


def _plain_dict(cfg: Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(cfg, DictConfig):
        try:
            return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]
        except MissingMandatoryValue as error:
            raise ValueError(f"workload config leaves mandatory value {error.full_key!r} unset (???)") from None
    if not isinstance(cfg, Mapping):
        raise TypeError(f"workload config must be a mapping, got {type(cfg).__name__}")
    return dict(cfg)


def build_workload(cfg: Mapping[str, Any]) -> Workload:
    """Build the workload a config describes: ``type`` plus that type's parameters.

    ``type: mooncake`` loads ``path``; any other type names a generator in
    ``GENERATORS``, taking its spec's fields plus the shared ``GeneratorSettings``
    (``mixed`` takes one nested mapping per part). Unknown types or keys raise
    ValueError listing the valid ones.
    """
    params = _plain_dict(cfg)
    workload_type = params.pop("type", None)
    if workload_type == "mooncake":
        reject_unknown("mooncake", params, _MOONCAKE_PARAMS)
        if params.get("path") is None:
            raise ValueError("mooncake workload needs 'path': the trace file to load")
        return load_mooncake_trace(**params)
    spec_type = GENERATORS.get(workload_type)  # type: ignore[arg-type]
    if spec_type is None:
        raise ValueError(f"unknown workload type {workload_type!r}; valid: {list(WORKLOAD_TYPES)}")
    reject_unknown(workload_type, params, (*_SETTING_NAMES, *(spec.name for spec in fields(spec_type))))
    settings = GeneratorSettings(**{name: params.pop(name) for name in _SETTING_NAMES if name in params})
    return generate(spec_type.from_mapping(params), settings)
