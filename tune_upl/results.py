"""An experiment folder read offline, as tables: the report's one loader.

Built from Tune's files, never from the Optuna study (Optuna marks trials that Tune resumed as failed):
each trial's state from Tune's saved state (`ray_private.read_saved_trials`, a reader of Tune's own
format that loads no Ray) and its epochs from its `result.json`, read here row by row. Works on finished,
interrupted and running experiments: a study folder Tune has not saved yet is skipped, a result line still
being written is ignored, and a study without `selection.json` simply has no final result yet.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pandas as pd
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from tune_upl.layout import (
    COMPLETE_FILE,
    ERROR_KEY,
    PARAMS_FILE,
    PENDING,
    RECIPE_KEY,
    RECORD_FILE,
    RESULT_FILE,
    RUN_FOLDER,
    RUNNING,
    SELECTION_FILE,
    SPEC_FILE,
    STUDY_KEY,
    TUNE_STATE_PATTERN,
    UNFINISHED,
    UNSELECTABLE_FILE,
    error_line,
    older_layout,
    search_command,
    trial_state,
)
from tune_upl.errors import ExperimentError
from tune_upl.ray_private import SavedTrial, TuneStateError, read_saved_trials
from tune_upl.spec import Param, parse_spec

NUMERIC_KEYS = ("training_iteration", "time_this_iter_s", "time_total_s", "timestamp")  # of every result row
METRIC_PREFIXES = ("train_", "val_", "test_")  # metrics a row may carry: numbers (or null, NaN)


class SavedSpec(BaseModel):
    """`search_spec.json`: the spec, the command-line overrides and (since they were recorded) the paths."""

    model_config = ConfigDict(extra="forbid")
    spec: dict[str, Any]
    overrides: dict[str, Any]
    paths: dict[str, Any] = {}
    location: Optional[str] = None  # where the folder was made (Tune's state names it); None: recorded before


@dataclass(frozen=True)
class Selection:
    """The chosen trial of one study and why: what `selection.json` holds (written by
    `final.save_selection`, checked field by field when read)."""

    __pydantic_config__ = ConfigDict(extra="forbid")
    key: str  # the study's folder name
    group: dict[str, Any]  # the study's `studies` values
    trial_id: str
    epoch: int
    objective: dict[str, float]
    config: dict[str, Any]
    test_selected: dict[str, float]  # protocol seed only: test metrics of the test-selected epoch
    selected_at: float


class SavedRecord(BaseModel):
    """`record.json`: what the report reads of it (the rest is for people)."""

    model_config = ConfigDict(extra="allow")
    baselines: dict[str, dict[str, Any]] = {}


class SavedParams(BaseModel):
    """A trial's `params.json` (Tune's copy of its config): what the retrieval tool reads of it."""

    model_config = ConfigDict(extra="allow")
    seed: int


def read_params(path: Path) -> dict[str, Any]:
    """A final run's `params.json`; it is its model's config, so a damaged one can only be restored."""
    return read_saved(path, SavedParams, "restore it from a copy (it is the final run's training config)")


def read_saved(path: Path, model: type, fix: str) -> dict[str, Any]:
    """A driver file, parsed and checked against `model` (a pydantic model or a dataclass); a damaged one is
    one error naming the file, the problem and `fix` (the command that repairs or skips it), never a
    traceback from deep in a reader."""
    try:
        checked = TypeAdapter(model).validate_json(path.read_bytes())
        return checked.model_dump() if isinstance(checked, BaseModel) else dataclasses.asdict(checked)
    except ValidationError as error:
        first = error.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        problem = first["msg"] if first["type"].startswith("json") or not where else f"{where}: {first['msg']}"
    except OSError as error:
        problem = error.strerror or str(error)
    raise ExperimentError(f"{path}: damaged ({problem}); {fix}")


def _command(experiment: Path, *options: str) -> str:
    return search_command(*options, name=experiment.name, storage=str(experiment.parent))


def read_saved_spec(experiment: Path) -> dict[str, Any]:
    """The experiment's `search_spec.json`, its spec validated as a spec file is."""
    path = experiment / SPEC_FILE
    fix = (f"it cannot be rebuilt from the folder: restore it from a copy, or start again with "
           f"`{_command(experiment, 'search', '--space', 'SPEC')} --overwrite` (the old folder is kept)")
    saved = read_saved(path, SavedSpec, fix)
    parse_spec(saved["spec"], str(path))
    return saved


def read_record(experiment: Path) -> dict[str, Any]:
    """The experiment's `record.json`, or {} before it is written."""
    path = experiment / RECORD_FILE
    if not path.is_file():
        return {}
    return read_saved(path, SavedRecord, "delete it to report without it (hardware, baselines and class lists are "
                                         "then not shown); a --resume of an unfinished experiment writes it again")


