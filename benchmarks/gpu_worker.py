"""One process of the GPU check (`benchmarks/gpu_check.py`), its figures written as JSON to `--out`.

- `trial`: the trial loop itself (`tune_upl.loop.run_trial`) with plain hooks: it claims the device and its
  memory share as a Ray trial does, trains one epoch through the real loader, evaluates and saves a
  checkpoint. Packed processes wait for each other after their start (`--ready`, `--count`), so their epochs
  overlap.
- `memory`: the same configuration's training step over in-memory batches (no loader): the loader's share.
- `eval`: Recall@K, MAP@R and R-precision at `--eval_n` images on the device, best of 3, against the CPU's.

TF32 is set to torch's defaults at the start of each process (matmul off, cuDNN on), so no part inherits
another's settings.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

BARRIER_TIMEOUT_S = 120.0  # packed processes that never all start: the check fails instead of waiting


def tf32_defaults() -> dict[str, bool]:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = True
    return {"tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32}


def wait_for_all(ready: Path, count: int) -> float:
    """Say this process is ready, then wait until `count` are (bounded), or until one says its start failed
    (`failed_to_start`): the seconds waited."""
    start = time.perf_counter()
    ready.mkdir(parents=True, exist_ok=True)
    (ready / f"{os.getpid()}.ready").touch()
    while len(list(ready.glob("*.ready"))) < count:
        if list(ready.glob("*.failed")):
            raise RuntimeError("a packed peer failed at its start; this trial stops waiting for it")
        if time.perf_counter() - start > BARRIER_TIMEOUT_S:
            raise TimeoutError(f"{len(list(ready.glob('*.ready')))} of {count} packed processes started within "
                               f"{BARRIER_TIMEOUT_S:.0f} s")
        time.sleep(0.05)
    return time.perf_counter() - start


def failed_to_start(ready: Path) -> None:
    """Tell the packed peers waiting in `ready` that this process will never join them."""
    ready.mkdir(parents=True, exist_ok=True)
    (ready / f"{os.getpid()}.failed").touch()


def nvml_card(index: int = 0) -> dict[str, Any]:
    """The GPU as its driver describes it (NVML creates no CUDA context): name, total memory, memory in use
    (contexts and kernels included, which torch's allocator does not see), and each process's use where NVML
    can list it. {"nvml_error": ...} without NVML (no library, no permission, a virtualised GPU)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        name = pynvml.nvmlDeviceGetName(handle)
        processes = {p.pid: p.usedGpuMemory for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)}
        return {"name": name.decode() if isinstance(name, bytes) else name, "total": int(memory.total),
                "used": int(memory.used), "processes": processes}
    except Exception as error:
        return {"nvml_error": f"{type(error).__name__}: {error}"}


