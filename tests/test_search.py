"""A real Ray Tune + Optuna + ASHA search of the demo spec at reduced size, checked from Tune's raw files."""
import json
import re
import statistics

import pytest
from experiments import trial_results
from searches import SAMPLES, small_demo

from tune_upl.layout import SELECTION_FILE
from tune_upl.planning import plan_studies
from tune_upl.spec import parse_spec
from tune_upl.errors import SpecError


def test_every_trial_ran_and_reported_each_epoch(demo_search):
    spec, experiment, _ = demo_search
    trials = trial_results(experiment / "trials", final=False)
    assert len(trials) == SAMPLES
    for rows in trials.values():
        assert [r["training_iteration"] for r in rows] == list(range(1, len(rows) + 1))
        assert all(0 <= r["val_recall@1"] <= 1 and r["images_per_s"] > 0 for r in rows)
    assert max(len(rows) for rows in trials.values()) == 2  # ASHA lets the best finish


def test_checkpoints_at_rungs_and_the_last_epoch_only_the_selected_trial_keeps_them(demo_search):
    """ASHA (grace 1, factor 2) over 2 epochs decides at epoch 1: a checkpoint there and at the last epoch,
    none at other epochs; after selection only the selected trial and the final runs still hold one."""
    spec, experiment, _ = demo_search
    trials = trial_results(experiment / "trials", final=False)
    for rows in trials.values():
        assert [r["checkpoint_dir_name"] is not None for r in rows] == [True] * len(rows)  # epochs 1 (rung), 2 (last)
        assert json.loads((experiment / "trials" / rows[0]["trial_id"] / "params.json").read_text())[
            "checkpoint_epochs"] == [1]
    selected = json.loads((experiment / "main" / SELECTION_FILE).read_text())["trial_id"]
    holding = {p.parent.parent.name for p in (experiment / "trials").glob("*/checkpoint_*/state.pt")
               if not p.parent.parent.name.endswith(".final")}
    assert holding == {selected}
    for tid, rows in trial_results(experiment / "trials", final=True).items():
        assert len(list((experiment / "trials" / tid).glob("checkpoint_*/test_embeddings.pt"))) == 1


def test_rung_epochs_are_asha_milestones_rounded_up_below_the_last_epoch():
    """Planning's rung epochs (Ray's own `_Bracket` agrees: `test_ray_private`)."""
    from tune_upl.planning import rung_epochs

    assert rung_epochs(1, 2, 20) == (1, 2, 4, 8, 16) and rung_epochs(3, 2.5, 30) == (3, 8, 19)
    assert rung_epochs(1, 10, 1000) == (1, 10, 100)  # Ray's int(log 1000 / log 10) is 2: no rung at 1000
    assert rung_epochs(5, 2, 5) == () and rung_epochs(2, 3, 20) == (2, 6, 18)


def test_a_trial_checkpoints_at_its_rungs_every_few_epochs_its_last_and_new_bests_under_seed():
    from tune_upl.config import make_config
    from tune_upl.loop import checkpoint_due

    def due(cfg, scores):
        history = [{"epoch": e, "test_recall@1": v} for e, v in enumerate(scores, 1)]
        return [e for e in range(1, len(scores) + 1) if checkpoint_due(cfg, history[:e])]

    scores = [0.1, 0.3, 0.2, 0.3, 0.5, 0.4, 0.4, 0.6, 0.05, 0.1, 0.1, 0.1]
    val = make_config(num_epochs=12, checkpoint_epochs="1,2,4,8", checkpoint_every=5)
    assert due(val, scores) == [1, 2, 4, 5, 8, 10, 12]
    seed = val.replace(protocol="seed", checkpoint_epochs=(), checkpoint_every=100)
    assert due(seed, scores) == [1, 2, 5, 8, 12]  # strictly better than every earlier epoch, and the last
    assert due(seed.replace(checkpoint_best="test_recall@1:min"), scores) == [1, 9, 12]
    assert due(seed.replace(checkpoint_best="none"), scores) == [12]
    assert due(val.replace(final=True, checkpoint_epochs=()), scores) == [5, 10, 12]


def test_report_numbers_equal_the_raw_results(demo_search):
    spec, experiment, report = demo_search
    text = report.read_text()
    trials = trial_results(experiment / "trials", final=False)
    best = {tid: max(r["val_recall@1"] for r in rows) for tid, rows in trials.items()}
    for tid, value in best.items():
        row = next(line for line in text.splitlines() if f"| {tid} " in line)
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[6]) == pytest.approx(value, abs=5e-5)
    selection = json.loads((experiment / "main" / SELECTION_FILE).read_text())
    assert selection["trial_id"] == max(best, key=best.get)
    assert selection["objective"]["val_recall@1"] == pytest.approx(best[selection["trial_id"]])
    finals = trial_results(experiment / "trials", final=True)
    r1 = [rows[-1]["test_recall@1"] for rows in finals.values()]
    assert len(r1) == 2
    mean, std = 100 * statistics.mean(r1), 100 * statistics.stdev(r1)
    cell = f"{mean:.1f} ± {std:.1f}%"
    assert re.search(rf"\|\s+Tiny\s+\|\s+balanced_proxy\s+\|\s+\d+\s+\|\s+{re.escape(cell)}\s+\|", text), cell
    assert "yes" in text  # the baseline row is marked


