"""`python -m experiments bench e2e`: time to first token of a repeated 8K-token prompt on real vLLM.

vLLM's CPU build runs a dummy-weight Llama sized so that the prefill of 8K
tokens takes seconds (hidden 1024, 8 layers, 16 heads, 4 KV heads, head 64).
The median TTFT (the wall time of a one-token generate) of the same prompt is
taken five ways, each engine in a fresh process:

* recompute: no connector, vLLM's prefix cache reset before each run;
* local hit: no connector, the prompt still in vLLM's own prefix cache;
* FlexKV CPU hit: prefix cache reset, the blocks loaded from FlexKV's CPU tier;
* FlexKV SSD hit: the CPU tier holds about one prompt, so two prompts taken in
  turn each come back from the SSD tier;
* ExampleConnector: vLLM's example connector, which reloads from its files.

The last line is JSON: the five medians and the ratios the targets are about
(CPU hit <= 1.5x local hit and <= 0.05x recompute, SSD hit <= 0.1x recompute,
CPU hit <= 0.5x ExampleConnector).
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from experiments.bench._args import whole

MODEL = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 1024, "intermediate_size": 2816,
    "num_hidden_layers": 8, "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 64,
    "vocab_size": 32000, "max_position_embeddings": 16384, "torch_dtype": "bfloat16", "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
}
BLOCK_TOKENS = 32


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments bench e2e", description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt-tokens", type=whole, default=8192)
    parser.add_argument("--reps", type=whole, default=3, help="timed runs per case (the first run is not timed)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the model folder and the SSD and example files go (default: a temp dir)")
    parser.add_argument("--case", choices=sorted(CASES), help=argparse.SUPPRESS)  # one engine, in a child process
    args = parser.parse_args(argv)
    if args.case:
        job_path = Path(args.workdir) / "job.json"
        result = CASES[args.case](json.loads(job_path.read_text()))
        (Path(args.workdir) / f"{args.case}.json").write_text(json.dumps(result))
        return 0

    with tempfile.TemporaryDirectory(prefix="flexkv-e2e-", dir=args.workdir) as work:
        work = Path(work)
        (work / "model").mkdir()
        (work / "model" / "config.json").write_text(json.dumps(MODEL))
        rng = random.Random(0)
        prompts = [[rng.randrange(3, MODEL["vocab_size"]) for _ in range(args.prompt_tokens)] for _ in range(2)]
        (work / "job.json").write_text(json.dumps({"work": str(work), "prompts": prompts, "reps": args.reps}))
        medians: dict[str, float] = {}
        for case in CASES:  # each engine in a fresh process, its memory returned at the end
            command = [sys.executable, "-m", "experiments", "bench", "e2e", "--case", case, "--workdir", str(work)]
            subprocess.run(command, check=True)
            medians.update(json.loads((work / f"{case}.json").read_text()))

    ratios = {
        "cpu_vs_local_hit": medians["flexkv_cpu_hit_s"] / medians["local_hit_s"],
        "cpu_vs_recompute": medians["flexkv_cpu_hit_s"] / medians["recompute_s"],
        "ssd_vs_recompute": medians["flexkv_ssd_hit_s"] / medians["recompute_s"],
        "cpu_vs_example": medians["flexkv_cpu_hit_s"] / medians["example_connector_s"],
    }
    targets = {"cpu_vs_local_hit": 1.5, "cpu_vs_recompute": 0.05, "ssd_vs_recompute": 0.1, "cpu_vs_example": 0.5}
    for name, value in medians.items():
        print(f"{name:>24}: {value:8.3f}{' s' if name.endswith('_s') else ''}")
    for name, ratio in ratios.items():
        print(f"{name:>24}: {ratio:8.3f}  (target <= {targets[name]}) {'ok' if ratio <= targets[name] else 'MISSED'}")
    print(json.dumps({**{k: round(v, 4) for k, v in medians.items()}, **{k: round(v, 4) for k, v in ratios.items()}}))
    return 0


# ------------------------------------------------------------------ engines


def _engine(job: dict, **kwargs: Any):
    from vllm import LLM

    return LLM(model=str(Path(job["work"]) / "model"), load_format="dummy", skip_tokenizer_init=True, seed=0,
               enforce_eager=True, block_size=BLOCK_TOKENS, gpu_memory_utilization=0.2,
               kv_cache_memory_bytes=512 << 20, max_model_len=len(job["prompts"][0]) + 64,
               max_num_batched_tokens=len(job["prompts"][0]) + 64, **kwargs)


def _ttft(llm, tokens: list[int]) -> float:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0, max_tokens=1, detokenize=False)
    started = time.perf_counter()
    llm.generate([TokensPrompt(prompt_token_ids=tokens)], params, use_tqdm=False)
    return time.perf_counter() - started


def _after_reset(llm, tokens: list[int]) -> float:
    assert llm.reset_prefix_cache(), "vLLM's prefix cache could not be reset"
    return _ttft(llm, tokens)


def _no_connector(job: dict) -> dict[str, float]:
    llm = _engine(job)
    prompt, reps = job["prompts"][0], job["reps"]
    _ttft(llm, prompt)
    recompute = [_after_reset(llm, prompt) for _ in range(reps)]
    local = [_ttft(llm, prompt) for _ in range(reps)]
    return {"recompute_s": statistics.median(recompute), "local_hit_s": statistics.median(local)}


def _flexkv(job: dict) -> dict[str, float]:
    from vllm.config import KVTransferConfig

    from connector.flexkv_connector import WORKER_EXTENSION, connector_totals, wait_for_offloads

    prompt_blocks = len(job["prompts"][0]) // BLOCK_TOKENS
    extra = {"config": "cpu_ssd", "cpu_blocks": prompt_blocks + prompt_blocks // 8,  # room for one prompt
             "ssd_dirs": [str(Path(job["work"]) / "ssd")], "ssd_blocks": 4 * prompt_blocks}
    llm = _engine(job, worker_extension_cls=WORKER_EXTENSION, kv_transfer_config=KVTransferConfig(
        kv_connector="FlexKVConnector", kv_connector_module_path="connector.flexkv_connector", kv_role="kv_both",
        kv_load_failure_policy="recompute", kv_connector_extra_config=extra))
    first, second = job["prompts"]
    reps = job["reps"]

    def share_of_prompt_tokens(tier: str, before: dict) -> float:
        """Of the prompt tokens of the timed runs since ``before``, the share the tier served."""
        name = f"hit_tokens_{tier}"
        return (connector_totals(llm).get(name, 0) - before.get(name, 0)) / (reps * len(first))

    _ttft(llm, first)
    wait_for_offloads(llm)
    before = connector_totals(llm)
    cpu = [_after_reset(llm, first) for _ in range(reps)]
    from_cpu = share_of_prompt_tokens("cpu", before)
    _ttft(llm, second)  # its blocks push the first prompt's out of the CPU tier
    wait_for_offloads(llm)
    before = connector_totals(llm)
    ssd = []
    for rep in range(reps):  # each prompt in turn comes back from SSD and pushes the other out of the CPU tier
        ssd.append(_after_reset(llm, job["prompts"][rep % 2]))
        wait_for_offloads(llm)
    return {"flexkv_cpu_hit_s": statistics.median(cpu), "flexkv_ssd_hit_s": statistics.median(ssd),
            "cpu_tier_share_of_cpu_hit_tokens": from_cpu,
            "ssd_tier_share_of_ssd_hit_tokens": share_of_prompt_tokens("ssd", before)}


def _example_connector(job: dict) -> dict[str, float]:
    from vllm.config import KVTransferConfig

    llm = _engine(job, kv_transfer_config=KVTransferConfig(
        kv_connector="ExampleConnector", kv_role="kv_both",
        kv_connector_extra_config={"shared_storage_path": str(Path(job["work"]) / "example")}))
    prompt = job["prompts"][0]
    _ttft(llm, prompt)
    return {"example_connector_s": statistics.median(_after_reset(llm, prompt) for _ in range(job["reps"]))}


CASES = {"no_connector": _no_connector, "flexkv": _flexkv, "example_connector": _example_connector}
