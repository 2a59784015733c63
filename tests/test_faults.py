"""Failing trials end only themselves: retried from their checkpoint, errored with a message, diverged or
out of memory; the search completes and the report says which is which."""
import json

import pytest
from experiments import result_rows

from tune_upl.config import make_config
from tune_upl.engine import train_epoch
from tune_upl.experiment import Options, run_search
from tune_upl.report import write_report
from tune_upl.spec import parse_spec
from tune_upl.errors import DivergedError, OutOfMemory


def test_a_diverging_loss_and_out_of_memory_stop_the_run_with_a_clear_error(tiny_values, small_run):
    run = small_run(make_config(tiny_values, num_epochs=2, feature_dim=16, inject_fault="nan", fault_epoch=1))
    with pytest.raises(DivergedError, match="the training loss is not finite in epoch 1"):
        train_epoch(run)
    run = small_run(make_config(tiny_values, num_epochs=2, feature_dim=16, inject_fault="oom", batch_size=32))
    with pytest.raises(OutOfMemory, match="out of memory with batch_size 32, backbone tiny, image_size 64 on cpu"):
        train_epoch(run)


@pytest.fixture(scope="module")
def faulty_search(ray_session, cache_dir, synthetic_root, tmp_path_factory):
    """A grid of one trial per fault, at 16 px: the drill tests what happens to trials, not what they learn.
    The `exit` trial saves no checkpoint before its failing epoch (checkpoint_best none, checkpoint_every 5
    > 2 epochs), so its retry starts over and reports epoch 1 twice; it learns nothing (lr 1e-9), so it is
    never the one selected."""
    spec = parse_spec({
        "name": "faults", "objective": {"metric": "test_recall@1", "mode": "max"}, "protocol": "seed",
        "searcher": {"type": "grid"}, "scheduler": {"type": "fifo"}, "num_samples": 1, "max_concurrent": 2,
        "max_failures": 1, "baseline": False,
        "fixed": {"data_name": "synthetic", "backbone_type": "tiny", "image_size": 16, "num_epochs": 2,
                  "warm_up": 0, "feature_dim": 16, "num_workers": 0, "fault_epoch": 2},
        "space": {
            "inject_fault": {"choice": ["none", "raise", "exit", "nan", "oom"]},
            "fault_times": {"choice": [1, 9], "when": {"inject_fault": ["raise"]}},
            "checkpoint_best": {"choice": ["none"], "when": {"inject_fault": ["exit"]}},
            "lr": {"choice": [1.0e-9], "when": {"inject_fault": ["exit"]}},
            "proxy_lr": {"choice": [1.0e-9], "when": {"inject_fault": ["exit"]}},
        },
    })
    storage = tmp_path_factory.mktemp("runs")
    experiment = run_search(spec, {"cache_dir": cache_dir}, Options(storage=storage))
    return experiment, write_report(experiment, tmp_path_factory.mktemp("reports")).read_text()


def _trials(experiment):
    found = {}
    for params in (experiment / "trials").glob("*/params.json"):
        config = json.loads(params.read_text())
        rows = result_rows(params.parent / "result.json")
        found[(config["inject_fault"], config.get("fault_times", 1))] = (params.parent.name, rows)
    return found


