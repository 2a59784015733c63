"""search suite: epochs a Tune + Optuna TPE + ASHA search spends until it is within 1 point of the grid's best
validation Recall@1, over 10 searcher seeds, against the full grid (24 points x 6 epochs) and the grid in a
random order without early stopping.

A tabular benchmark: `--record` trains the grid once with the platform's own grid search on a 144-class
synthetic set (about 10 minutes here) and writes every epoch's validation metrics to
`reports/search_grid.csv` (`--grid`); every run then replays real searches against that table with
`replay_trial`, a trainable that reports the recorded curve of the point it is given (it lives here and no
search uses it). Imports Ray, Optuna, pandas and the platform's search code when it runs.
"""
from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from benchmarks.harness import Row, SuiteResult
from benchmarks.overhead import RaySession

# The grid: one study's categorical space, as a real search would hold the loss and the backbone fixed.
SEARCH_GRID: dict[str, list[Any]] = {"lr": [1e-4, 3e-4, 1e-3, 3e-3], "scale": [8.0, 32.0, 128.0],
                                     "pooling": ["max", "avg"]}
SEARCH_EPOCHS = 6
SEARCH_IMAGES_PER_CLASS = 30
SEARCH_METRIC = "val_recall@1"
SEARCH_WITHIN = 0.01  # "within 1 point" of the grid's best Recall@1


def search_fixed(data_path: str, cache_dir: str) -> dict[str, Any]:
    """The recorded grid's fixed TrialConfig values: the 144-class bird set (72 training classes, half of them
    held out for validation), the tiny backbone at 48 px, protocol val, one thread a trial."""
    return dict(data_name="cub", data_path=data_path, cache_dir=cache_dir, backbone_type="tiny", image_size=48,
                num_epochs=SEARCH_EPOCHS, warm_up=0, batch_size=32, num_workers=0, num_threads=1, device="cpu",
                protocol="val", val_fraction=0.5)


def write_search_dataset(data_path: Path) -> Path:
    """144 classes (head colour x wing x breast x tail colour), 30 JPEGs each, in the CUB layout."""
    from tune_upl.synthetic import LARGE_ATTRIBUTES, generate

    return generate(data_path / "cub", 0, SEARCH_IMAGES_PER_CLASS, LARGE_ATTRIBUTES)


def grid_spec(fixed: dict[str, Any], searcher: dict[str, Any], scheduler: dict[str, Any], samples: int,
              concurrent: int, name: str) -> Any:
    """A platform search spec over SEARCH_GRID (what a user would write for this study)."""
    from tune_upl.spec import parse_spec

    return parse_spec({
        "name": name, "objective": {"metric": SEARCH_METRIC, "mode": "max"}, "searcher": searcher,
        "scheduler": scheduler, "num_samples": samples, "max_concurrent": concurrent, "baseline": True,
        "protocol": fixed["protocol"], "fixed": {k: v for k, v in fixed.items() if k != "protocol"},
        "space": {name: {"choice": values} for name, values in SEARCH_GRID.items()},
    }, name)


def record_grid(out: Path) -> Any:
    """Train every grid point for SEARCH_EPOCHS epochs with the platform's own grid search (`run_grid`:
    the real trainable, two trials at a time) and write each epoch's validation metrics to `out` (CSV)."""
    import pandas as pd

    from tune_upl.planning import plan_studies, prepare_data
    from tune_upl.search import run_grid

    with tempfile.TemporaryDirectory() as tmp, RaySession():
        data_path = Path(tmp) / "data"
        write_search_dataset(data_path)
        fixed = search_fixed(str(data_path), str(Path(tmp) / "cache"))
        spec = grid_spec(fixed, {"type": "grid"}, {"type": "fifo"}, 1, 2, "grid")
        studies = plan_studies(spec, {})
        prepare_data(studies)
        frames = []
        for result in run_grid(spec, studies, Path(tmp) / "runs", verbose=False):
            if result.error is not None:
                raise RuntimeError(f"a grid trial failed: {result.error}")
            frame = result.metrics_dataframe
            part = pd.DataFrame({name: [result.config[name]] * len(frame) for name in SEARCH_GRID})
            part["epoch"] = frame["training_iteration"].to_numpy()
            for column in (SEARCH_METRIC, "val_map@r", "time_this_iter_s"):
                part[column] = frame[column].to_numpy()
            frames.append(part)
    table = pd.concat(frames).sort_values([*SEARCH_GRID, "epoch"]).reset_index(drop=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False, float_format="%.6g")
    return table


def _grid_key(values: dict[str, Any]) -> tuple[str, ...]:
    return tuple(f"{values[n]:.6g}" if isinstance(values[n], float) else str(values[n]) for n in SEARCH_GRID)


def load_grid(path: Path) -> dict[tuple[str, ...], list[float]]:
    """The recorded curves: grid point -> validation Recall@1 at epochs 1..SEARCH_EPOCHS."""
    import pandas as pd

    table = pd.read_csv(path)
    curves: dict[tuple[str, ...], list[float]] = {}
    for _, row in table.sort_values("epoch").iterrows():
        curves.setdefault(_grid_key(row.to_dict()), []).append(float(row[SEARCH_METRIC]))
    points = len(list(itertools.product(*SEARCH_GRID.values())))
    if len(curves) != points or any(len(c) != SEARCH_EPOCHS for c in curves.values()):
        raise ValueError(f"{path}: expected {points} grid points x {SEARCH_EPOCHS} epochs of {SEARCH_METRIC}; "
                         "record it again with --suite search --record")
    return curves


