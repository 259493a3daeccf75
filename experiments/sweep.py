"""`python -m experiments sweep`: the policy comparison on the embedded workload.

Replays the workload (control plane only, no timing) for every eviction policy
at several CPU-tier capacities, prints a table with belady as the ceiling,
writes results.csv and a plot into the run's output folder, and ends with one
JSON line of the headline figures.
"""
from __future__ import annotations

import json
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from experiments.common import CONF_DIR, PROJECT_ROOT, load_workload
from flexkv_sim.replay import capacity_from_fraction, replay, workload_keys


def eviction_spec(name: str) -> dict:
    """A policy's config as its YAML in conf/eviction gives it, so sweeps use the shipped defaults."""
    path = PROJECT_ROOT / "conf" / "eviction" / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ValueError(f"unknown eviction policy {name!r} in sweep.policies; valid choices: {known}")
    return OmegaConf.to_container(OmegaConf.load(path))


def _run_one(workload, keys, policy, fraction, cfg_plain):
    s = cfg_plain["sweep"]
    capacity = capacity_from_fraction(workload, fraction)
    ssd = capacity_from_fraction(workload, s["ssd_capacity_fraction"]) if s["ssd_capacity_fraction"] > 0 else 0
    result = replay(
        workload,
        keys=keys,
        capacity_blocks=capacity,
        ssd_capacity_blocks=ssd,
        eviction=eviction_spec(policy),
        admission=cfg_plain["admission"],
        prefetch=cfg_plain["prefetch"],
        write_policy=s["write_policy"],
    )
    row = result.as_dict()
    row["capacity_fraction"] = fraction
    row["workload"] = workload.name
    return row


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for policy in sorted({r["policy"] for r in rows}):
        pts = sorted((r["capacity_fraction"], r["prefix_token_hit_ratio"]) for r in rows if r["policy"] == policy)
        style = dict(color="black", linestyle="--", linewidth=2) if policy == "belady" else {}
        ax.plot([100 * x for x, _ in pts], [y for _, y in pts], marker="o", label=policy, **style)
    ax.set_xscale("log")
    ticks = sorted({100 * r["capacity_fraction"] for r in rows})
    ax.set_xticks(ticks, [f"{t:g}%" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("CPU-tier capacity (% of the workload's unique blocks)")
    ax.set_ylabel("prefix-token hit ratio (cached prompt tokens / prompt tokens)")
    ax.set_title(f"Eviction policies on '{rows[0]['workload']}' (belady = offline ceiling)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(ncol=2, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@hydra.main(config_path=CONF_DIR, config_name="sweep", version_base=None)
def main(cfg: DictConfig) -> None:
    from joblib import Parallel, delayed
    from rich.console import Console
    from rich.table import Table
    from tqdm import tqdm

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    workload = load_workload(cfg.workload)
    keys = workload_keys(workload)
    plain = OmegaConf.to_container(cfg, resolve=True)
    policies = list(cfg.sweep.policies)
    for name in policies:
        eviction_spec(name)  # fail before any work on a bad name
    grid = [(p, f) for p in policies for f in cfg.sweep.capacity_fractions]
    jobs = Parallel(n_jobs=int(cfg.sweep.jobs), return_as="generator")(
        delayed(_run_one)(workload, keys, p, f, plain) for p, f in grid
    )
    rows = list(tqdm(jobs, total=len(grid), desc="sweep", unit="run"))

    fractions = list(cfg.sweep.capacity_fractions)
    table = Table(title=f"prefix-token hit ratio on '{workload.name}' "
                        f"({len(workload)} requests, {workload.num_unique_blocks()} unique blocks)")
    table.add_column("policy")
    for f in fractions:
        table.add_column(f"{100 * f:g}% cap", justify="right")
    by_key = {(r["policy"], r["capacity_fraction"]): r for r in rows}
    for p in policies:
        table.add_row(p, *(f"{by_key[(p, f)]['prefix_token_hit_ratio']:.3f}" for f in fractions))
    Console(width=120).print(table)

    import pandas as pd

    frame = pd.DataFrame(rows).drop(columns=["block_hit_ratio_by_tier"])
    frame.to_csv(out_dir / "results.csv", index=False)
    plot(rows, out_dir / "prefix_hit_vs_capacity.png")
    print(f"results: {out_dir / 'results.csv'}\nplot:    {out_dir / 'prefix_hit_vs_capacity.png'}")
    mid = fractions[len(fractions) // 2]
    best_online = max((r for r in rows if r["policy"] != "belady" and r["capacity_fraction"] == mid),
                      key=lambda r: r["prefix_token_hit_ratio"])
    summary = {
        "workload": workload.name,
        "runs": len(rows),
        "capacity_fraction": mid,
        "best_online_policy": best_online["policy"],
        "best_online_prefix_token_hit_ratio": best_online["prefix_token_hit_ratio"],
        "belady_prefix_token_hit_ratio": by_key.get(("belady", mid), {}).get("prefix_token_hit_ratio"),
        "lru_prefix_token_hit_ratio": by_key.get(("lru", mid), {}).get("prefix_token_hit_ratio"),
        "output_dir": str(out_dir),
    }
    print(json.dumps(summary))
