"""What the report asks of the results beyond one benchmark row per study, as tables (no markdown here):
the Unified Proxy Loss's anchor × aggregation cells, what each embedding size buys, and each loss (or cell)
against the best one of its dataset and backbone with a Welch interval over the final seeds.

Read from `results.ExperimentData` (the report's one loader); torch-free, so the report stays light.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Optional

import pandas as pd

from tune_upl.comparisons import Interval, pareto_front, welch_interval
from tune_upl.loss_axes import DEFAULT_CELL
from tune_upl.results import ExperimentData, FinalResult

UNIFIED = "balanced_proxy"  # the loss whose two axes (tune_upl.loss_axes) make the ablation's cells


def cell(config: dict[str, Any]) -> Optional[tuple[str, str]]:
    """The anchor × aggregation cell a `balanced_proxy` config trains (unset axes are the loss's own);
    None for the other losses, which have no such axes."""
    if config.get("loss_name") != UNIFIED:
        return None
    return config.get("loss_anchor") or DEFAULT_CELL[0], config.get("loss_aggregation") or DEFAULT_CELL[1]


def loss_label(config: dict[str, Any]) -> str:
    """The loss as the report names it: `balanced_proxy[proxy/sum]` for a cell other than the default, so two
    cells of one dataset and backbone are two rows, not one."""
    found = cell(config)
    return config["loss_name"] if found in (None, DEFAULT_CELL) else f"{UNIFIED}[{found[0]}/{found[1]}]"


def as_published(config: dict[str, Any]) -> bool:
    """Whether the config trains the loss the published numbers measured: any loss but a non-default cell."""
    return cell(config) in (None, DEFAULT_CELL)


def ablation_groups(data: ExperimentData) -> dict[tuple[str, str], dict[tuple[str, str], FinalResult]]:
    """Per dataset and backbone, the tested `balanced_proxy` cells, where there are two or more."""
    groups: dict[tuple[str, str], dict[tuple[str, str], FinalResult]] = {}
    for final in data.finals:
        found = cell(final.config)
        if found is not None and final.runs:
            groups.setdefault((final.config["data_name"], final.config["backbone_type"]), {})[found] = final
    return {key: cells for key, cells in groups.items() if len(cells) > 1}


# ---------------------------------------------------------------- embedding size
def trial_points(data: ExperimentData, metric: str) -> pd.DataFrame:
    """One row per search trial that reported `metric`: study, trial, feature_dim, hours, best (its best
    `metric` over its epochs)."""
    if data.trials.empty or data.epochs.empty or metric not in data.epochs:
        return pd.DataFrame(columns=["study", "trial", "feature_dim", "hours", "best"])
    best = data.epochs.groupby(["study", "trial"])[metric].max().rename("best").reset_index()
    trials = data.trials.assign(feature_dim=data.trials["_config"].map(lambda c: int(c["feature_dim"])))
    points = trials[["study", "trial", "feature_dim", "hours"]].merge(best, on=["study", "trial"])
    return points.dropna(subset=["best"]).reset_index(drop=True)


def embedding_sizes(points: pd.DataFrame) -> pd.DataFrame:
    """Per study and feature_dim: the trials that ran at it, the best `best` among them and the trial-hours
    spent there; `front` marks the dims no smaller dim matches or beats."""
    table = (points.groupby(["study", "feature_dim"], sort=True)
             .agg(trials=("trial", "size"), best=("best", "max"), hours=("hours", "sum")).reset_index())
    table["front"] = False
    for _, mine in table.groupby("study", sort=False):
        front = pareto_front(mine["feature_dim"].tolist(), mine["best"].tolist())
        table.loc[mine.index[front], "front"] = True
    return table


# ---------------------------------------------------------------- loss comparison
@dataclass(frozen=True)
class Comparison:
    """One loss (or cell) against the best one of its dataset and backbone, on test Recall@1."""

    label: str
    best: str
    seeds: tuple[int, int]  # this one's, the best one's
    difference: float  # mean − the best's mean (≤ 0)
    interval: Optional[Interval]  # None with one seed on a side


def compare_to_best(losses: dict[str, list[float]]) -> list[Comparison]:
    """Each entry against the one with the highest mean (the first listed of equal means), best excluded."""
    tested = {label: values for label, values in losses.items() if values}
    if len(tested) < 2:
        return []
    best = max(tested, key=lambda label: statistics.mean(tested[label]))
    return [Comparison(label, best, (len(values), len(tested[best])),
                       statistics.mean(values) - statistics.mean(tested[best]),
                       welch_interval(values, tested[best]))
            for label, values in tested.items() if label != best]
