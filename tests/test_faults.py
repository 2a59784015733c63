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
    """A grid of one trial per fault, at 16 px: the drill tests what happens to trials, not what they learn."""
    spec = parse_spec({
        "name": "faults", "objective": {"metric": "test_recall@1", "mode": "max"}, "protocol": "seed",
        "searcher": {"type": "grid"}, "scheduler": {"type": "fifo"}, "num_samples": 1, "max_concurrent": 2,
        "max_failures": 1, "baseline": False,
        "fixed": {"data_name": "synthetic", "backbone_type": "tiny", "image_size": 16, "num_epochs": 2,
                  "warm_up": 0, "feature_dim": 16, "num_workers": 0, "fault_epoch": 2},
        "space": {
            "inject_fault": {"choice": ["none", "raise", "exit", "nan", "oom"]},
            "fault_times": {"choice": [1, 9], "when": {"inject_fault": ["raise"]}},
        },
    })
    storage = tmp_path_factory.mktemp("runs")
    experiment = run_search(spec, {"cache_dir": cache_dir}, Options(storage=storage))
    return experiment, write_report(experiment, tmp_path_factory.mktemp("reports")).read_text()


def _trials(experiment):
    found = {}
    for params in (experiment / "grid").glob("*/params.json"):
        config = json.loads(params.read_text())
        rows = result_rows(params.parent / "result.json")
        found[(config["inject_fault"], config.get("fault_times", 1))] = (params.parent.name, rows)
    return found


def test_every_fault_ends_only_its_own_trial(faulty_search):
    experiment, report = faulty_search
    trials = _trials(experiment)
    assert set(trials) == {("none", 1), ("raise", 1), ("raise", 9), ("exit", 1), ("nan", 1), ("oom", 1)}
    # retried once from the epoch-1 checkpoint: epoch 1 ran once, epoch 2 after the retry
    for key in [("raise", 1), ("exit", 1)]:
        assert [r["training_iteration"] for r in trials[key][1]] == [1, 2], key
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
