"""search suite: what each choice of a search buys, measured as the epochs a Tune + Optuna + ASHA search spends
until a trial first reports a validation Recall@1 within 1 (and 2) points of the grid's best, over 20 seeds, at
1 and at 2 trials at a time, for TPE and a Gaussian process (each told PRUNED for ASHA-stopped trials, as the
platform tells them, and told COMPLETE at their last value, the benchmark's alternative telling) and random
sampling; against the full grid and the grid in a random order without early stopping.

A tabular benchmark: `--record` trains a grid once through Ray Tune with the platform's trainable on a 144-class
synthetic set and writes every epoch's validation metrics to `--grid` (default `reports/search_grid_fine.csv`,
48 points, FINE_GRID; `reports/search_grid.csv` holds the coarser 24-point SEARCH_GRID the cluster suite
replays); every run then replays real searches against that table through the platform's own run of its
studies (`run_studies`) with `replay_trial`, a trainable that reports the recorded curve of the point it is
given (it lives here and no search uses it). Full runs draw `docs/figures/search_samplers.png`, quick runs the
same figure beside `--out`. Imports Ray, Optuna, pandas, matplotlib and the platform's search code when it runs.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from benchmarks.harness import Row, SuiteResult
from benchmarks.overhead import RaySession

# The grid: one study's categorical space, as a real search would hold the loss and the backbone fixed.
SEARCH_GRID: dict[str, list[Any]] = {"lr": [1e-4, 3e-4, 1e-3, 3e-3], "scale": [8.0, 32.0, 128.0],
                                     "pooling": ["max", "avg"]}
# The finer grid the search suite replays by default: lr log-spaced over the coarse grid's range, scale around
# the coarse grid's best (8), both poolings. Recorded: one point within 1 point of its best, four within 2.
FINE_GRID: dict[str, list[Any]] = {"lr": [1e-4, 2e-4, 4e-4, 8e-4, 1.5e-3, 3e-3], "scale": [4.0, 8.0, 16.0, 32.0],
                                   "pooling": ["max", "avg"]}
FINE_GRID_CSV = "reports/search_grid_fine.csv"
SEARCH_EPOCHS = 6
SEARCH_IMAGES_PER_CLASS = 30
SEARCH_METRIC = "val_recall@1"
SEARCH_WITHIN = 0.01  # "within 1 point" of the grid's best Recall@1
# the targets measured: 1 point, and 2 points (on the fine grid one point alone is within 1 point of the best)
TARGETS = (SEARCH_WITHIN, 0.02)


SEARCH_IMAGE_SIZE = 48  # the recorded grid's crop size (the warm suite's source grid uses another)


def search_fixed(data_path: str, cache_dir: str, image_size: int = SEARCH_IMAGE_SIZE) -> dict[str, Any]:
    """The recorded grid's fixed TrialConfig values: the 144-class bird set (72 training classes, half of them
    held out for validation), the tiny backbone at 48 px, protocol val, one thread a trial."""
    return dict(data_name="cub", data_path=data_path, cache_dir=cache_dir, backbone_type="tiny", image_size=image_size,
                num_epochs=SEARCH_EPOCHS, warm_up=0, batch_size=32, num_workers=0, num_threads=1, device="cpu",
                protocol="val", val_fraction=0.5)


def write_search_dataset(data_path: Path, dataset_seed: int = 0) -> Path:
    """144 classes (head colour x wing x breast x tail colour), 30 JPEGs each, in the CUB layout; another
    `dataset_seed` draws other images of the same classes."""
    from tune_upl.synthetic import LARGE_ATTRIBUTES, generate

    return generate(data_path / "cub", dataset_seed, SEARCH_IMAGES_PER_CLASS, LARGE_ATTRIBUTES)



def grid_spec(fixed: dict[str, Any], grid: dict[str, list[Any]], searcher: dict[str, Any],
              scheduler: dict[str, Any], samples: int, concurrent: int, name: str) -> Any:
    """A platform search spec over `grid` (what a user would write for this study)."""
    from tune_upl.spec import parse_spec

    return parse_spec({
        "name": name, "objective": {"metric": SEARCH_METRIC, "mode": "max"}, "searcher": searcher,
        "scheduler": scheduler, "num_samples": samples, "max_concurrent": concurrent, "baseline": True,
        "protocol": fixed["protocol"], "fixed": {k: v for k, v in fixed.items() if k != "protocol"},
        "space": {name: {"choice": values} for name, values in grid.items()},
    }, name)


def record_grid(out: Path, grid: dict[str, list[Any]], dataset_seed: int = 0,
                image_size: int = SEARCH_IMAGE_SIZE) -> Any:
    """Train every point of `grid` for SEARCH_EPOCHS epochs through Ray Tune with the platform's trainable
    (`train_trial`, one CPU a trial, two at a time, a Tune grid search) on the synthetic set of `dataset_seed`
    at `image_size`, and write each epoch's validation metrics to `out` (CSV)."""
    import pandas as pd
    from ray import tune

    from tune_upl.config import make_config
    from tune_upl.prepare import prepare_dataset
    from tune_upl.trainable import train_trial

    with tempfile.TemporaryDirectory() as tmp, RaySession():
        data_path = Path(tmp) / "data"
        write_search_dataset(data_path, dataset_seed)
        fixed = search_fixed(str(data_path), str(Path(tmp) / "cache"), image_size)
        prepare_dataset(make_config(fixed), progress=False)
        tuner = tune.Tuner(
            tune.with_resources(train_trial, {"cpu": 1}),
            param_space={**fixed, **{name: tune.grid_search(values) for name, values in grid.items()}},
            tune_config=tune.TuneConfig(max_concurrent_trials=2, reuse_actors=True),
            run_config=tune.RunConfig(storage_path=str(Path(tmp).resolve() / "runs"), name="grid", verbose=0),
        )
        frames = []
        for result in tuner.fit():
            if result.error is not None:
                raise RuntimeError(f"a grid trial failed: {result.error}")
            frame = result.metrics_dataframe
            part = pd.DataFrame({name: [result.config[name]] * len(frame) for name in grid})
            part["epoch"] = frame["training_iteration"].to_numpy()
            for column in (SEARCH_METRIC, "val_map@r", "time_this_iter_s"):
                part[column] = frame[column].to_numpy()
            frames.append(part)
    table = pd.concat(frames).sort_values([*grid, "epoch"]).reset_index(drop=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False, float_format="%.6g")
    return table


