"""Where a selected study's tested model lies in the experiment folder, found from the files alone and
without torch: its checkpoint, its test database and the retrieval picture its run drew when it ended.

The model is the first final seed's last checkpoint (protocol `val`), or under protocol `seed` the selected
trial's checkpoint of its selected epoch. The run that trained it drew the retrieval picture into that
checkpoint (`loop.save_picture`), so that `report` only copies a file; `retrieve` embeds on demand.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from tune_upl.errors import ExperimentError
from tune_upl.layout import (
    CHECKPOINT_COLUMN, CHECKPOINT_FILE, CHECKPOINT_PREFIX, FINAL_RUN_SUFFIX, PARAMS_FILE, RESULT_FILE, RUN_FOLDER,
    SPEC_FILE, STUDY_KEY, trial_fields,
)
from tune_upl.results import load_selections, read_params, read_results

RETRIEVAL_PICTURE = "retrieval.png"  # in a checkpoint: fixed test queries and their nearest test images
RETRIEVAL_QUERIES_FILE = "retrieval.json"  # beside it: the queries' image paths
RETRIEVAL_QUERIES, RETRIEVAL_NUM = 3, 8  # the picture's rows (queries) and the images retrieved for each


def selections(experiment: Path) -> list[dict[str, Any]]:
    """Every selected study's selection.json; an unknown experiment is named with those there are."""
    if not (experiment / SPEC_FILE).is_file():
        known = sorted(p.parent.name for p in experiment.parent.glob(f"*/{SPEC_FILE}"))
        raise FileNotFoundError(f"no experiment {experiment.name!r} in {experiment.parent}; "
                                f"allowed: {', '.join(known) or 'none yet'}")
    return load_selections(experiment)


def pick_selection(experiment: Path, study: Optional[str] = None) -> dict[str, Any]:
    """The selection of `study`, or the first one."""
    found = selections(experiment)
    if not found:
        raise ExperimentError(f"experiment {experiment.name} has no selected model yet (no study has finished)")
    if study is None:
        return found[0]
    match = [s for s in found if s["key"] == study]
    if not match:
        raise ExperimentError(f"--study {study}: no such selected study in {experiment.name}; "
                              f"allowed: {', '.join(s['key'] for s in found)}")
    return match[0]


def final_checkpoint(experiment: Path, selection: dict[str, Any],
                     holding: str) -> Optional[tuple[Path, dict[str, Any], str]]:
    """The first final seed's last checkpoint that holds the file `holding`: (checkpoint folder, the run's
    config, where it came from in words), or None."""
    runs = []
    for trial in (experiment / RUN_FOLDER).glob(f"*{FINAL_RUN_SUFFIX}/{PARAMS_FILE}"):  # every study's final runs
        checkpoints = sorted(trial.parent.glob(f"{CHECKPOINT_PREFIX}*/{holding}"))
        named = read_params(trial) if checkpoints else {}
        config = trial_fields(named)  # the model's config, without the study the searcher named
        if (checkpoints and named.get(STUDY_KEY, selection["key"]) == selection["key"]
                and all(config.get(k) == v for k, v in selection["config"].items() if k not in ("seed", "final"))):
            runs.append((int(config["seed"]), checkpoints[-1].parent, config,
                         trial.parent.name.removesuffix(FINAL_RUN_SUFFIX)))
    if not runs:
        return None
    seed, folder, config, trial_id = min(runs, key=lambda r: r[0])
    return folder, config, f"final run with seed {seed} (trial {trial_id}) of study {selection['key']}"


def selected_checkpoint(experiment: Path, selection: dict[str, Any]) -> Path:
    """The selected trial's checkpoint of the selected epoch (protocol seed)."""
    trial_id, epoch = selection["trial_id"], selection["epoch"]
    for params in (experiment / RUN_FOLDER).glob(f"{trial_id}/{PARAMS_FILE}"):
        frame = read_results(params.parent / RESULT_FILE)
        if CHECKPOINT_COLUMN not in frame:
            continue
        for name in frame.loc[frame["training_iteration"] == epoch, CHECKPOINT_COLUMN].dropna():
            folder = params.parent / name
            if (folder / CHECKPOINT_FILE).is_file():
                return folder
    raise ExperimentError(f"the checkpoint of trial {trial_id} at epoch {epoch} is gone (checkpoints_to_keep "
                          "keeps the best by the objective; was the objective changed?)")


def selected_source(selection: dict[str, Any]) -> str:
    """The test-selected model in words (protocol seed)."""
    return (f"trial {selection['trial_id']} at its test-selected epoch {selection['epoch']} "
            f"of study {selection['key']}")


@dataclass(frozen=True)
class SavedPicture:
    """A retrieval picture its run drew: the PNG, the model in words, and the queries' image paths."""

    path: Path
    source: str
    queries: list[str]


def saved_picture(experiment: Path, study: str) -> SavedPicture:
    """The retrieval picture of `study`'s tested model; an `ExperimentError` says why there is none."""
    selection = pick_selection(experiment, study)
    found = final_checkpoint(experiment, selection, RETRIEVAL_PICTURE)
    if found is not None:
        folder, _, source = found
    elif selection.get("test_selected"):
        folder, source = selected_checkpoint(experiment, selection), selected_source(selection)
        if not (folder / RETRIEVAL_PICTURE).is_file():
            raise ExperimentError(f"the {source} drew no retrieval picture")
    else:
        raise ExperimentError(f"no final run of study {study} has drawn a retrieval picture (not run yet, or "
                              "run before runs drew one)")
    queries_file = folder / RETRIEVAL_QUERIES_FILE
    queries = json.loads(queries_file.read_text())["queries"] if queries_file.is_file() else []
    return SavedPicture(folder / RETRIEVAL_PICTURE, source, queries)


def tail(path: str, parts: int = 3) -> str:
    """The last folders and name of a path: enough for `retrieve` to find it, without anyone's home folder."""
    return "/".join(Path(path).parts[-parts:])
