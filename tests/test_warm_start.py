"""Warm starts: which source study and trials a new study takes, the values its space drops, the one-line
errors, and one small real search started from the demo search's best trials, marked in its report."""
import json
import re

import optuna
import pandas as pd
import pytest
import yaml
from searches import small_demo

from tune_upl.errors import SpecError
from tune_upl.layout import COMPLETED, OPTUNA_NUMBER_KEY, SPEC_FILE, STOPPED_EARLY, WARM_START_FILE, WARM_START_KEY
from tune_upl.planning import Study, plan_studies
from tune_upl.spec import Param, parse_spec
from tune_upl.warm_start import pick, resolve, searched_values

SPACE = {"lr": Param(loguniform=(1e-4, 1e-2)), "scale": Param(choice=[16, 32]),
         "margin": Param(uniform=(0.0, 0.3), when={"loss_name": ["proxy_anchor"]})}
BASE = {"loss_name": "proxy_anchor", "backbone_type": "tiny", "data_name": "cub"}


def _config(study, loss="proxy_anchor", backbone="tiny", data="cub", **values):
    return {"loss_name": loss, "backbone_type": backbone, "data_name": data, "study": study, **values}


def _source(rows):
    """A source experiment's search table and epochs (`results.trial_rows`' columns the picking reads): rows of
    (trial, study, state, config, [per-epoch val_recall@1])."""
    trials = pd.DataFrame([{"study": s, "trial": t, "state": state, "_config": c, "_order": i}
                           for i, (t, s, state, c, _) in enumerate(rows)])
    epochs = pd.DataFrame([{"study": s, "trial": t, "training_iteration": e + 1, "val_recall@1": v}
                           for t, s, _, _, curve in rows for e, v in enumerate(curve)])
    return trials, epochs


def test_a_study_takes_the_k_best_completed_trials_of_the_matching_study_on_its_own_dataset_first():
    study = Study("data_name=cub", {"data_name": "cub"}, BASE, SPACE)
    trials, epochs = _source([
        ("a", "data_name=car", COMPLETED, _config("data_name=car", data="car", lr=1e-3, scale=16), [0.9, 0.95]),
        ("b", "data_name=cub", COMPLETED, _config("data_name=cub", lr=2e-3, scale=16, margin=0.1), [0.5, 0.6]),
        ("c", "data_name=cub", COMPLETED, _config("data_name=cub", lr=3e-3, scale=32, margin=0.2), [0.7, 0.65]),
        ("d", "data_name=cub", STOPPED_EARLY, _config("data_name=cub", lr=4e-3, scale=32), [0.99]),
        ("e", "data_name=cub", COMPLETED, _config("data_name=cub", lr=5e-3, scale=16, margin=0.3), [0.2, 0.3]),
        ("f", "data_name=cub", COMPLETED, _config("data_name=cub", loss="proxy_nca", lr=6e-3), [0.98, 0.99]),
    ])
    start = pick("cub_search", trials, epochs, study, "val_recall@1", "max", 2)
    # the same dataset's study, though car scored higher; d stopped early, f is another loss: neither counts
    assert start.source == "cub_search/data_name=cub" and start.trials == ["c", "b"]
    assert start.objectives == [0.7, 0.6]  # each trial's best epoch, not its last
    assert start.points == [{"lr": 3e-3, "scale": 32, "margin": 0.2}, {"lr": 2e-3, "scale": 16, "margin": 0.1}]
    assert start.dropped == [{}, {}]
    low = pick("cub_search", trials, epochs, study, "val_recall@1", "min", 5)  # mode min: lowest first, all 3
    assert low.trials == ["e", "b", "c"] and low.objectives == [0.2, 0.5, 0.65]
    # a CARS196 study of the same loss and backbone: no source study on its dataset, so the first by key
    car = Study("data_name=car", {"data_name": "car"}, {**BASE, "data_name": "car"}, SPACE)
    assert pick("s", trials, epochs, car, "val_recall@1", "max", 1).trials == ["a"]
    sop = Study("data_name=sop", {"data_name": "sop"}, {**BASE, "data_name": "sop"}, SPACE)
    assert pick("s", trials, epochs, sop, "val_recall@1", "max", 1).source == "s/data_name=car"
    # a sampler repeated c's values in g (its best epoch 0.68, second best overall): passed over for b
    repeat = ("g", "data_name=cub", COMPLETED, _config("data_name=cub", lr=3e-3, scale=32, margin=0.2), [0.68])
    trials, epochs = _source([*[(r["trial"], r["study"], r["state"], r["_config"], list(
        epochs.loc[epochs["trial"] == r["trial"], "val_recall@1"])) for r in trials.to_dict("records")], repeat])
    again = pick("cub_search", trials, epochs, study, "val_recall@1", "max", 2)
    assert again.trials == ["c", "b"] and again.objectives == [0.7, 0.6]


