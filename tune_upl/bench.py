"""Benchmarks of the platform against its limits, each figure beside its baseline in the same run.

    python -m tune_upl.bench [--suite data,train,eval,overhead,packing,search] [--device cpu|cuda] [--quick]
                             [--out FILE] [--record] [--grid CSV]

prints a table and writes `reports/performance.md` (CPU, GPU, library versions, date, command). Suites:

| suite | measured | baseline in the same run |
|---|---|---|
| data | training images/s per loader worker (one process, one thread) on 500x375 JPEGs | raw archive (PIL + the seed's transforms; torchvision decoder + ours) vs the prepared cache |
| train | training images/s of the platform's own loop (`engine.train_epoch`) | a bare PyTorch loop, same model, optimiser and batches |
| eval | time and peak extra memory of Recall@K + MAP@R (`metrics.retrieval_metrics`) | the full N x N similarity matrix, sorted |
| overhead | seconds per trial added by a Ray Tune search of identical short trainings (with and without `reuse_actors`) | the same trainings back to back in this process |
| packing | aggregate images/s of 1, 2, 4 processes training on one GPU | one process alone (needs CUDA) |
| search | epochs a Tune + Optuna TPE + ASHA search spends until it is within 1 point of the grid's best validation Recall@1, over 10 searcher seeds | the full grid (24 points x 6 epochs), and the grid in a random order |

`search` is a tabular benchmark: `--record` trains the grid once with the platform's own grid search on a
144-class synthetic set (about 10 minutes here) and writes every epoch's validation metrics to
`reports/search_grid.csv`; every run then replays real searches against that table with `replay_trial`, a
trainable that reports the recorded curve of the point it is given (it lives here and no search uses it).

Imports: this module imports only the standard library, numpy, torch, torchvision and PIL at import time;
each suite imports what it measures when it runs. `data` and `train` use the package's own code, which
reads its configuration through `tune_upl.config` (pydantic) and, for `train`, `tune_upl.engine` (adamp);
`eval` and `packing`'s message need neither; `overhead` and `search` import Ray.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import itertools
import os
import platform
import re
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from PIL import Image

SUITES = ("data", "train", "eval", "overhead", "packing", "search")
CPU_SUITES = ("data", "train", "eval", "packing")  # what runs without Ray and without a GPU (packing: a note)
DEFAULT_SUITES = (*CPU_SUITES, "overhead", "search")
DEFAULT_OUT = "reports/performance.md"


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


def _fmt(value: Optional[float]) -> str:
    if value is None or value != value:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def best_rate(work: Callable[[], int], repeats: int) -> float:
    """Best of `repeats` timings of `work` (which returns how many items it did), in items per second."""
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        done = work()
        best = max(best, done / (time.perf_counter() - start))
    return best


# ---------------------------------------------------------------- data
def natural_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Sum of upsampled random fields, amplitude ~ scale (a 1/f spectrum, like photographs), plus grain."""
    image = np.zeros((height, width, 3))
    for cells in (2, 4, 8, 16, 32, 64, 128):
        noise = rng.normal(0, 1, (cells * height // width + 1, cells + 1, 3))
        channels = [Image.fromarray(noise[..., c].astype(np.float32)).resize((width, height), Image.BICUBIC)
                    for c in range(3)]
        up = np.stack([np.asarray(c) for c in channels], axis=-1)
        image += up * 40.0 / cells ** 0.15
    image += rng.normal(0, 10, image.shape)
    return Image.fromarray(np.clip(128 + image, 0, 255).astype(np.uint8))


def write_archive(root: Path, n: int, classes: int = 10, distinct: int = 60) -> Path:
    """A CUB-layout folder (images.txt, image_class_labels.txt, images/) of n 500x375 JPEGs (quality 90).

    `distinct` different pictures are generated and reused (the texture costs ~0.1 s each to make), each
    file written anew, so every read decodes a real file."""
    rng = np.random.default_rng(0)
    pictures = [natural_image(rng, 500, 375) for _ in range(min(n, distinct))]
    images, labels = [], []
    for i in range(1, n + 1):
        rel = f"{i % classes + 1:03d}/{i:05d}.jpg"
        (root / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
        pictures[(i - 1) % len(pictures)].save(root / "images" / rel, quality=90)
        images.append(f"{i} {rel}")
        labels.append(f"{i} {i % classes + 1}")
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    return root


def suite_data(args: argparse.Namespace) -> SuiteResult:
    """Images/s per loader worker (one process, one thread) through the training transform."""
    from torchvision import transforms as T

    from tune_upl.config import make_config
    from tune_upl.data import IMAGENET_MEAN, IMAGENET_STD, ImageDataset, Record, load_records, train_transform
    from tune_upl.prepare import prepare_dataset

    result = SuiteResult("data")
    n = args.images or (40 if args.quick else 300)
    repeats = 2 if args.quick else 3
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(args.folder) if args.folder else write_archive(Path(tmp) / "data" / "cub", n)
            data_path = data.parent if data.name == "cub" else data.parent.parent
            cfg = make_config(data_name="cub", data_path=str(data_path), cache_dir=str(Path(tmp) / "cache"),
                              image_size=args.image_size, cache_size=256)
            start = time.perf_counter()
            prepared = prepare_dataset(cfg, workers=1, progress=False)
            prepare_rate = prepared.images / (time.perf_counter() - start)
            cached = load_records(cfg)[:n]
            raw = [Record(r.path, r.class_id) for r in cached]
            kb = float(np.mean([r.path.stat().st_size for r in raw]) / 1024)
            n = len(cached)
            seed = T.Compose([T.RandomResizedCrop(args.image_size), T.RandomHorizontalFlip(), T.ToTensor(),
                              T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

            def seed_read(i: int) -> torch.Tensor:
                with Image.open(raw[i].path) as image:
                    return seed(image.convert("RGB"))

            ours = train_transform(args.image_size)
            readers = {
                "pil": seed_read,
                "tv": ImageDataset(raw, ours).__getitem__,
                "cache": ImageDataset(cached, ours).__getitem__,
            }
            for read in readers.values():
                read(0)  # warm-up
            rates = {name: best_rate(lambda read=read: [read(i) for i in range(n)] and n, repeats)
                     for name, read in readers.items()}
    finally:
        torch.set_num_threads(threads)
    shape = f"{n} JPEGs 500x375 q90 (mean {kb:.0f} KB), train transform at {args.image_size} px"
    result.rows += [
        Row("data", "raw archive, torchvision decoder + uint8 transforms", rates["tv"], "images/s/worker",
            "raw archive, PIL + v1 transforms (the seed's loader)", rates["pil"], note=shape),
        Row("data", "prepared cache + uint8 transforms (what trials use)", rates["cache"], "images/s/worker",
            "raw archive, torchvision decoder + uint8 transforms", rates["tv"], "cache >= 2.5x raw",
            rates["cache"] >= 2.5 * rates["tv"]),
        Row("data", "prepared cache + uint8 transforms (what trials use)", rates["cache"], "images/s/worker",
            "raw archive, PIL + v1 transforms (the seed's loader)", rates["pil"], "cache >= 2.5x raw",
            rates["cache"] >= 2.5 * rates["pil"]),
        Row("data", "prepare (decode, shrink to 256, write), one process", prepare_rate, "images/s"),
    ]
    return result


# ---------------------------------------------------------------- train
def _train_config(args: argparse.Namespace, backbone: str, image_size: int, batch: int, **extra: Any) -> Any:
    from tune_upl.config import make_config

    return make_config(backbone_type=backbone, image_size=image_size, batch_size=batch, warm_up=0,
                       num_epochs=1000, pretrained="none", device=args.device, num_workers=0, **extra)


def make_batches(cfg: Any, steps: int, num_classes: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`steps` fixed training batches of normalised-looking images and labels, on the CPU (as a loader gives)."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size, generator=gen),
             torch.randint(0, num_classes, (cfg.batch_size,), generator=gen)) for _ in range(steps)]


def platform_run(cfg: Any, batches: list, num_classes: int) -> Any:
    """A `Run` of the engine with `batches` as its training loader and a one-batch evaluation."""
    from tune_upl.engine import build_training, resolve_device, seed_everything

    seed_everything(cfg.seed, cfg.deterministic)
    images, labels = batches[0]
    return build_training(cfg, resolve_device(cfg.device), None, num_classes, batches,
                          [(images[:8], labels[:8])], "val")


def platform_rate(run: Any) -> float:
    """Images/s of one `engine.train_epoch` over the run's batches (its own timing of the training part)."""
    from tune_upl.engine import train_epoch

    return float(train_epoch(run)["images_per_s"])


def bare_rate(run: Any, batches: list) -> float:
    """The same model, loss, optimiser and batches in a minimal loop; one host sync at the end."""
    model, device = run.model, run.device
    model.train()
    dtype = run.amp_dtype
    start = time.perf_counter()
    last = None
    for images, labels in batches:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if run.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            similarities = model.head(model.net(images))
        loss = run.loss_fn(similarities, labels)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        last = loss
    float(last.detach())
    return sum(len(labels) for _, labels in batches) / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare_loops(cfg: Any, steps: int, repeats: int, num_classes: int = 50) -> tuple[float, float]:
    """(platform, bare) images/s, same model state and batches, alternated, best of `repeats` each."""
    batches = make_batches(cfg, steps, num_classes)
    run = platform_run(cfg, batches, num_classes)
    initial = copy.deepcopy((run.model.state_dict(), run.optimizer.state_dict()))
    platform_rate(run)  # warm-up (allocators, cudnn.benchmark, optimiser state)
    bare_rate(run, batches)
    platform, bare = 0.0, 0.0
    for _ in range(repeats):
        for which in ("platform", "bare"):
            run.model.load_state_dict(initial[0])
            run.optimizer.load_state_dict(initial[1])
            _sync(run.device)
            if which == "platform":
                platform = max(platform, platform_rate(run))
            else:
                bare = max(bare, bare_rate(run, batches))
    return platform, bare


def optimizer_step_share(cfg: Any, steps: int, num_classes: int = 50) -> dict[str, float]:
    """Seconds per optimiser step of each optimiser and of a whole training step (bare loop, adamp)."""
    from tune_upl.engine import OPTIMIZERS

    batches = make_batches(cfg, 2, num_classes)
    run = platform_run(cfg, batches, num_classes)
    bare_rate(run, batches)  # gradients and optimiser state exist
    seconds: dict[str, float] = {}
    for name in ("adamp", "adamw"):  # the same parameters and gradients; each step moves the weights a little
        optimizer = OPTIMIZERS[name]([{"params": list(run.model.parameters()), "lr": 1e-4}], 0.0)
        optimizer.step()
        _sync(run.device)
        start = time.perf_counter()
        for _ in range(steps):
            optimizer.step()
        _sync(run.device)
        seconds[name] = (time.perf_counter() - start) / steps
    seconds["train_step"] = cfg.batch_size / bare_rate(run, batches * max(1, steps // 2))
    return seconds


def suite_train(args: argparse.Namespace) -> SuiteResult:
    result = SuiteResult("train")
    cuda = args.device.startswith("cuda")
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    if cuda:
        cases = [("resnet50", 224, 64, 6 if args.quick else 30)]
    else:
        # resnet18 and up take seconds per step on two cores: the loop comparison uses tiny, AdamP resnet18
        cases = [("tiny", 64, 16, 4)] if args.quick else [("tiny", 64, 32, 8)]
    repeats = 2 if args.quick else 6
    for backbone, size, batch, steps in cases:
        cfg = _train_config(args, backbone, size, batch)
        platform, bare = compare_loops(cfg, steps, repeats)
        what = f"{backbone} {size} px batch {batch}, {cfg.optimizer}, amp {cfg.amp}, {args.device}"
        result.rows.append(Row("train", f"engine.train_epoch ({what})", platform, "images/s",
                               "bare PyTorch loop", bare, ">= 0.95x bare", platform >= 0.95 * bare))
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        strict = _train_config(args, "resnet50", 224, 64, amp="off", channels_last=False)
        strict_rate, _ = compare_loops(strict, 6 if args.quick else 30, repeats)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        fast = _train_config(args, "resnet50", 224, 64, amp="bf16", channels_last=True)
        fast_rate, _ = compare_loops(fast, 6 if args.quick else 30, repeats)
        gpu = torch.cuda.get_device_name(torch.device(args.device))
        result.rows += [
            Row("train", "resnet50 224 px batch 64, bf16 + channels_last", fast_rate, "images/s",
                "strict fp32 (TF32 off)", strict_rate, ">= 2x strict fp32", fast_rate >= 2 * strict_rate),
            Row("train", "resnet50 224 px batch 64, bf16 + channels_last", fast_rate, "images/s",
                target=">= 2,000 images/s on an H100/H200",
                met=(fast_rate >= 2000) if re.search("H100|H200", gpu) else None, note=gpu),
        ]
    step_cfg = _train_config(args, "resnet18" if not args.quick else "tiny", 112 if not args.quick else 64, 32)
    seconds = optimizer_step_share(step_cfg, 3 if args.quick else 6)
    extra = (seconds["adamp"] - seconds["adamw"]) / seconds["train_step"]
    result.rows.append(Row(
        "train", f"AdamP step minus AdamW step, share of a training step ({step_cfg.backbone_type})", 100 * extra,
        "%", target="<= 5% (else a sync-free AdamP)", met=extra <= 0.05,
        note=f"AdamP {1e3 * seconds['adamp']:.1f} ms, AdamW {1e3 * seconds['adamw']:.1f} ms, "
             f"training step {1e3 * seconds['train_step']:.0f} ms"))
    result.notes.append(
        "AdamP row: on a CPU the host synchronisation of `adamp`'s AdamP (a `.max() < bound` per weight "
        "tensor) costs nothing, so this figure is its extra arithmetic over AdamW (projections, per-tensor "
        "loop). A sync-free AdamP removes only the synchronisation, whose cost exists on a GPU alone: it can "
        "only be shown to help there (`--device cuda`), so none is added yet.")
    if not cuda:
        result.notes.append("the GPU rows (resnet50 batch 64: bf16 + channels_last against strict fp32 with "
                            "TF32 off, and 2,000 images/s on an H100/H200) need `--device cuda`; not measured here.")
    torch.set_num_threads(threads)
    return result


# ---------------------------------------------------------------- eval
def _rss_kb(field_name: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field_name}:\s+(\d+)", text).group(1))


def _release_freed_memory() -> None:
    """glibc: large blocks always mmap-ed and returned on free (no dynamic threshold), freed heap trimmed,
    so RSS follows what is in use and a block freed by an earlier measurement is not silently reused."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak extra memory of a block: CUDA allocator statistics, or on CPU the process's peak RSS
    (VmHWM, reset through /proc/self/clear_refs) above its RSS at the start."""

    def __init__(self, device: torch.device):
        self.device = device
        self.extra_mb: Optional[float] = None

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        _release_freed_memory()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self.start = _rss_kb("VmRSS") * 1024
            except OSError:
                self.start = None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.extra_mb = (torch.cuda.max_memory_allocated(self.device) - self.start) / 2**20
        elif self.start is not None:
            self.extra_mb = (_rss_kb("VmHWM") * 1024 - self.start) / 2**20


def clustered_embeddings(n: int, dim: int, classes: int, device: torch.device, seed: int = 0):
    """Class centres plus noise (recall well below 1), labels balanced over `classes`."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    centres = torch.randn(classes, dim, generator=gen)
    emb = centres[labels] + 3.0 * torch.randn(n, dim, generator=gen)
    return emb.to(device), labels.to(device)


def _naive_metrics(emb: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...]):
    """The full N x N similarity matrix, its diagonal masked, every row sorted (stable: ties by index)."""
    from tune_upl import metrics

    full: dict[str, torch.Tensor] = {}

    def order_of(sims_rows: torch.Tensor, rows: torch.Tensor, depth: int) -> torch.Tensor:
        if "order" not in full:
            normed = torch.nn.functional.normalize(emb.float(), dim=-1)
            sims = normed @ normed.t()
            sims.fill_diagonal_(float("-inf"))
            full["order"] = torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :depth].clone()
            del sims
        return full["order"][rows]

    # sums accumulate over the same row chunks as the others', so equal orders give bit-equal results
    return metrics._retrieval_metrics(emb, labels, ks, 1024, order_of, compute_sims=False)


def _previous_metrics(emb: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...], chunk_size: int = 1024):
    """The implementation before this benchmark: row chunks, each fully sorted (stable)."""
    from tune_upl import metrics

    def order_of(sims: torch.Tensor, rows: torch.Tensor, depth: int) -> torch.Tensor:
        return torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :depth]

    return metrics._retrieval_metrics(emb, labels, ks, chunk_size, order_of)


def suite_eval(args: argparse.Namespace) -> SuiteResult:
    from tune_upl.metrics import retrieval_metrics

    result = SuiteResult("eval")
    device = torch.device(args.device)
    sizes = ((1000, 98), (3000, 100)) if args.quick else ((8131, 98), (20000, 200))
    ks = (1, 2, 4, 8)
    methods = {
        "naive": _naive_metrics,
        "previous": _previous_metrics,
        "current": lambda emb, labels, ks: retrieval_metrics(emb, labels, ks),
    }
    for n, classes in sizes:
        emb, labels = clustered_embeddings(n, 512, classes, device)
        seen: dict[str, Any] = {}
        timing: dict[str, float] = {}
        memory: dict[str, Optional[float]] = {}
        for name, method in methods.items():
            with PeakMemory(device) as peak:
                start = time.perf_counter()
                seen[name] = method(emb, labels, ks)
                _sync(device)
                timing[name] = time.perf_counter() - start
            memory[name] = peak.extra_mb
            gc.collect()
        equal = seen["current"] == seen["naive"] == seen["previous"]
        result.details[n] = {name: r for name, r in seen.items()}
        result.details.setdefault("equal", []).append(equal)
        label = f"N = {n:,}, d = 512, {classes} classes"
        result.rows += [
            Row("eval", f"time, {label}", timing["current"], "s", "naive N x N", timing["naive"],
                "<= 1.2x naive", timing["current"] <= 1.2 * timing["naive"],
                note=f"previous chunked full sort: {timing['previous']:.2f} s"),
            Row("eval", f"peak extra memory, {label}", memory["current"] if memory["current"] is not None else float("nan"),
                "MB", "naive N x N", memory["naive"], "<= 15% of naive at N = 20,000",
                (memory["current"] <= 0.15 * memory["naive"]) if (n == 20000 and None not in (memory["current"], memory["naive"])) else None,
                note=f"previous chunked full sort: {_fmt(memory['previous'])} MB; the N x N float32 matrix alone: "
                     f"{n * n * 4 / 2**20:,.0f} MB"
                     + (f" ({memory['current'] / (n * n * 4 / 2**20):.1%} of it)" if memory["current"] else "")),
            Row("eval", f"results equal to naive (Recall@1,2,4,8, MAP@R, R-precision), {label}", float(equal), "bool",
                target="equal", met=equal,
                note=f"Recall@1 {seen['current'].recall[1]:.4f}, MAP@R {seen['current'].map_at_r:.4f}"),
        ]
        del emb, labels
    return result


# ---------------------------------------------------------------- overhead (Ray)
class _RaySession:
    """Start a local Ray unless one is running (tests share one); stop only the one started here."""

    def __enter__(self) -> Any:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        import ray

        self.started = not ray.is_initialized()
        if self.started:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
        return ray

    def __exit__(self, *exc: Any) -> None:
        import ray

        if self.started:
            ray.shutdown()


def suite_overhead(args: argparse.Namespace) -> SuiteResult:
    """Fixed seconds per trial of a Ray Tune search (FIFO, one trial at a time) over identical trainings."""
    from ray import tune

    from tune_upl.config import make_config
    from tune_upl.engine import build_run, train_epoch
    from tune_upl.prepare import prepare_dataset
    from tune_upl.trainable import train_trial

    result = SuiteResult("overhead")
    threads = torch.get_num_threads()  # build_run sets the trial's thread count (1) in this process
    trials = 3 if args.quick else 6
    epochs = 1 if args.quick else 2
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache_dir or str(Path(tmp) / "cache")
        values = dict(data_name="synthetic", backbone_type="tiny", image_size=64, warm_up=0, num_epochs=epochs,
                      cache_dir=cache, num_workers=0, num_threads=1, device="cpu")
        prepare_dataset(make_config(values), progress=False)
        start = time.perf_counter()
        for _ in range(trials):
            run = build_run(make_config(values))
            while run.epoch < epochs:
                train_epoch(run)
        inline = (time.perf_counter() - start) / trials
        tuned: dict[bool, float] = {}
        errors = 0
        started = time.perf_counter()
        with _RaySession():
            ray_init = time.perf_counter() - started  # 0 where a Ray was running already
            for reuse in (False, True):
                start = time.perf_counter()
                tuner = tune.Tuner(
                    tune.with_resources(train_trial, {"cpu": 1}),
                    param_space=values,
                    tune_config=tune.TuneConfig(num_samples=trials, max_concurrent_trials=1, reuse_actors=reuse),
                    run_config=tune.RunConfig(storage_path=str(Path(tmp) / "runs"), name=f"overhead_{reuse}",
                                              verbose=0),
                )
                grid = tuner.fit()
                tuned[reuse] = (time.perf_counter() - start) / trials
                errors += sum(r.error is not None for r in grid)
        torch.set_num_threads(threads)
    for reuse in (False, True):
        per_trial = tuned[reuse] - inline
        label = "reuse_actors=True (what searches use)" if reuse else "reuse_actors=False (a new process a trial)"
        result.rows += [
            Row("overhead", f"seconds per trial under Ray Tune, {label} ({trials} trials of tiny, {epochs} "
                f"epoch(s), one at a time)", tuned[reuse], "s", "the same training in this process", inline),
            Row("overhead", f"fixed overhead per trial, {label}", per_trial, "s",
                target="<= 6 s (10% of a 60-second trial)", met=per_trial <= 6.0,
                note=f"ray.init once: {ray_init:.1f} s (not counted); trial errors: {errors}"),
        ]
    return result


# ---------------------------------------------------------------- packing (GPU)
def _packing_worker(device: str, steps: int, barrier: Any, queue: Any) -> None:
    args = argparse.Namespace(device=device)
    cfg = _train_config(args, "resnet50", 224, 64)
    batches = make_batches(cfg, steps, 50)
    run = platform_run(cfg, batches, 50)
    run.train_loader = batches[:3]
    platform_rate(run)  # warm-up
    run.train_loader = batches
    barrier.wait()
    queue.put(platform_rate(run))


def suite_packing(args: argparse.Namespace) -> SuiteResult:
    result = SuiteResult("packing")
    if not args.device.startswith("cuda") or not torch.cuda.is_available():
        result.notes.append("packing needs a GPU (CUDA): this machine has none, so it measured nothing; run "
                            "`python -m tune_upl.bench --suite packing --device cuda` on a GPU machine.")
        result.rows.append(Row("packing", "aggregate images/s of 1, 2, 4 processes on one GPU", float("nan"),
                               "images/s", note="needs a GPU: not measured on this CPU-only machine"))
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


# ---------------------------------------------------------------- search (a tabular TPE + ASHA replay)
# The grid: one study's categorical space, as a real search would hold the loss and the backbone fixed.
SEARCH_GRID: dict[str, list[Any]] = {"lr": [1e-4, 3e-4, 1e-3, 3e-3], "scale": [8.0, 32.0, 128.0],
                                     "pooling": ["max", "avg"]}
SEARCH_EPOCHS = 6
SEARCH_IMAGES_PER_CLASS = 30
SEARCH_CSV = "reports/search_grid.csv"
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
    """Train every grid point for SEARCH_EPOCHS epochs with the platform's own grid search (`run_study`:
    the real trainable, two trials at a time) and write each epoch's validation metrics to `out` (CSV)."""
    import pandas as pd

    from tune_upl.search import plan_studies, prepare_data, run_study

    with tempfile.TemporaryDirectory() as tmp, _RaySession():
        data_path = Path(tmp) / "data"
        write_search_dataset(data_path)
        fixed = search_fixed(str(data_path), str(Path(tmp) / "cache"))
        spec = grid_spec(fixed, {"type": "grid"}, {"type": "fifo"}, 1, 2, "grid")
        studies = plan_studies(spec, {})
        prepare_data(studies)
        frames = []
        for result in run_study(spec, studies[0], Path(tmp) / "runs", verbose=False):
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
    """One real Tune + Optuna TPE + ASHA search against the table; returns each trial's reported curve in
    the order the trials ran (one at a time, so the order is the searcher's)."""
    from ray import tune

    from tune_upl.search import make_scheduler, make_searcher, plan_studies

    # the platform's TPE settings (upl_optuna.yaml) scaled to the budget; ASHA rungs at epochs 1, 2, 4
    spec = grid_spec(fixed, {"type": "tpe", "seed": seed, "n_startup_trials": 6},
                     {"type": "asha", "grace_period": 1, "reduction_factor": 2}, samples, 1, f"replay_{seed}")
    (study,) = plan_studies(spec, {})
    tuner = tune.Tuner(
        tune.with_parameters(replay_trial, curves=curves),
        tune_config=tune.TuneConfig(search_alg=make_searcher(spec, study), scheduler=make_scheduler(spec, study),
                                    num_samples=samples, max_concurrent_trials=1, reuse_actors=True),
        run_config=tune.RunConfig(storage_path=str(storage), name=spec.name, verbose=0),
    )
    grid = tuner.fit()
    errors = [r.error for r in grid if r.error is not None]
    if errors:
        raise RuntimeError(f"a replay trial failed: {errors[0]}")
    results = sorted(grid, key=lambda r: r.metrics["started"])
    return [list(r.metrics_dataframe[SEARCH_METRIC]) for r in results]


def suite_search(args: argparse.Namespace) -> SuiteResult:
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
        raise FileNotFoundError(f"{path}: no recorded grid; run `python -m tune_upl.bench --suite search --record`")
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
    with tempfile.TemporaryDirectory() as tmp, _RaySession():
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


SUITE_FUNCTIONS: dict[str, Callable[[argparse.Namespace], SuiteResult]] = {
    "data": suite_data, "train": suite_train, "eval": suite_eval, "overhead": suite_overhead, "packing": suite_packing,
    "search": suite_search,
}


# ---------------------------------------------------------------- report
def environment(args: argparse.Namespace) -> dict[str, str]:
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
        "command": "python -m tune_upl.bench " + " ".join(shlex.quote(a) for a in args.argv),
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
            lines.append(f"| {r.suite} | {r.measure} | {_fmt(r.value)} {r.unit} | {r.baseline or '-'} | "
                         f"{_fmt(r.baseline_value)} | {ratio} | {r.target or '-'} | {met} | {r.note} |")
    return lines


def write_report(path: Path, results: list[SuiteResult], env: dict[str, str], preamble: str = "") -> None:
    lines = ["# Performance", "", "Written by `python -m tune_upl.bench` (module docstring: what each suite measures).",
             "", *[f"- {key}: {value}" for key, value in env.items()], ""]
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
    parser = argparse.ArgumentParser(prog="python -m tune_upl.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default=",".join(DEFAULT_SUITES),
                        help=f"comma-separated, of {', '.join(SUITES)}, or all (default: {','.join(DEFAULT_SUITES)})")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes, for tests")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"the markdown report (default {DEFAULT_OUT})")
    parser.add_argument("--images", type=int, default=0, help="data: JPEGs (default 300, quick 40)")
    parser.add_argument("--image_size", "--image-size", type=int, default=224, help="data: crop size")
    parser.add_argument("--folder", help="data: a CUB-layout dataset to read (default: write one)")
    parser.add_argument("--threads", type=int, default=0, help="train: torch threads (default: all)")
    parser.add_argument("--cache_dir", "--cache-dir", help="overhead: where the synthetic set is (default: temporary)")
    parser.add_argument("--record", action="store_true",
                        help="search: train the grid first (about 10 minutes here) and write --grid")
    parser.add_argument("--grid", default=SEARCH_CSV, help=f"search: the recorded grid's CSV (default {SEARCH_CSV})")
    parser.add_argument("--preamble", default="", help="text put above the table (e.g. notes on the machine)")
    args = parser.parse_args(argv)
    names = SUITES if args.suite == "all" else tuple(s.strip() for s in args.suite.split(",") if s.strip())
    unknown = [s for s in names if s not in SUITES]
    if unknown:
        parser.error(f"unknown suite {unknown[0]!r}; allowed: {', '.join(SUITES)}, all")
    args.suites = names
    args.argv = argv
    return args


def run(argv: Optional[list[str]] = None) -> list[SuiteResult]:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    env = environment(args)  # before the suites, which may change torch's thread count
    results = []
    for name in args.suites:
        start = time.perf_counter()
        suite = SUITE_FUNCTIONS[name](args)
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


if __name__ == "__main__":
    sys.exit(main())
