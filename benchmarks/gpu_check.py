"""The GPU check: the trial loop on a real GPU, as one prepared run (`scripts/gpu_check.sh`).

(a) `1 / share` processes packed on the one GPU at `resources.gpu` = share, each running the trial loop
    (`tune_upl.loop.run_trial`): ResNet50 from a stand-in weights file with the published name and shapes,
    the real loader with workers over a prepared cache at 224 px, bf16, channels-last, AdamP, one epoch,
    evaluation and a checkpoint save, with no out-of-memory; their epochs start together.
(b) one such process alone at share 1, with all the node's CPUs: images/s with the real loader, and with
    in-memory batches (so the loader's share shows).
(c) the packing ratio: the aggregate images/s of (a) over (b).
(d) evaluation (Recall@K, MAP@R, R-precision) at N = 20,000 on the GPU, against the CPU's answer.
(e) one DINO ViT-S/16 trial at resources.gpu = share (vit_optuna.yaml's packing) from a stand-in of the
    published file, at 224 px, batch 128, bf16, no channels-last (a ViT's `auto`), AdamW with gradients
    clipped to norm 3 and the patch embedding frozen: images/s, peak memory against its cap, an evaluation and
    a checkpoint.
Beside them: the memory a process holds outside torch's allocator, measured (NVML) against the figure the
memory cap leaves for it (`gpu_memory.PROCESS_OVERHEAD_BYTES`), and the packed processes' total against the card.

Every part is a child process (`benchmarks/gpu_worker.py`) waited for with a deadline, so this process never
creates a CUDA context of its own. The report goes to `--out`; at the first failure it says so in one line on
stderr (the report keeps what was measured) and exits 1; without CUDA it exits 4. `--cpu` is the dry mode:
the tiny backbone at 32 px, 2 processes, on the CPU, for the tests.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

PROG = "gpu_check"
GIB = 2**30
VIT = "vit_small_patch16_224.dino"


class Failure(Exception):
    """A part of the check that failed: its one line."""


@dataclass
class Plan:
    """What the check runs: one mode's sizes."""

    cpu: bool
    share: float
    trial: dict[str, Any]  # the TrialConfig values every trial shares
    vit_trial: dict[str, Any]  # part (e)'s
    packed_threads: int
    alone_threads: int
    copies: int  # each generated image appears this many times in the dataset (a larger epoch)
    eval_n: int
    timeout_s: float  # each part at most
    deadline: float = float("inf")  # time.monotonic() by which the whole check ends
    figures: dict[str, Any] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return round(1 / self.share)


