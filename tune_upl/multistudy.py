"""Every study of a spec in one Ray Tune run: a searcher that keeps one Optuna study per study (and suggests
its final runs once it is selected), and a scheduler that keeps one ASHA (or FIFO) per study.

Why the composition is ours: Ray Tune runs one searcher and one scheduler per run, and does not support
several runs sharing a cluster (ray-project/ray#21329; Tune's FAQ on multi-tenancy). One Tuner per study,
one after another, leaves most of a GPU cluster idle (a study's `max_concurrent` trials at a time), and
raising `max_concurrent` instead weakens TPE. So all studies share one run, and what Tune asks of its
one searcher and its one scheduler is built here, thinly, on Tune's public `Searcher` and
`TrialScheduler`: Ray still places, runs, retries, checkpoints and resumes every trial.

- `StudySearcher` gives each free slot of the run (Tune's `max_concurrent_trials`, the spec's
  `max_concurrent_total`) to a study under its own `max_concurrent` with trials left, the one furthest
  behind its budget first. It asks that study's sampler (TPE, GP or random; under a grid, the study's
  points, queued in it once) through Optuna's ask/tell, on the study of that
  name in the experiment's SQLite `optuna.db` (browsable in optuna-dashboard), and tells it each epoch's
  objective and how each trial ended, COMPLETE, PRUNED or FAIL (`tune_upl.telling`): a trial's result
  reaches only its own study. When a study's last search trial has ended it selects among the study's
  trials that did not fail (`final.select_trials`, on the results it was told), writes
  `<study>/selection.json`, and suggests the `final_seeds` final runs (under `recipe_runs`, each seed's run
  of the study's recipe too: a final run marked `recipe`, `Study.recipe`'s config). Its saved state (Tune
  saves it with the experiment) is its bookkeeping and each study's sampler, whose random state must carry on: a
  sampler made again from the spec's seed would propose the study's first start-up points a second time.
  The Optuna studies (their trials) reload from SQLite on resume.
- `StudyRouter` sends each trial's results to its own study's ASHA (or FIFO); final runs are FIFO. Tune
  pickles the scheduler when the run starts, so after a resume every study's rungs start empty.

Each trial's config names its study (and a search trial its Optuna trial number, a warm-start trial its source,
queued after the baseline: `tune_upl.warm_start`): `layout.SEARCH_KEYS`,
which Tune keeps through a restore and writes to `params.json`, and the trainable drops.
"""
from __future__ import annotations

import collections
import contextlib
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import optuna
import pandas as pd
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

from tune_upl import signals, telling
from tune_upl.final import (
    Selection, final_param_space, final_seeds, recipe_param_space, save_selection, save_unselectable, select_trials,
)
from tune_upl.layout import (
    ERROR_KEY, FAULT_FLAGS, OPTUNA_FILE, OPTUNA_NUMBER_KEY, RECIPE_KEY, SELECTION_FILE, STUDY_KEY, UNSELECTABLE_FILE,
    WARM_START_KEY, faulted, trial_fields,
)
from tune_upl.planning import Study, baseline_point, final_runs, grid_points, max_epochs, search_trials, suggest_config
from tune_upl.spec import SearchSpec


