"""Each loss's published recipe (`references.yaml` `recipes:`) and the baseline trial that runs it: every
field stated with its source or a reason, every value a valid config, and a study's first trial equal to its
loss's recipe wherever the searched range holds it. Fast, no Ray."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from tune_upl.config import FIELD_DEFAULTS, make_config, validate_field
from tune_upl.errors import ConfigError
from tune_upl.losses import LOSSES
from tune_upl.planning import baseline_point
from tune_upl.references import (
    RECIPE_FIELDS, REFERENCES_FILE, RecipeAbsence, RecipeValue, load_recipes, recipe,
)
from tune_upl.spec import Param


def test_every_loss_states_every_recipe_field_with_its_source_or_a_reason():
    recipes = load_recipes()
    assert set(recipes) == set(LOSSES) == {"balanced_proxy", "proxy_anchor", "proxy_nca", "normalized_softmax"}
    for loss, entry in recipes.items():
        assert set(entry.values) >= set(RECIPE_FIELDS), loss
        assert entry.sources, loss
        for name, stated in entry.values.items():
            if isinstance(stated, RecipeAbsence):
                assert stated.absent.strip(), (loss, name)
            else:
                assert isinstance(stated, RecipeValue)
                assert stated.where.strip() and stated.source in entry.sources, (loss, name)
                assert all(s.strip() for s in (entry.sources[stated.source].title, entry.sources[stated.source].where))
                assert validate_field(name, stated.value) == stated.value, (loss, name)
        make_config({"loss_name": loss, **recipe(loss)})  # the values together: one valid run


def test_the_recipes_hold_the_published_numbers():
    """Spot checks against the sources read (references.yaml cites each); the conversions are the file's."""
    assert recipe("balanced_proxy") == {name: FIELD_DEFAULTS[name] for name in RECIPE_FIELDS}
    anchor = recipe("proxy_anchor")
    assert (anchor["optimizer"], anchor["batch_size"], anchor["warm_up"], anchor["num_epochs"]) == ("adamw", 120, 5, 60)
    assert math.isclose(anchor["proxy_lr"], 100 * anchor["lr"]) and anchor["weight_decay"] == 1e-4
    assert (anchor["pooling"], anchor["layer_norm"]) == ("avgmax", False)  # max + avg summed, no layer norm
    nca = recipe("proxy_nca")
    assert nca["scale"] == 2 * 3.0 * 3.0 and (nca["feature_dim"], nca["batch_size"]) == (64, 32)
    assert not {"lr", "proxy_lr", "optimizer", "margin", "pooling"} & set(nca)  # none to run: the seed's stand
    softmax = recipe("normalized_softmax")
    assert math.isclose(softmax["scale"], 1 / 0.05) and softmax["optimizer"] == "sgd" and "margin" not in softmax
    assert (softmax["pooling"], softmax["layer_norm"]) == ("avg", True)
    assert (softmax["feature_dim"], softmax["num_epochs"], softmax["warm_up"], softmax["lr_step"]) == (2048, 31, 1, 15)


def _holding(value: Any) -> Param:
    """A searched range that holds `value`: a choice beside another value."""
    if isinstance(value, (str, bool)):
        return Param(choice=[value, "other" if isinstance(value, str) else not value])
    return Param(choice=[value, value * 3])


def _missing(value: Any) -> Param:
    """A searched range that does not hold `value` (but may hold the seed's)."""
    if isinstance(value, (str, bool)):
        return Param(choice=["other" if isinstance(value, str) else not value])
    if isinstance(value, int):
        return Param(int=(value + 1, value + 100))
    return Param(uniform=(value * 1.5 + 1e-3, value * 100 + 1))


BASE = {"backbone_type": "tiny", "data_name": "synthetic"}


@pytest.mark.parametrize("loss", ["balanced_proxy", "proxy_anchor", "proxy_nca", "normalized_softmax"])
def test_a_baseline_trial_runs_its_losses_recipe_where_the_range_holds_it(loss):
    published = recipe(loss)
    unstated = [name for name in RECIPE_FIELDS if name not in published and name != "margin"]
    space = {name: _holding(value) for name, value in published.items()}
    space.update({name: _holding(FIELD_DEFAULTS[name]) for name in unstated})
    point = baseline_point(space, {**BASE, "loss_name": loss})
    assert point == {**published, **{name: FIELD_DEFAULTS[name] for name in unstated}}
    make_config({**BASE, "loss_name": loss, **point})

    outside = {name: _missing(value) for name, value in published.items()}
    assert baseline_point(outside, {**BASE, "loss_name": loss}) == {}  # sampled: never the seed's in its place


