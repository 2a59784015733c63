"""Run a planned search on Ray Tune: every study of a spec, its search trials and final runs, in one Tuner
(its searcher and scheduler are `tune_upl.multistudy`'s, for TPE, GP, random and grid specs alike); the
resource check, the number of trials at once, the progress lines, and Ray's start-up.

Ray is the distributed engine: this module only configures it. What to run is `tune_upl.planning`'s.
"""
from __future__ import annotations

import collections
import fnmatch
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import ray
from ray import tune

from tune_upl.final import Selection, final_stage_line, selected_line
from tune_upl.layout import (
    COMPLETED, ERROR_KEY, ERRORED, OPTUNA_FILE, RUN_FOLDER, STOPPED_EARLY, STUDY_KEY,
    TUNE_STATE_PATTERN, error_line, run_suffix, trial_state,
)
from tune_upl.multistudy import Session, StudyRouter, StudySearcher, resuming
from tune_upl.planning import Study, final_runs, search_trials
from tune_upl.ray_private import drop_missing_score_errors, stop_tune_run, use_old_console_output
from tune_upl.spec import SearchSpec
from tune_upl.storage import open_location
from tune_upl import signals
from tune_upl.errors import SpecError, first_line


def check_resources(spec: SearchSpec, autoscaling: bool = False, allow_cpu: bool = False,
                    nodes: Optional[list[dict[str, Any]]] = None) -> SearchSpec:
    """A trial that no one node can hold (its CPUs and its GPU together) waits forever in Ray: refuse it up
    front, naming the kinds of node found. `nodes` is `ray.nodes()` by default.

    With `allow_cpu`, a spec that asks for GPUs on a cluster without any runs on CPUs instead (returned);
    with `autoscaling` (a cluster that grows on demand) the node check is skipped."""
    alive = [n["Resources"] for n in (ray.nodes() if nodes is None else nodes) if n.get("Alive")]
    kinds = collections.Counter((n.get("CPU", 0.0), n.get("GPU", 0.0)) for n in alive)
    cpu, gpu = spec.resources.cpu, spec.resources.gpu
    no_gpu = all(g == 0 for _, g in kinds)
    if gpu > 0 and no_gpu and allow_cpu:
        print("no GPU in this Ray cluster: running on CPUs (--allow-cpu)", flush=True)
        return spec.model_copy(update={"resources": spec.resources.model_copy(update={"gpu": 0})})
    if autoscaling or any(c >= cpu and g >= gpu for c, g in kinds):
        return spec
    found = ", ".join(f"{count} × {c:g} CPU + {g:g} GPU" for (c, g), count in kinds.items()) or "none alive"
    hint = "; or --allow-cpu to run on CPUs" if gpu > 0 and no_gpu else ""
    raise SpecError(
        f"resources = {cpu:g} CPU + {gpu:g} GPU per trial: no node of this Ray cluster holds that at once "
        f"(nodes: {found}); allowed: at most the CPUs and GPU of one node together, or --autoscaling for "
        f"a cluster that grows{hint}"
    )


