"""`python -m experiments sweep`: the policy comparison, a Hydra multirun of the simulate app.

Every run of the grid in ``conf/sweep.yaml`` (eviction policy x CPU-tier capacity x write
policy, by default) is one ``experiments.simulate.run`` in its own folder of the sweep,
its printout kept in ``simulate.log`` there. ``hydra.mode: MULTIRUN`` in the config makes
the sweep the default, so no ``--multirun`` is needed. ``SweepReport``, a Hydra callback,
draws one progress bar over all runs and, after the last one, gathers every run's
``summary.json`` and config into one tidy table (``results.csv``/``results.parquet``), prints
it, draws the plots (``experiments.plots``) and ends with one JSON line.

Any Hydra override works and replaces the axis it names (``eviction=lru,belady``); the same
callback gathers any multirun of the simulate app:
``python -m experiments simulate --multirun ... +hydra.callbacks.report._target_=experiments.sweep.SweepReport``.
"""
from __future__ import annotations

import json
import threading
import time
import traceback
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import hydra
import pandas as pd
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from experiments import plots
from experiments.common import CONF_DIR
from experiments.plots import CAPACITY, POLICY
from experiments.simulate import run as simulate_run
from flexkv_runtime.control.config import tier_capacity_blocks
from flexkv_sim.model import ModelSpec

SUMMARY = "summary.json"


@hydra.main(config_path=CONF_DIR, config_name="sweep", version_base=None)
def main(cfg: DictConfig) -> float:
    """One run of the grid: the simulate app's run, its printout kept beside its results."""
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "simulate.log").open("w") as log, redirect_stdout(log):
        return simulate_run(cfg)


# ------------------------------------------------------------------ the table


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as dotted keys; lists become JSON text so that every column is a scalar."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out |= flatten(value, f"{prefix}{key}.")
        return out
    return {prefix[:-1]: json.dumps(tree) if isinstance(tree, list) else tree}


def cpu_capacity_gb(config: dict[str, Any]) -> float:
    """The CPU tier's size in GB as configured, or its blocks' bytes when the config gives blocks."""
    cpu = config["hierarchy"]["cpu"]
    if cpu.get("capacity_bytes"):
        return float(cpu["capacity_bytes"]) / 1e9
    block_bytes = ModelSpec.from_config(config["model"]).block_bytes(int(config["workload"]["tokens_per_block"]))
    return tier_capacity_blocks("cpu", cpu, block_bytes) * block_bytes / 1e9


def collect(sweep_dir: Path) -> pd.DataFrame:
    """One row per finished run under ``sweep_dir``: its job number, overrides, every config value
    (dotted columns such as ``hierarchy.cpu.capacity_bytes``) and every figure of its summary.
    ``frame.attrs["config_columns"]`` names the config values."""
    rows, config_columns = [], {}
    for summary_path in sorted(sweep_dir.glob(f"*/{SUMMARY}"), key=lambda p: p.parent.name.zfill(9)):
        run_dir = summary_path.parent
        config = OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "config.yaml"), resolve=True)
        values = flatten(config)
        config_columns |= dict.fromkeys(values)
        overrides = OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "overrides.yaml"))
        rows.append({"job": run_dir.name, "overrides": " ".join(overrides), CAPACITY: cpu_capacity_gb(config),
                     **values, **flatten(json.loads(summary_path.read_text()))})
    if not rows:
        raise RuntimeError(f"no run under {sweep_dir} wrote a {SUMMARY}")
    frame = pd.DataFrame(rows)
    for column in frame.columns[frame.dtypes == object]:
        kinds = {type(v) for v in frame[column].dropna()}
        if len(kinds) > 1:  # parquet wants one type per column
            frame[column] = frame[column].map(lambda v: v if v is None or pd.isna(v) else str(v))
    frame.attrs["config_columns"] = list(config_columns)
    return frame


def facet_columns(frame: pd.DataFrame) -> list[str]:
    """Config values the sweep varied besides the policy (and its parameters) and the CPU capacity:
    each combination gets its own panel in the plots."""
    return [c for c in frame.attrs["config_columns"]
            if not c.startswith(("eviction.", "hierarchy.cpu.")) and frame[c].astype(str).nunique() > 1]


# ----------------------------------------------------------------- reporting


