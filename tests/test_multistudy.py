"""All studies of a spec in one Tune run: which study gets a free slot, each study's own Optuna study and
ASHA rungs, selections and final runs in the same run, the searcher's saved state, and a killed driver
resumed to the same end."""
import json
import math
import os
import subprocess
import sys
import time
from collections import defaultdict

import optuna
import pytest
from experiments import ROOT, kill_when, saved_trials, trial_results
from searches import MINI, write_spec

from tune_upl.planning import plan_studies
from tune_upl.ray_private import stub_trial
from tune_upl.spec import parse_spec

TWO = {
    **MINI, "name": "two", "num_samples": 4, "max_concurrent": 1, "final_seeds": 2,
    "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
    "studies": {"scale": [8.0, 64.0]},  # a field the replay below reads: a good study and a poor one
    "fixed": {**MINI["fixed"], "num_epochs": 3},
}


def two_studies(folder, **changes):
    spec = parse_spec({**TWO, **changes})
    return spec, plan_studies(spec, {"cache_dir": str(folder)})


def searcher_for(folder, **changes):
    from tune_upl.multistudy import Session, StudySearcher

    spec, studies = two_studies(folder, **changes)
    folder.mkdir(exist_ok=True)
    return spec, studies, StudySearcher(spec, studies, Session(folder, None, spec.max_concurrent * len(studies)))


def study_name(config):
    return f"scale={config['scale']}"


def test_a_free_slot_goes_to_the_study_furthest_behind_under_its_own_limit(tmp_path, capsys):
    spec, studies, searcher = searcher_for(tmp_path, max_concurrent=2)
    searcher.set_max_concurrency(3)  # the run's total (Tune's max_concurrent_trials)
    started = [study_name(searcher.suggest(f"t{i}")) for i in range(3)]
    assert started == ["scale=8.0", "scale=64.0", "scale=8.0"]  # alternating: the one furthest behind first
    assert searcher.suggest("t3") is None  # the total is reached
    searcher.on_trial_complete("t0", {"val_recall@1": 0.5, "training_iteration": 3})
    assert study_name(searcher.suggest("t4")) == "scale=64.0"  # 1 of its 6 trials started, against 2 of 6
    assert searcher.suggest("t5") is None  # 3 running again
    for tid in ("t1", "t2", "t4"):
        searcher.on_trial_complete(tid, {"val_recall@1": 0.5, "training_iteration": 4})
    assert [study_name(searcher.suggest(f"u{i}")) for i in range(3)] == ["scale=8.0", "scale=64.0", "scale=8.0"]
    searcher.set_max_concurrency(10)
    assert study_name(searcher.suggest("u3")) == "scale=64.0" and searcher.suggest("u4") is None  # 2 each: their limit


