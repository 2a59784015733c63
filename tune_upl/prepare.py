"""Prepare a dataset once: a manifest and a pre-resized uint8 pixel cache that trials read instead of the archive.

Why: decoding a 500x375 JPEG costs more than the whole training transform, and every trial of a search
decodes every image once per epoch. Preparing decodes each image once, crops it to its bounding box for
the `cropped` variant, shrinks its shorter side to `cache_size` (never enlarging) and appends its raw
RGB bytes to `pixels.u8`; `manifest.tsv` lists image, class, split, box and where its pixels are.

An entry lives in `<cache_dir>/prepared/<data_name>-<crop>-<cache_size>-<digest>/`, the digest taken
over the dataset's resolved source path (and `dataset_seed` for synthetic), so two datasets never share
one. Its `prepared.json`, written last, holds the full key, which adds the annotation files' sizes and
modification times: a changed source is prepared again. Trials need only the entry (not the source), so
a cache_dir shared by every node is enough for a cluster.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import multiprocessing
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Optional, Union

import numpy as np
from tqdm import tqdm

from tune_upl.archives import DATASETS, Box, SourceImage, check_class_count, split_halves
from tune_upl.atomic import build_once
from tune_upl.config import TrialConfig, available_cpus
from tune_upl.errors import DatasetError

if TYPE_CHECKING:
    import torch

CACHE_VERSION = 1  # bump when the cache's files or pixels change
MANIFEST_FILE = "manifest.tsv"
PIXELS_FILE = "pixels.u8"
MARKER_FILE = "prepared.json"
MANIFEST_COLUMNS = ("image", "class", "split", "x", "y", "width", "height", "cache_height", "cache_width", "offset")
# the TrialConfig fields that pick a prepared entry (the options of the prepare command)
DATA_FIELDS = ("data_name", "data_path", "crop", "cache_size", "cache_dir", "dataset_seed")
IMAGES_PER_WORKER = 1000  # below this many images per process, starting a worker costs more than it saves
# Up to this share of unreadable images is skipped and listed (a large archive may hold a damaged file); more
# means the archive is not fully extracted or not this dataset, and preparing stops, listing them all.
MAX_DAMAGED_SHARE = 0.05

Job = tuple[str, Optional[Box], int]  # (image file, box to crop or None, cache_size)


@dataclass(frozen=True)
class ManifestRow:
    """One prepared image: its source name, labels, box and its pixels' place in `pixels.u8` (HWC, RGB)."""

    image: str
    class_id: int
    split: str
    box: Optional[Box]
    height: int
    width: int
    offset: int


@dataclass(frozen=True)
class Prepared:
    """What `prepare_dataset` reports: the entry and its counts."""

    entry: Path
    source: Path
    images: int
    train_classes: int
    test_classes: int
    built: bool  # False: it was prepared already
    seconds: float
    skipped: tuple[str, ...] = ()  # damaged images left out (each with why), as listed in prepared.json

    def summary(self, cfg: TrialConfig) -> str:
        what = "prepared" if self.built else "already prepared"
        took = f" in {self.seconds:.1f} s" if self.built else ""
        skipped = (f"; {len(self.skipped)} damaged image(s) left out, listed in {self.entry / MARKER_FILE}"
                   if self.skipped else "")
        return (f"{what} {cfg.data_name} ({cfg.crop}, shorter side <= {cfg.cache_size} px): {self.images} images, "
                f"{self.train_classes} train + {self.test_classes} test classes{took}; cache {self.entry}{skipped}")


# ---------------------------------------------------------------- where an entry lives
def entry_dir(cfg: TrialConfig) -> Path:
    """The entry of this dataset and variant; computed from the config alone, without the source."""
    source = DATASETS[cfg.data_name].identity(cfg)
    seed = cfg.dataset_seed if cfg.data_name == "synthetic" else None
    digest = hashlib.sha256(json.dumps([cfg.data_name, str(source), seed]).encode()).hexdigest()[:12]
    name = f"{cfg.data_name}-{cfg.crop}-{cfg.cache_size}-{digest}"
    return Path(cfg.cache_dir).expanduser().resolve() / "prepared" / name


def prepare_command(cfg: TrialConfig) -> str:
    """The command that prepares what `cfg` reads (shown when it is missing)."""
    parts = ["python", "run_search.py", "prepare", "--data_name", cfg.data_name]
    if cfg.data_name == "synthetic":
        parts += ["--dataset_seed", str(cfg.dataset_seed)]
    else:
        parts += ["--data_path", str(cfg.data_path)]
    parts += ["--crop", cfg.crop, "--cache_size", str(cfg.cache_size), "--cache_dir", str(cfg.cache_dir)]
    return shlex.join(parts)  # quoted for the shell: paths may hold spaces


