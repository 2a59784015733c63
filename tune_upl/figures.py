"""The report's figures (matplotlib, PNG), each drawn from `results.ExperimentData` into a given file.

Figures are built on `matplotlib.figure.Figure` (the Agg canvas), never through pyplot: no global backend
is touched and nothing opens a window. Each function returns False when it has nothing to draw.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from tune_upl.comparisons import pareto_front
from tune_upl.importance import Importance
from tune_upl.layout import COMPLETED, DIVERGED, ERRORED, OUT_OF_MEMORY, RUNNING, STOPPED_EARLY
from tune_upl.results import ExperimentData
from tune_upl.spec import Param

STATE_COLOURS = {COMPLETED: "tab:blue", STOPPED_EARLY: "tab:orange", DIVERGED: "tab:red",
                 OUT_OF_MEMORY: "tab:purple", ERRORED: "black", RUNNING: "tab:green"}
DPI = 100


def _save(figure: Figure, path: Path) -> bool:
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    return True


def _grid(count: int, columns: int = 3, size: tuple[float, float] = (4.2, 3.2)) -> tuple[Figure, list[Any]]:
    columns = min(columns, count)
    rows = math.ceil(count / columns)
    figure = Figure(figsize=(size[0] * columns, size[1] * rows))
    axes = [figure.add_subplot(rows, columns, i + 1) for i in range(count)]
    return figure, axes


def _running_best(values: pd.Series, mode: str) -> pd.Series:
    return values.cummax() if mode == "max" else values.cummin()


def best_so_far(data: ExperimentData, path: Path) -> bool:
    """The best objective so far against the trial index (creation order) and against wall time."""
    trials = data.trials.dropna(subset=["objective"]) if not data.trials.empty else data.trials
    if trials.empty or data.epochs.empty or data.metric not in data.epochs:
        return False
    figure = Figure(figsize=(11, 3.8))
    by_index, by_time = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    epochs = data.epochs.dropna(subset=[data.metric, "timestamp"])
    start = float(data.trials["start"].min())
    span = (float(epochs["timestamp"].max()) - start) / 60
    unit, scale = ("hours", 3600.0) if span > 120 else ("minutes", 60.0)
    for study in data.studies:
        mine = data.trials[data.trials["study"] == study].sort_values("_order").reset_index(drop=True)
        if mine["objective"].notna().sum() == 0:
            continue
        index = np.arange(1, len(mine) + 1)
        line = by_index.step(index, _running_best(mine["objective"].ffill(), data.mode), where="post", label=study)
        by_index.scatter(index, mine["objective"], s=14, alpha=0.5, color=line[0].get_color())
        base = mine.index[mine["baseline"] == "yes"]
        if len(base):
            by_index.scatter(index[base], mine.loc[base, "objective"], marker="*", s=120, color=line[0].get_color(),
                             edgecolor="black", zorder=3, label=f"{study}: baseline (seed recipe)")
        events = epochs[epochs["study"] == study].sort_values("timestamp")
        by_time.step((events["timestamp"] - start) / scale, _running_best(events[data.metric], data.mode),
                     where="post", label=study, color=line[0].get_color())
    by_index.set(xlabel="trial (in the order started)", ylabel=f"best {data.metric} so far",
                 title="Best so far, per trial (dots: each trial's best epoch)")
    by_time.set(xlabel=f"wall time since the first trial started ({unit})", ylabel=f"best {data.metric} so far",
                title="Best so far, over wall time (every epoch's result)")
    by_index.xaxis.get_major_locator().set_params(integer=True)
    by_index.legend(fontsize=8)
    if len(data.studies) > 1:
        by_time.legend(fontsize=8)
    return _save(figure, path)


def epoch_curves(data: ExperimentData, path: Path, metric: str, top: int = 5) -> bool:
    """`metric` per epoch of the `top` trials of each study (by the objective)."""
    if data.trials.empty or data.epochs.empty or metric not in data.epochs:
        return False
    studies = [s for s in data.studies if (data.trials["study"] == s).any()]
    figure, axes = _grid(len(studies), columns=2, size=(5.5, 3.6))
    for axis, study in zip(axes, studies):
        best = data.trials[data.trials["study"] == study].dropna(subset=["objective"]).head(top)
        for row in best.itertuples():
            frame = data.epochs[(data.epochs["study"] == study) & (data.epochs["trial"] == row.trial)]
            label = f"{row.trial} ({row.state}{', baseline' if row.baseline else ''})"
            axis.plot(frame["training_iteration"], frame[metric], marker="o", ms=3, label=label)
        axis.set(xlabel="epoch", ylabel=metric, title=f"top {len(best)} trials of {study}")
        axis.xaxis.get_major_locator().set_params(integer=True)
        if len(best):  # a study whose every trial failed has no curve to name
            axis.legend(fontsize=7)
    return _save(figure, path)


def objective_vs_params(data: ExperimentData, path: Path) -> bool:
    """Each trial's best objective against each searched field; colour: the trial's state."""
    names = [n for n in data.searched if not data.trials.empty and data.trials[n].notna().any()]
    if not names:
        return False
    figure, axes = _grid(len(names), columns=min(4, len(names)), size=(3.4, 3.0))
    trials = data.trials.dropna(subset=["objective"])
    jitter = np.random.default_rng(0)
    for axis, name in zip(axes, names):
        param = Param.model_validate(data.spec["space"][name])
        shown = trials[trials[name].notna()]
        if param.choice is not None:
            choices = [str(c) for c in param.choice]
            positions = {c: i for i, c in enumerate(choices)}
            xs = np.array([positions.get(str(v), positions.get(str(_number(v)), -1)) for v in shown[name]], float)
            xs += jitter.uniform(-0.12, 0.12, len(xs))
            axis.set_xticks(range(len(choices)), choices)
            axis.set_xlim(-0.5, len(choices) - 0.5)
        else:
            xs = shown[name].astype(float).to_numpy()
            if param.loguniform is not None:
                axis.set_xscale("log")
        for state, colour in STATE_COLOURS.items():
            mask = (shown["state"] == state).to_numpy()
            if mask.any():
                axis.scatter(xs[mask], shown["objective"][mask], s=22, color=colour, label=state, alpha=0.8)
        axis.set(xlabel=name, ylabel=data.metric)
    axes[0].legend(fontsize=7)
    figure.suptitle("Best objective of each trial against each searched hyper-parameter", fontsize=10)
    return _save(figure, path)


def _number(value: Any) -> Any:
    """32.0 -> 32, so that a float config value finds its integer choice."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def importance_chart(found: list[Importance], path: Path) -> bool:
    """Horizontal bars of each study's importances."""
    if not found:
        return False
    figure, axes = _grid(len(found), columns=2, size=(5.0, 0.5 + 0.45 * max(len(i.values) for i in found)))
    for axis, importance in zip(axes, found):
        names = list(importance.values)[::-1]
        axis.barh(names, [importance.values[n] for n in names], color="tab:blue")
        axis.set(xlim=(0, 1), xlabel="importance (PED-ANOVA, sums to 1)",
                 title=f"{importance.study}: {importance.completed} completed trials")
    return _save(figure, path)


