"""The recipe retrained and tested like the selection (`recipe_runs`), and the report's separation of the tuning
gain (a loss tuned against its own recipe) from the method gain (one loss against another), each paired by seed.

The numbers of the report are checked against Tune's raw `result.json` files, parsed here, and scipy's paired t
interval."""
import json
import math
import re
import statistics

import pytest
from experiments import result_rows
from scipy import stats
from searches import MINI

from tune_upl.comparisons import MethodGain, Paired, method_gains, paired_interval
from tune_upl.config import FIELD_DEFAULTS, make_config
from tune_upl.errors import SpecError
from tune_upl.planning import final_runs, plan_studies, recipe_config
from tune_upl.spec import parse_spec

LOSSES = ["balanced_proxy", "proxy_anchor", "proxy_nca"]
RECIPES = {
    **MINI, "name": "recipes", "num_samples": 2, "max_concurrent": 2, "final_seeds": 2, "recipe_runs": True,
    "studies": {"loss_name": LOSSES},
    # every field a published recipe may name that would make the test slow is held (fixed wins over a recipe)
    "fixed": {**MINI["fixed"], "num_epochs": 1, "image_size": 24, "batch_size": 32, "feature_dim": 16},
}


# ---------------------------------------------------------------- the interval arithmetic
def test_the_paired_interval_is_scipys_paired_t_interval_over_the_shared_seeds():
    tuned = {1: 0.62, 2: 0.55, 3: 0.71, 9: 0.99}  # seed 9 has no recipe run: it does not pair
    recipe = {1: 0.50, 2: 0.49, 3: 0.60, 7: 0.10}
    found = paired_interval(tuned, recipe)
    a, b = [0.62, 0.55, 0.71], [0.50, 0.49, 0.60]
    low, high = stats.ttest_rel(a, b).confidence_interval(0.95)
    assert found.pairs == 3 and found.interval.df == 2
    assert found.difference == pytest.approx((0.12 + 0.06 + 0.11) / 3)
    assert (found.interval.low, found.interval.high) == (pytest.approx(low), pytest.approx(high))
    # by hand: mean 0.09667, sd of (0.12, 0.06, 0.11) 0.03215, t(0.975, 2) 4.3027: half-width 0.07987
    assert found.interval.high - found.difference == pytest.approx(4.302653 * 0.0321455 / math.sqrt(3), rel=1e-4)
    # pairing removes what a seed does to both: Welch's interval on the same numbers is wider
    welch = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert welch.high - welch.low > 2 * (found.interval.high - found.interval.low)


def test_one_shared_seed_gives_a_difference_without_interval_and_none_gives_nothing():
    assert paired_interval({1: 0.5, 2: 0.6}, {2: 0.4}) == Paired(pytest.approx(0.2), 1, None)
    assert paired_interval({1: 0.5}, {2: 0.4}) is None
    same = paired_interval({1: 0.5, 2: 0.7}, {1: 0.4, 2: 0.6})  # equal differences: no spread
    assert (same.interval.low, same.interval.high) == (pytest.approx(0.1), pytest.approx(0.1))


def _gain(at_recipe: tuple[float, float], tuned: tuple[float, float]) -> MethodGain:
    """A pair whose intervals are exactly these bounds (a stand-in for what paired_interval returns)."""
    from tune_upl.comparisons import Interval

    def paired(bounds):
        return Paired(sum(bounds) / 2, 3, Interval(sum(bounds) / 2, bounds[0], bounds[1], 2.0))

    return MethodGain("a", "b", paired(at_recipe), paired(tuned))