def read_marker(entry: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads((entry / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- one image into the cache
def load_for_cache(job: Job) -> Union[np.ndarray, str]:
    """Decode, crop and shrink one image to HWC uint8 RGB; a failure comes back as its message.

    JPEGs over twice `size` are decoded by PIL at 1/2-1/8 scale (draft mode: 4-64x fewer pixels); the
    others by torchvision's decoder. Either way torch resizes (antialiased bilinear, like PIL's), which
    is faster than PIL's resize here."""
    import torch
    from PIL import Image
    from torchvision.transforms.v2 import functional as F

    path, box, size = job
    try:
        with Image.open(path) as image:
            width, height = image.size
            x0, y0, x1, y1 = _clip(box, width, height)
            scale = min(1.0, size / min(x1 - x0, y1 - y0))
            if image.format == "JPEG" and scale <= 0.5:
                image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
                factor = image.size[0] / width
                x0, y0, x1, y1 = x0 * factor, y0 * factor, x1 * factor, y1 * factor
                pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
            else:
                pixels = None
        if pixels is None:
            pixels = decode_image_file(Path(path))
        left, top = int(x0), int(y0)
        region = pixels[:, top:max(top + 1, math.ceil(y1)), left:max(left + 1, math.ceil(x1))]
        shorter = min(region.shape[1:])
        if shorter > size:
            region = F.resize(region, [size], antialias=True)
        return region.permute(1, 2, 0).contiguous().numpy()
    except Exception as error:  # every failure is listed together at the end, not raised one by one
        return f"{path}: {error}"


def decode_image_file(path: Path) -> "torch.Tensor":
    """An image file as a uint8 RGB tensor (C, H, W): torchvision's decoder, PIL for what it cannot read."""
    import torch
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_image, read_file

    try:
        pixels = decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
        if pixels.dtype == torch.uint8 and pixels.ndim == 3:  # not 16-bit PNG, not an animated GIF
            return pixels
    except (RuntimeError, ValueError):
        pass  # a format or variant torchvision does not decode; PIL names the problem if it cannot either
    with Image.open(path) as image:
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


def _clip(box: Optional[Box], width: int, height: int) -> tuple[float, float, float, float]:
    """A box (x, y, w, h) as corners clipped to the image; the whole image when there is no box."""
    if box is None:
        return 0.0, 0.0, float(width), float(height)
    x, y, w, h = box
    x0, y0 = max(0.0, x), max(0.0, y)
    x1, y1 = min(float(width), x + w), min(float(height), y + h)
    if x1 - x0 < 1 or y1 - y0 < 1:
        raise ValueError(f"bounding box {box} (x, y, width, height) lies outside the {width}x{height} image")
    return x0, y0, x1, y1


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)  # one process per core


def _map(jobs: list[Job], workers: int) -> Iterator[Union[np.ndarray, str]]:
    """Results in job order, from this process or a pool ('spawn': safe where Ray's threads already run)."""
    if workers <= 1:
        yield from map(load_for_cache, jobs)
        return
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker) as pool:
        yield from pool.imap(load_for_cache, jobs, chunksize=16)


# ---------------------------------------------------------------- building an entry
def image_splits(images: list[SourceImage], official: bool) -> list[str]:
    """Each image's split: the archive's own partition where the dataset has one (`facts.DatasetFacts.
    official_split`: SOP, In-Shop), else the seed's class halves."""
    if official:
        return [im.split for im in images]
    train = set(split_halves([im.class_id for im in images])[0])
    return ["train" if im.class_id in train else "test" for im in images]


def split_counts(written: list[tuple[SourceImage, str]]) -> dict[str, Any]:
    """Training and test classes (a test class has test, query or gallery images), and images per split."""
    splits = [s for _, s in written]
    train = {im.class_id for im, s in written if s == "train"}
    test = {im.class_id for im, s in written if s != "train"}
    if train & test:
        raise DatasetError(f"{len(train & test)} classes have both training and test images (e.g. class "
                           f"{min(train & test)}); allowed: class-disjoint partitions")
    per_split = {s: splits.count(s) for s in sorted(set(splits))}
    return {"train_classes": len(train), "test_classes": len(test), "split_images": per_split}


def write_cache(folder: Path, source: Path, images: list[SourceImage], splits: list[str], crop: str, size: int,
                workers: int, progress: bool, label: str) -> tuple[int, list[tuple[SourceImage, str]], list[str]]:
    """Fill `folder` with pixels and manifest (each image's split from `splits`); returns (bytes, each image
    written with its split, the damaged images left out, each with why). More than MAX_DAMAGED_SHARE
    unreadable: one DatasetError listing every one."""
    written: list[tuple[SourceImage, str]] = []
    jobs = [(str(source / im.name), im.box if crop == "cropped" else None, size) for im in images]
    failures: list[str] = []
    offset = 0
    with open(folder / PIXELS_FILE, "wb") as pixels, open(folder / MANIFEST_FILE, "w", newline="") as manifest, \
            tqdm(total=len(jobs), desc=f"prepare {label}", unit="img", disable=not progress,
                 file=sys.stderr, mininterval=0.5) as bar:
        rows = csv.writer(manifest, delimiter="\t", lineterminator="\n")
        rows.writerow(MANIFEST_COLUMNS)
        for image, split, result in zip(images, splits, _map(jobs, workers)):
            bar.update()
            if isinstance(result, str):
                failures.append(result)
                continue
            pixels.write(result.tobytes())
            box = [f"{v:g}" for v in image.box] if image.box else ["", "", "", ""]
            rows.writerow([image.name, image.class_id, split, *box, result.shape[0], result.shape[1], offset])
            offset += result.nbytes
            written.append((image, split))
    if len(failures) > MAX_DAMAGED_SHARE * len(images):
        raise DatasetError(
            f"{len(failures)} of {len(images)} images cannot be read (more than {MAX_DAMAGED_SHARE:.0%}: is the "
            "archive fully extracted?); fix or remove them, then prepare again:\n  " + "\n  ".join(failures)
        )
    for failure in failures:
        print(f"warning: left out a damaged image: {failure}", file=sys.stderr, flush=True)
    return offset, written, failures


def prepare_dataset(cfg: TrialConfig, workers: Optional[int] = None, progress: bool = True) -> Prepared:
    """Prepare what `cfg` reads unless it is prepared and current; idempotent, locked, interrupt-safe."""
    start = time.perf_counter()
    fmt = DATASETS[cfg.data_name]
    entry = entry_dir(cfg)
    try:
        source = fmt.locate(cfg)
    except DatasetError:
        if read_marker(entry) is None:
            raise
        return _prepared(entry, False, start)  # the archive is gone or not on this node: trials need only the entry
    for tree in {source, fmt.identity(cfg)}:
        if entry.is_relative_to(tree):
            raise DatasetError(
                f"cache_dir {cfg.cache_dir} lies inside the image tree {tree}; allowed: a folder outside it "
                "(--cache_dir or $TUNE_UPL_CACHE)"
            )
    if cfg.crop == "cropped" and not fmt.has_boxes:
        raise DatasetError(f"data_name {cfg.data_name} has no bounding boxes; allowed crop: uncropped")
    key = {
        "version": CACHE_VERSION, "data_name": cfg.data_name, "source": str(source),
        "dataset_seed": cfg.dataset_seed if cfg.data_name == "synthetic" else None,
        "annotations": fmt.fingerprint(source), "crop": cfg.crop, "cache_size": cfg.cache_size,
    }

    def is_current(folder: Path) -> bool:
        marker = read_marker(folder)
        return marker is not None and marker.get("key") == key

    def build(folder: Path) -> str:
        images = fmt.read(source)
        check_class_count([im.class_id for im in images], str(source))
        if cfg.crop == "cropped" and any(im.box is None for im in images):
            raise DatasetError(f"{source}: crop cropped needs a bounding box for every image "
                               "(bounding_boxes.txt); allowed: crop uncropped")
        splits = image_splits(images, fmt.facts.official_split)
        split_counts(list(zip(images, splits)))  # a partition mixing classes fails before decoding
        n_workers = workers if workers is not None else min(available_cpus(), len(images) // IMAGES_PER_WORKER)
        nbytes, written, skipped = write_cache(folder, source, images, splits, cfg.crop, cfg.cache_size, n_workers,
                                               progress, cfg.data_name)
        check_class_count([im.class_id for im, _ in written], str(source))
        return json.dumps({"key": key, "images": len(written), **split_counts(written),
                           "skipped": skipped, "pixel_bytes": nbytes,
                           "seconds": round(time.perf_counter() - start, 2)}, indent=1) + "\n"

    root, built = build_once(entry.parent, entry.name, build, MARKER_FILE, is_current)
    return _prepared(root, built, start)


def _prepared(entry: Path, built: bool, start: float) -> Prepared:
    marker = read_marker(entry)
    assert marker is not None, f"{entry} has no {MARKER_FILE}"
    classes = marker["train_classes"] + marker["test_classes"]  # an entry prepared before the class check
    check_class_count(range(classes), marker["key"]["source"])
    return Prepared(entry, Path(marker["key"]["source"]), marker["images"], marker["train_classes"],
                    marker["test_classes"], built, time.perf_counter() - start, tuple(marker.get("skipped", ())))


# ---------------------------------------------------------------- reading an entry
def read_manifest(cfg: TrialConfig) -> tuple[Path, Path, list[ManifestRow]]:
    """(entry, source root, rows) of a prepared dataset; reads only the cache, fails at once when missing."""
    entry = entry_dir(cfg)
    marker = read_marker(entry)
    if marker is None or not (entry / MANIFEST_FILE).is_file() or not (entry / PIXELS_FILE).is_file():
        missing = entry / (MARKER_FILE if marker is None else MANIFEST_FILE)
        raise DatasetError(f"{cfg.data_name} is not prepared: missing {missing}; run: {prepare_command(cfg)}")
    with open(entry / MANIFEST_FILE, newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t"))
    if not rows or tuple(rows[0]) != MANIFEST_COLUMNS:
        raise DatasetError(f"{entry / MANIFEST_FILE}: not a manifest of this version; run: {prepare_command(cfg)}")
    return entry, Path(marker["key"]["source"]), [_row(r) for r in rows[1:]]


def _row(cells: Iterable[str]) -> ManifestRow:
    image, class_id, split, x, y, w, h, height, width, offset = cells
    box = (float(x), float(y), float(w), float(h)) if x else None
    return ManifestRow(image, int(class_id), split, box, int(height), int(width), int(offset))
