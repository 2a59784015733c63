"""Trials packed onto (fake) GPUs of a two-node Ray cluster: two trials share each node's GPU at once."""
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from experiments import trial_results

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = r'''
import os, sys
from pathlib import Path
os.environ["RAY_AUTH_MODE"] = "disabled"
import ray
from ray.cluster_utils import Cluster
from tune_upl.experiment import Options, run_search
from tune_upl.spec import parse_spec

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 1})
cluster.add_node(num_cpus=2, num_gpus=1)
cluster.wait_for_nodes()
ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
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
ray.shutdown()
cluster.shutdown()
'''


@pytest.mark.slow
@pytest.mark.ray
def test_half_gpu_trials_run_two_at_once_on_each_of_two_nodes(tmp_path, cache_dir, synthetic_root):
    out = subprocess.run([sys.executable, "-c", SCRIPT, cache_dir, str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=600, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    spans = defaultdict(list)  # node -> [(start, end)] of its trials
    for rows in trial_results(tmp_path / "packed" / "main").values():
        start = rows[0]["timestamp"] - rows[0]["time_this_iter_s"]
        spans[rows[0]["node_id"]].append((start, rows[-1]["timestamp"]))
    assert len(spans) == 2 and sorted(len(v) for v in spans.values()) == [2, 2]
    for (a_start, a_end), (b_start, b_end) in spans.values():
        assert max(a_start, b_start) < min(a_end, b_end)  # the two trials of a node overlapped in time