def make_plan(cpu: bool, work: Path, cache_dir: Path, timeout_s: float) -> Plan:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    common = dict(num_epochs=1, warm_up=0, cache_dir=str(cache_dir), seed=1)
    vit = dict(backbone_type=VIT, optimizer="adamw", lr=5e-6, proxy_lr=5e-2, weight_decay=1e-2,
               lr_schedule="constant", grad_clip=3.0, freeze_patch_embed=1, pretrained="auto",
               weights_dir=str(work / "weights"))
    if cpu:
        trial = dict(common, data_name="synthetic", backbone_type="tiny", image_size=32, batch_size=16,
                     feature_dim=32, device="cpu", pretrained=str(work / "weights" / "tiny-standin.pth"))
        vit_trial = dict(trial, **vit, image_size=32, feature_dim=32)
        return Plan(True, 0.5, trial, vit_trial, 1, max(1, cpus), 1, 2000, timeout_s or 300)
    trial = dict(common, data_name="folder", data_path=str(work / "images"), backbone_type="resnet50",
                 image_size=224, batch_size=64, feature_dim=512, device="auto", amp="bf16", channels_last=True,
                 optimizer="adamp", pretrained="auto", weights_dir=str(work / "weights"))
    vit_trial = dict(trial, **vit, batch_size=128, feature_dim=384, channels_last="auto")
    share = 0.25
    return Plan(False, share, trial, vit_trial, max(1, cpus // round(1 / share)), cpus, 16, 20000,
                timeout_s or 300)


# ---------------------------------------------------------------- the data and the weights
def prepare(plan: Plan, work: Path) -> None:
    """The dataset (prepared cache) and the stand-in weights file the trials read."""
    import torch

    from benchmarks.stand_ins import write_vit_stand_in
    from tune_upl.config import make_config
    from tune_upl.facts import BACKBONES
    from tune_upl.models import build_tiny
    from tune_upl.prepare import prepare_dataset
    from tune_upl.synthetic import ensure_synthetic

    start = time.perf_counter()
    weights = work / "weights"
    weights.mkdir(parents=True, exist_ok=True)
    write_vit_stand_in(VIT, weights)  # part (e)
    if plan.cpu:
        torch.save(build_tiny(None).state_dict(), plan.trial["pretrained"])
    else:  # the published file's name, keys and shapes (the classifier too), random values
        from torchvision.models import resnet50

        name = BACKBONES["resnet50"].weights_url.rsplit("/", 1)[-1]
        torch.save(resnet50(weights=None).state_dict(), weights / name)
        source = ensure_synthetic(plan.trial["cache_dir"]) / "images"
        tree = Path(plan.trial["data_path"])
        for folder in sorted(p for p in source.iterdir() if p.is_dir()):
            (tree / folder.name).mkdir(parents=True, exist_ok=True)
            for image in sorted(folder.iterdir()):
                for copy in range(plan.copies):
                    target = tree / folder.name / f"{image.stem}_{copy:02d}{image.suffix}"
                    if not target.exists():
                        os.link(image, target)
    prepared = prepare_dataset(make_config(plan.trial), progress=False)
    plan.figures["prepare_s"] = time.perf_counter() - start
    plan.figures["dataset"] = (f"{prepared.images:,} images ({prepared.train_classes} train + "
                               f"{prepared.test_classes} test classes; the synthetic renders, 80 px, each "
                               f"{plan.copies} time(s)), prepared in {plan.figures['prepare_s']:.0f} s")


# ---------------------------------------------------------------- the child processes
def spawn(plan: Plan, part: str, mode: str, work: Path, count: int = 1, **options: Any) -> list[dict[str, Any]]:
    """`count` worker processes started together and watched together until the part's deadline; their
    figures. The first that fails ends the part: a trial that reported an error (out of memory, a failed
    start: its peers stop waiting for it), a process that exited non-zero, or the deadline (every process
    killed with its loader workers). One line says which."""
    folder = work / part
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    if count > 1:
        options["ready"], options["count"] = str(folder / "ready"), count
    procs = []
    for index in range(count):
        args = [sys.executable, "-m", "benchmarks.gpu_worker", mode, "--out", str(folder / f"{index}.json")]
        for key, value in options.items():
            args += [f"--{key}", json.dumps(value) if isinstance(value, dict) else str(value)]
        log = open(folder / f"{index}.log", "w")
        procs.append((subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True), log))
    limit = min(plan.timeout_s, plan.deadline - time.monotonic())
    deadline = time.monotonic() + limit
    name = lambda index: f"part {part}: process {index + 1} of {count}"
    read: set[int] = set()  # finished processes whose figures were read
    try:
        while True:
            codes = [proc.poll() for proc, _ in procs]
            for index, code in enumerate(codes):
                if code == 0 and mode == "trial" and index not in read:
                    read.add(index)
                    error = _reported_error(folder / f"{index}.json")
                    if error:
                        raise Failure(f"{name(index)}: the trial ended with {error}")
            for index, code in enumerate(codes):
                if code not in (None, 0):
                    raise Failure(f"{name(index)} exited {code}: {_last_line(folder / f'{index}.log')}")
            if all(code == 0 for code in codes):
                break
            if time.monotonic() > deadline:
                running = [index for index, code in enumerate(codes) if code is None]
                raise Failure(f"{name(running[0])} still running after {limit:.0f} s; killed "
                              f"(log: {folder / f'{running[0]}.log'})")
            time.sleep(0.2)
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.close()
    return [json.loads((folder / f"{index}.json").read_text()) for index in range(count)]


def _reported_error(path: Path) -> Optional[str]:
    results = json.loads(path.read_text()).get("results", []) if path.is_file() else []
    return results[-1].get("error") if results else None


def _last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no output)"


def trained(part: str, figures: dict[str, Any]) -> dict[str, Any]:
    """The process's trained epoch (a trial that ended with an error has failed its part in `spawn`)."""
    results = figures["results"]
    last = results[-1] if results else {}
    if "images_per_s" not in last or "val_recall@1" not in last or not figures.get("checkpoint_bytes"):
        raise Failure(f"part {part}: the trial reported no trained epoch, evaluation and checkpoint: {last}")
    return last


