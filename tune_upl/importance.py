"""Hyper-parameter importance of each study, from the Optuna study the search told (`optuna.db`), scored by
Optuna's default evaluator (PED-ANOVA in Optuna 4.x/5.x, which needs no scikit-learn).

The study holds each trial as the searcher told it (`tune_upl.telling`): trials that ran all their epochs
are COMPLETE and are the ones scored; ASHA-stopped trials are PRUNED (their value came from a smaller
budget) and errored, faulted and diverged ones FAIL, so neither counts here.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import optuna

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


def told_study(database: Path, key: str) -> Optional[optuna.Study]:
    """Study `key` of the experiment's `optuna.db`, or None where it has none (the file is missing, or the study never started)."""
    if not database.is_file():
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{database}"
    if key not in {s.study_name for s in optuna.get_all_study_summaries(storage)}:
        return None
    return optuna.load_study(study_name=key, storage=storage)


def importances(key: str, study: optuna.Study, searched: list[str]) -> Optional[Importance]:
    """Importance of each searched field in one study, or None when fewer than 2 trials completed or no
    field varied (Optuna cannot score a single point)."""
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    varied = {n for n in searched if len({str(t.params.get(n)) for t in complete if n in t.params}) > 1}
    if len(complete) < 2 or not varied:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its own small-sample warnings: the report says it in words
        values = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.PedAnovaImportanceEvaluator(target_quantile=TARGET_QUANTILE),
            params=sorted(varied))
    return Importance(key, dict(values), len(complete))
