"""`python -m experiments.policy_research`: online eviction/admission policies against the field.

Four modes, one Hydra app (configs in ``conf/research``):

- ``mode=evaluate`` (``--config-name policy_research``, the default): every
  policy x capacity (fractions of each workload's unique blocks) x workload
  (the Mooncake conversation trace whole and split in time into a first and a
  second half, plus the four synthetic generators) through the replay, with
  ``gpu_fraction`` > 0 behind an engine's own LRU prefix cache. Writes
  ``results.csv``, ``results.md`` (prefix-token hit ratio with the share of the
  LRU -> Belady gap closed, and the block hit ratio) and ``prefix_hit.png`` into
  the run's output folder, times the control plane (LRU against the candidate
  on the whole trace) and ends with one JSON line of headline figures.
- ``mode=bound``: how far *any* policy that sees only some features of a block
  can go on a workload (default: the trace). Each block reference falls in a
  class (its features when it is made); the best such policy keeps a block of
  class c for a time-to-live tau_c after each use, and the tau_c that maximise
  hits for an average occupancy of ``capacity`` blocks come from a fractional
  knapsack over each class's hits-versus-slot-seconds curve. The feature values
  are fitted in hindsight, so this is an optimistic ceiling for online
  class-and-age policies (LRU's own row comes out at its real figure); Belady
  knows each block's future and is not bound by it. Writes ``bound.md``.
- ``mode=latency``: what the replay's hit ratios become in latency. The
  simulator (engines with their GPU prefix cache, the hierarchy's tiers) runs
  the baseline and the candidates on one workload over the shipped hierarchy
  and variants of it (``latency.hierarchies``); writes ``latency.md`` with
  TTFT p50/p90/p99 and hit ratios per tier.
- ``mode=tune`` (``--config-name tune_hit_density --multirun``): the objective
  of an Optuna sweep (hydra-optuna-sweeper) over a policy's parameters. It
  replays only the tuning set (synthetic workloads and the *first* half of the
  trace) and returns the mean share of the LRU -> Belady prefix-token gap
  closed, minus a penalty wherever the policy falls more than
  ``tune.lru_tolerance`` below LRU; the second half is left for reporting.

LRU and Belady figures of the tuning set are computed once per process and
reused by every trial; a workload's block keys are computed once too.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from experiments.common import CONF_DIR, PROJECT_ROOT
from flexkv_sim.replay import capacity_from_fraction, replay, workload_keys
from flexkv_sim.workloads import build_workload, load_mooncake_trace
from flexkv_sim.workloads.request import Workload

RESEARCH_CONF_DIR = str(Path(CONF_DIR) / "research")
SYNTHETIC = ("chat", "system_prompt", "doc_qa", "mixed")
TRACE_PARTS = ("trace", "trace_first_half", "trace_second_half")

_workloads: dict[str, tuple[Workload, list[list[int]]]] = {}
_reference: dict[tuple[str, float, str], dict[str, float]] = {}


# ------------------------------------------------------------------ workloads


def trace_path(cfg: DictConfig) -> Path:
    path = Path(str(cfg.trace_path))
    return path if path.is_absolute() else (PROJECT_ROOT / path).resolve()


def split_in_time(workload: Workload, half: str) -> Workload:
    """The requests that arrive in the first or the second half of the workload's span."""
    start = workload.requests[0].arrival_s
    middle = start + workload.duration_s / 2
    first = half == "first"
    requests = [r for r in workload.requests if (r.arrival_s < middle) == first]
    return replace(workload, name=f"{workload.name}:{half}_half", requests=tuple(requests))


def load(name: str, cfg: DictConfig) -> tuple[Workload, list[list[int]]]:
    """A workload by name (trace parts or a conf/workload generator) and its block keys, built once."""
    if name not in _workloads:
        if name in TRACE_PARTS:
            path = trace_path(cfg)
            if not path.is_file():
                raise FileNotFoundError(f"Mooncake trace not found at {path} (trace_path={cfg.trace_path})")
            workload = load_mooncake_trace(path)
            if name != "trace":
                workload = split_in_time(workload, name.removeprefix("trace_").removesuffix("_half"))
        elif name in SYNTHETIC:
            spec = OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / "workload" / f"{name}.yaml"))
            workload = build_workload(spec)
        else:
            raise ValueError(f"unknown workload {name!r}; valid choices: {[*TRACE_PARTS, *SYNTHETIC]}")
        _workloads[name] = (workload, workload_keys(workload))
    return _workloads[name]


