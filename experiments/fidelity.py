"""`python -m experiments fidelity`: the digital twin, checked against real vLLM on this machine.

1. Calibrate. Real vLLM (the CPU build, a small Llama with dummy weights, ``conf/fidelity.yaml``)
   runs with the FlexKV connector on prompts of its own. Every engine step is timed with the new
   tokens it computes, the KV tokens it reads and its attention pairs (the step-time profile the
   simulator fits), prefills after an idle spell give the cold-start factor, loads from the CPU
   tier are timed end to end through the connector, and the logic of ``bench copy`` and
   ``bench ssd`` measures the copy and SSD bandwidths.
2. Serve. Both caches are emptied and the workload is served in real time, each request added
   at its arrival time. For every request the decision is logged (blocks from vLLM's own prefix
   cache, and from each tier as the control plane counts them while it plans the load) with its
   time to first token, and every step with its shape and timing (``steps`` of each run).
3. Simulate and compare. The simulator, given the measured profile and links and the same
   tiers and policies, serves the same workload. Per request: |sim - real| / real of TTFT, and
   whether the blocks served from each tier match. The real workload is served several times
   (``fidelity.real_runs``) and a request's real TTFT is its median over the runs: on a 2-core box
   one run in a few has stalls of its own (earlier: one run's p90 against the others 40-73%, the
   others' 22-25%). Each run against the median of the others, pooled, is the real system's own
   run-to-run error: the floor for the twin's. Decisions are compared with the one most real runs
   made; a request the real runs themselves serve from different tiers (a race: whether a block is
   still in vLLM's cache depends on how far the engine has fallen behind) is listed as contested,
   and there only hit or miss has to agree. The last line is one JSON object.

The real engine runs in a subprocess (``python -m experiments.fidelity JOB.json``) with the
environment of ``fidelity.engine_env``; ``fidelity.measured=<measured.json>`` simulates and
compares again from an earlier run's measurements, without vLLM.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pandas as pd
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from experiments.common import CONF_DIR, PROJECT_ROOT, load_workload
from flexkv_sim.engine import EngineConfig
from flexkv_sim.hardware import HardwareSpec
from flexkv_sim.metrics import request_frame
from flexkv_sim.model import ModelSpec, StepTime
from flexkv_sim.model import profile as profile_fit
from flexkv_sim.simulator import Simulation
from flexkv_sim.workloads.request import Workload

TIERS = ("gpu", "cpu", "ssd")
#: per-request columns both sides report besides ``ttft_s``: the blocks each tier served
DECISION_COLUMNS = tuple(f"{tier}_hit_blocks" for tier in TIERS)


# --------------------------------------------------------------- the comparison


def compare(real: pd.DataFrame, sim: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Join the two runs by ``request_id`` (columns ``ttft_s`` and ``DECISION_COLUMNS`` on each side).

    Returns one row per request (``ttft_real_s``, ``ttft_sim_s``, ``ttft_err``, each side's blocks
    per tier, ``decision_agrees``: the same blocks from every tier, ``hit_blocks_agree``: the same
    blocks from the cache in all) and the summary: median and p90 of the TTFT error and whether
    every request's decision agrees. Two real runs compare the same way (the second as "sim").
    """
    columns = ["request_id", "ttft_s", *DECISION_COLUMNS]
    missing = {side: sorted(set(columns) - set(frame.columns)) for side, frame in (("real", real), ("sim", sim))}
    if any(missing.values()):
        raise ValueError(f"missing columns: {missing}")
    joined = real[columns].merge(sim[columns], on="request_id", how="outer", suffixes=("_real", "_sim"),
                                 indicator=True)
    unmatched = joined[joined["_merge"] != "both"].request_id.tolist()
    if unmatched:
        raise ValueError(f"requests served by only one side: {unmatched[:10]}")
    frame = joined.drop(columns="_merge").rename(columns={"ttft_s_real": "ttft_real_s", "ttft_s_sim": "ttft_sim_s"})
    frame["ttft_err"] = (frame.ttft_sim_s - frame.ttft_real_s).abs() / frame.ttft_real_s
    frame["decision_agrees"] = np.logical_and.reduce(
        [frame[f"{c}_real"] == frame[f"{c}_sim"] for c in DECISION_COLUMNS])
    frame["hit_blocks_agree"] = (sum(frame[f"{c}_real"] for c in DECISION_COLUMNS)
                                 == sum(frame[f"{c}_sim"] for c in DECISION_COLUMNS))
    errors = frame.ttft_err.to_numpy()
    summary = {
        "requests": len(frame),
        "ttft_err_median": round(float(np.median(errors)), 4),
        "ttft_err_p90": round(float(np.percentile(errors, 90)), 4),
        "decisions_agree": bool(frame.decision_agrees.all()),
        "decisions_agreeing": int(frame.decision_agrees.sum()),
        "hit_blocks_agreeing": int(frame.hit_blocks_agree.sum()),
        "ttft_real_median_s": round(float(frame.ttft_real_s.median()), 4),
        "ttft_sim_median_s": round(float(frame.ttft_sim_s.median()), 4),
    }
    for tier in TIERS:
        summary[f"{tier}_hit_blocks_real"] = int(frame[f"{tier}_hit_blocks_real"].sum())
        summary[f"{tier}_hit_blocks_sim"] = int(frame[f"{tier}_hit_blocks_sim"].sum())
    return frame, summary