def loss_comparison(groups: dict[tuple[str, str], dict[str, list[float]]], path: Path, metric: str) -> bool:
    """Per dataset and backbone, `metric` of each final seed for each loss (dots) and mean ± std (bar)."""
    groups = {k: v for k, v in groups.items() if len(v) > 1}
    if not groups:
        return False
    figure, axes = _grid(len(groups), columns=3, size=(3.6, 3.2))
    for axis, ((data_name, backbone), losses) in zip(axes, groups.items()):
        for i, (loss, values) in enumerate(losses.items()):
            values = [100 * v for v in values]
            spread = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
            axis.errorbar(i + 0.15, float(np.mean(values)), yerr=spread, fmt="s", color="black", capsize=4)
            axis.scatter([i - 0.1] * len(values), values, color="tab:blue", zorder=3, s=18, alpha=0.7)
        axis.set_xticks(range(len(losses)), list(losses), rotation=15)
        axis.set_xlim(-0.6, len(losses) - 0.4)
        axis.set(ylabel=f"{metric} (%)", title=f"{data_name} / {backbone}")
    return _save(figure, path)


def embedding_size(points: pd.DataFrame, path: Path, metric: str) -> bool:
    """Each trial's best `metric` against its feature_dim and against its trial-hours, per study, the
    non-dominated trials (no smaller, or cheaper, trial of the study reached as high) joined by a line."""
    if points.empty:
        return False
    figure = Figure(figsize=(11, 3.8))
    by_dim, by_hours = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    for study, mine in points.groupby("study", sort=False):
        mine = mine.reset_index(drop=True)
        colour = by_dim.scatter(mine["feature_dim"], mine["best"], s=18, alpha=0.6).get_facecolor()[0]
        by_hours.scatter(mine["hours"], mine["best"], s=18, alpha=0.6, color=colour)
        for axis, cost in ((by_dim, "feature_dim"), (by_hours, "hours")):
            front = mine.loc[pareto_front(mine[cost].tolist(), mine["best"].tolist())]
            axis.plot(front[cost], front["best"], marker="o", ms=4, color=colour, label=study)
    by_dim.set_xscale("log", base=2)
    dims = sorted(points["feature_dim"].unique())
    by_dim.set_xticks(dims, [str(d) for d in dims])
    by_dim.minorticks_off()
    by_dim.set(xlabel="feature_dim (log scale)", ylabel=f"best {metric} of the trial",
               title="What each embedding size buys")
    by_hours.set(xlabel="trial-hours of the trial", ylabel=f"best {metric} of the trial",
                 title="What each trial-hour buys")
    by_dim.legend(fontsize=7)
    return _save(figure, path)
