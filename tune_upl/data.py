"""Datasets on disk, class-disjoint splits, image transforms and loaders.

Every dataset reaches training through one reader of the CUB-200-2011 layout (`images.txt`,
`image_class_labels.txt`, `images/`): the embedded `synthetic` set is written in that layout so that it
takes the same path as the real CUB. `SplitManager` owns the class split and guards the test classes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from tune_upl.config import ConfigError, TrialConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPLIT_SEED = 0  # the validation classes depend on this constant only, never on the training seed

SplitName = Literal["train", "val", "test"]


class DatasetError(RuntimeError):
    """A dataset that is missing, half-prepared or unreadable: the message says which file and what to do."""


class SplitAccessError(RuntimeError):
    """The test classes were asked for outside a final evaluation (hyper-parameters must not see them)."""


@dataclass(frozen=True)
class Record:
    path: Path
    class_id: int


# ---------------------------------------------------------------- datasets on disk
def locate_synthetic(cfg: TrialConfig) -> Path:
    from tune_upl.synthetic import ensure_synthetic

    return ensure_synthetic(Path(cfg.cache_dir).expanduser(), cfg.dataset_seed)


def locate_cub(cfg: TrialConfig) -> Path:
    base = Path(cfg.data_path).expanduser() / "cub"
    for root in (base, base / "CUB_200_2011"):
        if (root / "images.txt").is_file():
            return root
    raise DatasetError(
        f"CUB-200-2011 not found: expected {base}/images.txt (or {base}/CUB_200_2011/images.txt); "
        f"extract CUB_200_2011.tgz into {base} or set --data_path"
    )


def locate_car(cfg: TrialConfig) -> Path:
    raise DatasetError(
        f"CARS196 ({Path(cfg.data_path) / 'car'}) cannot be read yet: its preparation from cars_annos.mat "
        "arrives with the datasets issue; use data_name synthetic or cub"
    )


DATASETS: dict[str, Callable[[TrialConfig], Path]] = {
    "car": locate_car,
    "cub": locate_cub,
    "synthetic": locate_synthetic,
}


def _read_table(path: Path) -> list[list[str]]:
    if not path.is_file():
        raise DatasetError(f"missing {path}: the dataset is not prepared (or only half-extracted)")
    return [line.split() for line in path.read_text().splitlines() if line.strip()]


def read_cub_layout(root: Path) -> list[Record]:
    """Image records in image-id order from a CUB-200-2011-style folder."""
    images = {int(i): name for i, name in _read_table(root / "images.txt")}
    labels = {int(i): int(c) for i, c in _read_table(root / "image_class_labels.txt")}
    if images.keys() != labels.keys():
        raise DatasetError(f"{root}: images.txt and image_class_labels.txt list different image ids")
    return [Record(root / "images" / images[i], labels[i]) for i in sorted(images)]


def load_records(cfg: TrialConfig) -> list[Record]:
    return read_cub_layout(DATASETS[cfg.data_name](cfg))


# ---------------------------------------------------------------- class splits
class SplitManager:
    """Class-disjoint splits: first half of the classes train, second half test (as the seed).

    Under protocol `val` a deterministic `round(val_fraction * n_train)` (at least 2) of the training
    classes validate; under `seed` all training classes train and there is no validation split.
    The test split is handed out only with `final=True` (a final evaluation) or under protocol `seed`.
    """

    def __init__(self, records: Sequence[Record], protocol: str, val_fraction: float):
        self.records = list(records)
        self.protocol = protocol
        classes = sorted({r.class_id for r in self.records})
        if len(classes) < 4:
            raise DatasetError(f"need at least 4 classes for class-disjoint splits, found {len(classes)}")
        half = len(classes) // 2
        train_all, self.test_classes = classes[:half], classes[half:]
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
def train_transform(image_size: int) -> T.Compose:
    return T.Compose(
        [
            T.RandomResizedCrop(image_size),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def eval_transform(image_size: int) -> T.Compose:
    """Resize(256) + CenterCrop(224) at 224 px, scaled in proportion for other sizes."""
    return T.Compose(
        [
            T.Resize(round(image_size * 256 / 224)),
            T.CenterCrop(image_size),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class ImageDataset(Dataset):
    """JPEG files with labels remapped to 0..C-1 in class-id order."""

    def __init__(self, records: Sequence[Record], transform: Callable):
        self.records = list(records)
        self.transform = transform
        self.class_ids = sorted({r.class_id for r in self.records})
        index = {c: i for i, c in enumerate(self.class_ids)}
        self.labels = torch.tensor([index[r.class_id] for r in self.records], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path = self.records[i].path
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB")
        except (OSError, ValueError) as error:
            raise DatasetError(f"cannot read image {path}: {error}") from None
        return self.transform(rgb), int(self.labels[i])

    @property
    def num_classes(self) -> int:
        return len(self.class_ids)


def make_loader(dataset: ImageDataset, cfg: TrialConfig, train: bool) -> DataLoader:
    workers = cfg.resolved_num_workers
    generator = torch.Generator().manual_seed(cfg.seed)
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=train,
        drop_last=train and len(dataset) > cfg.batch_size,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
        generator=generator,
    )
