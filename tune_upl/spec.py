"""Search specs: the YAML schema, its validation and loading.

A spec says what to search (`space`), what to hold (`fixed`), what splits the work into separate
studies (`studies`), how to pick and stop trials (`searcher`, `scheduler`) and on what (`objective`).
Every key is validated before Ray starts; a mistake is reported as one line naming its key path, the
bad value and what is allowed.
"""
from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from typing_extensions import Annotated

from tune_upl.config import (
    FIELD_DEFAULTS,
    FIELD_NAMES,
    LOSS_SPECIFIC,
    backbone_field_problem,
    backbones_taking,
    loss_field_problem,
    losses_taking,
    unknown_field_message,
    validate_field,
)
from tune_upl.errors import ConfigError, SpecError
from tune_upl.facts import FAMILY_FIELDS
from tune_upl.layout import NAME_PATTERN, study_key

METRIC_PATTERN = re.compile(r"^(val|test)_(recall@[1-9][0-9]*|map@r|r_precision)$")
DISTRIBUTIONS = ("choice", "uniform", "loguniform", "int")
Number = Union[int, float]
Integer = int  # `Param` has a field named int, which shadows the builtin inside its body



class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Objective(_Strict):
    metric: str = "val_recall@1"
    mode: Literal["max", "min"] = "max"

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        if not METRIC_PATTERN.match(value):
            raise ValueError(
                f"unknown metric {value!r}; allowed: val_recall@K, val_map@r, val_r_precision (or test_ under protocol seed)"
            )
        return value


class Searcher(_Strict):
    # gp: the sampler comparison's rule (docs/benchmarks.md, the search suite) picks it
    type: Literal["tpe", "gp", "random", "grid"] = "gp"
    seed: Annotated[int, Field(ge=0)] = 0
    n_startup_trials: Annotated[int, Field(ge=0)] = 10  # TPE's or GP's random trials before it models


class Scheduler(_Strict):
    type: Literal["asha", "fifo"] = "asha"
    grace_period: Annotated[int, Field(ge=1)] = 1  # epochs before ASHA may stop a trial
    reduction_factor: Annotated[float, Field(gt=1)] = 2


class Resources(_Strict):
    cpu: Annotated[float, Field(gt=0)] = 1
    gpu: Annotated[float, Field(ge=0)] = 0  # a fraction packs trials onto one GPU; no trial uses several

    @field_validator("gpu")
    @classmethod
    def _one_gpu_at_most(cls, value: float) -> float:
        if value > 1:
            raise ValueError("one GPU per trial at most (a trial trains on one GPU); allowed: 0 to 1, "
                             "a fraction such as 0.5 packs several trials onto one GPU")
        return value


class WarmStart(_Strict):
    """A finished experiment whose best completed trials each new study runs first, after its baseline
    (`tune_upl.warm_start`), so that a search does not start cold where a similar one has ended."""

    experiment: str  # its name in the same storage, or an absolute path to its folder
    k: Annotated[int, Field(ge=1)]  # trials taken per study: the source study's k best completed ones

    @field_validator("experiment")
    @classmethod
    def _name_or_path(cls, value: str) -> str:
        if value.startswith("/") or re.match(NAME_PATTERN, value):
            return value
        raise ValueError("allowed: a finished experiment's name in the same storage (letters, digits, _ . -, as "
                         "under --name) or an absolute path to its folder")


