"""Loading prepared datasets: records from the manifest, class-disjoint splits, transforms and loaders.

Trials read only what `tune_upl.prepare` wrote (a manifest and a uint8 pixel cache), never the archive:
a missing entry fails at once, naming the file and the prepare command. `SplitManager` owns the class
split and guards the test classes. Dataset formats and their registry live in `tune_upl.archives`.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from tune_upl.archives import check_class_count, split_halves
from tune_upl.config import TrialConfig
from tune_upl.prepare import PIXELS_FILE, decode_image_file, read_manifest
from tune_upl.errors import ConfigError, DatasetError, SplitAccessError
from tune_upl.facts import BACKBONES, CNN_TEST_RESIZE

__all__ = [
    "Record", "load_records", "SplitManager", "train_transform", "eval_transform", "run_transforms", "ImageDataset",
    "make_loader",
]

SPLIT_SEED = 0  # the validation classes depend on this constant only, never on the training seed

SplitName = Literal["train", "val", "test"]



@dataclass(frozen=True)
class Record:
    """One image: its source file (for people; trials never open it) and, once prepared, its cached pixels."""

    path: Path
    class_id: int
    pixels: Optional[Path] = None  # the entry's pixels.u8; None: decode `path` (raw archive, benchmarks)
    offset: int = 0
    height: int = 0
    width: int = 0
    split: str = ""  # the manifest's split: train, test, or In-Shop's query and gallery ("": by class halves)


def load_records(cfg: TrialConfig) -> list[Record]:
    """The prepared dataset's records in manifest order (the archive's image order)."""
    entry, source, rows = read_manifest(cfg)
    test_size = round(cfg.image_size * 256 / 224)
    if test_size > cfg.cache_size:
        warnings.warn(f"cache_size {cfg.cache_size} is below the test resize {test_size} of image_size "
                      f"{cfg.image_size}: cached images are enlarged; prepare with --cache_size {test_size}")
    pixels = entry / PIXELS_FILE
    return [Record(source / r.image, r.class_id, pixels, r.offset, r.height, r.width, r.split) for r in rows]


# ---------------------------------------------------------------- class splits
class SplitManager:
    """Class-disjoint splits: the prepared split of each image (the first half of the classes train, the
    second half test, as the seed; SOP's and In-Shop's official partitions), or the class halves for records
    without one.

    Under protocol `val` a deterministic `round(val_fraction * n_train)` (at least 2) of the training
    classes validate; under `seed` all training classes train and there is no validation split.
    The test split is handed out only with `final=True` (a final evaluation) or under protocol `seed`.
    """

    def __init__(self, records: Sequence[Record], protocol: str, val_fraction: float):
        self.records = list(records)
        self.protocol = protocol
        classes = sorted({r.class_id for r in self.records})
        check_class_count(classes, "the prepared records")
        if all(r.split for r in self.records):
            train_all = sorted({r.class_id for r in self.records if r.split == "train"})
            self.test_classes = sorted({r.class_id for r in self.records if r.split != "train"})
        else:
            train_all, self.test_classes = split_halves(classes)
        if protocol == "val":
            n_val = max(2, round(val_fraction * len(train_all)))
            if n_val >= len(train_all):
                raise ConfigError(
                    f"TrialConfig.val_fraction = {val_fraction}: leaves no training class "
                    f"({len(train_all)} available); allowed: a fraction that keeps at least one"
                )
            shuffled = np.random.default_rng(SPLIT_SEED).permutation(train_all)
            self.val_classes = sorted(int(c) for c in shuffled[:n_val])
        else:
            self.val_classes = []
        self.train_classes = [c for c in train_all if c not in set(self.val_classes)]
        self._check_disjoint()

    def _check_disjoint(self) -> None:
        train, val, test = set(self.train_classes), set(self.val_classes), set(self.test_classes)
        assert not (train & val), f"train and validation classes overlap: {sorted(train & val)}"
        assert not (train & test), f"train and test classes overlap: {sorted(train & test)}"
        assert not (val & test), f"validation and test classes overlap: {sorted(val & test)}"

    def classes(self, split: SplitName, final: bool = False) -> list[int]:
        if split == "test":
            if not final and self.protocol != "seed":
                raise SplitAccessError(
                    "the test classes are for the final evaluation only (protocol val); "
                    "select on the validation split"
                )
            return list(self.test_classes)
        if split == "trainval":  # the final stage trains on every training class
            return sorted(self.train_classes + self.val_classes)
        if split == "val":
            if not self.val_classes:
                raise ConfigError("protocol seed has no validation classes; evaluate on the test split")
            return list(self.val_classes)
        return list(self.train_classes)

    def get(self, split: SplitName, final: bool = False) -> list[Record]:
        wanted = set(self.classes(split, final))
        self._check_disjoint()
        return [r for r in self.records if r.class_id in wanted]


# ---------------------------------------------------------------- images and loaders
def train_transform(image_size: int, interpolation: str = "bilinear", crop_scale: float = 0.08) -> v2.Compose:
    """RandomResizedCrop (crops of `crop_scale` to all of the image's area) + horizontal flip (the seed's), on
    uint8 tensors: torchvision's fast path. The output stays uint8 (a quarter of float32's bytes through the
    workers' shared memory); the model normalises it on its own device (`models.InputNormalize`)."""
    return v2.Compose([
        v2.ToImage(),
        v2.RandomResizedCrop(image_size, scale=(crop_scale, 1.0), interpolation=v2.InterpolationMode(interpolation),
                             antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToPureTensor(),
    ])


def eval_transform(image_size: int, interpolation: str = "bilinear", test_resize: float = CNN_TEST_RESIZE
                   ) -> v2.Compose:
    """Resize + CenterCrop: Resize(256) + CenterCrop(224) at 224 px (the seed's; `test_resize` is the resize
    over the crop), scaled in proportion for other sizes; uint8 out, as above."""
    return v2.Compose([
        v2.ToImage(),
        v2.Resize(round(image_size * test_resize), interpolation=v2.InterpolationMode(interpolation),
                  antialias=True),
        v2.CenterCrop(image_size),
        v2.ToPureTensor(),
    ])


def run_transforms(cfg: TrialConfig) -> tuple[v2.Compose, v2.Compose]:
    """A run's training and test transforms, with its backbone's resampling (bilinear for the CNNs, bicubic
    for timm's ViTs) and test crop (the seed's 224 of 256; timm's crop_pct for a ViT)."""
    facts = BACKBONES[cfg.backbone_type]
    return (train_transform(cfg.image_size, facts.interpolation, cfg.crop_scale),
            eval_transform(cfg.image_size, facts.interpolation, facts.test_resize))


class ImageDataset(Dataset):
    """Images with labels remapped to 0..C-1 in class-id order, read from the pixel cache.

    The cache is memory-mapped lazily in each process (loader workers included) and never pickled."""

    def __init__(self, records: Sequence[Record], transform: Callable):
        self.records = list(records)
        self.transform = transform
        self.class_ids = sorted({r.class_id for r in self.records})
        index = {c: i for i, c in enumerate(self.class_ids)}
        self.labels = torch.tensor([index[r.class_id] for r in self.records], dtype=torch.long)
        self._maps: dict[Path, np.memmap] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": {}}

    def __len__(self) -> int:
        return len(self.records)

    def read(self, i: int) -> torch.Tensor:
        """Image `i` as a uint8 RGB tensor (C, H, W)."""
        record = self.records[i]
        if record.pixels is None:
            try:
                return decode_image_file(record.path)
            except (OSError, ValueError) as error:
                raise DatasetError(f"cannot read image {record.path}: {error}") from None
        flat = self._maps.get(record.pixels)
        if flat is None:
            flat = self._maps[record.pixels] = np.memmap(record.pixels, dtype=np.uint8, mode="r")
        size = record.height * record.width * 3
        hwc = np.array(flat[record.offset:record.offset + size]).reshape(record.height, record.width, 3)
        return torch.from_numpy(hwc).permute(2, 0, 1)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.read(i)), int(self.labels[i])

    @property
    def num_classes(self) -> int:
        return len(self.class_ids)