# ------------------------------------------------------------------- policies


def group_config(group: str, name: str) -> dict[str, Any]:
    """The YAML of ``name`` in the config group conf/<group>, resolved."""
    path = Path(CONF_DIR) / group / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ValueError(f"unknown {group} config {name!r}; valid choices: {known}")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def policy_spec(kind: str, spec: Any) -> Any:
    """A bare name becomes its YAML in conf/<kind> (the shipped defaults); a mapping is taken as given."""
    return group_config(kind, spec) if isinstance(spec, str) else dict(spec)


def run_cell(workload_name: str, fraction: float, label: str, policy: dict, cfg: DictConfig,
             capacity_of: str | None = None) -> dict[str, Any]:
    """One replay; ``capacity_of`` takes the capacity from another workload's unique blocks."""
    workload, keys = load(workload_name, cfg)
    sized_by = load(capacity_of, cfg)[0] if capacity_of else workload
    capacity = capacity_from_fraction(sized_by, fraction)
    gpu_fraction = float(cfg.get("gpu_fraction") or 0.0)
    result = replay(
        workload,
        keys=keys,
        capacity_blocks=capacity,
        gpu_blocks=capacity_from_fraction(sized_by, gpu_fraction) if gpu_fraction > 0 else 0,
        eviction=policy_spec("eviction", policy["eviction"]),
        admission=policy_spec("admission", policy.get("admission", "always")),
    )
    return {
        "workload": workload_name,
        "capacity_fraction": fraction,
        "capacity_blocks": capacity,
        "policy": label,
        "prefix_token_hit_ratio": result.prefix_token_hit_ratio,
        "block_hit_ratio": result.block_hit_ratio,
        "requests": result.requests,
        "block_refs": result.block_refs,
        "block_hits": round(result.block_hit_ratio * result.block_refs),
        "prompt_tokens": result.prompt_tokens,
        "prefix_hit_tokens": result.prefix_hit_tokens,
        "wall_s": result.wall_s,
    }


WARM = "trace_second_half_warm"


def warm_second_half(rows: list[dict], first: list[dict]) -> list[dict]:
    """The second half of the whole-trace replay (cache warmed by the first half): the whole
    replay minus a replay of the first half alone at the same capacity (a replay is
    deterministic, so the first half of the whole run is exactly that run)."""
    whole = {(r["capacity_fraction"], r["policy"]): r for r in rows if r["workload"] == "trace"}
    out = []
    for r in first:
        w = whole[(r["capacity_fraction"], r["policy"])]
        out.append({
            **w, "workload": WARM,
            "requests": w["requests"] - r["requests"],
            "block_refs": w["block_refs"] - r["block_refs"],
            "block_hits": w["block_hits"] - r["block_hits"],
            "prompt_tokens": w["prompt_tokens"] - r["prompt_tokens"],
            "prefix_hit_tokens": w["prefix_hit_tokens"] - r["prefix_hit_tokens"],
            "block_hit_ratio": (w["block_hits"] - r["block_hits"]) / (w["block_refs"] - r["block_refs"]),
            "prefix_token_hit_ratio": (w["prefix_hit_tokens"] - r["prefix_hit_tokens"])
            / (w["prompt_tokens"] - r["prompt_tokens"]),
        })
    return out


def gap_closed(value: float, lru: float, belady: float) -> float:
    """Share of the LRU -> Belady gap closed (NaN when the gap is under half a point)."""
    return (value - lru) / (belady - lru) if belady - lru >= 0.005 else math.nan


# ---------------------------------------------------------------------- tune


