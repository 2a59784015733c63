"""Planning a search, apart from Ray: the studies a spec splits into, each study's space and fixed fields
(its paths made absolute), the define-by-run space the searcher samples, the baseline point (the seed's
recipe), the grid's points, and the final stage's runs (under `recipe_runs`, each study's recipe run config,
fixed here once). Also the driver's data preparation and weights fetching, which must happen before any
trial.

Nothing here imports Ray: `--dry-run`, the benchmarks and the tests plan without starting it. The
distributions and the `when` rule are `spec.Param`'s.
"""
from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from tune_upl.config import FIELD_DEFAULTS, Paths, TrialConfig, make_config
from tune_upl.errors import ConfigError, SpecError
from tune_upl.layout import study_key
from tune_upl.ray_private import asha_rung_epochs
from tune_upl.spec import Param, SearchSpec, grace_period_problem, loss_combination_problem


@dataclass(frozen=True)
class Study:
    """One independent search: its folder name, the `studies` values and the fields it holds fixed."""

    key: str
    point: dict[str, Any]
    base: dict[str, Any]
    space: dict[str, Param] = field(default_factory=dict)
    # `recipe_runs`: the config of its recipe runs (`recipe_config`), fixed when the search is planned
    recipe: Optional[dict[str, Any]] = None


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


def plan_studies(spec: SearchSpec, overrides: dict[str, Any], paths: Paths = Paths()) -> list[Study]:
    """Split the spec into studies; command-line overrides fix a field and take it out of the space.

    Each study's paths are its own: a `studies` value over `fixed` over the driver's defaults, a
    command-line override over all, then made absolute by `paths`. A `when` on a field that is not
    searched is decided here, once per study.
    """
    merged = [name for name in overrides if name in spec.studies]
    if merged:  # every study would hold the same value: they would be one study, searched several times
        raise SpecError(f"--{merged[0]} {overrides[merged[0]]}: {merged[0]} is listed under studies (one study per "
                        f"value: {', '.join(map(str, spec.studies[merged[0]]))}); drop the option, or remove "
                        f"{merged[0]} from studies to give every trial this value")
    studies: list[Study] = []
    for point in spec.study_points():
        base = {**FIELD_DEFAULTS, **paths.apply({**spec.fixed, **point, **overrides}), "protocol": spec.protocol}
        if "num_threads" not in {**spec.fixed, **overrides}:
            base["num_threads"] = max(1, math.floor(spec.resources.cpu))  # threads = the CPUs Tune gives a trial
        if spec.resources.gpu == 0 and "device" not in {**spec.fixed, **overrides}:
            base["device"] = "cpu"
        space = {}
        for name, param in order_space(spec.space).items():
            if name in overrides:
                continue
            fixed_view = {k: v for k, v in base.items() if k not in spec.space or k in overrides}
            if param.holds(fixed_view) is False:
                continue  # decided once for this study: the parameter does not exist here
            space[name] = param
        where = {**dict.fromkeys(spec.fixed, "fixed"), **dict.fromkeys(point, "studies"),
                 **dict.fromkeys(overrides, "command line")}
        problem = loss_combination_problem({**spec.fixed, **point, **overrides}, space, where)
        if problem:  # the spec's own combinations were refused on loading; these involve the command line
            raise SpecError(problem)
        for name in space:
            base.pop(name, None)
        problem = grace_period_problem(spec.scheduler, max_epochs(base, space), study_key(point))
        if problem:  # a command-line num_epochs shorter than the spec's grace period
            raise SpecError(problem)
        base.update(checkpoint_plan(spec, base, space, {**spec.fixed, **point, **overrides}))
        cfg = make_config(base)  # every study's fixed part must be a valid config on its own
        problem = objective_problem(spec.objective.metric, cfg, study_key(point), "recalls" in space,
                                    bool(base.get("recalls")))
        if problem:  # the dataset's own Recall@K columns may lack the objective's k
            raise SpecError(problem)
        recipe = (recipe_config(base, {*spec.fixed, *point, *overrides},
                                published_recipe(base["loss_name"], base["backbone_type"]), study_key(point))
                  if spec.recipe_runs else None)
        study = Study(study_key(point), point, base, space, recipe)
        twin = next((s for s in studies if same_study(make_config(s.base), cfg, point)), None)
        if twin is not None:
            raise SpecError(f"studies: {twin.key} and {study.key} are the same study (equal once validated and paths "
                            f"made absolute: {', '.join(f'{n}={getattr(cfg, n)!r}' for n in point)}); list each "
                            "value once")
        if study.key in {s.key for s in studies}:  # distinct values that print alike (1 and "1" for a string)
            raise SpecError(f"studies: two studies are named {study.key}; give their values distinct spellings")
        studies.append(study)
    return studies


