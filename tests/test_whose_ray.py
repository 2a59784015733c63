"""Whose Ray a search runs on: with a cluster left on the machine by `ray start --head` (found through the
`ray_current_cluster` file of the same temp folder), a search without `--address` starts its own local Ray
and leaves that cluster alone; `--address auto` joins it."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from experiments import ROOT
from searches import write_spec

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_a_search_starts_its_own_ray_beside_a_cluster_it_finds_and_joins_it_only_when_asked(tmp_path, cache_dir):
    temp = Path(tempfile.mkdtemp(prefix="wr", dir="/tmp"))  # short: Ray's socket paths live under it
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TMPDIR")}
    env.update(TMPDIR=str(temp), RAY_AUTH_MODE="disabled")
    ray = [sys.executable, "-m", "ray.scripts.scripts"]
    spec = write_spec(tmp_path, num_samples=1, final_seeds=1, fixed={**write_spec_fixed(), "num_epochs": 1})
    try:
        started = subprocess.run([*ray, "start", "--head", "--num-cpus", "2", "--include-dashboard", "false",
                                  "--disable-usage-stats"], env=env, capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stdout + started.stderr
        cluster = (temp / "ray" / "ray_current_cluster").read_text().strip()
        cluster_session = (temp / "ray" / "session_latest").resolve()

        def search(name: str, *extra: str) -> dict:
            out = subprocess.run([sys.executable, "run_search.py", "--space", str(spec), "--name", name, "--storage",
                                  str(tmp_path / "runs"), "--reports-dir", str(tmp_path / "reports"), "--cache-dir",
                                  cache_dir, *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
            assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
            ray_of = json.loads((tmp_path / "runs" / name / "record.json").read_text())["hardware"]["ray"]
            assert f"Ray: session {ray_of['session']} at {ray_of['address']}" in out.stdout
            return ray_of

        own = search("own")
        assert own["address"] != cluster and Path(own["session"]) != cluster_session
        assert Path(own["session"]).parent == temp / "ray"  # a session of its own, beside the cluster's
        status = subprocess.run([*ray, "status", "--address", cluster], env=env, capture_output=True, text=True,
                                timeout=60)
        assert status.returncode == 0, status.stderr  # the cluster is still up
        joined = search("joined", "--address", "auto")
        assert joined["address"] == cluster and Path(joined["session"]) == cluster_session
    finally:
        stop_processes_under(temp)  # not `ray stop`: it stops every Ray on the machine, the test run's too
        shutil.rmtree(temp, ignore_errors=True)


def stop_processes_under(temp: Path) -> None:
    """Kill the processes whose command line names `temp` (the cluster's GCS, raylet, workers and helpers)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(str(temp) in part for part in proc.info["cmdline"] or []):
            found.append(proc)
    for proc in found:
        found.extend(proc.children(recursive=True))
    for proc in found:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(found, timeout=30)


def write_spec_fixed() -> dict:
    from searches import MINI

    return dict(MINI["fixed"])
