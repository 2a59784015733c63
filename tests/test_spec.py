"""Search specs: the canonical demo loads; every kind of mistake is one line naming its key path."""
import copy
from pathlib import Path

import pytest
import yaml

from tune_upl.spec import Param, load_spec, parse_spec
from tune_upl.errors import SpecError

DEMO = Path(__file__).resolve().parents[1] / "search_spaces" / "demo.yaml"


def demo_dict():
    return yaml.safe_load(DEMO.read_text())


def test_demo_spec_loads():
    spec = load_spec(DEMO)
    assert spec.name == "demo" and spec.num_samples == 8 and spec.max_concurrent == 2
    assert spec.searcher.type == "tpe" and spec.scheduler.type == "asha"
    assert spec.space["lr"].loguniform == (1e-4, 1e-2)
    assert spec.space["margin"].when == {"loss_name": ["proxy_anchor", "balanced_proxy"]}
    assert spec.fixed["backbone_type"] == "tiny" and spec.study_points() == [{}]


def test_studies_are_a_cartesian_product():
    data = demo_dict()
    data["fixed"].pop("data_name")
    data["studies"] = {"data_name": ["synthetic", "cub"], "loss_name": ["proxy_anchor", "balanced_proxy"]}
    points = parse_spec(data).study_points()
    assert len(points) == 4 and {"data_name": "cub", "loss_name": "proxy_anchor"} in points


def edit(path, value):
    """Return a demo dict with `value` set at the dotted `path` (None deletes nothing, it sets None)."""
    data = demo_dict()
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node[key]
    node[last] = value
    return data


@pytest.mark.parametrize(
    "path, value, expected",
    [
        ("bogus", 1, r"^spec: bogus = 1: unknown key; allowed: name, objective"),
        ("searcher.kind", "tpe", r"^spec: searcher.kind = 'tpe': unknown key; allowed: type, seed"),
        ("num_samples", "many", r"^spec: num_samples = 'many': Input should be a valid integer"),
        ("num_samples", 0, r"^spec: num_samples = 0: Input should be greater than or equal to 1"),
        ("resources.cpu", 0, r"^spec: resources.cpu = 0: Input should be greater than 0"),
        ("resources.gpu", -1, r"^spec: resources.gpu = -1: Input should be greater than or equal to 0"),
        ("resources.gpu", 2, r"^spec: resources.gpu = 2: one GPU per trial at most .*; allowed: 0 to 1, a fraction"),
        ("resources.gpu", 1.5, r"^spec: resources.gpu = 1.5: one GPU per trial at most"),
        ("space.scale", {"choice": []}, r"^spec: space.scale: choice must list at least one value"),
        ("space.lr", {"loguniform": [0.1, 0.01]}, r"^spec: space.lr: low must be below high"),
        ("space.lr", {"uniform": [0.1, 0.2], "int": [1, 2]}, r"space.lr: give exactly one distribution"),
        ("space.scal", {"uniform": [1, 2]}, r"^spec: space.scal: unknown field 'scal' \(did you mean 'scale'\?\); allowed:"),
        ("space.margin.when", {"loss": ["proxy_anchor"]}, r"^spec: space.margin.when.loss: unknown field 'loss'"),
        ("space.margin.when", {"loss_name": ["arcface"]}, r"space.margin.when.loss_name = 'arcface': unknown loss_name"),
        ("space.feature_dim", {"choice": [64, -1]}, r"space.feature_dim.choice = -1: Input should be greater"),
        ("fixed.backbone_type", "vgg", r"^spec: fixed.backbone_type = 'vgg': unknown backbone_type 'vgg'; allowed"),
        ("fixed.lr", 0.1, r"^spec: space.lr: 'lr' is both in fixed and space"),
        ("scheduler.type", "median", r"^spec: scheduler.type = 'median': Input should be 'asha' or 'fifo'"),
        ("searcher.type", "grid", r"^spec: scheduler.type: grid search runs every point to the end; use fifo"),
        ("objective.metric", "val_accuracy", r"objective.metric = 'val_accuracy': unknown metric"),
        ("objective.metric", "test_recall@1", r"allowed only under protocol seed"),
    ],
)
def test_each_mistake_is_one_line_with_its_key_path(path, value, expected):
    with pytest.raises(SpecError, match=expected) as info:
        parse_spec(edit(path, value))
    assert "\n" not in str(info.value)


def test_grid_needs_choices_and_seed_protocol_needs_test_objective():
    data = edit("searcher.type", "grid")
    data["scheduler"]["type"] = "fifo"
    with pytest.raises(SpecError, match="space.lr: grid search takes choice only"):
        parse_spec(data)
    data["space"] = {"scale": {"choice": [16, 32]}}
    assert parse_spec(data).searcher.type == "grid"
    assert parse_spec({**data, "max_concurrent_total": 4}).max_concurrent_total == 4  # one run, like tpe's
    seeded = copy.deepcopy(data)
    seeded["protocol"] = "seed"
    with pytest.raises(SpecError, match="protocol seed has no validation classes"):
        parse_spec(seeded)
    seeded["objective"]["metric"] = "test_recall@1"
    assert parse_spec(seeded).protocol == "seed"


def test_load_spec_file_errors(tmp_path):
    with pytest.raises(SpecError, match="spec file not found"):
        load_spec(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)
    code = tmp_path / "code.yaml"
    code.write_text("name: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(SpecError, match="not valid YAML"):  # safe_load refuses to build objects
        load_spec(code)


def test_param_is_the_one_place_that_speaks_optuna():
    """Sampling, distributions and containment of a space entry live in `Param` only: every other module
    (searcher, baseline, grid, scheduler, importance, figures) asks it, so they cannot disagree."""
    import re
    from pathlib import Path

    import optuna

    package = Path(__file__).resolve().parents[1] / "tune_upl"
    pattern = re.compile(r"suggest_(categorical|float|int)\b|(Categorical|Float|Int)Distribution\b")
    found = {p.name for p in package.glob("*.py") if pattern.search(p.read_text())}
    assert found == {"spec.py"}, found
    stepped, logged, choice = Param(int=[2, 10], step=4), Param(loguniform=[1e-4, 1e-2]), Param(choice=[8, 32])
    assert stepped.distribution() == optuna.distributions.IntDistribution(2, 10, step=4)
    assert logged.distribution() == optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)
    assert [stepped.contains(v) for v in (2, 6, 10, 4, 11, "2")] == [True, True, True, False, False, False]
    assert [logged.contains(v) for v in (1e-4, 1e-3, 1e-1)] == [True, True, False]
    assert choice.contains(32) and not choice.contains(16) and choice.largest() == 32 and stepped.largest() == 10
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        assert stepped.contains(stepped.suggest(trial, "a")) and logged.contains(logged.suggest(trial, "b"))
    conditional = Param(choice=[0.1], when={"loss_name": ["proxy_anchor"]})
    assert [conditional.holds(v) for v in ({}, {"loss_name": "proxy_anchor"}, {"loss_name": "proxy_nca"})] == [
        None, True, False]
