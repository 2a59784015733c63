"""warm suite: what a warm start buys, measured as the epochs a TPE + ASHA search spends on the search suite's
recorded grid until a trial first reports a validation Recall@1 within 1 (and 2) points of that grid's best,
warm-started against cold, over 20 searcher seeds.

Two recorded grids of the same 48 points (`search.FINE_GRID`): the target, `reports/search_grid_fine.csv`
(the search suite's: synthetic set of dataset seed 0 at 48 px), and the source, `reports/search_grid_source.csv`
(`SOURCE`: other images of the same 144 classes, dataset seed 1, at 40 px; `--record` trains it). For each
seed, three real searches through the platform's run of its studies (`search.replay_search`, one trial at a
time, TPE with 6 random trials first, ASHA with grace 1 and reduction 2, half the grid's points each):
- the source search, on the source grid: the finished experiment a user would warm-start from;
- the cold search, on the target grid;
- the warm search, on the target grid, the same seed, with the source search's `K` best completed trials
  (picked by the platform's `warm_start.pick`) queued right after the baseline, as `warm_start: {experiment,
  k}` queues them.

Both grids are synthetic renderings of the same classes with the same backbone: their best points agree far
more than a CUB-200-2011 search's agree with a CARS196 one's, so this overstates what a warm start buys on
real data. Full runs draw `docs/figures/warm_start.png`, quick runs the same figure beside `--out`.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import search
from benchmarks.harness import Row, SuiteResult
from benchmarks.overhead import RaySession

SOURCE = {"dataset_seed": 1, "image_size": 40}  # the source grid's synthetic set: other images, smaller crops
SOURCE_CSV = "reports/search_grid_source.csv"
K = 3  # warm_start.k: the source study's best completed trials queued after the baseline
SAMPLER = "tpe"  # the platform's default searcher


def source_start(results: Any, study: Any, k: int) -> Any:
    """The warm start a finished source search gives `study`: `warm_start.pick` over the source trials' rows
    (what `results.load_experiment` reads from a finished experiment: each trial's config, state and epochs)."""
    import pandas as pd

    from tune_upl.layout import trial_state
    from tune_upl.warm_start import pick

    trials, epochs = [], []
    for order, r in enumerate(results):
        if r.config.get("final") or r.metrics_dataframe is None:
            continue
        trial = str(r.metrics["trial_id"])
        trials.append({"trial": trial, "study": study.key, "_config": r.config, "_order": order,
                       "state": trial_state("TERMINATED", r.metrics, r.config.get("num_epochs"))})
        epochs += [{"trial": trial, search.SEARCH_METRIC: float(v)} for v in r.metrics_dataframe[search.SEARCH_METRIC]]
    return pick("source", pd.DataFrame(trials), pd.DataFrame(epochs), study, search.SEARCH_METRIC, "max", k)


def rank_agreement(source: dict[tuple[str, ...], list[float]], target: dict[tuple[str, ...], list[float]]) -> float:
    """Spearman's rank correlation of the grid points' best epochs on the two grids: how far the source's
    ranking of the points carries to the target's."""
    from scipy.stats import spearmanr

    points = sorted(target)
    return float(spearmanr([max(source[p]) for p in points], [max(target[p]) for p in points]).statistic)


def target_rank(point: dict[str, Any], target: dict[tuple[str, ...], list[float]]) -> int:
    """Where a point's best epoch ranks among the target grid's points (1: the target's best)."""
    mine = max(target[search._grid_key(point, search.FINE_GRID)])
    return 1 + sum(max(c) > mine for c in target.values())


def draw(cold: list[np.ndarray], warm: list[np.ndarray], best: float, out: Path) -> None:
    """Best validation Recall@1 so far against epochs spent, median and quartiles over the seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, curves, colour in (("cold", cold, "tab:blue"), (f"warm (k={K})", warm, "tab:orange")):
        stack = np.vstack(curves)
        x = np.arange(1, stack.shape[1] + 1)
        ax.plot(x, np.nanmedian(stack, axis=0), color=colour, label=f"{label}: median")
        ax.fill_between(x, np.nanpercentile(stack, 25, axis=0), np.nanpercentile(stack, 75, axis=0), color=colour,
                        alpha=0.2, label=f"{label}: quartiles")
    for within, style in zip(search.TARGETS, (":", "--")):
        ax.axhline(best - within, color="grey", linestyle=style, label=f"within {within * 100:.0f} point(s) of the best")
    ax.set_xlabel("epochs spent")
    ax.set_ylabel(f"best {search.SEARCH_METRIC} so far")
    ax.set_title(f"TPE + ASHA on the target grid, {len(cold)} seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def measure(args: argparse.Namespace) -> SuiteResult:
    """Epochs to within 1 and 2 points of the target grid's best, cold against warm, paired by searcher seed."""
    from tune_upl.planning import plan_studies
    from tune_upl.search import quiet_ray

    quiet_ray(False)
    result = SuiteResult("warm")
    source_path, target_path = Path(SOURCE_CSV), Path(search.FINE_GRID_CSV)
    if args.record:
        start = time.perf_counter()
        search.record_grid(source_path, search.FINE_GRID, **SOURCE)
        result.notes.append(f"recorded {source_path} in {time.perf_counter() - start:.0f} s")
    for path in (source_path, target_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no recorded grid; run `python -m benchmarks --suite "
                                    f"{'warm' if path == source_path else 'search'} --record`")
    source = search.load_grid(source_path, search.FINE_GRID)
    target = search.load_grid(target_path, search.FINE_GRID)
    best = max(max(c) for c in target.values())
    seeds = list(range(1 if args.quick else 20))
    samples = 6 if args.quick else len(target) // 2
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp, RaySession():
        runs_dir = Path(tmp) / "runs"
        fixed = search.search_fixed(str(Path(tmp) / "data"), str(Path(tmp) / "cache"))
        source_fixed = search.search_fixed(str(Path(tmp) / "data"), str(Path(tmp) / "cache"), SOURCE["image_size"])
        for seed in seeds:
            begun = time.perf_counter()
            (study,) = plan_studies(search.replay_spec(SAMPLER, seed, fixed, search.FINE_GRID, samples, 1, "warm"), {})
            common = dict(sampler=SAMPLER, telling="pruned", seed=seed, concurrent=1, grid=search.FINE_GRID,
                          samples=samples, storage=runs_dir)
            ran = search.replay_search(curves=source, fixed=source_fixed, name=f"source_{seed}", **common)
            start = source_start(ran, study, K)
            cold = search.reported_order(search.replay_search(curves=target, fixed=fixed, name=f"cold_{seed}",
                                                              **common))
            warm = search.reported_order(search.replay_search(curves=target, fixed=fixed, name=f"warm_{seed}",
                                                              warm=(start.source, start.points), **common))
            runs.append({"seed": seed, "points": start.points, "source_best": start.objectives,
                         "target_ranks": [target_rank(p, target) for p in start.points], "cold": cold, "warm": warm,
                         "spent": {kind: {w: search.epochs_to_reach([values], best - w) for w in search.TARGETS}
                                   for kind, values in (("cold", cold), ("warm", warm))},
                         "seconds": time.perf_counter() - begun})
    length = max(len(r[kind]) for r in runs for kind in ("cold", "warm"))
    figure = Path(args.out).parent / "warm_start.png" if args.quick else Path("docs/figures/warm_start.png")
    draw([search.best_so_far(r["cold"], length) for r in runs], [search.best_so_far(r["warm"], length) for r in runs],
         best, figure)
    agreement = rank_agreement(source, target)
    result.details = {"runs": runs, "best": best, "samples": samples, "k": K, "figure": str(figure),
                      "rank_agreement": agreement}
    for within in search.TARGETS:
        cold_spent = [r["spent"]["cold"][within] for r in runs]
        warm_spent = [r["spent"]["warm"][within] for r in runs]
        paired = [(c if c is not None else np.inf) - (w if w is not None else np.inf) for c, w in zip(cold_spent, warm_spent)]
        warm_stats, cold_stats = search.summary(warm_spent), search.summary(cold_spent)
        faster = sum(d > 0 for d in paired if d == d)
        slower = sum(d < 0 for d in paired if d == d)
        label = f"{within * 100:.0f} point(s)"
        result.rows.append(Row(
            "warm", f"epochs until within {label} of the target grid's best {search.SEARCH_METRIC}: TPE + ASHA "
            f"warm-started from the source grid's search (k={K}; median over {len(runs)} seeds, {samples} trials each)",
            warm_stats["median"], "epochs", "the same search cold", cold_stats["median"],
            note=f"warm faster on {faster} seeds, slower on {slower}, never reached: warm {warm_stats['never']}, "
                 f"cold {cold_stats['never']}"))
    ranks = [rank for r in runs for rank in r["target_ranks"]]
    result.rows.append(Row("warm", "the target grid's rank of the points the warm starts queued (median; 1 is the "
                           "target's best)", float(np.median(ranks)), "", note=f"Spearman's rank correlation of the "
                           f"two grids' points: {agreement:.2f}"))
    result.notes.insert(0, f"source {source_path}, target {target_path}; figure {figure}; the replayed searches took "
                        f"{sum(r['seconds'] for r in runs):.0f} s")
    return result