def read_selection(path: Path) -> dict[str, Any]:
    """One study's `selection.json`."""
    experiment = path.parent.parent
    fix = (f"delete it (and {COMPLETE_FILE}, if there), then `{_command(experiment, 'search', '--resume')}` selects the "
           "study again from its trials")
    return read_saved(path, Selection, fix)


@dataclass
class FinalResult:
    """One study's selection and its test numbers: a run per final seed, or the test-selected epoch; under
    `recipe_runs`, its recipe's run per final seed too (each row: seed, epochs, planned_epochs, test_*)."""

    key: str
    selection: dict[str, Any]
    runs: list[dict[str, Any]]
    recipe_runs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def config(self) -> dict[str, Any]:
        return self.selection["config"]

    @property
    def test_selected(self) -> bool:
        return bool(self.selection.get("test_selected"))


@dataclass
class ExperimentData:
    """Everything the report shows, read once from the experiment folder."""

    folder: Path
    spec: dict[str, Any]
    overrides: dict[str, Any]
    record: dict[str, Any]
    complete: bool
    trials: pd.DataFrame  # one row per search trial (see `trial_rows`)
    epochs: pd.DataFrame  # one row per reported epoch of a search trial: study, trial and Tune's result
    final_trials: pd.DataFrame  # one row per final-stage run: study, trial, recipe, seed, state, hours, test_*
    finals: list[FinalResult] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)  # result files with rows that could not be read, and how many
    unselectable: dict[str, str] = field(default_factory=dict)  # study -> why nothing could be selected

    @property
    def name(self) -> str:
        return self.spec["name"]

    @property
    def metric(self) -> str:
        return self.spec["objective"]["metric"]

    @property
    def mode(self) -> str:
        return self.spec["objective"]["mode"]

    @property
    def searched(self) -> list[str]:
        """The searched fields (a command-line override fixes a field and takes it out of the space)."""
        return [name for name in self.spec["space"] if name not in self.overrides]

    @property
    def studies(self) -> list[str]:
        keys = list(self.trials.sort_values("_order")["study"].unique()) if not self.trials.empty else []
        return keys + [f.key for f in self.finals if f.key not in keys]


def tune_folders(experiment: Path) -> list[Path]:
    """The experiment's Tune experiment, `trials/` (every study's trials and final runs), once Tune saved it."""
    folder = experiment / RUN_FOLDER
    return [folder] if any(folder.glob(TUNE_STATE_PATTERN)) else []


def older_layout_line(experiment: Path, trials: bool = True) -> Optional[str]:
    """`layout.older_layout`'s line for a local experiment folder written in an older layout, or None: from
    its Tune runs, and with `trials` from each trial's `params.json` too (a reader that parses Tune's state
    finds an unnamed trial there: `_study_of`)."""
    folders = [p.parent.name for p in experiment.glob(f"*/{TUNE_STATE_PATTERN}")]
    unnamed = next((p.parent.name for p in sorted((experiment / RUN_FOLDER).glob(f"*/{PARAMS_FILE}"))
                    if not _names_study(p)), None) if trials else None
    return older_layout(experiment.name, folders, unnamed)


def _names_study(params: Path) -> bool:
    """Whether a trial's `params.json` names its study (a damaged one is Tune's to restore: not judged here)."""
    try:
        return STUDY_KEY in json.loads(params.read_text(errors="replace"))
    except ValueError:
        return True


Trials = dict[Path, list[tuple[SavedTrial, pd.DataFrame, float]]]  # Tune folder -> its trials (`_trials_of`)


def read_trials(experiment: Path, damaged: list[str]) -> Trials:
    """Each Tune experiment's trials, read once for both the search table and the final runs; each result
    file with unreadable rows is added to `damaged`."""
    return {folder: _trials_of(folder, damaged) for folder in tune_folders(experiment)}


def _study_of(folder: Path, trial: SavedTrial) -> str:
    """The study the trial's config names; a trial that names none is of an older layout (one line)."""
    if STUDY_KEY not in trial.config:
        raise ExperimentError(older_layout(folder.parent.name, [], unnamed=trial.trial_id))
    return str(trial.config[STUDY_KEY])


def _is_final(trial: SavedTrial) -> bool:
    return bool(trial.config.get("final"))


def load_selections(experiment: Path) -> list[dict[str, Any]]:
    """Every study's selection record in an experiment folder (studies not yet selected have none)."""
    return [read_selection(p) for p in sorted(experiment.glob(f"*/{SELECTION_FILE}"))]


