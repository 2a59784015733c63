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

from tune_upl.config import FIELD_NAMES, backbone_field_problem, loss_field_problem, make_config, validate_field
from tune_upl.errors import ConfigError
from tune_upl.facts import BACKBONES, FAMILY_FIELDS, LOSS_PARAMETERS, is_vit

REFERENCES_FILE = Path(__file__).with_name("references.yaml")
# The fields every recipe states, by a value or a stated absence: so a missing one is an omission, not a silence.
RECIPE_FIELDS = ("lr", "proxy_lr", "optimizer", "weight_decay", "lr_step", "lr_gamma", "batch_size", "num_epochs",
                 "feature_dim", "warm_up", "scale", "margin", "pooling", "layer_norm")
# What a backbone's recipe (`backbone_recipes:`, every ViT has one) states: how that backbone is trained. It
# replaces the loss recipe's values of these fields for that backbone; the loss's own parameters (scale,
# margin, ...) and the embedding size stay the loss recipe's, and a loss recipe's CNN-only value (pooling)
# is dropped for a ViT.
BACKBONE_RECIPE_FIELDS = ("optimizer", "lr", "proxy_lr", "weight_decay", "lr_schedule", "lr_warmup_epochs",
                          "grad_clip", "freeze_patch_embed", "warm_up", "batch_size", "num_epochs", "image_size",
                          "crop_scale", "layer_norm")


@dataclass(frozen=True)
class Source:
    key: str
    label: str  # short, for table cells
    title: str
    where: str
    note: str


@dataclass(frozen=True)
class Reference:
    """One published row: Recall@K in percent for a dataset, backbone, loss and dimension; `protocol` says
    what else differs from ours where it does (resolution, pre-training data, how the epoch was chosen)."""

    source: str
    data: str
    backbone: str
    loss: str
    dim: int
    recall: dict[int, float]
    protocol: str = ""


@dataclass(frozen=True)
class References:
    sources: dict[str, Source]
    results: tuple[Reference, ...]

    def find(self, data: str, backbone: str, loss: str, dim: int) -> Optional[Reference]:
        """The first listed reference for exactly this dataset, backbone, loss and dimension."""
        return next((r for r in self.results
                     if (r.data, r.backbone, r.loss, r.dim) == (data, backbone, loss, int(dim))), None)

    def for_backbones(self, backbones: "set[str] | frozenset[str]") -> "References":
        """Only the rows of these backbones, and the sources they cite: what a report of them sets beside its
        results (a ViT study is not compared with ResNet rows)."""
        results = tuple(r for r in self.results if r.backbone in backbones)
        cited = {r.source for r in results}
        return References({k: s for k, s in self.sources.items() if k in cited}, results)


@functools.lru_cache(maxsize=None)
def _document(path: Path) -> Any:
    """references.yaml parsed once: the published rows, the losses' and the backbones' recipes all read it."""
    return yaml.safe_load(path.read_text())


@functools.lru_cache(maxsize=None)
def load_references(path: Path = REFERENCES_FILE) -> References:
    raw = _document(path)
    sources = {key: Source(key, s["label"], s["title"], s["where"], s.get("note", ""))
               for key, s in raw["sources"].items()}
    results = []
    for row in raw["results"]:
        if row["source"] not in sources:
            raise ValueError(f"{path}: result {row} names an unknown source {row['source']!r}")
        results.append(Reference(row["source"], row["data"], row["backbone"], row["loss"], int(row["dim"]),
                                 {int(k): float(v) for k, v in row["recall"].items()}, row.get("protocol", "")))
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


