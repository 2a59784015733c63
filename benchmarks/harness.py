"""The harness: options, the suite registry, the machine's description and the markdown report.

A suite is a module of this package with `measure(args) -> SuiteResult`; the registry names modules, not
functions, so that running a light suite imports neither the heavy suites' modules nor what they measure
(and so that suite modules can import the result types from here without an import cycle).
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import os
import platform
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

import benchmarks

# suite name -> the module that measures it (imported when the suite runs)
SUITES: dict[str, str] = {
    "data": "benchmarks.data", "train": "benchmarks.train", "eval": "benchmarks.eval",
    "overhead": "benchmarks.overhead", "search": "benchmarks.search", "warm": "benchmarks.warm",
    "proxies": "benchmarks.proxies",
    "cluster": "benchmarks.cluster",
}
CPU_SUITES = ("data", "train", "eval")  # what runs without Ray and without a GPU
DEFAULT_SUITES = (*CPU_SUITES, "overhead", "search")
DEFAULT_OUT = "reports/performance.md"
DEFAULT_GRID = "reports/search_grid.csv"  # the search suite's recorded grid (written by --record)
COMMAND = "python -m benchmarks"


@dataclass
class Row:
    """One measured figure beside its baseline; `met` is None where no target applies or none could be judged."""

    suite: str
    measure: str
    value: float
    unit: str
    baseline: str = ""
    baseline_value: Optional[float] = None
    target: str = ""
    met: Optional[bool] = None
    note: str = ""

    @property
    def ratio(self) -> Optional[float]:
        if self.baseline_value in (None, 0) or self.value != self.value:
            return None
        return self.value / self.baseline_value


@dataclass
class SuiteResult:
    name: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)  # e.g. the eval suite's metric results
    seconds: float = 0.0


def fmt(value: Optional[float]) -> str:
    """A figure at a precision worth reading; '-' for none or NaN."""
    if value is None or value != value:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work, so that a timer stopped next measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def environment(args: argparse.Namespace) -> dict[str, str]:
    """Date, command, CPU, GPU, Python and library versions: what a figure depends on."""
    from importlib import metadata

    cpu = platform.processor() or "unknown"
    try:
        match = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = match.group(1).strip() if match else cpu
    except OSError:
        pass
    versions = []
    for package in ("torch", "torchvision", "numpy", "pillow", "ray", "optuna", "adamp", "pydantic"):
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{package} (absent)")
    gpu = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "none"
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": f"{COMMAND} " + " ".join(shlex.quote(a) for a in args.argv),
        "cpu": f"{cpu}, {os.cpu_count()} logical CPUs ({usable} usable), torch threads {torch.get_num_threads()}",
        "gpu": gpu,
        "python": platform.python_version(),
        "libraries": ", ".join(versions),
    }


def table(results: list[SuiteResult]) -> list[str]:
    lines = ["| suite | measured | value | baseline | baseline value | ratio | target | met | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for suite in results:
        for r in suite.rows:
            met = {True: "yes", False: "**no**", None: "-"}[r.met]
            ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "-"
            lines.append(f"| {r.suite} | {r.measure} | {fmt(r.value)} {r.unit} | {r.baseline or '-'} | "
                         f"{fmt(r.baseline_value)} | {ratio} | {r.target or '-'} | {met} | {r.note} |")
    return lines


def write_report(path: Path, results: list[SuiteResult], env: dict[str, str], preamble: str = "") -> None:
    lines = ["# Performance", "", f"Written by `{COMMAND}` (the docstrings of `benchmarks/`: what each suite "
             "measures).", "", *[f"- {key}: {value}" for key, value in env.items()], ""]
    if preamble:
        lines += [preamble.strip(), ""]
    lines += table(results) + [""]
    for suite in results:
        for note in suite.notes:
            lines.append(f"- {suite.name}: {note}")
        lines.append(f"- {suite.name}: {suite.seconds:.0f} s")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=COMMAND, description=benchmarks.__doc__.splitlines()[0])
    parser.add_argument("--suite", default=",".join(DEFAULT_SUITES),
                        help=f"comma-separated, of {', '.join(SUITES)}, or all (default: {','.join(DEFAULT_SUITES)})")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes, for tests")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"the markdown report (default {DEFAULT_OUT})")
    parser.add_argument("--images", type=int, default=0, help="data: JPEGs (default 300, quick 40)")
    parser.add_argument("--image_size", "--image-size", type=int, default=224, help="data: crop size")
    parser.add_argument("--folder", help="data: a CUB-layout dataset to read (default: write one)")
    parser.add_argument("--trial_cpus", "--trial-cpus", default="4",
                        help="data: comma-separated resources.cpu of the trials whose loaders are timed (default 4)")
    parser.add_argument("--repeats", type=int, default=0,
                        help="eval: timed runs of ours and the k-NN peer, the best kept (default 3, quick 1)")
    parser.add_argument("--eval_sizes", "--eval-sizes", default="",
                        help="eval: comma-separated N of 1000, 3000, 8131, 20000, 60502 (Stanford Online Products' "
                             "test set, Recall@1,10,100,1000) (default 8131,20000; quick 1000,3000)")
    parser.add_argument("--threads", type=int, default=0, help="train: torch threads (default: all)")
    parser.add_argument("--cache_dir", "--cache-dir", help="overhead: where the synthetic set is (default: temporary)")
    parser.add_argument("--record", action="store_true",
                        help="search: train the grid first (the 48-point grid: about 25 minutes here) and write --grid; "
                             "warm: train the source grid first (reports/search_grid_source.csv)")
    parser.add_argument("--grid", default=DEFAULT_GRID,
                        help="the recorded grid's CSV (default: the search suite's reports/search_grid_fine.csv, "
                             f"the cluster suite's {DEFAULT_GRID})")
    parser.add_argument("--epoch_s", "--epoch-s", type=float, default=0.0,
                        help="cluster: seconds a replayed epoch sleeps (default 0.5, quick 0.2)")
    parser.add_argument("--preamble", default="", help="text put above the table (e.g. notes on the machine)")
    args = parser.parse_args(argv)
    names = tuple(SUITES) if args.suite == "all" else tuple(s.strip() for s in args.suite.split(",") if s.strip())
    unknown = [s for s in names if s not in SUITES]
    if unknown:
        parser.error(f"unknown suite {unknown[0]!r}; allowed: {', '.join(SUITES)}, all")
    args.suites = names
    args.argv = argv
    return args


def run(argv: Optional[list[str]] = None) -> list[SuiteResult]:
    """Run the chosen suites one after the other, print each one's rows as it ends, write the report."""
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    env = environment(args)  # before the suites, which may change torch's thread count
    results = []
    for name in args.suites:
        start = time.perf_counter()
        suite = importlib.import_module(SUITES[name]).measure(args)
        suite.seconds = time.perf_counter() - start
        results.append(suite)
        print("\n".join(table([suite])[2 if results[:-1] else 0:]), flush=True)
        for note in suite.notes:
            print(f"{name}: {note}", flush=True)
    write_report(Path(args.out), results, env, args.preamble)
    print(f"wrote {args.out}")
    return results


def main(argv: Optional[list[str]] = None) -> int:
    results = run(argv)
    return 0 if all(r.met is not False for s in results for r in s.rows) else 1
