"""Markdown report of an experiment, read offline from Tune's experiment folders.

Built from Tune's results (`ray.tune.ExperimentAnalysis`, which needs no running Ray), never from the
Optuna study: Optuna marks trials that Tune resumed as failed. Works on finished, interrupted and
running experiments; written atomically so a reader never sees half a file.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pandas as pd

from tune_upl.experiment import RECORD_FILE, SPEC_FILE
from tune_upl.final import FINAL_SUFFIX, SELECTION_FILE
from tune_upl.search import trial_state

BACKBONE_NAMES = {"resnet50": "ResNet50", "inception": "Inception", "googlenet": "GoogLeNet", "tiny": "Tiny",
                  "resnet18": "ResNet18"}


def study_folders(experiment: Path) -> list[Path]:
    """The search's Tune experiments (one per study, or the grid); final stages are read separately."""
    folders = {p.parent for p in experiment.glob("*/experiment_state-*.json")}
    return sorted(f for f in folders if not f.name.endswith(FINAL_SUFFIX))


def load_trials(
    experiment: Path, metric: str, mode: str, searched: list[str], baselines: dict[str, dict[str, Any]]
) -> pd.DataFrame:
    """One row per trial: study, id, state, epochs run, best objective over its epochs, searched values."""
    from ray.tune import ExperimentAnalysis

    rows = []
    for folder in study_folders(experiment):
        analysis = ExperimentAnalysis(str(folder))
        frames = analysis.trial_dataframes
        for trial in analysis.trials:
            frame = frames.get(trial.trial_id, frames.get(trial.path, pd.DataFrame()))
            epochs = int(frame["training_iteration"].max()) if "training_iteration" in frame else 0
            scores = frame[metric] if metric in frame else pd.Series(dtype=float)
            state = trial_state(trial.status, trial.last_result or {}, trial.config.get("num_epochs"))
            baseline = baselines.get(folder.name)
            rows.append({
                "study": folder.name,
                "baseline": "yes" if baseline and all(trial.config.get(k) == v for k, v in baseline.items()) else "",
                "trial": trial.trial_id,
                "state": state,
                "epochs": epochs,
                "objective": (scores.max() if mode == "max" else scores.min()) if len(scores) else float("nan"),
                "note": _trial_note(trial),
                **{name: trial.config.get(name) for name in searched},
                "_config": trial.config,
            })
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    return table.sort_values("objective", ascending=(mode == "min"), na_position="last").reset_index(drop=True)


def _trial_note(trial: Any) -> str:
    """Why a trial ended early: its error's last line, or the diverged / out-of-memory message."""
    error = (trial.last_result or {}).get("error")
    path = Path(trial.error_file) if getattr(trial, "error_file", None) else None
    if path is not None and path.is_file():
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        error = lines[-1] if lines else "error"
    return str(error).replace("|", "/")[:160] if error else ""


def load_finals(experiment: Path) -> list[dict[str, Any]]:
    """Each selection with its test metrics: per final seed (protocol val) or the test-selected epoch."""
    from ray.tune import ExperimentAnalysis

    finals = []
    for path in sorted(experiment.glob(f"*/{SELECTION_FILE}")):
        record = json.loads(path.read_text())
        runs = []
        final_folder = experiment / (record["key"] + FINAL_SUFFIX)
        if list(final_folder.glob("experiment_state-*.json")):
            analysis = ExperimentAnalysis(str(final_folder))
            for trial in analysis.trials:
                last = trial.last_result or {}
                if any(k.startswith("test_") for k in last):
                    runs.append({"seed": trial.config.get("seed"), **{k: v for k, v in last.items() if k.startswith("test_")}})
        record["runs"] = runs if not record["test_selected"] else [record["test_selected"]]
        finals.append(record)
    return finals


