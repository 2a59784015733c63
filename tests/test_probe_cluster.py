"""The node probe on several nodes of a local Ray `Cluster`, the driver joining it with `--address` as on a real
cluster. Each worker node is given another machine's view through its raylet's `env_vars`: a `sitecustomize` on
its PYTHONPATH (`tests/node_view`) hides a folder from that node's processes (a mount namespace) or makes its
torch see a fake GPU (the CUDA stand-in beneath torch). Slow: each cluster starts its own raylets and workers."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from experiments import ROOT, trial_results
from fake_cuda import nvml_present

VIEW = ROOT / "tests" / "node_view"

DRIVER = r'''
import json, os, sys, time
os.environ["RAY_AUTH_MODE"] = "disabled"
import ray
from ray.cluster_utils import Cluster

nodes = json.loads(sys.argv[1])  # the head's arguments, then each worker's
cluster = Cluster(initialize_head=True, head_node_args=nodes[0])
made = [cluster.head_node] + [cluster.add_node(**node) for node in nodes[1:]]
cluster.wait_for_nodes()
print("NODES " + json.dumps([node.node_id for node in made]), flush=True)
if os.environ.get("PROBE_GPUS_FIRST"):  # the probe alone, with the GPU check (torch imported on each node)
    from pathlib import Path
    from tune_upl.probe import check_nodes
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False, logging_level="WARNING")

    def import_torch():
        import torch
        return torch.cuda.device_count()

    def peer():
        """A task on every node that imports torch in a new worker (`max_calls=1`), as the probe's task does."""
        task = ray.remote(num_cpus=0, max_calls=1)(import_torch)
        start = time.perf_counter()
        ray.get([task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False)).remote()
                 for node in made])
        return time.perf_counter() - start

    peer()  # takes the workers Ray started with the nodes: the probe and the peer below each start new ones
    print("PROBE " + check_nodes(Path(os.environ["PROBE_GPUS_FIRST"]), None, "timing", [], 1, 0.5, 0.5), flush=True)
    print(f"PEER {peer():.2f}", flush=True)