def test_a_recipe_value_outside_the_range_is_sampled_even_where_the_seeds_value_is_inside():
    space = {"batch_size": Param(choice=[32, 64, 256]), "scale": Param(choice=[16, 32, 64]),
             "lr": Param(loguniform=(1e-5, 1e-3))}
    point = baseline_point(space, {**BASE, "loss_name": "proxy_anchor"})
    assert point == {"scale": 32.0, "lr": 1e-4}  # proxy_anchor's batch 120 is not a choice; the seed's 64 is
    nca = baseline_point(space, {**BASE, "loss_name": "proxy_nca"})
    assert nca == {"batch_size": 32, "lr": 1e-4}  # its scale 18 is not a choice; no lr of its own: the seed's


def test_balanced_proxys_baseline_is_the_seeds_defaults():
    space = {name: _holding(FIELD_DEFAULTS[name]) for name in RECIPE_FIELDS}
    seeds = {name: FIELD_DEFAULTS[name] for name in RECIPE_FIELDS}
    assert baseline_point(space, {**BASE, "loss_name": "balanced_proxy"}) == seeds


def test_a_searched_loss_name_keeps_the_seeds_values_and_a_loss_without_a_margin_gets_none():
    space = {"loss_name": Param(choice=["proxy_nca", "balanced_proxy"]), "batch_size": Param(choice=[32, 64]),
             "margin": Param(uniform=(0.0, 0.3), when={"loss_name": ["balanced_proxy", "proxy_anchor"]})}
    assert baseline_point(space, BASE) == {"loss_name": "balanced_proxy", "batch_size": 64, "margin": 0.1}
    del space["loss_name"]
    assert baseline_point(space, {**BASE, "loss_name": "proxy_nca"}) == {"batch_size": 32}  # margin's when fails


def _broken(tmp_path: Path, change) -> Path:
    raw = yaml.safe_load(REFERENCES_FILE.read_text())
    raw = copy.deepcopy(raw)
    change(raw["recipes"])
    path = tmp_path / "references.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("change, message", [
    (lambda r: r.pop("proxy_nca"), "recipes: no entry for proxy_nca"),
    (lambda r: r["proxy_nca"]["values"].pop("lr"), "recipes.proxy_nca.values: lr missing"),
    (lambda r: r["proxy_nca"]["values"]["scale"].pop("where"), "recipes.proxy_nca.values.scale.where: Field required"),
    (lambda r: r["proxy_nca"]["values"].__setitem__("margin", {"absent": " "}),
     "recipes.proxy_nca.values.margin.absent"),
    (lambda r: r["proxy_nca"]["values"].__setitem__("scael", {"absent": "x"}),
     "recipes.proxy_nca.values.scael: not a TrialConfig field"),
    (lambda r: r["proxy_anchor"]["values"]["optimizer"].__setitem__("value", "adam"),
     "recipes.proxy_anchor.values.optimizer: TrialConfig.optimizer = 'adam'"),
    (lambda r: r["proxy_nca"]["values"].__setitem__("margin", {"value": 0.2, "source": "pnca_code", "where": "x"}),
     "recipes.proxy_nca.values.margin: loss_name proxy_nca has no margin"),
    (lambda r: r["proxy_nca"]["values"]["scale"].__setitem__("source", "nope"),
     "recipes.proxy_nca.values.scale.source: 'nope' is not one of this entry's sources"),
    (lambda r: r["proxy_nca"]["values"]["warm_up"].__setitem__("value", 80), "warm_up=80 exceeds num_epochs=70"),
], ids=["loss missing", "field missing", "no where", "empty reason", "unknown field", "bad value",
        "loss has no such field", "unknown source", "values together invalid"])
def test_a_broken_recipe_is_refused_naming_its_key(tmp_path, change, message):
    path = _broken(tmp_path, change)
    with pytest.raises(ConfigError) as error:
        load_recipes(path)
    assert message in str(error.value) and str(path) in str(error.value)
    assert "\n" not in str(error.value)


def test_the_docs_recipe_table_is_the_recipes():
    """docs/specs.md's table of recipes against references.yaml: each cell the value, or "(...)" where none."""
    text = (Path(__file__).parents[1] / "docs" / "specs.md").read_text()
    rows = [line.strip("|").split(" | ") for line in text.splitlines() if line.startswith("| `") and "|" in line[1:]]
    header = "| field | balanced_proxy (seed) | proxy_anchor | proxy_nca | normalized_softmax |"
    assert header in text
    losses = ["balanced_proxy", "proxy_anchor", "proxy_nca", "normalized_softmax"]
    table = {tuple(c.strip("`") for c in row[0].strip().split(", ")): row[1:] for row in rows if len(row) == 5}
    assert {f for fields in table for f in fields} == set(RECIPE_FIELDS)
    for fields, cells in table.items():
        for loss, cell in zip(losses, cells):
            published = recipe(loss)
            shown = cell.strip().split(", ") if len(fields) > 1 else [cell.strip()]
            for name, value in zip(fields, shown):
                if name not in published:
                    assert value.startswith("("), (loss, name, value)
                elif isinstance(published[name], (bool, str)):
                    assert value.split(" (")[0] == str(published[name]).lower(), (loss, name, value)
                else:
                    assert math.isclose(float(value.split(" (")[0]), published[name]), (loss, name, value)


