"""Build a CacheManager from a plain (or Hydra) config, failing early and clearly.

The config names policies and capacities; this module resolves the names
through the policy registry and turns capacities into blocks, so a bad name or
an impossible capacity stops start-up with the valid choices in the message.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from flexkv_runtime.control.index import TierKind
from flexkv_runtime.control.manager import CacheManager
from flexkv_runtime.control.ops import DataPlane
from flexkv_runtime.control.tiers import Tier, blocks_for_capacity
from flexkv_runtime.policies.base import make_policy

TIER_NAMES = {"cpu": TierKind.CPU, "ssd": TierKind.SSD, "remote": TierKind.REMOTE}


def whole_number(what: str, value: Any) -> int:
    """``value`` as an int, if it is a whole number (YAML may give ``8e9`` as a float); else a
    ValueError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value != int(value):
        raise ValueError(f"{what} must be a whole number, got {value!r}")
    return int(value)


def tier_capacity_blocks(name: str, spec: Mapping[str, Any] | int | None, block_bytes: int) -> int:
    """Blocks a tier holds, from ``{capacity_blocks: N}``, ``{capacity_bytes: B}`` or a bare N."""
    kind = TIER_NAMES[name]
    if spec is None:
        return 0
    if not isinstance(spec, Mapping):
        spec = {"capacity_blocks": spec}
    blocks = spec.get("capacity_blocks")
    nbytes = spec.get("capacity_bytes")
    if blocks is None and nbytes is None:
        raise ValueError(f"{name} tier needs capacity_blocks or capacity_bytes")
    if blocks is not None and nbytes is not None:
        raise ValueError(f"{name} tier: give capacity_blocks or capacity_bytes, not both")
    if blocks is not None:
        if whole_number(f"{name} tier capacity_blocks", blocks) <= 0:
            raise ValueError(f"{name} tier capacity_blocks must be positive, got {blocks}")
        return int(blocks)
    return blocks_for_capacity(kind, whole_number(f"{name} tier capacity_bytes", nbytes), block_bytes)


def _plain(obj: Any) -> Any:
    """OmegaConf containers to plain dicts and lists; omegaconf is imported only when given one."""
    if not type(obj).__module__.startswith("omegaconf"):
        return obj
    from omegaconf import OmegaConf

    return OmegaConf.to_container(obj, resolve=True)


def build_manager(
    *,
    tiers: Mapping[str, Any],
    eviction: Any,
    admission: Any = "always",
    prefetch: Any = "none",
    write_policy: str = "write_through",
    selective_hits: int = 2,
    data_plane: DataPlane,
    clock: Callable[[], float],
    block_bytes: int,
    prefill_cost: Callable[[int], float] | None = None,
    oracle: object | None = None,
    allow_offline: bool = True,
    protect_prefix: bool = True,
) -> CacheManager:
    """``tiers`` maps ``cpu``/``ssd``/``remote`` to a capacity (blocks) or a mapping with
    ``capacity_blocks`` or ``capacity_bytes`` and optionally its own ``eviction`` and
    ``admission``; a tier with capacity 0 or None is absent. Other keys of a tier's
    mapping (directories, threads) belong to the data plane and are ignored here."""
    unknown = set(tiers) - set(TIER_NAMES)
    if unknown:
        raise ValueError(f"unknown tiers {sorted(unknown)}; valid choices: {sorted(TIER_NAMES)}")
    eviction, admission, prefetch = _plain(eviction), _plain(admission), _plain(prefetch)
    built = []
    for name, spec in tiers.items():
        spec = _plain(spec)
        if name != "cpu" and (spec in (None, 0) or (  # the slower tiers are optional, the CPU tier is not
            isinstance(spec, Mapping) and not spec.get("capacity_blocks") and not spec.get("capacity_bytes")
            and ("capacity_blocks" in spec or "capacity_bytes" in spec)
        )):
            continue
        blocks = tier_capacity_blocks(name, spec, block_bytes)
        own = spec if isinstance(spec, Mapping) else {}
        # admission guards the way into the hierarchy (the CPU tier); what reaches the
        # slower tiers is the write policy's call, unless a tier names its own admission
        tier_admission = own.get("admission") or (admission if name == "cpu" else "always")
        built.append(
            Tier(
                TIER_NAMES[name],
                blocks,
                make_policy("eviction", own.get("eviction") or eviction, capacity_blocks=blocks),
                make_policy("admission", _plain(tier_admission)),
            )
        )
    kwargs = {} if prefill_cost is None else {"prefill_cost": prefill_cost}
    return CacheManager(
        built,
        data_plane=data_plane,
        clock=clock,
        block_bytes=block_bytes,
        write_policy=write_policy,
        selective_hits=selective_hits,
        prefetch=make_policy("prefetch", prefetch),
        oracle=oracle,
        allow_offline=allow_offline,
        protect_prefix=protect_prefix,
        **kwargs,
    )
