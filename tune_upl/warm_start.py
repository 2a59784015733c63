"""Warm starts: each new study runs first, right after its baseline, the best completed trials of a finished
experiment's study of the same loss and backbone (the spec's `warm_start: {experiment, k}`), so a CARS196
search starts from what a CUB-200-2011 search of the same loss and backbone learnt instead of cold.

The driver resolves the points once, before Ray starts (`resolve`), and records them in the experiment's
`warm_start.json` (`record`): a resume runs with the points the experiment started with, even if the source
has changed or gone since. The searcher gets them as plain data (`searcher_points`) and queues them in each
study's Optuna study once, as it does the baseline; the report reads the file to name each study's source and
the values it dropped.

Read offline from the source folder (`results.load_experiment`): no Ray, no torch.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from tune_upl.atomic import write_json
from tune_upl.errors import ExperimentError, SpecError
from tune_upl.layout import COMPLETED, COMPLETE_FILE, WARM_START_FILE
from tune_upl.spec import Param, SearchSpec

if TYPE_CHECKING:
    import pandas as pd

    from tune_upl.planning import Study

MATCHED = ("loss_name", "backbone_type")  # what a source study must share with a new one
PREFERRED = "data_name"  # among matching source studies, one on the same dataset first


@dataclass(frozen=True)
class StudyStart:
    """One new study's warm start: where its points come from and what was left out of each."""

    source: str  # "<source experiment>/<source study>": the marker on each warm-start trial's config
    metric: str  # what the source trials were ranked by (the new spec's objective)
    trials: list[str]  # the source trial of each point, best first
    objectives: list[float]  # each source trial's best epoch on `metric`
    points: list[dict[str, Any]]  # what is queued: the searched fields' values inside this study's space
    dropped: list[dict[str, Any]] = field(default_factory=list)  # per point: values outside the space (sampled)


def source_folder(experiment: str, view: Callable[[str], Path]) -> Path:
    """The source experiment's folder: an absolute path as given, or a name through `view` (the storage's
    folder, or for a URI the pulled copy the report reads: `experiment.readable`)."""
    return Path(experiment) if experiment.startswith("/") else view(experiment)


def resolve(spec: SearchSpec, studies: list[Study], view: Callable[[str], Path], own: Path,
            resumed: bool = False) -> dict[str, StudyStart]:
    """Each study's warm start, before Ray starts; {} without `warm_start`. A resumed experiment keeps the ones
    it recorded at start (`own`/warm_start.json). One `SpecError` (exit 2) naming the key when the source is
    missing, unfinished, the experiment itself, or without a study of a new study's loss and backbone."""
    if spec.warm_start is None:
        return {}
    if resumed and (own / WARM_START_FILE).is_file():
        return load(own)
    given = spec.warm_start.experiment
    folder = source_folder(given, view)
    where = f"warm_start.experiment = {given!r}"
    if folder.resolve() == own.resolve() or given == spec.name:
        raise SpecError(f"{where}: that is this experiment; allowed: another, finished experiment")
    from tune_upl.results import load_experiment  # pandas: loaded only when a warm start is asked for

    try:
        source = load_experiment(folder)
    except FileNotFoundError:
        raise SpecError(f"{where}: no experiment at {folder}; allowed: a finished experiment's name in the same "
                        "storage, or an absolute path to its folder") from None
    except ExperimentError as error:
        raise SpecError(f"{where}: {error}") from None
    if not source.complete:
        raise SpecError(f"{where}: experiment {source.name} at {folder} is not finished (no {COMPLETE_FILE}); "
                        "finish it with --resume first, or warm-start from a finished one")
    return {study.key: pick(source.name, source.trials, source.epochs, study, spec.objective.metric,
                            spec.objective.mode, spec.warm_start.k, folder) for study in studies}


