"""An experiment folder's life: start, refuse or resume; one driver at a time; a record of what ran; and
the order of work (search each study, select on the objective, final stage, mark complete).

Layout under `<storage>/<name>/` (the names are `tune_upl.layout`'s): `search_spec.json` (the spec, the
command-line overrides and the driver's paths: a resume reads it and plans the same studies), `record.json` (code version, packages,
hardware, class lists), one Tune experiment per study (`<study>/`, or `grid/`), each with
`selection.json` beside it, one Tune experiment per final stage (`<study>.final/`), and `COMPLETE` once
everything has run. With `--storage` a URI (s3://, gs://), Tune's folders are written there and the
driver's files to a local mirror, each pushed to the URI when written (`tune_upl.storage`).
"""
from __future__ import annotations

import contextlib
import platform
import shutil
import sqlite3
import subprocess
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

from filelock import FileLock, Timeout

from tune_upl.atomic import write_json
from tune_upl.config import Paths
from tune_upl.final import Selection, load_selection, save_selection, select
from tune_upl.layout import (
    COMPLETE_FILE,
    FINAL_SUFFIX,
    GRID_STUDY,
    OPTUNA_FILE,
    RECORD_FILE,
    SELECTION_FILE,
    SPEC_FILE,
    driver_file,
    driver_lock_name,
    study_key,
)
from tune_upl.results import read_saved_spec
from tune_upl.planning import (
    Study, baseline_point, grid_points, plan_studies, prepare_data, prepare_weights, serial_loading,
)
from tune_upl.search import check_resources, init_ray, logger_callbacks, restore_sigterm, run_final, run_study
from tune_upl.spec import SearchSpec, parse_spec
from tune_upl.storage import Remote, prune_checkpoints
from tune_upl.errors import ExperimentError, StorageError

PACKAGES = ("torch", "torchvision", "ray", "optuna", "numpy", "pydantic", "adamp", "pillow")



@dataclass(frozen=True)
class Options:
    """How to run: where, how loud, and what to do with an existing experiment or a small cluster."""

    storage: Path  # the local root: the experiments themselves, or (with `remote`) the driver's mirror of them
    remote: Optional[Remote] = None  # the URI (s3://bucket/runs, gs://...) where Tune writes the experiments
    verbose: bool = False
    address: Optional[str] = None
    resume: bool = False
    overwrite: bool = False
    autoscaling: bool = False  # the cluster grows on demand: skip the largest-node check
    allow_cpu: bool = False  # a spec that asks for GPUs runs on CPUs when the cluster has none
    loggers: tuple[str, ...] = ()  # mlflow, wandb: Ray Tune's logger callbacks
    callbacks: tuple[Any, ...] = ()  # more Ray Tune callbacks, for programs that embed the search


def load_saved_spec(experiment: Path) -> tuple[SearchSpec, dict[str, Any], Paths]:
    """What the experiment was started with. A record without `paths` is older: its overrides hold the
    absolute data_path and cache_dir themselves, so it plans as it did."""
    saved = read_saved_spec(experiment)
    spec = parse_spec(saved["spec"], str(experiment / SPEC_FILE))
    return spec, saved["overrides"], Paths(**saved.get("paths", {}))


def describe(spec: SearchSpec, studies: list[Study]) -> str:
    """What a search would run (`--dry-run`): studies, trials, epochs, resources."""
    lines = [f"experiment {spec.name}: {spec.searcher.type} + {spec.scheduler.type}, objective "
             f"{spec.objective.metric} ({spec.objective.mode}), protocol {spec.protocol}, "
             f"{spec.max_concurrent} trials at once, each {spec.resources.cpu:g} CPU + {spec.resources.gpu:g} GPU"]
    if spec.searcher.type == "grid":
        grid = Study(GRID_STUDY, {}, studies[0].base, studies[0].space)
        lines.append(f"  grid: {len(grid_points(spec, grid)) * spec.num_samples} trials")
    for study in studies:
        epochs = study.base.get("num_epochs", "searched")
        trials = "" if spec.searcher.type == "grid" else f"{spec.num_samples} trials, "
        lines.append(f"  study {study.key}: {trials}up to {epochs} epochs each, "
                     f"{study.base.get('data_name')}/{study.base.get('backbone_type')}/{study.base.get('loss_name')}, "
                     f"data {study.base.get('data_path')}, cache {study.base.get('cache_dir')}, "
                     f"searching {', '.join(study.space) or 'nothing'}")
    if spec.protocol == "val":
        lines.append(f"  final stage: {spec.final_seeds} seeds per study, on train + validation classes, tested once")
    return "\n".join(lines)