class TrialLines(tune.Callback):
    """One readable line per finished trial and the best so far (Ray's own tables stay quiet), and the
    searcher's decisions as it makes them: a study selected (and its final stage starting) or left without
    a selection. Tune calls this after the searcher, so a selection's line comes after the line of the
    trial that completed the study. The best so far is the trial's study's; a line names its study when
    there are several, and a final run's line names `<study>.final` and shows its seed and test Recall@1."""

    def __init__(self, spec: SearchSpec, names: list[str], total: int, studies: tuple[Study, ...],
                 searcher: StudySearcher):
        self.spec, self.metric, self.mode, self.total = spec, spec.objective.metric, spec.objective.mode, total
        self.names, self.studies, self.searcher = names, studies, searcher
        self.done = 0
        self.best: dict[str, tuple[float, str]] = {}  # study -> (score, trial id)
        self.ended: set[str] = set()  # trials already counted
        self.said: set[str] = set()  # studies whose decision was printed

    def get_state(self) -> dict[str, Any]:
        """Saved with the experiment: a resumed run does not say a decision again."""
        return {"said": sorted(self.said)}

    def set_state(self, state: dict[str, Any]) -> None:
        self.said = set(state.get("said", ()))

    def _say_decisions(self) -> None:
        """Not once a stop signal came: Tune may still step before it stops, and a decision said then would
        read as made after the signal; the resumed run says it (the said set is saved without it)."""
        if signals.stopping():
            return
        selections, failed = self.searcher.decisions()
        for key, reason in failed.items():
            if key not in self.said:
                self.said.add(key)
                print(f"error: {reason}", flush=True)
        for key, selection in selections.items():
            if key not in self.said:
                self.said.add(key)
                print(selected_line(self.spec, selection), flush=True)
                if self.searcher.finals(key):
                    print(final_stage_line(self.spec, key), flush=True)

    def _count(self, trial: Any, status: str) -> str:
        """Count an ended trial once and keep the best; returns its state."""
        result = trial.last_result or {}
        state = trial_state(status, result, trial.config.get("num_epochs", "?"))
        if trial.trial_id in self.ended:
            return state
        self.ended.add(trial.trial_id)
        self.done += 1
        score = result.get(self.metric)
        if score is not None and state in (COMPLETED, STOPPED_EARLY) and not self._final(trial):
            known = self.best.get(self._key(trial))
            if known is None or (score > known[0] if self.mode == "max" else score < known[0]):
                self.best[self._key(trial)] = (score, trial.trial_id)
        return state

    def _final(self, trial: Any) -> bool:
        return bool(trial.config.get("final"))

    def _key(self, trial: Any) -> str:
        return str(trial.config.get(STUDY_KEY, ""))

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        """A restored run brings back trials that ended before the interruption: count them (and their best)
        first, so the lines continue the experiment's count instead of starting at [1/N]; and says what the
        restored searcher decided (a study whose last trial ended just before the interruption)."""
        for trial in trials:
            if trial.status in ("TERMINATED", "ERROR") and trial.trial_id not in self.ended:
                self._count(trial, trial.status)
        self._say_decisions()

    def _line(self, trial: Any, status: str) -> None:
        state = self._count(trial, status)
        result = trial.last_result or {}
        epochs = result.get("training_iteration", 0)
        planned = trial.config.get("num_epochs", "?")
        final, key = self._final(trial), self._key(trial)
        metric, names = ("test_recall@1", ["seed"]) if final else (self.metric, self.names)
        score = result.get(metric)
        params = " ".join(f"{n}={_short(trial.config.get(n))}" for n in names if n in trial.config)
        if ERROR_KEY in result:  # a trial that stopped itself (diverged, out of memory, no GPU)
            params += f" | {result[ERROR_KEY]}"
        elif state == ERRORED:
            params += f" | {_error_summary(trial)}"
        shown = f"{score:.4f}" if score is not None else "-"
        best = self.best.get(key)
        best_text = f"best {best[0]:.4f} ({best[1]})" if best else "best -"
        where = f"{key}{run_suffix(trial.config)} " if len(self.studies) > 1 or final else ""
        print(
            f"[{self.done}/{self.total}] {where}trial {trial.trial_id} {state:<13} epochs {epochs}/{planned} "
            f"{metric} {shown} | {params} | {best_text}",
            flush=True,
        )

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._line(trial, "TERMINATED")
        self._say_decisions()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._line(trial, "ERROR")
        self._say_decisions()


def _error_summary(trial: Any) -> str:
    """The last line of the trial's error (its full traceback stays in the trial folder)."""
    path = getattr(trial, "error_file", None)
    line = error_line(Path(path) if path else None)
    return f"{line} (see {path})" if line is not None else "error (see the trial folder)"


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _run_config(spec: SearchSpec, name: str, storage: str, verbose: bool, callbacks: list[tune.Callback],
                checkpoints: tune.CheckpointConfig) -> tune.RunConfig:
    return tune.RunConfig(
        name=name,
        storage_path=storage,
        verbose=2 if verbose else 0,
        callbacks=[*callbacks, StopOnSignal()],
        failure_config=tune.FailureConfig(max_failures=spec.max_failures),
        checkpoint_config=checkpoints,
    )


def _trainable(spec: SearchSpec, function: Optional[Callable[[dict[str, Any]], None]] = None) -> Any:
    """The trial function with the spec's resources: `train_trial`, or (benchmarks, tests) another."""
    from tune_upl.trainable import train_trial

    return tune.with_resources(function or train_trial, {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})


class StopOnSignal(tune.Callback):
    """Ends the run at the step after a stop signal (`tune_upl.signals`) through Tune's own stop
    (`ray_private.stop_tune_run`): Tune saves the experiment and returns. SIGINT's handler is off
    (`TUNE_DISABLE_SIGINT_HANDLER`), so that the driver's handler records the signal."""

    def __init__(self) -> None:
        self.asked = False

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if signals.stopping() and not self.asked:
            self.asked = True
            stop_tune_run()

    def __getstate__(self) -> dict[str, Any]:
        return {"asked": False}  # a restored run has not been asked


