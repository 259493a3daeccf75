"""KV block gather/scatter throughput against a plain contiguous copy of the same bytes.

`python -m experiments bench copy [--device cpu|cuda] [...]`.  The engine KV is
vLLM-shaped (per-layer paged tensors); the batch is blocks picked at random from a
larger cache, landing in the pool in random order (in random slots of a larger pool
with --pool-slots).  On CUDA the pool is pinned host
memory, so gather is D2H and scatter is H2D, each compared with one pinned `copy_` of
the same size.  The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import torch
from tqdm import tqdm

from experiments.bench._args import whole
from kernels import KVLayout, gather_blocks, scatter_blocks

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp8": torch.float8_e4m3fn}
# Show a progress bar only when the timed rounds are expected to take longer than this.
PROGRESS_AFTER_S = 5.0


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments bench copy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--backend", choices=["auto", "torch", "triton"], default="auto")
    parser.add_argument(
        "--layout",
        choices=["blocks-first", "kv-first"],
        default="blocks-first",
        help="[num_blocks, kv_heads, block_size, 2*head_dim] or [2, num_blocks, block_size, kv_heads, head_dim]",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--layers", type=whole, default=32)
    parser.add_argument("--kv-heads", type=whole, default=8)
    parser.add_argument("--head-dim", type=whole, default=128)
    parser.add_argument("--block-size", type=whole, default=16)
    parser.add_argument("--blocks", type=whole, default=256, help="blocks copied per batch")
    parser.add_argument("--cache-blocks", type=whole, help="blocks in the engine cache (default: 2 x --blocks)")
    parser.add_argument("--pool-slots", type=whole, help="slots in the pool (default: --blocks, i.e. a permutation)")
    parser.add_argument("--iters", type=whole, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.cache_blocks = args.cache_blocks or 2 * args.blocks
    args.pool_slots = args.pool_slots or args.blocks
    if not args.blocks <= min(args.cache_blocks, args.pool_slots):
        parser.error("--blocks must not exceed --cache-blocks or --pool-slots")
    return args


def _make_layers(args: argparse.Namespace, device: torch.device) -> list[torch.Tensor]:
    if args.layout == "blocks-first":
        shape = (args.cache_blocks, args.kv_heads, args.block_size, 2 * args.head_dim)
    else:
        shape = (2, args.cache_blocks, args.block_size, args.kv_heads, args.head_dim)
    layers = []
    for index in range(args.layers):
        layer = torch.empty(shape, dtype=DTYPES[args.dtype], device=device)
        layer.view(torch.uint8).fill_(index % 7)  # touch every page so page faults stay out of the timings
        layers.append(layer)
    return layers


def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """Seconds one call of `fn` takes: CUDA events on the GPU, wall clock on CPU."""
    if device.type == "cuda":
        def cuda_time(fn: Callable[[], object]) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        return cuda_time

    def wall_time(fn: Callable[[], object]) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    return wall_time


def main(argv: list[str]) -> int:
    args = _parse(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here")
        return 2
    generator = torch.Generator().manual_seed(args.seed)
    layers = _make_layers(args, device)
    layout = KVLayout.from_layers(layers)
    pool = layout.empty_pool(args.pool_slots, pin_memory=device.type == "cuda").fill_(1)
    block_ids = torch.randperm(args.cache_blocks, generator=generator)[: args.blocks]
    slot_ids = torch.randperm(args.pool_slots, generator=generator)[: args.blocks]
    nbytes = args.blocks * layout.block_bytes

    # One contiguous copy of the same number of bytes in each direction the batch copies go, on
    # torch's intra-op threads like the kernels' ops.  It moves 8-byte words: on CPU torch's byte
    # copy_ runs ~15% below a word copy_ (which matches glibc memcpy on every core), and the
    # baseline must be the machine's limit, not a slow copy.
    word = torch.int64 if nbytes % 8 == 0 else torch.uint8
    words = nbytes // torch.empty((), dtype=word).element_size()
    engine_side = torch.ones(words, dtype=word, device=device)
    host_side = torch.ones(words, dtype=word, pin_memory=device.type == "cuda")
    ops = {
        "gather": lambda: gather_blocks(layers, block_ids, pool, slot_ids, backend=args.backend),
        "scatter": lambda: scatter_blocks(pool, slot_ids, layers, block_ids, backend=args.backend),
    }
    if device.type == "cuda":
        ops["memcpy_d2h"] = lambda: host_side.copy_(engine_side, non_blocking=True)
        ops["memcpy_h2d"] = lambda: engine_side.copy_(host_side, non_blocking=True)
        baseline = {"gather": "memcpy_d2h", "scatter": "memcpy_h2d"}
    else:
        ops["memcpy"] = lambda: host_side.copy_(engine_side)
        baseline = {"gather": "memcpy", "scatter": "memcpy"}

    timer = _timer(device)
    round_started = time.perf_counter()
    for _ in range(max(1, args.warmup)):
        for fn in ops.values():
            timer(fn)
    round_s = (time.perf_counter() - round_started) / max(1, args.warmup)
    rounds = range(args.iters)
    if round_s * args.iters > PROGRESS_AFTER_S:
        rounds = tqdm(rounds, desc="bench copy", unit="round")
    seconds: dict[str, list[float]] = {name: [] for name in ops}
    for _ in rounds:
        for name, fn in ops.items():
            seconds[name].append(timer(fn))

    gbps = {name: nbytes / statistics.median(times) / 1e9 for name, times in seconds.items()}
    ratios = {name: gbps[name] / gbps[reference] for name, reference in baseline.items()}
    print(f"{args.layers} layers x {args.blocks} blocks of {layout.block_bytes / 2**20:.2f} MiB "
          f"({nbytes / 2**30:.2f} GiB), {args.layout} {args.dtype} on {device}, median of {args.iters}")
    print(f"{'op':<12}{'GB/s':>8}{'ms':>10}{'vs memcpy':>11}")
    for name, rate in gbps.items():
        ratio = f"{ratios[name]:.2f}x" if name in ratios else ""
        print(f"{name:<12}{rate:>8.2f}{nbytes / rate / 1e6:>10.2f}{ratio:>11}")
    print(json.dumps({
        "gather_gbps": round(gbps["gather"], 3),
        "scatter_gbps": round(gbps["scatter"], 3),
        "memcpy_gbps": round(min(gbps[reference] for reference in baseline.values()), 3),
        "ratio": round(min(ratios.values()), 3),
        "device": device.type,
        "threads": torch.get_num_threads(),
        "block_bytes": layout.block_bytes,
        "blocks": args.blocks,
    }))
    return 0