def _publish(options: Options, experiment: Path, *relative: str) -> None:
    """Push driver files of the local folder to the remote storage (nothing to do for a local one)."""
    if options.remote:
        for name in relative:
            if (experiment / name).is_file():
                options.remote.push(experiment, name)


def experiment_status(spec: SearchSpec, options: Options) -> bool:
    """Whether the experiment is complete already (and not to be overwritten); refuses an unfinished one
    without --resume or --overwrite. Reads only: a start refused later leaves the storage as it was."""
    experiment = options.storage / spec.name
    exists = experiment.exists() and any(experiment.iterdir())
    if exists and options.overwrite and options.remote:
        raise ExperimentError(
            f"--overwrite: experiment {spec.name} is in {options.remote.uri}, where moving a folder aside means "
            "copying every object; choose another --name, or delete it with your storage's own tools"
        )
    if not exists or options.overwrite or options.resume:
        return False
    if (experiment / COMPLETE_FILE).is_file():
        return True
    raise ExperimentError(
        f"experiment {spec.name} in {options.remote.uri if options.remote else options.storage} is unfinished: add --resume to "
        "continue it, or --overwrite to start again (the old folder is kept)"
    )


def open_experiment(spec: SearchSpec, overrides: dict[str, Any], options: Options,
                    paths: Paths = Paths()) -> tuple[Path, bool]:
    """Create the experiment folder, or accept the existing one; returns (folder, already complete). The first
    write into the folder: called once every pre-flight check has passed."""
    experiment = options.storage / spec.name
    if experiment_status(spec, options):
        return experiment, True
    if options.overwrite and experiment.exists() and any(experiment.iterdir()):
        kept = experiment.with_name(f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        experiment.rename(kept)
        print(f"the earlier experiment {spec.name} was moved to {kept} (nothing is deleted)", flush=True)
    experiment.mkdir(parents=True, exist_ok=True)
    if not (experiment / SPEC_FILE).is_file():
        write_json(experiment / SPEC_FILE, {"spec": spec.model_dump(mode="json"), "overrides": overrides,
                                            "paths": paths.to_dict()})
        _publish(options, experiment, SPEC_FILE)
    return experiment, False


def sync_down(remote: Remote, experiment: Path) -> None:
    """Start the local mirror from the remote copy on a machine that has none. On the machine that ran the
    driver the mirror is the newest copy (the Optuna database is pushed after each study only), so it is
    kept; a mirror of an experiment no longer at the URI is removed."""
    if not remote.exists(experiment.name):
        shutil.rmtree(experiment, ignore_errors=True)
    elif not (experiment / SPEC_FILE).is_file():
        remote.pull(experiment.name, experiment, driver_file)


def resolve_resume(name: str, storage: Path,
                   remote: Optional[Remote] = None) -> tuple[SearchSpec, dict[str, Any], Paths]:
    experiment = storage / name
    if remote:
        sync_down(remote, experiment)
    if not (experiment / SPEC_FILE).is_file():
        known = sorted(p.parent.name for p in storage.glob(f"*/{SPEC_FILE}")) if storage.is_dir() else []
        where = remote.uri if remote else storage
        raise ExperimentError(f"no experiment {name!r} to resume in {where}; allowed: {', '.join(known) or 'none found'}")
    saved = load_saved_spec(experiment)
    check_optuna_database(experiment)
    return saved


def check_storage(storage: Path) -> None:
    """An unusable --storage (a file, a read-only or unwritable folder) is one message before anything is
    written; a missing folder is made later, so its nearest existing parent must take it. Probed by writing
    a temporary file (permissions alone do not tell a read-only file system, nor root's rights)."""
    existing = storage
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise StorageError(f"--storage {storage}: {existing} is a file, not a folder; allowed: a folder (made if "
                           "missing) whose parents are folders, or a URI")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise StorageError(f"--storage {storage}: cannot write in {existing} ({error.strerror}); allowed: a folder "
                           "this user can write to, or a URI") from None


def check_optuna_database(experiment: Path) -> None:
    """A resume reopens the experiment's Optuna database (Tune's restored searcher does): one that SQLite cannot
    read is named here, before Ray starts, instead of a traceback from inside the restore."""
    database = experiment / OPTUNA_FILE
    if not database.is_file():
        return
    try:
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as connection:
            problem = connection.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.DatabaseError as error:
        problem = str(error)
    if problem != "ok":
        raise ExperimentError(f"{database}: damaged ({problem}); restore it from a copy, or start the experiment "
                              f"again with --overwrite (the old folder is kept)")


def preflight(spec: SearchSpec, overrides: dict[str, Any], options: Options, paths: Paths,
              studies: list[Study]) -> tuple[SearchSpec, list[Study]]:
    """Every check a start can fail, before anything is written into the experiment folder: data prepared
    (class splits included), weights fetched, Ray up and able to hold a trial. Returns the spec to run
    (`--allow-cpu` may drop its GPU) and its studies."""
    prepare_data(studies)
    prepare_weights(studies)
    _class_lists(studies)  # too few classes, or a val_fraction that leaves no training class
    init_ray(options.address, options.verbose)
    spec = check_resources(spec, autoscaling=options.autoscaling, allow_cpu=options.allow_cpu)
    return spec, plan_studies(spec, overrides, paths)


def driver_lock(storage: Path, name: str) -> FileLock:
    """One driver per experiment on this machine. The OS drops the lock when its holder dies, so a killed
    driver's experiment can be resumed at once; it does not guard drivers on different machines."""
    storage.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(storage / driver_lock_name(name)))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ExperimentError(f"another driver is running experiment {name} ({lock.lock_file}); wait for it") from None
    return lock


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def _class_lists(studies: list[Study]) -> dict[str, dict[str, list[int]]]:
    from tune_upl.config import make_config
    from tune_upl.data import SplitManager, load_records

    lists = {}
    for study in studies:
        cfg = make_config(study.base)
        splits = SplitManager(load_records(cfg), cfg.protocol, cfg.val_fraction)
        lists[study.key] = {"train": splits.train_classes, "val": splits.val_classes, "test": splits.test_classes}
    return lists


