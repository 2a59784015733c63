"""Experiments as the tests meet them: the command line in a subprocess, and Tune's raw result files.

The results are parsed here, straight from Tune's `result.json` files, never through `tune_upl.results`:
the tests check the product's readers (report, selection) against these raw files."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python run_search.py ARGS` from the repository root, without Ray's token authentication."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    return subprocess.run([sys.executable, "run_search.py", *args], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=timeout)


def kill_when(command: list[str], ready: Callable[[], bool], limit: float = 300) -> None:
    """Start the driver in its own session, wait until `ready()`, then SIGKILL the whole session."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    start = time.time()
    while not ready():
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.time() - start < limit, "the interruption point was never reached"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def result_rows(path: Path) -> list[dict[str, Any]]:
    """One trial's `result.json`: one JSON object per epoch, one per line."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def trial_results(folder: Path, final: Optional[bool] = None) -> dict[str, list[dict[str, Any]]]:
    """Every trial of an experiment's Tune experiment folder (`trials`): its rows by folder name (the trial
    id; `<id>.final` for a final run); with `final`, only the final runs or only the search trials (by
    their `params.json`)."""
    return {path.parent.name: result_rows(path) for path in folder.glob("*/result.json")
            if final is None or bool(json.loads((path.parent / "params.json").read_text()).get("final")) == final}


def saved_trials(folder: Path) -> dict[str, tuple[str, int, bool]]:
    """What Tune's saved experiment state (the newest `experiment_state-*.json` in `folder`) records of each
    trial: (status, last epoch, final run). A resume starts from this, not from `result.json`: a row written
    after the last snapshot is not a checkpoint Tune will restore. {} while no complete state file exists.
    Read through `tune_upl.ray_private` (Tune's own format; its tests check the reader against Ray's)."""
    from tune_upl.ray_private import TuneStateError, read_saved_trials

    try:
        trials = read_saved_trials(folder)
    except TuneStateError:  # none yet, or caught while Tune's sync rewrites it
        return {}
    return {t.trial_id: (t.status, t.last_result.get("training_iteration", 0), bool(t.config.get("final")))
            for t in trials}


def on_cluster(body: str, head: dict[str, int], worker: dict[str, int], *args: str,
               timeout: float = 600) -> subprocess.CompletedProcess:
    """`body` (Python, `sys.argv[1:]` = `args`) run in a fresh process against a two-node local Ray
    `Cluster` (head and one worker node, fake GPUs allowed): its own Ray, apart from the session's."""
    script = "\n".join([
        "import os, sys",
        'os.environ["RAY_AUTH_MODE"] = "disabled"',
        "import ray",
        "from ray.cluster_utils import Cluster",
        f"cluster = Cluster(initialize_head=True, head_node_args={head!r})",
        f"cluster.add_node(**{worker!r})",
        "cluster.wait_for_nodes()",
        'ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False, logging_level="WARNING")',
        body,
        "ray.shutdown()",
        "cluster.shutdown()",
    ])
    return subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
