"""cluster suite: how full a GPU cluster stays when a spec's studies run one Tuner after another (as before
issue 19) and when they all run at once in one Tune run (`search.run_studies`).

A local Ray declaring 16 CPUs and 8 (fake) GPUs; 6 studies of 8 trials of up to 6 epochs each, a trial
asking 1 CPU + 0.5 GPU (16 GPU slots), `max_concurrent: 2` per study, TPE + ASHA (grace 1, reduction 2).
The trials replay the search suite's recorded grid (`reports/search_grid.csv`: they look their curve up by
the grid's choices) and sleep 0.5 s an epoch, so that what is measured is the scheduling, not training.
Their worker processes import torch on start (about 30 s for 16 on 2 cores): that start-up is in the wall
time of both runs, each on a fresh Ray.

Utilisation = busy slot-seconds ÷ (slots × wall time), where a trial is busy from the start of its
function to its last epoch, and slots = 16 (what the cluster holds at the per-trial request). With 6
studies × 2 trials at a time, at most 12 of the 16 slots can be busy at once (75 %): the figure is also
given against those 12.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import Row, SuiteResult
from benchmarks.search import SEARCH_GRID, _grid_key, load_grid

CLUSTER = {"num_cpus": 16, "num_gpus": 8}
PER_TRIAL = {"cpu": 1, "gpu": 0.5}
METRIC = "test_recall@1"  # protocol seed (no final runs): the recorded validation curves stand in for it


def cluster_spec(studies: int, trials: int, epochs: int, per_study: int) -> Any:
    """The specs of the suite: `studies` studies (over `margin`, which the replay ignores) of `trials` TPE
    trials each over the recorded grid's choices, ASHA (grace 1, reduction 2), `per_study` at a time."""
    from tune_upl.spec import parse_spec

    return parse_spec({
        "name": "cluster", "objective": {"metric": METRIC, "mode": "max"},
        "searcher": {"type": "tpe", "seed": 0, "n_startup_trials": 4},
        "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
        "num_samples": trials, "max_concurrent": per_study, "resources": PER_TRIAL, "protocol": "seed",
        "baseline": True, "reuse_actors": True,
        "studies": {"margin": [round(0.05 * (i + 1), 2) for i in range(studies)]},
        "fixed": {"data_name": "synthetic", "backbone_type": "tiny", "num_epochs": epochs, "device": "cpu",
                  "num_workers": 0, "loss_name": "balanced_proxy"},
        "space": {name: {"choice": values} for name, values in SEARCH_GRID.items()},
    }, "cluster")


def replay_slowly(config: dict[str, Any], curves: dict[tuple[str, ...], list[float]], epoch_s: float) -> None:
    """The recorded curve of the config's grid point, `epoch_s` seconds an epoch; `started` and `at` are
    wall-clock times (Tune's own `timestamp` is whole seconds)."""
    from ray import tune

    started = time.time()
    for epoch, value in enumerate(curves[_grid_key(config)][: config["num_epochs"]], start=1):
        time.sleep(epoch_s)
        tune.report({METRIC: value, "epoch": epoch, "started": started, "at": time.time()})


def run_once(together: bool, args: argparse.Namespace, curves: dict[tuple[str, ...], list[float]],
             folder: Path) -> dict[str, float]:
    """One way of running the spec on a fresh local Ray: wall time (Ray's start included), busy slot-seconds,
    trials and epochs run."""
    import os

    import ray
    from ray import tune

    from tune_upl.planning import plan_studies
    from tune_upl.search import quiet_ray, run_studies, trials_at_once

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local benchmark Ray: no token authentication
    quiet_ray(False)
    spec = cluster_spec(args.studies, args.trials, args.epochs, args.per_study)
    studies = plan_studies(spec, {"cache_dir": str(folder / "cache")})
    function = tune.with_parameters(replay_slowly, curves=curves, epoch_s=args.epoch_s)
    start, clock = time.perf_counter(), time.time()
    ray.init(**CLUSTER, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        grids = []
        if together:
            at_once = trials_at_once(spec, len(studies), ray.cluster_resources())
            grids.append(run_studies(spec, studies, _made(folder / "together"), False, at_once, function=function))
        else:  # as before: one Tuner per study, one after another
            for study in studies:
                grids.append(run_studies(spec, [study], _made(folder / study.key), False, spec.max_concurrent,
                                         function=function))
        wall = time.perf_counter() - start
    finally:
        ray.shutdown()
    frames = [r.metrics_dataframe for grid in grids for r in grid if r.metrics_dataframe is not None]
    busy = sum(float(f["at"].max() - f["started"].min()) for f in frames)
    first = min(float(f["started"].min()) for f in frames) - clock  # Ray's start and the first worker's
    return {"wall": wall, "busy": busy, "trials": len(frames), "epochs": sum(len(f) for f in frames), "first": first}


def _made(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def measure(args: argparse.Namespace) -> SuiteResult:
    """GPU-slot utilisation and wall time, the studies one after another against all at once."""
    args.studies, args.trials, args.epochs, default_s, args.per_study = (
        (2, 3, 2, 0.2, 2) if args.quick else (6, 8, 6, 0.5, 2))
    args.epoch_s = args.epoch_s or default_s
    slots = min(CLUSTER["num_cpus"] / PER_TRIAL["cpu"], CLUSTER["num_gpus"] / PER_TRIAL["gpu"])
    allowed = min(slots, args.studies * args.per_study)
    curves = load_grid(Path(args.grid))
    result = SuiteResult("cluster")
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for together in (False, True):
            runs[together] = run_once(together, args, curves, Path(tmp) / ("together" if together else "sequential"))
    use = {k: r["busy"] / (slots * r["wall"]) for k, r in runs.items()}
    size = f"{args.studies} studies x {args.trials} trials x up to {args.epochs} epochs of {args.epoch_s} s"
    result.details = {"runs": {("together" if k else "sequential"): v for k, v in runs.items()},
                      "slots": slots, "allowed": allowed}
    for together in (False, True):
        run = runs[together]
        result.notes.append(f"{'all at once' if together else 'one after another'}: {run['trials']} trials, "
                            f"{run['epochs']} epochs, {run['busy']:.0f} busy slot-s in {run['wall']:.0f} s, the first "
                            f"trial started {run['first']:.0f} s after the start")
    result.rows += [
        Row("cluster", f"GPU-slot utilisation, all studies at once in one Tune run ({size}; {slots:.0f} slots)",
            100 * use[True], "%", "one Tuner per study, one after another", 100 * use[False], ">= 80%",
            use[True] >= 0.8, f"against the {allowed:.0f} slots {args.per_study} trials a study at a time can fill: "
                              f"{100 * runs[True]['busy'] / (allowed * runs[True]['wall']):.0f}% "
                              f"(one after another: {100 * runs[False]['busy'] / (args.per_study * runs[False]['wall']):.0f}% of "
                              f"{args.per_study})"),
        Row("cluster", "wall time, all studies at once (Ray's start and the workers' included)", runs[True]["wall"],
            "s", "one after another", runs[False]["wall"], ">= 3x shorter",
            runs[False]["wall"] / runs[True]["wall"] >= 3),
    ]
    return result
