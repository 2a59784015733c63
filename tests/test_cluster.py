"""Trials packed onto (fake) GPUs of a two-node Ray cluster: two trials share each node's GPU at once."""
from collections import defaultdict

import pytest
from experiments import on_cluster, trial_results

SEARCH = r'''
from pathlib import Path
from tune_upl.experiment import Options, run_search
from tune_upl.spec import parse_spec

spec = parse_spec({
    "name": "packed", "searcher": {"type": "random", "seed": 0}, "scheduler": {"type": "fifo"},
    "num_samples": 4, "max_concurrent": 4, "resources": {"cpu": 0.5, "gpu": 0.5}, "final_seeds": 1,
    "baseline": False,
    "fixed": {"data_name": "synthetic", "backbone_type": "tiny", "image_size": 32, "num_epochs": 3,
              "warm_up": 0, "feature_dim": 16, "num_workers": 0,
              "device": "cpu"},  # the GPUs are fake: a GPU trial with `auto` would fail, seeing no CUDA
    "space": {"lr": {"loguniform": [1.0e-4, 1.0e-2]}},
})
run_search(spec, {"cache_dir": sys.argv[1]}, Options(storage=Path(sys.argv[2])))
'''


@pytest.mark.slow
@pytest.mark.ray
def test_half_gpu_trials_run_two_at_once_on_each_of_two_nodes(tmp_path, cache_dir, synthetic_root):
    node = {"num_cpus": 2, "num_gpus": 1}
    out = on_cluster(SEARCH, node, node, cache_dir, str(tmp_path))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    spans = defaultdict(list)  # node -> [(start, end)] of its trials
    for rows in trial_results(tmp_path / "packed" / "trials", final=False).values():
        start = rows[0]["timestamp"] - rows[0]["time_this_iter_s"]
        spans[rows[0]["node_id"]].append((start, rows[-1]["timestamp"]))
    assert len(spans) == 2 and sorted(len(v) for v in spans.values()) == [2, 2]
    for (a_start, a_end), (b_start, b_end) in spans.values():
        assert max(a_start, b_start) < min(a_end, b_end)  # the two trials of a node overlapped in time
