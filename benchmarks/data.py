"""data suite: training images/s per loader worker (one process, one thread) on 500x375 JPEGs, and the
trial's own loader at the worker count a trial of `resources.cpu` N gets (`--trial_cpus`).

Baselines in the same run: the raw archive read as the seed read it (PIL + its v1 transforms) and through
torchvision's decoder + our uint8 transforms, against the prepared cache that trials read. The JPEGs are
written here (textures with a photograph's spectrum, so they compress and decode like photographs), or
`--folder` names a CUB-layout dataset. Imports the platform's data code (and pydantic) when it runs.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from PIL import Image

from benchmarks.harness import Row, SuiteResult

if TYPE_CHECKING:
    from tune_upl.config import TrialConfig


def best_rate(work: Callable[[], int], repeats: int) -> float:
    """Best of `repeats` timings of `work` (which returns how many items it did), in items per second."""
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        done = work()
        best = max(best, done / (time.perf_counter() - start))
    return best


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


def loader_rate(cfg: "TrialConfig", records: list, repeats: int) -> float:
    """Images/s of the trial's own training loader (`make_loader`, its worker count, uint8 batches) over the
    records, best of `repeats` epochs after one that starts the persistent workers."""
    from tune_upl.data import ImageDataset, make_loader, run_transforms

    loader = make_loader(ImageDataset(records, run_transforms(cfg)[0]), cfg, train=True)
    rate = 0.0
    for epoch in range(repeats + 1):
        start, seen = time.perf_counter(), 0
        for images, _ in loader:
            seen += len(images)
        rate = max(rate, seen / (time.perf_counter() - start)) if epoch else rate
    return rate


def measure_loaders(args: argparse.Namespace, cfg: "TrialConfig", records: list, repeats: int) -> list[Row]:
    """One row per `--trial_cpus` N: the loader at the worker count a trial of `resources.cpu` N gets
    (num_threads N, num_workers auto), against the same loader without workers."""
    batch = 16 if args.quick else 64
    base = cfg.replace(batch_size=batch, num_workers=0, device=args.device)
    serial = loader_rate(base, records, repeats)
    rows = []
    for cpus in sorted({int(c) for c in str(args.trial_cpus).split(",") if c.strip()}):
        trial = base.replace(num_threads=cpus, num_workers="auto")
        mb = batch * 3 * cfg.image_size ** 2 / 1e6
        workers = trial.resolved_num_workers
        rows.append(Row("data", f"make_loader, {workers} worker{'s' * (workers != 1)} (a trial of resources.cpu {cpus})",
                        loader_rate(trial, records, repeats), "images/s", "make_loader, 0 workers (in the training "
                        "process)", serial, note=f"batch {batch} uint8, {mb:.1f} MB a batch, {len(records)} images"))
    return rows


def measure(args: argparse.Namespace) -> SuiteResult:
    """Images/s per loader worker (one process, one thread) through the training transform."""
    from torchvision import transforms as T

    from tune_upl.config import make_config
    from tune_upl.data import ImageDataset, Record, load_records, train_transform
    from tune_upl.facts import IMAGENET_MEAN, IMAGENET_STD
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
            loaders = measure_loaders(args, cfg, cached, repeats)
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
    result.rows += loaders
    result.notes.append("data: our transforms stop at uint8 (the model normalises its input on its own device), "
                        "the seed's loader ends in normalised float32: four times the bytes a batch.")
    return result