# ---------------------------------------------------------------- the parts
def packed(plan: Plan, work: Path) -> None:
    values = dict(plan.trial, num_threads=plan.packed_threads)
    runs = spawn(plan, "a", "trial", work, plan.count, config=values, share=plan.share)
    lasts = [trained("a", run) for run in runs]
    starts = [run["train_start"] for run in runs]
    ends = [run["train_start"] + run["images"] / last["images_per_s"] for run, last in zip(runs, lasts)]
    images = sum(run["images"] for run in runs)
    plan.figures["a"] = {"runs": runs, "aggregate": images / (max(ends) - min(starts)),
                         "start_spread_s": max(starts) - min(starts)}
    first = runs[0]
    cap = first.get("memory_cap")
    plan.lines += [
        f"| (a) packed | {plan.count} trials at resources.gpu {plan.share:g}, {plan.packed_threads} CPUs each "
        f"({first['workers']} loader workers): aggregate training images/s over their overlapping epochs | "
        f"{plan.figures['a']['aggregate']:.0f} | {images:,} images; epochs started within "
        f"{plan.figures['a']['start_spread_s']:.2f} s of each other |",
        *[f"| (a) trial {i + 1} | images/s; val Recall@1; peak allocated; memory cap; checkpoint | "
          f"{last['images_per_s']:.0f} | {last['val_recall@1']:.3f}; {_gib(run.get('peak_allocated'))}; "
          f"{_cap(run.get('memory_cap'), run.get('total'))}; {run['checkpoint_bytes'] / 2**20:.0f} MB; "
          f"{run['device']}, {run['amp']}, channels-last {run['channels_last']}, {run['optimizer']} |"
          for i, (run, last) in enumerate(zip(runs, lasts))],
    ]
    if not plan.cpu and cap is None:
        raise Failure(f"part a: a trial at resources.gpu {plan.share:g} was not capped")


def alone(plan: Plan, work: Path) -> None:
    values = dict(plan.trial, num_threads=plan.alone_threads)
    [run] = spawn(plan, "b", "trial", work, config=values, share=1.0)
    last = trained("b", run)
    steps = run["images"] // plan.trial["batch_size"]
    [memory] = spawn(plan, "b-memory", "memory", work, config=values, steps=steps)
    plan.figures["b"] = {"run": run, "memory": memory}
    loader, batches = last["images_per_s"], memory["images_per_s"]
    ratio = plan.figures["a"]["aggregate"] / loader
    plan.figures["c"] = ratio
    plan.lines += [
        f"| (b) alone | 1 trial at resources.gpu 1, {plan.alone_threads} CPUs ({run['workers']} loader workers): "
        f"training images/s with the real loader | {loader:.0f} | {run['images']:,} images; val Recall@1 "
        f"{last['val_recall@1']:.3f}; peak allocated {_gib(run.get('peak_allocated'))} |",
        f"| (b) alone | the same step over {steps} in-memory batches (no loader) | {batches:.0f} | "
        f"the loader's share of the epoch: {max(0.0, 1 - loader / batches):.0%} |",
        f"| (c) packing | aggregate of (a) over (b) with the real loader | {ratio:.2f}x | |",
    ]


