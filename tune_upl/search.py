"""Run a search spec on Ray Tune: one Tuner per study (TPE or random through Optuna, ASHA or FIFO), or
one Tuner over the whole grid; then select on the validation objective and test the selection once.

Ray is the distributed engine: this module only configures it. Data are prepared here, in the driver,
before any trial starts; trials only read them.
"""
from __future__ import annotations

import functools
import itertools
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import optuna
import ray
from ray import tune

from tune_upl.config import FIELD_DEFAULTS, make_config
from tune_upl.data import DATASETS
from tune_upl.spec import Param, SearchSpec, SpecError

FINAL_FILE = "final_test.json"
SPEC_FILE = "search_spec.json"
GRID_STUDY = "grid"


@dataclass(frozen=True)
class Study:
    """One independent search: its folder name, the `studies` values and the fields it holds fixed."""

    key: str
    point: dict[str, Any]
    base: dict[str, Any]
    space: dict[str, Param] = field(default_factory=dict)


def study_key(point: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in point.items()) or "main"


def _condition_holds(param: Param, values: dict[str, Any]) -> Optional[bool]:
    """True/False when every field `when` names is known in `values`; None while one is still open."""
    for other, allowed in (param.when or {}).items():
        if other not in values:
            return None
        if values[other] not in allowed:
            return False
    return True


def order_space(space: dict[str, Param]) -> dict[str, Param]:
    """Parameters after the searched fields their `when` depends on (define-by-run samples in order)."""
    ordered: dict[str, Param] = {}
    pending = dict(space)
    while pending:
        ready = [n for n, p in pending.items() if not set(p.when or {}) & (set(pending) - {n})]
        if not ready:
            raise SpecError(f"space: the when conditions of {', '.join(pending)} depend on each other in a cycle")
        for name in ready:
            ordered[name] = pending.pop(name)
    return ordered


def plan_studies(spec: SearchSpec, overrides: dict[str, Any]) -> list[Study]:
    """Split the spec into studies; command-line overrides fix a field and take it out of the space.

    A `when` on a field that is not searched is decided here, once per study.
    """
    studies = []
    for point in spec.study_points():
        base = {**FIELD_DEFAULTS, **spec.fixed, **point, **overrides, "protocol": spec.protocol}
        if "num_threads" not in {**spec.fixed, **overrides}:
            base["num_threads"] = max(1, math.floor(spec.resources.cpu))  # threads = the CPUs Tune gives a trial
        if spec.resources.gpu == 0 and "device" not in {**spec.fixed, **overrides}:
            base["device"] = "cpu"
        space = {}
        for name, param in order_space(spec.space).items():
            if name in overrides:
                continue
            fixed_view = {k: v for k, v in base.items() if k not in spec.space or k in overrides}
            if _condition_holds(param, fixed_view) is False:
                continue  # decided once for this study: the parameter does not exist here
            space[name] = param
        for name in space:
            base.pop(name, None)
        make_config(base)  # every study's fixed part must be a valid config on its own
        studies.append(Study(study_key(point), point, base, space))
    return studies


def define_space(trial: Any, space: dict[str, Param], base: dict[str, Any]) -> dict[str, Any]:
    """Optuna define-by-run space (module level: the searcher is pickled). Returns the fixed fields."""
    values: dict[str, Any] = {}
    for name, param in space.items():
        if _condition_holds(param, {**base, **values}) is False:
            continue
        if param.choice is not None:
            values[name] = trial.suggest_categorical(name, list(param.choice))
        elif param.uniform is not None:
            values[name] = trial.suggest_float(name, *param.uniform)
        elif param.loguniform is not None:
            values[name] = trial.suggest_float(name, *param.loguniform, log=True)
        else:
            values[name] = trial.suggest_int(name, *param.int, step=param.step or 1)
    return dict(base)


def _contains(param: Param, value: Any) -> bool:
    if param.choice is not None:
        return value in param.choice
    low, high = param.uniform or param.loguniform or param.int
    if not isinstance(value, (int, float)) or not low <= value <= high:
        return False
    return param.int is None or (value - low) % (param.step or 1) == 0


def baseline_point(space: dict[str, Param], base: dict[str, Any]) -> dict[str, Any]:
    """The seed's recipe for every searched field whose space contains it; the rest is sampled."""
    point: dict[str, Any] = {}
    for name, param in space.items():
        if _condition_holds(param, {**base, **point}) is False:
            continue
        if _contains(param, FIELD_DEFAULTS[name]):
            point[name] = FIELD_DEFAULTS[name]
    return point


def grid_points(spec: SearchSpec, study: Study) -> list[dict[str, Any]]:
    """Every combination of `studies` values and `choice` values; `when` drops a parameter where it fails."""
    names = list(spec.studies) + [n for n in study.space]
    lists = [spec.studies[n] for n in spec.studies] + [study.space[n].choice for n in study.space]
    points, seen = [], set()
    for combo in itertools.product(*lists):
        point = dict(zip(names, combo))
        for name, param in study.space.items():
            if _condition_holds(param, {**study.base, **point}) is False:
                point.pop(name)
        frozen = json.dumps(point, sort_keys=True, default=str)
        if frozen not in seen:
            seen.add(frozen)
            points.append(point)
    return points