def _fit(spec: SearchSpec, folder: str, resume: bool, new_tuner: Any, expected: int | Callable[[], int],
         function: Optional[Callable[[dict[str, Any]], None]] = None, rerun_errored: bool = True) -> tune.ResultGrid:
    """Continue the Tune experiment in `folder` when `resume` (`restorable`, asked once by the caller), its
    searcher state included (with `rerun_errored`, errored trials resumed from their last checkpoint), else
    start `new_tuner()`. A restored ASHA starts with empty rungs (Ray pickles the scheduler as it was when
    the search began).

    Raises `signals.stop_error` when a stop signal came (Tune saved the experiment, or, when the signal took
    Ray down too, what it saved last), so nothing is selected or started after it; `Interrupted` when Tune
    returned with fewer trials than `expected` (known once the run ends). Whether the whole search is done
    is decided from the experiment folder, not from these counts (`tune_upl.experiment`)."""
    signals.set_run(True)
    try:
        if resume:
            results = tune.Tuner.restore(folder, _trainable(spec, function), resume_errored=rerun_errored).fit()
        else:
            results = new_tuner().fit()
    except Exception as error:
        if signals.stopping():
            raise signals.stop_error(ray_gone() or f"Tune stopped: {first_line(error)}") from error
        raise
    finally:
        signals.set_run(False)
    if signals.stopping():
        raise signals.stop_error(f"Tune saved {folder.rsplit('/', 1)[-1]}")
    expected = expected() if callable(expected) else expected
    if len(results) < expected:
        raise signals.Interrupted(f"{folder.rsplit('/', 1)[-1]}: {len(results)} of {expected} trials before Tune stopped")
    return results


def restorable(folder: str) -> bool:
    """Whether Tune saved the run in `folder` (a path or a URI): its `experiment_state-*.json`. A run stopped
    before Tune's first save (Ray taken down by the same signal) leaves only `tuner.pkl`, which Tune would
    "restore" into a run without its trials: that folder starts again instead."""
    import pyarrow.fs as pafs

    if not tune.Tuner.can_restore(folder):
        return False
    try:
        fs, path = open_location(folder)
        found = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except (OSError, ValueError):
        return False
    return any(fnmatch.fnmatch(info.base_name, TUNE_STATE_PATTERN) for info in found)


def logger_callbacks(names: tuple[str, ...], experiment_name: str) -> list[tune.Callback]:
    """Ray Tune's own MLflow / Weights & Biases loggers, when those optional packages are installed."""
    callbacks: list[tune.Callback] = []
    for name in names:
        try:
            if name == "mlflow":
                from ray.air.integrations.mlflow import MLflowLoggerCallback

                import mlflow  # noqa: F401  (the callback imports it lazily; fail here, clearly)
                callbacks.append(MLflowLoggerCallback(experiment_name=experiment_name))
            else:
                from ray.air.integrations.wandb import WandbLoggerCallback

                import wandb  # noqa: F401
                callbacks.append(WandbLoggerCallback(project=experiment_name))
        except ImportError:
            raise SpecError(f"--logger {name}: the {name} package is not installed; pip install {name}") from None
    return callbacks


def _best_kept(spec: SearchSpec) -> tune.CheckpointConfig:
    """A search trial's checkpoints: the best by the objective (`checkpoints_to_keep`); Ray keeps the latest too."""
    return tune.CheckpointConfig(num_to_keep=spec.checkpoints_to_keep, checkpoint_score_attribute=spec.objective.metric,
                                 checkpoint_score_order=spec.objective.mode)


def _discard(folder: str) -> None:
    """Remove what a run Tune never saved left in `folder` (`tuner.pkl`, trial folders), so that the new run
    and the report see only the new run's trials."""
    import pyarrow.fs as pafs

    fs, path = open_location(folder)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


@dataclass(frozen=True)
class SearchRun:
    """What one run of every study gives the driver: Tune's results, and the searcher's decisions (each
    selected study's selection; why nothing could be selected in the others)."""

    results: tune.ResultGrid
    selections: dict[str, Selection]
    failed: dict[str, str]