def print_table(frame: pd.DataFrame, facets: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    capacities = sorted(frame[CAPACITY].unique())
    for where, panel in plots.panels(frame, facets):
        table = Table(title=f"{where + ': ' if where else ''}prefix-token hit ratio | TTFT p90 (ms)")
        table.add_column("policy")
        for capacity in capacities:
            table.add_column(f"CPU {capacity:g} GB", justify="right")
        for policy in plots.policy_order(panel[POLICY]):
            cells = []
            for capacity in capacities:
                hit = panel[(panel[POLICY] == policy) & (panel[CAPACITY] == capacity)]
                cells.append("" if hit.empty else
                             f"{hit.prefix_token_hit_ratio.mean():.3f} | {1e3 * hit.ttft_p90_s.mean():.0f}")
            table.add_row(policy, *cells)
        console.print(table)


def headline(frame: pd.DataFrame, facets: list[str]) -> dict[str, Any]:
    """The sweep in a few figures: the best online policy against LRU and the offline limit at the
    middle capacity (first panel), and whether the limit held everywhere."""
    middle = plots.middle_capacity(frame)
    panel = plots.panels(frame, facets)[0][1]
    at = panel[panel[CAPACITY] == middle].groupby(POLICY).mean(numeric_only=True)
    online = at.drop(index=[p for p in at.index if p in plots.OFFLINE])
    best = online.prefix_token_hit_ratio.idxmax() if len(online) else None
    out: dict[str, Any] = {
        "runs": len(frame),
        "workload": frame.workload.iloc[0],
        "hierarchy": frame.hierarchy.iloc[0],
        "model": frame.model.iloc[0],
        "cpu_capacity_gb": middle,
        **{column.rsplit(".", 1)[-1]: panel[column].iloc[0] for column in facets},
        "best_online_policy": best,
    }
    for name, policy in (("best_online", best), ("lru", "lru"), ("belady", "belady")):
        if policy in at.index:
            out[f"{name}_prefix_token_hit_ratio"] = round(float(at.prefix_token_hit_ratio[policy]), 4)
            out[f"{name}_ttft_p90_s"] = round(float(at.ttft_p90_s[policy]), 4)
    if "belady" in set(frame[POLICY]):
        points = frame.groupby([*facets, CAPACITY])
        out["belady_is_ceiling"] = bool(all(
            group[group[POLICY] == "belady"].prefix_token_hit_ratio.min() >= group.prefix_token_hit_ratio.max() - 1e-12
            for _, group in points if (group[POLICY] == "belady").any()))
    return out


class _Progress:
    """A progress bar over the runs of a sweep, counted by the summaries they have written."""

    def __init__(self, sweep_dir: Path, total: int | None) -> None:
        from tqdm import tqdm

        self.sweep_dir = sweep_dir
        self.bar = tqdm(total=total, desc="sweep", unit="run", dynamic_ncols=True)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _count(self) -> int:
        return sum(1 for _ in self.sweep_dir.glob(f"*/{SUMMARY}"))

    def _watch(self) -> None:
        while not self.stop.wait(0.5):
            self.bar.update(self._count() - self.bar.n)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.bar.update(self._count() - self.bar.n)
        self.bar.close()


def planned_runs(config: DictConfig) -> int | None:
    """How many runs the sweeper will launch: the basic sweeper's grid, or an optimiser's trial budget."""
    sweeper = config.hydra.sweeper
    if "n_trials" in sweeper:
        return int(sweeper.n_trials)
    if not str(sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return None
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    arguments = [f"{key}={value}" for key, value in (sweeper.params or {}).items()]
    arguments += list(config.hydra.overrides.task)
    batches = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(arguments), None)
    return sum(len(batch) for batch in batches)


class SweepReport(Callback):
    """Hydra callback: a progress bar while the runs go, then the table, the plots and a JSON line."""

    def __init__(self) -> None:
        self._progress: _Progress | None = None
        self._started = 0.0

    def __getstate__(self) -> dict[str, Any]:
        # the launcher ships the callbacks to its workers; the bar stays here
        return {**self.__dict__, "_progress": None}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        total = planned_runs(config)
        print(f"sweep: {total if total is not None else 'several'} runs into {sweep_dir.resolve()}", flush=True)
        self._started = time.perf_counter()
        self._progress = _Progress(sweep_dir, total)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self._progress is not None:
            self._progress.close()
        try:
            self.report(Path(config.hydra.sweep.dir).resolve(), time.perf_counter() - self._started)
        except Exception:  # Hydra would turn it into a warning and exit 0
            traceback.print_exc()
            raise SystemExit(1) from None

    @staticmethod
    def report(sweep_dir: Path, wall: float) -> None:
        frame = collect(sweep_dir)
        frame.to_csv(sweep_dir / "results.csv", index=False)
        frame.to_parquet(sweep_dir / "results.parquet", index=False)
        facets = facet_columns(frame)
        print_table(frame, facets)
        figures = plots.draw_all(frame, facets, sweep_dir)
        print(f"results: {sweep_dir / 'results.csv'} (and results.parquet), one row per run")
        for figure in figures:
            print(f"plot:    {figure}")
        summary = {**headline(frame, facets), "wall_s": round(wall, 1), "output_dir": str(sweep_dir),
                   "results": str(sweep_dir / "results.csv"), "plots": [str(f) for f in figures]}
        print(json.dumps(summary, default=str))
