"""Search fidelity: each trial names its study, and each study's Optuna study is told what happened to
every trial (complete, pruned by ASHA, failed); a fault is never selected; studies that would merge are
refused; a study over paths has a folder the report and `retrieve` find."""
import json
import os
import subprocess
import sys

import optuna
import pytest
from experiments import ROOT, cli, result_rows
from searches import MINI

from tune_upl.layout import OPTUNA_NUMBER_KEY, STUDY_KEY, study_key
from tune_upl.telling import outcome

FAULTS = {"inject_fault": {"choice": ["none", "nan", "raise"]}, "fault_times": {"choice": [9], "when": {"inject_fault": ["raise"]}}}


def one_line(text: str) -> str:
    assert text.count("\n") == 1 and "Traceback" not in text, text
    return text.strip()


def test_a_study_key_is_one_folder_name_whatever_its_values():
    assert study_key({"data_path": "/data/cub", "loss_name": "proxy_anchor"}) == \
        "data_path=%2Fdata%2Fcub,loss_name=proxy_anchor"
    assert study_key({"data_path": "a%2Fb"}) != study_key({"data_path": "a/b"})  # % is encoded too
    assert study_key({}) == "main"
    long = study_key({"data_path": "/" + "ü" * 300})
    assert "/" not in long and len(long.encode()) <= 200 and long != study_key({"data_path": "/" + "ü" * 301})


@pytest.mark.parametrize("result, error, told", [
    ({"val_recall@1": 0.5, "training_iteration": 3}, False, ("COMPLETE", 0.5)),
    ({"val_recall@1": 0.5, "training_iteration": 1}, False, ("PRUNED", None)),  # ASHA stopped it at a rung
    ({"val_recall@1": 0.0, "training_iteration": 2, "diverged": True}, False, ("FAIL", None)),
    ({"val_recall@1": 0.0, "training_iteration": 1, "no_gpu": True}, False, ("FAIL", None)),  # its node's fault
    ({"val_recall@1": 0.4, "training_iteration": 3}, True, ("FAIL", None)),  # errored after its retries
    ({"training_iteration": 3}, False, ("FAIL", None)),
    (None, False, ("FAIL", None)),
])
def test_a_trial_is_told_complete_only_when_it_ran_all_its_epochs_and_failed_for_any_fault(result, error, told):
    state, value = outcome(result, error, 3, "val_recall@1")
    assert (state.name, value) == told


def spec_over_paths(tmp_path, synthetic_root, **changes):
    """Two studies over `data_path` (the generated images, and a link to them: two datasets, one cache)."""
    images, other = synthetic_root / "images", tmp_path / "other images"
    if not other.exists():
        other.symlink_to(images, target_is_directory=True)
    spec = {**MINI, "name": "paths", "num_samples": 4, "final_seeds": 1, "max_failures": 1, "baseline": False,
            "searcher": {"type": "random", "seed": 3},
            "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
            "studies": {"data_path": [str(images), str(other)]},
            "fixed": {**MINI["fixed"], "data_name": "folder", "image_size": 16, "fault_epoch": 2},
            "space": {**MINI["space"], **FAULTS}, **changes}
    path = tmp_path / "paths.yaml"
    path.write_text(json.dumps(spec))
    return path


def test_an_override_of_a_studies_field_or_a_study_listed_twice_is_refused_before_the_start(tmp_path, cache_dir,
                                                                                            synthetic_root):
    spec = spec_over_paths(tmp_path, synthetic_root)
    out = cli("--space", str(spec), "--storage", str(tmp_path / "runs"), "--cache_dir", cache_dir,
              "--data_path", str(tmp_path))
    assert out.returncode == 2 and one_line(out.stderr).startswith(
        f"error: --data_path {tmp_path}: data_path is listed under studies (one study per value: ")
    assert not (tmp_path / "runs").exists()
    for name, values in (("loss_name", ["proxy_anchor", "proxy_anchor"]), ("feature_dim", [16, "16"]),
                         ("proxy_lr", [0.01, 1.0e-2]), ("data_path", [str(tmp_path), str(tmp_path / "." )])):
        data = {**MINI, "studies": {name: values}, "fixed": {k: v for k, v in MINI["fixed"].items() if k != name}}
        (tmp_path / "twice.yaml").write_text(json.dumps(data))
        out = cli("--space", str(tmp_path / "twice.yaml"), "--storage", str(tmp_path / "runs"), "--dry-run")
        assert out.returncode == 2, (name, out.stdout, out.stderr)
        line = one_line(out.stderr)
        assert line.startswith("error: studies: ") and "are the same study" in line and "list each value once" in line