def test_values_outside_the_new_space_are_dropped_and_a_failing_when_takes_none():
    study = Study("main", {}, BASE, SPACE)
    point, dropped = searched_values(study, {"lr": 5e-2, "scale": 64, "margin": 0.25, "feature_dim": 512})
    assert point == {"margin": 0.25} and dropped == {"lr": 5e-2, "scale": 64}  # feature_dim is not searched here
    other = Study("main", {}, {**BASE, "loss_name": "proxy_nca"}, SPACE)  # margin's when fails for this loss
    assert searched_values(other, {"lr": 1e-3, "scale": 16, "margin": 0.1}) == ({"lr": 1e-3, "scale": 16}, {})
    assert searched_values(study, {"lr": 1e-3}) == ({"lr": 1e-3}, {})  # a field the source trial lacks: neither


def test_no_study_of_the_loss_and_backbone_or_no_completed_trial_is_one_error_naming_the_key():
    study = Study("main", {}, BASE, SPACE)
    trials, epochs = _source([("a", "main", COMPLETED, _config("main", backbone="resnet50", lr=1e-3), [0.5]),
                              ("b", "main", STOPPED_EARLY, _config("main", lr=1e-3), [0.5])])
    with pytest.raises(SpecError, match=r"^warm_start.experiment = 'src': study main of experiment src has no "
                                        r"completed trial that reported val_recall@1"):
        pick("src", trials, epochs, study, "val_recall@1", "max", 1)
    with pytest.raises(SpecError, match=r"^warm_start.experiment = 'src': no study of experiment src has loss_name "
                                        r"proxy_anchor, backbone_type resnet18"):
        pick("src", trials, epochs, Study("main", {}, {**BASE, "backbone_type": "resnet18"}, SPACE),
             "val_recall@1", "max", 1)


def test_the_spec_key_is_validated_on_loading_in_one_line_per_mistake():
    base = small_demo().model_dump(mode="json")

    def problem(**changes):
        with pytest.raises(SpecError) as error:
            parse_spec({**base, **changes})
        return str(error.value)

    assert parse_spec({**base, "warm_start": {"experiment": "demo", "k": 2}}).warm_start.k == 2
    assert parse_spec({**base, "warm_start": {"experiment": "/runs/demo", "k": 1}}).warm_start.experiment == "/runs/demo"
    assert problem(warm_start={"experiment": "demo", "k": 0}) == \
        "spec: warm_start.k = 0: Input should be greater than or equal to 1"
    assert problem(warm_start={"experiment": "../demo", "k": 1}).startswith(
        "spec: warm_start.experiment = '../demo': allowed: a finished experiment's name")
    assert problem(warm_start={"experiment": "demo", "k": 1, "top": 3}) == \
        "spec: warm_start.top = 3: unknown key; allowed: experiment, k"
    assert problem(warm_start={"experiment": "demo", "k": 3}) == (  # 3 samples: the baseline and 2 more
        "spec: warm_start.k = 3: a study runs num_samples = 3 trials, its baseline first; allowed: 1 to 2")
    assert problem(warm_start={"experiment": "demo", "k": 1}, searcher={"type": "grid"}, scheduler={"type": "fifo"},
                   space={"scale": {"choice": [16, 32]}}).startswith("spec: warm_start: a grid runs its own points only")