def nvml_memory(device: torch.device) -> dict[str, Any]:
    """NVML's count of the card's memory in use, and of this process's, for `device`."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    card = nvml_card(int(visible) if visible.isdigit() else device.index or 0)
    if "nvml_error" in card:
        return card
    mine = card["processes"].get(os.getpid())
    return {"nvml_used": card["used"], "nvml_process": int(mine) if mine is not None else None}


def memory_figures(device: torch.device) -> dict[str, Any]:
    if device.type != "cuda":
        return {}
    free, total = torch.cuda.mem_get_info(device)
    return {"peak_allocated": torch.cuda.max_memory_allocated(device), "reserved": torch.cuda.memory_reserved(device),
            "free": free, "total": total, **nvml_memory(device)}


def trial(args: argparse.Namespace) -> dict[str, Any]:
    from tune_upl.config import make_config
    from tune_upl.loop import TrialHooks, run_trial

    cfg = make_config(json.loads(args.config))
    figures: dict[str, Any] = {"results": []}

    def started(run: Any) -> None:
        loader = run.train_loader
        figures.update(device=str(run.device), memory_cap=run.memory_cap, images=len(loader) * cfg.batch_size,
                       workers=loader.num_workers, pin_memory=loader.pin_memory, channels_last=run.channels_last,
                       amp=str(run.amp_dtype), optimizer=type(run.optimizer).__name__,
                       threads=torch.get_num_threads(), gpu=_gpu(run.device))
        if args.ready:
            figures["waited_s"] = wait_for_all(Path(args.ready), args.count)
        figures["train_start"] = time.time()

    def report(result: dict[str, Any], folder: Optional[Path]) -> None:
        figures["results"].append(result)
        figures["reported"] = time.time()
        if folder is not None:
            figures["checkpoint_bytes"] = sum(f.stat().st_size for f in folder.iterdir())
        if "images_per_s" in result:
            figures.update(memory_figures(torch.device(result["device"])))

    try:
        run_trial(cfg, args.share, TrialHooks(report=report, started=started, node=socket.gethostname()))
    finally:
        if args.ready and "train_start" not in figures:  # ended (reported or raised) before its start
            failed_to_start(Path(args.ready))
    return figures


def memory(args: argparse.Namespace) -> dict[str, Any]:
    """One epoch of the engine's training step over fixed in-memory batches, as many as the loader's epoch."""
    from benchmarks.train import make_batches, platform_rate, platform_run
    from tune_upl.config import make_config

    cfg = make_config(json.loads(args.config))
    torch.set_num_threads(cfg.resolved_num_threads)
    batches = make_batches(cfg, args.steps, num_classes=50)
    run = platform_run(cfg, batches, 50)
    return {"images_per_s": platform_rate(run), "images": args.steps * cfg.batch_size, "device": str(run.device)}


def evaluation(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.eval import clustered_embeddings
    from benchmarks.harness import sync
    from tune_upl.metrics import retrieval_metrics

    device = torch.device(args.device)
    ks = (1, 2, 4, 8)
    emb, labels = clustered_embeddings(args.eval_n, 512, max(2, args.eval_n // 100), device)
    seconds = []
    for _ in range(3):
        sync(device)
        start = time.perf_counter()
        found = retrieval_metrics(emb, labels, ks)
        sync(device)
        seconds.append(time.perf_counter() - start)
    on_cpu = retrieval_metrics(emb.cpu(), labels.cpu(), ks)
    gap = max([abs(found.recall[k] - on_cpu.recall[k]) for k in ks] + [abs(found.map_at_r - on_cpu.map_at_r)])
    return {"seconds": min(seconds), "all_seconds": seconds, "n": args.eval_n, "device": str(device),
            "recall@1": found.recall[1], "map@r": found.map_at_r, "largest_gap_to_cpu": gap}


def _gpu(device: torch.device) -> dict[str, Any]:
    if device.type != "cuda":
        return {}
    props = torch.cuda.get_device_properties(device)
    return {"name": props.name, "total_memory": props.total_memory, "capability": f"{props.major}.{props.minor}",
            "torch": torch.__version__, "cuda": torch.version.cuda}


def die_with_parent() -> None:
    """Killed when the check dies, even by SIGKILL (Linux's PR_SET_PDEATHSIG): no trial keeps training on a
    GPU after its check is gone. Said first thing, then the parent is checked still to be there."""
    parent = os.getppid()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        sys.exit("the GPU check ended before this process started")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_worker", description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("trial", "memory", "eval"))
    parser.add_argument("--out", required=True, help="where this process's figures go (JSON)")
    parser.add_argument("--config", default="{}", help="the TrialConfig values (JSON)")
    parser.add_argument("--share", type=float, default=0.0, help="trial: the GPU share it was given")
    parser.add_argument("--ready", help="trial: the folder packed processes meet in before their epoch")
    parser.add_argument("--count", type=int, default=1, help="trial: how many packed processes meet there")
    parser.add_argument("--steps", type=int, default=10, help="memory: in-memory batches")
    parser.add_argument("--eval_n", type=int, default=20000, help="eval: images")
    parser.add_argument("--device", default="cuda", help="eval: the device")
    args = parser.parse_args(argv)
    die_with_parent()
    tf32 = tf32_defaults()
    figures = {"trial": trial, "memory": memory, "eval": evaluation}[args.mode](args)
    Path(args.out).write_text(json.dumps({**figures, **tf32, "pid": os.getpid()}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
