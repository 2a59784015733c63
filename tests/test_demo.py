"""The quick start's main job, exactly as a user runs it: `python run_search.py` (slow: about 2 minutes)."""
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.ray
def test_default_command_runs_the_demo_search_and_writes_its_report(tmp_path, cache_dir):
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "run_search.py", "--storage", str(tmp_path / "runs"),
         "--reports-dir", str(tmp_path), "--cache-dir", cache_dir],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "RAY_AUTH_MODE": "disabled"},
    )
    seconds = time.perf_counter() - start
    assert out.returncode == 0, out.stderr[-3000:]
    assert seconds < 300, f"the demo took {seconds:.0f} s"
    # 8 search trials and the final run, in one Tune run: one line each, the final run's naming its stage
    trial_lines = [line for line in out.stdout.splitlines() if re.match(r"\[\d+/9\] trial ", line)]
    assert len(trial_lines) == 8
    assert len([line for line in out.stdout.splitlines() if re.match(r"\[\d+/9\] main\.final trial ", line)]) == 1
    scores = [float(re.search(r"val_recall@1 ([0-9.]+)", line).group(1)) for line in trial_lines]
    assert max(scores) - min(scores) >= 0.2  # the space spans configurations that learn and ones that do not
    report = (tmp_path / "demo.md").read_text()
    assert "## Benchmark (test classes)" in report and report.count("| main ") == 8
    assert "Traceback" not in out.stdout + out.stderr