def reference(workload_name: str, fraction: float, label: str, cfg: DictConfig) -> dict[str, float]:
    key = (workload_name, fraction, label)
    if key not in _reference:
        _reference[key] = run_cell(workload_name, fraction, label, dict(cfg.policies[label]), cfg)
    return _reference[key]


def tune(cfg: DictConfig) -> float:
    t = cfg.tune
    policy = {"eviction": OmegaConf.to_container(t.eviction), "admission": OmegaConf.to_container(t.admission)}
    metric = str(t.metric)
    closed, penalties, rows = [], 0.0, []
    for workload_name in t.workloads:
        for fraction in t.capacity_fractions:
            lru = reference(workload_name, fraction, str(cfg.baseline), cfg)[metric]
            belady = reference(workload_name, fraction, str(cfg.ceiling), cfg)[metric]
            row = run_cell(workload_name, fraction, "candidate", policy, cfg)
            value = row[metric]
            share = gap_closed(value, lru, belady)
            if not math.isnan(share):
                closed.append(share)
            penalties += max(0.0, lru - value - float(t.lru_tolerance))
            rows.append((workload_name, fraction, round(value, 4), round(lru, 4), round(belady, 4)))
    objective = sum(closed) / max(len(closed), 1) - float(t.penalty) * penalties
    print(json.dumps({"objective": objective, "eviction": policy["eviction"], "admission": policy["admission"],
                      "cells": rows}))
    return objective


# --------------------------------------------------------------------- bound


