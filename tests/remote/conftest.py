"""Real stores on free loopback ports, stopped by PID; the runtime tests' helpers; an in-memory backend."""
import importlib.util
import threading
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from flexkv_runtime.control.ops import OpKind
from experiments import local_stores
from flexkv_runtime.data.remote.backend import RemoteBackend, Status

_RUNTIME_CONFTEST = Path(__file__).parent.parent / "runtime" / "conftest.py"
_spec = importlib.util.spec_from_file_location("runtime_helpers", _RUNTIME_CONFTEST)
runtime_helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(runtime_helpers)
make_layers, keys_for, same_blocks, NS = (runtime_helpers.make_layers, runtime_helpers.keys_for,
                                          runtime_helpers.same_blocks, runtime_helpers.NS)


def start_store(backend: str, log_dir: Path, **options):
    """A local store for the test (skipped where the store is not installed), with test-sized settings."""
    try:
        store = local_stores.start_store(backend, log_dir, **{"segment": "256 MB", **options})
    except local_stores.StoreUnavailable as exc:
        pytest.skip(f"{exc}; .ci/run installs it")
    store.remote = partial(store.remote, capacity_blocks=64, timeout_s=1.0, breaker_failures=2,
                           breaker_cooldown_s=0.3)
    return store


def read_value(store, name: str) -> bytes:
    return store.raw().get(name)


def write_value(store, name: str, value: bytes) -> None:
    """Replace a value, as a buggy or malicious writer would."""
    client = store.raw()
    if store.backend == "redis":
        client.set(name, value)
        return
    client.remove(name, True)
    assert client.put(name, value) == 0


@pytest.fixture(params=["mooncake", "redis"])
def store(request, tmp_path):
    """A running store of each backend, killed at the end."""
    started = start_store(request.param, tmp_path)
    yield started
    started.kill()


@pytest.fixture
def make_runtime():
    """KVRuntimes with registered layers, always shut down."""
    from flexkv_runtime.runtime import KVRuntime

    made = []

    def make(cfg, layers=None, namespace=NS):
        rt = KVRuntime(cfg, namespace=namespace)
        rt.register_kv_caches(make_layers() if layers is None else layers)
        made.append(rt)
        return rt

    yield make
    for rt in made:
        rt.shutdown(timeout=30)


#: the runtime tests' check that every test stops the threads it started (the remote tier's too)
no_leaked_threads = runtime_helpers.no_leaked_threads


class MemoryBackend(RemoteBackend):
    """A dict as a store; ``gate`` (when set) holds every call until it opens, to play a hung store."""

    name = "memory"

    def __init__(self, capacity: int = 1 << 30) -> None:
        self.values: dict[str, bytes] = {}
        self.capacity = capacity
        self.gate: threading.Event | None = None
        self.calls = 0
        self.down = False

    def _enter(self) -> None:
        self.calls += 1
        if self.gate is not None:
            self.gate.wait()
        if self.down:
            raise ConnectionError("store down")

    def get_into(self, keys, values):
        self._enter()
        out = []
        for key, value in zip(keys, values):
            stored = self.values.get(key)
            if stored is None:
                out.append(Status.MISSING)
            elif len(stored) != value.nbytes:
                out.append(Status.CORRUPT)
            else:
                value[:] = np.frombuffer(stored, np.uint8)
                out.append(Status.OK)
        return out

    def put_from(self, keys, values):
        self._enter()
        out = []
        for key, value in zip(keys, values):
            if len(self.values) >= self.capacity:
                out.append(Status.REFUSED)
                continue
            self.values[key] = value.tobytes()
            out.append(Status.OK)
        return out

    def exists(self, keys):
        self._enter()
        return [Status.OK if key in self.values else Status.MISSING for key in keys]


def store_blocks(rt, rid, keys, block_ids):
    """Store a request's blocks; every one must reach the CPU tier (remote copies are best effort)."""
    assert rt.manager.plan_store(rid, keys, block_ids) == len(keys)
    events = rt.flush(timeout=30)
    assert [(e.kind, e.failed_keys) for e in events] == [(OpKind.STORE, [])]


def load_blocks(rt, rid, keys, block_ids):
    """(blocks planned, failed keys) of a load into the runtime's registered layers."""
    planned = rt.manager.plan_load(rid, keys, 0, block_ids)
    events = [e for e in rt.flush(timeout=30) if e.kind is OpKind.LOAD]
    return planned, (events[0].failed_keys if planned else [])


def discover_blocks(rt, rid, keys, timeout=10.0):
    """Ask until discovery answers, as the connector would step after step; returns blocks adopted."""
    deadline = time.monotonic() + timeout
    while (found := rt.discover(rid, keys)) is None:
        assert time.monotonic() < deadline, "discovery never answered"
        time.sleep(0.01)
    return found


@pytest.fixture
def rk():
    """Helpers for test modules (importlib import mode keeps this conftest out of reach)."""
    return SimpleNamespace(make_layers=make_layers, keys_for=keys_for, same_blocks=same_blocks, NS=NS,
                           MemoryBackend=MemoryBackend, start_store=start_store, store=store_blocks,
                           load=load_blocks, discover=discover_blocks, read_value=read_value,
                           write_value=write_value)