def test_each_pair_gets_one_sentence_whether_the_lead_at_the_recipes_survives_tuning():
    assert _gain((0.01, 0.05), (0.02, 0.04)).verdict() == "`a`'s lead over `b` at the recipes survives tuning."
    assert _gain((0.01, 0.05), (-0.01, 0.03)).verdict() == (
        "`a` leads `b` at the recipes; tuned, these seeds cannot tell them apart (the interval contains 0).")
    assert _gain((0.01, 0.05), (-0.04, -0.01)).verdict() == (
        "`a` leads `b` at the recipes; tuning reverses it: tuned, `b` leads.")
    assert _gain((-0.01, 0.05), (0.01, 0.02)).verdict() == (
        "At the recipes these seeds cannot tell `a` from `b` (the interval contains 0); tuned, `a` leads.")
    assert MethodGain("a", "b", Paired(0.1, 1, None), None).verdict() == (
        "At the recipes these seeds cannot tell `a` from `b` (fewer than 2 shared seeds).")


def test_the_method_gain_starts_from_the_best_recipe_and_pairs_each_side_by_seed():
    recipes = {"x": {1: 0.40, 2: 0.42}, "y": {1: 0.50, 2: 0.56}, "z": {1: 0.30, 2: 0.20}}
    tuned = {"x": {1: 0.60, 2: 0.62}, "y": {1: 0.55, 2: 0.57}, "z": {1: 0.50}}
    gains = method_gains(recipes, tuned)
    assert [(g.best, g.other) for g in gains] == [("y", "x"), ("y", "z")]
    assert gains[0].at_recipe.difference == pytest.approx(0.12) and gains[0].tuned.difference == pytest.approx(-0.05)
    assert gains[1].tuned.pairs == 1 and gains[1].tuned.interval is None  # z's second seed was not tested
    assert method_gains({"x": {1: 0.4}}, tuned) == []


def test_the_report_section_shows_each_recipe_its_tuned_selection_and_both_gains_paired_by_seed():
    from pathlib import Path

    from tune_upl.report import gains_section
    from tune_upl.results import ExperimentData, FinalResult

    def final(loss, tuned, recipe):
        config = {"data_name": "cub", "backbone_type": "resnet50", "loss_name": loss, "feature_dim": 512}
        runs = [{"seed": seed, "test_recall@1": value} for seed, value in tuned.items()]
        recipes = [{"seed": seed, "test_recall@1": value} for seed, value in recipe.items()]
        return FinalResult(loss, {"key": loss, "config": config, "test_selected": {}}, runs, recipes)

    a_recipe, a_tuned = {1: 0.60, 2: 0.62, 3: 0.61}, {1: 0.63, 2: 0.66, 3: 0.64}
    b_recipe, b_tuned = {1: 0.55, 2: 0.56, 3: 0.56}, {1: 0.64, 2: 0.65, 3: 0.63}
    data = ExperimentData(Path("x"), {"name": "x", "recipe_runs": True}, {}, {}, True, None, None, None,
                          [final("proxy_anchor", a_tuned, a_recipe), final("proxy_nca", b_tuned, b_recipe)])
    lines = "\n".join(gains_section(data)).splitlines()
    named = ("proxy_anchor", "proxy_nca", "`proxy_anchor` − `proxy_nca`")
    rows = {cells[0]: cells for cells in map(_cells, lines) if cells[0] in named}
    assert rows["proxy_anchor"][1:3] == ["61.0 ± 1.0%", "64.3 ± 1.5%"]
    assert _close(_paired(rows["proxy_anchor"][3]), _expected_paired(a_tuned, a_recipe))
    assert _paired(rows["proxy_nca"][3])[1] > 0  # tuned beats the recipe at every seed: its interval excludes 0
    assert _close(_paired(rows["`proxy_anchor` − `proxy_nca`"][1]), _expected_paired(a_recipe, b_recipe))
    assert _close(_paired(rows["`proxy_anchor` − `proxy_nca`"][2]), _expected_paired(a_tuned, b_tuned))
    assert "- `proxy_anchor` leads `proxy_nca` at the recipes; tuned, these seeds cannot tell them apart (the " \
           "interval contains 0)." in lines


