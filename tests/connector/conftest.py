"""vLLM's real Scheduler with the FlexKV connector, and in-process workers that stand in for the model.

A fake forward writes into the engine's KV tensors a value that depends only on
the token and its position (and the layer and rank), so any block a request
reads, whether computed, found in vLLM's prefix cache or loaded by the
connector, can be checked. Every step checks, before writing, that each
scheduled request's already-computed positions hold exactly those values: a
load that lands late, a copy that read a reused block, or a wrong block id
shows up at once.
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from connector.flexkv_connector import FlexKVConnector  # noqa: E402
from connector.scheduler_side import FlexKVScheduler  # noqa: E402
from connector.worker_side import FlexKVWorker  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.config import (  # noqa: E402
    CacheConfig,
    DeviceConfig,
    KVTransferConfig,
    ModelConfig,
    SchedulerConfig,
    VllmConfig,
)
from vllm.distributed.kv_transfer.kv_connector.utils import KVOutputAggregator  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole  # noqa: E402
from vllm.utils.hashing import sha256  # noqa: E402
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash  # noqa: E402
from vllm.v1.core.sched.output import SchedulerOutput  # noqa: E402
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec  # noqa: E402
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput  # noqa: E402
from vllm.v1.request import Request  # noqa: E402
from vllm.v1.structured_output import StructuredOutputManager  # noqa: E402

BLOCK = 32
LAYERS = ("model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn")
KV_HEADS, HEAD = 2, 16
#: a small Llama; the engine tests load it with dummy weights, the scheduler tests only read its config
TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256, "intermediate_size": 512,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
    "vocab_size": 1024, "max_position_embeddings": 4096, "torch_dtype": "bfloat16", "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
}

init_none_hash(sha256)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A model folder holding only config.json (vLLM loads it with load_format='dummy')."""
    path = tmp_path_factory.mktemp("tiny-llama")
    (path / "config.json").write_text(json.dumps(TINY_LLAMA))
    return path


def kv_value(token: int, position: int, layer: int, rank: int) -> float:
    """What the fake forward writes for a token at a position; small integers are exact in bf16."""
    return float((token * 31 + position * 7 + layer * 3 + rank * 5) % 251)


def next_token(tokens: list[int]) -> int:
    return (tokens[-1] * 13 + len(tokens)) % 1000 + 3


def prompt(seed: int, length: int) -> list[int]:
    return [(seed * 7919 + i * 104729) % 1000 + 3 for i in range(length)]


