"""Run a planned search on Ray Tune: one Tuner per study (TPE or random through Optuna, ASHA or FIFO), or
one Tuner over the whole grid, and the final stage's Tuner; the searcher, the scheduler, the resource check,
the one line per trial, and Ray's start-up.

Ray is the distributed engine: this module only configures it. What to run is `tune_upl.planning`'s.
"""
from __future__ import annotations

import collections
import functools
import os
import signal
import threading
import warnings
from pathlib import Path
from typing import Any, Optional

import optuna
import ray
from ray import tune

from tune_upl.config import FIELD_DEFAULTS
from tune_upl.final import Selection, final_param_space, final_seeds
from tune_upl.layout import (
    COMPLETED, ERROR_KEY, ERRORED, FINAL_SUFFIX, OPTUNA_FILE, STOPPED_EARLY, error_line, trial_state,
)
from tune_upl.planning import Study, baseline_point, define_space, grid_points, max_epochs
from tune_upl.spec import SearchSpec
from tune_upl.errors import SpecError, Terminated


def make_searcher(spec: SearchSpec, study: Study, database: Optional[Path] = None) -> tune.search.Searcher:
    """Optuna TPE or random sampling over the study's space; with `database`, the study also lives in that
    SQLite file (browse it with `optuna-dashboard sqlite:///<file>`; trials Tune resumed show as failed)."""
    from ray.tune.search.optuna import OptunaSearch

    if spec.searcher.type == "tpe":
        warnings.filterwarnings("ignore", message=".*group.*experimental", category=optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(
            seed=spec.searcher.seed,
            n_startup_trials=spec.searcher.n_startup_trials,
            multivariate=True,
            group=True,  # conditional (`when`) parameters are modelled per group
            constant_liar=True,  # concurrent trials do not all propose the same point
        )
    else:
        sampler = optuna.samplers.RandomSampler(seed=spec.searcher.seed)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    points = [baseline_point(study.space, study.base)] if spec.baseline else None
    storage = optuna.storages.RDBStorage(f"sqlite:///{database}") if database is not None else None
    return OptunaSearch(
        space=functools.partial(define_space, space=study.space, base=study.base),
        metric=spec.objective.metric,
        mode=spec.objective.mode,
        sampler=sampler,
        points_to_evaluate=points or None,
        storage=storage,
        study_name=study.key if storage is not None else None,
    )


def make_scheduler(spec: SearchSpec, study: Study) -> tune.schedulers.TrialScheduler:
    if spec.scheduler.type == "fifo":
        return tune.schedulers.FIFOScheduler()
    return tune.schedulers.ASHAScheduler(
        time_attr="training_iteration",
        metric=spec.objective.metric,
        mode=spec.objective.mode,
        max_t=max_epochs(study.base, study.space),  # planning's rung_epochs are this scheduler's
        grace_period=spec.scheduler.grace_period,
        reduction_factor=spec.scheduler.reduction_factor,
    )


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
    """One readable line per finished trial and the best so far (Ray's own tables stay quiet)."""

    def __init__(self, spec: SearchSpec, study: Study, total: int, metric: Optional[str] = None,
                 names: Optional[list[str]] = None):
        self.metric, self.mode, self.total = metric or spec.objective.metric, spec.objective.mode, total
        self.names = list(study.space) if names is None else names
        self.done = 0
        self.best: Optional[tuple[float, str]] = None
        self.ended: set[str] = set()  # trials already counted

    def __setstate__(self, state: dict[str, Any]) -> None:  # Tune restores callbacks pickled by older code too
        self.__dict__.update({"ended": set(), **state})

    def _count(self, trial: Any, status: str) -> str:
        """Count an ended trial once and keep the best; returns its state."""
        result = trial.last_result or {}
        state = trial_state(status, result, trial.config.get("num_epochs", "?"))
        if trial.trial_id in self.ended:
            return state
        self.ended.add(trial.trial_id)
        self.done += 1
        score = result.get(self.metric)
        if score is not None and state in (COMPLETED, STOPPED_EARLY):
            better = self.best is None or (score > self.best[0] if self.mode == "max" else score < self.best[0])
            if better:
                self.best = (score, trial.trial_id)
        return state

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        """A restored run brings back trials that ended before the interruption: count them (and their best)
        first, so the lines continue the experiment's count instead of starting at [1/N]."""
        for trial in trials:
            if trial.status in ("TERMINATED", "ERROR") and trial.trial_id not in self.ended:
                self._count(trial, trial.status)

    def _line(self, trial: Any, status: str) -> None:
        state = self._count(trial, status)
        result = trial.last_result or {}
        epochs = result.get("training_iteration", 0)
        planned = trial.config.get("num_epochs", "?")
        score = result.get(self.metric)
        params = " ".join(f"{n}={_short(trial.config.get(n))}" for n in self.names if n in trial.config)
        if ERROR_KEY in result:  # a trial that stopped itself (diverged, out of memory, no GPU)
            params += f" | {result[ERROR_KEY]}"
        elif state == ERRORED:
            params += f" | {_error_summary(trial)}"
        shown = f"{score:.4f}" if score is not None else "-"
        best = f"best {self.best[0]:.4f} ({self.best[1]})" if self.best else "best -"
        print(
            f"[{self.done}/{self.total}] trial {trial.trial_id} {state:<13} epochs {epochs}/{planned} "
            f"{self.metric} {shown} | {params} | {best}",
            flush=True,
        )

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._line(trial, "TERMINATED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._line(trial, "ERROR")


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
        callbacks=callbacks,
        failure_config=tune.FailureConfig(max_failures=spec.max_failures),
        checkpoint_config=checkpoints,
    )


def _trainable(spec: SearchSpec) -> Any:
    from tune_upl.trainable import train_trial

    return tune.with_resources(train_trial, {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})


class Interrupted(KeyboardInterrupt):
    """Tune stopped before every trial ended (SIGINT, SIGUSR1): its state is saved, so resume it."""


SIGTERM_SEEN = threading.Event()  # set by `_on_sigterm`: the interruption was a SIGTERM (exit 143)
_replaced: list[Any] = []  # the SIGTERM handler `handle_sigterm` replaced, until `restore_sigterm`


def _on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM (Kubernetes, `scancel`) as SIGINT: inside a Tune run, Tune's own SIGINT handler saves the
    experiment and returns early; elsewhere the driver stops at once, as on Ctrl-C."""
    SIGTERM_SEEN.set()
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler) and handler is not signal.default_int_handler:
        handler(signal.SIGINT, frame)
    else:
        raise Terminated("SIGTERM")


def handle_sigterm() -> None:
    """Install `_on_sigterm` in the driver's main thread for the run. Called after `ray.init`, whose core
    worker installs a C++ handler that dumps a stack and aborts (exit 134) on SIGTERM."""
    if threading.current_thread() is threading.main_thread() and not _replaced:
        SIGTERM_SEEN.clear()
        _replaced.append(signal.signal(signal.SIGTERM, _on_sigterm))


def restore_sigterm() -> None:
    """Put back the SIGTERM handler `handle_sigterm` replaced (a program that embeds the search keeps its own)."""
    if _replaced and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _replaced.pop())


def _fit(spec: SearchSpec, folder: str, new_tuner: Any, expected: int) -> tune.ResultGrid:
    """Continue the Tune experiment in `folder` when there is one (its searcher state included, errored
    trials resumed from their last checkpoint), else start `new_tuner()`. A restored ASHA starts with
    empty rungs (Ray pickles the scheduler as it was when the search began).

    Raises `Interrupted` when Tune returns early, so nothing is selected from a partial search."""
    if tune.Tuner.can_restore(folder):
        results = tune.Tuner.restore(folder, _trainable(spec), resume_errored=True).fit()
    else:
        results = new_tuner().fit()
    ended = results.num_terminated + results.num_errors
    if len(results) < expected or ended < len(results):
        stop = Terminated if SIGTERM_SEEN.is_set() else Interrupted
        raise stop(f"{folder.rsplit('/', 1)[-1]}: {ended} of {expected} trials ended before Tune stopped")
    return results


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


def run_study(spec: SearchSpec, study: Study, storage: Path, verbose: bool,
              callbacks: tuple[tune.Callback, ...] = (), tune_root: Optional[str] = None) -> tune.ResultGrid:
    """The search of one study (or the whole grid), resumed where its folder already holds one.

    `storage` is the experiment's local folder (the Optuna database lives there); Tune's folders go under
    `tune_root` (a URI) when given, else under `storage`."""
    root = tune_root or str(storage)
    grid = spec.searcher.type == "grid"
    if grid:
        # every point names every grid field (a parameter whose `when` fails takes its default), so Tune's
        # generator only fills in the points and never samples the domains declared here for it
        points = [{**{n: FIELD_DEFAULTS[n] for n in study.space}, **p} for p in grid_points(spec, study)]
        param_space = {k: v for k, v in study.base.items() if k not in spec.studies}
        param_space.update({n: tune.choice(v) for n, v in spec.studies.items()})
        param_space.update({n: tune.choice(p.choice) for n, p in study.space.items()})
        num_samples = len(points) * spec.num_samples
    else:
        param_space, num_samples = {}, spec.num_samples
    metric = spec.objective.metric

    def new_searcher() -> Any:
        # built only for a new Tuner: an OptunaSearch enqueues the baseline into the study's database when
        # it is made, and a restored Tuner brings back its own searcher (which would run the baseline again)
        if grid:
            return tune.search.BasicVariantGenerator(
                points_to_evaluate=points * spec.num_samples, max_concurrent=spec.max_concurrent
            )
        return make_searcher(spec, study, storage / OPTUNA_FILE)

    def new_tuner() -> tune.Tuner:
        return tune.Tuner(
            _trainable(spec),
            param_space=param_space,
            tune_config=tune.TuneConfig(
                search_alg=new_searcher(),
                scheduler=make_scheduler(spec, study),
                num_samples=num_samples,
                # a Searcher takes Tune's limit; the grid's generator holds its own (max_concurrent above)
                max_concurrent_trials=None if grid else spec.max_concurrent,
                reuse_actors=spec.reuse_actors,
                trial_dirname_creator=_trial_dirname,
            ),
            run_config=_run_config(
                spec, study.key, root, verbose, [TrialLines(spec, study, num_samples), *callbacks],
                tune.CheckpointConfig(
                    num_to_keep=spec.checkpoints_to_keep,  # the best by the objective; Ray keeps the latest too
                    checkpoint_score_attribute=metric,
                    checkpoint_score_order=spec.objective.mode,
                ),
            ),
        )

    return _fit(spec, f"{root}/{study.key}", new_tuner, num_samples)


def run_final(spec: SearchSpec, selection: Selection, storage: Path, verbose: bool,
              callbacks: tuple[tune.Callback, ...] = (), tune_root: Optional[str] = None) -> tune.ResultGrid:
    """Retrain the selection from scratch with `final_seeds` seeds on all training classes; each run is
    tested once after its last epoch. Its own Tune experiment, `<key>.final`, resumable like the search."""
    seeds = final_seeds(spec, selection)
    name = selection.key + FINAL_SUFFIX
    lines = TrialLines(spec, Study(name, {}, {}, {}), len(seeds), metric="test_recall@1", names=["seed"])
    root = tune_root or str(storage)

    def new_tuner() -> tune.Tuner:
        return tune.Tuner(
            _trainable(spec),
            param_space={**final_param_space(selection), "seed": tune.grid_search(seeds)},
            tune_config=tune.TuneConfig(
                search_alg=tune.search.BasicVariantGenerator(max_concurrent=spec.max_concurrent),
                num_samples=1,  # the grid over seeds is the whole stage
                reuse_actors=spec.reuse_actors,
                trial_dirname_creator=_trial_dirname,
            ),
            run_config=_run_config(spec, name, root, verbose, [lines, *callbacks],
                                   tune.CheckpointConfig(num_to_keep=1)),  # the final model
        )

    return _fit(spec, f"{root}/{name}", new_tuner, len(seeds))


def _trial_dirname(trial: Any) -> str:
    return trial.trial_id


def quiet_ray(verbose: bool) -> None:
    """Without --verbose, our one line per trial replaces Ray's boxes, tables and sync warnings."""
    if verbose:
        return
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the old reporter honours verbose=0 fully
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


def init_ray(address: Optional[str], verbose: bool) -> None:
    """Start or join Ray, then take over SIGTERM for the run (`restore_sigterm` gives it back)."""
    quiet_ray(verbose)
    if not ray.is_initialized():
        _start_ray(address, verbose)
    handle_sigterm()


def _start_ray(address: Optional[str], verbose: bool) -> None:
    ray.init(
        address=address,
        include_dashboard=False,
        log_to_driver=verbose,
        logging_level="INFO" if verbose else "WARNING",
        configure_logging=True,
    )