def _references(workload: Workload) -> dict[str, Any]:
    """Per block reference: features an online policy could know then, and when it is next used.

    The last feature is noise (a random draw per request, seeded): a control that predicts nothing."""
    import random

    import numpy as np

    noise = random.Random(0)
    seen: dict[int, int] = {}
    last_seen: dict[int, float] = {}
    features = []
    times = []
    for request in workload.requests:
        ids, t = request.block_ids, request.arrival_s
        n = len(ids)
        matched = 0
        while matched < n and ids[matched] in seen:
            matched += 1
        turn = seen.get(ids[1], 0) if n > 1 else 0  # times this conversation's first own block was seen
        pace = t - last_seen[ids[matched - 1]] if matched > 1 else -1.0
        draw = noise.randrange(NOISE_VALUES)
        for depth, key in enumerate(ids):
            count = seen.get(key, 0)
            gap = t - last_seen[key] if count else -1.0
            features.append((depth == n - 1, count, n, gap, turn, pace, draw))
            times.append(t)
        for key in ids:
            seen[key] = seen.get(key, 0) + 1
            last_seen[key] = t
    next_gap = np.full(len(times), np.inf)
    upcoming: dict[int, float] = {}
    flat = [key for r in workload.requests for key in r.block_ids]
    for j in range(len(flat) - 1, -1, -1):
        if flat[j] in upcoming:
            next_gap[j] = upcoming[flat[j]] - times[j]
        upcoming[flat[j]] = times[j]
    split_s = workload.requests[len(workload.requests) // 2].arrival_s if workload.requests else 0.0
    return {"features": features, "next_gap": next_gap, "times": np.asarray(times), "span_s": workload.duration_s,
            "split_s": split_s}


def _taus():
    """The time-to-lives a class can get, seconds (0: not kept)."""
    import numpy as np

    return np.concatenate([[0.0], np.logspace(-1, 4, 240)])


def _class_curves(classes: list, refs: dict[str, Any], keep) -> dict[Any, tuple[Any, Any]]:
    """Per class, over the references ``keep`` selects: (slot-seconds, hits) at each time-to-live of ``_taus``.

    A block kept for ``tau`` holds its slot until its next use or ``tau``, whichever comes first, and
    never past the end of the workload."""
    import numpy as np

    taus = _taus()
    end = refs["times"][-1] if len(refs["times"]) else 0.0
    by_class: dict[Any, tuple[list[float], list[float]]] = {}
    for cls, gap, at, kept in zip(classes, refs["next_gap"], refs["times"], keep):
        if kept:
            reused, last = by_class.setdefault(cls, ([], []))
            (reused if gap != math.inf else last).append(gap if gap != math.inf else end - at)

    def held(spans: list[float]) -> tuple[Any, Any]:
        """Slot-seconds at each tau of blocks that would hold their slots for ``spans``, and how many end within."""
        spans = np.sort(np.asarray(spans, dtype=float))
        within = np.searchsorted(spans, taus, side="right")
        return np.concatenate([[0.0], np.cumsum(spans)])[within] + taus * (len(spans) - within), within

    curves = {}
    for cls, (reused, last) in by_class.items():
        (reused_cost, hits), (last_cost, _) = held(reused), held(last)
        curves[cls] = (reused_cost + last_cost, hits.astype(float))  # hits: reuses within tau
    return curves


def _ttl_bound(refs: dict[str, Any], classify, capacity: int) -> float:
    """Block hit ratio of the best per-class time-to-live policy at an average occupancy of ``capacity``."""
    classes = [classify(f) for f in refs["features"]]
    segments, hits = [], 0.0
    for cost, kept in _class_curves(classes, refs, [True] * len(classes)).values():
        hull: list[tuple[float, float]] = []  # upper concave hull of (cost, hits)
        for point in sorted(zip(cost.tolist(), kept.tolist())):
            while len(hull) >= 2 and (hull[-1][1] - hull[-2][1]) * (point[0] - hull[-2][0]) <= (
                    point[1] - hull[-2][1]) * (hull[-1][0] - hull[-2][0]):
                hull.pop()
            if not hull or point[1] > hull[-1][1]:
                hull.append(point)
        hits += hull[0][1]
        segments += [((b[1] - a[1]) / max(b[0] - a[0], 1e-12), b[0] - a[0], b[1] - a[1])
                     for a, b in zip(hull, hull[1:])]
    budget = capacity * refs["span_s"]
    for _, cost, gain in sorted(segments, reverse=True):
        if cost <= budget:
            budget -= cost
            hits += gain
        else:
            hits += gain * budget / cost
            break
    return hits / len(refs["features"])


def _ttl_held_out(refs: dict[str, Any], classify, capacity: int) -> float:
    """Block hit ratio on the second half (in time) of per-class time-to-lives fitted on the first half.

    A class keeps its blocks for the time-to-live at which, on the first half, its hits per
    slot-second fall to a threshold common to all classes (classes unseen there follow all the
    first half's references pooled); the threshold is then set so that the second half's average
    occupancy is ``capacity``, as an online policy fills its tier. What the hindsight figure owes to
    fitting its classes to the very references it counts shows here: it is not carried over."""
    import numpy as np

    classes = [classify(f) for f in refs["features"]]
    second = refs["times"] >= refs["split_s"]
    if second.all() or not second.any():
        return math.nan  # no first half to fit on, or nothing to judge
    fitted = _class_curves(classes, refs, ~second)
    judged = _class_curves(classes, refs, second)
    pooled_cost, pooled_hits = _class_curves([0] * len(classes), refs, ~second)[0]
    budget = capacity * (refs["times"][-1] - refs["split_s"])

    def best(cost, hits, threshold: float) -> int:
        """The TTL where hits beyond pay less than ``threshold`` per slot-second; the longest of equals
        (at threshold 0, keeping longer is free)."""
        value = hits - threshold * cost
        return len(value) - 1 - int(np.argmax(value[::-1]))

    def outcome(threshold: float) -> tuple[float, float]:
        fallback = best(pooled_cost, pooled_hits, threshold)
        cost = hits = 0.0
        for cls, (class_cost, class_hits) in judged.items():
            fit = fitted.get(cls)
            at = fallback if fit is None else best(*fit, threshold)
            cost += class_cost[at]
            hits += class_hits[at]
        return cost, hits

    keep_all, keep_all_hits = outcome(0.0)
    if keep_all <= budget:
        return keep_all_hits / int(second.sum())
    low, high = 0.0, 1e3  # thresholds in hits per slot-second: keep all, keep nothing
    for _ in range(80):
        middle = math.sqrt(max(low, 1e-15) * high)
        if outcome(middle)[0] > budget:
            low = middle
        else:
            high = middle
    (under, under_hits), (over, over_hits) = outcome(high), outcome(low)
    share = 0.0 if over <= under else min(1.0, max(0.0, (budget - under) / (over - under)))
    return (under_hits + share * (over_hits - under_hits)) / int(second.sum())  # the two mixed to fill it


def _log_bucket(x: float, scale: float, top: int) -> int:
    return -1 if x < 0 else min(int(math.log2(1 + x / scale)), top)


#: values of the noise feature (a control: as many classes as a real feature of that many buckets)
NOISE_VALUES = 7


def _rich(f: tuple) -> Any:
    return "tail" if f[0] else (min(f[1], 3), _log_bucket(f[2], 1, 7), min(f[4], 4),
                                _log_bucket(f[5], 10, 6) if f[1] == 0 else _log_bucket(f[3], 10, 6))


#: feature sets, each a function of (last block of its request, times seen before, request
#: blocks, seconds since last seen, conversation turns, seconds since the previous turn, noise)
FEATURE_SETS = {
    "none (one class: ~LRU)": lambda f: 0,
    "times seen (<=3)": lambda f: min(f[1], 3),
    "+ request tail": lambda f: "tail" if f[0] else min(f[1], 3),
    "+ request size (hit_density's classes)": lambda f: "tail" if f[0] else (
        min(f[1], 3), _log_bucket(f[2], 1, 7) if f[1] == 0 else 0),
    "+ gap since last seen": lambda f: "tail" if f[0] else (
        min(f[1], 3), _log_bucket(f[2], 1, 7) if f[1] == 0 else 0, _log_bucket(f[3], 10, 6)),
    "+ conversation turn and pace (rich)": _rich,
    f"rich + noise, {NOISE_VALUES} values (control)": lambda f: (_rich(f), f[6]),
}


def bound(cfg: DictConfig) -> float:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    workload, _ = load(str(cfg.bound.workload), cfg)
    refs = _references(workload)
    fractions = list(cfg.capacity_fractions)
    capacities = [capacity_from_fraction(workload, f) for f in fractions]
    caps = " | ".join(f"{100 * f:g}%" for f in fractions)
    lines = [f"Per-class TTL policies (block hit ratio) on `{cfg.bound.workload}`. Hindsight: classes' TTLs fitted "
             "to the references they are judged on (a ceiling for online class-and-age policies, raised by every "
             "class added, even noise). Held out: TTLs fitted on the first half in time, judged on the second.", "",
             f"| features | hindsight {caps.replace(' | ', ' | hindsight ')} | held out "
             f"{caps.replace(' | ', ' | held out ')} |",
             "| --- | " + " | ".join("---:" for _ in range(2 * len(fractions))) + " |"]
    result = {}
    for name, classify in FEATURE_SETS.items():
        hindsight = [_ttl_bound(refs, classify, c) for c in capacities]
        held_out = [_ttl_held_out(refs, classify, c) for c in capacities]
        result[name] = {"hindsight": [round(v, 4) for v in hindsight], "held_out": [round(v, 4) for v in held_out]}
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in hindsight + held_out) + " |")
        print(lines[-1], flush=True)
    oracle = [_ttl_bound({**refs, "features": [(bool(math.isfinite(g)),) for g in refs["next_gap"]]},
                         lambda f: f[0], c) for c in capacities]
    lines.append("| oracle: whether the block is ever used again | " + " | ".join(f"{v:.3f}" for v in oracle)
                 + " |" + " |" * len(fractions))
    (out_dir / "bound.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-1:]))
    print(json.dumps({"bound": result, "oracle": [round(v, 4) for v in oracle], "output_dir": str(out_dir)}))
    return 0.0


# ------------------------------------------------------------------- latency


#: the simulator's figures ``mode=latency`` reports per run
LATENCY_FIGURES = ("ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "prefix_token_hit_ratio", "hit_ratio_gpu",
                   "hit_ratio_cpu", "hit_ratio_ssd", "load_wait_total_s", "gpu_busy", "sim_wall_s")


def latency_cell(workload: Workload, variant: str, hierarchy: dict, label: str, policy: dict,
                 lat: dict) -> dict[str, Any]:
    """One simulation: the workload on ``lat``'s engines over ``hierarchy``, ``policy`` in every tier."""
    from flexkv_sim.metrics import summarize
    from flexkv_sim.simulator import simulation_from_config

    simulate = OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / "simulate.yaml").simulate)
    simulate.update(instances=int(lat["instances"]), router=str(lat["router"]), progress=False, sample_interval_s=0)
    config = {"hierarchy": hierarchy, "model": group_config("model", str(lat["model"])),
              "prefetch": group_config("prefetch", "none"), "simulate": simulate,
              "eviction": policy_spec("eviction", policy["eviction"]),
              "admission": policy_spec("admission", policy.get("admission", "always"))}
    summary = summarize(simulation_from_config(workload, config).run())
    return {"hierarchy": variant, "policy": label,
            **{key: summary[key] for key in LATENCY_FIGURES}}