@pytest.fixture(scope="module")
def fidelity_search(ray_session, cache_dir, synthetic_root, tmp_path_factory):
    """A two-study random + ASHA search over two dataset folders, a third of its trials drilled to diverge
    (`nan`) or to fail every attempt (`raise`), each study tested with one final seed."""
    from tune_upl.experiment import Options, run_search
    from tune_upl.report import write_report
    from tune_upl.spec import load_spec

    folder = tmp_path_factory.mktemp("fidelity")
    spec = load_spec(spec_over_paths(folder, synthetic_root))
    experiment = run_search(spec, {"cache_dir": cache_dir}, Options(storage=folder / "runs"))
    return spec, experiment, write_report(experiment, folder / "reports").read_text()


def tune_trials(experiment):
    """Every search trial Tune ran: (its config, its result rows)."""
    return [(json.loads((p.parent / "params.json").read_text()), result_rows(p))
            for p in (experiment / "trials").glob("*/result.json") if not p.parent.name.endswith(".final")]


def test_each_optuna_study_holds_its_own_trials_told_complete_pruned_or_failed(fidelity_search):
    spec, experiment, _ = fidelity_search
    storage = f"sqlite:///{experiment / 'optuna.db'}"
    keys = [study_key({"data_path": p}) for p in spec.studies["data_path"]]
    assert sorted(s.study_name for s in optuna.get_all_study_summaries(storage)) == sorted(keys)
    seen = set()
    for config, rows in tune_trials(experiment):
        key, number = config[STUDY_KEY], config[OPTUNA_NUMBER_KEY]
        assert config["data_path"] == spec.studies["data_path"][keys.index(key)]  # the trial is its study's
        told = optuna.load_study(study_name=key, storage=storage).trials[number]
        assert {n: told.params[n] for n in told.params} == {n: config[n] for n in told.params}
        last = rows[-1]
        epochs = {r["training_iteration"]: r["val_recall@1"] for r in rows if not r.get("diverged")}
        if config["inject_fault"] != "none":
            expected = "FAIL"  # diverged at epoch 2, or raised at every attempt
        elif last["training_iteration"] < config["num_epochs"]:
            expected = "PRUNED"
        else:
            expected = "COMPLETE"
        assert told.state.name == expected, (config, rows)
        assert told.intermediate_values == pytest.approx(epochs), (config, rows)
        if expected == "COMPLETE":
            assert told.value == pytest.approx(last["val_recall@1"])
        seen.add((config["inject_fault"], expected))
    # the drill reached every case (the sampler's seed fixes which trial is drilled)
    assert {("none", "COMPLETE"), ("none", "PRUNED"), ("nan", "FAIL"), ("raise", "FAIL")} <= seen, seen


