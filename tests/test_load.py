"""Load: a search of 40 one-epoch trials, 4 at a time, completes with all 40 reported, and the driver's
memory does not grow with the number of trials."""
import psutil
import pytest
from ray import tune

from tune_upl.experiment import Options, run_search
from tune_upl.report import write_report
from tune_upl.spec import parse_spec


class DriverMemory(tune.Callback):
    """The driver's resident memory after each finished trial."""

    def __init__(self):
        self.rss_mb = []

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.rss_mb.append(psutil.Process().memory_info().rss / 2**20)


@pytest.mark.slow
def test_forty_trials_complete_and_driver_memory_stays_flat(ray_session, cache_dir, synthetic_root, tmp_path):
    spec = parse_spec({
        "name": "load", "objective": {"metric": "test_recall@1", "mode": "max"}, "protocol": "seed",
        "searcher": {"type": "random", "seed": 0}, "scheduler": {"type": "fifo"}, "num_samples": 40,
        "max_concurrent": 4, "resources": {"cpu": 0.5, "gpu": 0}, "baseline": False,
        "fixed": {"data_name": "synthetic", "backbone_type": "tiny", "image_size": 32, "num_epochs": 1,
                  "warm_up": 0, "feature_dim": 16, "num_workers": 0},
        "space": {"lr": {"loguniform": [1.0e-4, 1.0e-2]}},
    })
    memory = DriverMemory()
    experiment = run_search(spec, {"cache_dir": cache_dir}, Options(storage=tmp_path / "runs", callbacks=(memory,)))
    report = write_report(experiment, tmp_path).read_text()
    assert len(memory.rss_mb) == 40
    assert report.count("| main ") == 40 and "40 completed" in report
    after_10, after_40 = memory.rss_mb[9], memory.rss_mb[39]
    print(f"driver RSS after trial 10: {after_10:.0f} MB, after trial 40: {after_40:.0f} MB")
    assert after_40 - after_10 <= 150