def _grid_key(values: dict[str, Any], names: Any = SEARCH_GRID) -> tuple[str, ...]:
    """A grid point's key, the same from a CSV row and from a trial's config (`names`: the grid's fields)."""
    return tuple(f"{values[n]:.6g}" if isinstance(values[n], float) else str(values[n]) for n in names)


def load_grid(path: Path, grid: Optional[dict[str, list[Any]]] = None) -> dict[tuple[str, ...], list[float]]:
    """The recorded curves of `grid` (default: the CSV's own, FINE_GRID or SEARCH_GRID by its size): grid
    point -> validation Recall@1 at epochs 1..SEARCH_EPOCHS."""
    import pandas as pd

    table = pd.read_csv(path)
    grid = grid or grid_of(table)
    curves: dict[tuple[str, ...], list[float]] = {}
    for _, row in table.sort_values("epoch").iterrows():
        curves.setdefault(_grid_key(row.to_dict(), grid), []).append(float(row[SEARCH_METRIC]))
    points = len(list(itertools.product(*grid.values())))
    if len(curves) != points or any(len(c) != SEARCH_EPOCHS for c in curves.values()):
        raise ValueError(f"{path}: expected {points} grid points x {SEARCH_EPOCHS} epochs of {SEARCH_METRIC}; "
                         "record it again with --suite search --record")
    return curves


