"""cluster suite: how full a GPU cluster stays when every study of a spec runs at once in one Tune run
(`search.run_studies`), for a TPE + ASHA spec and for a grid spec whose studies together may fill every slot.

A local Ray declaring 16 CPUs and 8 (fake) GPUs, a trial asking 1 CPU + 0.5 GPU: 16 GPU slots. Both specs
have 8 studies (over `margin`, which the replay ignores), `max_concurrent: 3` per study (24 >= 16, so the
spec never caps the run below the cluster: Tune runs 16 at once) and protocol `seed` (no final runs):
- TPE + ASHA (grace 1, reduction 2, up to 6 epochs): 12 trials a study over the recorded grid's choices;
- grid + FIFO: lr {1e-3, 3e-3} x scale {8, 32, 128} x pooling {max, avg}, 12 points a study of 6 epochs
  (96 trials of equal length: 6 rounds of 16, so the slots empty together at the end).
The trials replay the search suite's recorded grid (`reports/search_grid.csv`: they look their curve up by
the grid's choices) and sleep `--epoch-s` an epoch (default 0.5 s; `reports/cluster.md` is at 10 s), so
that what is measured is the scheduling, not training; the epoch must be long enough that the machine's
real cores are not what limits the run. `--quick`: a Ray of 4 CPUs and 2 GPUs (4 slots), 2 studies.

Utilisation = busy slot-seconds / (slots x window), a trial busy from the start of its function to its last
result, the window from the first trial's start to the last result: Ray's start and the workers' start-up
(each imports torch) are not the scheduler's idle time. Beside it, for each spec: the same busy time over
the wall time (Ray's start included); the ramp (from the first trial's start until every slot was busy,
the workers still starting); the share until the first study had its last result, and the idle slot-time
after it (the tail: the last trials of the slowest studies, when no study has trials left to start).

The design this replaced, one Tuner per study one after another, is not run: it holds at most a study's
`max_concurrent` trials at once, 3 of 16 slots (19 %), which is the baseline shown.
"""
from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from benchmarks.harness import Row, SuiteResult
from benchmarks.search import SEARCH_GRID, _grid_key, load_grid

PER_TRIAL = {"cpu": 1, "gpu": 0.5}
METRIC = "test_recall@1"  # protocol seed (no final runs): the recorded validation curves stand in for it
TARGET = 0.8


@dataclass(frozen=True)
class Size:
    """The cluster and the specs' sizes: the full suite's, or --quick's (a small cluster, seconds)."""

    cpus: int
    gpus: int
    studies: int
    per_study: int  # each study's max_concurrent
    trials: int  # TPE trials a study
    epochs: int
    grid: dict[str, list[Any]]  # the grid spec's choices (a subset of the recorded grid's)
    epoch_s: float  # the default --epoch-s

    @property
    def slots(self) -> int:
        return int(min(self.cpus / PER_TRIAL["cpu"], self.gpus / PER_TRIAL["gpu"]))


FULL = Size(16, 8, 8, 3, 12, 6, {"lr": [1e-3, 3e-3], "scale": [8.0, 32.0, 128.0], "pooling": ["max", "avg"]}, 0.5)
QUICK = Size(4, 2, 2, 2, 3, 2, {"lr": [1e-3, 3e-3], "scale": [32.0], "pooling": ["max"]}, 0.2)


@dataclass
class Span:
    """One trial's busy time: its study, the start of its function and its last result (wall clock)."""

    study: str
    start: float
    end: float
    epochs: int