def write_record(experiment: Path, studies: list[Study], spec: SearchSpec) -> None:
    """What ran, on what: enough to tell two experiments apart a year later."""
    import ray
    import torch

    baselines = {s.key: baseline_point(s.space, s.base) for s in studies} if spec.baseline else {}
    write_json(experiment / RECORD_FILE, {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "git_commit": _git_commit(),
        "packages": _versions(),
        "python": platform.python_version(),
        "hardware": {
            "driver": platform.node(),
            "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            "cluster_resources": ray.cluster_resources(),
        },
        "baselines": baselines,
        "classes": _class_lists(studies),
    })


def _tune_root(options: Options, experiment: Path) -> Optional[str]:
    return options.remote.experiment_uri(experiment.name) if options.remote else None


def _selected(spec: SearchSpec, selection: Selection, experiment: Path, options: Options, study: str,
              saved: bool = False) -> Selection:
    """Save a study's selection (unless `saved`), say it, and delete the checkpoints of the other trials of
    its group in Tune experiment `study` (keep_checkpoints: selected). Idempotent, so a resume redoes it."""
    if not saved:
        save_selection(selection, experiment / selection.key)
        _publish(options, experiment, f"{selection.key}/{SELECTION_FILE}")
    print(f"selected trial {selection.trial_id} of {selection.key} (epoch {selection.epoch}, "
          f"{spec.objective.metric} {selection.objective[spec.objective.metric]:.4f})", flush=True)
    if spec.keep_checkpoints == "selected":

        def keep(trial_id: str, params: dict[str, Any]) -> bool:
            return trial_id == selection.trial_id or any(params.get(k) != v for k, v in selection.group.items())

        root = _tune_root(options, experiment) or str(experiment)
        prune_checkpoints(f"{root}/{study}", keep)
    return selection