def make_searcher(spec: SearchSpec, study: Study) -> tune.search.Searcher:
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
    return OptunaSearch(
        space=functools.partial(define_space, space=study.space, base=study.base),
        metric=spec.objective.metric,
        mode=spec.objective.mode,
        sampler=sampler,
        points_to_evaluate=points or None,
    )


def make_scheduler(spec: SearchSpec, study: Study) -> tune.schedulers.TrialScheduler:
    if spec.scheduler.type == "fifo":
        return tune.schedulers.FIFOScheduler()
    max_epochs = study.base.get("num_epochs")
    if max_epochs is None:  # num_epochs itself is searched: the largest budget it can take
        param = study.space["num_epochs"]
        max_epochs = max(param.choice) if param.choice is not None else param.int[1]
    return tune.schedulers.ASHAScheduler(
        time_attr="training_iteration",
        metric=spec.objective.metric,
        mode=spec.objective.mode,
        max_t=int(max_epochs),
        grace_period=spec.scheduler.grace_period,
        reduction_factor=spec.scheduler.reduction_factor,
    )


def check_resources(spec: SearchSpec) -> None:
    """A trial that asks for more than any one node has waits forever in Ray: refuse it up front."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    for key, asked in (("cpu", spec.resources.cpu), ("gpu", spec.resources.gpu)):
        largest = max((n.get(key.upper(), 0.0) for n in nodes), default=0.0)
        if asked > largest:
            raise SpecError(
                f"resources.{key} = {asked}: no node of this Ray cluster has that many "
                f"(largest: {largest:g} {key.upper()}s); allowed: at most {largest:g}"
            )


def prepare_data(studies: list[Study]) -> None:
    """Prepare every dataset a study reads, in the driver, before any trial starts (under a file lock)."""
    seen = set()
    for study in studies:
        cfg = make_config(study.base) if "data_name" in study.base else None
        if cfg is None:
            raise SpecError("space.data_name: the dataset is not searchable; list it under studies")
        key = (cfg.data_name, cfg.data_path, cfg.cache_dir, cfg.dataset_seed)
        if key not in seen:
            seen.add(key)
            DATASETS[cfg.data_name](cfg)


class TrialLines(tune.Callback):
    """One readable line per finished trial and the best so far (Ray's own tables stay quiet)."""

    def __init__(self, spec: SearchSpec, study: Study, total: int):
        self.metric, self.mode, self.total = spec.objective.metric, spec.objective.mode, total
        self.names = list(study.space)
        self.done = 0
        self.best: Optional[tuple[float, str]] = None

    def _line(self, trial: Any, state: str) -> None:
        self.done += 1
        result = trial.last_result or {}
        epochs = result.get("training_iteration", 0)
        planned = trial.config.get("num_epochs", "?")
        score = result.get(self.metric)
        if score is not None and state != "errored":
            better = self.best is None or (score > self.best[0] if self.mode == "max" else score < self.best[0])
            if better:
                self.best = (score, trial.trial_id)
        if state == "finished" and isinstance(planned, int) and epochs < planned:
            state = "stopped early"
        params = " ".join(f"{n}={_short(trial.config.get(n))}" for n in self.names if n in trial.config)
        if state == "errored":
            params += f" | {_error_summary(trial)}"
        shown = f"{score:.4f}" if score is not None else "-"
        best = f"best {self.best[0]:.4f} ({self.best[1]})" if self.best else "best -"
        print(
            f"[{self.done}/{self.total}] trial {trial.trial_id} {state:<13} epochs {epochs}/{planned} "
            f"{self.metric} {shown} | {params} | {best}",
            flush=True,
        )

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._line(trial, "finished")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._line(trial, "errored")


def _error_summary(trial: Any) -> str:
    """The last line of the trial's error (its full traceback stays in the trial folder)."""
    path = getattr(trial, "error_file", None)
    if path and Path(path).is_file():
        lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
        return (lines[-1] if lines else "error") + f" (see {path})"
    return "error (see the trial folder)"


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def run_study(spec: SearchSpec, study: Study, storage: Path, verbose: bool) -> tune.ResultGrid:
    from tune_upl.trainable import train_trial

    grid = spec.searcher.type == "grid"
    trainable = tune.with_resources(train_trial, {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})
    if grid:
        points = grid_points(spec, study)
        param_space = dict(study.base)
        for name in spec.studies:
            param_space.pop(name, None)
        searcher = tune.search.BasicVariantGenerator(points_to_evaluate=points * spec.num_samples)
        num_samples = len(points) * spec.num_samples
    else:
        param_space, searcher, num_samples = {}, make_searcher(spec, study), spec.num_samples
    metric = spec.objective.metric
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=make_scheduler(spec, study),
            num_samples=num_samples,
            max_concurrent_trials=spec.max_concurrent,
            trial_dirname_creator=lambda trial: trial.trial_id,
        ),
        run_config=tune.RunConfig(
            name=study.key,
            storage_path=str(storage),
            verbose=2 if verbose else 0,
            callbacks=[TrialLines(spec, study, num_samples)],
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=1,  # the best by the objective; Ray also keeps the latest, for restarts
                checkpoint_score_attribute=metric,
                checkpoint_score_order=spec.objective.mode,
            ),
        ),
    )
    return tuner.fit()