def latency(cfg: DictConfig) -> float:
    """The simulator's TTFT for the baseline and the candidates: ``cfg.latency``'s workload on its engines,
    over each of its hierarchy variants (the shipped config, merged with the variant's changes)."""
    from joblib import Parallel, delayed

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    lat = OmegaConf.to_container(cfg.latency, resolve=True)
    workload, _ = load(str(lat["workload"]), cfg)
    shipped = group_config("hierarchy", str(lat["hierarchy"]))
    hierarchies = {variant: OmegaConf.to_container(OmegaConf.merge(shipped, changes or {}))
                   for variant, changes in lat["hierarchies"].items()}
    labels = [str(cfg.baseline), *cfg.candidates]
    policies = {label: OmegaConf.to_container(cfg.policies[label]) for label in labels}
    grid = [(variant, label) for variant in hierarchies for label in labels]
    print(f"{workload.name}: {len(workload)} requests on {lat['instances']} x {lat['hierarchy']}, {lat['model']}; "
          f"{len(grid)} simulations", flush=True)
    rows = Parallel(n_jobs=int(cfg.jobs), verbose=10)(
        delayed(latency_cell)(workload, variant, hierarchies[variant], label, policies[label], lat)
        for variant, label in grid)
    lines = [f"Simulated `{lat['workload']}` on {lat['instances']} x `{lat['hierarchy']}` engines "
             f"({lat['model']}, router {lat['router']}); the policy runs in every tier, admission guards the CPU tier.",
             "", "| hierarchy | policy | prefix-token hit | CPU hit | SSD hit | TTFT p50 (s) | TTFT p90 (s) | "
             "TTFT p99 (s) | GPU busy |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['hierarchy']} | {r['policy']} | {r['prefix_token_hit_ratio']:.3f} | {r['hit_ratio_cpu']:.3f} "
                     f"| {r['hit_ratio_ssd']:.3f} | {r['ttft_p50_s']:.3f} | {r['ttft_p90_s']:.3f} "
                     f"| {r['ttft_p99_s']:.3f} | {r['gpu_busy']:.2f} |")
    table = "\n".join(lines) + "\n"
    (out_dir / "latency.md").write_text(table)
    print(table)
    print(json.dumps({"output_dir": str(out_dir), **{
        f"{r['hierarchy']}/{r['policy']}": {key: round(r[key], 4) for key in LATENCY_FIGURES} for r in rows}}))
    return 0.0