def test_final_runs_start_once_a_study_ended_and_the_searcher_then_finishes(tmp_path, capsys):
    from ray.tune.search import Searcher

    from tune_upl.multistudy import Session, StudySearcher
    from tune_upl.search import TrialLines

    spec, studies = two_studies(tmp_path, num_samples=2)
    pushed = []  # what remote storage would receive (`storage.push_file`), in order
    searcher = StudySearcher(spec, studies, Session(tmp_path, pushed.append, 4))
    lines = TrialLines(spec, ["scale"], 10, tuple(studies), searcher)
    searcher.set_max_concurrency(10)
    first = {f"t{i}": searcher.suggest(f"t{i}") for i in range(2)}  # one trial of each study (max_concurrent 1)
    assert sorted(map(study_name, first.values())) == ["scale=64.0", "scale=8.0"]
    assert searcher.suggest("t2") is None  # each study at its limit
    good = next(t for t, c in first.items() if c["scale"] == 8.0)
    searcher.on_trial_result(good, {"val_recall@1": 0.7, "training_iteration": 1})
    searcher.on_trial_complete(good, {"val_recall@1": 0.6, "training_iteration": 3})  # all its epochs
    second = searcher.suggest("t3")
    assert second["scale"] == 8.0 and not second["final"]
    assert searcher.suggest("t4") is None  # scale=8.0 at its limit, scale=64.0 still running its first
    searcher.on_trial_result("t3", {"val_recall@1": 0.65, "training_iteration": 1})
    searcher.on_trial_complete("t3", {"val_recall@1": 0.65, "training_iteration": 1})  # stopped by ASHA
    selection = json.loads((tmp_path / "scale=8.0" / "selection.json").read_text())
    assert selection["trial_id"] == good and selection["epoch"] == 1 and selection["objective"] == {"val_recall@1": 0.7}
    assert searcher.decisions()[0]["scale=8.0"].trial_id == good  # the driver's selections come from here
    assert capsys.readouterr().out == ""  # the searcher says nothing; the progress callback, after it, does:
    lines.on_trial_complete(1, [], stub_trial("t3", second, "TERMINATED", {"val_recall@1": 0.65, "training_iteration": 1}))
    said = capsys.readouterr().out.splitlines()
    assert said[0].startswith("[1/10] scale=8.0 trial t3 stopped early")
    assert said[1].startswith(f"selected trial {good} of scale=8.0 (epoch 1, val_recall@1 0.7000)")
    assert said[2].startswith("final stage scale=8.0.final") and len(said) == 3
    # the database with each asked trial (before Tune can save it) and each ended one
    assert pushed == ["optuna.db"] * 4 + ["scale=8.0/selection.json", "optuna.db"]
    curve, stopped = optuna.load_study(study_name="scale=8.0", storage=f"sqlite:///{tmp_path / 'optuna.db'}").trials
    assert curve.intermediate_values == {1: 0.7, 3: 0.6} and curve.value == 0.6  # its curve, and its last objective
    assert curve.state.name == "COMPLETE" and stopped.state.name == "PRUNED" and stopped.value == 0.65
    final = searcher.suggest("t5")  # the study's final run, before the other study has ended
    assert final["final"] is True and final["seed"] == first[good]["seed"] + 1
    assert {k: v for k, v in final.items() if k not in ("final", "seed")} == {
        k: v for k, v in first[good].items() if k not in ("final", "seed", "optuna_trial")}
    assert final["study"] == first[good]["study"] == "scale=8.0" and first[good]["optuna_trial"] == 0
    assert searcher.suggest("t6") is None  # scale=8.0 runs a final run: at its limit
    searcher.on_trial_complete("t5", {"test_recall@1": 0.5, "training_iteration": 4})
    assert searcher.suggest("t7")["seed"] == first[good]["seed"] + 2
    searcher.on_trial_complete("t7", {"test_recall@1": 0.5, "training_iteration": 4})
    assert searcher.suggest("t8") is None  # scale=64.0: one more search trial after its first ends
    poor = next(t for t in first if t != good)
    searcher.on_trial_complete(poor, None, error=True)  # an errored trial: told as failed
    assert searcher.suggest("t9")["scale"] == 64.0
    searcher.on_trial_complete("t9", None)  # ended without a score
    assert not (tmp_path / "scale=64.0" / "selection.json").exists()  # nothing reported the objective
    assert searcher.suggest("t10") == Searcher.FINISHED  # no selection, so no final runs: nothing left
    assert searcher.decisions()[1] == {"scale=64.0": "study scale=64.0: all 2 of its trials failed, so nothing could "
                                                     "be selected; see the trial errors under the trial folders"}
    lines.on_step_begin(2, [])
    assert capsys.readouterr().out.strip() == f"error: {searcher.decisions()[1]['scale=64.0']}"
    studies_db = {s.study_name: s for s in optuna.get_all_study_summaries(f"sqlite:///{tmp_path / 'optuna.db'}")}
    assert studies_db["scale=8.0"].n_trials == 2 and studies_db["scale=64.0"].n_trials == 2
    poor_study = optuna.load_study(study_name="scale=64.0", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert [t.state.name for t in poor_study.trials] == ["FAIL", "FAIL"]


def test_the_saved_state_restores_every_study_and_fails_asked_trials_tune_never_saw(tmp_path, capsys):
    spec, studies, searcher = searcher_for(tmp_path, num_samples=2)
    searcher.set_max_concurrency(10)
    a, b = searcher.suggest("a"), searcher.suggest("b")
    searcher.on_trial_complete("a", {"val_recall@1": 0.4, "training_iteration": 4})
    searcher.save(str(tmp_path / "state.pkl"))
    searcher.suggest("lost")  # asked after the save: the driver dies before Tune saves again
    _, _, restored = searcher_for(tmp_path, num_samples=2)
    restored.set_max_concurrency(10)
    restored.restore(str(tmp_path / "state.pkl"))
    restored.adopt(stub_trial("a", a, "TERMINATED", {"val_recall@1": 0.4, "training_iteration": 4}))  # as Tune adds them
    restored.adopt(stub_trial("b", b, "RUNNING", {}))
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    lost_study = study_name(a)
    again = restored.suggest("c")  # reconciled first
    states = [t.state.name for t in optuna.load_study(study_name=lost_study, storage=storage).trials]
    assert states == ["COMPLETE", "FAIL", "RUNNING"]  # the trial only Optuna knew is failed, not left running
    assert study_name(again) == lost_study  # b is still running in the other study
    assert [t.number for t in optuna.load_study(study_name=lost_study, storage=storage).trials] == [0, 1, 2]
    assert restored.suggest("d") is None
    restored.on_trial_complete("b", {"val_recall@1": 0.3, "training_iteration": 4})  # a trial from before the save
    (other,) = optuna.load_study(study_name=study_name(b), storage=storage).trials  # the baseline queued once only
    assert other.state.name == "COMPLETE" and other.value == 0.3 and other.params["lr"] == b["lr"] == 1e-4


def test_a_restore_takes_in_trials_saved_after_the_searcher_and_forgets_those_tune_lost(tmp_path):
    """Tune saves its trials and the searcher's state one file after the other (and uploads them so): a kill
    in between leaves either one newer. Restored, every study still ends with its num_samples trials, each
    Optuna trial told once, and nothing waits for a trial Tune does not have."""
    from ray.tune.search import Searcher

    from tune_upl.multistudy import StudyRouter

    spec, studies, searcher = searcher_for(tmp_path, num_samples=2, protocol="seed",
                                           objective={"metric": "test_recall@1", "mode": "max"})
    searcher.set_max_concurrency(10)
    configs = {tid: searcher.suggest(tid) for tid in ("a", "b")}  # one trial of each study
    searcher.save(str(tmp_path / "state.pkl"))  # the searcher's state knows a and b
    searcher.on_trial_complete("a", {"test_recall@1": 0.4, "training_iteration": 3})
    configs["c"] = searcher.suggest("c")  # a's study's second trial: in Tune's newer state only
    _, _, restored = searcher_for(tmp_path, num_samples=2, protocol="seed",
                                  objective={"metric": "test_recall@1", "mode": "max"})
    router = StudyRouter(spec, studies, restored)
    restored.set_max_concurrency(10)
    restored.restore(str(tmp_path / "state.pkl"))
    # Tune's state: a ended, c running; b was lost (say Tune's file was the older one for it)
    router.on_trial_add(None, stub_trial("a", configs["a"], "TERMINATED", {"test_recall@1": 0.4, "training_iteration": 3}))
    router.on_trial_add(None, stub_trial("c", configs["c"], "RUNNING", {"test_recall@1": 0.3, "training_iteration": 1}))
    again = restored.suggest("d")  # b's slot, suggested again
    assert study_name(again) == study_name(configs["b"])
    assert restored.suggest("e") is None  # c and d run: each study at its limit of 1
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    lost = optuna.load_study(study_name=study_name(configs["b"]), storage=storage).trials
    assert [t.state.name for t in lost] == ["FAIL", "RUNNING"]  # b failed, d asked
    restored.on_trial_complete("c", {"test_recall@1": 0.6, "training_iteration": 3})
    adopted = optuna.load_study(study_name=study_name(configs["a"]), storage=storage).trials
    assert [(t.state.name, t.value) for t in adopted] == [("COMPLETE", 0.4), ("COMPLETE", 0.6)]
    assert adopted[1].intermediate_values == {1: 0.3, 3: 0.6}  # its epoch from Tune's state, then its end
    assert restored.decisions()[0][study_name(configs["a"])].trial_id == "c"
    restored.on_trial_complete("d", {"test_recall@1": 0.5, "training_iteration": 3})
    assert study_name(restored.suggest("f")) == study_name(configs["b"])  # its second trial: b does not count
    restored.on_trial_complete("f", {"test_recall@1": 0.2, "training_iteration": 3})
    assert restored.suggest("g") == Searcher.FINISHED
    assert {k: v.trial_id for k, v in restored.decisions()[0].items()} == {
        study_name(configs["a"]): "c", study_name(configs["b"]): "d"}
    lost = optuna.load_study(study_name=study_name(configs["b"]), storage=storage).trials
    assert [t.state.name for t in lost] == ["FAIL", "COMPLETE", "COMPLETE"]


def test_a_restored_searcher_writes_where_the_resuming_driver_has_the_experiment_now(tmp_path):
    """Tune restores the searcher pickled when the run began: when a cloud experiment is resumed on another
    machine (another local mirror), its Optuna studies, selections and pushes go to the resuming driver's."""
    import pickle
    import shutil

    from tune_upl.multistudy import Session, resuming

    first = tmp_path / "first"
    _, _, searcher = searcher_for(first, num_samples=1, final_seeds=1)
    searcher.set_max_concurrency(2)
    a = searcher.suggest("a")
    searcher.save(str(tmp_path / "state.pkl"))
    pickled = pickle.dumps(searcher)  # as Tune keeps it in tuner.pkl
    moved = tmp_path / "moved"  # the mirror on the machine that resumes
    shutil.move(first, moved)
    pushed = []
    restored = pickle.loads(pickled)
    restored.set_max_concurrency(2)  # Tune gives it the first run's max_concurrent_trials again
    with resuming(Session(moved, pushed.append, 1)):
        restored.restore(str(tmp_path / "state.pkl"))
    restored.adopt(stub_trial("a", a, "RUNNING", {}))
    assert restored.suggest("b") is None  # the resuming driver's limit: 1 trial at once, a still running
    restored.on_trial_complete("a", {"val_recall@1": 0.5, "training_iteration": 3})
    key = study_name(a)
    assert (moved / key / "selection.json").is_file() and not first.exists()
    assert pushed == ["optuna.db", f"{key}/selection.json", "optuna.db"]
    trials = optuna.load_study(study_name=key, storage=f"sqlite:///{moved / 'optuna.db'}").trials
    assert [t.state.name for t in trials] == ["COMPLETE"]


def test_under_protocol_seed_the_searcher_finishes_only_after_every_selection(tmp_path):
    """Tune stops asking a searcher that said FINISHED, so it must not say so while a study's last trial runs:
    that trial's study would never be selected."""
    from ray.tune.search import Searcher

    _, _, searcher = searcher_for(tmp_path, num_samples=1, protocol="seed", objective={"metric": "test_recall@1", "mode": "max"})
    searcher.set_max_concurrency(2)
    a, b = searcher.suggest("a"), searcher.suggest("b")
    assert searcher.suggest("c") is None  # every trial started, one still to end
    searcher.on_trial_complete("a", {"test_recall@1": 0.5, "training_iteration": 3})
    assert searcher.suggest("c") is None
    searcher.on_trial_complete("b", {"test_recall@1": 0.4, "training_iteration": 3})
    assert searcher.suggest("c") == Searcher.FINISHED
    selections = searcher.decisions()[0]
    assert {k: s.trial_id for k, s in selections.items()} == {study_name(a): "a", study_name(b): "b"}


def test_a_restored_study_does_not_propose_its_start_up_points_again(tmp_path):
    """The sampler's random state is part of the saved state: after a resume the start-up phase carries on
    instead of starting over from the spec's seed (which proposed 3 of the first 4 points again)."""
    changes = dict(num_samples=8, max_concurrent=8, studies={"scale": [8.0]},
                   searcher={"type": "tpe", "seed": 0, "n_startup_trials": 8})
    _, _, searcher = searcher_for(tmp_path, **changes)
    searcher.set_max_concurrency(8)
    before = [searcher.suggest(f"a{i}")["lr"] for i in range(4)]  # the baseline, then 3 random points
    for i in range(4):
        searcher.on_trial_complete(f"a{i}", {"val_recall@1": 0.1 * i, "training_iteration": 3})
    searcher.save(str(tmp_path / "state.pkl"))
    _, _, restored = searcher_for(tmp_path, **changes)
    restored.set_max_concurrency(8)
    restored.restore(str(tmp_path / "state.pkl"))
    after = [restored.suggest(f"b{i}")["lr"] for i in range(4)]
    assert before[0] == 1e-4 and len(set(before + after)) == 8, (before, after)
    _, _, uninterrupted = searcher_for(tmp_path / "again", **changes)
    uninterrupted.set_max_concurrency(8)
    assert [uninterrupted.suggest(f"c{i}")["lr"] for i in range(8)] == before + after  # as if never stopped


def _replay(config):
    """Validation Recall@1 from the config alone, an epoch at a time: the scale=8 study scores near 0.8,
    the scale=64 one near 0.1 (so shared rungs would stop every trial of the poor study). An epoch of a
    search trial lasts 0.5 s: ASHA's stop must land before the trial's next epoch ends."""
    from ray import tune

    base = 0.8 if config["scale"] == 8.0 else 0.1
    if config.get("final"):
        for epoch in range(1, config["num_epochs"] + 1):
            tune.report({"epoch": epoch, **({"test_recall@1": base} if epoch == config["num_epochs"] else {})})
        return
    for epoch in range(1, config["num_epochs"] + 1):
        time.sleep(0.5)
        tune.report({"epoch": epoch, "val_recall@1": base + 0.01 * epoch - 0.1 * abs(math.log10(config["lr"]) + 3)})


@pytest.mark.ray
def test_two_studies_in_one_run_keep_their_own_optuna_studies_rungs_selections_and_final_runs(ray_session, tmp_path, capsys):
    from ray import cloudpickle

    from tune_upl.ray_private import asha_bracket
    from tune_upl.search import run_studies

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import a test module

    spec, studies = two_studies(tmp_path, num_samples=4, final_seeds=1)
    experiment = tmp_path / "two"
    experiment.mkdir()
    run_studies(spec, studies, experiment, verbose=False, at_once=2, function=_replay)
    runs = trial_results(experiment / "trials")
    params = {tid: json.loads((experiment / "trials" / tid / "params.json").read_text()) for tid in runs}
    search = {tid: rows for tid, rows in runs.items() if not params[tid]["final"]}
    by_study = defaultdict(list)
    for tid in sorted(search, key=lambda t: search[t][0]["timestamp"] - search[t][0]["time_this_iter_s"]):
        by_study[study_name(params[tid])].append(tid)
    assert {k: len(v) for k, v in by_study.items()} == {"scale=8.0": 4, "scale=64.0": 4}  # exactly num_samples each
    storage = f"sqlite:///{experiment / 'optuna.db'}"
    for key, tids in by_study.items():
        trials = optuna.load_study(study_name=key, storage=storage).trials
        assert sorted(t.params["lr"] for t in trials) == sorted(params[t]["lr"] for t in tids)  # its own only
        assert [t.state.name for t in trials] == ["COMPLETE"] * 4
        assert trials[0].params["lr"] == 1e-4  # the study's own baseline (the recipe), first
    # ASHA: the trials each study stopped are those Ray's own bracket stops on that study's results alone
    # (one trial at a time per study: their order is the order they ran); shared rungs would stop others
    for key, tids in by_study.items():
        own = asha_bracket(1, 3, 2)
        expected = set()
        for tid in tids:
            for row in search[tid]:
                epoch = row["training_iteration"]
                if own.on_result(type("T", (), {"trial_id": tid})(), epoch, row["val_recall@1"]) == "STOP" and epoch < 3:
                    expected.add(tid)
                    break
        stopped = {tid for tid in tids if len(search[tid]) < 3}
        assert stopped == expected, key
        # the study's second trial beats its first (the baseline, lr 1e-4, is the curve's worst end): on its
        # own rungs it goes on past rung 1; on rungs shared with the other study a poor one would stop there
        assert len(search[tids[1]]) > 1 and search[tids[1]][0]["val_recall@1"] >= search[tids[0]][0]["val_recall@1"]
    assert max(r["val_recall@1"] for t in by_study["scale=64.0"] for r in search[t]) < min(
        r["val_recall@1"] for t in by_study["scale=8.0"] for r in search[t])  # every poor result below every good one
    for key, tids in by_study.items():
        selection = json.loads((experiment / key / "selection.json").read_text())
        best = max(tids, key=lambda t: max(r["val_recall@1"] for r in search[t]))
        assert selection["trial_id"] == best
        finals = [params[t] for t in runs if params[t]["final"] and study_name(params[t]) == key]
        assert [f["seed"] for f in finals] == [params[best]["seed"] + 1]
        ended = max(r["timestamp"] for t in tids for r in search[t])
        assert selection["selected_at"] >= ended - 1
    lines = capsys.readouterr().out
    assert lines.count("selected trial ") == 2 and "[10/10] " in lines
    said = lines.splitlines()
    for key, tids in by_study.items():  # a study's selection is said after the line of each of its trials
        selected = next(i for i, line in enumerate(said) if line.startswith("selected trial ") and f" of {key} " in line)
        lines_of_trials = [i for i, line in enumerate(said) for tid in tids if line.startswith("[") and f" trial {tid} " in line]
        assert len(lines_of_trials) == 4 and max(lines_of_trials) < selected, said


@pytest.mark.slow
@pytest.mark.ray
def test_a_killed_driver_of_two_studies_resumes_to_the_same_end(tmp_path, cache_dir, synthetic_root):
    spec = write_spec(tmp_path, name="mini", num_samples=2, final_seeds=1, studies={"feature_dim": [8, 16]},
                      fixed={k: v for k, v in MINI["fixed"].items() if k != "feature_dim"} | {"num_epochs": 2},
                      max_concurrent=1)
    runs = tmp_path / "runs"
    base = [sys.executable, "run_search.py", "--storage", str(runs), "--reports-dir", str(tmp_path),
            "--cache-dir", cache_dir]
    folder = runs / "mini" / "trials"

    def ended() -> list[str]:
        """Trial folders that Tune's saved state holds as ended, with all their rows: a resume must not rerun them."""
        rows = trial_results(folder)
        folders = {(f"{tid}.final" if final else tid): (status, epoch)
                   for tid, (status, epoch, final) in saved_trials(folder).items()}
        return [f for f, (status, epoch) in folders.items() if status == "TERMINATED" and len(rows.get(f, [])) == epoch]

    kill_when(base + ["--space", str(spec)], lambda: len(ended()) >= 1)
    before, done = trial_results(folder), ended()
    assert done
    out = subprocess.run(base + ["--resume", "--name", "mini"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    after = trial_results(runs / "mini" / "trials")
    params = {t: json.loads((runs / "mini" / "trials" / t / "params.json").read_text()) for t in after}
    for dim in (8, 16):
        mine = [t for t in after if params[t]["feature_dim"] == dim]
        search, finals = [t for t in mine if not params[t]["final"]], [t for t in mine if params[t]["final"]]
        assert len(search) == 2 and len(finals) == 1, (dim, mine)  # exactly num_samples and final_seeds
        assert [params[t]["lr"] for t in search].count(1e-4) == 1  # the baseline once per study
        assert all(sorted({r["training_iteration"] for r in after[t]}) == [1, 2] for t in mine)
        assert (runs / "mini" / f"feature_dim={dim}" / "selection.json").is_file()
        trials = optuna.load_study(study_name=f"feature_dim={dim}", storage=f"sqlite:///{runs / 'mini' / 'optuna.db'}").trials
        assert sum(t.state.name == "COMPLETE" for t in trials) == 2
    for tid in done:  # nothing that had ended ran again
        assert after[tid] == before[tid]
    assert (runs / "mini" / "COMPLETE").is_file()


def test_trials_at_once_fill_the_cluster_up_to_every_studys_limit_and_the_dry_run_says_so(tmp_path):
    from experiments import cli

    from tune_upl.experiment import describe
    from tune_upl.concurrency import trials_at_once

    spec, studies = two_studies(tmp_path, max_concurrent=4, resources={"cpu": 1, "gpu": 0.5})
    six, three = studies * 3, [*studies, studies[0]]
    assert trials_at_once(spec, six, {"CPU": 16.0, "GPU": 8.0}) == 16  # 16 slots, 24 wanted
    assert trials_at_once(spec, three, {"CPU": 16.0, "GPU": 8.0}) == 12  # every study at its limit
    assert trials_at_once(spec, six, {"CPU": 16.0, "GPU": 2.0}) == 4  # the GPUs hold 4
    assert trials_at_once(spec, six, None) == 24  # a growing cluster: the studies' limits
    capped = spec.model_copy(update={"max_concurrent_total": 5})
    assert trials_at_once(capped, six, {"CPU": 16.0, "GPU": 8.0}) == 5
    assert ("all 2 studies in one run: up to 5 trials at once (4 per study, capped by max_concurrent_total 5), each "
            "1 CPU + 0.5 GPU: 2.5 GPUs for 5 at once") in describe(capped, studies).splitlines()[0]
    out = cli("--space", str(ROOT / "search_spaces" / "upl_optuna.yaml"), "--dry-run")
    assert out.returncode == 0, out.stderr
    assert ("all 12 studies in one run: up to 48 trials at once (4 per study), each 4 CPU + 0.5 GPU: 24 GPUs for "
            "48 at once") in out.stdout.splitlines()[0]


def test_seed_cannot_tell_studies_apart_when_final_runs_change_it():
    from tune_upl.errors import SpecError

    with pytest.raises(SpecError, match=r"studies.seed: a study's final runs retrain with seeds seed\+1"):
        parse_spec({**TWO, "studies": {"seed": [1, 2]}})
    assert parse_spec({**TWO, "studies": {"seed": [1, 2]}, "protocol": "seed",
                       "objective": {"metric": "test_recall@1", "mode": "max"}}).studies == {"seed": [1, 2]}


def test_resume_and_report_refuse_an_experiment_in_an_older_layout_in_one_line(tmp_path):
    from experiments import cli

    runs = tmp_path / "runs"
    old = runs / "two"
    (old / "scale=8.0").mkdir(parents=True)
    (old / "search_spec.json").write_text(json.dumps({"spec": parse_spec(TWO).model_dump(mode="json"), "overrides": {}}))
    (old / "scale=8.0" / "experiment_state-2026-01-01_00-00-00.json").write_text("{}")
    out = cli("--resume", "--name", "two", "--storage", str(runs))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    line = ("experiment two is in an older layout (its Tune runs scale=8.0/); tune_upl 0.1.0 is the last version "
            "that reports or resumes it: run that version for it, or start the search again with --overwrite")
    assert out.stderr.strip() == f"error: --resume: {line}"
    out = cli("report", "--name", "two", "--storage", str(runs), "--reports-dir", str(tmp_path / "reports"))
    assert out.returncode == 2 and out.stderr.strip() == f"error: {line}"
    (old / "scale=8.0").rename(old / "grid")  # a grid's own Tune run
    out = cli("--resume", "--name", "two", "--storage", str(runs))
    assert out.returncode == 2 and "(its Tune runs grid/)" in out.stderr


def test_the_default_sampler_is_the_gaussian_process_and_it_models_after_its_start_up_trials(tmp_path):
    """The spec's default searcher is `gp` (the sampler comparison's rule); after its random start-up trials
    it proposes from a model of the complete ones, through the same searcher as TPE."""
    assert parse_spec({"name": "x"}).searcher.type == "gp"
    _, _, searcher = searcher_for(tmp_path, num_samples=5, max_concurrent=1, studies={"scale": [8.0]},
                                  searcher={"type": "gp", "seed": 0, "n_startup_trials": 2})
    searcher.set_max_concurrency(1)
    for i in range(5):
        config = searcher.suggest(f"t{i}")
        lr = config["lr"]
        searcher.on_trial_complete(f"t{i}", {"val_recall@1": 1.0 - abs(math.log10(lr) + 3), "training_iteration": 3})
    study = optuna.load_study(study_name="scale=8.0", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert isinstance(searcher._book.samplers["scale=8.0"], optuna.samplers.GPSampler)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 5
    assert study.trials[0].params["lr"] == 1e-4  # the recipe first
    assert len({t.params["lr"] for t in study.trials}) == 5
