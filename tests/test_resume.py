"""Experiments survive their driver: refusal of a second driver, unfinished and finished folders, and a
search killed with SIGKILL (during the search, then during the final stage) that resumes and completes."""
import itertools
import json
import os
import subprocess
import sys

import optuna
import pytest
from experiments import ROOT, cli, kill_when, saved_trials, trial_results
from filelock import FileLock
from searches import MINI, write_spec

from tune_upl.spec import parse_spec


def test_a_second_driver_on_the_same_experiment_is_refused(tmp_path):
    spec, runs = write_spec(tmp_path), tmp_path / "runs"
    runs.mkdir()
    with FileLock(str(runs / ".mini.driver.lock")):  # a driver holds the experiment
        out = cli("--space", str(spec), "--storage", str(runs))
    assert out.returncode == 2
    assert "another driver is running experiment mini" in out.stderr and "Traceback" not in out.stderr


def test_existing_experiments_are_refused_or_reported(tmp_path):
    spec, runs = write_spec(tmp_path), tmp_path / "runs"
    (runs / "mini").mkdir(parents=True)
    (runs / "mini" / "search_spec.json").write_text(json.dumps({"spec": parse_spec(MINI).model_dump(mode="json"), "overrides": {}}))
    out = cli("--space", str(spec), "--storage", str(runs))
    assert out.returncode == 2
    assert out.stderr.strip() == (f"error: experiment mini in {runs} is unfinished: add --resume to continue it, "
                                  "or --overwrite to start again (the old folder is kept)")
    (runs / "mini" / "COMPLETE").write_text("done\n")
    out = cli("--space", str(spec), "--storage", str(runs), "--reports-dir", str(tmp_path))
    assert out.returncode == 0 and "experiment mini is complete already" in out.stdout
    assert (tmp_path / "mini.md").is_file()
    out = cli("--resume", "--name", "mini", "--space", str(spec), "--storage", str(runs))
    assert out.returncode == 2 and "drop --space" in out.stderr