# ---------------------------------------------------------------- the spec and the plan
def test_recipe_runs_are_refused_where_there_is_no_final_stage_or_no_one_loss():
    with pytest.raises(SpecError, match=r"recipe_runs: protocol seed has no final stage"):
        parse_spec({**MINI, "recipe_runs": True, "protocol": "seed", "objective": {"metric": "test_recall@1"}})
    with pytest.raises(SpecError, match=r"recipe_runs: loss_name is searched"):
        parse_spec({**MINI, "recipe_runs": True, "space": {**MINI["space"], "loss_name": {"choice": LOSSES}}})


def test_a_recipe_keeps_the_studys_fixed_values_and_sets_what_the_search_chose_even_outside_its_range():
    spec = parse_spec({**MINI, "recipe_runs": True, "studies": {"loss_name": ["proxy_anchor"]},
                       "space": {**MINI["space"], "scale": {"choice": [16, 32]}}})
    (study,) = plan_studies(spec, {"num_workers": 0})
    held = {*spec.fixed, "loss_name", "num_workers"}
    published = {"lr": 0.05, "num_epochs": 20, "batch_size": 120, "optimizer": "adamw", "num_workers": 4}
    config = recipe_config(study.base, held, published, study.key)
    cfg = make_config(config)
    assert cfg.lr == 0.05  # outside the searched range [1e-4, 1e-2]: the recipe's all the same
    assert (cfg.batch_size, cfg.optimizer) == (120, "adamw")  # not held: the recipe's
    assert (cfg.num_epochs, cfg.num_workers) == (3, 0)  # held by the spec and the command line: the study's
    assert cfg.scale == FIELD_DEFAULTS["scale"] and "scale" not in config  # searched, not named: the seed's
    assert final_runs(spec) == 2 * spec.final_seeds  # each final seed's run and its recipe run
    with pytest.raises(SpecError, match=r"recipe_runs: the recipe of proxy_anchor .* study loss_name=proxy_anchor: "):
        recipe_config(study.base, held, {"loss_anchor": "proxy"}, study.key)  # an axis proxy_anchor does not have


def test_the_dry_run_counts_the_recipe_runs_in_the_final_stage():
    from tune_upl.experiment import describe

    spec = parse_spec(RECIPES)
    assert "  final stage: 2 seeds per study (+ 2 recipe runs: the loss's recipe, same seeds), " in describe(
        spec, plan_studies(spec, {}))


# ---------------------------------------------------------------- the searcher
def _searcher(folder, **changes):
    from tune_upl.multistudy import Session, StudySearcher

    spec = parse_spec({**RECIPES, "studies": {"loss_name": ["proxy_anchor"]}, **changes})
    studies = plan_studies(spec, {"cache_dir": str(folder)})
    return spec, studies, StudySearcher(spec, studies, Session(folder, None, 10))


