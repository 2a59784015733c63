"""An experiment folder's life: start, refuse or resume; one driver at a time; a record of what ran; and
the order of work (every study's search and final runs in one Tune run; prune; mark complete).

Layout under `<storage>/<name>/` (the names and the full layout are `tune_upl.layout`'s):
`search_spec.json` (the spec, the command-line overrides and the driver's paths: a resume reads it and
plans the same studies), `record.json` (code version, packages, hardware, class lists), `optuna.db`,
`<study>/selection.json`, the Tune experiment `trials/`, and `COMPLETE` once everything has run. With `--storage` a URI (s3://, gs://), Tune's folders are written there and the
driver's files to a local mirror, each pushed to the URI when written (`tune_upl.storage`).
"""
from __future__ import annotations

import contextlib
import fnmatch
import functools
import platform
import shutil
import sqlite3
import subprocess
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

from filelock import FileLock, Timeout

from tune_upl import __version__
from tune_upl.atomic import write_json
from tune_upl.config import Paths
from tune_upl.final import Selection, unfinished
from tune_upl.layout import (
    COMPLETE_FILE,
    OPTUNA_FILE,
    RECORD_FILE,
    RUN_FOLDER,
    PULLED_FOLDER,
    SPEC_FILE,
    TUNE_STATE_PATTERN,
    WARM_START_FILE,
    driver_file,
    driver_lock_name,
    older_layout,
    report_file,
    search_command,
)
from tune_upl.results import older_layout_line, read_saved_spec
from tune_upl.planning import (
    Study, backbone_recipe_departures, baseline_point, max_epochs, plan_studies, prepare_data, prepare_weights,
    search_trials, serial_loading,
)
from tune_upl.concurrency import per_study, trials_at_once  # Ray-free: `--dry-run` says them without Ray
from tune_upl.spec import SearchSpec, parse_spec
from tune_upl.storage import Remote, prune_checkpoints, push_file, writable_folder
from tune_upl import signals, warm_start
from tune_upl.errors import ExperimentError, Incomplete

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
    check_nodes: bool = True  # probe every node before the first trial (`probe`)
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
    per_trial = f"each {spec.resources.cpu:g} CPU + {spec.resources.gpu:g} GPU"
    # the cluster is not known before Ray starts: its size may lower this (concurrency.trials_at_once)
    total = trials_at_once(spec, studies)
    cap = f", capped by max_concurrent_total {spec.max_concurrent_total}" if spec.max_concurrent_total else ""
    at_once = (f"all {len(studies)} stud{'y' if len(studies) == 1 else 'ies'} in one run: up to {total} trials at "
               f"once ({_per_study_text(spec, studies)} per study{cap}), {per_trial}: "
               f"{total * spec.resources.gpu:g} GPUs for {total} at once")
    lines = [f"experiment {spec.name}: {spec.searcher.type} + {spec.scheduler.type}, objective "
             f"{spec.objective.metric} ({spec.objective.mode}), protocol {spec.protocol}, {at_once}"]
    for study in studies:
        trials = search_trials(spec, study)
        points = (f" ({trials // spec.num_samples} grid point{'s' if trials != spec.num_samples else ''} x "
                  f"{spec.num_samples})" if spec.searcher.type == "grid" else "")
        lines.append(f"  study {study.key}: {trials} trial{'s' if trials != 1 else ''}{points}, up to "
                     f"{max_epochs(study.base, study.space)} epochs each, "
                     f"{study.base.get('data_name')}/{study.base.get('backbone_type')}/{study.base.get('loss_name')}, "
                     f"data {study.base.get('data_path')}, cache {study.base.get('cache_dir')}, "
                     f"searching {', '.join(study.space) or 'nothing'}")
        lines += [f"    {line}" for line in recipe_notes([study])]
    if spec.protocol == "val":
        recipe = (f" (+ {spec.final_seeds} recipe runs: the loss's recipe, same seeds)" if spec.recipe_runs else "")
        lines.append(f"  final stage: {spec.final_seeds} seeds per study{recipe}, on train + validation classes, "
                     "tested once")
    return "\n".join(lines)


def recipe_notes(studies: list[Study]) -> list[str]:
    """A line for each study whose backbone has a training recipe (a ViT) that its fixed values depart from."""
    lines = []
    for study in studies:
        departures = backbone_recipe_departures(study)
        if departures:
            lines.append(f"note: study {study.key} trains {study.base['backbone_type']} otherwise than its training "
                         "recipe (references.yaml backbone_recipes): " +
                         ", ".join(f"{name} {ours!r} (recipe {theirs!r})"
                                   for name, (ours, theirs) in departures.items()) + "; fix them in the spec to train as the recipe does")
    return lines