def grid_of(table: Any) -> dict[str, list[Any]]:
    """Which of the two grids a recorded table holds (by its number of points)."""
    points = len(table.drop_duplicates(list(SEARCH_GRID)))
    return FINE_GRID if points == len(list(itertools.product(*FINE_GRID.values()))) else SEARCH_GRID


def replay_trial(config: dict[str, Any], curves: dict[tuple[str, ...], list[float]], names: tuple[str, ...]) -> None:
    """Tabular-benchmark trainable: reports the recorded validation curve of the sampled grid point, epoch by
    epoch, so that ASHA stops it where it would have stopped the training; `at` orders the epochs of trials
    that run at the same time. They interleave with no sleep: each report waits for the driver (measured at 2
    at a time: 30 switches between trials in 42 epochs, as with a 0.05 s sleep an epoch; 11 at 1 at a time).
    Never used by a search."""
    from ray import tune

    started = time.time()  # the order the trials ran in (their ids are the searcher's, not a counter)
    for epoch, value in enumerate(curves[_grid_key(config, names)], start=1):
        tune.report({SEARCH_METRIC: value, "epoch": epoch, "started": started, "at": time.time()})


def epochs_to_reach(trials: list[list[float]], target: float) -> Optional[int]:
    """Epochs spent, trials in the order they ran, until a reported value reaches `target` (None: never)."""
    spent = 0
    for curve in trials:
        for value in curve:
            spent += 1
            if value >= target:
                return spent
    return None


@contextlib.contextmanager
def told_complete() -> Iterator[None]:
    """The benchmark's alternative telling, not the platform's: while it is open, every trial that ended with a
    finite value (an ASHA-stopped one too) is told COMPLETE at the last value it reported, so the searcher
    models a stopped trial's early epoch as if it were a finished training; faults are still told FAIL. It
    replaces `tune_upl.telling.outcome` in this (the driver's) process, where the searcher calls it."""
    from optuna.trial import TrialState

    from tune_upl import telling

    platform = telling.outcome

    def complete(result: Optional[dict[str, Any]], error: bool, planned_epochs: int,
                 metric: str) -> tuple[TrialState, Optional[float]]:
        state, value = platform(result, error, planned_epochs, metric)
        if state == TrialState.PRUNED:
            return TrialState.COMPLETE, float(result[metric])  # PRUNED only where the value is finite
        return state, value

    telling.outcome = complete
    try:
        yield
    finally:
        telling.outcome = platform


# (sampler, telling): "pruned" is the platform's (ASHA-stopped trials told PRUNED), "complete" the alternative
VARIANTS: tuple[tuple[str, str], ...] = (("tpe", "pruned"), ("tpe", "complete"), ("gp", "pruned"),
                                         ("gp", "complete"), ("random", "pruned"))
SIMPLER = ("random", "tpe", "gp")  # the rule's tie-break: the simpler sampler first
TIE = 0.10  # medians within 10% of the fewest are a tie
STARTUP = 6  # the searchers' random trials first (TPE's and the GP's n_startup_trials)


def searcher_of(sampler: str, seed: int) -> dict[str, Any]:
    """The spec's `searcher` for a sampler: the same seed, and the same random start for TPE and the GP."""
    if sampler == "random":
        return {"type": "random", "seed": seed}
    return {"type": sampler, "seed": seed, "n_startup_trials": STARTUP}


def reported_order(results: Any) -> list[float]:
    """Every epoch the search trials reported, in the order they reported it (final runs left out)."""
    rows = []
    for r in results:
        if r.config.get("final") or r.metrics_dataframe is None:
            continue
        frame = r.metrics_dataframe
        rows += list(zip(frame["at"], frame[SEARCH_METRIC]))
    return [float(value) for _, value in sorted(rows)]