# ------------------------------------------------------------------ evaluate


def time_control_plane(cfg: DictConfig) -> dict[str, Any]:
    """CPU time of whole replays (best of ``repeats``, policies interleaved): baseline vs candidates.

    CPU time rather than wall time, so other jobs on the machine do not skew the ratio; the
    replay drives the real CacheManager, so this is the control plane's cost per operation.
    """
    t = cfg.timing
    workload, keys = load(str(t.workload), cfg)
    capacity = capacity_from_fraction(workload, float(t.capacity_fraction))
    out: dict[str, Any] = {"workload": str(t.workload), "capacity_blocks": capacity}
    labels = [str(cfg.baseline), *cfg.candidates]
    specs = {label: OmegaConf.to_container(cfg.policies[label]) for label in labels}
    best: dict[str, float] = {}
    replay(workload, keys=keys, capacity_blocks=capacity, eviction="lru")  # warm up
    for rep in range(int(t.repeats)):
        for label in labels[rep % len(labels):] + labels[: rep % len(labels)]:
            started = time.process_time()
            result = replay(workload, keys=keys, capacity_blocks=capacity,
                            eviction=policy_spec("eviction", specs[label]["eviction"]),
                            admission=policy_spec("admission", specs[label].get("admission", "always")))
            best[label] = min(best.get(label, math.inf), time.process_time() - started)
            out["block_refs"] = result.block_refs
            out["requests"] = result.requests
    for label, cpu in best.items():
        out[label] = {"cpu_s": round(cpu, 3), "requests_per_s": round(out["requests"] / cpu),
                      "block_refs_per_s": round(out["block_refs"] / cpu),
                      "slowdown_vs_baseline": round(cpu / best[str(cfg.baseline)], 2)}
    return out