def test_every_fault_ends_only_its_own_trial(faulty_search):
    experiment, report = faulty_search
    trials = _trials(experiment)
    assert set(trials) == {("none", 1), ("raise", 1), ("raise", 9), ("exit", 1), ("nan", 1), ("oom", 1)}
    # retried once from the epoch-1 checkpoint (a new best under protocol seed): epoch 1 ran once
    assert [r["training_iteration"] for r in trials[("raise", 1)][1]] == [1, 2]
    assert [r["training_iteration"] for r in trials[("exit", 1)][1]] == [1, 1, 2]  # no checkpoint: from scratch
    assert trials[("nan", 1)][1][-1]["diverged"] is True and trials[("nan", 1)][1][-1]["test_recall@1"] == 0.0
    assert trials[("oom", 1)][1][-1]["oom"] is True
    assert "batch_size 64, backbone tiny" in trials[("oom", 1)][1][-1]["error"]

    def state(key):
        row = next(line for line in report.splitlines() if f"| {trials[key][0]} " in line)
        return [c.strip() for c in row.strip("|").split("|")][4]

    assert [state(k) for k in [("none", 1), ("raise", 1), ("exit", 1)]] == ["completed"] * 3
    assert state(("raise", 9)) == "errored" and "a training step failed (injected fault" in report
    assert state(("nan", 1)) == "diverged" and state(("oom", 1)) == "out of memory"
    assert (experiment / "COMPLETE").is_file()  # the search finished despite its failing trials


def test_a_retried_trial_counts_each_epoch_once_and_every_epoch_it_paid_for(faulty_search):
    """The exit trial failed in epoch 2 with no checkpoint after epoch 1: Tune rewound it, so epoch 1 is in
    result.json twice. Readers keep the last row of each epoch; its hours are every row's time_this_iter_s."""
    from tune_upl.results import load_experiment

    experiment, report = faulty_search
    trial_id, rows = _trials(experiment)[("exit", 1)]
    assert [r["checkpoint_dir_name"] is not None for r in rows] == [False, False, True]
    data = load_experiment(experiment)
    epochs = data.epochs[data.epochs["trial"] == trial_id]
    assert list(epochs["training_iteration"]) == [1, 2]
    for (_, row), raw in zip(epochs.iterrows(), rows[1:]):  # the last row of each epoch
        assert [row[k] for k in ("test_recall@1", "train_loss", "timestamp")] == \
            [raw[k] for k in ("test_recall@1", "train_loss", "timestamp")]
    (trial,) = data.trials[data.trials["trial"] == trial_id].to_dict("records")
    assert trial["epochs"] == 2 and trial["objective"] == max(r["test_recall@1"] for r in rows[1:])
    paid = sum(r["time_this_iter_s"] for r in rows) / 3600
    assert trial["hours"] == pytest.approx(paid, rel=1e-9)
    assert paid > rows[-1]["time_total_s"] / 3600  # Tune's own total forgot the failed attempt's epoch
    hours = data.trials["hours"].sum()
    assert hours == pytest.approx(sum(r["time_this_iter_s"] for _, rs in _trials(experiment).values() for r in rs) / 3600)
    assert f"{hours:.3f}" in report


def test_only_the_selected_trial_keeps_checkpoints_and_retrieve_embeds_its_selected_epoch(faulty_search, tmp_path):
    """Protocol seed: the selected epoch was checkpointed (a new best), pruning kept only the selected trial's
    checkpoints, and the retrieval tool embeds the test split with that epoch's model."""
    from tune_upl.retrieve import load_database

    experiment, _ = faulty_search
    selection = json.loads((experiment / "main" / "selection.json").read_text())
    holding = {p.parent.parent.name for p in (experiment / "trials").glob("*/checkpoint_*/state.pt")}
    assert holding == {selection["trial_id"]}
    assert selection["trial_id"] != _trials(experiment)[("exit", 1)][0]
    db = load_database(experiment)
    rows = result_rows(experiment / "trials" / selection["trial_id"] / "result.json")
    (row,) = [r for r in rows if r["training_iteration"] == selection["epoch"]]
    assert db.checkpoint == experiment / "trials" / selection["trial_id"] / row["checkpoint_dir_name"] / "state.pt"
    assert len(db.paths) == len(db.labels) == db.embeddings.shape[0] > 0
    # the test split embedded with the checkpoint's model scores the test Recall@1 that epoch reported
    from tune_upl.metrics import retrieval_metrics

    r1 = retrieval_metrics(db.embeddings, db.labels, (1,)).as_metrics("test")["test_recall@1"]
    assert r1 == pytest.approx(row["test_recall@1"], abs=1e-6)
