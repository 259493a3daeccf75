"""FlexKV under vLLM, step by step: a long prompt, its KV offloaded, vLLM's own cache emptied, the prompt again.

    python experiments/vllm_prefix_caching.py --model /path/to/model [--dummy] [--ssd-dir /nvme/kv]

The second run of the prompt is served by the connector, and its output
matches the first: from the CPU tier, or with ``--ssd-dir`` and a CPU tier
smaller than the prompt, from the SSD tier (every block is written through to
it). The CPU tier must still take a few prefill chunks at once: a step's new
blocks that find no free or evictable CPU slot are not offloaded. ``--dummy`` runs a folder holding only a config.json
with random weights (no tokenizer), as on a CPU-only machine.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model name or folder (required: there is no default)")
    parser.add_argument("--dummy", action="store_true", help="random weights and no tokenizer (config.json only)")
    parser.add_argument("--prompt-tokens", type=int, default=4096)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--cpu-gb", type=float, default=4.0, help="CPU tier per worker")
    parser.add_argument("--ssd-dir", type=Path, default=None, help="add an SSD tier in this directory")
    parser.add_argument("--ssd-gb", type=float, default=16.0)
    parser.add_argument("--block-size", type=int, default=32, help="vLLM's CPU backend needs a multiple of 32")
    parser.add_argument("--kv-cache-gb", type=float, default=1.0)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512,
                        help="prefill chunk: each step's full blocks are offloaded as the step ends")
    return parser.parse_args(argv)


def connector_config(args: argparse.Namespace) -> dict:
    extra = {"config": "default", "cpu_bytes": int(args.cpu_gb * 2**30)}
    if args.ssd_dir is not None:
        extra.update(config="cpu_ssd", ssd_dirs=[str(args.ssd_dir)], ssd_bytes=int(args.ssd_gb * 2**30))
    return extra


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    from connector.flexkv_connector import WORKER_EXTENSION, connector_totals, wait_for_offloads

    llm = LLM(
        model=args.model, seed=0, block_size=args.block_size, gpu_memory_utilization=0.3,
        kv_cache_memory_bytes=int(args.kv_cache_gb * 2**30),
        max_model_len=args.prompt_tokens + args.max_tokens + args.block_size,
        max_num_batched_tokens=args.max_num_batched_tokens,
        **({"load_format": "dummy", "skip_tokenizer_init": True} if args.dummy else {}),
        worker_extension_cls=WORKER_EXTENSION,  # wait_for_offloads and connector_totals
        kv_transfer_config=KVTransferConfig(
            kv_connector="FlexKVConnector", kv_connector_module_path="connector.flexkv_connector",
            kv_role="kv_both", kv_load_failure_policy="recompute", engine_id="vllm-prefix-caching-example",
            kv_connector_extra_config=connector_config(args)),
    )
    vocab = llm.llm_engine.model_config.get_vocab_size()
    rng = random.Random(0)
    prompt = TokensPrompt(prompt_token_ids=[rng.randrange(3, vocab) for _ in range(args.prompt_tokens)])
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, detokenize=not args.dummy)

    def run(label: str) -> list[int]:
        started = time.perf_counter()
        [output] = llm.generate([prompt], params, use_tqdm=False)
        print(f"{label}: {time.perf_counter() - started:.3f} s, first tokens {list(output.outputs[0].token_ids)[:8]}")
        return list(output.outputs[0].token_ids)

    first = run("first run (prefill computed, KV offloaded as it is computed)")
    wait_for_offloads(llm)  # every copy landed in its tier, and the connector's scheduler knows it
    assert llm.reset_prefix_cache(), "vLLM's prefix cache could not be reset"
    before = connector_totals(llm)
    second = run("second run (vLLM's prefix cache emptied: KV from FlexKV)")
    after = connector_totals(llm)
    served = {name: after[name] - before.get(name, 0) for name in after if name.startswith("hit_tokens_")}
    print(f"tokens served by the connector: {served} of {args.prompt_tokens}; same output: {first == second}")
    print(json.dumps({"same_output": first == second, **served}))
    return 0 if first == second else 1


if __name__ == "__main__":
    raise SystemExit(main())
