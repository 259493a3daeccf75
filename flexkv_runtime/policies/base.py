"""The three policy interfaces and the registry that finds them by name.

A policy is a plain Python class in one file of this package (or any module
named by a dotted path). The control plane calls it; it never calls the data
plane, never sleeps and never starts threads, so the same object runs in replay,
in the simulator and in the real runtime.

Eviction policies are per tier and see only keys of that tier:
``on_insert`` when a block becomes resident, ``on_hit`` when a resident block is
used again, ``on_remove`` when it leaves for a reason other than eviction, and
``victim`` when the tier needs room. ``victim`` chooses *and forgets* one block
(so ARC-like policies can move it to a ghost list); it must skip blocks for which
``can_evict(key)`` is false (pinned by a transfer or a running request, or still
in flight) and return ``None`` when nothing can go.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from flexkv_runtime.control.index import Block

Key = Hashable


@dataclass
class PolicyContext:
    """What the control plane lets a policy see besides the keys it is told about.

    ``clock`` is the caller's clock (simulated or real seconds); ``waiting_refs``
    counts how many queued requests will read each key (lookahead); ``oracle``
    knows the future and is set only in replay and simulation; ``tier`` names the
    tier the policy serves (``GPU``, ``CPU``, ``SSD``, ``REMOTE``).
    """

    clock: Callable[[], float] = lambda: 0.0
    waiting_refs: dict[Key, int] = field(default_factory=dict)
    oracle: Any = None
    tier: str = ""


class Policy:
    """Common base: a name for the registry and a context the manager binds."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    ctx: PolicyContext

    def bind(self, ctx: PolicyContext) -> None:
        self.ctx = ctx


class EvictionPolicy(Policy):
    kind: ClassVar[str] = "eviction"
    #: True for policies that need the future (belady); the runtime refuses them.
    offline: ClassVar[bool] = False

    def __init__(self, capacity_blocks: int) -> None:
        self.capacity_blocks = capacity_blocks
        self.ctx = PolicyContext()

    def on_insert(self, key: Key, block: Block) -> None:
        raise NotImplementedError

    def on_hit(self, key: Key, block: Block) -> None:
        raise NotImplementedError

    def on_remove(self, key: Key) -> None:
        raise NotImplementedError

    def victim(self, can_evict: Callable[[Key], bool]) -> Key | None:
        raise NotImplementedError

    def victims(self, count: int, can_evict: Callable[[Key], bool]) -> list[Key]:
        """Choose and forget up to ``count`` blocks, as ``count`` calls of ``victim`` would (fewer when
        nothing more can go). A policy may override it to choose them in one pass."""
        chosen = []
        while len(chosen) < count:
            key = self.victim(can_evict)
            if key is None:
                break
            chosen.append(key)
        return chosen

    def __len__(self) -> int:
        raise NotImplementedError


class AdmissionPolicy(Policy):
    """Decides whether a block that is not yet in a tier may enter it."""

    kind: ClassVar[str] = "admission"

    def __init__(self) -> None:
        self.ctx = PolicyContext()

    def admit(self, key: Key, block: Block, request_tokens: int) -> bool:
        raise NotImplementedError

    def observe(self, key: Key, block: Block, request_tokens: int) -> None:
        """A block was offered but not stored for another reason (it lies past a hole
        in its request's prefix); policies that count sightings count it here."""


#: How a request that finds part of its prefix still in flight (being
#: prefetched) proceeds: load only what is ready, wait for all, or wait a while.
STOP_RULES = ("best_effort", "wait_complete", "timeout")