def test_the_searcher_queues_the_points_after_the_baseline_once_and_marks_their_trials(tmp_path):
    """Queued in the Optuna study when it is made, as the baseline is: a restored searcher asks them, it does
    not queue them again."""
    from searches import MINI

    from tune_upl.multistudy import Session, StudySearcher
    from tune_upl.ray_private import stub_trial

    spec = parse_spec({**MINI, "max_concurrent": 4, "num_samples": 4, "warm_start": {"experiment": "src", "k": 2},
                       "space": {**MINI["space"], "scale": {"choice": [16, 32]}}})
    studies = plan_studies(spec, {"cache_dir": str(tmp_path)})
    warm = {"main": ("src/main", [{"lr": 3e-3, "scale": 16}, {"lr": 5e-3}])}  # the second's scale was dropped

    def searcher():
        made = StudySearcher(spec, studies, Session(tmp_path, None, 4), warm)
        made.set_max_concurrency(4)
        return made

    first = searcher()
    a, b = first.suggest("a"), first.suggest("b")
    assert WARM_START_KEY not in a and a[OPTUNA_NUMBER_KEY] == 0  # the baseline first
    assert (b[WARM_START_KEY], b["lr"], b["scale"], b[OPTUNA_NUMBER_KEY]) == ("src/main", 3e-3, 16, 1)
    first.save(str(tmp_path / "state.pkl"))
    restored = searcher()
    restored.restore(str(tmp_path / "state.pkl"))
    for tid, config in (("a", a), ("b", b)):
        restored.adopt(stub_trial(tid, config, "RUNNING", {}))
    c, d = restored.suggest("c"), restored.suggest("d")
    assert (c[WARM_START_KEY], c["lr"], c[OPTUNA_NUMBER_KEY]) == ("src/main", 5e-3, 2) and c["scale"] in (16, 32)
    assert WARM_START_KEY not in d and d[OPTUNA_NUMBER_KEY] == 3  # sampled: the queue held each point once
    told = optuna.load_study(study_name="main", storage=f"sqlite:///{tmp_path / 'optuna.db'}").trials
    assert [t.user_attrs.get(WARM_START_KEY) for t in told] == [None, "src/main", "src/main", None]


def test_a_resumed_experiment_keeps_the_points_it_recorded_at_start_whatever_the_source_is_now(tmp_path):
    from tune_upl.warm_start import StudyStart, load, record

    spec = parse_spec({**small_demo().model_dump(mode="json"), "name": "warmed",
                       "warm_start": {"experiment": "gone", "k": 1}})
    studies = plan_studies(spec, {})
    kept = {"main": StudyStart("src/main", "val_recall@1", ["t1"], [0.5], [{"lr": 2e-3}], [{"scale": 8}])}
    assert record(tmp_path, kept) and not record(tmp_path, {"main": StudyStart("x/main", "m", [], [], [], [])})
    assert load(tmp_path) == kept  # written once: a resume does not replace it
    assert resolve(spec, studies, lambda name: tmp_path / name, tmp_path, resumed=True) == kept  # source not read
    with pytest.raises(SpecError, match="^warm_start.experiment = 'gone': no experiment at "):
        resolve(spec, studies, lambda name: tmp_path / name, tmp_path, resumed=False)


def _warm_spec(source, name="warmed", k=2, **changes):
    data = small_demo().model_dump(mode="json")
    return parse_spec({**data, "name": name, "warm_start": {"experiment": str(source), "k": k}, **changes})


def test_the_driver_refuses_a_missing_unfinished_or_own_source_before_ray_with_exit_2(tmp_path, cache_dir, capsys):
    from tune_upl.cli import main

    unfinished = tmp_path / "runs" / "half"
    unfinished.mkdir(parents=True)
    (unfinished / SPEC_FILE).write_text(json.dumps({"spec": small_demo().model_dump(mode="json"), "overrides": {}}))
    spec = small_demo().model_dump(mode="json")
    for source, said in (("gone", r"warm_start.experiment = 'gone': no experiment at \S+/runs/gone; allowed"),
                         ("half", r"warm_start.experiment = 'half': experiment demo at \S+ is not finished"),
                         ("warmed", r"warm_start.experiment = 'warmed': that is this experiment")):
        path = tmp_path / f"{source}.yaml"
        path.write_text(yaml.safe_dump({**spec, "name": "warmed", "warm_start": {"experiment": source, "k": 1}}))
        code = main(["search", "--space", str(path), "--storage", str(tmp_path / "runs"), "--cache-dir", cache_dir])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and re.match(f"error: {said}", err[-1]), err
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["half"]  # nothing written for the refused search


