"""Every use of Ray / Tune that is not documented public API, behind one door.

The rest of tune_upl imports only documented `ray` / `ray.tune` API (a `Trial`'s documented members
included: `trial_id`, `config`, `status`, `last_result`, `path`, `error_file`), or this module. Each function
here says what of Ray it reads and was written for Ray `WRITTEN_FOR`; `tests/test_ray_private.py` checks
each against the installed Ray and names both versions when an upgrade changed one.

Importing this module imports no Ray: the report reads Tune's saved state with it (`read_saved_trials`) in a
process that never loads Ray. Functions that need Ray import it themselves.
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from tune_upl.layout import TUNE_STATE_PATTERN

WRITTEN_FOR = "2.60.0"  # the Ray every function below was written for and checked against


def changed(what: str, installed: str) -> str:
    """The one line for an internal that a Ray upgrade changed (tests, and errors raised here)."""
    return f"written for Ray {WRITTEN_FOR}, Ray {installed} changed {what}"


# ---------------------------------------------------------------- Tune's saved experiment state
# Tune writes `experiment_state-<date>.json` in an experiment folder each time it saves the run (the file's
# name is in Tune's storage docs; its content is not): {"trial_data": [[trial JSON, run metadata JSON], ...],
# ...}, each entry two JSON strings, written by `Trial.get_json_state`. `ray.tune.ExperimentAnalysis` reads
# the same file, but importing it loads Ray (1.7 s here) and its constructor reads every trial's result file
# too (0.35 s for the 9 trials of the demo, against 7 ms for this reader), dropping a whole file for one
# unreadable line with a warning; the report reads result files itself, row by row.

RUNNING = "RUNNING"
PENDING = "PENDING"


class TuneStateError(ValueError):
    """Tune's saved state cannot be read as Ray 2.60 writes it: `path` (the file, or the folder without
    one) and what is wrong with it."""

    def __init__(self, path: Path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = path, problem


@dataclass(frozen=True)
class SavedTrial:
    """One trial as Tune last saved it: what `ExperimentAnalysis(folder).trials` gives of each trial."""

    trial_id: str
    status: str  # TERMINATED, ERROR, PENDING (also a trial that was running: Tune restores it as pending), PAUSED
    config: dict[str, Any]
    last_result: dict[str, Any]  # {} before its first result
    path: Path  # its folder, under the experiment folder that was read
    error_file: Optional[Path]  # its error's traceback (`error.txt`), once it errored


def newest_state_file(folder: Path) -> Optional[Path]:
    """The state file Tune restores from: the greatest name (`_find_newest_experiment_checkpoint`)."""
    found = sorted(folder.glob(TUNE_STATE_PATTERN))
    return found[-1] if found else None


def read_saved_trials(folder: Path) -> list[SavedTrial]:
    """Every trial of the Tune experiment in `folder` (a local folder), from its newest state file, in
    Tune's order, without Ray. Reads of each entry: the trial's `trial_id`, `status`, `config` and
    `relative_logdir` (its folder's name), and its run metadata's `last_result` and `error_filename`.
    TuneStateError (naming the file) when there is none or it is not what Ray 2.60 writes."""
    path = newest_state_file(folder)
    if path is None:
        raise TuneStateError(folder, f"no {TUNE_STATE_PATTERN}")
    try:
        entries = json.loads(path.read_bytes())["trial_data"]
        return [_saved_trial(folder, *map(json.loads, entry)) for entry in entries]
    except OSError as error:
        problem = error.strerror or str(error)
    except ValueError as error:  # not JSON, or an entry that is not two JSON strings
        problem = f"not JSON: {error}"
    except (KeyError, TypeError, AttributeError) as error:
        problem = f"not Tune's format as of Ray {WRITTEN_FOR}: {error.__class__.__name__} {error}"
    raise TuneStateError(path, problem)


def _saved_trial(folder: Path, trial: dict[str, Any], metadata: dict[str, Any]) -> SavedTrial:
    error = metadata.get("error_filename")
    where = folder / trial["relative_logdir"]
    return SavedTrial(
        trial_id=str(trial["trial_id"]),
        status=PENDING if trial["status"] == RUNNING else str(trial["status"]),  # as `Trial.__setstate__`
        config=dict(trial["config"]),
        last_result=dict(metadata.get("last_result") or {}),
        path=where,
        error_file=where / error if error else None,
    )


# ---------------------------------------------------------------- a trial's storage, inside the trial
def local_trial_folder() -> Optional[Path]:
    """Inside a Tune trial: its folder in storage when the storage is a local (or shared) file system, the
    same for every attempt on any worker; None on a URI storage. Reads `TuneContext.get_storage()` (a
    DeveloperAPI returning Ray Train's internal `StorageContext`), its `storage_filesystem` and
    `trial_fs_path`."""
    import pyarrow.fs
    from ray import tune

    storage = tune.get_context().get_storage()
    if isinstance(storage.storage_filesystem, pyarrow.fs.LocalFileSystem):
        return Path(storage.trial_fs_path)
    return None


# ---------------------------------------------------------------- ASHA's rungs
def asha_rung_epochs(grace_period: int, reduction_factor: float, max_t: int) -> tuple[int, ...]:
    """The epochs at which Ray's ASHA (one bracket) may stop a trial, below max_t: the milestones of Ray's
    private `async_hyperband._Bracket` (grace_period * reduction_factor**k, as many as
    int(log(max_t / grace_period) / log(reduction_factor) + 1) with numpy's logs), each decided by the first
    result at or past it, so at the milestone rounded up. Ray has no public way to ask for them."""
    count = int(np.log(max_t / grace_period) / np.log(reduction_factor) + 1)
    milestones = (grace_period * reduction_factor ** k for k in range(count))
    return tuple(sorted({math.ceil(m) for m in milestones if math.ceil(m) < max_t}))


def asha_bracket(grace_period: int, max_t: int, reduction_factor: float) -> Any:
    """Ray's own ASHA bracket (`_Bracket(grace_period, max_t, reduction_factor, s=0)`), for tests that replay
    results through it: `.on_result(trial, epoch, score)` answers "CONTINUE" or "STOP"."""
    from ray.tune.schedulers.async_hyperband import _Bracket

    return _Bracket(grace_period, max_t, reduction_factor, 0)


def bracket_recorded(bracket: Any) -> int:
    """How many results an `asha_bracket` has recorded on its rungs (its private `_rungs`)."""
    return sum(len(recorded) for _, recorded in bracket._rungs)


# ---------------------------------------------------------------- trials made outside a run (tests)
def stub_trial(trial_id: str, config: dict[str, Any], status: str, last_result: dict[str, Any]) -> Any:
    """A Tune `Trial` as a restored run holds it (a stub: no trainable), with its last result set through
    the trial's private `run_metadata` (Tune sets it from results; no public setter exists)."""
    from ray.tune.experiment import Trial

    made = Trial("train_trial", config=config, trial_id=trial_id, stub=True)
    made.set_status(status)
    made.run_metadata.last_result = last_result
    return made


# ---------------------------------------------------------------- the driver's console and stop
CHECKPOINT_LOGGER = "ray.train._internal.checkpoint_manager"  # Ray's internal logger of checkpoint bookkeeping


class MissingScoreFilter(logging.Filter):
    """Drops the error Ray's checkpoint manager logs for a checkpoint whose result lacks the score attribute
    ("Result dict has no key: <metric>. ..."); Ray then keeps the latest checkpoint."""

    def __init__(self, metric: str):
        super().__init__()
        self.message = f"Result dict has no key: {metric}."

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.message)


def drop_missing_score_errors(metric: str) -> None:
    """Silence that one error for `metric` (a final run reports no validation metric: its test metrics come
    once, at its last epoch, and its latest checkpoint, the final model, is the one wanted). Once per metric."""
    logger = logging.getLogger(CHECKPOINT_LOGGER)
    if not any(isinstance(f, MissingScoreFilter) and f.message == MissingScoreFilter(metric).message
               for f in logger.filters):
        logger.addFilter(MissingScoreFilter(metric))


OLD_OUTPUT_VARIABLE = "RAY_AIR_NEW_OUTPUT"  # "0": Tune's old progress reporter (`experimental.output`)


def use_old_console_output() -> None:
    """Tune's old progress reporter, which honours verbose=0 fully (the new one still prints its boxes);
    unless the user set the variable. Read by `ray.tune.experimental.output.get_air_verbosity`."""
    os.environ.setdefault(OLD_OUTPUT_VARIABLE, "0")


def stop_tune_run() -> bool:
    """End the running `Tuner.fit` at its next step, saved, as a SIGUSR1 to the driver does: calls the SIGUSR1
    handler Tune installs for the length of a run (`tune._setup_signal_catching`; only its SIGINT handling is
    documented). False when no handler is installed (not inside a run)."""
    handler = signal.getsignal(signal.SIGUSR1)
    if not callable(handler):
        return False
    handler(signal.SIGUSR1, None)
    return True
