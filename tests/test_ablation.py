"""The Unified Proxy Loss's two design axes as options: each anchor × aggregation cell trains as
`UnifiedProxyLoss` with that cell, the loss-specific fields are refused where a loss has no such parameter
(a config, a `studies` product, a searched field, the command line), and the ablation spec plans its cells."""
import itertools
import json
import statistics
from pathlib import Path

import pytest
import torch
import yaml
from syncs import step_run

from tune_upl.cli import main
from tune_upl.config import make_config
from tune_upl.errors import ConfigError, SpecError
from tune_upl.loss_axes import AGGREGATIONS, ANCHORS
from tune_upl.losses import UnifiedProxyLoss
from tune_upl.spec import parse_spec

ROOT = Path(__file__).resolve().parents[1]
CELLS = list(itertools.product(ANCHORS, AGGREGATIONS))


def test_each_cell_trains_one_step_through_trialconfig_as_the_unified_loss():
    """One optimisation step of the engine per cell (tiny backbone, one batch): its loss equals
    UnifiedProxyLoss(anchor, aggregation) on the step's own similarities; unset is the both/mean cell."""
    from tune_upl.engine import _step

    losses = {}
    for anchor, aggregation in [*CELLS, (None, None)]:
        run, images, labels = step_run("tiny", "balanced_proxy", "adamw", batch=8, scale=16.0, margin=0.2,
                                       loss_anchor=anchor, loss_aggregation=aggregation, feature_dim=16)
        run.model.train()
        with torch.no_grad():  # BatchNorm in train mode: batch statistics, the same the step sees
            similarities = run.model.head(run.forward(images))
        expected = UnifiedProxyLoss(16.0, 0.2, anchor or "both", aggregation or "mean")(similarities, labels)
        before = run.model.head.proxies.detach().clone()
        losses[(anchor, aggregation)] = _step(run, images, labels).item()
        assert losses[(anchor, aggregation)] == pytest.approx(expected.item(), rel=1e-6, abs=1e-7)
        assert not torch.equal(before, run.model.head.proxies), "the step trained nothing"
    assert len({round(losses[cell], 6) for cell in CELLS}) == 6  # six different losses: the options take effect
    assert losses[(None, None)] == pytest.approx(losses[("both", "mean")], rel=1e-6)


def test_the_loss_specific_fields_are_those_some_losses_take_and_the_report_knows_the_cells():
    """LOSS_SPECIFIC (the fields refused for a loss without them) are exactly the builder parameters some losses
    have and others lack; the cells the report marks are the losses they name."""
    from tune_upl.config import LOSS_SPECIFIC
    from tune_upl.loss_axes import DEFAULT_CELL, PROXY_ANCHOR_CELL
    from tune_upl.facts import LOSS_PARAMETERS
    from tune_upl.losses import build_loss

    params = [set(p) for p in LOSS_PARAMETERS.values()]
    assert set(LOSS_SPECIFIC) == set.union(*params) - set.intersection(*params)
    for name, marked in (("balanced_proxy", DEFAULT_CELL), ("proxy_anchor", PROXY_ANCHOR_CELL)):
        loss = build_loss(name)
        assert (loss.anchor, "mean" if loss.mean else "sum") == marked, name


def test_a_loss_specific_field_at_its_default_or_for_a_loss_with_it_is_no_error():
    # at its default a field is no choice of the user's: every config carries margin 0.1
    assert make_config(loss_name="proxy_nca", margin=0.1).margin == 0.1
    assert make_config(loss_anchor="proxy", loss_aggregation="sum").loss_anchor == "proxy"