def median_run(runs: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Real runs of one workload as one: each request's median TTFT and the blocks per tier most runs took
    (on a tie, the earliest run's)."""
    ttft = pd.concat([run.set_index("request_id").ttft_s for run in runs], axis=1).median(axis=1)
    reference = runs[0].copy()
    reference["ttft_s"] = reference.request_id.map(ttft)
    votes = _decisions_by_run(runs)
    chosen = {rid: Counter(run[rid] for run in votes).most_common(1)[0][0] for rid in reference.request_id}
    reference[list(DECISION_COLUMNS)] = [list(chosen[rid]) for rid in reference.request_id]
    return reference


def contested(runs: Sequence[pd.DataFrame]) -> list[str]:
    """Requests whose blocks per tier differ between real runs: a race in the real system, with no one answer
    for the twin to match."""
    votes = _decisions_by_run(runs)
    return [rid for rid in votes[0] if len({run[rid] for run in votes}) > 1]


def _decisions_by_run(runs: Sequence[pd.DataFrame]) -> list[dict[str, tuple[int, ...]]]:
    return [dict(zip(run.request_id, map(tuple, run[list(DECISION_COLUMNS)].to_numpy().tolist()))) for run in runs]


def rerun_error(runs: Sequence[pd.DataFrame]) -> dict[str, Any]:
    """The real system against itself: each run against the median of the others, pooled over runs."""
    frames = [compare(median_run([*runs[:i], *runs[i + 1:]]), run)[0] for i, run in enumerate(runs)]
    errors = np.concatenate([frame.ttft_err.to_numpy() for frame in frames])
    return {"real_rerun_ttft_err_median": round(float(np.median(errors)), 4),
            "real_rerun_ttft_err_p90": round(float(np.percentile(errors, 90)), 4),
            "real_rerun_decisions_agree": all(bool(frame.decision_agrees.all()) for frame in frames)}


def served_from(frame: pd.DataFrame, side: str = "real") -> pd.Series:
    """How each request's prefix was served, named by the slowest tier it came from ('miss': none)."""
    names = pd.Series("miss", index=frame.index)
    for tier in TIERS:  # later tiers overwrite: the slowest one used names the request
        names = names.mask(frame[f"{tier}_hit_blocks_{side}"] > 0, f"{tier.upper()} hit")
    return names


def plot_ttft(frame: pd.DataFrame, summary: dict[str, Any], path: Path) -> Path:
    """Simulated against measured TTFT, one point per request, by how the real engine served it."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    real, sim = 1e3 * frame.ttft_real_s, 1e3 * frame.ttft_sim_s
    low, high = 0.8 * min(real.min(), sim.min()), 1.25 * max(real.max(), sim.max())
    line = np.geomspace(low, high, 50)
    ax.plot(line, line, color="black", linewidth=1, label="simulated = measured")
    ax.fill_between(line, 0.9 * line, 1.1 * line, color="green", alpha=0.15, label="within ±10%")
    ax.fill_between(line, 0.75 * line, 1.25 * line, color="green", alpha=0.07, label="within ±25%")
    kinds = served_from(frame)
    for kind, marker in zip(("miss", "GPU hit", "CPU hit", "SSD hit"), "osD^"):
        chosen = kinds == kind
        if chosen.any():
            agree = chosen & frame.decision_agrees
            ax.scatter(real[agree], sim[agree], marker=marker, s=30, label=f"{kind} ({int(chosen.sum())})")
            if (chosen & ~frame.decision_agrees).any():
                ax.scatter(real[chosen & ~frame.decision_agrees], sim[chosen & ~frame.decision_agrees], marker=marker,
                           s=60, facecolors="none", edgecolors="red")
    if not frame.decision_agrees.all():
        ax.scatter([], [], marker="o", s=60, facecolors="none", edgecolors="red", label="blocks per tier differ")
    ticks = [t for t in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000) if low <= t <= high]
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
        axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
        axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlim(low, high)
    ax.set_ylim(low, high)
    runs = summary.get("real_runs", 1)
    ax.set_xlabel("measured TTFT on real vLLM with the connector (ms, log scale)"
                  + (f", median of {runs} runs" if runs > 1 else ""))
    ax.set_ylabel("simulated TTFT (ms, log scale)")
    floor = (f"\na real run against the median of the others: median {100 * summary['real_rerun_ttft_err_median']:.1f}%, "
             f"p90 {100 * summary['real_rerun_ttft_err_p90']:.1f}%" if "real_rerun_ttft_err_median" in summary else "")
    ax.set_title(f"Digital twin vs real vLLM, {summary['requests']} requests: TTFT error median "
                 f"{100 * summary['ttft_err_median']:.1f}%, p90 {100 * summary['ttft_err_p90']:.1f}%{floor}\n"
                 f"blocks per tier agree for {summary['decisions_agreeing']} of {summary['requests']} requests, "
                 f"cached blocks in all for {summary['hit_blocks_agreeing']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", title="how the real engine served the prefix", title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class Prompt:
    request_id: str
    tokens: list[int]
    max_tokens: int
    arrival_s: float = 0.0


def block_tokens(block_id: int, tokens_per_block: int, vocab_size: int) -> np.ndarray:
    """The tokens a block id stands for: equal ids, equal tokens; distinct ids, (almost surely) distinct tokens."""
    return np.random.default_rng([block_id, 0x5EED]).integers(3, vocab_size, tokens_per_block)


def prompts_of(workload: Workload, vocab_size: int) -> list[Prompt]:
    """The workload's requests as token prompts whose shared prefixes are exactly its shared block ids."""
    tpb = workload.tokens_per_block
    prompts = []
    for request in workload.requests:
        tokens = np.concatenate([block_tokens(b, tpb, vocab_size) for b in request.block_ids])[: request.input_length]
        prompts.append(Prompt(str(request.request_id), tokens.tolist(), max(1, request.output_length),
                              request.arrival_s))
    return prompts


def random_prompt(rng: np.random.Generator, length: int, vocab_size: int) -> list[int]:
    return rng.integers(3, vocab_size, length).tolist()


# --------------------------------------------------------------- calibration


def step_profile(steps: Sequence[Sequence[float]], path: Path) -> Path:
    """The simulator's profile CSV (``tokens, context, attention, seconds``, steps that computed tokens).

    ``steps`` are (tokens, context, attention pairs, seconds), or (tokens, context, seconds) from a run
    that did not count attention pairs. Calibration repeats every step shape, and each shape keeps its
    median time; shapes still far off the simulator's own fit of them (``flexkv_sim.model.profile``), by
    their share of it (over 3 robust deviations and 10%: steps slowed by other processes on a shared
    machine), are dropped, so that the fit follows the engine, not the noise.
    """
    columns = ["tokens", "context", "attention"][: len(steps[0]) - 1]
    frame = pd.DataFrame(steps, columns=[*columns, "seconds"])
    frame = frame[frame.tokens > 0].groupby(columns, as_index=False).seconds.median()
    frame.to_csv(path, index=False)
    step = profile_fit(path)
    attention = frame.attention if "attention" in columns else 0 * frame.context  # no pairs: one line fitted
    predicted = np.array([step.of_row(t, a, c) for t, c, a in zip(frame.tokens, frame.context, attention)])
    off = frame.seconds / predicted - 1
    spread = 1.4826 * np.median(np.abs(off - np.median(off)))
    frame[np.abs(off - np.median(off)) <= max(3 * spread, 0.1)].to_csv(path, index=False)
    return path


def _last_json(run: Callable[[], Any]) -> dict[str, Any]:
    """Run a benchmark's ``main`` quietly and return the JSON object it ends with."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        run()
    return json.loads(out.getvalue().strip().splitlines()[-1])


def measure_copy(model: DictConfig, block_size: int, iters: int) -> dict[str, float]:
    """``bench copy`` on the engine's KV layout: gather is a store (engine -> CPU tier), scatter a load."""
    from experiments.bench import copy as bench_copy

    args = ["--layers", model.layers, "--kv-heads", model.kv_heads, "--head-dim", model.head_dim,
            "--block-size", block_size, "--blocks", 64, "--iters", iters]
    result = _last_json(lambda: bench_copy.main([str(a) for a in args]))
    return {"h2d_gbps": result["scatter_gbps"], "d2h_gbps": result["gather_gbps"]}


def measure_ssd(directory: Path, block_bytes: int, mib: int) -> dict[str, float]:
    """``bench ssd`` with the tier's block size in its directory."""
    from experiments.bench import ssd as bench_ssd

    args = ["--dir", directory, "--gib", mib / 1024, "--block-mib", block_bytes / 2**20, "--no-progress"]
    result = _last_json(lambda: bench_ssd.main([str(a) for a in args]))
    return {"ssd_read_gbps": result["read_gbps"], "ssd_write_gbps": result["write_gbps"]}


# -------------------------------------------------------------- real engine


def llama_config(model: DictConfig, max_model_len: int) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": model.hidden_size,
        "intermediate_size": model.intermediate_size, "num_hidden_layers": model.layers,
        "num_attention_heads": model.q_heads, "num_key_value_heads": model.kv_heads, "head_dim": model.head_dim,
        "vocab_size": model.vocab_size, "max_position_embeddings": max_model_len, "torch_dtype": "bfloat16",
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2,
        "tie_word_embeddings": False,
    }


def model_spec(model: DictConfig) -> ModelSpec:
    """The simulator's view of the Llama: KV bytes per token and parameter count."""
    hidden, q, kv = model.hidden_size, model.q_heads * model.head_dim, model.kv_heads * model.head_dim
    layer = hidden * (2 * q + 2 * kv) + 3 * hidden * model.intermediate_size
    return ModelSpec(name=model.name, layers=model.layers, q_heads=model.q_heads, kv_heads=model.kv_heads,
                     head_dim=model.head_dim, params=model.layers * layer + 2 * model.vocab_size * hidden)


class RealEngine:
    """vLLM with the FlexKV connector in this process: its steps timed, its decisions logged.

    The engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so that its
    scheduler, and the scheduler half of the connector, can be watched through vLLM's own
    connector API: ``get_num_new_matched_tokens`` (vLLM's local prefix-cache hit) and
    ``get_external_cache_hit_sources`` (the connector's hit per tier) once blocks are allocated.
    """

    def __init__(self, cfg: DictConfig, work_dir: Path) -> None:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM
        from vllm.config import KVTransferConfig

        from connector.flexkv_connector import WORKER_EXTENSION

        engine, connector = cfg.engine, cfg.connector
        model_dir = work_dir / "model"
        model_dir.mkdir(parents=True, exist_ok=True)
        (model_dir / "config.json").write_text(json.dumps(llama_config(cfg.model, engine.max_model_len)))
        self.block_size = int(engine.block_size)
        self.block_bytes = model_spec(cfg.model).block_bytes(self.block_size)
        extra: dict[str, Any] = {"cpu_blocks": int(connector.cpu_blocks), "write_policy": connector.write_policy,
                                 **{kind: OmegaConf.to_container(cfg[kind]) for kind in ("eviction", "admission",
                                                                                         "prefetch")}}
        if connector.ssd_blocks:
            extra |= {"config": "cpu_ssd", "ssd_blocks": int(connector.ssd_blocks),
                      "ssd_dirs": [str(work_dir / "ssd-tier")]}
        self.llm = LLM(
            model=str(model_dir), load_format="dummy", skip_tokenizer_init=True, seed=0, enforce_eager=True,
            block_size=self.block_size, gpu_memory_utilization=0.2,
            kv_cache_memory_bytes=int(engine.gpu_blocks) * self.block_bytes, max_model_len=int(engine.max_model_len),
            max_num_batched_tokens=int(engine.max_num_batched_tokens), max_num_seqs=int(engine.max_num_seqs),
            worker_extension_cls=WORKER_EXTENSION,
            kv_transfer_config=KVTransferConfig(
                kv_connector="FlexKVConnector", kv_connector_module_path="connector.flexkv_connector",
                kv_role="kv_both", kv_load_failure_policy="recompute", kv_connector_extra_config=extra),
        )
        self.engine = self.llm.llm_engine
        self.scheduler = self.engine.engine_core.engine_core.scheduler
        self.gpu_blocks = int(self.engine.vllm_config.cache_config.num_gpu_blocks)
        #: (new tokens, KV tokens read, attention pairs, seconds)
        self.steps: list[tuple[int, int, int, float]] = []
        #: the last serve()'s steps: (start, end, new tokens, KV tokens read, attention pairs, connector ops in
        #: flight, {request: new tokens}), times in seconds from the serve's start
        self.timeline: list[tuple[float, float, int, int, int, int, dict[str, int]]] = []
        self.decisions: dict[str, dict[str, int]] = {}  # by the request id serve() was given
        self.allocated_at: dict[str, int] = {}  # request -> index in ``timeline`` of the step that gave it blocks
        self._given_id: dict[str, str] = {}  # vLLM's request id -> the one serve() was given
        self._shape = (0, 0, 0)
        self._scheduled: dict[str, int] = {}
        self._ops = 0
        self._watch_scheduler()
        self._watch_connector(self.scheduler.connector)

    def _watch_scheduler(self) -> None:
        scheduler, schedule = self.scheduler, self.scheduler.schedule
        manager = scheduler.connector.scheduler.manager

        def timed_schedule(*args: Any, **kwargs: Any):
            out = schedule(*args, **kwargs)
            # after schedule() a request's computed tokens include this step's: the KV the step reads;
            # each new token attends to the tokens before it
            context = attention = 0
            for rid, tokens in out.num_scheduled_tokens.items():
                computed = scheduler.requests[rid].num_computed_tokens
                context += computed
                attention += tokens * (computed - tokens) + tokens * (tokens + 1) // 2
            self._shape = (out.total_num_scheduled_tokens, context, attention)
            self._scheduled = {self._given_id.get(rid, rid): n for rid, n in out.num_scheduled_tokens.items()}
            self._ops = manager.ops_in_flight  # this step's stores included: they are planned in schedule()
            return out

        scheduler.schedule = timed_schedule

    def _watch_connector(self, connector: Any) -> None:
        """Log each request's decision: vLLM's own hit, and the blocks the control plane loads from each tier as
        its hit counters tell while it plans the load (the simulator counts the same way; the connector's hit
        sources would tell where the blocks were at lookup, before the plan's promotions made room for them)."""
        local: dict[str, int] = {}
        matched, allocated = connector.get_num_new_matched_tokens, connector.update_state_after_alloc
        size, manager = self.block_size, connector.scheduler.manager

        def get_num_new_matched_tokens(request: Any, num_computed_tokens: int):
            local[request.request_id] = num_computed_tokens
            return matched(request, num_computed_tokens)

        def update_state_after_alloc(request: Any, blocks: Any, num_external_tokens: int) -> None:
            before = dict(manager.stats.block_hits)
            allocated(request, blocks, num_external_tokens)
            rid = request.request_id
            given = self._given_id.get(rid, rid)
            if given in self.decisions:  # re-allocated after a preemption: the first decision counts
                return
            hits = manager.stats.block_hits
            self.decisions[given] = {"gpu": local.get(rid, 0) // size,
                                     **{tier: hits.get(tier.upper(), 0) - before.get(tier.upper(), 0)
                                        for tier in ("cpu", "ssd")}}
            self.allocated_at[given] = len(self.timeline)  # the step being scheduled

        connector.get_num_new_matched_tokens = get_num_new_matched_tokens
        connector.update_state_after_alloc = update_state_after_alloc

    def serve(self, prompts: Sequence[Prompt]) -> dict[str, float]:
        """Add each prompt at its arrival time (seconds from now) and step until all are done and no
        transfer is left; returns each request's time to first token."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        pending = deque(sorted(prompts, key=lambda p: p.arrival_s))
        arrival: dict[str, float] = {}
        first: dict[str, float] = {}
        self.timeline = []
        start = time.perf_counter()
        while pending or self.scheduler.has_requests():
            now = time.perf_counter() - start
            while pending and pending[0].arrival_s <= now:
                prompt = pending.popleft()
                params = SamplingParams(temperature=0, max_tokens=prompt.max_tokens, ignore_eos=True,
                                        detokenize=False)
                rid = self.engine.add_request(prompt.request_id, TokensPrompt(prompt_token_ids=prompt.tokens), params)
                self._given_id[rid] = prompt.request_id
                arrival[prompt.request_id] = prompt.arrival_s
            if not self.scheduler.has_requests():
                time.sleep(max(0.0, pending[0].arrival_s - now))
                continue
            began = time.perf_counter()
            self._shape, self._scheduled, self._ops = (0, 0, 0), {}, 0
            outputs = self.engine.step()
            ended = time.perf_counter()
            self.steps.append((*self._shape, ended - began))
            self.timeline.append((began - start, ended - start, *self._shape, self._ops, self._scheduled))
            for output in outputs:
                if output.request_id not in first and output.outputs and output.outputs[0].token_ids:
                    first[output.request_id] = ended - start
        return {rid: first[rid] - arrival[rid] for rid in arrival}

    def totals(self) -> dict[str, float]:
        from connector.flexkv_connector import connector_totals

        return connector_totals(self.llm)

    def settle_and_empty(self, reset_connector: bool) -> None:
        """Step until every copy has landed and the scheduler knows it (``serve`` steps while the connector
        has work), then drop vLLM's prefix cache (and the connector's tiers)."""
        self.serve([])
        if not self.llm.reset_prefix_cache(reset_connector=reset_connector):
            raise RuntimeError("vLLM could not reset its prefix cache")

    def close(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()


def calibrate(real: RealEngine, cfg: DictConfig) -> dict[str, Any]:
    """Step times, end-to-end CPU-tier load time, on prompts the workload never uses.

    Step shapes: prefills alone, prefills behind a prefix vLLM has cached, decode batches, all back to
    back; then prefills after the engine sat idle (``cold_steps``: on a CPU a prefill step that comes
    long after the last one is slower, and the simulator scales such steps by their median ratio to the
    profile) and the time from adding a request to its first step then (``arrival_latency_s``).
    """
    c, vocab = cfg.calibration, int(cfg.model.vocab_size)
    rng = np.random.default_rng(12345)
    lengths = list(c.prefill_lengths)
    warmup = [Prompt(f"warm{i}", random_prompt(rng, lengths[i % len(lengths)], vocab), 4)
              for i in range(int(c.warmup_prompts))]
    real.serve(warmup)
    real.steps.clear()
    for repeat in range(int(c.repeats)):
        for length in lengths:  # one at a time: prefill chunks alone, then a short decode
            real.serve([Prompt(f"prefill{repeat}-{length}", random_prompt(rng, length, vocab), 4)])
        for batch in c.decode_batches:  # decode steps of `batch` sequences
            real.serve([Prompt(f"decode{repeat}-{batch}-{i}", random_prompt(rng, 64 + 96 * i, vocab),
                               int(c.decode_tokens)) for i in range(int(batch))])
        for number, lengths in enumerate(c.long_decodes):  # decodes behind long contexts
            real.serve([Prompt(f"long-decode{repeat}-{number}-{i}", random_prompt(rng, int(length), vocab),
                               int(c.decode_tokens)) for i, length in enumerate(lengths)])
        for base_length in c.context_lengths:  # prefills behind a cached prefix of `base_length` tokens
            base = random_prompt(rng, int(base_length), vocab)
            real.serve([Prompt(f"base{repeat}-{base_length}", base, 1)])
            for length in c.context_prefills:
                real.serve([Prompt(f"context{repeat}-{base_length}-{length}",
                                   base + random_prompt(rng, int(length), vocab), 1)])
    steps = list(real.steps)
    cold_steps, arrivals = [], []
    for repeat in range(int(c.repeats)):
        for length in c.cold_lengths:
            time.sleep(float(c.cold_idle_s))
            real.steps.clear()
            real.serve([Prompt(f"cold{repeat}-{length}", random_prompt(rng, int(length), vocab), 1)])
            cold_steps.append(real.steps[0])
            arrivals.append(real.timeline[0][0])
    loads = []
    for blocks in c.load_blocks:
        for repeat in range(int(c.repeats)):
            tokens = random_prompt(rng, int(blocks) * real.block_size + 5, vocab)
            real.serve([Prompt(f"store{blocks}-{repeat}", tokens, 1)])
            real.settle_and_empty(reset_connector=False)  # the blocks now come from the CPU tier
            before = real.totals()
            real.serve([Prompt(f"load{blocks}-{repeat}", tokens, 1)])
            after = real.totals()
            if after.get("loads", 0) > before.get("loads", 0):
                loads.append((int(blocks), after["load_seconds"] - before.get("load_seconds", 0.0)))
    real.settle_and_empty(reset_connector=True)
    return {"steps": steps, "cold_steps": cold_steps, "arrival_latency_s": float(np.median(arrivals)),
            "loads": loads}


def cold_start_factor(cold_steps: Sequence[Sequence[float]], step_time: StepTime) -> float:
    """How much longer a prefill step long after the last one takes: the median ratio of such steps to the
    profile (at least 1)."""
    if not cold_steps:
        return 1.0
    ratios = [seconds / step_time(tokens, attention, context) for tokens, context, attention, seconds in cold_steps]
    return max(1.0, float(np.median(ratios)))


def load_latency(loads: Sequence[tuple[int, float]], block_bytes: int, h2d_bandwidth: float) -> float:
    """Per-load time beyond the copy itself (the step round trips of an asynchronous load): the median
    of measured load time less bytes / bandwidth, at least 0."""
    if not loads:
        return 0.0
    return max(0.0, float(np.median([seconds - blocks * block_bytes / h2d_bandwidth for blocks, seconds in loads])))


# ---------------------------------------------------------------- simulator


def hardware(cfg: DictConfig, gpu_blocks: int, links: dict[str, float]) -> HardwareSpec:
    """``cfg.hierarchy`` with the engine's KV pool, the connector's tiers and the measured links. Every op
    pays the connector's round trip measured on CPU-tier loads (``load_latency_s``): loads and SSD reads."""
    spec = OmegaConf.to_container(cfg.hierarchy, resolve=True)
    spec["gpu"]["kv_capacity_blocks"] = gpu_blocks
    spec["pcie"]["h2d"] |= {"bandwidth": links["h2d_gbps"] * 1e9, "latency_s": links["load_latency_s"]}
    spec["pcie"]["d2h"] |= {"bandwidth": links["d2h_gbps"] * 1e9}
    spec["cpu"] = {"capacity_blocks": int(cfg.connector.cpu_blocks)}
    spec["ssd"] |= {"capacity_bytes": None, "capacity_blocks": int(cfg.connector.ssd_blocks)}
    if "ssd_read_gbps" in links:
        spec["ssd"]["read"] |= {"bandwidth": links["ssd_read_gbps"] * 1e9, "latency_s": links["load_latency_s"]}
        spec["ssd"]["write"]["bandwidth"] = links["ssd_write_gbps"] * 1e9
    return HardwareSpec.from_config(spec)