def overhead(plan: Plan, work: Path) -> None:
    """The memory a process holds outside torch's allocator (the CUDA context, loaded kernels) against the
    figure the memory cap leaves for it, from the lone process of (b): NVML's count for the process where NVML
    lists it, else the card's use while it ran less the card's use before it, else the card's use as
    `cudaMemGetInfo` gives it (an upper bound: what the driver holds counts too); each less torch's reserved
    memory. Beside it, what the packed processes held together against the card."""
    from tune_upl.gpu_memory import CARD_RESERVE, PROCESS_OVERHEAD_BYTES

    if plan.cpu:
        plan.lines.append("| memory | process overhead outside torch's allocator | - | the CPU dry mode has no GPU |")
        return
    run, before = plan.figures["b"]["run"], plan.figures.get("nvml_before_b", {})
    if run.get("nvml_process") is not None:
        held, how = run["nvml_process"], "NVML's count for the process"
    elif run.get("nvml_used") is not None and "used" in before:
        held, how = run["nvml_used"] - before["used"], "the card's use (NVML) less its use before the process"
    else:
        held, how = run["total"] - run["free"], "an upper bound: the card's use as cudaMemGetInfo gives it"
    measured = held - run["reserved"]
    plan.figures["overhead"] = {"measured": measured, "how": how, "stated": PROCESS_OVERHEAD_BYTES}
    plan.lines.append(f"| memory | the lone process's memory outside torch's allocator ({how}, less torch's "
                      f"{_gib(run['reserved'])} reserved) | {_gib(measured)} | the cap leaves "
                      f"{_gib(PROCESS_OVERHEAD_BYTES)} (gpu_memory.PROCESS_OVERHEAD_BYTES) |")
    packed_runs = plan.figures["a"]["runs"]
    if all(r.get("nvml_process") is not None for r in packed_runs):
        together = sum(r["nvml_process"] for r in packed_runs)
        plan.lines.append(f"| memory | the {plan.count} packed processes together (NVML, each at its epoch's end) | "
                          f"{_gib(together)} | of {_gib(run['total'])}; their caps and overheads fill "
                          f"{1 - CARD_RESERVE:.0%} of it |")
    if measured > PROCESS_OVERHEAD_BYTES:
        raise Failure(f"memory: a process holds {_gib(measured)} outside torch's allocator ({how}), more than the "
                      f"{_gib(PROCESS_OVERHEAD_BYTES)} the memory cap leaves for it; raise gpu_memory.PROCESS_OVERHEAD_BYTES")


def evaluation(plan: Plan, work: Path) -> None:
    device = "cpu" if plan.cpu else "cuda"
    [found] = spawn(plan, "d", "eval", work, eval_n=plan.eval_n, device=device)
    plan.figures["d"] = found
    plan.lines.append(f"| (d) eval | Recall@1,2,4,8 + MAP@R + R-precision at N = {plan.eval_n:,}, d = 512 on "
                      f"{device}, best of 3 | {found['seconds']:.3f} s | largest difference to the CPU's answer "
                      f"{found['largest_gap_to_cpu']:.2g} |")
    if found["largest_gap_to_cpu"] > 1.0 / plan.eval_n:
        raise Failure(f"part d: the {device} evaluation differs from the CPU's by {found['largest_gap_to_cpu']:.3g}, "
                      f"more than one query in {plan.eval_n:,}")


def vit(plan: Plan, work: Path) -> None:
    """Part (e): a ViT-S/16 trial at the packed share, through the same trial loop."""
    values = dict(plan.vit_trial, num_threads=plan.packed_threads)
    [run] = spawn(plan, "e", "trial", work, config=values, share=plan.share)
    last = trained("e", run)
    plan.figures["e"] = run
    plan.lines.append(
        f"| (e) ViT-S/16 | 1 DINO ViT-S/16 trial at resources.gpu {plan.share:g}, {plan.vit_trial['image_size']} px, "
        f"batch {plan.vit_trial['batch_size']}: images/s; val Recall@1; peak allocated; memory cap; checkpoint | "
        f"{last['images_per_s']:.0f} | {last['val_recall@1']:.3f}; {_gib(run.get('peak_allocated'))}; "
        f"{_cap(run.get('memory_cap'), run.get('total'))}; {run['checkpoint_bytes'] / 2**20:.0f} MB; {run['device']}, "
        f"{run['amp']}, channels-last {run['channels_last']}, {run['optimizer']} |")
    if not plan.cpu and run["channels_last"]:
        raise Failure("part e: the ViT trial ran channels-last; its `auto` is contiguous")


def _gib(value: Optional[float]) -> str:
    return "-" if value is None else f"{value / GIB:.2f} GiB"


def _cap(cap: Optional[float], total: Optional[int]) -> str:
    if cap is None:
        return "uncapped"
    return f"capped at {cap:.4f} of the card" + (f" ({_gib(cap * total)})" if total else "")