def make_sampler(spec: SearchSpec) -> optuna.samplers.BaseSampler:
    """Optuna TPE (multivariate, grouped for `when` parameters, a constant liar for concurrent trials), a
    Gaussian-process sampler, or random sampling, seeded by the spec. A grid's points are queued in the
    study (`StudySearcher._open`): its sampler is never consulted."""
    if spec.searcher.type == "tpe":
        warnings.filterwarnings("ignore", message=".*group.*experimental", category=optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message=".*constant_liar.*experimental",
                                category=optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=spec.searcher.seed,
            n_startup_trials=spec.searcher.n_startup_trials,
            multivariate=True,
            group=True,  # conditional (`when`) parameters are modelled per group
            constant_liar=True,  # concurrent trials do not all propose the same point
        )
    if spec.searcher.type == "gp":
        # a Gaussian process over the parameters (categorical ones one-hot); it learns from COMPLETE trials
        # only (PRUNED ones are not in its data) and treats RUNNING ones as pending
        warnings.filterwarnings("ignore", message=".*GPSampler.*experimental", category=optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.GPSampler(seed=spec.searcher.seed, n_startup_trials=spec.searcher.n_startup_trials,
                                         warn_independent_sampling=False)
    return optuna.samplers.RandomSampler(seed=spec.searcher.seed)


def make_scheduler(spec: SearchSpec, study: Study) -> TrialScheduler:
    """One study's early stopping: ASHA on the objective up to the study's longest trial, or FIFO."""
    from ray.tune.schedulers import ASHAScheduler

    if spec.scheduler.type == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="training_iteration",
        metric=spec.objective.metric,
        mode=spec.objective.mode,
        max_t=max_epochs(study.base, study.space),  # planning's rung_epochs are this scheduler's
        grace_period=spec.scheduler.grace_period,
        reduction_factor=spec.scheduler.reduction_factor,
    )


@dataclass
class Entry:
    """One trial the searcher suggested: its study, its Optuna trial number (None for a final run), and once
    it ended, what its Optuna trial was told (state and value)."""

    study: str
    config: dict[str, Any]
    number: Optional[int] = None
    ended: bool = False
    told: Optional[tuple[optuna.trial.TrialState, Optional[float]]] = None
    recipe: bool = False  # a final run of the study's recipe (`recipe_runs`), not of its selection

    @property
    def final(self) -> bool:
        return self.number is None


@dataclass
class Book:
    """The searcher's saved state: what it suggested, what the trials reported, what it selected."""

    entries: dict[str, Entry] = field(default_factory=dict)  # Tune trial id -> entry
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # search trial id -> its reported epochs
    selections: dict[str, Selection] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # study -> why nothing could be selected
    created: set[str] = field(default_factory=set)  # studies whose Optuna study exists (baseline enqueued)
    samplers: dict[str, optuna.samplers.BaseSampler] = field(default_factory=dict)  # per study, random state kept


@dataclass(frozen=True)
class Session:
    """What the driver running the search has now: the experiment's local folder, the publisher of its files
    to remote storage, and the run's limit of trials at once (`max_concurrent_total`). `searchers` receives
    the searcher Tune runs with (made here, or unpickled by `Tuner.restore`), so the driver reads its
    decisions from it after the run."""

    experiment: Path
    publish: Optional[Callable[[str], None]]
    limit: int
    searchers: list["StudySearcher"] = field(default_factory=list, compare=False)


# Tune restores a run's searcher as it was pickled when the run began (`Tuner.restore` takes no search
# algorithm), with the first driver's folder, publisher and limit: a cloud experiment resumed on another
# machine (its local mirror elsewhere) would be written in the wrong place, and the room of a cluster
# grown or shrunk since ignored. A resuming driver states its own for the length of its fit (`resuming`);
# `StudySearcher.restore` takes them.
_resuming: list[Session] = []


@contextlib.contextmanager
def resuming(session: Session) -> Iterator[None]:
    _resuming.append(session)
    try:
        yield
    finally:
        _resuming.remove(session)