def test_dry_run_of_every_committed_spec_starts_nothing(tmp_path, capsys):
    """In this process (the command line's own entry point), so that five specs cost no five interpreters."""
    from tune_upl.cli import main

    for spec in sorted((ROOT / "search_spaces").glob("*.yaml")):
        code = main(["--space", str(spec), "--dry-run", "--storage", str(tmp_path / "runs")])
        out = capsys.readouterr()
        assert code == 0, (spec, out.err)
        assert out.out.startswith("experiment ") and "study " in out.out
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
@pytest.mark.ray
def test_killed_search_resumes_to_exactly_num_samples_trials(tmp_path, cache_dir):
    # a checkpoint every epoch, so that a resumed trial continues from its last reported epoch (by default it
    # repeats the epochs since its last checkpoint: tests/test_faults.py checks how those are counted)
    spec = write_spec(tmp_path, fixed={**MINI["fixed"], "checkpoint_every": 1})
    runs = tmp_path / "runs"
    base = [sys.executable, "run_search.py", "--storage", str(runs), "--reports-dir", str(tmp_path),
            "--cache-dir", cache_dir]
    trials = runs / "mini" / "trials"

    def checkpointed() -> dict[str, int]:
        """Search trials by the epoch of their checkpoint in Tune's saved state, where result.json has that epoch
        too (a row alone may be newer than the state: its trial would rightly start again from scratch)."""
        rows = trial_results(trials, final=False)
        return {trial_id: epoch for trial_id, (_, epoch, final) in saved_trials(trials).items()
                if epoch and not final and len(rows.get(trial_id, [])) >= epoch}

    # 1. killed once a trial's first checkpoint is in Tune's saved state
    kill_when(base + ["--space", str(spec)], lambda: bool(checkpointed()))
    before, continued = trial_results(trials, final=False), checkpointed()
    assert 1 <= sum(map(len, before.values())) and len(before) <= 3 and continued
    # 2. resumed, then killed again during the final stage
    kill_when(base + ["--resume", "--name", "mini"],
               lambda: any(rows for rows in trial_results(runs / "mini" / "trials", final=True).values()))
    # 3. resumed to the end
    out = subprocess.run(base + ["--resume", "--name", "mini"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    after = trial_results(runs / "mini" / "trials", final=False)
    assert len(after) == 3  # exactly num_samples trials, none added by the restarts
    for trial_id, rows in after.items():
        epochs = [r["training_iteration"] for r in rows]
        assert sorted(set(epochs)) == [1, 2, 3], (trial_id, epochs)  # every trial reached its last epoch
        assert len(epochs) - len(set(epochs)) <= 1  # at most the epoch in flight at the kill ran twice
    for trial_id, epoch in continued.items():  # the interrupted trial continued from its saved checkpoint
        assert after[trial_id][:epoch] == before[trial_id][:epoch]
    lrs = [json.loads((runs / "mini" / "trials" / t / "params.json").read_text())["lr"] for t in after]
    assert lrs.count(1e-4) == 1, lrs  # the recipe (baseline) ran once: a resume does not enqueue it again
    finals = trial_results(runs / "mini" / "trials", final=True)
    assert len(finals) == 2 and all("test_recall@1" in rows[-1] for rows in finals.values())
    assert (runs / "mini" / "COMPLETE").is_file()
    report = (tmp_path / "mini.md").read_text()
    assert "± " in report and report.count("| main ") == 3


@pytest.mark.slow
@pytest.mark.ray
def test_a_grid_runs_every_study_at_once_and_a_killed_grid_resumes_counting_each_point_once(tmp_path, cache_dir):
    """Three studies of a 2-point grid in the one run of all studies: trials of all three train at the same
    time (their first epochs overlap), killed with SIGKILL once a trial has ended and resumed, each study
    has exactly its 2 points, each once, in Tune and in Optuna, and is selected."""
    spec = write_spec(tmp_path, name="grid3", searcher={"type": "grid"}, scheduler={"type": "fifo"}, num_samples=1,
                      max_concurrent=2, protocol="seed", objective={"metric": "test_recall@1", "mode": "max"},
                      resources={"cpu": 0.25}, baseline=False, studies={"margin": [0.1, 0.2, 0.3]},
                      fixed={**{k: v for k, v in MINI["fixed"].items() if k != "num_epochs"}, "image_size": 16,
                             "checkpoint_every": 1},
                      space={"num_epochs": {"choice": [2, 8]}})
    runs = tmp_path / "runs"
    base = [sys.executable, "run_search.py", "--storage", str(runs), "--reports-dir", str(tmp_path),
            "--cache-dir", cache_dir]
    trials = runs / "grid3" / "trials"

    def ended_and_running() -> bool:
        saved = saved_trials(trials)
        return (any(status == "TERMINATED" for status, _, _ in saved.values())
                and any(status != "TERMINATED" and epochs >= 1 for status, epochs, _ in saved.values()))

    kill_when(base + ["--space", str(spec)], ended_and_running)
    out = subprocess.run(base + ["--resume", "--name", "grid3"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    found = {}
    for trial_id, rows in trial_results(trials).items():
        config = json.loads((trials / trial_id / "params.json").read_text())
        found.setdefault(config["study"], []).append((config["num_epochs"], rows))
    assert sorted(found) == ["margin=0.1", "margin=0.2", "margin=0.3"]
    for key, runs_of in found.items():
        assert sorted(epochs for epochs, _ in runs_of) == [2, 8], key  # each point once
        for epochs, rows in runs_of:
            assert sorted({r["training_iteration"] for r in rows}) == list(range(1, epochs + 1))
        told = optuna.load_study(study_name=key, storage=f"sqlite:///{runs / 'grid3' / 'optuna.db'}").trials
        assert sorted(t.params["num_epochs"] for t in told if t.state.name == "COMPLETE") == [2, 8], key
        assert (runs / "grid3" / key / "selection.json").is_file()
    first_epochs = {key: [(r[0]["timestamp"] - r[0]["time_this_iter_s"], r[0]["timestamp"]) for _, r in runs_of]
                    for key, runs_of in found.items()}
    together = [combo for combo in itertools.product(*first_epochs.values())
                if max(start for start, _ in combo) < min(end for _, end in combo)]
    assert together, first_epochs  # a moment when a trial of each study was training
    assert (runs / "grid3" / "COMPLETE").is_file()
