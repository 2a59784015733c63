"""What each study's Optuna study is told about a trial, so that its sampler learns what happened: every
epoch's objective as an intermediate value, then COMPLETE (all its epochs ran: its last objective), PRUNED
(ASHA stopped it: Optuna takes its last intermediate value, and TPE ranks it after every complete trial, by
the step it reached) or FAIL (it errored, ended for a fault of its node or its own, diverged, or reported no
finite objective: nothing to learn from its score).

Trials are addressed by their Optuna trial number, which the searcher keeps with each Tune trial, so a
trial restored by `--resume` is told like one asked in this driver session.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import optuna
from optuna.trial import TrialState

from tune_upl.layout import faulted


def outcome(result: Optional[dict[str, Any]], error: bool, planned_epochs: int,
            metric: str) -> tuple[TrialState, Optional[float]]:
    """The state (and value, for COMPLETE) a trial that ended with `result` is told with."""
    result = result or {}
    value = result.get(metric)
    if error or faulted(result) or value is None or not math.isfinite(value):
        return TrialState.FAIL, None
    if int(result.get("training_iteration", 0)) < planned_epochs:
        return TrialState.PRUNED, None
    return TrialState.COMPLETE, float(value)


def _trial_id(study: optuna.Study, number: int) -> int:
    """Optuna's storage id of the study's trial `number` (Optuna's public API addresses asked trials only
    through the `Trial` object of the session that asked them)."""
    return study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)


def running(study: optuna.Study, number: int) -> bool:
    """Whether trial `number` exists in the study and has not been told yet."""
    try:
        return study._storage.get_trial(_trial_id(study, number)).state == TrialState.RUNNING
    except KeyError:  # not in this copy of the database: nothing to tell it about
        warnings.warn(f"optuna study {study.study_name} has no trial {number}", stacklevel=2)
        return False


def report(study: optuna.Study, number: int, step: int, value: Any) -> None:
    """An epoch's objective as trial `number`'s intermediate value at `step` (an epoch run again after a
    restart replaces it); ignored once the trial has been told, or when the value is not a finite number."""
    if value is None or not math.isfinite(value) or not running(study, number):
        return
    study._storage.set_trial_intermediate_value(_trial_id(study, number), int(step), float(value))


def tell(study: optuna.Study, number: int, state: TrialState, value: Optional[float]) -> None:
    """End trial `number` (once: a trial already told is left as it was)."""
    if running(study, number):
        study.tell(number, value if state == TrialState.COMPLETE else None, state=state)


def catch_up(study: optuna.Study, number: int, rows: list[dict[str, Any]], metric: str,
             ended: Optional[tuple[TrialState, Optional[float]]]) -> None:
    """After a resume: what the trial reported and how it ended, as the searcher's saved state knows them,
    told again where the Optuna study lacks it (its file was saved before they were told: a driver killed
    before it pushed `optuna.db` to remote storage)."""
    for row in rows:
        if not faulted(row):
            report(study, number, row.get("training_iteration", 0), row.get(metric))
    if ended is not None:
        tell(study, number, *ended)
