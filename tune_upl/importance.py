"""Hyper-parameter importance: an Optuna study rebuilt from Tune's results, scored by Optuna's default
evaluator (PED-ANOVA in Optuna 4.x/5.x, which needs no scikit-learn).

Only trials that ran all their epochs enter as COMPLETE: an ASHA-stopped trial's best value was reached
on a smaller budget, so it enters as PRUNED (with its per-epoch values) and counts for nothing here.
Errored, diverged and out-of-memory trials enter as FAIL.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import optuna
import pandas as pd

from tune_upl.layout import COMPLETED, OPEN_STATES, STOPPED_EARLY
from tune_upl.spec import Param

# PED-ANOVA's documentation asks for at least 5 trials in its top quantile (10 %) to be stable
TARGET_QUANTILE = 0.1
MIN_TOP_TRIALS = 5
MEANINGFUL_TRIALS = math.ceil(MIN_TOP_TRIALS / TARGET_QUANTILE)


@dataclass(frozen=True)
class Importance:
    """One study's importances (normalised to sum 1), from `completed` complete trials."""

    study: str
    values: dict[str, float]
    completed: int

    @property
    def meaningful(self) -> bool:
        return self.completed >= MEANINGFUL_TRIALS


def _as_choice(value: Any, param: Param) -> Any:
    """A config value in the entry's own type (Tune may hold 32.0 for the choice 32)."""
    if param.choice is not None:
        return next((c for c in param.choice if c == value), value)
    return int(value) if param.int is not None else float(value)


def rebuild_study(trials: pd.DataFrame, epochs: pd.DataFrame, space: dict[str, dict[str, Any]],
                  metric: str, mode: str) -> optuna.Study:
    """An in-memory Optuna study of one Tune study's trials (rows of `results.trial_rows`)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created" line per report
    study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
    params_of = {name: Param.model_validate(param) for name, param in space.items()}
    for row in trials.sort_values("_order").to_dict("records"):
        present = {n: p for n, p in params_of.items() if not pd.isna(row.get(n))}  # NaN: `when` did not hold
        params = {n: _as_choice(row[n], p) for n, p in present.items()}
        if not all(p.contains(params[n]) for n, p in present.items()):
            continue  # a value outside the space (a spec changed under the experiment): not comparable
        if row["state"] == COMPLETED and not math.isnan(row["objective"]):
            state, value = optuna.trial.TrialState.COMPLETE, row["objective"]
        elif row["state"] == STOPPED_EARLY:
            state, value = optuna.trial.TrialState.PRUNED, None
        elif row["state"] in OPEN_STATES:
            continue
        else:
            state, value = optuna.trial.TrialState.FAIL, None
        intermediate = {}
        if not epochs.empty and metric in epochs:
            mine = epochs[(epochs["study"] == row["study"]) & (epochs["trial"] == row["trial"])]
            intermediate = {int(e): float(v) for e, v in zip(mine["training_iteration"], mine[metric])
                            if not pd.isna(v)}
        distributions = {n: p.distribution() for n, p in present.items()}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, value=value,
                                                  state=state, intermediate_values=intermediate))
    return study


def importances(key: str, trials: pd.DataFrame, epochs: pd.DataFrame, space: dict[str, dict[str, Any]],
                metric: str, mode: str) -> Optional[Importance]:
    """Importance of each searched field in one study, or None when fewer than 2 trials completed or no
    field varied (Optuna cannot score a single point)."""
    study = rebuild_study(trials, epochs, space, metric, mode)
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    varied = {n for n in space if len({str(t.params.get(n)) for t in complete if n in t.params}) > 1}
    if len(complete) < 2 or not varied:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its own small-sample warnings: the report says it in words
        values = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.PedAnovaImportanceEvaluator(target_quantile=TARGET_QUANTILE),
            params=sorted(varied))
    return Importance(key, dict(values), len(complete))