class PrefetchPolicy(Policy):
    """Chooses blocks to promote from slower tiers before a request needs them.

    ``on_lookup`` sees a request being looked up, ``on_waiting`` the scheduler's
    queue; both return the keys (in prefix order) worth promoting now.
    """

    kind: ClassVar[str] = "prefetch"

    def __init__(self, stop_rule: str = "best_effort", timeout_s: float = 0.0) -> None:
        if stop_rule not in STOP_RULES:
            raise ValueError(f"unknown prefetch stop_rule {stop_rule!r}; valid choices: {list(STOP_RULES)}")
        if stop_rule == "timeout" and timeout_s <= 0:
            raise ValueError("prefetch stop_rule 'timeout' needs timeout_s > 0")
        self.stop_rule = stop_rule
        self.timeout_s = timeout_s
        self.ctx = PolicyContext()

    def on_lookup(self, request_id: Hashable, keys: Sequence[Key]) -> Sequence[Key]:
        return ()

    def on_waiting(self, waiting: Sequence[tuple[Hashable, Sequence[Key]]]) -> Sequence[Key]:
        return ()

    def should_wait(self, waited_s: float) -> bool:
        """Whether a request with blocks still in flight keeps waiting for them."""
        if self.stop_rule == "wait_complete":
            return True
        if self.stop_rule == "timeout":
            return waited_s < self.timeout_s
        return False


_BASES: dict[str, type[Policy]] = {
    "eviction": EvictionPolicy,
    "admission": AdmissionPolicy,
    "prefetch": PrefetchPolicy,
}


def _discover() -> dict[str, dict[str, type[Policy]]]:
    """Import every module of this package once and index its policies by kind and name."""
    import flexkv_runtime.policies as package

    registry: dict[str, dict[str, type[Policy]]] = {kind: {} for kind in _BASES}
    for module_info in pkgutil.iter_modules(package.__path__):
        if module_info.name == "base":
            continue
        module = importlib.import_module(f"{package.__name__}.{module_info.name}")
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, Policy) and obj.name and obj.__module__ == module.__name__:
                known = registry[obj.kind].get(obj.name)
                if known is not None and known is not obj:
                    raise RuntimeError(f"two {obj.kind} policies are named {obj.name!r}: {known} and {obj}")
                registry[obj.kind][obj.name] = obj
    return registry


_registry: dict[str, dict[str, type[Policy]]] | None = None


def available(kind: str) -> list[str]:
    """Names of the built-in policies of one kind (eviction, admission, prefetch)."""
    global _registry
    if _registry is None:
        _registry = _discover()
    return sorted(_registry[kind])


def policy_class(kind: str, name: str) -> type[Policy]:
    """Resolve a policy by registry name or by ``package.module:Class`` path."""
    if kind not in _BASES:
        raise ValueError(f"unknown policy kind {kind!r}; valid choices: {list(_BASES)}")
    if ":" in name:
        module_name, _, class_name = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ValueError(f"{kind} policy {name!r}: cannot import {module_name!r} ({exc})") from exc
        cls = getattr(module, class_name, None)
        if not (isinstance(cls, type) and issubclass(cls, _BASES[kind])):
            raise ValueError(f"{name!r} is not a {kind} policy class ({_BASES[kind].__name__} subclass)")
        return cls
    names = available(kind)
    if name not in names:
        raise ValueError(f"unknown {kind} policy {name!r}; valid choices: {names}")
    assert _registry is not None
    return _registry[kind][name]


def policy_name(spec: Any) -> str:
    """The policy a config names: a bare name or a mapping's ``name``."""
    if isinstance(spec, str):
        return spec
    if not hasattr(spec, "get") or not spec.get("name"):
        raise ValueError(f"a policy config is a name or a mapping with a 'name', got {spec!r}")
    return str(spec["name"])


def make_policy(kind: str, spec: Any, **fixed: Any) -> Policy:
    """Build a policy from a config mapping ``{name: ..., <params>}`` or a bare name.

    ``fixed`` carries arguments the control plane supplies (the tier capacity for
    eviction policies). Unknown parameters fail with the policy's valid ones.
    """
    params = {"name": spec} if isinstance(spec, str) else dict(spec)
    name = params.pop("name", None)
    if not name:
        raise ValueError(f"{kind} policy config needs a 'name'; valid choices: {available(kind)}")
    cls = policy_class(kind, name)
    try:
        return cls(**fixed, **params)
    except TypeError as exc:
        valid = [p for p in inspect.signature(cls).parameters if p not in fixed]
        raise ValueError(f"bad parameters for {kind} policy {name!r}: {exc}; valid parameters: {valid}") from exc