def test_each_final_seed_runs_the_selection_and_the_recipe_and_a_resume_reruns_neither_once_finished(tmp_path):
    from ray.tune.search import Searcher

    from tune_upl.ray_private import stub_trial

    spec, (study,), searcher = _searcher(tmp_path)
    searcher.set_max_concurrency(10)
    for tid in ("s0", "s1"):
        searcher.suggest(tid)
    searcher.on_trial_complete("s0", {"val_recall@1": 0.5, "training_iteration": 1})
    searcher.on_trial_complete("s1", {"val_recall@1": 0.4, "training_iteration": 1})
    selection = searcher.decisions()[0][study.key]
    base = int(selection.config["seed"])
    assert searcher.finals(study.key) == 4
    f0, r0 = searcher.suggest("f0"), searcher.suggest("r0")  # max_concurrent 2: one pair at a time
    assert searcher.suggest("x") is None
    assert f0 == {**selection.config, "final": True, "seed": base + 1, "study": study.key}
    assert r0 == {**study.recipe, "final": True, "seed": base + 1, "study": study.key, "recipe": True}
    assert f0["seed"] == r0["seed"] == base + 1 and "recipe" not in f0
    searcher.on_trial_complete("f0", {"test_recall@1": 0.3, "training_iteration": 1})
    searcher.on_trial_complete("r0", {"test_recall@1": 0.2, "training_iteration": 1})
    searcher.save(str(tmp_path / "state.pkl"))
    lost = searcher.suggest("f1")  # started after the last save: the driver dies, Tune never saw it
    assert lost["seed"] == base + 2
    _, _, restored = _searcher(tmp_path)
    restored.set_max_concurrency(10)
    restored.restore(str(tmp_path / "state.pkl"))
    configs = {"s0": None, "s1": None, "f0": f0, "r0": r0}
    for tid, config in configs.items():  # Tune's restored trials, each ended
        restored.adopt(stub_trial(tid, config or {}, "TERMINATED", {"training_iteration": 1}))
    again = [restored.suggest("f1b"), restored.suggest("r1")]
    assert [(c["seed"], c.get("recipe", False)) for c in again] == [(base + 2, False), (base + 2, True)]
    for tid in ("f1b", "r1"):
        restored.on_trial_complete(tid, {"test_recall@1": 0.3, "training_iteration": 1})
    assert restored.suggest("y") == Searcher.FINISHED  # the finished recipe run of seed base+1 is not run again


def test_a_recipe_run_tune_holds_but_the_saved_searcher_lacks_is_taken_in_not_run_again(tmp_path):
    from ray.tune.search import Searcher

    from tune_upl.ray_private import stub_trial

    spec, (study,), searcher = _searcher(tmp_path, final_seeds=1, max_concurrent=1)
    searcher.set_max_concurrency(10)
    for tid in ("s0", "s1"):
        searcher.suggest(tid)
        searcher.on_trial_complete(tid, {"val_recall@1": 0.5, "training_iteration": 1})
    final = searcher.suggest("f0")
    searcher.on_trial_complete("f0", {"test_recall@1": 0.3, "training_iteration": 1})
    searcher.save(str(tmp_path / "state.pkl"))
    recipe = searcher.suggest("r0")  # Tune saved it, the searcher's state did not
    _, _, restored = _searcher(tmp_path, final_seeds=1, max_concurrent=1)
    restored.set_max_concurrency(10)
    restored.restore(str(tmp_path / "state.pkl"))
    for tid, config in (("s0", {}), ("s1", {}), ("f0", final), ("r0", recipe)):
        restored.adopt(stub_trial(tid, config, "TERMINATED", {"training_iteration": 1, "test_recall@1": 0.2}))
    assert restored.suggest("z") == Searcher.FINISHED


# ---------------------------------------------------------------- a real search and its report
def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _mean_std(text: str) -> tuple[float, float]:
    mean, std = re.fullmatch(r"([\d.]+) ± ([\d.]+)%", text).groups()
    return float(mean), float(std)


def _paired(text: str) -> tuple[float, float, float, int]:
    found = re.fullmatch(r"([+-][\d.]+) \[([+-][\d.]+), ([+-][\d.]+)\] \((\d+) seeds\)", text)
    return float(found[1]), float(found[2]), float(found[3]), int(found[4])


def _expected_paired(a: dict[int, float], b: dict[int, float]) -> tuple[float, float, float, int]:
    """In points, from scipy: the mean paired difference and its 95% t interval."""
    seeds = sorted(set(a) & set(b))
    x, y = [a[s] for s in seeds], [b[s] for s in seeds]
    low, high = stats.ttest_rel(x, y).confidence_interval(0.95)
    if math.isnan(low):  # no spread in the differences: the interval is the difference itself
        low = high = statistics.mean(x) - statistics.mean(y)
    return 100 * (statistics.mean(x) - statistics.mean(y)), 100 * low, 100 * high, len(seeds)


def _close(shown: tuple, expected: tuple) -> bool:
    """A report's number is rounded to one decimal of a point."""
    return all(abs(s - e) <= 0.05 + 1e-9 for s, e in zip(shown, expected))


