"""The sweep's figures, drawn from its tidy table (``experiments.sweep.collect``).

Each figure has one panel per combination of the other swept values (``facets``, e.g.
the write policy); within a panel a line or bar per eviction policy, the same colour
for a policy in every figure, and belady (the offline limit) in dashed black.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

POLICY, CAPACITY = "eviction", "cpu_capacity_gb"
#: policies that see the future: references, not contenders
OFFLINE = ("belady",)
#: link kinds of flexkv_sim.metrics, as a reader names them
LINKS = {
    "pcie_h2d": "PCIe host→GPU\n(loads)",
    "pcie_d2h": "PCIe GPU→host\n(stores)",
    "nvme_read": "NVMe reads\n(SSD→CPU tier)",
    "nvme_write": "NVMe writes\n(CPU tier→SSD)",
    "nic_rx": "NIC in\n(remote pool loads)",
    "nic_tx": "NIC out\n(remote pool stores)",
}


def policy_order(policies: Iterable[str]) -> list[str]:
    """Online policies by name, then the offline ones."""
    names = set(policies)
    return sorted(names - set(OFFLINE)) + [p for p in OFFLINE if p in names]


def _styles(frame: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """One colour and marker per policy; the markers tell apart policies whose lines coincide."""
    colours = plt.get_cmap("tab10").colors
    markers = "o^vDPX*<>h"
    online = [p for p in policy_order(frame[POLICY]) if p not in OFFLINE]
    styles = {p: {"color": colours[i % len(colours)], "marker": markers[i % len(markers)],
                  "markersize": max(10 - 0.8 * i, 4)} for i, p in enumerate(online)}
    styles |= {p: {"color": "black", "linestyle": "--", "linewidth": 2, "marker": "s"} for p in OFFLINE}
    return styles


def _label(policy: str) -> str:
    return f"{policy} (offline limit)" if policy in OFFLINE else policy


def describe(facets: Sequence[str], key: Any) -> str:
    """A panel's title: its swept values, by their short names."""
    values = key if isinstance(key, tuple) else (key,)
    return ", ".join(f"{column.rsplit('.', 1)[-1]} = {value}" for column, value in zip(facets, values))


def panels(frame: pd.DataFrame, facets: Sequence[str]) -> list[tuple[str, pd.DataFrame]]:
    """(title, rows) of each panel, in a stable order."""
    if not facets:
        return [("", frame)]
    return [(describe(facets, key), panel) for key, panel in frame.groupby(list(facets), sort=True)]


def _setting(frame: pd.DataFrame) -> str:
    """What every run shares, for the figure's title."""
    first = frame.iloc[0]
    text = f"workload '{first.workload}', {first.hierarchy}, {first.model}"
    ssd = frame.get("hierarchy.ssd.capacity_bytes")
    if ssd is not None and ssd.nunique() == 1 and pd.notna(ssd.iloc[0]) and ssd.iloc[0]:
        text += f", SSD tier {ssd.iloc[0] / 1e9:g} GB"
    return text


def middle_capacity(frame: pd.DataFrame) -> float:
    capacities = sorted(frame[CAPACITY].unique())
    return capacities[len(capacities) // 2]


def _capacity_axis(ax: plt.Axes, frame: pd.DataFrame) -> None:
    capacities = sorted(frame[CAPACITY].unique())
    ax.set_xscale("log", base=2)
    ax.set_xticks(capacities, [f"{c:g}" for c in capacities])
    ax.minorticks_off()
    ax.set_xlabel("CPU-tier capacity (GB)")
    ax.grid(True, alpha=0.3)


def _grid(rows: int, cols: int, width: float = 6.0, height: float = 4.5, **kwargs: Any):
    """Panels of a fixed size, always as a 2-D array."""
    return plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False, **kwargs)


def _legend(ax: plt.Axes) -> None:
    """Beside the panel, where it hides no data."""
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def hit_ratio_vs_capacity(frame: pd.DataFrame, facets: Sequence[str], path: Path) -> Path:
    shown = panels(frame, facets)
    styles = _styles(frame)
    fig, axes = _grid(1, len(shown), sharey=True)
    for ax, (title, panel) in zip(axes[0], shown):
        for policy in policy_order(panel[POLICY]):
            points = panel[panel[POLICY] == policy].groupby(CAPACITY).prefix_token_hit_ratio.mean()
            ax.plot(points.index, points.values, label=_label(policy), **styles[policy])
        _capacity_axis(ax, frame)
        ax.set_title(title)
    axes[0][0].set_ylabel("prefix-token hit ratio\n(prompt tokens served from cache / prompt tokens)")
    _legend(axes[0][-1])
    fig.suptitle(f"Prompt tokens the cache hierarchy serves (GPU + CPU + SSD), by eviction policy\n{_setting(frame)}")
    return _save(fig, path)


