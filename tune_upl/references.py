"""Published benchmark numbers (`references.yaml`) and their sources, looked up by dataset, backbone, loss
and feature dimension for the report's tables; and each loss's published training recipe (`recipes:`), which
a study's baseline trial runs, so a search's gain over it is tuning gain, not the seed's recipe's."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError
from typing_extensions import Annotated

from tune_upl.config import FIELD_NAMES, loss_field_problem, make_config, validate_field
from tune_upl.errors import ConfigError
from tune_upl.facts import LOSS_PARAMETERS

REFERENCES_FILE = Path(__file__).with_name("references.yaml")
# The fields every recipe states, by a value or a stated absence: so a missing one is an omission, not a silence.
RECIPE_FIELDS = ("lr", "proxy_lr", "optimizer", "weight_decay", "lr_step", "lr_gamma", "batch_size", "num_epochs",
                 "feature_dim", "warm_up", "scale", "margin", "pooling", "layer_norm")


@dataclass(frozen=True)
class Source:
    key: str
    label: str  # short, for table cells
    title: str
    where: str
    note: str


@dataclass(frozen=True)
class Reference:
    """One published row: Recall@K in percent for a dataset, backbone, loss and dimension."""

    source: str
    data: str
    backbone: str
    loss: str
    dim: int
    recall: dict[int, float]


@dataclass(frozen=True)
class References:
    sources: dict[str, Source]
    results: tuple[Reference, ...]

    def find(self, data: str, backbone: str, loss: str, dim: int) -> Optional[Reference]:
        """The first listed reference for exactly this dataset, backbone, loss and dimension."""
        return next((r for r in self.results
                     if (r.data, r.backbone, r.loss, r.dim) == (data, backbone, loss, int(dim))), None)


@functools.lru_cache(maxsize=None)
def load_references(path: Path = REFERENCES_FILE) -> References:
    raw = yaml.safe_load(path.read_text())
    sources = {key: Source(key, s["label"], s["title"], s["where"], s.get("note", ""))
               for key, s in raw["sources"].items()}
    results = []
    for row in raw["results"]:
        if row["source"] not in sources:
            raise ValueError(f"{path}: result {row} names an unknown source {row['source']!r}")
        results.append(Reference(row["source"], row["data"], row["backbone"], row["loss"], int(row["dim"]),
                                 {int(k): float(v) for k, v in row["recall"].items()}))
    return References(sources, tuple(results))


# ---------------------------------------------------------------- recipes
NonEmpty = Annotated[str, Field(min_length=1, pattern=r"\S")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RecipeSource(_Strict):
    label: NonEmpty
    title: NonEmpty
    where: NonEmpty


class RecipeValue(_Strict):
    """A published value and where it is read, e.g. {value: 32, source: pa_code, where: "train.py line 75"}."""

    value: Any
    source: NonEmpty
    where: NonEmpty


class RecipeAbsence(_Strict):
    """No source gives a value this project can run: the seed's value stands, and the reason says why."""

    absent: NonEmpty


def _entry_kind(entry: Any) -> str:
    """An entry with `absent` is an absence, any other a value: so a broken one is told what a value needs."""
    return "absent" if isinstance(entry, RecipeAbsence) or (isinstance(entry, dict) and "absent" in entry) else "value"


RecipeEntry = Annotated[Union[Annotated[RecipeAbsence, Tag("absent")], Annotated[RecipeValue, Tag("value")]],
                        Discriminator(_entry_kind)]


class Recipe(_Strict):
    sources: dict[str, RecipeSource]
    note: str = ""
    values: dict[str, RecipeEntry]

    def settings(self) -> dict[str, Any]:
        """Field -> value for the fields with a value (the absences keep the seed's)."""
        return {name: entry.value for name, entry in self.values.items() if isinstance(entry, RecipeValue)}


def _recipe_problem(loss: str, recipe: Recipe) -> Optional[str]:
    """Why this loss's recipe cannot be run, or None: each key must be a TrialConfig field the loss can take,
    with a value that field accepts, citing one of the entry's sources; every RECIPE_FIELDS is stated."""
    for name, entry in recipe.values.items():
        key = f"recipes.{loss}.values.{name}"
        if name not in FIELD_NAMES:
            return f"{key}: not a TrialConfig field"
        if isinstance(entry, RecipeAbsence):
            continue
        if entry.source not in recipe.sources:
            return f"{key}.source: {entry.source!r} is not one of this entry's sources ({', '.join(recipe.sources)})"
        try:
            validate_field(name, entry.value)
        except ConfigError as error:
            return f"{key}: {error}"
        problem = loss_field_problem(loss, name, entry.value)
        if problem:
            return f"{key}: {problem}"
    missing = [name for name in RECIPE_FIELDS if name not in recipe.values]
    if missing:
        return f"recipes.{loss}.values: {', '.join(missing)} missing; give a value or absent: the reason"
    try:  # together (warm_up within num_epochs, ...)
        make_config({"loss_name": loss, **recipe.settings()})
    except ConfigError as error:
        return f"recipes.{loss}: the values together are no valid config: {error}"
    return None


@functools.lru_cache(maxsize=None)
def load_recipes(path: Path = REFERENCES_FILE) -> dict[str, Recipe]:
    """Every loss's recipe from `path`, checked; a bad one raises ConfigError naming its key."""
    document = yaml.safe_load(path.read_text())
    raw = document.get("recipes") if isinstance(document, dict) else None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: recipes: missing (one entry per loss: {', '.join(sorted(LOSS_PARAMETERS))})")
    recipes: dict[str, Recipe] = {}
    for loss, entry in raw.items():
        if loss not in LOSS_PARAMETERS:
            raise ConfigError(f"{path}: recipes.{loss}: unknown loss; allowed: {', '.join(sorted(LOSS_PARAMETERS))}")
        try:
            recipes[loss] = Recipe.model_validate(entry)
        except ValidationError as error:
            item = error.errors(include_url=False)[0]
            loc = list(item["loc"])
            if len(loc) >= 3 and loc[0] == "values":
                del loc[2]  # the entry's kind (absent/value), a tag of the union, not a key of the file
            where = ".".join(map(str, loc))
            raise ConfigError(f"{path}: recipes.{loss}.{where}: {item['msg'].removeprefix('Value error, ')}") from None
        problem = _recipe_problem(loss, recipes[loss])
        if problem:
            raise ConfigError(f"{path}: {problem}")
    missing = sorted(set(LOSS_PARAMETERS) - set(recipes))
    if missing:
        raise ConfigError(f"{path}: recipes: no entry for {', '.join(missing)}")
    return recipes


def recipe(loss_name: str, path: Path = REFERENCES_FILE) -> dict[str, Any]:
    """The published settings of `loss_name`'s paper or official code: field -> value, only the fields with a
    value (validated, e.g. `{'scale': 20.0, 'optimizer': 'sgd', ...}` for normalized_softmax)."""
    recipes = load_recipes(path)
    if loss_name not in recipes:
        raise ConfigError(f"unknown loss_name {loss_name!r}; allowed: {', '.join(sorted(recipes))}")
    return {name: validate_field(name, value) for name, value in recipes[loss_name].settings().items()}