@pytest.mark.parametrize("values, expected", [
    ({"loss_name": "proxy_nca", "margin": 0.25},
     "TrialConfig.margin = 0.25: loss_name proxy_nca has no margin; the losses that take it: balanced_proxy, "
     "proxy_anchor"),
    ({"loss_name": "proxy_anchor", "loss_anchor": "sample"},
     "TrialConfig.loss_anchor = 'sample': loss_name proxy_anchor has no loss_anchor; the losses that take it: "
     "balanced_proxy"),
    ({"loss_name": "normalized_softmax", "loss_aggregation": "sum"},
     "TrialConfig.loss_aggregation = 'sum': loss_name normalized_softmax has no loss_aggregation; the losses that "
     "take it: balanced_proxy"),
])
def test_a_loss_specific_field_is_refused_for_a_loss_without_it(values, expected):
    with pytest.raises(ConfigError) as error:
        make_config(values)
    assert str(error.value) == expected


def test_the_command_line_refuses_it_in_one_line_with_exit_2(capsys):
    assert main(["train", "--loss_name", "proxy_nca", "--margin", "0.25"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: TrialConfig.margin = '0.25': loss_name proxy_nca has no margin; the losses that take it: "
        "balanced_proxy, proxy_anchor"]


def _spec(**changes):
    data = {"name": "x", "fixed": {"data_name": "synthetic", "backbone_type": "tiny"},
            "space": {"lr": {"loguniform": [1e-4, 1e-2]}}}
    return {**data, **changes}


@pytest.mark.parametrize("changes, expected", [
    ({"studies": {"loss_name": ["balanced_proxy", "proxy_anchor"], "loss_anchor": ["proxy", "both"]}},
     "spec: the combination loss_name=proxy_anchor (studies) with loss_anchor=proxy (studies) is refused: "
     "loss_name proxy_anchor has no loss_anchor; the losses that take it: balanced_proxy"),
    ({"studies": {"loss_name": ["proxy_nca", "balanced_proxy"]},
      "fixed": {"data_name": "synthetic", "margin": 0.2}},
     "spec: the combination loss_name=proxy_nca (studies) with margin=0.2 (fixed) is refused: loss_name "
     "proxy_nca has no margin; the losses that take it: balanced_proxy, proxy_anchor"),
    ({"studies": {"loss_name": ["balanced_proxy", "proxy_nca"]}, "space": {"margin": {"uniform": [0.0, 0.3]}}},
     "spec: space.margin: searched for loss_name proxy_nca (study loss_name=proxy_nca), which has no margin; "
     "give it when: {loss_name: [balanced_proxy, proxy_anchor]}"),
    ({"fixed": {"loss_name": "proxy_anchor"}, "space": {"loss_aggregation": {"choice": ["sum", "mean"]}}},
     "spec: space.loss_aggregation: searched for loss_name proxy_anchor, which has no loss_aggregation; give it "
     "when: {loss_name: [balanced_proxy]}"),
])
def test_a_spec_that_crosses_a_loss_with_a_field_it_lacks_is_refused(changes, expected):
    with pytest.raises(SpecError) as error:
        parse_spec(_spec(**changes))
    assert str(error.value) == expected


def test_the_cells_are_searchable_and_usable_under_studies():
    parse_spec(_spec(studies={"loss_name": ["proxy_nca", "balanced_proxy"]},
                     space={"margin": {"uniform": [0.0, 0.3], "when": {"loss_name": ["balanced_proxy"]}},
                            "loss_anchor": {"choice": list(ANCHORS), "when": {"loss_name": ["balanced_proxy"]}}}))
    spec = parse_spec(_spec(studies={"loss_anchor": ["proxy", "sample"], "loss_aggregation": ["sum", "mean"]}))
    assert len(spec.study_points()) == 4


def test_a_command_line_loss_against_a_searched_field_is_refused_at_dry_run(tmp_path, capsys):
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump(_spec(space={"margin": {"uniform": [0.0, 0.3]}})))
    assert main(["search", "--space", str(path), "--dry-run", "--loss_name", "proxy_nca"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: space.margin: searched for loss_name proxy_nca, which has no margin; give it when: "
        "{loss_name: [balanced_proxy, proxy_anchor]}"]


def test_the_ablation_spec_dry_run_shows_its_twelve_cells_with_one_budget(capsys):
    assert main(["search", "--space", str(ROOT / "search_spaces" / "upl_ablation.yaml"), "--dry-run"]) == 0
    studies = [line.strip() for line in capsys.readouterr().out.splitlines() if line.strip().startswith("study ")]
    assert len(studies) == 12
    cells = {tuple(part.split("=")[1] for part in line.split(":")[0].split(",")[1:]) for line in studies}
    assert cells == set(CELLS)
    assert {line.split(": ", 1)[1].split(",")[0] for line in studies} == {"24 trials"}
    assert all(line.endswith("searching scale, margin, lr, proxy_lr") and "up to 20 epochs" in line
               and "/resnet50/balanced_proxy," in line for line in studies)
    spec = yaml.safe_load((ROOT / "search_spaces" / "upl_ablation.yaml").read_text())
    assert (spec["scheduler"], spec["protocol"], spec["final_seeds"]) == (
        {"type": "asha", "grace_period": 4, "reduction_factor": 2}, "val", 3)


# ---------------------------------------------------------------- the report's sections, from known rows
def _final(key, r1, dim=512, **loss):
    config = {"data_name": "car", "backbone_type": "resnet50", "loss_name": "balanced_proxy", "feature_dim": dim,
              "recalls": [1, 2, 4, 8], "num_epochs": 20, **loss}
    from tune_upl.results import FinalResult

    return FinalResult(key, {"key": key, "config": config, "test_selected": {}},
                       [{f"test_recall@{k}": v for k in (1, 2, 4, 8)} | {"test_map@r": v / 2} for v in r1])


def _data(finals, trials=None, epochs=None):
    import pandas as pd

    from tune_upl.results import ExperimentData

    trials = pd.DataFrame(trials or [], columns=["study", "trial", "epochs", "hours", "objective", "_config"])
    spec = {"name": "x", "num_samples": 2, "objective": {"metric": "val_recall@1", "mode": "max"}}
    return ExperimentData(Path("x"), spec, {}, {}, True, trials, pd.DataFrame(epochs or []), pd.DataFrame(), finals)


CELL_RESULTS = {("proxy", "sum"): [0.80, 0.82, 0.81], ("both", "mean"): [0.85, 0.86, 0.84],
                ("sample", "mean"): [0.79]}


def _cells_data():
    return _data([_final(f"loss_anchor={a},loss_aggregation={g}", r1, loss_anchor=a, loss_aggregation=g)
                  for (a, g), r1 in CELL_RESULTS.items()])


def test_ablation_table_marks_the_corners_and_cites_only_the_default_cell():
    from test_report import cells_of, mean_std

    from tune_upl.references import load_references
    from tune_upl.report import ablation_section, benchmark_tables

    text = "\n".join(ablation_section(_cells_data(), load_references()))
    proxy, sample, both = (cells_of(text, anchor)[0] for anchor in ANCHORS)
    assert proxy == ["proxy", f"{mean_std(CELL_RESULTS[('proxy', 'sum')])} (3 seeds, 512-d) **Proxy-Anchor**",
                     "not run"]
    assert sample == ["sample", "not run", "79.0% (1 seed, 512-d)"]
    assert both == ["both", "not run", f"{mean_std(CELL_RESULTS[('both', 'mean')])} (3 seeds, 512-d) **default**; "
                                       "published 88.5% ([seed README](#references))"]
    # the benchmark table: a row per cell, the published number beside the default cell only
    rows = {cells[1]: cells for cells in cells_of("\n".join(benchmark_tables(_cells_data(), load_references())),
                                                  "ResNet50") if len(cells) == 9}
    assert set(rows) == {"balanced_proxy", "balanced_proxy[proxy/sum]", "balanced_proxy[sample/mean]"}
    assert rows["balanced_proxy"][-1] == "[seed README](#references)" and "(88.5%, " in rows["balanced_proxy"][3]
    assert rows["balanced_proxy[proxy/sum]"][-1] == "-" and "88.5" not in rows["balanced_proxy[proxy/sum]"][3]


def test_the_loss_comparison_gives_welch_intervals_against_the_best_as_scipy_does():
    from scipy import stats

    from tune_upl.report import loss_comparison

    text = "\n".join(loss_comparison(_cells_data(), None))
    best = CELL_RESULTS[("both", "mean")]
    other = CELL_RESULTS[("proxy", "sum")]
    low, high = stats.ttest_ind(other, best, equal_var=False).confidence_interval(0.95)
    se2 = statistics.variance(other) / 3 + statistics.variance(best) / 3
    df = se2 ** 2 / ((statistics.variance(other) / 3) ** 2 / 2 + (statistics.variance(best) / 3) ** 2 / 2)
    difference = 100 * (statistics.mean(other) - statistics.mean(best))
    line = (f"- `balanced_proxy[proxy/sum]` − `balanced_proxy`: {difference:+.1f} (3 and 3 seeds), 95% interval "
            f"[{100 * low:+.1f}, {100 * high:+.1f}] ({df:.1f} df): `balanced_proxy` is better at these seeds")
    assert line == "- `balanced_proxy[proxy/sum]` − `balanced_proxy`: -4.0 (3 and 3 seeds), 95% interval " \
                   "[-6.3, -1.7] (4.0 df): `balanced_proxy` is better at these seeds"
    assert line in text.splitlines()
    assert "- `balanced_proxy[sample/mean]` − `balanced_proxy`: -6.0 (1 and 3 seeds): one seed on a side, so no " \
           "interval can be given" in text.splitlines()


def test_welch_interval_equals_scipys_and_says_when_it_holds_zero():
    from scipy import stats

    from tune_upl.comparisons import welch_interval

    a, b = [0.71, 0.74, 0.69, 0.73], [0.70, 0.66]
    found = welch_interval(a, b)
    expected = stats.ttest_ind(a, b, equal_var=False)
    assert (found.low, found.high) == pytest.approx(tuple(expected.confidence_interval(0.95)), rel=1e-12)
    assert found.df == pytest.approx(expected.df, rel=1e-12) and found.holds_zero
    assert welch_interval([0.8], b) is None
    same = welch_interval([0.8, 0.8], [0.7, 0.7])  # no spread on either side: the difference itself
    assert (same.low, same.difference, same.high, same.df) == pytest.approx((0.1, 0.1, 0.1, 2.0))


def test_embedding_sizes_give_the_best_validation_r1_and_hours_at_each_dim():
    from test_report import cells_of

    from tune_upl.comparisons import pareto_front
    from tune_upl.report import Figures, embedding_section

    runs = [("t1", 16, 0.5, [0.30, 0.40]), ("t2", 64, 0.25, [0.55]), ("t3", 64, 1.0, [0.50, 0.52]),
            ("t4", 256, 0.75, [0.45, 0.35])]
    trials = [{"study": "main", "trial": t, "epochs": len(r), "hours": h, "objective": max(r),
               "_config": {"feature_dim": d}} for t, d, h, r in runs]
    epochs = [{"study": "main", "trial": t, "training_iteration": e + 1, "val_recall@1": v}
              for t, _, _, r in runs for e, v in enumerate(r)]
    figures = Figures(Path("unused"), "x")
    figures.draw = lambda file, draw: None  # the figure is drawn in the ablation search's test
    text = "\n".join(embedding_section(_data([], trials, epochs), figures))
    assert cells_of(text, "`main`") == [["`main`", "16", "1", "0.4000 ◆", "0.500"],
                                       ["`main`", "64", "2", "0.5500 ◆", "1.250"],
                                       ["`main`", "256", "1", "0.4500", "0.750"]]
    assert pareto_front([16, 64, 64, 256], [0.4, 0.55, 0.52, 0.45]) == [0, 1]
    assert pareto_front([0.5, 0.25, 1.0, 0.75], [0.4, 0.55, 0.52, 0.45]) == [1]


# ---------------------------------------------------------------- a real ablation search, end to end
@pytest.mark.slow
def test_a_small_ablation_search_reports_its_cells_sizes_and_intervals(ray_session, cache_dir, synthetic_root,
                                                                        tmp_path):
    """2 cells × 2 final seeds on the synthetic set (tiny backbone, 1 epoch): the report's ablation table,
    embedding-size table and figure and comparison line, checked against Tune's raw result files."""
    from experiments import trial_results
    from scipy import stats
    from searches import small_ablation
    from test_report import cells_of, mean_std

    from tune_upl.experiment import Options, run_search
    from tune_upl.report import write_report

    spec = small_ablation()
    experiment = run_search(spec, {"cache_dir": cache_dir, "num_workers": 0}, Options(storage=tmp_path / "runs"))
    text = write_report(experiment, tmp_path / "reports").read_text()
    keys = {anchor: f"loss_anchor={anchor}" for anchor in ("proxy", "both")}
    one_run = experiment / "trials"  # every study's trials and final runs, in one Tune run

    def of(anchor, final):
        return {tid: rows for tid, rows in trial_results(one_run, final=final).items()
                if json.loads((one_run / tid / "params.json").read_text())["loss_anchor"] == anchor}

    r1 = {anchor: [rows[-1]["test_recall@1"] for rows in of(anchor, True).values()] for anchor in keys}
    assert [len(values) for values in r1.values()] == [2, 2]
    # the ablation table: the two cells, mean ± std over the final seeds, Proxy-Anchor's corner marked
    dims = {anchor: json.loads((experiment / key / "selection.json").read_text())["config"]["feature_dim"]
            for anchor, key in keys.items()}
    assert cells_of(text, "proxy") == [["proxy", f"{mean_std(r1['proxy'])} (2 seeds, {dims['proxy']}-d) "
                                                 "**Proxy-Anchor**", "not run"]]
    assert cells_of(text, "both") == [["both", f"{mean_std(r1['both'])} (2 seeds, {dims['both']}-d)", "not run"]]
    assert cells_of(text, "sample") == [["sample", "not run", "not run"]]
    # what each embedding size buys: best val R@1 and trial-hours per feature_dim, from the raw epochs
    for anchor, key in keys.items():
        by_dim: dict[int, list] = {}
        for tid, rows in of(anchor, False).items():
            dim = json.loads((one_run / tid / "params.json").read_text())["feature_dim"]
            by_dim.setdefault(dim, []).append(rows)
        shown = {int(cells[1]): cells[2:] for cells in cells_of(text, f"`{key}`") if len(cells) == 5}
        assert set(shown) == set(by_dim)
        for dim, runs in by_dim.items():
            best = max(row["val_recall@1"] for rows in runs for row in rows)
            hours = sum(row["time_this_iter_s"] for rows in runs for row in rows) / 3600
            assert shown[dim][0] == str(len(runs)) and shown[dim][1].split()[0] == f"{best:.4f}"
            assert shown[dim][2] == f"{hours:.3f}"
    assert (tmp_path / "reports" / spec.name / "embedding_size.png").read_bytes()[:4] == b"\x89PNG"
    assert f"![val_recall@1 against feature_dim and trial-hours]({spec.name}/embedding_size.png)" in text
    # the comparison line: the other cell against the best, with scipy's Welch interval
    label = {"proxy": "balanced_proxy[proxy/sum]", "both": "balanced_proxy[both/sum]"}
    best, other = sorted(r1, key=lambda anchor: statistics.mean(r1[anchor]), reverse=True)
    test = stats.ttest_ind(r1[other], r1[best], equal_var=False)
    low, high = test.confidence_interval(0.95)
    verdict = ("not distinguishable at these seeds" if low <= 0 <= high else
               f"`{label[best]}` is better at these seeds")
    difference = 100 * (statistics.mean(r1[other]) - statistics.mean(r1[best]))
    line = (f"- `{label[other]}` − `{label[best]}`: {difference:+.1f} (2 and 2 seeds), 95% interval "
            f"[{100 * low:+.1f}, {100 * high:+.1f}] ({test.df:.1f} df): {verdict}")
    assert line in text.splitlines()
