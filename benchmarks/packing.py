"""packing suite: aggregate training images/s of 1, 2 and 4 processes sharing one GPU (resnet50 224 px batch
64, the platform's loop), against one process alone: whether several trials a GPU pay off.

Needs CUDA; elsewhere it measures nothing and says so (a note and an empty row), importing nothing more.
The workers are spawned processes that import `benchmarks.train` and the platform's engine.
"""
from __future__ import annotations

import argparse
from typing import Any

import torch

from benchmarks.harness import Row, SuiteResult
from benchmarks.train import make_batches, platform_rate, platform_run, train_config


def _packing_worker(device: str, steps: int, barrier: Any, queue: Any) -> None:
    """One spawned process: warm up, wait for the others, then time one epoch and put its images/s."""
    args = argparse.Namespace(device=device)
    cfg = train_config(args, "resnet50", 224, 64)
    batches = make_batches(cfg, steps, 50)
    run = platform_run(cfg, batches, 50)
    run.train_loader = batches[:3]
    platform_rate(run)  # warm-up
    run.train_loader = batches
    barrier.wait()
    queue.put(platform_rate(run))


def measure(args: argparse.Namespace) -> SuiteResult:
    """1, 2 and 4 processes started together, their rates summed; a note and no figures without CUDA."""
    result = SuiteResult("packing")
    if not args.device.startswith("cuda") or not torch.cuda.is_available():
        result.notes.append("packing needs a GPU (CUDA): this machine has none, so it measured nothing; run "
                            "`python -m benchmarks --suite packing --device cuda` on a GPU machine.")
        result.rows.append(Row("packing", "aggregate images/s of 1, 2, 4 processes on one GPU", float("nan"),
                               "images/s", note="needs a GPU: prepared (scripts/gpu_bench.sh), unmeasured"))
        return result
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    steps = 10 if args.quick else 40
    rates: dict[int, float] = {}
    for count in (1, 2, 4):
        barrier, queue = context.Barrier(count), context.Queue()
        workers = [context.Process(target=_packing_worker, args=(args.device, steps, barrier, queue))
                   for _ in range(count)]
        for worker in workers:
            worker.start()
        rates[count] = sum(queue.get(timeout=600) for _ in workers)
        for worker in workers:
            worker.join()
    for count in (2, 4):
        result.rows.append(Row("packing", f"{count} processes, resnet50 224 px batch 64, aggregate", rates[count],
                               "images/s", "one process alone", rates[1],
                               ">= 1.5x at 4" if count == 4 else "", (rates[4] >= 1.5 * rates[1]) if count == 4 else None))
    return result