def run_studies(spec: SearchSpec, studies: list[Study], storage: Path, verbose: bool, at_once: int,
                callbacks: tuple[tune.Callback, ...] = (), tune_root: Optional[str] = None,
                publish: Optional[Callable[[str], None]] = None,
                function: Optional[Callable[[dict[str, Any]], None]] = None,
                warm: Optional[dict[str, tuple[str, list[dict[str, Any]]]]] = None) -> SearchRun:
    """Every study's search and final runs in one Tuner (`trials/`), resumed where the folder holds one.

    `storage` is the experiment's local folder (`optuna.db` and the selections live there; `publish(name)`
    copies one of its files to remote storage); Tune's folders go under `tune_root` (a URI) when given.
    `function` replaces the trial function (the benchmarks replay recorded curves); `warm`: per study key, the
    source and the points queued after its baseline (`warm_start.searcher_points`)."""
    root = tune_root or str(storage)
    folder = f"{root}/{RUN_FOLDER}"
    resume = restorable(folder)
    if not resume:  # a run Tune never saved starts again: its asked trials would be told twice
        (storage / OPTUNA_FILE).unlink(missing_ok=True)
        _discard(folder)
    finals = final_runs(spec)
    searched = sum(search_trials(spec, study) for study in studies)
    total = searched + len(studies) * finals
    names = list(dict.fromkeys(name for study in studies for name in study.space))
    drop_missing_score_errors(spec.objective.metric)  # a final run's checkpoints lack the objective
    session = Session(storage, publish, at_once)

    def new_tuner() -> tune.Tuner:
        searcher = StudySearcher(spec, studies, session, warm)
        return tune.Tuner(
            _trainable(spec, function),
            tune_config=tune.TuneConfig(
                search_alg=searcher,
                scheduler=StudyRouter(spec, studies, searcher),
                num_samples=total,
                max_concurrent_trials=at_once,
                reuse_actors=spec.reuse_actors,
                trial_dirname_creator=_run_dirname,
            ),
            run_config=_run_config(spec, RUN_FOLDER, root, verbose,
                                   [TrialLines(spec, names, total, tuple(studies), searcher), *callbacks],
                                   _best_kept(spec)),
        )

    def expected() -> int:  # a study where nothing could be selected has no final runs
        return searched + finals * len(session.searchers[-1].decisions()[0])

    # errored trials are not rerun: their studies counted them as failed, and may have selected since
    with resuming(session):
        results = _fit(spec, folder, resume, new_tuner, expected, function, rerun_errored=False)
    selections, failed = session.searchers[-1].decisions()
    return SearchRun(results, selections, failed)


def _run_dirname(trial: Any) -> str:
    """A trial's folder in the one run of all studies: its id, a final run's `<id>.final`, a recipe run's
    `<id>.recipe` (a report pulled from remote storage keeps their checkpoints by those names:
    `layout.report_file`)."""
    return trial.trial_id + run_suffix(trial.config)


def quiet_ray(verbose: bool) -> None:
    """Without --verbose, our one line per trial replaces Ray's boxes, tables and sync warnings."""
    if verbose:
        return
    use_old_console_output()  # the old reporter honours verbose=0 fully
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


def init_ray(address: Optional[str], verbose: bool) -> str:
    """Start this driver's own local Ray, or join the cluster at `address` (or $RAY_ADDRESS; `auto`: the one
    `ray start` left on this machine). Without either, a cluster found on the machine is never joined: it
    may be someone else's, and stopped under the search. Then the driver's signal handlers go back in
    place (`ray.init`'s core worker replaces SIGTERM's). Returns a line saying which Ray, and where."""
    quiet_ray(verbose)
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # the driver's own handler records SIGINT (`StopOnSignal`)
    if not ray.is_initialized():
        _start_ray(address or os.environ.get("RAY_ADDRESS") or "local", verbose)
    signals.reinstall()
    signals.set_ray_probe(ray_gone)
    return ray_line()


def ray_session() -> dict[str, str]:
    """The Ray this driver is connected to: its session folder and its GCS address (for the record)."""
    context = ray.get_runtime_context()
    return {"session": os.path.join(context.get_temp_dir(), context.get_session_name()),
            "address": context.gcs_address}


def ray_line() -> str:
    """Which Ray the search runs on: its session folder, its address and its size."""
    where = ray_session()
    resources = ray.cluster_resources()
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    return (f"Ray: session {where['session']} at {where['address']}, {nodes} node{'' if nodes == 1 else 's'}, "
            f"{resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs")


def ray_gone() -> Optional[str]:
    """Why Ray cannot be reached (its GCS takes no connection), or None while it can: a SIGTERM to the
    driver's process group reaches Ray's own processes too (they are the driver's children)."""
    if not ray.is_initialized():
        return None
    address = "its address"
    try:
        address = ray.get_runtime_context().gcs_address
        host, port = address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=2):
            return None
    except Exception as error:  # refused, reset, timed out, or the context itself gone
        return f"Ray's own processes were stopped too (no GCS at {address}: {error.__class__.__name__})"


def _start_ray(address: str, verbose: bool) -> None:
    ray.init(
        address=address,
        include_dashboard=False,
        log_to_driver=verbose,
        logging_level="INFO" if verbose else "WARNING",
        configure_logging=True,
    )