def test_no_fault_is_selected_and_each_study_over_a_path_is_reported_and_retrieved(fidelity_search, cache_dir):
    import torch

    spec, experiment, report = fidelity_search
    for data_path in spec.studies["data_path"]:
        key = study_key({"data_path": data_path})
        selection = json.loads((experiment / key / "selection.json").read_text())
        assert selection["config"]["inject_fault"] == "none" and selection["config"]["data_path"] == data_path
        (final,) = [p.parent for p in (experiment / "trials").glob("*.final/params.json")
                    if json.loads(p.read_text())[STUDY_KEY] == key]
        tested = result_rows(final / "result.json")[-1]["test_recall@1"]
        section = report.split(f"#### `{key}`")[1].split("####")[0]  # the study's own section of the report
        assert f"The selection's test R@1: {100 * tested:.1f}% over 1 final seed" in section, section
        query = torch.load(sorted(final.glob("checkpoint_*/test_embeddings.pt"))[-1], weights_only=True)["paths"][0]
        out = subprocess.run([sys.executable, "run_search.py", "retrieve", "--storage", str(experiment.parent),
                              "--name", experiment.name, "--study", key, "--cache_dir", cache_dir,
                              "--retrieval_num", "3", "--query_img_name", query,
                              "--output", str(experiment.parent / key)],
                             cwd=ROOT, capture_output=True, text=True, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
        assert out.returncode == 0 and "of 3 retrieved images share the query's class" in out.stdout, out.stderr[-2000:]
        assert list((experiment.parent / key).glob("*/grid.png"))


def test_a_study_whose_every_trial_failed_has_no_selection_and_the_search_exits_1_naming_it(
        ray_session, tmp_path, cache_dir, synthetic_root, capsys):
    from tune_upl.cli import main

    spec = tmp_path / "broken.yaml"
    spec.write_text(json.dumps({
        **MINI, "name": "broken", "num_samples": 1, "final_seeds": 1, "max_failures": 0,
        "studies": {"inject_fault": ["none", "raise"]},
        "fixed": {**MINI["fixed"], "image_size": 16, "num_epochs": 1, "fault_epoch": 1, "fault_times": 9}}))
    code = main(["search", "--space", str(spec), "--storage", str(tmp_path / "runs"), "--cache_dir", cache_dir,
                 "--reports_dir", str(tmp_path / "reports")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and err.startswith("error: search broken ended without a selection in study inject_fault=raise "
                                        "(study inject_fault=raise: all 1 of its trials failed, so nothing could be "
                                        "selected"), err
    experiment = tmp_path / "runs" / "broken"
    assert not (experiment / "inject_fault=raise" / "selection.json").exists()
    assert not [p for p in (experiment / "trials").glob("*.final/params.json")
                if json.loads(p.read_text())[STUDY_KEY] == "inject_fault=raise"]  # no final run of a fault
    assert json.loads((experiment / "inject_fault=none" / "selection.json").read_text())["config"]["inject_fault"] == "none"
    (failed,) = optuna.load_study(study_name="inject_fault=raise", storage=f"sqlite:///{experiment / 'optuna.db'}").trials
    assert failed.state.name == "FAIL"
    report = (tmp_path / "reports" / "broken.md").read_text()
    assert "## Studies without a selection" in report and "all 1 of its trials failed" in report
    assert (experiment / "COMPLETE").is_file()  # done: the other study selected and tested


def test_an_experiment_whose_trials_do_not_name_their_study_gets_one_line_from_report_and_resume(demo_search, tmp_path):
    """Written before trials named their study (Tune's saved configs hold no `study` key): the report and
    --resume say in one line which version reads it, before Ray starts."""
    import shutil

    from tune_upl.errors import ExperimentError
    from tune_upl.results import load_experiment

    _, experiment, _ = demo_search
    old = tmp_path / "runs" / experiment.name
    shutil.copytree(experiment, old)
    for state in (old / "trials").glob("experiment_state-*.json"):
        saved = json.loads(state.read_text())
        for entry in saved["trial_data"]:
            trial = json.loads(entry[0])
            assert trial["config"].pop(STUDY_KEY) == "main"
            trial["config"].pop(OPTUNA_NUMBER_KEY, None)
            entry[0] = json.dumps(trial)
        state.write_text(json.dumps(saved))
    assert load_experiment(experiment).studies == ["main"]
    with pytest.raises(ExperimentError, match=rf"^experiment {old.name} is in an older layout \(trial \S+ does not "
                                              r"name its study\); tune_upl 0.1.0 is the last version that reports"):
        load_experiment(old)
    (old / "COMPLETE").unlink()
    spec_file = old / "search_spec.json"
    spec_file.write_text(json.dumps({**json.loads(spec_file.read_text()), "location": str(old.resolve())}))
    params = sorted((old / "trials").glob("*/params.json"))[0]
    params.write_text(json.dumps({k: v for k, v in json.loads(params.read_text()).items() if k != STUDY_KEY}))
    out = cli("search", "--resume", "--name", old.name, "--storage", str(old.parent))
    assert out.returncode == 2 and one_line(out.stderr).startswith(
        f"error: --resume: experiment {old.name} is in an older layout (trial {params.parent.name} does not name its study)")