def cluster_spec(size: Size, grid: bool) -> Any:
    """The suite's spec: TPE + ASHA over the recorded grid's choices, or a grid (FIFO) over `size.grid`."""
    from tune_upl.spec import parse_spec

    if grid:
        strategy = {"searcher": {"type": "grid"}, "scheduler": {"type": "fifo"}, "num_samples": 1, "baseline": False,
                    "space": {name: {"choice": values} for name, values in size.grid.items()}}
    else:
        strategy = {"searcher": {"type": "tpe", "seed": 0, "n_startup_trials": 4},
                    "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
                    "num_samples": size.trials, "baseline": True,
                    "space": {name: {"choice": values} for name, values in SEARCH_GRID.items()}}
    return parse_spec({
        "name": "cluster", "objective": {"metric": METRIC, "mode": "max"}, **strategy,
        "max_concurrent": size.per_study, "resources": PER_TRIAL, "protocol": "seed", "reuse_actors": True,
        "studies": {"margin": [round(0.05 * (i + 1), 2) for i in range(size.studies)]},
        "fixed": {"data_name": "synthetic", "backbone_type": "tiny", "num_epochs": size.epochs, "device": "cpu",
                  "num_workers": 0, "loss_name": "balanced_proxy"},
    }, "cluster")


def replay_slowly(config: dict[str, Any], curves: dict[tuple[str, ...], list[float]], epoch_s: float) -> None:
    """The recorded curve of the config's grid point, `epoch_s` seconds an epoch; `started` and `at` are
    wall-clock times (Tune's own `timestamp` is whole seconds)."""
    from ray import tune

    started = time.time()
    for epoch, value in enumerate(curves[_grid_key(config)][: config["num_epochs"]], start=1):
        time.sleep(epoch_s)
        tune.report({METRIC: value, "epoch": epoch, "started": started, "at": time.time()})


def run_spec(spec: Any, size: Size, epoch_s: float, curves: dict[tuple[str, ...], list[float]],
             folder: Path) -> tuple[list[Span], float, float]:
    """Every study of `spec` at once on a fresh local Ray: each trial's span, the wall-clock time before Ray's
    start, and the wall time to the run's end (Ray's start included)."""
    import os

    import ray
    from ray import tune

    from tune_upl.layout import STUDY_KEY
    from tune_upl.planning import plan_studies
    from tune_upl.concurrency import trials_at_once
    from tune_upl.search import quiet_ray, run_studies

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local benchmark Ray: no token authentication
    quiet_ray(False)
    studies = plan_studies(spec, {"cache_dir": str(folder / "cache")})
    function = tune.with_parameters(replay_slowly, curves=curves, epoch_s=epoch_s)
    storage = folder / "run"
    storage.mkdir(parents=True, exist_ok=True)
    clock, start = time.time(), time.perf_counter()
    ray.init(num_cpus=size.cpus, num_gpus=size.gpus, include_dashboard=False, log_to_driver=False,
             logging_level="WARNING")
    try:
        at_once = trials_at_once(spec, studies, ray.cluster_resources())
        ran = run_studies(spec, studies, storage, False, at_once, function=function)
        wall = time.perf_counter() - start
    finally:
        ray.shutdown()
    grid = ran.results
    spans = [Span(str(r.config[STUDY_KEY]), float(r.metrics_dataframe["started"].min()),
                  float(r.metrics_dataframe["at"].max()), len(r.metrics_dataframe))
             for r in grid if r.metrics_dataframe is not None and len(r.metrics_dataframe)]
    return spans, clock, wall


def busy_between(spans: list[Span], low: float, high: float) -> float:
    """Busy slot-seconds inside [low, high]."""
    return sum(max(0.0, min(s.end, high) - max(s.start, low)) for s in spans)


def all_busy_at(spans: list[Span], slots: int) -> Optional[float]:
    """The first moment `slots` trials were busy at once (None: never): the end of the workers' ramp."""
    events = sorted([(s.start, 1) for s in spans] + [(s.end, -1) for s in spans], key=lambda e: (e[0], e[1]))
    running = 0
    for moment, change in events:
        running += change
        if running >= slots:
            return moment
    return None