def objective_problem(metric: str, cfg: TrialConfig, key: str, searched: bool, chosen: bool) -> Optional[str]:
    """Why a study would never report its objective (a Recall@K whose k its `recalls` lack: each dataset has its
    own columns, SOP's 1, 10, 100, 1000), or None."""
    found = re.fullmatch(r"(?:val|test)_recall@(\d+)", metric)
    if found is None or searched or int(found.group(1)) in cfg.recalls:
        return None
    study = f"study {key}" if key else "the study"
    given = "its recalls" if chosen else f"data_name {cfg.data_name}'s Recall@K columns"
    return (f"objective.metric = {metric!r}: {study} reports Recall@{','.join(map(str, cfg.recalls))} ({given}); "
            f"allowed: one of those, or recalls under fixed including {found.group(1)}")


def same_study(one: TrialConfig, other: TrialConfig, point: dict[str, Any]) -> bool:
    """Whether two studies' validated configs hold the same value for every `studies` field."""
    return all(getattr(one, name) == getattr(other, name) for name in point)


def max_epochs(base: dict[str, Any], space: dict[str, Param]) -> int:
    """A study's longest trial: its `num_epochs`, or the largest a searched `num_epochs` can take (ASHA's max_t)."""
    return int(base["num_epochs"] if "num_epochs" not in space else space["num_epochs"].largest())


def rung_epochs(grace_period: int, reduction_factor: float, max_t: int) -> tuple[int, ...]:
    """The epochs at which the study's ASHA (one bracket) may stop a trial, below max_t: Ray's own rung
    arithmetic (`ray_private.asha_rung_epochs`), so a trial stopped there keeps its state."""
    return asha_rung_epochs(grace_period, reduction_factor, max_t)