def replay_trial(config: dict[str, Any], curves: dict[tuple[str, ...], list[float]]) -> None:
    """Tabular-benchmark trainable: reports the recorded validation curve of the sampled grid point, epoch by
    epoch, so that ASHA stops it where it would have stopped the training. Never used by a search."""
    from ray import tune

    started = time.time()  # the order the trials ran in (their ids are the searcher's, not a counter)
    for epoch, value in enumerate(curves[_grid_key(config)], start=1):
        tune.report({SEARCH_METRIC: value, "epoch": epoch, "started": started})


def epochs_to_reach(trials: list[list[float]], target: float) -> Optional[int]:
    """Epochs spent, trials in the order they ran, until a reported value reaches `target` (None: never)."""
    spent = 0
    for curve in trials:
        for value in curve:
            spent += 1
            if value >= target:
                return spent
    return None


def replay_search(seed: int, curves: dict[tuple[str, ...], list[float]], fixed: dict[str, Any], samples: int,
                  storage: Path) -> list[list[float]]:
    """One real Tune + Optuna TPE + ASHA search against the table, through the platform's own run of its
    studies (`run_studies`, one study here); returns each trial's reported curve in the order the trials ran
    (one at a time, so the order is the searcher's). Its final runs (replays too) are left out."""
    from ray import tune

    from tune_upl.planning import plan_studies
    from tune_upl.search import run_studies

    # the platform's TPE settings (upl_optuna.yaml) scaled to the budget; ASHA rungs at epochs 1, 2, 4
    spec = grid_spec(fixed, {"type": "tpe", "seed": seed, "n_startup_trials": 6},
                     {"type": "asha", "grace_period": 1, "reduction_factor": 2}, samples, 1, f"replay_{seed}")
    spec = spec.model_copy(update={"final_seeds": 1})
    studies = plan_studies(spec, {})
    folder = storage / spec.name
    folder.mkdir(parents=True, exist_ok=True)
    grid = run_studies(spec, studies, folder, verbose=False, at_once=1,
                       function=tune.with_parameters(replay_trial, curves=curves))
    errors = [r.error for r in grid if r.error is not None]
    if errors:
        raise RuntimeError(f"a replay trial failed: {errors[0]}")
    results = sorted((r for r in grid if not r.config.get("final")), key=lambda r: r.metrics["started"])
    return [list(r.metrics_dataframe[SEARCH_METRIC]) for r in results]


def measure(args: argparse.Namespace) -> SuiteResult:
    """Epochs a TPE + ASHA search spends until it is within 1 point of the grid's best, over searcher seeds."""
    from tune_upl.search import quiet_ray

    quiet_ray(False)
    result = SuiteResult("search")
    path = Path(args.grid)
    if args.record:
        start = time.perf_counter()
        record_grid(path)
        result.notes.append(f"recorded {path} in {time.perf_counter() - start:.0f} s")
    elif not path.is_file():
        raise FileNotFoundError(f"{path}: no recorded grid; run `python -m benchmarks --suite search --record`")
    curves = load_grid(path)
    points = list(curves)
    best = max(max(c) for c in curves.values())
    per_point = sorted(max(c) for c in curves.values())
    median_point = float(np.median(per_point))
    target = best - SEARCH_WITHIN
    grid_epochs = len(points) * SEARCH_EPOCHS
    rng = np.random.default_rng(0)  # random order of the grid: what a random search without stopping spends
    shuffled = [epochs_to_reach([curves[points[i]] for i in rng.permutation(len(points))], target) for _ in range(1000)]
    seeds = list(range(2 if args.quick else 10))
    spent: list[Optional[int]] = []
    reached: list[float] = []
    totals: list[int] = []
    with tempfile.TemporaryDirectory() as tmp, RaySession():
        fixed = search_fixed(str(Path(tmp) / "data"), str(Path(tmp) / "cache"))
        for seed in seeds:
            trials = replay_search(seed, curves, fixed, len(points), Path(tmp) / "runs")
            spent.append(epochs_to_reach(trials, target))
            reached.append(max(max(c) for c in trials))
            totals.append(sum(len(c) for c in trials))
    found = [s for s in spent if s is not None]
    median = float(np.median([s if s is not None else np.inf for s in spent]))  # a miss counts as never
    near = sum(max(c) >= target for c in curves.values())
    result.details = {"spent": spent, "best": best, "target": target, "reached": reached, "epochs": totals}
    spread = f"{min(found)}-{max(found)}" if found else "-"
    result.rows += [
        Row("search", f"epochs until within 1 point of the grid's best {SEARCH_METRIC} (TPE + ASHA, median of "
            f"{len(seeds)} searcher seeds)", median, "epochs", f"the full grid ({len(points)} x {SEARCH_EPOCHS})",
            grid_epochs, ">= 3x fewer epochs", grid_epochs / median >= 3,
            f"spread {spread}; reached in {len(found)}/{len(spent)} searches; per seed {spent}; epochs each "
            f"search spent in all ({len(points)} trials): median {np.median(totals):.0f}"),
        Row("search", "the same, the grid in a random order without early stopping (mean of 1000 orders)",
            float(np.mean(shuffled)), "epochs", "the full grid", grid_epochs),
        Row("search", f"grid's best minus the median grid point's best {SEARCH_METRIC}", best - median_point, "",
            note=f"best {best:.4f}, median {median_point:.4f}, worst {per_point[0]:.4f}; {near} of {len(points)} "
                 "grid points come within 1 point of the best"),
    ]
    return result