from tune_upl.cli import main
code = main([*sys.argv[2:], "--address", cluster.address])
print(f"EXIT {code}", flush=True)
ray.shutdown()
cluster.shutdown()
'''


def can_hide() -> bool:
    """Whether a process here may unshare its mounts (root, or user namespaces), as `node_view` needs."""
    probe = subprocess.run([sys.executable, "-c", "import ctypes; assert ctypes.CDLL(None).unshare(0x20000) == 0"],
                           capture_output=True)
    return probe.returncode == 0


def node(cpus: int, gpus: int = 0, hide: tuple[Path, ...] = (), fake_gpus: int = 0, empty: Path = Path("/")) -> dict:
    env = {"PYTHONPATH": os.pathsep.join([str(VIEW), str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "TUNE_UPL_TEST_HIDE": os.pathsep.join(map(str, hide)), "TUNE_UPL_TEST_EMPTY": str(empty),
           "TUNE_UPL_TEST_FAKE_GPUS": str(fake_gpus) if fake_gpus else ""}
    return {"num_cpus": cpus, "num_gpus": gpus, "env_vars": env}


def drive(nodes: list[dict], *args: str, timeout: float = 900,
          env: dict[str, str] = {}) -> tuple[subprocess.CompletedProcess, list[str], int]:
    """The driver script on a fresh cluster of `nodes`: (the process, the node ids in order, the CLI's exit)."""
    out = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(nodes), *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=timeout, env={**os.environ, "RAY_AUTH_MODE": "disabled", **env})
    ids = next((json.loads(line[6:]) for line in out.stdout.splitlines() if line.startswith("NODES ")), [])
    code = next((int(line[5:]) for line in out.stdout.splitlines() if line.startswith("EXIT ")), None)
    assert code is not None, out.stdout[-3000:] + out.stderr[-5000:]
    return out, ids, code


def spec_file(tmp_path: Path, **changes) -> Path:
    spec = {"name": "probed", "searcher": {"type": "random", "seed": 0}, "scheduler": {"type": "fifo"},
            "num_samples": 2, "max_concurrent": 2, "final_seeds": 1, "baseline": False,
            "resources": {"cpu": 1, "gpu": 0},
            "fixed": {"data_name": "synthetic", "backbone_type": "tiny", "image_size": 32, "num_epochs": 1,
                      "warm_up": 0, "feature_dim": 16, "num_workers": 0},
            "space": {"lr": {"loguniform": [1.0e-4, 1.0e-2]}}}
    for key, value in changes.items():
        spec[key] = {**spec[key], **value} if isinstance(value, dict) else value
    path = tmp_path / "spec.json"  # JSON is YAML
    path.write_text(json.dumps(spec))
    return path


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.skipif(nvml_present(), reason="NVML is here: torch would count its real GPUs, not the stand-in's")
def test_four_nodes_each_missing_one_thing_are_refused_in_one_table_naming_each_node_and_its_fix(
        tmp_path, cache_dir, synthetic_root):
    """Head: does not see the storage; worker 1: no prepared dataset; worker 2: no weights file; worker 3:
    advertises a GPU its torch cannot see (the others' torch sees their one fake GPU). One table, one line per
    node, exit 2, before anything is written; the token is gone."""
    if not can_hide():
        pytest.skip("this machine does not let a process unshare its mounts: no node can be given another view")
    storage, weights, empty = tmp_path / "runs", tmp_path / "weights", tmp_path / "empty"
    for folder in (storage, weights, empty):
        folder.mkdir()
    (weights / "resnet50-0676ba61.pth").write_bytes(b"a stand-in: no trial reads it")
    prepared = Path(cache_dir) / "prepared"
    nodes = [node(1, 1, (storage,), 1, empty), node(1, 1, (prepared,), 1, empty), node(1, 1, (weights,), 1, empty),
             node(1, 1)]
    spec = spec_file(tmp_path, resources={"gpu": 1},
                     fixed={"backbone_type": "resnet50", "pretrained": "auto", "weights_dir": str(weights)})
    out, ids, code = drive(nodes, "search", "--space", str(spec), "--storage", str(storage), "--cache_dir", cache_dir)
    assert code == 2, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stderr.splitlines()
    start = lines.index("error: 4 problems on 4 of 4 nodes that can run a trial; nothing was started or written:")
    rows = lines[start + 3:start + 7]
    by_node = {i: [row for row in rows if f", node {i[:8]})" in row] for i in ids}
    assert all(len(found) == 1 for found in by_node.values()), rows
    head, no_data, no_weights, no_gpu = (by_node[i][0] for i in ids)
    assert f"does not see the storage {storage} (the driver's token .probed.probe-" in head
    assert f"mount {storage} on this node at the same path" in head
    assert re.search(rf"no prepared synthetic dataset: {prepared}/synthetic-\S+/prepared.json +run there: python "
                     rf"run_search.py prepare --data_name synthetic .*--cache_dir {cache_dir}", no_data), no_data
    assert (f"no resnet50 ImageNet weights: {weights}/resnet50-0676ba61.pth  " in no_weights
            and f"prepare --backbone_type resnet50 --weights_dir {weights}" in no_weights)
    assert re.search(r"Ray advertises 1 GPU, torch \S+ sees 0 \(CUDA_VISIBLE_DEVICES unset\) +mend the node's "
                     r"NVIDIA driver \(nvidia-smi\), or start Ray there with --num-gpus 0", no_gpu), no_gpu
    assert list(storage.iterdir()) == []  # no experiment, no token, no lock file


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.skipif(nvml_present(), reason="NVML is here: torch would count its real GPUs, not the stand-in's")
def test_a_healthy_two_node_cluster_passes_the_probe_and_runs_trials_on_the_worker_node(
        tmp_path, cache_dir, synthetic_root):
    """Both nodes see everything (and one fake GPU each): the probe says it checked 2 nodes, then the search runs,
    a trial on the worker. The probe with the GPU check (torch imported on each node, the two at once) takes at
    most 3 s more than its peer: one task on each node that imports torch (a new worker there, as the probe's)."""
    storage = tmp_path / "runs"
    nodes = [node(1, 1, fake_gpus=1), node(2, 1, fake_gpus=1)]
    spec = spec_file(tmp_path, fixed={"device": "cpu"})  # trials on the CPU: the fake GPUs cannot compute
    out, ids, code = drive(nodes, "search", "--space", str(spec), "--storage", str(storage), "--cache_dir", cache_dir,
                           "--gpus-per-trial", "0.5", "--reports-dir", str(tmp_path / "reports"),
                           env={"PROBE_GPUS_FIRST": str(tmp_path)})
    assert code == 0, out.stdout[-3000:] + out.stderr[-3000:]
    line = next(line for line in out.stdout.splitlines() if line.startswith("checked "))
    assert line.startswith("checked 2 nodes in ") and "(storage, 3 files; slowest node " in line, line
    probe = next(line[6:] for line in out.stdout.splitlines() if line.startswith("PROBE "))
    assert probe.startswith("checked 2 nodes in ") and "(storage, 0 files, GPUs and their free memory; " in probe
    seconds = float(probe.split(" in ")[1].split(" s ")[0])
    peer = float(next(line[5:] for line in out.stdout.splitlines() if line.startswith("PEER ")))
    assert seconds <= peer + 3, (probe, peer)
    print(f"\nprobe with the GPU check: {probe}\nwithout (no trial on CUDA): {line}\n"
          f"the peer (a task on each node that imports torch): {peer:.1f} s")
    rows = trial_results(storage / "probed" / "trials")
    assert ids[1] in {r[0]["node_id"] for r in rows.values()}  # a trial ran on the worker node