def ttft_vs_capacity(frame: pd.DataFrame, facets: Sequence[str], path: Path) -> Path:
    shown = panels(frame, facets)
    styles = _styles(frame)
    fig, axes = _grid(len(shown), 2)
    for row, (title, panel) in enumerate(shown):
        for col, percentile in enumerate(("p50", "p90")):
            ax = axes[row][col]
            for policy in policy_order(panel[POLICY]):
                points = panel[panel[POLICY] == policy].groupby(CAPACITY)[f"ttft_{percentile}_s"].mean()
                ax.plot(points.index, 1e3 * points.values, label=_label(policy), **styles[policy])
            _capacity_axis(ax, frame)
            ax.set_ylabel(f"TTFT {percentile} (ms)")
            ax.set_title(f"{'median' if percentile == 'p50' else '90th percentile'} time to first token"
                         + (f"\n{title}" if title else ""))
    _legend(axes[0][-1])
    fig.suptitle(f"Time to first token by CPU-tier capacity and eviction policy\n{_setting(frame)}")
    return _save(fig, path)


def _requests(run: pd.Series) -> pd.DataFrame:
    return pd.read_parquet(Path(run.output_dir) / "requests.parquet", columns=["ttft_s"])


def ttft_cdf(frame: pd.DataFrame, facets: Sequence[str], path: Path) -> Path:
    """Per-request TTFT distributions of the online policies with the lowest and highest mean TTFT
    at the middle capacity, against belady's."""
    capacity = middle_capacity(frame)
    shown = panels(frame[frame[CAPACITY] == capacity], facets)
    styles = _styles(frame)
    fig, axes = _grid(1, len(shown), sharey=True)
    for ax, (title, panel) in zip(axes[0], shown):
        online = panel[~panel[POLICY].isin(OFFLINE)].sort_values("ttft_mean_s")
        chosen = {"best": online.iloc[0], "worst": online.iloc[-1]} if len(online) else {}
        chosen |= {"offline limit": run for _, run in panel[panel[POLICY].isin(OFFLINE)].iterrows()}
        for role, run in chosen.items():
            ttft = 1e3 * _requests(run).ttft_s.dropna().sort_values().to_numpy()
            share = (pd.RangeIndex(1, len(ttft) + 1) / len(ttft)).to_numpy()
            ax.step(ttft, share, where="post", color=styles[run[POLICY]]["color"],
                    linestyle=styles[run[POLICY]].get("linestyle", "-"),
                    label=f"{role}: {run[POLICY]} (mean {1e3 * run.ttft_mean_s:.0f} ms)")
        ax.set_xscale("log")
        ax.set_xlabel("time to first token (ms, log scale)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    axes[0][0].set_ylabel("share of requests with TTFT ≤ x")
    fig.suptitle(f"TTFT distribution, best and worst online policy by mean TTFT, CPU tier {capacity:g} GB\n"
                 f"{_setting(frame)}")
    return _save(fig, path)


def link_bytes(frame: pd.DataFrame, facets: Sequence[str], path: Path) -> Path:
    capacity = middle_capacity(frame)
    shown = panels(frame[frame[CAPACITY] == capacity], facets)
    styles = _styles(frame)
    kinds = [k for k in LINKS if f"link_bytes.{k}" in frame and frame[f"link_bytes.{k}"].fillna(0).any()]
    fig, axes = _grid(1, len(shown), width=7.0, sharey=True)
    for ax, (title, panel) in zip(axes[0], shown):
        policies = policy_order(panel[POLICY])
        width = 0.8 / max(len(policies), 1)
        for i, policy in enumerate(policies):
            run = panel[panel[POLICY] == policy].mean(numeric_only=True)
            offline = policy in OFFLINE
            ax.bar([k + (i - (len(policies) - 1) / 2) * width for k in range(len(kinds))],
                   [run[f"link_bytes.{kind}"] / 1e9 for kind in kinds], width, label=_label(policy),
                   color=styles[policy]["color"], hatch="//" if offline else None,
                   edgecolor="white" if offline else None)
        ax.set_xticks(range(len(kinds)), [LINKS[k] for k in kinds], fontsize=8)
        ax.set_title(title)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0][0].set_ylabel("data moved over the whole run (GB)")
    _legend(axes[0][-1])
    fig.suptitle(f"Bytes per link by eviction policy, CPU tier {capacity:g} GB\n{_setting(frame)}")
    return _save(fig, path)


def draw_all(frame: pd.DataFrame, facets: Sequence[str], out_dir: Path) -> list[Path]:
    """Every figure of the sweep into ``out_dir``; returns their paths."""
    return [
        hit_ratio_vs_capacity(frame, facets, out_dir / "prefix_hit_vs_capacity.png"),
        ttft_vs_capacity(frame, facets, out_dir / "ttft_vs_capacity.png"),
        ttft_cdf(frame, facets, out_dir / "ttft_cdf_best_worst.png"),
        link_bytes(frame, facets, out_dir / "link_bytes.png"),
    ]