def first_study_done(spans: list[Span]) -> float:
    """When the first study had its last result: from then on some study has no trial left to start."""
    ends: dict[str, float] = {}
    for s in spans:
        ends[s.study] = max(ends.get(s.study, s.end), s.end)
    return min(ends.values())


def utilisation(spans: list[Span], slots: int, clock: float, wall: float) -> dict[str, Any]:
    """The figures of one run (seconds relative to the first trial's start unless said)."""
    first, last = min(s.start for s in spans), max(s.end for s in spans)
    window, busy = last - first, sum(s.end - s.start for s in spans)
    done, full = first_study_done(spans), all_busy_at(spans, slots)
    idle = slots * window - busy
    tail_idle = slots * (last - done) - busy_between(spans, done, last)
    return {
        "trials": len(spans), "epochs": sum(s.epochs for s in spans), "busy": busy, "wall": wall,
        "first": first - clock, "window": window, "use": busy / (slots * window), "use_wall": busy / (slots * wall),
        "ramp": None if full is None else full - first,
        "done": done - first, "use_done": busy_between(spans, first, done) / (slots * (done - first)),
        "tail": last - done, "tail_idle": tail_idle, "tail_share": tail_idle / idle if idle > 0 else 0.0,
    }


def note(name: str, run: dict[str, Any], slots: int) -> str:
    """One line on a run: what ran, when the slots filled, and where the idle slot-time was."""
    ramp = "never" if run["ramp"] is None else f"{run['ramp']:.0f} s later"
    return (f"{name}: {run['trials']} trials, {run['epochs']} epochs, {run['busy']:.0f} busy slot-s; the first trial "
            f"started {run['first']:.0f} s after Ray's start, all {slots} slots busy {ramp}, the last result "
            f"{run['window']:.0f} s after the first trial's start (wall time {run['wall']:.0f} s); "
            f"until the first study's last result ({run['done']:.0f} s): {100 * run['use_done']:.0f}% busy; after it "
            f"({run['tail']:.0f} s, the tail): {run['tail_idle']:.0f} idle slot-s, {100 * run['tail_share']:.0f}% of "
            f"the run's idle slot-time")


def measure(args: argparse.Namespace) -> SuiteResult:
    """GPU-slot utilisation of every study at once, TPE + ASHA and grid, against the one-Tuner-per-study bound."""
    size = QUICK if args.quick else FULL
    args.epoch_s = args.epoch_s or size.epoch_s
    curves = load_grid(Path(args.grid))
    result = SuiteResult("cluster")
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, grid in (("TPE + ASHA", False), ("grid", True)):
            spans, clock, wall = run_spec(cluster_spec(size, grid), size, args.epoch_s, curves, Path(tmp) / str(grid))
            runs[name] = utilisation(spans, size.slots, clock, wall)
    result.details = {"runs": runs, "slots": size.slots, "size": size}
    bound = 100 * size.per_study / size.slots
    points = len(list(itertools.product(*size.grid.values())))
    shapes = {"TPE + ASHA": f"{size.trials} trials a study, up to {size.epochs} epochs",
              "grid": f"{points} points a study, {size.epochs} epochs each"}
    for name, run in runs.items():
        result.notes.append(note(name, run, size.slots))
        what = (f"{size.studies} studies x {shapes[name]}, {size.per_study} at once a study, {args.epoch_s:g} s "
                f"epochs; {size.slots} slots")
        result.rows += [
            Row("cluster", f"GPU-slot utilisation, {name}, every study at once ({what}), from the first trial's "
                           "start to the last result", 100 * run["use"], "%",
                "one Tuner per study, one after another (not run: at most its max_concurrent busy)", bound,
                f">= {100 * TARGET:.0f}%", run["use"] >= TARGET,
                f"until the first study's last result: {100 * run['use_done']:.0f}%"),
            Row("cluster", f"the same over the wall time, {name} (Ray's start and the workers' included)",
                100 * run["use_wall"], "%", note=f"wall time {run['wall']:.0f} s"),
        ]
    return result
