"""Experiments as the tests meet them: the command line in a subprocess, and Tune's raw result files.

The results are parsed here, straight from Tune's `result.json` files, never through `tune_upl.results`:
the tests check the product's readers (report, selection) against these raw files."""
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python run_search.py ARGS` from the repository root, without Ray's token authentication."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    return subprocess.run([sys.executable, "run_search.py", *args], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=timeout)


def result_rows(path: Path) -> list[dict[str, Any]]:
    """One trial's `result.json`: one JSON object per epoch, one per line."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def trial_results(folder: Path) -> dict[str, list[dict[str, Any]]]:
    """Every trial of one Tune experiment folder (a study, `<study>.final`, `grid`): its rows by trial id."""
    return {path.parent.name: result_rows(path) for path in folder.glob("*/result.json")}