def _mean_std(values: list[float]) -> str:
    series = pd.Series(values, dtype=float) * 100
    if len(series) == 1:
        return f"{series.iloc[0]:.1f}%"
    return f"{series.mean():.1f} ± {series.std(ddof=1):.1f}%"


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def benchmark_tables(finals: list[dict[str, Any]], ks: tuple[int, ...]) -> list[str]:
    """The seed README's format: a table per dataset, rows backbone and loss, columns R@K on test classes
    (mean ± std over the final seeds under protocol val)."""
    lines: list[str] = []
    by_data: dict[str, list[dict[str, Any]]] = {}
    for record in finals:
        if record["runs"]:
            by_data.setdefault(record["config"]["data_name"], []).append(record)
    for data_name, records in sorted(by_data.items()):
        selected = any(r["test_selected"] for r in records)
        lines += [f"### {data_name}", ""]
        rows = []
        for r in records:
            cfg = r["config"]
            row = {"Backbone": BACKBONE_NAMES.get(cfg["backbone_type"], cfg["backbone_type"]),
                   "Loss": cfg["loss_name"], "Dim": cfg["feature_dim"]}
            for k in ks:
                values = [run[f"test_recall@{k}"] for run in r["runs"] if f"test_recall@{k}" in run]
                row[f"R@{k}"] = _mean_std(values) if values else "-"
            row["Runs"] = len(r["runs"])
            rows.append(row)
        lines.append(pd.DataFrame(rows).to_markdown(index=False, colalign=["center"] * len(rows[0])))
        note = ("test-selected: the epoch and trial were chosen on the test classes, as the seed did"
                if selected else "selected on the validation classes, then retrained on all training classes "
                "with each seed and tested once after its last epoch (mean ± std over the seeds)")
        lines += ["", f"*{note}.*", ""]
    return lines


def render(experiment: Path) -> str:
    saved = json.loads((experiment / SPEC_FILE).read_text())
    spec, overrides = saved["spec"], saved["overrides"]
    paths = ("data_path", "cache_dir", "pretrained")  # resolved on the driver; shown when the spec set them
    fixed = {**spec["fixed"], **{k: v for k, v in overrides.items() if k not in paths or k in spec["fixed"]}}
    record_file = experiment / RECORD_FILE
    baselines = json.loads(record_file.read_text()).get("baselines", {}) if record_file.is_file() else {}
    metric, mode = spec["objective"]["metric"], spec["objective"]["mode"]
    searched = [n for n in spec["space"] if n not in overrides]
    trials = load_trials(experiment, metric, mode, searched, baselines)
    finals = load_finals(experiment)
    ks = tuple(finals[0]["config"]["recalls"]) if finals else (1, 2, 4, 8)
    counts = trials["state"].value_counts().to_dict() if not trials.empty else {}
    lines = [
        f"# Search `{spec['name']}`",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} from `{_shown_path(experiment)}`; regenerate with "
        f"`python run_search.py report --name {spec['name']}`.",
        "",
        f"- searcher: {spec['searcher']['type']} (seed {spec['searcher']['seed']}), scheduler: "
        f"{spec['scheduler']['type']}, objective: `{metric}` ({mode}), protocol: {spec['protocol']}",
        f"- trials: {len(trials)} ({', '.join(f'{v} {k}' for k, v in counts.items()) or 'none yet'})",
        f"- fixed: {', '.join(f'{k}={v}' for k, v in fixed.items()) or 'nothing'}",
        "",
        "## Benchmark (test classes)",
        "",
    ]
    lines += benchmark_tables(finals, ks) if finals else ["No selection tested yet (the search is still running).", ""]
    lines += ["## Selected hyper-parameters", ""]
    for record in finals:
        title = record["key"]
        values = {name: record["config"].get(name) for name in searched}
        lines.append(f"- **{title}**: trial `{record['trial_id']}`, epoch {record['epoch']}, "
                     f"`{metric}` {record['objective'][metric]:.4f}; "
                     + ", ".join(f"{k}={_fmt(v)}" for k, v in values.items()))
    lines += ["", "## Leaderboard (all trials, best epoch on the objective)", "",
              "The baseline trial runs the seed's recipe for every searched field whose range contains it.", ""]
    if trials.empty:
        lines.append("No trial has started yet.")
    else:
        shown = trials.drop(columns=["_config"]).copy()
        shown["objective"] = shown["objective"].map(lambda v: "-" if pd.isna(v) else f"{v:.4f}")
        for name in searched:
            shown[name] = shown[name].map(_fmt)
        shown.insert(0, "rank", range(1, len(shown) + 1))
        lines.append(shown.rename(columns={"objective": metric}).to_markdown(index=False))
    return "\n".join(lines) + "\n"


def _shown_path(path: Path) -> str:
    """Relative to the working directory when inside it, so committed reports carry no home folders."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_report(experiment: Path, reports_dir: Path) -> Path:
    """Write `<reports_dir>/<name>.md` atomically (temporary file, then rename)."""
    if not (experiment / SPEC_FILE).is_file():
        raise FileNotFoundError(f"no experiment at {experiment} (missing {SPEC_FILE}); check --name and --storage")
    reports_dir.mkdir(parents=True, exist_ok=True)
    target = reports_dir / f"{experiment.name}.md"
    tmp = target.with_suffix(".md.tmp")
    tmp.write_text(render(experiment))
    tmp.replace(target)
    return target