def simulate(cfg: DictConfig, workload: Workload, hw: HardwareSpec, profile: Path, cold_start: float = 1.0,
             arrival_latency_s: float = 0.0) -> pd.DataFrame:
    engine = EngineConfig(max_num_seqs=int(cfg.engine.max_num_seqs),
                          max_num_batched_tokens=int(cfg.engine.max_num_batched_tokens), step_profile=str(profile),
                          cold_start_factor=cold_start, cold_after_s=float(cfg.calibration.cold_after_s),
                          arrival_latency_s=arrival_latency_s)
    policies = {kind: OmegaConf.to_container(cfg[kind]) for kind in ("eviction", "admission", "prefetch")}
    simulation = Simulation(workload, hardware=hw, model=model_spec(cfg.model), engine=engine,
                            write_policy=cfg.connector.write_policy, **policies)
    frame = request_frame(simulation.run())
    frame["request_id"] = frame.request_id.astype(str)
    return frame


def real_frame(workload: Workload, ttft: dict[str, float], decisions: dict[str, dict[str, int]]) -> pd.DataFrame:
    rows = []
    for request in workload.requests:
        rid = str(request.request_id)
        decision = decisions.get(rid, {})
        rows.append({"request_id": rid, "kind": request.kind, "input_tokens": request.input_length,
                     "ttft_s": ttft[rid], **{f"{tier}_hit_blocks": decision.get(tier, 0) for tier in TIERS}})
    return pd.DataFrame(rows)


