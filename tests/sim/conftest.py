"""Small, hand-checkable set-ups for the simulator tests.

The tiny model has 32 bytes of KV per token, so a 16-token block is 512 bytes and a
512 B/s link moves one block per second. The step-time profile is 1 ms per new
token and nothing else, so prefill times are exact too.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from flexkv_sim.engine import EngineConfig
from flexkv_sim.hardware import GpuSpec, HardwareSpec, LinkSpec, RemoteSpec, SsdSpec
from flexkv_sim.model import ModelSpec
from flexkv_sim.simulator import Simulation
from flexkv_sim.workloads.request import Request, Workload

TPB = 16
BLOCK_BYTES = 512
TINY = ModelSpec(name="tiny", layers=4, q_heads=1, kv_heads=1, head_dim=1, params=1e6, kv_bytes_per_element=4)
SECONDS_PER_TOKEN = 0.001


def link(blocks_per_s: float = 1.0, latency_s: float = 0.0, queue_depth: int = 4) -> LinkSpec:
    return LinkSpec(bandwidth=blocks_per_s * BLOCK_BYTES, latency_s=latency_s, queue_depth=queue_depth)


def hardware(cpu_blocks: int | None = 64, ssd_blocks: int = 0, gpu_blocks: int = 1000,
             h2d: LinkSpec | None = None, remote_blocks: int = 0, copies_overlap_compute: bool = True) -> HardwareSpec:
    return HardwareSpec(
        name="tiny",
        gpu=GpuSpec(kv_capacity_blocks=gpu_blocks, copies_overlap_compute=copies_overlap_compute),
        h2d=h2d or link(),
        d2h=link(),
        cpu={"capacity_blocks": cpu_blocks} if cpu_blocks else None,
        ssd=SsdSpec({"capacity_blocks": ssd_blocks}, 1, link(), link()) if ssd_blocks else None,
        remote=RemoteSpec({"capacity_blocks": remote_blocks}, link()) if remote_blocks else None,
    )


def workload(specs, tokens_per_block: int = TPB) -> Workload:
    """``specs``: (arrival_s, block_ids, input_length, output_length) per request, in arrival order."""
    return Workload("test", tokens_per_block, [
        Request(i, arrival, input_length, output_length, tuple(ids), tokens_per_block)
        for i, (arrival, ids, input_length, output_length) in enumerate(specs)
    ])


@pytest.fixture
def linear_profile(tmp_path):
    """A measured-profile CSV whose fit is exactly ``SECONDS_PER_TOKEN`` x new tokens."""
    path = tmp_path / "profile.csv"
    rows = ["tokens,context,seconds"] + [f"{t},{c},{t * SECONDS_PER_TOKEN}" for t in (1, 16, 64, 256)
                                         for c in (0, 100, 1000)]
    path.write_text("\n".join(rows) + "\n")
    return str(path)


@pytest.fixture
def sim(linear_profile):
    """Build a Simulation of the tiny model on the linear profile; keyword arguments override."""

    def build(requests: Workload, *, prefix_caching: bool = True, layerwise: bool = False,
              max_tokens: int = 8192, engine: dict | None = None, **kwargs) -> Simulation:
        kwargs.setdefault("hardware", hardware())
        engine = EngineConfig(step_profile=linear_profile, enable_prefix_caching=prefix_caching,
                              layerwise_load=layerwise, max_num_batched_tokens=max_tokens, **(engine or {}))
        return Simulation(requests, model=TINY, engine=engine, **kwargs)

    return build


@pytest.fixture
def tiny():
    return SimpleNamespace(hardware=hardware, link=link, workload=workload, TPB=TPB, BLOCK_BYTES=BLOCK_BYTES,
                           model=TINY, seconds_per_token=SECONDS_PER_TOKEN)