def test_test_classes_evaluated_only_after_selection(demo_search):
    _, experiment, _ = demo_search
    trials = trial_results(experiment / "trials", final=False)
    assert not any(k.startswith("test_") for rows in trials.values() for r in rows for k in r)
    selection = json.loads((experiment / "main" / SELECTION_FILE).read_text())
    assert selection["selected_at"] >= max(r["timestamp"] for rows in trials.values() for r in rows)
    finals = trial_results(experiment / "trials", final=True)
    seeds = sorted(json.loads((experiment / "trials" / tid / "params.json").read_text())["seed"] for tid in finals)
    assert seeds == [selection["config"]["seed"] + 1, selection["config"]["seed"] + 2]
    for rows in finals.values():
        assert [r["training_iteration"] for r in rows] == [1, 2]
        assert not any(k.startswith(("test_", "val_")) for k in rows[0])  # no evaluation before the last epoch
        assert {f"test_recall@{k}" for k in (1, 2, 4, 8)} <= set(rows[-1])
        assert rows[0]["timestamp"] >= selection["selected_at"] - 1


def test_same_sampler_seed_proposes_the_same_first_configurations(demo_search, tmp_path):
    from tune_upl.multistudy import Session, StudySearcher

    spec, experiment, _ = demo_search
    study = plan_studies(spec, {"cache_dir": "/x"})[0]

    def proposals(folder):
        folder.mkdir()
        searcher = StudySearcher(spec, [study], Session(folder, None, spec.max_concurrent))
        found = []
        for i in range(SAMPLES):
            found.append({k: v for k, v in searcher.suggest(f"t{i}").items() if k in spec.space})
            searcher.on_trial_complete(f"t{i}", {"val_recall@1": 0.5, "training_iteration": 1})
        return found

    first, second = proposals(tmp_path / "a"), proposals(tmp_path / "b")
    assert first == second
    assert first[0] == {"lr": 1e-4, "scale": 32, "feature_dim": 512, "margin": 0.1}  # the baseline: seed recipe
    ran = [{k: json.loads((experiment / "trials" / tid / "params.json").read_text())[k] for k in spec.space}
           for tid in trial_results(experiment / "trials", final=False)]
    assert sorted(map(str, ran)) == sorted(map(str, first))


def test_command_line_override_fixes_a_field_and_removes_it_from_the_space():
    study = plan_studies(small_demo(), {"lr": 1e-3})[0]
    assert "lr" not in study.space and study.base["lr"] == 1e-3
    assert set(study.space) == {"scale", "feature_dim", "margin"}
    no_margin = plan_studies(small_demo(), {"loss_name": "proxy_anchor"})[0]
    assert "margin" in no_margin.space  # its when holds for proxy_anchor


def _node(cpu, gpu, alive=True):
    return {"Alive": alive, "Resources": {"CPU": cpu, **({"GPU": gpu} if gpu else {})}}


def test_one_node_must_hold_a_trials_cpus_and_gpu_together():
    """64 CPUs on the head and a GPU on each 6-CPU worker do not make a node of 8 CPUs and a GPU."""
    from tune_upl.search import check_resources

    data = small_demo().model_dump()
    nodes = [_node(64, 0), *[_node(6, 1)] * 3, _node(128, 8, alive=False)]
    data["resources"] = {"cpu": 8, "gpu": 1}
    with pytest.raises(SpecError, match=r"^resources = 8 CPU \+ 1 GPU per trial: no node of this Ray cluster holds "
                                        r"that at once \(nodes: 1 × 64 CPU \+ 0 GPU, 3 × 6 CPU \+ 1 GPU\); "
                                        r"allowed: at most the CPUs and GPU of one node together, or --autoscaling"):
        check_resources(parse_spec(data), nodes=nodes)
    assert check_resources(parse_spec(data), autoscaling=True, nodes=nodes).resources.cpu == 8
    for fits in ({"cpu": 6, "gpu": 0.5}, {"cpu": 64, "gpu": 0}):
        data["resources"] = fits
        assert check_resources(parse_spec(data), nodes=nodes).resources.gpu == fits["gpu"]


def test_impossible_gpu_request_fails_fast_or_runs_on_cpu_when_allowed():
    from tune_upl.search import check_resources

    data = small_demo().model_dump()
    data["resources"] = {"cpu": 1, "gpu": 1}
    spec, nodes = parse_spec(data), [_node(2, 0)]
    with pytest.raises(SpecError, match=r"1 GPU per trial: .*\(nodes: 1 × 2 CPU \+ 0 GPU\).*; or --allow-cpu"):
        check_resources(spec, nodes=nodes)
    assert check_resources(spec, allow_cpu=True, nodes=nodes).resources.gpu == 0
    assert check_resources(spec, allow_cpu=True, nodes=[_node(2, 1)]).resources.gpu == 1  # a GPU: none taken away
    data["resources"] = {"cpu": 64, "gpu": 0}
    with pytest.raises(SpecError, match=r"resources = 64 CPU \+ 0 GPU per trial: .*\(nodes: 1 × 2 CPU"):
        check_resources(parse_spec(data), nodes=nodes)
    assert check_resources(parse_spec(data), autoscaling=True, nodes=nodes).resources.cpu == 64