class StudySearcher(Searcher):
    """All studies' searches and final runs, for one Tune run (see the module's docstring). It says nothing:
    the progress callback (`search.TrialLines`, which Tune calls after the searcher) prints its decisions.

    No attribute is named `searcher`: Tune follows `.searcher` chains (wrappers) when it saves the search
    state and counts pending trials."""

    def __init__(self, spec: SearchSpec, studies: list[Study], session: Session,
                 warm: Optional[dict[str, tuple[str, list[dict[str, Any]]]]] = None):
        # no metric for Tune: it would refuse every result without it, and a final run reports none
        super().__init__(metric=None, mode=None)
        self._spec, self._studies = spec, list(studies)
        # per study key: the source its warm-start trials name, and their points (`tune_upl.warm_start`)
        self._warm = dict(warm or {})
        self._experiment, self._publish, self._limit = session.experiment, session.publish, session.limit
        self._searches = {s.key: search_trials(spec, s) for s in self._studies}  # each study's search trials
        self._book = Book()
        self._optuna: dict[str, optuna.Study] = {}  # opened on demand from SQLite, never pickled
        # after a restore: the trials Tune restored (`adopt`), and whether the book is yet to be reconciled
        # with them and with the Optuna studies (`_reconcile`, before anything else happens)
        self._restored: Optional[set[str]] = None
        session.searchers.append(self)

    def decisions(self) -> tuple[dict[str, Selection], dict[str, str]]:
        """Each selected study's selection, and why nothing could be selected in each failed study."""
        return dict(self._book.selections), dict(self._book.failed)

    def finals(self, key: str) -> int:
        """Final runs study `key` will have, its recipe runs included (`planning.final_runs`): none under protocol
        seed or when nothing could be selected."""
        return 0 if key in self._book.failed else final_runs(self._spec)

    # ------------------------------------------------------------ Tune's interface
    def set_max_concurrency(self, max_concurrent: int) -> bool:
        """Tune's `max_concurrent_trials` (the run's total): counted here, with each study's own limit."""
        self._limit = max_concurrent
        return True

    def suggest(self, trial_id: str) -> Optional[dict[str, Any]]:
        if signals.stopping():  # the run is stopping: nothing starts after the signal
            return None
        self._reconcile()
        live = [e for e in self._book.entries.values() if not e.ended]
        if len(live) >= self._limit:
            return None
        picked = self._next(collections.Counter(e.study for e in live))
        if picked is None:
            return Searcher.FINISHED if self._finished() else None
        study, final = picked
        if final:
            recipe, seed = self._next_final(study.key)
            config = recipe_param_space(study.recipe) if recipe else final_param_space(self._book.selections[study.key])
            entry = Entry(study.key, {**config, "seed": seed}, recipe=recipe)
            marks = {RECIPE_KEY: True} if recipe else {}
        else:
            trial = self._open(study).ask()
            entry = Entry(study.key, suggest_config(trial, study.space, study.base), trial.number)
            marks = {k: v for k, v in trial.user_attrs.items() if k == WARM_START_KEY}  # a warm-start point's source
            # remote storage gets every asked trial before Tune can save the entry: a resume elsewhere must not
            # hand this trial's number to another
            self._push(OPTUNA_FILE)
        self._book.entries[trial_id] = entry
        return {**entry.config, STUDY_KEY: study.key, **({} if final else {OPTUNA_NUMBER_KEY: entry.number}), **marks}

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        """Keep the epoch for selection; give Optuna its learning curve (the intermediate values TPE ranks
        pruned trials by, and optuna-dashboard draws), by trial number, so resumed trials' curves go on."""
        self._reconcile()
        entry = self._book.entries.get(trial_id)
        if entry is not None and not entry.final:
            self._book.rows.setdefault(trial_id, []).append(self._row(trial_id, result))
            self._report(entry, result)

    def on_trial_complete(self, trial_id: str, result: Optional[dict[str, Any]] = None, error: bool = False) -> None:
        self._reconcile()
        entry = self._book.entries.get(trial_id)
        if entry is None or entry.ended:  # a trial Tune resumed after it had ended (resume_errored)
            return
        entry.ended = True
        if not entry.final:
            if result:  # the result that made ASHA stop the trial reaches only this call
                self._book.rows.setdefault(trial_id, []).append(self._row(trial_id, result))
                self._report(entry, result)
            entry.told = telling.outcome(result, error, int(entry.config["num_epochs"]), self._spec.objective.metric)
            telling.tell(self._open(self._planned(entry.study)), entry.number, *entry.told)
            self._select_when_done(self._planned(entry.study))
            self._push(OPTUNA_FILE)  # a final run has no Optuna trial

    def _report(self, entry: Entry, result: dict[str, Any]) -> None:
        """An epoch's objective as its Optuna trial's intermediate value; not a fault's worst score."""
        if not faulted(result):
            telling.report(self._open(self._planned(entry.study)), entry.number,
                           result.get("training_iteration", 0), result.get(self._spec.objective.metric))

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as out:
            pickle.dump(self._book, out)

    def restore(self, checkpoint_path: str) -> None:
        """The bookkeeping and samplers as Tune saved them, with the resuming driver's folder, publisher and
        limit (`resuming`); reconciled with the trials Tune restores (`adopt`) before anything else."""
        with open(checkpoint_path, "rb") as source:
            self._book = pickle.load(source)
        self._attach()
        self._optuna = {}
        self._restored = set()

    def adopt(self, trial: Any) -> None:
        """A trial Tune restored (`StudyRouter.on_trial_add`). Its saved state and this searcher's are two
        files, saved one after the other: a driver killed between them (or while they were uploaded) leaves
        a trial this book never suggested (its config names its study and Optuna trial: it is taken in), one
        that reported an epoch after the book was saved (that epoch is kept, and told to Optuna), or one
        that ended after it (it ends here, with what it last reported)."""
        if self._restored is None:  # a new run: its trials come from `suggest`
            return
        tid, config = trial.trial_id, trial.config
        self._restored.add(tid)
        entry = self._book.entries.get(tid)
        if entry is None:
            if config.get(STUDY_KEY) not in {s.key for s in self._studies}:
                return
            entry = Entry(str(config[STUDY_KEY]), trial_fields(config), config.get(OPTUNA_NUMBER_KEY),
                          recipe=bool(config.get(RECIPE_KEY)))
            self._book.entries[tid] = entry
        result = dict(trial.last_result or {})
        if not entry.final and result.get("training_iteration"):  # an epoch reported after the book was saved
            rows = self._book.rows.setdefault(tid, [])
            if not rows or rows[-1]["training_iteration"] < result["training_iteration"]:
                rows.append(self._row(tid, result))
        if trial.status in ("TERMINATED", "ERROR") and not entry.ended:  # ended after the book was saved
            entry.ended = True
            if not entry.final:
                entry.told = telling.outcome(result, trial.status == "ERROR", int(entry.config["num_epochs"]),
                                             self._spec.objective.metric)

    def _reconcile(self) -> None:
        """After a restore, once Tune has added every trial it restored: a trial the book knows and Tune
        does not (saved after Tune's state) never ended, so it is forgotten and its slot suggested again.
        An Optuna trial no Tune trial holds (asked after the last save) is marked failed, so TPE's constant
        liar stops counting it (a grid's point is queued again); what the book knows and the Optuna study
        lacks (told after its file last reached remote storage) is told again. A study whose last trial
        ended just before the interruption is selected now."""
        if self._restored is None:
            return
        restored, self._restored = self._restored, None
        for tid in [t for t, e in self._book.entries.items() if not e.ended and t not in restored]:
            del self._book.entries[tid]
            self._book.rows.pop(tid, None)
        for study in self._studies:
            if study.key in self._book.created:
                mine = {tid: e for tid, e in self._book.entries.items() if e.study == study.key and not e.final}
                known = {e.number for e in mine.values()}
                opened = self._open(study)
                for trial in opened.get_trials(deepcopy=False, states=[optuna.trial.TrialState.RUNNING]):
                    if trial.number not in known:
                        opened.tell(trial.number, state=optuna.trial.TrialState.FAIL)
                        if self._spec.searcher.type == "grid":
                            opened.enqueue_trial(trial.system_attrs.get("fixed_params", trial.params))
                for tid, entry in mine.items():
                    telling.catch_up(opened, entry.number, self._book.rows.get(tid, []),
                                     self._spec.objective.metric, entry.told)
        self._push(OPTUNA_FILE)
        for study in self._studies:
            self._select_when_done(study)

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__ | {"_optuna": {}, "_restored": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickled by `Tuner.restore` (from the run's `tuner.pkl`), inside the resuming driver's session."""
        self.__dict__.update(state)
        self.__dict__.setdefault("_warm", {})  # pickled before warm starts existed
        self._attach()

    def _attach(self) -> None:
        """Take the resuming driver's folder, publisher and limit, and give it this searcher (`resuming`)."""
        if _resuming:
            now = _resuming[-1]
            self._experiment, self._publish, self._limit = now.experiment, now.publish, now.limit
            if self not in now.searchers:
                now.searchers.append(self)

    def _planned(self, key: str) -> Study:
        return next(s for s in self._studies if s.key == key)

    # ------------------------------------------------------------ what to run next
    def _started(self, key: str, final: bool) -> int:
        return sum(1 for e in self._book.entries.values() if e.study == key and e.final == final)

    def _next_final(self, key: str) -> tuple[bool, int]:
        """The study's next final run: (whether a recipe run, its seed), the first of its plan no entry holds. The
        plan pairs each final seed's run of the selection with its recipe run (`recipe_runs`), so a stage cut
        short still has pairs; a run Tune lost on a resume is suggested again, a finished one never."""
        kinds = (False, True) if self._spec.recipe_runs else (False,)
        plan = [(recipe, seed) for seed in final_seeds(self._spec, self._book.selections[key]) for recipe in kinds]
        taken = {(e.recipe, int(e.config["seed"])) for e in self._book.entries.values() if e.study == key and e.final}
        return next(run for run in plan if run not in taken)

    def _next(self, running: collections.Counter) -> Optional[tuple[Study, bool]]:
        """The study that gets the free slot (and whether for a final run): under its own max_concurrent,
        with a trial it can start now, the furthest behind its budget first (then the spec's order)."""
        ready = []
        for order, study in enumerate(self._studies):
            if running[study.key] >= self._spec.max_concurrent:
                continue
            searched, finals = self._started(study.key, final=False), self._started(study.key, final=True)
            if searched < self._searches[study.key]:
                final = False
            elif study.key in self._book.selections and finals < self.finals(study.key):
                final = True
            else:
                continue
            budget = self._searches[study.key] + self.finals(study.key)
            ready.append(((searched + finals) / budget, order, study, final))
        return min(ready, key=lambda r: r[:2])[2:] if ready else None

    def _finished(self) -> bool:
        """Nothing left to suggest, ever: every study selected (or failed to) and its final runs started. Not
        sooner: Tune stops asking once told so."""
        return all((study.key in self._book.selections or study.key in self._book.failed)
                   and self._started(study.key, final=True) >= self.finals(study.key) for study in self._studies)

    # ------------------------------------------------------------ Optuna
    def _open(self, study: Study) -> optuna.Study:
        """The study's Optuna study in the experiment's SQLite file, with its sampler as last saved; the first
        time, with its baseline queued, or under a grid every point `num_samples` times (a resumed run finds
        them there and does not queue them again)."""
        if study.key not in self._optuna:
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            if study.key not in self._book.samplers:
                self._book.samplers[study.key] = make_sampler(self._spec)
            opened = optuna.create_study(
                storage=f"sqlite:///{self._experiment / OPTUNA_FILE}", study_name=study.key, load_if_exists=True,
                sampler=self._book.samplers[study.key],
                direction="maximize" if self._spec.objective.mode == "max" else "minimize",
            )
            if study.key not in self._book.created:
                if not opened.trials:  # a study found with trials has had its points queued
                    for point, attrs in self._queued(study):
                        opened.enqueue_trial(point, user_attrs=attrs)
                self._book.created.add(study.key)
            self._optuna[study.key] = opened
        return self._optuna[study.key]

    def _queued(self, study: Study) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """What a new Optuna study is given to run first, each point with the user attributes of its Optuna
        trial: a grid's points `num_samples` times, or the baseline and then the warm-start points, each of
        those naming its source (`WARM_START_KEY`, which the trial's config then carries)."""
        if self._spec.searcher.type == "grid":
            return [(point, {}) for point in grid_points(study) * self._spec.num_samples]
        source, points = self._warm.get(study.key, ("", []))
        return ([(baseline_point(study.space, study.base), {})] if self._spec.baseline else []) + [
            (dict(point), {WARM_START_KEY: source}) for point in points]

    # ------------------------------------------------------------ selection
    def _row(self, trial_id: str, result: dict[str, Any]) -> dict[str, Any]:
        keep = {k: v for k, v in result.items()
                if k in (self._spec.objective.metric, ERROR_KEY, *FAULT_FLAGS) or k.startswith("test_")}
        return {"trial_id": trial_id, "training_iteration": result.get("training_iteration", 0), **keep}

    def _select_when_done(self, study: Study) -> None:
        """Once the study's last search trial has ended: select among its trials that did not fail and save
        `selection.json` (the progress callback says so)."""
        key = study.key
        mine = {tid: e for tid, e in self._book.entries.items() if e.study == key and not e.final}
        if (key in self._book.selections or key in self._book.failed or len(mine) < self._searches[key]
                or not all(e.ended for e in mine.values())):
            return
        good = {tid: e for tid, e in mine.items() if e.told is None or e.told[0] != optuna.trial.TrialState.FAIL}
        trials = [(e.config, pd.DataFrame(self._book.rows.get(tid, []))) for tid, e in good.items()]
        try:
            selection = select_trials(self._spec, trials, key, study.point, failed=len(mine) - len(good))
        except RuntimeError as nothing:
            if signals.stopping():
                return
            self._book.failed[key] = str(nothing)
            save_unselectable(key, str(nothing), self._experiment / key)
            self._push(f"{key}/{UNSELECTABLE_FILE}")
            return
        if signals.stopping():  # the signal came while selecting: the resumed run selects (`restore`)
            return
        self._book.selections[key] = selection
        save_selection(selection, self._experiment / key)
        self._push(f"{key}/{SELECTION_FILE}")

    def _push(self, relative: str) -> None:
        if self._publish is not None:
            self._publish(relative)


class StudyRouter(FIFOScheduler):
    """Each trial's results go to its own study's scheduler (ASHA or FIFO); final runs are FIFO. Which
    trial runs next is FIFO over all studies: the searcher already chose the order."""

    def __init__(self, spec: SearchSpec, studies: list[Study], searcher: Optional[StudySearcher] = None):
        super().__init__()
        self._studies, self._searcher = list(studies), searcher  # the searcher: told of restored trials
        self._routes = {study.key: make_scheduler(spec, study) for study in studies}
        self._finals = FIFOScheduler()

    def _route(self, trial: Any) -> TrialScheduler:
        if trial.config.get("final"):
            return self._finals
        return self._routes[trial.config[STUDY_KEY]]

    def set_search_properties(self, metric: Optional[str], mode: Optional[str], **spec: Any) -> bool:
        return metric is None and mode is None  # each study's scheduler has the objective already

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        if self._searcher is not None:
            self._searcher.adopt(trial)
        self._route(trial).on_trial_add(tune_controller, trial)

    def on_trial_error(self, tune_controller: Any, trial: Any) -> None:
        self._route(trial).on_trial_error(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        return self._route(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> None:
        self._route(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        self._route(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return "\n".join(f"{key}: {route.debug_string()}" for key, route in self._routes.items())
