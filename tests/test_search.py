"""A real Ray Tune + Optuna + ASHA search of the demo spec at reduced size, checked from Tune's raw files."""
import json
import re
import statistics

import pytest
from experiments import trial_results
from searches import SAMPLES, small_demo

from tune_upl.layout import SELECTION_FILE
from tune_upl.planning import plan_studies
from tune_upl.search import make_searcher
from tune_upl.spec import parse_spec
from tune_upl.errors import SpecError


def test_every_trial_ran_and_reported_each_epoch(demo_search):
    spec, experiment, _ = demo_search
    trials = trial_results(experiment / "main")
    assert len(trials) == SAMPLES
    for rows in trials.values():
        assert [r["training_iteration"] for r in rows] == list(range(1, len(rows) + 1))
        assert all(0 <= r["val_recall@1"] <= 1 and r["images_per_s"] > 0 for r in rows)
    assert max(len(rows) for rows in trials.values()) == 2  # ASHA lets the best finish


def test_report_numbers_equal_the_raw_results(demo_search):
    spec, experiment, report = demo_search
    text = report.read_text()
    trials = trial_results(experiment / "main")
    best = {tid: max(r["val_recall@1"] for r in rows) for tid, rows in trials.items()}
    for tid, value in best.items():
        row = next(line for line in text.splitlines() if f"| {tid} " in line)
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[6]) == pytest.approx(value, abs=5e-5)
    selection = json.loads((experiment / "main" / SELECTION_FILE).read_text())
    assert selection["trial_id"] == max(best, key=best.get)
    assert selection["objective"]["val_recall@1"] == pytest.approx(best[selection["trial_id"]])
    finals = trial_results(experiment / "main.final")
    r1 = [rows[-1]["test_recall@1"] for rows in finals.values()]
    assert len(r1) == 2
    mean, std = 100 * statistics.mean(r1), 100 * statistics.stdev(r1)
    cell = f"{mean:.1f} ± {std:.1f}%"
    assert re.search(rf"\|\s+Tiny\s+\|\s+balanced_proxy\s+\|\s+\d+\s+\|\s+{re.escape(cell)}\s+\|", text), cell
    assert "yes" in text  # the baseline row is marked


def test_test_classes_evaluated_only_after_selection(demo_search):
    _, experiment, _ = demo_search
    trials = trial_results(experiment / "main")
    assert not any(k.startswith("test_") for rows in trials.values() for r in rows for k in r)
    selection = json.loads((experiment / "main" / SELECTION_FILE).read_text())
    assert selection["selected_at"] >= max(r["timestamp"] for rows in trials.values() for r in rows)
    finals = trial_results(experiment / "main.final")
    seeds = sorted(json.loads((experiment / "main.final" / tid / "params.json").read_text())["seed"] for tid in finals)
    assert seeds == [selection["config"]["seed"] + 1, selection["config"]["seed"] + 2]
    for rows in finals.values():
        assert [r["training_iteration"] for r in rows] == [1, 2]
        assert not any(k.startswith(("test_", "val_")) for k in rows[0])  # no evaluation before the last epoch
        assert {f"test_recall@{k}" for k in (1, 2, 4, 8)} <= set(rows[-1])
        assert rows[0]["timestamp"] >= selection["selected_at"] - 1


def test_same_sampler_seed_proposes_the_same_first_configurations(demo_search):
    spec, experiment, _ = demo_search
    study = plan_studies(spec, {"cache_dir": "/x"})[0]

    def proposals():
        searcher = make_searcher(spec, study)
        return [{k: v for k, v in searcher.suggest(f"t{i}").items() if k in spec.space} for i in range(SAMPLES)]

    first, second = proposals(), proposals()
    assert first == second
    assert first[0] == {"lr": 1e-4, "scale": 32, "feature_dim": 512, "margin": 0.1}  # the baseline: seed recipe
    ran = [{k: json.loads((experiment / "main" / tid / "params.json").read_text())[k] for k in spec.space}
           for tid in trial_results(experiment / "main")]
    assert sorted(map(str, ran)) == sorted(map(str, first))


def test_command_line_override_fixes_a_field_and_removes_it_from_the_space():
    study = plan_studies(small_demo(), {"lr": 1e-3})[0]
    assert "lr" not in study.space and study.base["lr"] == 1e-3
    assert set(study.space) == {"scale", "feature_dim", "margin"}
    no_margin = plan_studies(small_demo(), {"loss_name": "proxy_anchor"})[0]
    assert "margin" in no_margin.space  # its when holds for proxy_anchor


def test_impossible_gpu_request_fails_fast_or_runs_on_cpu_when_allowed(ray_session):
    from tune_upl.search import check_resources

    data = small_demo().model_dump()
    data["resources"] = {"cpu": 1, "gpu": 1}
    spec = parse_spec(data)
    with pytest.raises(SpecError, match=r"resources.gpu = 1: no node of this Ray cluster has that many \(largest: 0\)"):
        check_resources(spec)
    assert check_resources(spec, allow_cpu=True).resources.gpu == 0
    data["resources"] = {"cpu": 64, "gpu": 0}
    with pytest.raises(SpecError, match=r"resources.cpu = 64: .*largest: 2"):
        check_resources(parse_spec(data))
    assert check_resources(parse_spec(data), autoscaling=True).resources.cpu == 64