def checkpoint_plan(spec: SearchSpec, base: dict[str, Any], space: dict[str, Param],
                    given: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint fields the driver sets for a study's trials, unless the spec or command line gives them:
    ASHA's rung epochs (a trial stopped there keeps its state), and under protocol seed the objective, whose
    every new best epoch is checkpointed (retrieve loads the selected epoch's model)."""
    plan: dict[str, Any] = {}
    if spec.scheduler.type == "asha" and "checkpoint_epochs" not in {**given, **space}:
        max_t = max_epochs(base, space)
        plan["checkpoint_epochs"] = rung_epochs(spec.scheduler.grace_period, spec.scheduler.reduction_factor, max_t)
    if spec.protocol == "seed" and "checkpoint_best" not in {**given, **space}:
        plan["checkpoint_best"] = spec.objective.metric + (":min" if spec.objective.mode == "min" else "")
    return plan


def suggest_config(trial: Any, space: dict[str, Param], base: dict[str, Any]) -> dict[str, Any]:
    """A trial's config from an Optuna trial (ask/tell): the study's fixed fields and a value for each
    searched field whose `when` holds, sampled in the space's order (a `when` sees what came before)."""
    values: dict[str, Any] = {}
    for name, param in space.items():
        if param.holds({**base, **values}) is not False:
            values[name] = param.suggest(trial, name)
    return {**base, **values}


def baseline_point(space: dict[str, Param], base: dict[str, Any]) -> dict[str, Any]:
    """The study's first trial: its loss's published recipe (`references.recipe`, the paper's or official
    code's settings; a ViT's training settings from its backbone's recipe, unless backbone_type is searched),
    so the search's gain over it is tuning gain. A searched field takes the recipe's value
    where its range holds it, the seed's (`FIELD_DEFAULTS`) where the recipe states none; a recipe value
    outside the range is sampled (the seed's would pass for the loss's own). balanced_proxy's recipe is the
    seed's. When `loss_name` is itself searched the study has no one loss: every field takes the seed's
    value, and `loss_name` the seed's loss where its choices hold it (whose recipe that is)."""
    from tune_upl.references import recipe  # read only for a baseline

    backbone = None if "backbone_type" in space else base.get("backbone_type", FIELD_DEFAULTS["backbone_type"])
    published = {} if "loss_name" in space else recipe(base.get("loss_name", FIELD_DEFAULTS["loss_name"]), backbone)
    point: dict[str, Any] = {}
    for name, param in space.items():
        if param.holds({**base, **point}) is False:
            continue
        value = published.get(name, FIELD_DEFAULTS[name])
        if param.contains(value):
            point[name] = value
    return point


def grid_points(study: Study) -> list[dict[str, Any]]:
    """Every combination of the study's `choice` values; `when` drops a parameter where it fails."""
    names = list(study.space)
    points, seen = [], set()
    for combo in itertools.product(*(study.space[n].choice for n in names)):
        point = dict(zip(names, combo))
        for name, param in study.space.items():
            if param.holds({**study.base, **point}) is False:
                point.pop(name)
        frozen = json.dumps(point, sort_keys=True, default=str)
        if frozen not in seen:
            seen.add(frozen)
            points.append(point)
    return points


def backbone_recipe_departures(study: Study) -> dict[str, tuple[Any, Any]]:
    """A study's fields, neither searched nor its backbone recipe's value, that its backbone's training recipe
    (`backbone_recipes:` in references.yaml, every ViT's) states: field -> (the study's value, the recipe's).
    A ViT study that fixes none of them trains with the seed's CNN recipe (AdamP, StepLR, ...), which the plan
    then says in one line. Empty for a CNN, or where `backbone_type` is searched."""
    from tune_upl.references import load_backbone_recipes  # torch-free; read only to describe a plan

    if "backbone_type" in study.space:
        return {}
    entry = load_backbone_recipes().get(study.base["backbone_type"])
    if entry is None:
        return {}
    epochs = study.base["num_epochs"]
    same = lambda name, ours, theirs: (min(ours, epochs) == min(theirs, epochs) if name == "freeze_patch_embed"
                                       else ours == theirs)  # frozen throughout is frozen throughout
    return {name: (study.base[name], value) for name, value in entry.settings().items()
            if name not in study.space and not same(name, study.base[name], value)}


def published_recipe(loss_name: str, backbone_type: str) -> dict[str, Any]:
    """The loss's published recipe, with the backbone's training recipe where it has one (the ViTs), TrialConfig
    field -> value (`references.recipe`); a damaged `references.yaml` is one line."""
    from tune_upl.references import recipe  # read only under recipe_runs

    try:
        return dict(recipe(loss_name, backbone_type))
    except ConfigError as error:
        raise SpecError(f"recipe_runs: no recipe of {loss_name}: {error}") from None


def recipe_config(base: dict[str, Any], held: set[str], published: dict[str, Any], key: str) -> dict[str, Any]:
    """A study's recipe run: its fixed part `base`, and the loss's `published` recipe for every field it names
    that the study does not hold (`held`: its fixed, `studies` and command-line fields, so the recipe run differs
    from the selection only where the search chose), whether or not the searched range contains the value;
    every other searched field at the seed's default. Checked here, before anything runs."""
    config = {**base, **{name: value for name, value in published.items() if name not in held}}
    try:
        make_config({**config, "final": True})
    except ConfigError as error:
        raise SpecError(f"recipe_runs: the recipe of {base['loss_name']} (tune_upl/references.yaml) does not make a "
                        f"valid run of study {key}: {error}") from None
    return config


def final_runs(spec: SearchSpec) -> int:
    """A selected study's final runs: `final_seeds`, and as many recipe runs under `recipe_runs`; none under
    protocol seed."""
    return 0 if spec.protocol == "seed" else spec.final_seeds + recipe_runs(spec)


def recipe_runs(spec: SearchSpec) -> int:
    """A selected study's recipe runs (among its `final_runs`): one per final seed under `recipe_runs`."""
    return spec.final_seeds if spec.recipe_runs and spec.protocol == "val" else 0


def search_trials(spec: SearchSpec, study: Study) -> int:
    """How many search trials the study runs: `num_samples`, or under a grid `num_samples` runs of each of
    its points."""
    return len(grid_points(study)) * spec.num_samples if spec.searcher.type == "grid" else spec.num_samples


def prepare_data(studies: list[Study]) -> None:
    """Prepare every dataset a study reads, in the driver, before any trial starts (under a file lock)."""
    from tune_upl.prepare import DATA_FIELDS, prepare_dataset  # image decoding: loaded only to prepare

    seen = set()
    for study in studies:
        searched = [name for name in DATA_FIELDS if name in study.space]
        if searched:
            raise SpecError(f"space.{searched[0]}: the dataset is prepared before the trials start, so it "
                            "is not searchable; list it under studies")
        cfg = make_config(study.base)
        key = tuple(getattr(cfg, name) for name in DATA_FIELDS)
        if key not in seen:
            seen.add(key)
            prepared = prepare_dataset(cfg)
            if prepared.built:
                print(prepared.summary(cfg), flush=True)


def serial_loading(spec: SearchSpec, studies: list[Study]) -> list[str]:
    """One warning per study whose GPU trials get no loader worker (`resources.cpu` 1 leaves none under
    `num_workers: auto`): decoding then runs in series with each step. Said by the driver, before any trial,
    because a trial's own warnings reach only its Ray worker log."""
    from tune_upl.data import serial_loading_warning  # torch: loaded only by a driver about to run trials

    found = ((study, serial_loading_warning(make_config(study.base), spec.resources.gpu > 0)) for study in studies
             if "num_workers" not in study.space)
    return [f"warning: study {study.key}: {message}" for study, message in found if message]


def study_configs(study: Study) -> list[TrialConfig]:
    """The study's fixed part with every backbone_type and pretrained value its space may choose (all
    choices, whatever their `when`): what its trials can read."""
    choices = [[(name, value) for value in study.space[name].choice or ()]
               for name in ("backbone_type", "pretrained") if name in study.space and study.space[name].choice]
    return [make_config({**study.base, **dict(combo)}) for combo in itertools.product(*choices)]


def prepare_weights(studies: list[Study]) -> None:
    """Fetch every ImageNet weights file a study's trials read, in the driver, before any trial starts: one
    download per file, and offline one error naming every missing file instead of failing trials."""
    from tune_upl.weights import ensure_weights  # torch: loaded only to fetch

    ensure_weights([cfg for study in studies for cfg in study_configs(study)])