def replay_spec(sampler: str, seed: int, fixed: dict[str, Any], grid: dict[str, list[Any]], samples: int,
                concurrent: int, name: str) -> Any:
    """The spec of a replayed search: `sampler` at `seed`, ASHA with rungs at epochs 1, 2 and 4, one final seed."""
    spec = grid_spec(fixed, grid, searcher_of(sampler, seed),
                     {"type": "asha", "grace_period": 1, "reduction_factor": 2}, samples, concurrent, name)
    return spec.model_copy(update={"final_seeds": 1})


def replay_search(sampler: str, telling: str, seed: int, concurrent: int, curves: dict[tuple[str, ...], list[float]],
                  grid: dict[str, list[Any]], fixed: dict[str, Any], samples: int, storage: Path,
                  warm: Optional[tuple[str, list[dict[str, Any]]]] = None, name: str = "") -> Any:
    """One real Tune + Optuna + ASHA search against the table, through the platform's own run of its studies
    (`run_studies`, one study here), `warm`: (source, points) queued after its baseline as a warm start
    queues them; returns Tune's results (`reported_order` reads them)."""
    from ray import tune

    from tune_upl.planning import plan_studies
    from tune_upl.search import run_studies

    name = name or f"{sampler}_{telling}_{concurrent}_{seed}"
    spec = replay_spec(sampler, seed, fixed, grid, samples, concurrent, name)
    studies = plan_studies(spec, {})
    folder = storage / name
    folder.mkdir(parents=True, exist_ok=True)
    function = tune.with_parameters(replay_trial, curves=curves, names=tuple(grid))
    with told_complete() if telling == "complete" else contextlib.nullcontext(), \
            contextlib.redirect_stdout(io.StringIO()):  # the platform's line per trial, 200 searches of them
        ran = run_studies(spec, studies, folder, verbose=False, at_once=concurrent, function=function,
                          warm={studies[0].key: warm} if warm else None)
    results = ran.results
    errors = [r.error for r in results if r.error is not None]
    if errors:
        raise RuntimeError(f"a replay trial failed: {errors[0]}")
    return results


def best_so_far(values: list[float], length: int) -> np.ndarray:
    """The best value reported by each epoch spent, 1..length (held after the search ends; NaN before any)."""
    out = np.full(length, np.nan)
    if values:
        best = np.maximum.accumulate(np.asarray(values[:length], dtype=float))
        out[: len(best)] = best
        out[len(best):] = best[-1]
    return out


def summary(spent: list[Optional[int]]) -> dict[str, Any]:
    """Median and quartiles of the epochs to reach the target (a miss counts as never: infinity), the
    min-max of those that reached it, and how many never did."""
    values = np.array([s if s is not None else np.inf for s in spent], dtype=float)
    found = [s for s in spent if s is not None]
    with np.errstate(invalid="ignore"):  # inf - inf between two misses: NaN, read as never
        q1, median, q3 = (float(np.nan_to_num(np.percentile(values, q), nan=np.inf, posinf=np.inf))
                          for q in (25, 50, 75))
    return {"median": median, "q1": q1, "q3": q3, "min": min(found) if found else None,
            "max": max(found) if found else None, "never": len(spent) - len(found), "n": len(spent)}


def choose_default(medians: dict[str, float]) -> str:
    """The rule: the sampler (the platform's telling) with the fewest median epochs at 2 trials at a time;
    medians within TIE of the fewest are a tie, won by the simpler sampler (SIMPLER's order)."""
    fewest = min(medians.values())
    tied = [s for s, m in medians.items() if m <= fewest * (1 + TIE)] if np.isfinite(fewest) else list(medians)
    return min(tied, key=SIMPLER.index)