def _is_number(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _result_row(line: str) -> Optional[dict[str, Any]]:
    """One line of `result.json` as a row, or None when it cannot be one (cut, garbled, a metric not a number)."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    if not isinstance(row, dict) or not isinstance(row.get("training_iteration"), int):
        return None
    numeric = [v for k, v in row.items() if k in NUMERIC_KEYS or k.startswith(METRIC_PREFIXES)]
    return row if all(map(_is_number, numeric)) else None


def read_result_rows(path: Path) -> tuple[pd.DataFrame, int]:
    """Tune's `result.json` (one JSON object per line): every row that can be read, and how many could not
    (a line still being written, or a damaged file: the report names it instead of showing fewer epochs)."""
    text = path.read_bytes().decode("utf-8", errors="replace") if path.is_file() else ""
    lines = [line for line in text.splitlines() if line.strip()]
    rows = [row for row in map(_result_row, lines) if row is not None]
    return (pd.json_normalize(rows, sep="/") if rows else pd.DataFrame()), len(lines) - len(rows)


def read_results(path: Path) -> pd.DataFrame:
    """The rows of Tune's `result.json` that can be read (see `read_result_rows`)."""
    return read_result_rows(path)[0]


def _clean(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if not (isinstance(v, float) and math.isnan(v))}


def last_per_epoch(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per epoch, in order: the last one reported. A trial restored from a checkpoint older than its
    last result (a retry, a resume) runs and reports the epochs since that checkpoint again."""
    if "training_iteration" not in frame:
        return frame
    frame = frame.drop_duplicates("training_iteration", keep="last")
    return frame.sort_values("training_iteration", kind="stable").reset_index(drop=True)


def paid_hours(frame: pd.DataFrame) -> float:
    """Hours a trial ran: every reported epoch's own time, the repeated ones too (they were paid for). Not
    the last `time_total_s`: Tune rewinds it to the checkpoint's when it restores a trial."""
    return float(frame["time_this_iter_s"].sum()) / 3600 if "time_this_iter_s" in frame else 0.0


def _trials_of(folder: Path, damaged: list[str]) -> list[tuple[SavedTrial, pd.DataFrame, float]]:
    """Each trial Tune knows in this experiment folder, with its results (the last row per epoch) and hours.
    Results are read here, row by row (Ray's reader drops a whole file for one bad line); each file with
    unreadable rows is added to `damaged`."""
    try:
        saved = read_saved_trials(folder)
    except TuneStateError as error:
        raise ExperimentError(f"{error.path}: Tune's saved state cannot be read ({error.problem}); restore {folder} "
                              "from a copy") from None
    found = []
    for trial in saved:
        path = trial.path / RESULT_FILE
        frame, bad = read_result_rows(path)
        if bad:
            damaged.append(f"{path}: {bad} unreadable row{'' if bad == 1 else 's'} skipped")
        found.append((trial, last_per_epoch(frame), paid_hours(frame)))
    return found


def _last_result(trial: SavedTrial, frame: pd.DataFrame) -> dict[str, Any]:
    return dict(trial.last_result or {}) or (_clean(frame.iloc[-1].to_dict()) if not frame.empty else {})


def _state(trial: SavedTrial, frame: pd.DataFrame, epochs: int) -> str:
    state = trial_state(trial.status, _last_result(trial, frame), trial.config.get("num_epochs"))
    # Tune saves a running trial as pending, so its folder cannot tell running from interrupted
    return UNFINISHED if state in (PENDING, RUNNING) and epochs else state


def _device(frame: pd.DataFrame) -> Optional[str]:
    """The device the trial trained on ("cuda", "cuda:0", "cpu"), or None where it never said (an older
    experiment, or a trial that failed before training)."""
    known = frame["device"].dropna() if "device" in frame else ()
    return str(known.iloc[-1]) if len(known) else None


def _start_end(frame: pd.DataFrame) -> tuple[float, float]:
    """When the trial started (its first result's time less that epoch's duration) and last reported."""
    if frame.empty or "timestamp" not in frame:
        return math.nan, math.nan
    first = frame.iloc[0]
    return float(first["timestamp"] - first.get("time_this_iter_s", 0.0)), float(frame["timestamp"].max())


def trial_rows(read: Trials, spec: dict[str, Any], searched: list[str],
               baselines: dict[str, dict[str, Any]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Search trials, best first: study, baseline, trial, state, epochs, objective (best over its epochs),
    best_epoch, hours, trained_on (the device it reported), start, end, note, one column per searched field,
    _config, _order (creation order); and every reported epoch (study, trial and Tune's result columns)."""
    metric, mode = spec["objective"]["metric"], spec["objective"]["mode"]
    space = {name: Param.model_validate(spec["space"][name]) for name in searched}  # parsed once, not per trial
    rows, epochs = [], []
    order = 0
    for folder, found in read.items():
        for trial, frame, hours in found:
            config = trial.config
            if _is_final(trial):
                continue
            key = _study_of(folder, trial)
            scores = frame[metric].dropna() if metric in frame else pd.Series(dtype=float)
            best = (scores.idxmax() if mode == "max" else scores.idxmin()) if len(scores) else None
            baseline = baselines.get(key)
            start, end = _start_end(frame)
            epochs_run = int(frame["training_iteration"].max()) if "training_iteration" in frame else 0
            rows.append({
                "study": key,
                "baseline": "yes" if baseline and all(config.get(k) == v for k, v in baseline.items()) else "",
                "trial": trial.trial_id,
                "state": _state(trial, frame, epochs_run),
                "epochs": epochs_run,
                "objective": float(scores[best]) if best is not None else math.nan,
                "best_epoch": int(frame.loc[best, "training_iteration"]) if best is not None else 0,
                "hours": hours,
                "trained_on": _device(frame),  # not `device`: a searched field may have that name
                "start": start,
                "end": end,
                "note": _trial_note(trial),
                # a searched field whose `when` fails for this trial does not exist for it
                **{n: config.get(n) if space[n].holds(config) is True else None for n in searched},
                "_config": config,
                "_order": order,
            })
            order += 1
            if not frame.empty:
                epochs.append(frame.assign(study=key, trial=trial.trial_id))
    table = pd.DataFrame(rows)
    if not table.empty:
        table = table.sort_values("objective", ascending=(mode == "min"), na_position="last", kind="stable")
        table = table.reset_index(drop=True)
    return table, (pd.concat(epochs, ignore_index=True) if epochs else pd.DataFrame())


def _trial_note(trial: SavedTrial) -> str:
    """Why a trial ended early: its error's last line, or the diverged / out-of-memory message."""
    error = error_line(trial.error_file) or trial.last_result.get(ERROR_KEY)
    return str(error).replace("|", "/")[:160] if error else ""


def final_rows(read: Trials, spec: dict[str, Any]) -> pd.DataFrame:
    """Every final-stage run: study, trial, recipe (a recipe run), seed, state, epochs, planned_epochs, hours,
    trained_on, start, end, test metrics."""
    rows = []
    for folder, found in read.items():
        for trial, frame, hours in found:
            if not _is_final(trial):
                continue
            last = _clean(frame.iloc[-1].to_dict()) if not frame.empty else {}
            start, end = _start_end(frame)
            rows.append({
                "study": _study_of(folder, trial),
                "trial": trial.trial_id,
                "recipe": bool(trial.config.get(RECIPE_KEY)),
                "seed": trial.config.get("seed"),
                "state": _state(trial, frame, int(last.get("training_iteration", 0))),
                "epochs": int(last.get("training_iteration", 0)),
                "planned_epochs": trial.config.get("num_epochs"),
                "hours": hours,
                "trained_on": _device(frame),  # not `device`: a searched field may have that name
                "start": start,
                "end": end,
                **{k: v for k, v in last.items() if k.startswith("test_")},
            })
    return pd.DataFrame(rows)


def _tested_runs(runs: pd.DataFrame) -> list[dict[str, Any]]:
    """The runs tested after their last epoch (their rows carry test metrics), by seed."""
    records = runs.sort_values("seed").to_dict("records") if len(runs) else []
    return [r for r in map(_clean, records) if any(k.startswith("test_") for k in r)]


def load_experiment(experiment: Path) -> ExperimentData:
    """Read an experiment folder (finished, interrupted or running); FileNotFoundError when there is none."""
    if not (experiment / SPEC_FILE).is_file():
        raise FileNotFoundError(f"no experiment at {experiment} (missing {SPEC_FILE}); check --name and --storage")
    older = older_layout_line(experiment, trials=False)
    if older:
        raise ExperimentError(older)
    saved = read_saved_spec(experiment)
    spec, overrides = saved["spec"], saved["overrides"]
    record = read_record(experiment)
    searched = [n for n in spec["space"] if n not in overrides]
    damaged: list[str] = []
    read = read_trials(experiment, damaged)
    trials, epochs = trial_rows(read, spec, searched, record.get("baselines", {}))
    selections = load_selections(experiment)
    final_trials = final_rows(read, spec)
    finals = []
    for selection in selections:
        if selection.get("test_selected"):
            finals.append(FinalResult(selection["key"], selection, [dict(selection["test_selected"])]))
            continue
        mine = final_trials[final_trials["study"] == selection["key"]] if not final_trials.empty else final_trials
        recipe = mine["recipe"] if len(mine) else pd.Series(dtype=bool)
        finals.append(FinalResult(selection["key"], selection, _tested_runs(mine[~recipe] if len(mine) else mine),
                                  _tested_runs(mine[recipe] if len(mine) else mine)))
    unselectable = {p.parent.name: json.loads(p.read_text()).get("reason", "") for p in
                    sorted(experiment.glob(f"*/{UNSELECTABLE_FILE}"))}
    return ExperimentData(experiment, spec, overrides, record, (experiment / COMPLETE_FILE).is_file(),
                          trials, epochs, final_trials, finals, damaged, unselectable)