def measure_real(cfg: DictConfig, work_dir: Path) -> dict[str, Any]:
    """Everything measured on the real system: calibration, the served workload, the links."""
    load_before = os.getloadavg()[0]  # what else the machine ran meanwhile: the context of every timing here
    real = RealEngine(cfg, work_dir)
    try:
        print("real vLLM: calibrating step times and loads", flush=True)
        measured = calibrate(real, cfg)
        workload = load_workload(cfg.workload)
        prompts = prompts_of(workload, int(cfg.model.vocab_size))
        runs = []
        for number in range(1, int(cfg.fidelity.real_runs) + 1):
            print(f"real vLLM: serving the workload, run {number} of {cfg.fidelity.real_runs} "
                  f"(~{workload.duration_s:.0f} s)", flush=True)
            real.decisions.clear()
            real.allocated_at.clear()
            runs.append({"ttft": real.serve(prompts), "decisions": dict(real.decisions), "steps": real.timeline,
                         "allocated_at": dict(real.allocated_at)})
            real.settle_and_empty(reset_connector=True)
    finally:
        real.close()
    # measured after the engine, in its process: the copies run with the threads vLLM left the connector
    print("real vLLM: done; measuring copy and SSD bandwidth", flush=True)
    links = measure_copy(cfg.model, real.block_size, int(cfg.calibration.copy_iters))
    links["load_latency_s"] = load_latency(measured["loads"], real.block_bytes, links["h2d_gbps"] * 1e9)
    if cfg.connector.ssd_blocks and cfg.calibration.ssd_mib:
        links |= measure_ssd(work_dir / "bench-ssd", real.block_bytes, int(cfg.calibration.ssd_mib))
    return {**measured, "runs": runs, "links": links, "gpu_blocks": real.gpu_blocks,
            "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "block_bytes": real.block_bytes}


def run_real_in_subprocess(cfg: DictConfig, work_dir: Path) -> dict[str, Any]:
    """``measure_real`` in a fresh process: vLLM changes process-wide state (torch threads, logging) and the
    connector composes its own Hydra config, which cannot happen inside this Hydra app."""
    work_dir.mkdir(parents=True, exist_ok=True)
    job, result = work_dir / "job.json", work_dir / "result.json"
    job.write_text(json.dumps({"config": OmegaConf.to_container(cfg, resolve=True), "work_dir": str(work_dir),
                               "result": str(result)}))
    env = {**os.environ, **{name: str(value) for name, value in cfg.fidelity.engine_env.items()}}
    subprocess.run([sys.executable, "-m", "experiments.fidelity", str(job)], cwd=PROJECT_ROOT, env=env, check=True)
    return json.loads(result.read_text())


@hydra.main(config_path=CONF_DIR, config_name="fidelity", version_base=None)
def main(cfg: DictConfig) -> None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    work_dir = Path(cfg.fidelity.work_dir) if cfg.fidelity.work_dir else out_dir / "work"
    workload = load_workload(cfg.workload)
    print(f"fidelity: {len(workload)} requests over {workload.duration_s:.0f} s on real vLLM, then in the simulator; "
          f"outputs in {out_dir.resolve()}", flush=True)
    if cfg.fidelity.measured:  # re-simulate a run measured before
        measured = json.loads(Path(cfg.fidelity.measured).read_text())
    else:
        measured = run_real_in_subprocess(cfg, work_dir)
        shutil.rmtree(work_dir, ignore_errors=True)
    (out_dir / "measured.json").write_text(json.dumps(measured))
    links = measured["links"]
    profile = step_profile(measured["steps"], out_dir / "step_profile.csv")
    links["cold_start_factor"] = cold_start_factor(measured.get("cold_steps", []), profile_fit(profile))
    links["arrival_latency_s"] = measured.get("arrival_latency_s", 0.0)
    # vLLM keeps one block of its pool as the null block
    sim = simulate(cfg, workload, hardware(cfg, measured["gpu_blocks"] - 1, links), profile,
                   links["cold_start_factor"], links["arrival_latency_s"])
    real_runs = [real_frame(workload, run["ttft"], run["decisions"]) for run in measured["runs"]]
    frame, summary = compare(median_run(real_runs), sim)
    for number, run in enumerate(real_runs, 1):
        frame[f"ttft_real_run{number}_s"] = frame.request_id.map(run.set_index("request_id").ttft_s)
    frame.to_csv(out_dir / "comparison.csv", index=False)
    summary["real_runs"] = len(real_runs)
    if len(real_runs) > 1:  # the real system against itself: the floor no model of it can go below
        summary |= rerun_error(real_runs)
    # where real runs split a request's blocks between tiers differently, no answer is the real one: the twin
    # must still agree on hit or miss there, and on blocks per tier everywhere else
    disputed = contested(real_runs)
    summary["decisions_contested"] = disputed
    summary["decisions_agree_uncontested"] = bool(frame[~frame.request_id.isin(disputed)].decision_agrees.all())
    targets = cfg.fidelity.targets
    summary |= {
        "meets_targets": bool(summary["decisions_agree_uncontested"]
                              and summary["hit_blocks_agreeing"] == summary["requests"]
                              and summary["ttft_err_median"] <= targets.ttft_err_median
                              and summary["ttft_err_p90"] <= targets.ttft_err_p90),
        "calibration": {k: round(v, 6) for k, v in links.items()},
        "load_average_before_after": measured["load_average"],
        "plot": str(plot_ttft(frame, summary, out_dir / "ttft_sim_vs_real.png")),
        "output_dir": str(out_dir.resolve()),
    }
    disagreeing = frame[~frame.decision_agrees]
    if len(disagreeing):
        print("requests whose decisions differ (blocks from each tier, real vs sim):")
        print(disagreeing[["request_id", *(f"{c}_{s}" for c in DECISION_COLUMNS for s in ("real", "sim"))]]
              .head(20).to_string(index=False))
    print(f"comparison: {out_dir / 'comparison.csv'}\nmeasured:   {out_dir / 'measured.json'}\n"
          f"plot:       {summary['plot']}")
    print(json.dumps(summary))


if __name__ == "__main__":  # the real-engine half, run by run_real_in_subprocess
    job = json.loads(Path(sys.argv[1]).read_text())
    measured = measure_real(OmegaConf.create(job["config"]), Path(job["work_dir"]))
    Path(job["result"]).write_text(json.dumps(measured))
