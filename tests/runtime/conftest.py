import threading
from types import SimpleNamespace

import pytest
import torch

from flexkv_runtime.control.index import TierKind
from flexkv_runtime.control.keys import BlockKeyer, Namespace
from flexkv_runtime.control.ops import OpKind
from flexkv_runtime.runtime import KVRuntime

NS = Namespace(model="runtime-test")
CPU, SSD = TierKind.CPU, TierKind.SSD
TOKENS_PER_BLOCK = 16


def make_layers(num_blocks=16, heads=2, head_size=128, num_layers=3, seed=0, zero=False):
    """vLLM-shaped bf16 KV layers ``[num_blocks, kv_heads, block_size, head_k + head_v]``."""
    shape = (num_blocks, heads, TOKENS_PER_BLOCK, head_size)
    if zero:
        return [torch.zeros(shape, dtype=torch.bfloat16) for _ in range(num_layers)]
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).to(torch.bfloat16) for _ in range(num_layers)]


def keys_for(request: int, num_blocks: int):
    tokens = [request * 100_000 + i for i in range(num_blocks * TOKENS_PER_BLOCK)]
    return BlockKeyer(NS, TOKENS_PER_BLOCK).from_token_ids(tokens)


def same_blocks(a, a_ids, b, b_ids):
    """Byte equality of blocks ``a_ids`` of layers ``a`` and ``b_ids`` of layers ``b``."""
    return all(torch.equal(x[list(a_ids)].view(torch.int16), y[list(b_ids)].view(torch.int16)) for x, y in zip(a, b))


def config(ssd_dir, cpu_blocks=4, ssd_blocks=16, write_policy="write_through", **ssd_options):
    ssd = None if ssd_dir is None else {"capacity_blocks": ssd_blocks, "dirs": [str(ssd_dir)],
                                        "io_threads": 2, "fsync": "none", **ssd_options}
    return {"cpu": {"capacity_blocks": cpu_blocks}, "ssd": ssd, "eviction": "lru", "write_policy": write_policy}


class Driver:
    """A runtime plus the engine cache it serves, with the connector's moves as one-liners."""

    def __init__(self, runtime, layers):
        self.rt = runtime
        self.layers = layers
        runtime.register_kv_caches(layers)

    @property
    def mgr(self):
        return self.rt.manager

    def store(self, rid, keys, block_ids):
        assert self.mgr.plan_store(rid, keys, block_ids) == len(keys)
        events = self.rt.flush(timeout=30)
        assert [(e.request_id, e.kind, e.failed_keys) for e in events] == [(rid, OpKind.STORE, [])]

    def load(self, rid, keys, block_ids, into=None):
        """Load into ``into`` (fresh layers registered first) or the current ones; returns (planned, failed keys)."""
        if into is not None:
            self.layers = into
            self.rt.register_kv_caches(into)
        planned = self.mgr.plan_load(rid, keys, 0, block_ids)
        events = self.rt.flush(timeout=30)
        if not planned:
            return 0, []
        [event] = [e for e in events if e.kind is OpKind.LOAD]
        assert event.request_id == rid
        return planned, event.failed_keys

    def ready(self, keys, tier):
        return [k for k in keys if (b := self.mgr.index.get(k)) is not None and b.ready_in(tier)]

    def slot(self, key, tier=SSD):
        return self.mgr.index.get(key).slots[tier]


@pytest.fixture
def make_driver():
    """Drivers that are always shut down, so a failing test leaks no threads or locks."""
    made = []

    def make(cfg, layers=None, namespace=NS):
        layers = make_layers() if layers is None else layers
        driver = Driver(KVRuntime(cfg, namespace=namespace), layers)
        made.append(driver)
        return driver

    yield make
    for driver in made:
        driver.rt.shutdown(timeout=30)


@pytest.fixture(autouse=True)
def no_leaked_threads():
    yield
    left = [t.name for t in threading.enumerate() if t.name.startswith("flexkv-")]
    assert not left, f"threads left running: {left}"


@pytest.fixture
def kv():
    """The helpers above, for test modules (importlib import mode keeps conftest out of reach)."""
    return SimpleNamespace(make_layers=make_layers, keys_for=keys_for, same_blocks=same_blocks, config=config,
                           NS=NS, CPU=CPU, SSD=SSD)