# ---------------------------------------------------------------- the report
def _gpu_line(plan: Plan) -> str:
    """The GPU as a trial saw it, else as NVML names it (a check that failed before any trial started)."""
    if plan.cpu:
        return "- GPU: none (the CPU dry mode)"
    gpu = next((r.get("gpu") for r in plan.figures.get("a", {}).get("runs", []) if r.get("gpu")), None)
    if gpu:
        return (f"- GPU: {gpu['name']}, {gpu['total_memory'] / GIB:.1f} GiB, capability {gpu['capability']}, "
                f"torch {gpu['torch']} (CUDA {gpu['cuda']})")
    card = plan.figures.get("card", {})
    return f"- GPU: {card['name']}, {card['total'] / GIB:.1f} GiB (NVML)" if "name" in card else "- GPU: unknown"


def write_report(plan: Plan, out: Path, argv: list[str], seconds: float, failure: Optional[str]) -> None:
    """The report as far as the check got: written after every part, so an interrupted check leaves one."""
    cpu = platform.processor() or "unknown"
    match = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text()) if Path("/proc/cpuinfo").exists() else None
    lines = [
        "# GPU check", "",
        f"Written by `bash scripts/gpu_check.sh {' '.join(argv)}` (`benchmarks/gpu_check.py`: what each part "
        "measures), every trial through the platform's trial loop (`tune_upl.loop.run_trial`).", "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        _gpu_line(plan),
        f"- CPU: {match.group(1).strip() if match else cpu}, {os.cpu_count()} logical CPUs; Python {platform.python_version()}",
        f"- data: {plan.figures.get('dataset', '-')}",
        f"- trials: {json.dumps({k: v for k, v in plan.trial.items() if not k.endswith(('_dir', '_path')) and k != 'pretrained'})}",
        f"- TF32 at each part's start: matmul off, cuDNN on (torch's defaults); {seconds:.0f} s in all", "",
        "| part | measured | value | note |", "|---|---|---|---|", *plan.lines, "",
    ]
    if failure:
        lines += [f"**Failed**: {failure}", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    (out.parent / (out.stem + ".json")).write_text(json.dumps(plan.figures, indent=1, default=str))


def _terminated(signum: int, frame: Any) -> None:
    raise Failure(f"stopped by signal {signal.Signals(signum).name}; the report keeps what was measured")


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{PROG}", description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="the dry mode: tiny backbone, 32 px, 2 processes, CPU")
    parser.add_argument("--out", default="reports/gpu.md", help="the report (default reports/gpu.md)")
    parser.add_argument("--work", help="where the data, weights and logs go (default: a temporary folder)")
    parser.add_argument("--cache_dir", "--cache-dir", help="where the synthetic images are (default: under --work)")
    parser.add_argument("--timeout", type=float, default=0.0, help="seconds each part may take (default 300)")
    parser.add_argument("--budget", type=float, default=450.0,
                        help="seconds the whole check may take, preparation included (default 450: it ends "
                             "inside a 10-minute device run, with time to spare)")
    args = parser.parse_args(argv)
    import torch

    if not args.cpu and not torch.cuda.is_available():  # counts devices without creating a context
        print(f"{PROG}: no CUDA: torch {torch.__version__} of {sys.executable} sees no GPU; nothing measured "
              "(--cpu runs the dry mode)", file=sys.stderr)
        return 4
    from benchmarks.gpu_worker import nvml_card
    from tune_upl.errors import first_line

    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check-")).resolve()
    plan = make_plan(args.cpu, work, Path(args.cache_dir or work / "cache").resolve(), args.timeout)
    start, failure = time.perf_counter(), None
    plan.deadline = time.monotonic() + args.budget
    if not args.cpu:
        plan.figures["card"] = nvml_card()
    out = Path(args.out)
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        for part in (prepare, packed, alone, overhead, evaluation, vit):
            if time.monotonic() > plan.deadline:
                raise Failure(f"the check's budget of {args.budget:.0f} s is spent before {part.__name__}")
            if part is alone and not args.cpu:
                plan.figures["nvml_before_b"] = nvml_card()
            part(plan, work)
            write_report(plan, out, argv, time.perf_counter() - start, None)
    except Failure as error:
        failure = str(error)
    except Exception as error:  # a failure of the check itself (data, weights): its first line, not a traceback
        failure = f"{type(error).__name__}: {first_line(error)}"
    finally:
        signal.signal(signal.SIGTERM, previous)
    write_report(plan, out, argv, time.perf_counter() - start, failure)
    if failure:
        print(f"{PROG}: {failure}", file=sys.stderr)
        return 1
    print("\n".join(plan.lines))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
