"""One real vLLM engine (CPU, dummy weights) running a scripted scenario, in a process of its own.

    python tests/connector/engine_job.py '<json job>' RESULT.json

The job names the model folder, the engine's settings, the FlexKV extra config
(or none, for a run without the connector) and a list of actions: ``generate``
(greedy, token ids and their logprobs out), ``flush`` (wait for every
offload), ``reset`` (drop vLLM's own prefix cache) and ``totals`` (the
connector's counters). ``loading`` says how vLLM finds the connector:
``module_path`` (the extra config) or ``in_tree`` (vLLM's own
``FlexKVConnectorV1`` name, the same settings in a ``FLEXKV_CONFIG_PATH``
file). The results, by action name, go to RESULT.json, with the class of the
KV connector vLLM runs. The engine tests start each engine here, so that each
one is fresh and a restart is a real new process.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import yaml


def sharpen(worker) -> None:
    """Make vLLM's dummy model's outputs depend on its KV: its weights (uniform in +-1e-3) give flat logits
    whatever it reads. The CPU backend prepacks linear weights at load, so only the norm weights can still
    change: at 1000 they undo the small scale, and greedy tokens and logprobs follow every KV block read."""
    import torch

    with torch.no_grad():
        for param in worker.model_runner.model.parameters():
            if param.dim() == 1:
                param.fill_(1000.0)


def connector_class(worker) -> str:
    """The class of the KV connector vLLM runs in this worker."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    cls = type(get_kv_transfer_group())
    return f"{cls.__module__}.{cls.__qualname__}"


def transfer_config(job: dict, workdir: Path):
    """The same settings either way; in tree, vLLM is given only the connector's name, as its users type it."""
    from vllm.config import KVTransferConfig

    common = {"kv_role": "kv_both", "kv_load_failure_policy": "recompute", "engine_id": job.get("engine_id")}
    if job.get("loading", "module_path") == "module_path":
        return KVTransferConfig(kv_connector="FlexKVConnector", kv_connector_module_path="connector.flexkv_connector",
                                kv_connector_extra_config=job["connector"], **common)
    path = workdir / "flexkv.yaml"
    path.write_text(yaml.safe_dump(job["connector"]))
    os.environ["FLEXKV_CONFIG_PATH"] = str(path)  # the engine's processes inherit it
    return KVTransferConfig(kv_connector="FlexKVConnectorV1", **common)


def run(job: dict, workdir: Path) -> dict:
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc ships sharpen() to the worker
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from connector.flexkv_connector import WORKER_EXTENSION, connector_totals, wait_for_offloads

    kwargs = {}
    if job.get("connector") is not None:
        kwargs["worker_extension_cls"] = WORKER_EXTENSION
        kwargs["kv_transfer_config"] = transfer_config(job, workdir)
    llm = LLM(model=job["model"], load_format="dummy", skip_tokenizer_init=True, seed=0, enforce_eager=True,
              block_size=32, gpu_memory_utilization=0.2, kv_cache_memory_bytes=job.get("kv_cache_bytes", 64 << 20),
              max_model_len=job.get("max_model_len", 4096),
              max_num_batched_tokens=job.get("max_num_batched_tokens", 512), **kwargs)
    llm.collective_rpc(sharpen)
    result: dict = {"outputs": {}, "logprobs": {}, "totals": {}}
    if "kv_transfer_config" in kwargs:
        result["connector_class"] = llm.collective_rpc(connector_class)[0]
    for action in job["actions"]:
        kind = action["do"]
        if kind == "generate":
            params = SamplingParams(temperature=0, max_tokens=action.get("max_tokens", 8), detokenize=False,
                                    logprobs=0)
            prompts = [TokensPrompt(prompt_token_ids=tokens) for tokens in action["prompts"]]
            outputs = llm.generate(prompts, params, use_tqdm=False)
            result["outputs"][action["name"]] = [list(o.outputs[0].token_ids) for o in outputs]
            # the sampled tokens' logprobs: far more sensitive to the KV a request read than the tokens
            result["logprobs"][action["name"]] = [
                [step[token].logprob for step, token in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]
                for o in outputs]
        elif kind == "flush":
            wait_for_offloads(llm)
        elif kind == "reset":
            assert llm.reset_prefix_cache(), "vLLM's prefix cache could not be reset"
        elif kind == "totals":
            result["totals"][action["name"]] = connector_totals(llm)
        else:
            raise ValueError(f"unknown action {kind!r}")
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    result_path = Path(sys.argv[2])
    result_path.write_text(json.dumps(run(json.loads(sys.argv[1]), result_path.parent)))