def _recipe_problem(section: str, key: str, recipe: Recipe) -> Optional[str]:
    """Why a recipe cannot be run, or None: each key must be a TrialConfig field the loss (section `recipes`)
    or backbone (`backbone_recipes`, only BACKBONE_RECIPE_FIELDS) can take, with a value that field accepts,
    citing one of the entry's sources; every field of the section's list is stated."""
    loss = section == "recipes"
    required = RECIPE_FIELDS if loss else BACKBONE_RECIPE_FIELDS
    for name, entry in recipe.values.items():
        where = f"{section}.{key}.values.{name}"
        if name not in FIELD_NAMES:
            return f"{where}: not a TrialConfig field"
        if not loss and name not in BACKBONE_RECIPE_FIELDS:
            return f"{where}: not a backbone's field (the loss recipe gives it); allowed: {', '.join(required)}"
        if isinstance(entry, RecipeAbsence):
            continue
        if entry.source not in recipe.sources:
            return f"{where}.source: {entry.source!r} is not one of this entry's sources ({', '.join(recipe.sources)})"
        try:
            validate_field(name, entry.value)
        except ConfigError as error:
            return f"{where}: {error}"
        problem = (loss_field_problem(key, name, entry.value) if loss
                   else backbone_field_problem(key, name, entry.value))
        if problem:
            return f"{where}: {problem}"
    missing = [name for name in required if name not in recipe.values]
    if missing:
        return f"{section}.{key}.values: {', '.join(missing)} missing; give a value or absent: the reason"
    try:  # together (warm_up within num_epochs, ...)
        make_config({"loss_name" if loss else "backbone_type": key, **recipe.settings()})
    except ConfigError as error:
        return f"{section}.{key}: the values together are no valid config: {error}"
    return None


def _load_section(path: Path, section: str, allowed: list[str], required: list[str]) -> dict[str, Recipe]:
    """One section of recipes from `path`, each checked; a bad one raises ConfigError naming its key."""
    document = _document(path)
    raw = document.get(section) if isinstance(document, dict) else None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: {section}: missing (one entry per {', '.join(required)})")
    recipes: dict[str, Recipe] = {}
    for key, entry in raw.items():
        if key not in allowed:
            raise ConfigError(f"{path}: {section}.{key}: unknown name; allowed: {', '.join(allowed)}")
        try:
            recipes[key] = Recipe.model_validate(entry)
        except ValidationError as error:
            item = error.errors(include_url=False)[0]
            loc = list(item["loc"])
            if len(loc) >= 3 and loc[0] == "values":
                del loc[2]  # the entry's kind (absent/value), a tag of the union, not a key of the file
            where = ".".join(map(str, loc))
            raise ConfigError(f"{path}: {section}.{key}.{where}: {item['msg'].removeprefix('Value error, ')}"
                              ) from None
        problem = _recipe_problem(section, key, recipes[key])
        if problem:
            raise ConfigError(f"{path}: {problem}")
    missing = sorted(set(required) - set(recipes))
    if missing:
        raise ConfigError(f"{path}: {section}: no entry for {', '.join(missing)}")
    return recipes


@functools.lru_cache(maxsize=None)
def load_recipes(path: Path = REFERENCES_FILE) -> dict[str, Recipe]:
    """Every loss's recipe from `path`, checked; a bad one raises ConfigError naming its key."""
    return _load_section(path, "recipes", sorted(LOSS_PARAMETERS), sorted(LOSS_PARAMETERS))


@functools.lru_cache(maxsize=None)
def load_backbone_recipes(path: Path = REFERENCES_FILE) -> dict[str, Recipe]:
    """Every ViT's training recipe from `path` (a CNN may have one too), checked as `load_recipes`."""
    return _load_section(path, "backbone_recipes", sorted(BACKBONES), sorted(b for b in BACKBONES if is_vit(b)))


def recipe(loss_name: str, backbone_type: Optional[str] = None, path: Path = REFERENCES_FILE) -> dict[str, Any]:
    """The published settings of `loss_name`'s paper or official code: field -> value, only the fields with a
    value (validated, e.g. `{'scale': 20.0, 'optimizer': 'sgd', ...}` for normalized_softmax); with a
    `backbone_type` that has a recipe (the ViTs), its training settings replace the loss recipe's, and the
    loss recipe's values the backbone cannot take (a CNN's pooling for a ViT) are left out."""
    recipes = load_recipes(path)
    if loss_name not in recipes:
        raise ConfigError(f"unknown loss_name {loss_name!r}; allowed: {', '.join(sorted(recipes))}")
    settings = recipes[loss_name].settings()
    if backbone_type is not None:
        backbone = load_backbone_recipes(path).get(backbone_type)
        family = BACKBONES[backbone_type].family  # a CNN's pooling means nothing to a ViT
        settings = {name: value for name, value in settings.items() if FAMILY_FIELDS.get(name, family) == family}
        settings.update(backbone.settings() if backbone else {})
    return {name: validate_field(name, value) for name, value in settings.items()}