def draw(curves_by: dict[tuple[str, str, int], list[np.ndarray]], best: float, out: Path) -> None:
    """Best-so-far value against epochs spent, the median over seeds: a line per sampler x telling, a panel
    per concurrency."""
    from matplotlib.figure import Figure

    concurrencies = sorted({c for _, _, c in curves_by})
    fig = Figure(figsize=(5.2 * len(concurrencies), 4.2))
    axes = fig.subplots(1, len(concurrencies), sharey=True, squeeze=False)[0]
    for ax, concurrent in zip(axes, concurrencies):
        for (sampler, telling, c), lines in curves_by.items():
            if c != concurrent:
                continue
            median = np.nanmedian(np.vstack(lines), axis=0)
            label = variant_label(sampler, telling)
            ax.plot(np.arange(1, len(median) + 1), median, label=label,
                    linestyle="--" if telling == "complete" else "-")
        for within in TARGETS:
            ax.axhline(best - within, color="grey", linewidth=0.8, linestyle=":")
            ax.text(1, best - within, f" best - {within:.2f}", va="bottom", fontsize=7, color="grey")
        ax.set_title(f"{concurrent} trial{'s' if concurrent > 1 else ''} at a time")
        ax.set_xlabel("epochs spent")
        ax.set_ylim(top=best + 0.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"best {SEARCH_METRIC} so far (median over seeds)")
    axes[-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def variant_label(sampler: str, telling: str) -> str:
    return "random" if sampler == "random" else f"{sampler.upper()}, ASHA-stopped told {telling.upper()}"


def variant_rows(runs: list[dict[str, Any]], within: float, samples: int, grid_epochs: int,
                 grid_size: str) -> tuple[list[Row], dict[tuple[str, str, int], dict[str, Any]]]:
    """A row per sampler x telling x concurrency: the epochs until within `within` of the best."""
    keys = list(dict.fromkeys((r["sampler"], r["telling"], r["concurrent"]) for r in runs))
    stats, rows = {}, []
    for key in keys:
        mine = [r for r in runs if (r["sampler"], r["telling"], r["concurrent"]) == key]
        st = stats[key] = summary([r["spent"][within] for r in mine])
        spread = f"{st['min']}-{st['max']}" if st["min"] is not None else "-"
        checked = key == ("tpe", "pruned", 1) and within == SEARCH_WITHIN  # the suite's target, as before
        rows.append(Row(
            "search", f"epochs until within {within * 100:.0f} point(s) of the grid's best {SEARCH_METRIC}: "
            f"{variant_label(*key[:2])} + ASHA, {key[2]} at a time (median of {st['n']} searcher seeds, {samples} "
            "trials each)", st["median"], "epochs", f"the full grid ({grid_size})", grid_epochs,
            ">= 3x fewer epochs" if checked else "", grid_epochs / st["median"] >= 3 if checked else None,
            f"quartiles {st['q1']:.0f}-{st['q3']:.0f}; reached {spread}; never in {st['never']}/{st['n']}; "
            f"epochs each search spent in all: median {np.median([r['epochs'] for r in mine]):.0f}"))
    return rows, stats


def rule_note(stats: dict[tuple[str, str, int], dict[str, Any]], within: float) -> tuple[str, str]:
    """The rule's pick (the platform's telling, 2 at a time) and the line that says why."""
    medians = {s: stats[(s, "pruned", 2)]["median"] for s in SIMPLER}
    default = choose_default(medians)
    gp, tpe = medians["gp"], medians["tpe"]
    return default, (
        f"the rule at {within * 100:.0f} point(s) (fewest median epochs at 2 at a time, the platform's telling; "
        f"within {TIE:.0%} a tie, won by the simpler of {' < '.join(SIMPLER)}): medians "
        f"{', '.join(f'{s} {m:.0f}' for s, m in medians.items())} -> {default}; GP "
        f"{'not worse than' if gp <= tpe * (1 + TIE) else 'worse than'} TPE")


def measure(args: argparse.Namespace) -> SuiteResult:
    """Epochs each searcher (and telling) spends until it is within 1 (and 2) points of the grid's best, over
    seeds, at 1 and 2 trials at a time, beside the full grid and the grid in a random order. Two targets:
    on a grid where one point alone is within 1 point of the best, that target measures finding one point."""
    from tune_upl.search import quiet_ray

    quiet_ray(False)
    result = SuiteResult("search")
    given = any(a.split("=")[0] == "--grid" for a in getattr(args, "argv", []))
    path = Path(args.grid if given else FINE_GRID_CSV)  # the suite's default is the fine grid
    if args.record:
        start = time.perf_counter()
        record_grid(path, FINE_GRID if path == Path(FINE_GRID_CSV) else SEARCH_GRID)
        result.notes.append(f"recorded {path} in {time.perf_counter() - start:.0f} s")
    elif not path.is_file():
        raise FileNotFoundError(f"{path}: no recorded grid; run `python -m benchmarks --suite search --record`")
    import pandas as pd

    grid = grid_of(pd.read_csv(path))
    curves = load_grid(path, grid)
    points = list(curves)
    best = max(max(c) for c in curves.values())
    per_point = sorted(max(c) for c in curves.values())
    median_point = float(np.median(per_point))
    grid_epochs = len(points) * SEARCH_EPOCHS
    grid_size = f"{len(points)} x {SEARCH_EPOCHS}"
    seeds = list(range(1 if args.quick else 20))
    samples = 6 if args.quick else len(points) // 2  # the budget: half the grid's points
    concurrencies = (2,) if args.quick else (1, 2)  # quick: each sampler once, at 2 at a time (the rule's)
    variants = [v for v in VARIANTS if v[1] == "pruned"] if args.quick else list(VARIANTS)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp, RaySession():
        fixed = search_fixed(str(Path(tmp) / "data"), str(Path(tmp) / "cache"))
        for concurrent in concurrencies:
            for sampler, telling in variants:
                for seed in seeds:
                    start = time.perf_counter()
                    values = reported_order(replay_search(sampler, telling, seed, concurrent, curves, grid, fixed,
                                                          samples, Path(tmp) / "runs"))
                    runs.append({"sampler": sampler, "telling": telling, "concurrent": concurrent, "seed": seed,
                                 "spent": {w: epochs_to_reach([values], best - w) for w in TARGETS},
                                 "reached": max(values), "epochs": len(values), "values": values,
                                 "seconds": time.perf_counter() - start})
    length = max(r["epochs"] for r in runs)
    curves_by: dict[tuple[str, str, int], list[np.ndarray]] = {}
    for r in runs:
        curves_by.setdefault((r["sampler"], r["telling"], r["concurrent"]), []).append(best_so_far(r["values"], length))
    figure = Path(args.out).parent / "search_samplers.png" if args.quick else Path("docs/figures/search_samplers.png")
    draw(curves_by, best, figure)
    result.details = {"runs": runs, "best": best, "stats": {}, "default": {}, "figure": str(figure),
                      "samples": samples, "grid_points": len(points)}
    rng = np.random.default_rng(0)  # random order of the grid: what a random search without stopping spends
    orders = [rng.permutation(len(points)) for _ in range(1000)]
    for within in TARGETS:
        rows, stats = variant_rows(runs, within, samples, grid_epochs, grid_size)
        shuffled = [epochs_to_reach([curves[points[i]] for i in order], best - within) for order in orders]
        near = sum(max(c) >= best - within for c in curves.values())
        result.rows += rows + [Row(
            "search", f"the same ({within * 100:.0f} point(s)), the grid in a random order without early stopping "
            "(mean of 1000 orders)", float(np.mean(shuffled)), "epochs", "the full grid", grid_epochs,
            note=f"{near} of {len(points)} grid points come within {within * 100:.0f} point(s) of the best")]
        default, line = rule_note(stats, within)
        result.details["stats"][within], result.details["default"][within] = stats, default
        result.notes.append(line)
    result.rows.append(Row("search", f"grid's best minus the median grid point's best {SEARCH_METRIC}",
                           best - median_point, "", note=f"best {best:.4f}, median {median_point:.4f}, worst "
                           f"{per_point[0]:.4f}"))
    result.notes.insert(0, f"grid {path}; figure {figure}; the replayed searches took "
                        f"{sum(r['seconds'] for r in runs):.0f} s")
    return result