def _select_all(spec: SearchSpec, studies: list[Study], experiment: Path, options: Options,
                callbacks: tuple[Any, ...]) -> list[Selection]:
    """Run every study's search (resuming where a folder holds one), select on the objective, save each
    selection and prune. A study whose selection is saved is done: a resume does not restore it (its
    errored trials would be resumed from checkpoints that pruning deleted)."""
    root = _tune_root(options, experiment)
    if spec.searcher.type == "grid":
        points = spec.study_points()
        saved = [load_selection(experiment / study_key(point)) for point in points]
        if all(saved):
            return [_selected(spec, s, experiment, options, GRID_STUDY, saved=True) for s in saved if s]
        grid = Study(GRID_STUDY, {}, studies[0].base, studies[0].space)
        results = run_study(spec, grid, experiment, options.verbose, callbacks, tune_root=root)
        picked = [select(spec, results, study_key(point), point) for point in points]
        for selection in picked:  # every study's selection is saved before any is pruned
            save_selection(selection, experiment / selection.key)
            _publish(options, experiment, f"{selection.key}/{SELECTION_FILE}")
        return [_selected(spec, s, experiment, options, GRID_STUDY, saved=True) for s in picked]
    selections = []
    for index, study in enumerate(studies, 1):
        done = load_selection(experiment / study.key)
        if done is not None:
            selections.append(_selected(spec, done, experiment, options, study.key, saved=True))
            continue
        print(f"study {index}/{len(studies)} {study.key}: {spec.num_samples} trials, {spec.searcher.type} + "
              f"{spec.scheduler.type}, objective {spec.objective.metric} ({spec.objective.mode})", flush=True)
        try:
            results = run_study(spec, study, experiment, options.verbose, callbacks, tune_root=root)
        finally:
            _publish(options, experiment, OPTUNA_FILE)
        selections.append(_selected(spec, select(spec, results, study.key, {}), experiment, options, study.key))
    return selections


def run_search(spec: SearchSpec, overrides: dict[str, Any], options: Options, paths: Paths = Paths()) -> Path:
    """Run (or resume) every study, then the final stage; returns the experiment folder. `paths`: the
    driver's (`cli.driver_paths`); without them, paths reach the trials as the spec and overrides give them."""
    studies = plan_studies(spec, overrides, paths)  # validates every study before anything starts
    callbacks = (*logger_callbacks(options.loggers, spec.name), *options.callbacks)
    check_storage(options.storage)
    lock = driver_lock(options.storage, spec.name)
    try:
        if options.remote:
            options.remote.check()
            sync_down(options.remote, options.storage / spec.name)
        if experiment_status(spec, options):
            print(f"experiment {spec.name} is complete already (in {options.storage / spec.name}); "
                  "use --overwrite to run it again", flush=True)
            return options.storage / spec.name
        checked, studies = preflight(spec, overrides, options, paths, studies)
        experiment, _ = open_experiment(spec, overrides, options, paths)  # the first write into the folder
        spec = checked
        for warning in serial_loading(spec, studies):
            print(warning, flush=True)
        write_record(experiment, studies, spec)
        _publish(options, experiment, RECORD_FILE)
        for selection in _select_all(spec, studies, experiment, options, callbacks):
            if spec.protocol == "val":
                seeds = f"{spec.final_seeds} seed{'' if spec.final_seeds == 1 else 's'}"
                print(f"final stage {selection.key}{FINAL_SUFFIX}: {seeds} on all training "
                      "classes, each tested once after its last epoch", flush=True)
                run_final(spec, selection, experiment, options.verbose, callbacks,
                          tune_root=_tune_root(options, experiment))
        (experiment / COMPLETE_FILE).write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"))
        _publish(options, experiment, COMPLETE_FILE)
        return experiment
    finally:
        restore_sigterm()
        lock.release()