def markdown(rows: list[dict], cfg: DictConfig) -> str:
    labels = list(dict.fromkeys(r["policy"] for r in rows))
    by = {(r["workload"], r["capacity_fraction"], r["policy"]): r for r in rows}
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    fractions = list(cfg.capacity_fractions)
    base, ceil = str(cfg.baseline), str(cfg.ceiling)
    lines = ["Prefix-token hit ratio (share of the LRU -> Belady gap closed). Capacity = fraction of the "
             "workload's unique blocks. Belady is the offline block-level ceiling (not prefix-aware).", "",
             "| workload | cap | " + " | ".join(labels) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in labels) + " |"]
    for w in workloads:
        for f in fractions:
            lru = by[(w, f, base)]["prefix_token_hit_ratio"]
            bel = by[(w, f, ceil)]["prefix_token_hit_ratio"]
            cells = []
            for label in labels:
                v = by[(w, f, label)]["prefix_token_hit_ratio"]
                share = gap_closed(v, lru, bel)
                extra = "" if label in (base, ceil) or math.isnan(share) else f" ({100 * share:.0f}%)"
                cells.append(f"{v:.3f}{extra}")
            lines.append(f"| {w} | {100 * f:g}% | " + " | ".join(cells) + " |")
    lines += ["", "Block hit ratio (the issue's figures are for `trace`).", "",
              "| workload | cap | " + " | ".join(labels) + " |",
              "| --- | ---: | " + " | ".join("---:" for _ in labels) + " |"]
    for w in workloads:
        for f in fractions:
            lines.append(f"| {w} | {100 * f:g}% | "
                         + " | ".join(f"{by[(w, f, label)]['block_hit_ratio']:.3f}" for label in labels) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], cfg: DictConfig, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    cols = 4
    nrows = -(-len(workloads) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    for ax, w in zip(axes.flat, workloads):
        for label in dict.fromkeys(r["policy"] for r in rows):
            pts = sorted((r["capacity_fraction"], r["prefix_token_hit_ratio"])
                         for r in rows if r["workload"] == w and r["policy"] == label)
            style = {"color": "black", "linestyle": "--"} if label == cfg.ceiling else {}
            if label in cfg.candidates:
                style = {"linewidth": 2.5}
            ax.plot([100 * x for x, _ in pts], [y for _, y in pts], marker="o", label=label, **style)
        ax.set_xscale("log")
        ticks = [100 * f for f in cfg.capacity_fractions]
        ax.set_xticks(ticks, [f"{t:g}%" for t in ticks])
        ax.minorticks_off()
        ax.set_title(w)
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(workloads):]:
        ax.axis("off")
    axes[0][0].set_ylabel("prefix-token hit ratio")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Prefix-token hit ratio vs CPU-tier capacity (% of unique blocks); belady = offline ceiling")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate(cfg: DictConfig) -> float:
    from joblib import Parallel, delayed

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    chosen = list(cfg.run_policies) if cfg.get("run_policies") else list(cfg.policies)
    plain_policies = {label: OmegaConf.to_container(cfg.policies[label]) for label in chosen}
    for p in plain_policies.values():
        policy_spec("eviction", p["eviction"])
        policy_spec("admission", p.get("admission", "always"))
    grid = [(w, f, label) for w in cfg.workloads for f in cfg.capacity_fractions for label in plain_policies]
    for w in cfg.workloads:
        load(w, cfg)  # build each workload once, before the workers copy them
    warm = bool(cfg.warm_second_half) and "trace" in cfg.workloads
    if warm:
        load("trace_first_half", cfg)
        grid += [("trace_first_half@trace", f, label) for f in cfg.capacity_fractions for label in plain_policies]
    rows = Parallel(n_jobs=int(cfg.jobs))(
        delayed(_cell_with_data)(w, f, label, plain_policies[label], _needed(w), cfg) for w, f, label in grid
    )
    if warm:
        first = [r for r in rows if r["workload"] == "trace_first_half@trace"]
        rows = [r for r in rows if r["workload"] != "trace_first_half@trace"]
        rows += warm_second_half(rows, first)
    import pandas as pd

    pd.DataFrame(rows).to_csv(out_dir / "results.csv", index=False)
    table = markdown(rows, cfg)
    timing = time_control_plane(cfg) if cfg.timing.enabled else {}
    if timing:
        table += "\nControl-plane cost (CPU time of a whole replay of `{}` at {} blocks, best of {}):\n\n".format(
            timing["workload"], timing["capacity_blocks"], cfg.timing.repeats)
        table += "| policy | CPU s | requests/s | block refs/s | vs " + str(cfg.baseline) + " |\n"
        table += "| --- | ---: | ---: | ---: | ---: |\n"
        for label in (str(cfg.baseline), *cfg.candidates):
            t = timing[label]
            table += (f"| {label} | {t['cpu_s']:.2f} | {t['requests_per_s']:,} | {t['block_refs_per_s']:,} "
                      f"| {t['slowdown_vs_baseline']:.2f}x |\n")
    (out_dir / "results.md").write_text(table)
    plot(rows, cfg, out_dir / "prefix_hit.png")
    print(table)
    by = {(r["workload"], r["capacity_fraction"], r["policy"]): r for r in rows}
    summary: dict[str, Any] = {"output_dir": str(out_dir), "runs": len(rows)}
    for label in cfg.candidates:
        for w in ("trace", "trace_second_half", WARM):
            for f in cfg.capacity_fractions:
                if (w, f, label) in by:
                    r = by[(w, f, label)]
                    summary[f"{label}/{w}/{100 * f:g}%"] = {
                        "prefix": round(r["prefix_token_hit_ratio"], 4), "block": round(r["block_hit_ratio"], 4)}
    if timing:
        summary["timing"] = timing
    print(json.dumps(summary))
    return 0.0


def _needed(w: str) -> dict:
    """The built workloads a grid cell needs (``name`` or ``name@capacity_of``), for a worker."""
    return {name: _workloads[name] for name in w.split("@")}


def _cell_with_data(w, f, label, policy, data, cfg):
    _workloads.update(data)
    name, _, capacity_of = w.partition("@")
    row = run_cell(name, f, label, policy, cfg, capacity_of or None)
    row["workload"] = w
    return row


@hydra.main(config_path=RESEARCH_CONF_DIR, config_name="policy_research", version_base=None)
def main(cfg: DictConfig) -> float:
    if cfg.mode == "tune":
        return tune(cfg)
    if cfg.mode == "evaluate":
        return evaluate(cfg)
    if cfg.mode == "bound":
        return bound(cfg)
    if cfg.mode == "latency":
        return latency(cfg)
    raise ValueError(f"unknown mode {cfg.mode!r}; valid choices: ['evaluate', 'tune', 'bound', 'latency']")


if __name__ == "__main__":
    main()