# ---------------------------------------------------------------- a ViT's training recipe
VIT = "vit_small_patch16_224.dino"


def test_every_vit_has_a_training_recipe_that_replaces_the_cnn_values_of_each_loss():
    from tune_upl.facts import BACKBONES, is_vit
    from tune_upl.references import BACKBONE_RECIPE_FIELDS, load_backbone_recipes

    recipes = load_backbone_recipes()
    assert set(recipes) == {name for name in BACKBONES if is_vit(name)}
    for backbone, entry in recipes.items():
        assert set(entry.values) == set(BACKBONE_RECIPE_FIELDS), backbone
        assert all(isinstance(v, RecipeValue) and v.source in entry.sources for v in entry.values.values())
        for loss in LOSSES:
            merged = recipe(loss, backbone)
            assert "pooling" not in merged  # the loss recipe's CNN pooling is left out for a ViT
            assert {k: merged[k] for k in BACKBONE_RECIPE_FIELDS} == entry.settings()
            assert all(merged[k] == v for k, v in recipe(loss).items() if k not in BACKBONE_RECIPE_FIELDS
                       and k != "pooling")  # the loss's own parameters and feature_dim stay the loss's
            make_config({"loss_name": loss, "backbone_type": backbone, **merged})
    dino = recipe("proxy_anchor", VIT)  # HIER's DINO scripts, spot-checked against the values read
    assert (dino["optimizer"], dino["lr"], dino["weight_decay"], dino["batch_size"]) == ("adamw", 5e-6, 1e-2, 180)
    assert math.isclose(dino["proxy_lr"], 1e4 * dino["lr"]) and dino["lr_schedule"] == "constant"
    assert (dino["warm_up"], dino["grad_clip"], dino["freeze_patch_embed"]) == (1, 3.0, dino["num_epochs"])
    assert (dino["scale"], dino["margin"], dino["feature_dim"]) == (32.0, 0.1, 512)  # proxy_anchor's own
    assert recipe("proxy_anchor", "resnet50") == recipe("proxy_anchor")  # a CNN has none: the loss's recipe


def test_a_vit_studys_baseline_takes_its_backbones_recipe():
    space = {"lr": Param(loguniform=(1e-6, 1e-4)), "proxy_lr": Param(loguniform=(1e-3, 1e-1)),
             "scale": Param(choice=[16, 32, 64]), "optimizer": Param(choice=["adamp", "adamw"])}
    point = baseline_point(space, {"backbone_type": VIT, "data_name": "synthetic", "loss_name": "proxy_anchor"})
    assert point == {"lr": 5e-6, "proxy_lr": 5e-2, "scale": 32.0, "optimizer": "adamw"}
    searched = {**space, "backbone_type": Param(choice=[VIT, "resnet50"])}  # no one backbone: the loss's recipe
    point = baseline_point(searched, {"data_name": "synthetic", "loss_name": "proxy_anchor"})
    assert (point["lr"], point["optimizer"], point["backbone_type"]) == (1e-4, "adamw", "resnet50")


@pytest.mark.parametrize("change, message", [
    (lambda r: r[VIT]["values"].__setitem__("scale", {"value": 16.0, "source": "hier_code", "where": "x"}),
     "backbone_recipes.vit_small_patch16_224.dino.values.scale: not a backbone's field"),
    (lambda r: r[VIT]["values"].pop("grad_clip"), "backbone_recipes.vit_small_patch16_224.dino.values: grad_clip missing"),
    (lambda r: r.pop("deit_small_patch16_224.fb_in1k"), "backbone_recipes: no entry for deit_small_patch16_224.fb_in1k"),
    (lambda r: r.__setitem__("vit_huge", r[VIT]), "backbone_recipes.vit_huge: unknown name"),
    (lambda r: r[VIT]["values"]["image_size"].__setitem__("value", 40), "not a multiple of"),
], ids=["loss parameter", "field missing", "vit missing", "unknown backbone", "values together invalid"])
def test_a_broken_backbone_recipe_is_refused_naming_its_key(tmp_path, change, message):
    from tune_upl.references import load_backbone_recipes

    raw = json.loads(json.dumps(yaml.safe_load(REFERENCES_FILE.read_text())))  # the file's anchors unshared
    change(raw["backbone_recipes"])
    path = tmp_path / "references.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as error:
        load_backbone_recipes(path)
    assert message in str(error.value) and str(path) in str(error.value) and "\n" not in str(error.value)