@pytest.mark.ray
def test_a_search_warm_started_from_the_demo_runs_its_best_trials_after_the_baseline(demo_search, cache_dir, tmp_path):
    from tune_upl.experiment import Options, run_search
    from tune_upl.report import write_report
    from tune_upl.results import load_experiment

    _, source, _ = demo_search
    done = load_experiment(source)
    completed = done.trials[done.trials["state"] == COMPLETED]  # best first (ASHA lets at least the best finish)
    k = 2
    best = completed.head(k)
    assert len(best) >= 1 and list(best["objective"]) == sorted(best["objective"], reverse=True)
    first = best.iloc[0]["_config"]
    # the new space leaves out the best trial's scale: it is dropped from the first point, left to the sampler
    scales = [s for s in (16, 32, 64) if s != first["scale"]]
    spec = _warm_spec(source, k=k, num_samples=k + 1, final_seeds=1, scheduler={"type": "fifo"},
                      fixed={**small_demo().fixed, "num_epochs": 1},
                      space={**small_demo().model_dump(mode="json")["space"], "scale": {"choice": scales}})
    overrides = {"cache_dir": cache_dir, "num_workers": 0}
    planned = resolve(spec, plan_studies(spec, overrides), lambda name: tmp_path / name, tmp_path / "warmed")
    assert planned["main"].trials == list(best["trial"]) and planned["main"].source == "demo/main"
    assert planned["main"].dropped[0] == {"scale": first["scale"]}

    experiment = run_search(spec, overrides, Options(storage=tmp_path / "runs", check_nodes=False))
    assert json.loads((experiment / WARM_START_FILE).read_text())["main"]["trials"] == list(best["trial"])
    ran = load_experiment(experiment).trials
    by_number = {row["_config"][OPTUNA_NUMBER_KEY]: row["_config"] for row in ran.to_dict("records")}
    assert sorted(by_number) == list(range(k + 1))  # the warm-start trials count toward num_samples
    baseline = ran.loc[ran["baseline"] == "yes", "_config"].tolist()
    assert by_number[0] in baseline and WARM_START_KEY not in by_number[0]  # the baseline first, unmarked
    for number, (_, row) in enumerate(best.iterrows(), start=1):
        config, source_config = by_number[number], row["_config"]
        assert config[WARM_START_KEY] == "demo/main"
        for name in ("lr", "feature_dim", "margin"):
            assert config[name] == source_config[name], (number, name)
        # a scale outside the new space (the first point's) was dropped: the sampler chose one
        assert config["scale"] == source_config["scale"] if source_config["scale"] in scales else config["scale"] in scales
    assert all(WARM_START_KEY not in by_number[n] for n in range(len(best) + 1, k + 1))  # sampled: unmarked
    told = optuna.load_study(study_name="main", storage=f"sqlite:///{experiment / 'optuna.db'}").trials
    # the baseline, the warm-start points (fewer than k where the source has fewer completed trials), then sampled
    assert [t.user_attrs.get(WARM_START_KEY) for t in told] == [None] + ["demo/main"] * len(best) + [None] * (k - len(best))

    report = write_report(experiment, tmp_path / "reports").read_text()
    rows = [[cell.strip() for cell in line.strip("|").split("|")]
            for line in report.split("## Leaderboard", 1)[1].split("\n## ", 1)[0].splitlines() if line.startswith("|")]
    header = rows[0]
    marked = {row[header.index("trial")] for row in rows[2:] if row[header.index("warm start")] == "yes"}
    assert marked == {row["trial"] for row in ran.to_dict("records") if WARM_START_KEY in row["_config"]}
    assert len(marked) == len(best)
    line = next(line for line in report.splitlines() if line.startswith("- `main`: "))
    assert f"{len(best)} point{'' if len(best) == 1 else 's'} from `demo/main`" in line
    assert f"{len(best)} warm-start trial{'' if len(best) == 1 else 's'} ran" in line
    assert f"point 1 (`{best.iloc[0]['trial']}`): scale={first['scale']:g}" in line