def pick(name: str, trials: pd.DataFrame, epochs: pd.DataFrame, study: Study, metric: str, mode: str, k: int,
         folder: Optional[Path] = None) -> StudyStart:
    """Study `study`'s warm start from a finished experiment's search trials (`results.trial_rows` and its
    epochs): the source study of the same loss and backbone (one on the same dataset first, else the first by
    key), its `k` best completed trials by their best epoch on `metric`, and their values for the fields
    `study` searches; a trial whose values repeat a better one's is passed over (running a point twice
    teaches the sampler nothing)."""
    where = f"warm_start.experiment = {name!r}"
    want = ", ".join(f"{n} {_wanted(study, n)}" for n in MATCHED)
    rows = [] if trials.empty else [r for r in trials.to_dict("records") if all(_fits(study, n, r["_config"].get(n))
                                                                                 for n in MATCHED)]
    if not rows:
        raise SpecError(f"{where}: no study of experiment {name}{f' ({folder})' if folder else ''} has {want}, as "
                        f"study {study.key} has; "
                        "allowed: an experiment with a study of the same loss_name and backbone_type")
    same = sorted({r["study"] for r in rows if _fits(study, PREFERRED, r["_config"].get(PREFERRED))})
    chosen = same[0] if same else sorted({r["study"] for r in rows})[0]
    ranked = []
    for row in rows:
        if row["study"] != chosen or row["state"] != COMPLETED:
            continue
        best = _best(epochs, row["trial"], metric, mode)
        if best is not None:
            ranked.append((-best if mode == "max" else best, row["_order"], row, best))
    if not ranked:
        raise SpecError(f"{where}: study {chosen} of experiment {name} has no completed trial that reported "
                        f"{metric}, so none can start study {study.key}; allowed: an experiment whose study of "
                        f"{want} has completed trials")
    ranked.sort(key=lambda item: item[:2])
    start = StudyStart(f"{name}/{chosen}", metric, [], [], [], [])
    for _, _, row, best in ranked:
        if len(start.points) == k:
            break
        point, dropped = searched_values(study, row["_config"])
        if point in start.points:  # a sampler may repeat a configuration: running it twice teaches nothing
            continue
        start.trials.append(str(row["trial"]))
        start.objectives.append(float(best))
        start.points.append(point)
        start.dropped.append(dropped)
    return start


def searched_values(study: Study, config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A source trial's values for the fields `study` searches (in the space's order: a `when` sees what came
    before): those inside the space, and those outside it (dropped: the sampler picks them). A field the trial
    lacks, or whose `when` fails here, is neither."""
    point: dict[str, Any] = {}
    dropped: dict[str, Any] = {}
    for name, param in study.space.items():
        if name not in config or param.holds({**study.base, **point}) is False:
            continue
        (point if param.contains(config[name]) else dropped)[name] = config[name]
    return point, dropped


def _fits(study: Study, name: str, value: Any) -> bool:
    """Whether `value` is the study's fixed value of `name`, or one its space holds."""
    param: Optional[Param] = study.space.get(name)
    return param.contains(value) if param is not None else study.base.get(name) == value


def _wanted(study: Study, name: str) -> str:
    param = study.space.get(name)
    return f"in {param.values_to_check()}" if param is not None else str(study.base.get(name))


def _best(epochs: pd.DataFrame, trial: str, metric: str, mode: str) -> Optional[float]:
    """The trial's best epoch on `metric`, or None when it reported none."""
    if epochs.empty or metric not in epochs:
        return None
    scores = [v for v in epochs.loc[epochs["trial"] == trial, metric] if v is not None and not math.isnan(v)]
    return (max(scores) if mode == "max" else min(scores)) if scores else None


def record(experiment: Path, starts: dict[str, StudyStart]) -> bool:
    """Write `warm_start.json` once (a resumed experiment keeps its own); whether it was written now."""
    path = experiment / WARM_START_FILE
    if not starts or path.is_file():
        return False
    write_json(path, {key: dataclasses.asdict(start) for key, start in starts.items()})
    return True


def load(experiment: Path) -> dict[str, StudyStart]:
    """The experiment's recorded warm starts ({} without a file, or for a damaged one: named in one line)."""
    path = experiment / WARM_START_FILE
    if not path.is_file():
        return {}
    try:
        return {key: StudyStart(**value) for key, value in json.loads(path.read_text()).items()}
    except (ValueError, TypeError, AttributeError) as error:
        raise ExperimentError(f"{path}: damaged ({error}); restore it from a copy") from None


def searcher_points(starts: dict[str, StudyStart]) -> dict[str, tuple[str, list[dict[str, Any]]]]:
    """What the searcher queues: per study key, the marker its warm-start trials carry and their points."""
    return {key: (start.source, [dict(p) for p in start.points]) for key, start in starts.items()}
