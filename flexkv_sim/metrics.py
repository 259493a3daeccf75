"""What a simulation run reports: per-request rows and a summary of latency, throughput, hits and links."""
from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import pandas as pd

from flexkv_sim.simulator import SimResult

PERCENTILES = (50, 90, 99)
TIERS = ("gpu", "cpu", "ssd", "remote")


def request_frame(result: SimResult) -> pd.DataFrame:
    """One row per finished request, with its timestamps, hits by tier and latencies."""
    nan = float("nan")
    tpb = result.tokens_per_block
    rows = []
    for sr in result.requests:
        r = sr.request
        rows.append((
            r.request_id, sr.engine.name, r.kind, r.session_id, sr.arrival_s, sr.admitted_s,
            nan if sr.load_end_s is None else sr.load_end_s, sr.first_token_s, sr.finish_s,
            r.input_length, r.output_length, len(sr.keys), sr.gpu_hit, sr.tier_hits.get("CPU", 0),
            sr.tier_hits.get("SSD", 0), sr.cached - sr.local_end, sr.cached * tpb,
        ))
    frame = pd.DataFrame(rows, columns=[
        "request_id", "engine", "kind", "session_id", "arrival_s", "admitted_s", "load_end_s", "first_token_s",
        "finish_s", "input_tokens", "output_tokens", "prompt_blocks", "gpu_hit_blocks", "cpu_hit_blocks",
        "ssd_hit_blocks", "remote_hit_blocks", "cached_tokens",
    ])
    frame["queue_s"] = frame.admitted_s - frame.arrival_s
    frame["load_wait_s"] = frame.load_end_s - frame.admitted_s
    frame["ttft_s"] = frame.first_token_s - frame.arrival_s
    frame["tpot_s"] = (frame.finish_s - frame.first_token_s) / (frame.output_tokens - 1).where(frame.output_tokens > 1)
    frame["e2e_s"] = frame.finish_s - frame.arrival_s
    return frame


def _percentiles(values: pd.Series, name: str) -> dict[str, float]:
    values = values.dropna().to_numpy()
    if not len(values):
        return {f"{name}_p{p}_s": float("nan") for p in PERCENTILES} | {f"{name}_mean_s": float("nan")}
    out = {f"{name}_p{p}_s": float(v) for p, v in zip(PERCENTILES, np.percentile(values, PERCENTILES))}
    out[f"{name}_mean_s"] = float(values.mean())
    return out


def summarize(result: SimResult, frame: pd.DataFrame | None = None) -> dict[str, Any]:
    frame = request_frame(result) if frame is None else frame
    out: dict[str, Any] = {"requests": len(frame), "rejected": result.rejected}
    for name in ("ttft", "tpot", "e2e", "queue", "load_wait"):
        out |= _percentiles(frame[f"{name}_s"], name)
    span = float(frame.finish_s.max() - frame.arrival_s.min()) if len(frame) else 0.0
    rate = len(frame) / span if span > 0 else 0.0
    out |= {
        "makespan_s": span,
        "throughput_rps": rate,
        "qpm": 60.0 * rate,
        "input_tokens_per_s": float(frame.input_tokens.sum()) / span if span else 0.0,
        "output_tokens_per_s": float(frame.output_tokens.sum()) / span if span else 0.0,
        "requests_with_loads": int(frame.load_end_s.notna().sum()),
        "load_wait_total_s": float(frame.load_wait_s.sum()),
    }
    blocks = max(int(frame.prompt_blocks.sum()), 1)
    for tier in TIERS:
        out[f"hit_ratio_{tier}"] = float(frame[f"{tier}_hit_blocks"].sum()) / blocks
    out["block_hit_ratio"] = sum(out[f"hit_ratio_{tier}"] for tier in TIERS)
    out["prefix_token_hit_ratio"] = float(frame.cached_tokens.sum()) / max(int(frame.input_tokens.sum()), 1)
    duration = result.end_s or 1.0
    out["gpu_busy"] = sum(e.busy_s for e in result.engines) / (len(result.engines) * duration)
    links: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])  # kind -> bytes, busy seconds, links
    for link in result.links:
        kind = link.name.split("/", 1)[1]
        kind = "nvme_read" if kind.endswith("_read") else "nvme_write" if kind.endswith("_write") else kind
        links[kind][0] += link.bytes
        links[kind][1] += link.busy_s
        links[kind][2] += 1
    out["link_bytes"] = {kind: int(v[0]) for kind, v in links.items()}
    out["link_utilization"] = {kind: v[1] / (v[2] * duration) for kind, v in links.items()}
    if result.samples:
        out["mean_in_system"] = float(np.mean([n for _, n in result.samples]))
    out["simulated_s"] = result.end_s
    out["sim_wall_s"] = result.wall_s
    return out


def print_summary(summary: dict[str, Any], title: str = "simulation") -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table()
    table.add_column("metric")
    table.add_column("p50", justify="right")
    table.add_column("p90", justify="right")
    table.add_column("p99", justify="right")
    for name in ("ttft", "tpot", "e2e", "queue", "load_wait"):
        table.add_row(f"{name} (s)", *(f"{summary[f'{name}_p{p}_s']:.4g}" for p in PERCENTILES))
    console = Console(width=120)
    console.print(title)
    console.print(table)
    console.print(
        f"{summary['requests']} requests ({summary['rejected']} rejected) in {summary['makespan_s']:.1f} s simulated: "
        f"{summary['throughput_rps']:.3f} req/s, {summary['qpm']:.1f} QPM, "
        f"{summary['input_tokens_per_s']:.0f} input + {summary['output_tokens_per_s']:.0f} output tokens/s"
    )
    hits = ", ".join(f"{tier} {summary[f'hit_ratio_{tier}']:.3f}" for tier in TIERS)
    console.print(f"block hit ratio by tier: {hits}; prefix-token hit ratio {summary['prefix_token_hit_ratio']:.3f}")
    for kind, nbytes in summary["link_bytes"].items():
        console.print(f"  {kind:<11} {nbytes / 1e9:12.2f} GB  utilization {summary['link_utilization'][kind]:.3f}")
    console.print(f"GPU busy {summary['gpu_busy']:.3f}; {summary['requests_with_loads']} requests loaded KV, "
                  f"{summary['load_wait_total_s']:.2f} s waiting for loads; wall {summary['sim_wall_s']:.2f} s")