class Engine:
    """One engine: the scheduler, ``world_size`` workers and their KV tensors; ``step`` is one engine step."""

    def __init__(self, model_dir, extra: dict, *, num_gpu_blocks: int = 64, world_size: int = 1,
                 max_num_batched_tokens: int = 128, max_num_seqs: int = 8, settle: bool = False) -> None:
        #: wait for each step's transfers before the next step, so when they are reported is fixed
        self.settle = settle
        self.config = VllmConfig(
            model_config=ModelConfig(model=str(model_dir), dtype="bfloat16", seed=0, skip_tokenizer_init=True,
                                     max_model_len=4096),
            scheduler_config=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                             max_model_len=4096, enable_chunked_prefill=True,
                                             is_encoder_decoder=False),
            cache_config=CacheConfig(block_size=BLOCK, enable_prefix_caching=True),
            kv_transfer_config=KVTransferConfig(
                kv_connector="FlexKVConnector", kv_connector_module_path="connector.flexkv_connector",
                kv_role="kv_both", kv_load_failure_policy="recompute", engine_id="sched-test",
                kv_connector_extra_config=extra),
            device_config=DeviceConfig("cpu"),
        )
        self.config.cache_config.num_gpu_blocks = num_gpu_blocks
        spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=KV_HEADS, head_size=HEAD, dtype=torch.bfloat16)
        kv_cache_config = KVCacheConfig(num_blocks=num_gpu_blocks, kv_cache_tensors=[],
                                        kv_cache_groups=[KVCacheGroupSpec(list(LAYERS), spec)])
        self.scheduler = Scheduler(vllm_config=self.config, kv_cache_config=kv_cache_config, log_stats=True,
                                   structured_output_manager=StructuredOutputManager(self.config), block_size=BLOCK)
        connector: FlexKVConnector = self.scheduler.connector
        settings = dataclasses.replace(connector.scheduler.settings, world_size=world_size)
        if world_size > 1:  # the config says one worker; the scheduler half is told of more
            connector.scheduler.shutdown()
            connector.scheduler = FlexKVScheduler(settings)
            connector.scheduler.kv_cache_manager = self.scheduler.kv_cache_manager
        self.flexkv = connector.scheduler
        self.workers: list[FlexKVConnector] = []
        self.kv: list[list[torch.Tensor]] = []
        for rank in range(world_size):
            worker = FlexKVConnector(self.config, KVConnectorRole.WORKER, kv_cache_config)
            worker.worker = FlexKVWorker(settings, rank)
            layers = [torch.full((num_gpu_blocks, KV_HEADS, BLOCK, 2 * HEAD), -1.0, dtype=torch.bfloat16)
                      for _ in LAYERS]
            worker.register_kv_caches(dict(zip(LAYERS, layers)))
            self.workers.append(worker)
            self.kv.append(layers)
        self.aggregator = KVOutputAggregator(world_size)
        self.outputs: dict[str, list[int]] = {}
        self.preempted: set[str] = set()
        #: called between schedule and the workers, like an abort arriving while a step runs
        self.after_schedule: Callable[[SchedulerOutput], None] | None = None

    # ------------------------------------------------------------ requests

    def add(self, rid: str, tokens: list[int], max_tokens: int = 4) -> Request:
        request = Request(request_id=rid, prompt_token_ids=list(tokens),
                          sampling_params=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                          pooling_params=None, block_hasher=get_request_block_hasher(BLOCK, sha256))
        self.scheduler.add_request(request)
        self.outputs[rid] = []
        return request

    # ---------------------------------------------------------------- steps

    def step(self) -> SchedulerOutput:
        out = self.scheduler.schedule()
        self.preempted |= set(out.preempted_req_ids or ())
        if self.after_schedule is not None:
            self.after_schedule(out)
        self._forward(out)
        results = [self._worker_step(worker, out) for worker in self.workers]
        merged = self.aggregator.aggregate(results)
        for outputs in self.scheduler.update_from_output(out, merged).values():
            for output in outputs.outputs:
                self.outputs[output.request_id] += output.new_token_ids
        return out

    def _forward(self, out: SchedulerOutput) -> None:
        """Check what each scheduled request reads, then write what this step computes."""
        for rid, n in out.num_scheduled_tokens.items():
            request = self.scheduler.requests[rid]
            start = request.num_computed_tokens - n  # schedule() already advanced it
            block_ids = self.scheduler.kv_cache_manager.get_block_ids(rid)[0]
            tokens = request.all_token_ids
            assert self.blocks_hold(tokens, block_ids, 0, start), f"{rid} reads wrong KV before position {start}"
            self._write(tokens, block_ids, start, start + n)

    def _positions(self, tokens, block_ids, begin, end):
        for position in range(begin, end):
            yield position, block_ids[position // BLOCK], position % BLOCK, tokens[position]

    def _write(self, tokens, block_ids, begin, end) -> None:
        for rank, layers in enumerate(self.kv):
            for layer, kv in enumerate(layers):
                for position, block, offset, token in self._positions(tokens, block_ids, begin, end):
                    kv[block, :, offset, :] = kv_value(token, position, layer, rank)

    def blocks_hold(self, tokens, block_ids, begin, end) -> bool:
        """Whether every rank's KV tensors hold the values of ``tokens[begin:end]`` in ``block_ids``."""
        return all(
            bool((kv[block, :, offset, :] == kv_value(token, position, layer, rank)).all())
            for rank, layers in enumerate(self.kv)
            for layer, kv in enumerate(layers)
            for position, block, offset, token in self._positions(tokens, block_ids, begin, end)
        )

    def _worker_step(self, worker: FlexKVConnector, out: SchedulerOutput) -> ModelRunnerOutput:
        """The worker's hooks in the order vLLM's model runner calls them (async loads: after the forward)."""
        meta = out.kv_connector_metadata
        worker.bind_connector_metadata(meta)
        worker.handle_preemptions(meta)
        worker.start_load_kv(None)
        worker.wait_for_save()
        sending, recving = worker.get_finished(out.finished_req_ids)
        kv_output = KVConnectorOutput(finished_sending=sending or None, finished_recving=recving or None,
                                      invalid_block_ids=worker.get_block_ids_with_load_errors(),
                                      kv_connector_stats=worker.get_kv_connector_stats(),
                                      kv_connector_worker_meta=worker.build_connector_worker_meta())
        worker.clear_connector_metadata()
        if self.settle:
            worker.worker.engine.flush()
        req_ids = list(out.num_scheduled_tokens)
        sampled = []
        for rid in req_ids:
            request = self.scheduler.requests[rid]
            done_prefill = request.num_computed_tokens >= request.num_tokens
            sampled.append([next_token(request.all_token_ids)] if done_prefill else [])
        return ModelRunnerOutput(req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
                                 sampled_token_ids=sampled, kv_connector_output=kv_output)

    def run(self, until: Callable[[], bool] | None = None, max_steps: int = 3000) -> int:
        """Step until ``until()`` (default: nothing left to do at all); returns the steps taken."""
        until = until or (lambda: not self.scheduler.has_requests())
        for steps in range(max_steps):
            if until():
                return steps
            self.step()
        raise AssertionError(f"not done after {max_steps} steps")

    # ---------------------------------------------------------------- views

    def totals(self) -> dict:
        merged: dict = {}
        for worker in self.workers:
            for name, value in worker.worker.totals.items():
                merged[name] = merged.get(name, 0) + value
        return merged

    def assert_clean(self) -> None:
        """No request, block, pin or transfer left anywhere."""
        sched = self.scheduler
        assert not sched.requests and not sched.waiting and not sched.running
        pool = sched.kv_cache_manager.block_pool
        assert pool.free_block_queue.num_free_blocks == pool.num_gpu_blocks - 1
        manager = self.flexkv.manager
        assert manager.ops_in_flight == 0 and manager.pinned_blocks() == 0
        manager.check_invariants()
        assert not self.flexkv._requests

    def close(self) -> None:
        for worker in self.workers:
            worker.shutdown()
        self.scheduler.shutdown()


@pytest.fixture
def make_engine(tiny_model):
    engines: list[Engine] = []

    def make(extra: dict, **kwargs) -> Engine:
        engine = Engine(tiny_model, extra, **kwargs)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


@pytest.fixture(scope="session")
def make_prompt():
    return prompt


ENGINE_JOB = Path(__file__).with_name("engine_job.py")
PROJECT_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def run_engine(tiny_model, tmp_path_factory):
    """Run one engine job (see engine_job.py) in a fresh process; returns its result."""

    def run(job: dict, timeout: float = 300) -> dict:
        result = tmp_path_factory.mktemp("engine-job") / "result.json"
        job = {"model": str(tiny_model), **job}
        done = subprocess.run([sys.executable, str(ENGINE_JOB), json.dumps(job), str(result)], cwd=PROJECT_ROOT,
                              capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise AssertionError(f"engine job failed ({done.returncode}):\n{done.stderr[-6000:]}")
        return json.loads(result.read_text())

    return run