def select_and_test(spec: SearchSpec, results: tune.ResultGrid, folder: Path, group: dict[str, Any]) -> dict:
    """Pick the trial with the best objective over its epochs (validation classes unless protocol seed),
    restore its best checkpoint and evaluate it once on the test classes. Written to `folder/FINAL_FILE`."""
    from tune_upl.engine import build_run, final_test, load_state
    from tune_upl.trainable import CHECKPOINT_FILE

    metric, mode = spec.objective.metric, spec.objective.mode
    candidates = [
        r for r in results if r.metrics_dataframe is not None and metric in r.metrics_dataframe
        and all(r.config.get(k) == v for k, v in group.items())
    ]
    if not candidates:
        raise RuntimeError(f"no trial of {folder.name} reported {metric}; see the trial errors in {folder}")
    pick = max if mode == "max" else min
    best = pick(candidates, key=lambda r: pick(r.metrics_dataframe[metric]))
    checkpoint = best.get_best_checkpoint(metric, mode)
    frame = best.metrics_dataframe
    best_row = frame.loc[frame[metric].idxmax() if mode == "max" else frame[metric].idxmin()]
    if spec.protocol == "seed":  # the seed's protocol: the test metrics of the test-selected epoch
        test = {k: float(best_row[k]) for k in frame.columns if k.startswith("test_")}
    else:
        run = build_run(make_config(best.config))
        with checkpoint.as_directory() as ckpt:
            run.load_state_dict(load_state(Path(ckpt) / CHECKPOINT_FILE))
        test = final_test(run)
    record = {
        "group": group,
        "trial_id": best.metrics["trial_id"],
        "epoch": int(best_row["training_iteration"]),
        "objective": {metric: float(best_row[metric])},
        "test": test,
        "test_selected": spec.protocol == "seed",
        "config": best.config,
        "evaluated_at": time.time(),
    }
    name = FINAL_FILE if not group else f"final_test-{study_key(group)}.json"
    _write_json(folder / name, record)
    return record


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def quiet_ray(verbose: bool) -> None:
    """Without --verbose, our one line per trial replaces Ray's boxes, tables and sync warnings."""
    if verbose:
        return
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the old reporter honours verbose=0 fully
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


def init_ray(address: Optional[str], verbose: bool) -> None:
    quiet_ray(verbose)
    if ray.is_initialized():
        return
    ray.init(
        address=address,
        include_dashboard=False,
        log_to_driver=verbose,
        logging_level="INFO" if verbose else "WARNING",
        configure_logging=True,
    )


def run_search(
    spec: SearchSpec,
    overrides: dict[str, Any],
    storage: Path,
    verbose: bool = False,
    address: Optional[str] = None,
) -> Path:
    """Run every study of the spec and test each selection; returns the experiment folder."""
    studies = plan_studies(spec, overrides)
    prepare_data(studies)
    init_ray(address, verbose)
    check_resources(spec)
    experiment = storage / spec.name
    if experiment.exists() and any(experiment.iterdir()):
        kept = experiment.with_name(f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(experiment.stat().st_mtime))}")
        experiment.rename(kept)
        print(f"an earlier experiment {spec.name} was moved to {kept} (nothing is deleted)", flush=True)
    experiment.mkdir(parents=True, exist_ok=True)
    baselines = {s.key: baseline_point(s.space, s.base) for s in studies} if spec.baseline else {}
    _write_json(experiment / SPEC_FILE,
                {"spec": spec.model_dump(mode="json"), "overrides": overrides, "baselines": baselines})
    if spec.searcher.type == "grid":
        grid_study = Study(GRID_STUDY, {}, studies[0].base, studies[0].space)
        print(f"grid: {len(grid_points(spec, grid_study)) * spec.num_samples} trials", flush=True)
        results = run_study(spec, grid_study, experiment, verbose)
        for point in spec.study_points():
            select_and_test(spec, results, experiment / GRID_STUDY, point)
        return experiment
    for index, study in enumerate(studies, 1):
        print(f"study {index}/{len(studies)} {study.key}: {spec.num_samples} trials, "
              f"{spec.searcher.type} + {spec.scheduler.type}, objective {spec.objective.metric} ({spec.objective.mode})",
              flush=True)
        results = run_study(spec, study, experiment, verbose)
        record = select_and_test(spec, results, experiment / study.key, {})
        shown = " ".join(f"R@{k.split('@')[1]} {v:.3f}" for k, v in record["test"].items() if "recall@" in k)
        print(f"selected trial {record['trial_id']} (epoch {record['epoch']}, "
              f"{spec.objective.metric} {record['objective'][spec.objective.metric]:.4f}); test: {shown}", flush=True)
    return experiment