def on_gpu(cfg: TrialConfig) -> bool:
    return cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())


def serial_loading_warning(cfg: TrialConfig, gpu: bool) -> Optional[str]:
    """Why a GPU trial may train slowly: with no loader worker, decoding runs in series with each step. One
    message for the `train` command (`gpu`: torch sees one) and the search driver (`gpu`: the spec asks for one)."""
    if not gpu or cfg.device == "cpu" or cfg.resolved_num_workers > 0:
        return None
    return (f"0 loader workers (resources.cpu {cfg.resolved_num_threads}, num_workers {cfg.num_workers}) for a GPU "
            "trial: images are read and transformed in series with each training step; give resources.cpu >= 2 "
            "(num_workers auto takes all but one), or set num_workers")


def make_loader(dataset: ImageDataset, cfg: TrialConfig, train: bool) -> DataLoader:
    """Workers from the trial's CPUs (`num_workers: auto`), kept across epochs; pinned memory on a GPU.
    The training loader of a GPU trial without workers warns once (`serial_loading_warning`)."""
    workers = cfg.resolved_num_workers
    message = serial_loading_warning(cfg, on_gpu(cfg)) if train else None
    if message:
        warnings.warn(message, stacklevel=2)
    generator = torch.Generator().manual_seed(cfg.seed)
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=train,
        drop_last=train and len(dataset) > cfg.batch_size,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=on_gpu(cfg),
        generator=generator,
    )