@pytest.mark.slow
@pytest.mark.ray
def test_a_three_loss_search_retrains_each_recipe_with_the_final_seeds_and_reports_both_gains(
        ray_session, cache_dir, synthetic_root, tmp_path):
    from tune_upl.experiment import Options, run_search

    spec = parse_spec(RECIPES)
    overrides = {"cache_dir": cache_dir, "num_workers": 0}
    experiment = run_search(spec, overrides, Options(storage=tmp_path / "runs"))
    check_recipe_search(spec, overrides, experiment, tmp_path / "reports")


def check_recipe_search(spec, overrides, experiment, reports):
    """Every study ran its recipe with its final seeds, and the report's gains are those of the raw files."""
    from tune_upl.final import unfinished
    from tune_upl.report import write_report

    studies = plan_studies(spec, overrides)
    assert (experiment / "COMPLETE").is_file() and unfinished(spec, [s.key for s in studies], experiment) == []
    runs = []  # Tune's raw files: every trial's params and its last row
    for params in (experiment / "trials").glob("*/params.json"):
        runs.append((json.loads(params.read_text()), result_rows(params.parent / "result.json")[-1]))
    recipe, tuned = {}, {}
    for study in studies:
        loss = study.point["loss_name"]
        mine = [(c, r) for c, r in runs if c["study"] == study.key]
        search = [(c, r) for c, r in mine if not c.get("final")]
        selection = json.loads((experiment / study.key / "selection.json").read_text())
        seeds = [int(selection["config"]["seed"]) + i for i in (1, 2)]
        finals = {c["seed"]: r for c, r in mine if c.get("final") and not c.get("recipe")}
        recipes = {c["seed"]: (c, r) for c, r in mine if c.get("recipe")}
        assert len(search) == 2 and sorted(finals) == sorted(recipes) == seeds  # the same seeds, once each
        planned = json.loads(json.dumps(study.recipe))  # as params.json holds it (tuples are lists)
        for config, row in recipes.values():
            assert config == {**planned, "final": True, "seed": config["seed"], "study": study.key, "recipe": True}
            assert row["training_iteration"] == 1 and "test_recall@1" in row  # trained, then tested once
        recipe[loss] = {s: r["test_recall@1"] for s, (_, r) in recipes.items()}
        tuned[loss] = {s: r["test_recall@1"] for s, r in finals.items()}
    text = write_report(experiment, reports).read_text()
    section = text.split("## Tuning gain and method gain (recipe against tuned)")[1].split("\n## ")[0]
    rows = {cells[0]: cells for cells in map(_cells, section.splitlines()) if cells[0] in LOSSES}
    assert sorted(rows) == sorted(LOSSES)
    for loss in LOSSES:
        for shown, values in ((rows[loss][1], recipe[loss]), (rows[loss][2], tuned[loss])):
            expected = (100 * statistics.mean(values.values()), 100 * statistics.stdev(values.values()))
            assert _close(_mean_std(shown), expected), (loss, shown, values)
        assert _close(_paired(rows[loss][3]), _expected_paired(tuned[loss], recipe[loss])), (loss, rows[loss])
    best = max(LOSSES, key=lambda loss: (statistics.mean(recipe[loss].values()), -LOSSES.index(loss)))
    pairs = {cells[0]: cells for cells in map(_cells, section.splitlines()) if cells[0].startswith(f"`{best}` − ")}
    assert len(pairs) == 2, section
    for other in set(LOSSES) - {best}:
        cells = pairs[f"`{best}` − `{other}`"]
        assert _close(_paired(cells[1]), _expected_paired(recipe[best], recipe[other]))
        assert _close(_paired(cells[2]), _expected_paired(tuned[best], tuned[other]))
        assert sum(line.startswith("- ") and f"`{other}`" in line and f"`{best}`" in line
                   for line in section.splitlines()) == 1  # one sentence per pair
    return section