def _per_study_text(spec: SearchSpec, studies: list[Study]) -> str:
    """Each study's trials at once (grids of different sizes may differ)."""
    return _span([per_study(spec, study) for study in studies])


def _span(counts: list[int]) -> str:
    """One number, or the range of the counts where they differ."""
    return str(min(counts)) if min(counts) == max(counts) else f"{min(counts)}-{max(counts)}"


def _publish(options: Options, experiment: Path, *relative: str) -> None:
    """Push driver files of the local folder to the remote storage (nothing to do for a local one)."""
    if options.remote:
        for name in relative:
            push_file(options.remote, experiment, name)


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
    if not exists or options.overwrite:
        return False
    if (experiment / COMPLETE_FILE).is_file():
        return True
    if options.resume:
        return False
    raise ExperimentError(
        f"experiment {spec.name} in {options.remote.uri if options.remote else options.storage} is unfinished: add --resume to "
        "continue it, or --overwrite to start again (the old folder is kept)"
    )


def open_experiment(spec: SearchSpec, overrides: dict[str, Any], options: Options, paths: Paths = Paths()) -> Path:
    """Create the experiment folder (moving an earlier one aside under --overwrite), or accept the one to
    resume: the first write into the folder, once `experiment_status` and every pre-flight check passed."""
    experiment = options.storage / spec.name
    if options.overwrite and experiment.exists() and any(experiment.iterdir()):
        kept = experiment.with_name(f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        experiment.rename(kept)
        print(f"the earlier experiment {spec.name} was moved to {kept} (nothing is deleted)", flush=True)
    experiment.mkdir(parents=True, exist_ok=True)
    if not (experiment / SPEC_FILE).is_file():
        write_json(experiment / SPEC_FILE, {"spec": spec.model_dump(mode="json"), "overrides": overrides,
                                            "paths": paths.to_dict(), "location": location(experiment, options.remote)})
        _publish(options, experiment, SPEC_FILE)
    return experiment


def sync_down(remote: Remote, experiment: Path) -> None:
    """Start the local mirror from the remote copy on a machine that has none. On the machine that ran the
    driver the mirror is the newest copy (the Optuna database is pushed each time a trial ends), so it is
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
    if not (experiment / COMPLETE_FILE).is_file():  # a complete one is only reported: nothing of Tune's runs
        refuse_moved(experiment, remote)
    refuse_old_layout(experiment, remote)
    check_optuna_database(experiment)
    return saved


def location(experiment: Path, remote: Optional[Remote]) -> str:
    """Where an experiment's folder is: its absolute path, or its URI; recorded when it is made, because Tune's
    saved state names it too (a restored run writes its new trials there)."""
    return remote.experiment_uri(experiment.name) if remote else str(experiment.resolve())


def refuse_moved(experiment: Path, remote: Optional[Remote]) -> None:
    """A resume where the experiment was made, or nowhere: Tune's saved state names the folder it was written
    in, and a resumed run would write its new trials there (into the original, for a copy; into a folder that
    is gone, for a move, every new trial failing). Refused before Ray starts, with the command that resumes
    it where it was. A folder recorded before locations were is not checked."""
    was = read_saved_spec(experiment).get("location")
    now = location(experiment, remote)
    if was is None or was == now:
        return
    name, storage = experiment.name, was.rsplit("/", 1)[0]
    resume = search_command("search", "--resume", name=name, storage=storage)
    if remote is None and (Path(was) / SPEC_FILE).is_file():
        raise ExperimentError(f"--resume: {now} is a copy of experiment {name} at {was} (Tune's saved state names that "
                              f"folder, so a resume here would write into the original); resume the original with: "
                              f"{resume}")
    raise ExperimentError(f"--resume: experiment {name} was written at {was} and is now at {now}; Tune's saved state "
                          f"names the first folder, so it resumes only there: move it back, then {resume}")


def check_storage(storage: Path) -> Path:
    """`--storage` usable (`storage.writable_folder`); returns its nearest existing folder: what a refused
    start leaves the storage as (`leave_as_found`)."""
    return writable_folder(storage, "--storage")


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
              studies: list[Study]) -> tuple[SearchSpec, list[Study], dict[str, dict[str, list[int]]]]:
    """Every check a start can fail, before anything is written into the experiment folder: data prepared
    (class splits included), weights fetched, Ray up and able to hold a trial, and every node that can hold one
    seeing the storage, the data, the weights and its GPUs (`probe`). Returns the spec to run (`--allow-cpu`
    may drop its GPU), its studies and their class lists (for the record)."""
    from tune_upl.planning import study_configs
    from tune_upl.probe import check_nodes
    from tune_upl.search import check_resources, init_ray  # Ray loads here, not on import (`--dry-run`)

    prepare_data(studies)
    prepare_weights(studies)
    classes = _class_lists(studies)  # too few classes, or a val_fraction that leaves no training class
    print(init_ray(options.address, options.verbose), flush=True)
    spec = check_resources(spec, autoscaling=options.autoscaling, allow_cpu=options.allow_cpu)
    studies = plan_studies(spec, overrides, paths)
    if options.check_nodes:
        configs = [cfg for study in studies for cfg in study_configs(study)]
        gpu = spec.resources.gpu if _uses_cuda(studies) else 0.0  # device: cpu everywhere: its GPUs are unused
        print(check_nodes(options.storage, options.remote.uri if options.remote else None, spec.name, configs,
                          spec.resources.cpu, spec.resources.gpu, gpu, options.autoscaling), flush=True)
    return spec, studies, classes


def _uses_cuda(studies: list[Study]) -> bool:
    """Whether any trial may run on CUDA: a device other than cpu, fixed or among a study's choices."""
    for study in studies:
        searched = study.space.get("device")
        devices = searched.choice if searched is not None and searched.choice else [study.base.get("device", "auto")]
        if any(device != "cpu" for device in devices):
            return True
    return False


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


def leave_as_found(lock: FileLock, storage: Path, found: Path) -> None:
    """After a start that wrote no experiment (refused, or complete already): remove the lock file, and the
    folders from `storage` up to `found` (its nearest folder that existed) that the driver made for it, so
    the storage is as the user left it. Unlinked while still held: no second driver can take this file."""
    Path(lock.lock_file).unlink(missing_ok=True)
    lock.release()
    with contextlib.suppress(OSError):  # not empty: something else was written there
        while storage != found:
            storage.rmdir()
            storage = storage.parent


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


def write_record(experiment: Path, studies: list[Study], spec: SearchSpec,
                 classes: dict[str, dict[str, list[int]]]) -> None:
    """What ran, on what: enough to tell two experiments apart a year later."""
    import ray
    import torch

    from tune_upl.search import ray_session

    queued = spec.baseline and spec.searcher.type != "grid"  # a grid runs its own points only
    baselines = {s.key: baseline_point(s.space, s.base) for s in studies} if queued else {}
    write_json(experiment / RECORD_FILE, {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "tune_upl": __version__,
        "git_commit": _git_commit(),
        "packages": _versions(),
        "python": platform.python_version(),
        "hardware": {
            "driver": platform.node(),
            "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            "cluster_resources": ray.cluster_resources(),
            "ray": ray_session(),
        },
        "baselines": baselines,
        "classes": classes,
    })


def _tune_root(options: Options, experiment: Path) -> Optional[str]:
    return options.remote.experiment_uri(experiment.name) if options.remote else None


def _prune(spec: SearchSpec, options: Options, experiment: Path, folder: str, selections: list[Selection]) -> None:
    """keep_checkpoints: selected: delete the checkpoints of every search trial in Tune experiment `folder`
    but the selected ones (final runs keep theirs). Idempotent, so a resume redoes it."""
    if spec.keep_checkpoints != "selected":
        return
    chosen = {s.trial_id for s in selections}
    root = _tune_root(options, experiment) or str(experiment)
    prune_checkpoints(f"{root}/{folder}", lambda trial_id, params: trial_id in chosen or bool(params.get("final")))


def _run_studies(spec: SearchSpec, studies: list[Study], experiment: Path, options: Options,
                 callbacks: tuple[Any, ...], starts: dict[str, warm_start.StudyStart]) -> None:
    """Every study's search and final runs in one Tune run (`tune_upl.multistudy`), as many trials at once as
    the cluster holds, each study's warm-start points (`starts`) queued after its baseline; then the search
    trials' checkpoints are pruned, but the selected ones."""
    import ray

    from tune_upl.search import run_studies

    at_once = trials_at_once(spec, studies, None if options.autoscaling else ray.cluster_resources())
    gpus = f", {at_once * spec.resources.gpu:g} GPUs" if spec.resources.gpu else ""
    each = _span([search_trials(spec, study) for study in studies])
    print(f"{len(studies)} stud{'y' if len(studies) == 1 else 'ies'} in one run: {each} trials each, "
          f"{spec.searcher.type} + {spec.scheduler.type}, objective {spec.objective.metric} ({spec.objective.mode}); "
          f"up to {at_once} trials at once ({_per_study_text(spec, studies)} per study{gpus})", flush=True)
    for line in recipe_notes(studies):
        print(line, flush=True)
    publish = functools.partial(push_file, options.remote, experiment) if options.remote else None
    try:
        ran = run_studies(spec, studies, experiment, options.verbose, at_once, callbacks,
                          tune_root=_tune_root(options, experiment), publish=publish,
                          warm=warm_start.searcher_points(starts))
    finally:
        _publish(options, experiment, OPTUNA_FILE)
    _prune(spec, options, experiment, RUN_FOLDER, list(ran.selections.values()))


def refuse_old_layout(experiment: Path, remote: Optional[Remote]) -> None:
    """An experiment in an older layout (`layout.older_layout`): --resume cannot continue it."""
    if remote is None:
        line = older_layout_line(experiment)
    else:
        states = [f for f in remote.files(experiment.name)
                  if f.count("/") == 1 and fnmatch.fnmatch(f.split("/")[-1], TUNE_STATE_PATTERN)]
        line = older_layout(experiment.name, [f.split("/")[0] for f in states])
    if line:
        raise ExperimentError(f"--resume: {line}")


def readable(options: Options, name: str) -> Path:
    """The experiment folder with its trials, to read: the local one, or a copy of the URI's (without the
    search's checkpoints) in the mirror's `pulled/` folder."""
    if options.remote is None:
        return options.storage / name
    view = options.storage / PULLED_FOLDER / name
    options.remote.pull(name, view, report_file)
    return view


def finish(spec: SearchSpec, studies: list[Study], options: Options, experiment: Path) -> None:
    """Mark the experiment complete when the folder says it is (`final.unfinished`): never from Tune's
    counts, which call a stopped trial ended. Otherwise `Incomplete`, naming what is missing."""
    missing = unfinished(spec, [s.key for s in studies], readable(options, experiment.name))
    if missing:
        raise Incomplete(f"search {spec.name} is not complete: {'; '.join(missing)}")
    (experiment / COMPLETE_FILE).write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"))
    _publish(options, experiment, COMPLETE_FILE)


def run_search(spec: SearchSpec, overrides: dict[str, Any], options: Options, paths: Paths = Paths()) -> Path:
    """Run (or resume) every study, then the final stage; returns the experiment folder. `paths`: the
    driver's (`cli.driver_paths`); without them, paths reach the trials as the spec and overrides give them.
    A stop signal ends it with `signals.Interrupted` or `Terminated` (nothing selected, started or marked
    after it); a run that ends without everything done, with `Incomplete`."""
    from tune_upl.search import logger_callbacks  # Ray loads when a search runs, not when this module is imported

    studies = plan_studies(spec, overrides, paths)  # validates every study before anything starts
    callbacks = (*logger_callbacks(options.loggers, spec.name), *options.callbacks)
    found = check_storage(options.storage)
    lock = driver_lock(options.storage, spec.name)
    experiment = None
    signals.install()
    try:
        if options.remote:
            options.remote.check()
            sync_down(options.remote, options.storage / spec.name)
        if experiment_status(spec, options):
            print(f"experiment {spec.name} is complete already (in {options.storage / spec.name}); "
                  "use --overwrite to run it again", flush=True)
            return options.storage / spec.name
        # the warm start's source read before Ray starts; a resumed experiment keeps the points it recorded
        starts = warm_start.resolve(spec, studies, functools.partial(readable, options), options.storage / spec.name,
                                    resumed=options.resume)
        checked, studies, classes = preflight(spec, overrides, options, paths, studies)
        experiment = open_experiment(spec, overrides, options, paths)  # the first write into the folder
        if warm_start.record(experiment, starts):
            _publish(options, experiment, WARM_START_FILE)
        spec = checked
        for warning in serial_loading(spec, studies):
            print(warning, flush=True)
        write_record(experiment, studies, spec, classes)
        _publish(options, experiment, RECORD_FILE)
        _run_studies(spec, studies, experiment, options, callbacks, starts)
        if signals.stopping():  # came after Tune's last step: nothing is marked after it
            raise signals.stop_error("after the last trial")
        finish(spec, studies, options, experiment)
        return experiment
    finally:
        signals.uninstall()
        if experiment is None:
            leave_as_found(lock, options.storage, found)
        else:
            lock.release()