class Param(_Strict):
    """One searched field: exactly one distribution, an optional `step` (int only) and `when`."""

    choice: Optional[list[Any]] = None
    uniform: Optional[tuple[Number, Number]] = None
    loguniform: Optional[tuple[Number, Number]] = None
    int: Optional[tuple[Integer, Integer]] = None
    step: Optional[Annotated[Integer, Field(ge=1)]] = None
    when: Optional[dict[str, list[Any]]] = None

    @model_validator(mode="after")
    def _one_distribution(self) -> "Param":
        given = [name for name in DISTRIBUTIONS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one distribution of {', '.join(DISTRIBUTIONS)}; got {given or 'none'}")
        if self.choice is not None and not self.choice:
            raise ValueError("choice must list at least one value")
        bounds = self.uniform or self.loguniform or self.int
        if bounds is not None and bounds[0] >= bounds[1]:
            raise ValueError(f"low must be below high, got [{bounds[0]}, {bounds[1]}]")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform needs low > 0, got {self.loguniform[0]}")
        if self.step is not None and self.int is None:
            raise ValueError("step goes with int only")
        if self.when is not None and (not self.when or any(not v for v in self.when.values())):
            raise ValueError("when must map a field to a non-empty list of values")
        return self

    @property
    def kind(self) -> str:
        return next(name for name in DISTRIBUTIONS if getattr(self, name) is not None)

    # The one place that maps a spec entry to Optuna: sampling, the distribution and containment.
    def distribution(self) -> Any:
        """The Optuna distribution this entry samples from (the searcher's and the importance study's)."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.choice is not None:
            return CategoricalDistribution(list(self.choice))
        if self.int is not None:
            return IntDistribution(*self.int, step=self.step or 1)
        return FloatDistribution(*(self.uniform or self.loguniform), log=self.loguniform is not None)

    def suggest(self, trial: Any, name: str) -> Any:
        """Sample this field in an Optuna define-by-run trial."""
        if self.choice is not None:
            return trial.suggest_categorical(name, list(self.choice))
        if self.int is not None:
            return trial.suggest_int(name, *self.int, step=self.step or 1)
        return trial.suggest_float(name, *(self.uniform or self.loguniform), log=self.loguniform is not None)

    def contains(self, value: Any) -> bool:
        """Whether `value` is a point of this entry (a choice, or within the bounds on the int step)."""
        if self.choice is not None:
            return value in self.choice
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        low, high = self.uniform or self.loguniform or self.int
        return low <= value <= high and (self.int is None or (value - low) % (self.step or 1) == 0)

    def largest(self) -> Any:
        """The largest value this entry can take (e.g. the longest `num_epochs` a study can run)."""
        return max(self.choice) if self.choice is not None else (self.uniform or self.loguniform or self.int)[1]

    def holds(self, values: dict[str, Any]) -> Optional[bool]:
        """Whether this field exists for `values` by its `when`: True/False once every field `when` names is
        known in `values`, None while one is still open."""
        for other, allowed in (self.when or {}).items():
            if other not in values:
                return None
            if values[other] not in allowed:
                return False
        return True

    def values_to_check(self) -> list[Any]:
        """Values that must be legal for the field: every choice, or both bounds."""
        if self.choice is not None:
            return list(self.choice)
        return list(self.uniform or self.loguniform or self.int)


class SearchSpec(_Strict):
    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    objective: Objective = Objective()
    searcher: Searcher = Searcher()
    scheduler: Scheduler = Scheduler()
    num_samples: Annotated[int, Field(ge=1)] = 8  # trials per study; under grid, repeats of the grid
    max_concurrent: Annotated[int, Field(ge=1)] = 2  # trials of one study at once
    # trials of all studies at once; default: what the cluster holds at the per-trial request, computed at start
    max_concurrent_total: Optional[Annotated[int, Field(ge=1)]] = None
    resources: Resources = Resources()
    protocol: Literal["val", "seed"] = "val"
    final_seeds: Annotated[int, Field(ge=1)] = 3  # protocol val: retraining seeds of the selection
    max_failures: Annotated[int, Field(ge=0)] = 1
    checkpoints_to_keep: Annotated[int, Field(ge=1)] = 1  # best by the objective, per trial (plus the latest)
    # selected: once a study is selected, its other trials' checkpoints are deleted; all: every trial keeps them
    keep_checkpoints: Literal["all", "selected"] = "selected"
    baseline: bool = True
    # protocol val: each study's final stage also retrains and tests the loss's published recipe, same seeds
    recipe_runs: bool = False
    reuse_actors: bool = True  # a trial reuses the finished one's worker process (saves ~4 s a trial)
    studies: dict[str, list[Any]] = {}
    fixed: dict[str, Any] = {}
    space: dict[str, Param] = {}
    warm_start: Optional[WarmStart] = None

    @model_validator(mode="after")
    def _check_fields(self) -> "SearchSpec":
        for section in ("studies", "fixed", "space"):
            for name in getattr(self, section):
                if name not in FIELD_NAMES:
                    raise ValueError(unknown_field_message(name, where=f"{section}.{name}"))
        if "protocol" in {*self.fixed, *self.space, *self.studies}:
            raise ValueError("protocol is set at the top level of a spec, not under fixed/space/studies")
        for section_a, section_b in (("fixed", "space"), ("fixed", "studies"), ("studies", "space")):
            both = sorted(set(getattr(self, section_a)) & set(getattr(self, section_b)))
            if both:
                raise ValueError(f"{section_b}.{both[0]}: {both[0]!r} is both in {section_a} and {section_b}; keep one")
        for name, value in self.fixed.items():
            _check_value(f"fixed.{name}", name, value)
        for name, values in self.studies.items():
            if not values:
                raise ValueError(f"studies.{name}: must list at least one value")
            for value in values:
                _check_value(f"studies.{name}", name, value)
        for name, param in self.space.items():
            for value in param.values_to_check():
                _check_value(f"space.{name}.{param.kind}", name, value)
            for other, values in (param.when or {}).items():
                if other not in FIELD_NAMES:
                    raise ValueError(unknown_field_message(other, where=f"space.{name}.when.{other}"))
                if other == name:
                    raise ValueError(f"space.{name}.when.{other}: a parameter cannot depend on itself")
                for value in values:
                    _check_value(f"space.{name}.when.{other}", other, value)
        return self

    @model_validator(mode="after")
    def _check_strategy(self) -> "SearchSpec":
        if self.searcher.type == "grid":
            if self.scheduler.type == "asha":
                raise ValueError("scheduler.type: grid search runs every point to the end; use fifo, not asha")
            continuous = [name for name, p in self.space.items() if p.choice is None]
            if continuous:
                raise ValueError(f"space.{continuous[0]}: grid search takes choice only; allowed: choice")
        if self.warm_start is not None:
            problem = warm_start_problem(self)
            if problem:
                raise ValueError(problem)
        if self.recipe_runs and self.protocol != "val":
            raise ValueError("recipe_runs: protocol seed has no final stage to run the recipe in; allowed: "
                             "recipe_runs under protocol val")
        if self.recipe_runs and "loss_name" in self.space:
            raise ValueError("recipe_runs: loss_name is searched, so a study has no one loss whose recipe to run; "
                             "allowed: loss_name under studies or fixed")
        if "seed" in self.studies and self.protocol == "val":
            raise ValueError("studies.seed: a study's final runs retrain with seeds seed+1 ... seed+final_seeds, so "
                             "seed cannot also tell studies apart in their one run; allowed: seed under fixed "
                             "(or searched), and studies over other fields")
        if self.objective.metric.startswith("test_") and self.protocol != "seed":
            raise ValueError(
                f"objective.metric = {self.objective.metric!r}: selecting on the test classes is allowed only "
                "under protocol seed; allowed: a val_ metric"
            )
        if self.protocol == "seed" and self.objective.metric.startswith("val_"):
            raise ValueError(
                f"objective.metric = {self.objective.metric!r}: protocol seed has no validation classes; "
                "allowed: a test_ metric"
            )
        return self

    @model_validator(mode="after")
    def _check_scheduler(self) -> "SearchSpec":
        for point in self.study_points():
            problem = grace_period_problem(self.scheduler, self.longest_training(point), study_key(point))
            if problem:
                raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _check_loss_fields(self) -> "SearchSpec":
        """A margin, loss_anchor or loss_aggregation given or searched for a loss that has no such parameter
        would be dropped silently (or fail every trial): refuse the combination before anything runs."""
        for point in self.study_points():
            given = {**self.fixed, **point}
            where = {**dict.fromkeys(self.fixed, "fixed"), **dict.fromkeys(point, "studies")}
            problem = (loss_combination_problem(given, self.space, where)
                       or backbone_combination_problem(given, self.space, where))
            if problem:
                raise ValueError(problem)
        return self

    def longest_training(self, point: dict[str, Any]) -> int:
        """The largest `num_epochs` a trial of the study at `point` can have (ASHA's max_t)."""
        if "num_epochs" in self.space:
            return int(self.space["num_epochs"].largest())
        return int({**self.fixed, **point}.get("num_epochs", FIELD_DEFAULTS["num_epochs"]))

    def study_points(self) -> list[dict[str, Any]]:
        """The cartesian product of `studies` (one empty study when there are none)."""
        names = list(self.studies)
        return [dict(zip(names, combo)) for combo in itertools.product(*(self.studies[n] for n in names))]


def warm_start_problem(spec: SearchSpec) -> Optional[str]:
    """Why the spec's warm start cannot run: a grid runs its own points only, and a study must have room for its
    baseline and the k warm-start trials within `num_samples`."""
    if spec.searcher.type == "grid":
        return ("warm_start: a grid runs its own points only; allowed: warm_start with searcher tpe, gp or random, "
                "or no warm_start")
    room = spec.num_samples - (1 if spec.baseline else 0)
    if spec.warm_start.k > room:
        return (f"warm_start.k = {spec.warm_start.k}: a study runs num_samples = {spec.num_samples} trials"
                f"{', its baseline first' if spec.baseline else ''}; allowed: 1 to {room}" if room >= 1 else
                f"warm_start.k = {spec.warm_start.k}: num_samples = {spec.num_samples} leaves no trial after the "
                "baseline; allowed: num_samples 2 or more, or baseline: false")
    return None


def grace_period_problem(scheduler: Scheduler, epochs: int, study: str) -> Optional[str]:
    """ASHA may stop a trial only after `grace_period` epochs, so a study must train at least that long (Ray
    asserts it only once the run has started)."""
    if scheduler.type == "asha" and scheduler.grace_period > epochs:
        return (f"scheduler.grace_period = {scheduler.grace_period}: longer than the training of study {study} "
                f"(num_epochs up to {epochs}); allowed: 1 to {epochs}, or scheduler type fifo")
    return None


def loss_combination_problem(given: dict[str, Any], space: dict[str, Param], where: dict[str, str]) -> Optional[str]:
    """Why a study's fixed values (`given`, each from `where`: fixed, studies, the command line) and searched
    fields put a loss-specific field on a loss without it, naming the combination; None when they do not."""
    return _combination_problem("loss_name", LOSS_SPECIFIC, loss_field_problem, losses_taking, "has", given, space,
                                where)


def backbone_combination_problem(given: dict[str, Any], space: dict[str, Param],
                                 where: dict[str, str]) -> Optional[str]:
    """As `loss_combination_problem`, for the fields of one family of backbones (`facts.FAMILY_FIELDS`): pooling
    or freeze_bn given or searched with a ViT, freeze_patch_embed with a CNN."""
    return _combination_problem("backbone_type", tuple(FAMILY_FIELDS), backbone_field_problem, backbones_taking,
                                "takes", given, space, where)


def _combination_problem(kind: str, fields: tuple[str, ...], problem: Callable[[str, str, Any], Optional[str]],
                         takers: Callable[[str], list[str]], verb: str, given: dict[str, Any],
                         space: dict[str, Param], where: dict[str, str]) -> Optional[str]:
    """The first field of `fields` given or searched with a value of `kind` (loss_name, backbone_type) that
    cannot take it (`problem`; `takers`: the values that can), as one line naming the combination."""
    owners = space[kind].choice if kind in space else [given.get(kind, FIELD_DEFAULTS[kind])]
    origin = "space" if kind in space else where.get(kind, "default")
    study = ",".join(f"{k}={v}" for k, v in given.items() if where.get(k) == "studies")
    for owner in owners:
        for name in fields:
            if name in given:
                found = problem(owner, name, given[name])
                if found:
                    return (f"the combination {kind}={owner} ({origin}) with {name}={given[name]} "
                            f"({where.get(name, 'fixed')}) is refused: {found}")
            elif name in space and owner not in takers(name) and space[name].holds({**given, kind: owner}) is not False:
                return (f"space.{name}: searched for {kind} {owner}" + (f" (study {study})" if study else "") +
                        f", which {verb} no {name}; give it when: {{{kind}: [{', '.join(takers(name))}]}}")
    return None


def _check_value(path: str, field: str, value: Any) -> None:
    try:
        validate_field(field, value)
    except ConfigError as error:
        detail = str(error).split(": ", 1)[-1]
        raise ValueError(f"{path} = {value!r}: {detail}") from None


def _allowed_keys(loc: tuple) -> list[str]:
    """The keys of the schema section at `loc` (e.g. ('searcher',) -> type, seed, n_startup_trials)."""
    model: Any = SearchSpec
    for part in loc:
        annotation = model.model_fields[part].annotation if part in getattr(model, "model_fields", {}) else Param
        # Optional[X] (warm_start): the section's keys are X's
        annotation = next((a for a in get_args(annotation) if a is not type(None)), annotation)
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else Param
    return list(model.model_fields)


def format_spec_error(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors(include_url=False):
        path = ".".join(str(p) for p in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = f"unknown key; allowed: {', '.join(_allowed_keys(item['loc'][:-1]))}"
        if path:
            value = item.get("input")
            shown = "" if isinstance(value, (dict, list)) or value is None else f" = {value!r}"
            lines.append(f"{source}: {path}{shown}: {message}")
        else:
            lines.append(f"{source}: {message}")
    return "\n".join(lines)


def parse_spec(data: Any, source: str = "spec") -> SearchSpec:
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a spec is a YAML mapping of keys (name, objective, ...), got {type(data).__name__}")
    try:
        return SearchSpec.model_validate(data)
    except ValidationError as error:
        raise SpecError(format_spec_error(error, source)) from None


def load_spec(path: str | Path) -> SearchSpec:
    """Read a YAML spec with `yaml.safe_load` (nothing in it runs as code) and validate it."""
    file = Path(path)
    if file.is_dir():
        found = ", ".join(sorted(p.name for p in file.glob("*.yaml"))) or "none"
        raise SpecError(f"spec file {file} is a directory; give a YAML file in it (found: {found})")
    if not file.is_file():
        raise SpecError(f"spec file not found: {file}")
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as error:
        raise SpecError(f"{file}: not valid YAML: {error}".replace("\n", " ")) from None
    return parse_spec(data, str(file))
