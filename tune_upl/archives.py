"""Dataset sources: where each `data_name` lives and how its official annotation files are read.

One `DatasetFormat` per name in `DATASETS`, beside the dataset's facts (`facts.DATASETS`, the names
`TrialConfig.data_name` is validated against):

- `cub`: CUB-200-2011 as extracted from CUB_200_2011.tgz into `<data_path>/cub` (also one level down
  in `CUB_200_2011/`): `images.txt`, `image_class_labels.txt`, `bounding_boxes.txt` (id x y width
  height), `classes.txt`, `train_test_split.txt`, `images/`.
- `car`: CARS196 in `<data_path>/car`: `car_ims/` and `cars_annos.mat`, whose variable `annotations`
  is a 1xN struct array (relative_im_path, bbox_x1, bbox_y1, bbox_x2, bbox_y2, class, test).
- `sop`: Stanford Online Products as extracted from Stanford_Online_Products.zip into `<data_path>/sop`
  (also one level down in `Stanford_Online_Products/`, or `<data_path>/Stanford_Online_Products` as the
  Proxy-Anchor code reads it): `Ebay_train.txt` and `Ebay_test.txt` (a header, then `image_id class_id
  super_class_id path`), the images under their paths. The lists are the split: 11,318 classes train, 11,316 test.
- `inshop`: DeepFashion's In-Shop Clothes Retrieval Benchmark in `<data_path>/inshop` (or
  `<data_path>/Inshop_Clothes`, the Proxy-Anchor code's name): `Eval/list_eval_partition.txt` (the image
  count, a header, then `image_name item_id evaluation_status`), and the images under their names
  (`img/...`, from Img/img.zip). The status is the split: train, and the test items' query and gallery images.
- `folder`: an ImageFolder-style tree `<data_path>/<class name>/<image>`; class ids follow the
  sorted class names.
- `synthetic`: the embedded generator's output, in the CUB layout, under `cache_dir`.

CUB-200-2011, CARS196, folders and the synthetic set split by class id (`split_halves`): the archives' own
train/test flags are ignored, as in the seed. SOP and In-Shop keep their official partitions (each image's
`split`), as every paper reporting them does. Reading images into the cache is `tune_upl.prepare`'s concern.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from tune_upl.errors import DatasetError
from tune_upl.facts import DATASETS as DATASET_FACTS, DatasetFacts

if TYPE_CHECKING:
    from tune_upl.config import TrialConfig

Box = tuple[float, float, float, float]  # x, y, width, height in source pixels
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
CUB_FILES = ("images.txt", "image_class_labels.txt", "bounding_boxes.txt", "classes.txt", "train_test_split.txt")
CAR_ANNOTATIONS = "cars_annos.mat"
CAR_FIELDS = ("relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class")



@dataclass(frozen=True)
class SourceImage:
    """One image as the annotation files describe it."""

    name: str  # path relative to the dataset root: the manifest's `image` column
    class_id: int  # the dataset's own 1-based label
    box: Optional[Box]  # the object's bounding box, when the format has one
    split: str = ""  # the archive's own partition (train, test, query, gallery); "": the class halves


@dataclass(frozen=True)
class DatasetFormat:
    """How one `data_name` is found, fingerprinted and read.

    `identity` is the resolved path that names the dataset (no file is touched: trials use it to find
    the prepared cache without the source); `locate` checks the source and returns the folder the image
    names are relative to; `fingerprint` is what a change of the source changes (annotation files' sizes
    and modification times); `read` lists the images; `facts` holds its name in reports and whether it
    has bounding boxes.
    """

    identity: Callable[["TrialConfig"], Path]
    locate: Callable[["TrialConfig"], Path]
    fingerprint: Callable[[Path], list[Any]]
    read: Callable[[Path], list[SourceImage]]
    facts: DatasetFacts

    @property
    def has_boxes(self) -> bool:
        return self.facts.has_boxes


def split_halves(class_ids: Sequence[int]) -> tuple[list[int], list[int]]:
    """The seed's class-disjoint split: the first half of the sorted class ids train, the rest test."""
    classes = sorted(set(class_ids))
    half = len(classes) // 2
    return classes[:half], classes[half:]


MIN_CLASSES = 4  # two train and two test classes: the fewest a class-disjoint split (and its metrics) can take


def check_class_count(class_ids: Sequence[int], where: str) -> None:
    """A dataset too small to split by class is refused where it is first read (prepare, or the search's
    pre-flight preparing it), with one message for both, before any cache or experiment file is written."""
    count = len(set(class_ids))
    if count < MIN_CLASSES:
        raise DatasetError(f"{where}: need at least {MIN_CLASSES} classes for class-disjoint splits, found {count}; "
                           f"allowed: a dataset with {MIN_CLASSES} or more classes")


def file_stats(root: Path, names: Sequence[str]) -> list[Any]:
    """[name, size, mtime_ns] of each file present: a changed annotation file changes the cache key."""
    stats = []
    for name in names:
        path = root / name
        if path.is_file():
            st = path.stat()
            stats.append([name, st.st_size, st.st_mtime_ns])
    return stats


# ---------------------------------------------------------------- CUB-200-2011 layout
def _read_table(path: Path, columns: int) -> dict[int, list[str]]:
    """`id value...` lines; `columns` counts the values after the id (the last one may hold spaces)."""
    if not path.is_file():
        raise DatasetError(f"missing {path}: the dataset is not complete (or only half-extracted)")
    table = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=columns)
        if len(parts) != columns + 1 or not parts[0].isdigit():
            raise DatasetError(f"{path} line {number}: expected an image id and {columns} value(s), got {line!r}")
        table[int(parts[0])] = parts[1:]
    return table


def read_cub_layout(root: Path) -> list[SourceImage]:
    """Images in image-id order from a CUB-200-2011-style folder; boxes when bounding_boxes.txt exists."""
    images = _read_table(root / "images.txt", 1)
    labels = _read_table(root / "image_class_labels.txt", 1)
    if images.keys() != labels.keys():
        raise DatasetError(f"{root}: images.txt and image_class_labels.txt list different image ids")
    boxes: dict[int, list[str]] = {}
    if (root / "bounding_boxes.txt").is_file():
        boxes = _read_table(root / "bounding_boxes.txt", 4)
    try:
        return [
            SourceImage(f"images/{images[i][0]}", int(labels[i][0]),
                        tuple(float(v) for v in boxes[i]) if i in boxes else None)  # type: ignore[arg-type]
            for i in sorted(images)
        ]
    except ValueError as error:
        raise DatasetError(f"{root}: a class id or box value is not a number ({error})") from None


def cub_identity(cfg: "TrialConfig") -> Path:
    return (Path(cfg.data_path).expanduser() / "cub").resolve()


def locate_cub(cfg: "TrialConfig") -> Path:
    base = Path(cfg.data_path).expanduser() / "cub"
    for root in (base, base / "CUB_200_2011"):
        if (root / "images.txt").is_file():
            return root.resolve()
    raise DatasetError(
        f"CUB-200-2011 not found: expected {base}/images.txt (or {base}/CUB_200_2011/images.txt); "
        f"extract CUB_200_2011.tgz into {base} or set --data_path"
    )


def cub_fingerprint(root: Path) -> list[Any]:
    return file_stats(root, CUB_FILES)


# ---------------------------------------------------------------- CARS196
def car_identity(cfg: "TrialConfig") -> Path:
    return (Path(cfg.data_path).expanduser() / "car").resolve()


def locate_car(cfg: "TrialConfig") -> Path:
    root = car_identity(cfg)
    if not (root / CAR_ANNOTATIONS).is_file():
        raise DatasetError(
            f"CARS196 not found: expected {root / CAR_ANNOTATIONS} (and {root}/car_ims/); "
            f"extract car_ims.tgz and cars_annos.mat into {root} or set --data_path"
        )
    return root


def car_fingerprint(root: Path) -> list[Any]:
    return file_stats(root, (CAR_ANNOTATIONS,))


def _scalar(value: Any) -> Any:
    """loadmat wraps every struct field in nested arrays ([[5]], ['car_ims/000001.jpg']): unwrap one."""
    import numpy as np

    flat = np.asarray(value).ravel()
    if flat.size != 1:
        raise ValueError(f"expected one value, got {flat.size}")
    return flat[0].item() if hasattr(flat[0], "item") else flat[0]


def read_cars_annos(root: Path) -> list[SourceImage]:
    """The `annotations` struct array of cars_annos.mat, read with scipy; boxes are corners there."""
    from scipy.io import loadmat

    path = root / CAR_ANNOTATIONS
    try:
        mat = loadmat(str(path), squeeze_me=False, struct_as_record=True)
    except Exception as error:  # scipy raises several types for a damaged file
        raise DatasetError(f"cannot read {path}: {error}") from None
    annotations = mat.get("annotations")
    names = getattr(getattr(annotations, "dtype", None), "names", None) or ()
    missing = [f for f in CAR_FIELDS if f not in names]
    if annotations is None or missing:
        raise DatasetError(
            f"{path}: expected a variable 'annotations' with fields {', '.join(CAR_FIELDS)}; "
            f"missing: {', '.join(missing) if annotations is not None else 'annotations'}"
        )
    images = []
    for index, entry in enumerate(annotations.ravel(), 1):
        try:
            x1, y1, x2, y2 = (float(_scalar(entry[f"bbox_{k}"])) for k in ("x1", "y1", "x2", "y2"))
            images.append(SourceImage(str(_scalar(entry["relative_im_path"])), int(_scalar(entry["class"])),
                                      (x1, y1, x2 - x1, y2 - y1)))
        except (ValueError, TypeError) as error:
            raise DatasetError(f"{path}: annotation {index} is malformed ({error})") from None
    return images


# ---------------------------------------------------------------- Stanford Online Products
SOP_FILES = ("Ebay_train.txt", "Ebay_test.txt")
SOP_HEADER = ["image_id", "class_id", "super_class_id", "path"]


def _sop_roots(cfg: "TrialConfig") -> list[Path]:
    base = Path(cfg.data_path).expanduser()
    return [base / "sop", base / "sop" / "Stanford_Online_Products", base / "Stanford_Online_Products"]


def sop_identity(cfg: "TrialConfig") -> Path:
    return (Path(cfg.data_path).expanduser() / "sop").resolve()


def locate_sop(cfg: "TrialConfig") -> Path:
    return _first_with(_sop_roots(cfg), SOP_FILES[0], "Stanford Online Products",
                       "extract Stanford_Online_Products.zip into")


def sop_fingerprint(root: Path) -> list[Any]:
    return file_stats(root, SOP_FILES)


def read_sop(root: Path) -> list[SourceImage]:
    """Both lists in file order, each image's split the list it is in."""
    images = []
    for name, split in zip(SOP_FILES, ("train", "test")):
        lines = _lines(root / name)
        if not lines or lines[0][1].split() != SOP_HEADER:
            raise DatasetError(f"{root / name} line 1: expected the header {' '.join(SOP_HEADER)!r}")
        for number, line in lines[1:]:
            parts = line.split()
            if len(parts) != 4 or not all(v.isdigit() for v in parts[:3]):
                raise DatasetError(f"{root / name} line {number}: expected image_id class_id super_class_id path, "
                                   f"got {line!r}")
            images.append(SourceImage(parts[3], int(parts[1]), None, split))
    return images


# ---------------------------------------------------------------- In-Shop Clothes
INSHOP_PARTITION = "Eval/list_eval_partition.txt"
INSHOP_HEADER = ["image_name", "item_id", "evaluation_status"]
INSHOP_SPLITS = ("train", "query", "gallery")


def _inshop_roots(cfg: "TrialConfig") -> list[Path]:
    base = Path(cfg.data_path).expanduser()
    return [base / "inshop", base / "Inshop_Clothes"]


def inshop_identity(cfg: "TrialConfig") -> Path:
    return (Path(cfg.data_path).expanduser() / "inshop").resolve()


def locate_inshop(cfg: "TrialConfig") -> Path:
    return _first_with(_inshop_roots(cfg), INSHOP_PARTITION, "In-Shop Clothes",
                       "extract Img/img.zip and Eval/list_eval_partition.txt of the In-shop Clothes Retrieval "
                       "Benchmark into")


def inshop_fingerprint(root: Path) -> list[Any]:
    return file_stats(root, (INSHOP_PARTITION,))


def read_inshop(root: Path) -> list[SourceImage]:
    """The partition in file order; an item id `id_00000123` is class 123."""
    path = root / INSHOP_PARTITION
    lines = _lines(path)
    if len(lines) < 2 or not lines[0][1].strip().isdigit() or lines[1][1].split() != INSHOP_HEADER:
        raise DatasetError(f"{path}: expected the image count on line 1 and the header "
                           f"{' '.join(INSHOP_HEADER)!r} on line 2")
    images = []
    for number, line in lines[2:]:
        parts = line.split()
        item = parts[1].removeprefix("id_") if len(parts) == 3 else ""
        if not item.isdigit() or parts[2] not in INSHOP_SPLITS:
            raise DatasetError(f"{path} line {number}: expected image_name item_id (id_NNNNNNNN) and one of "
                               f"{', '.join(INSHOP_SPLITS)}, got {line!r}")
        images.append(SourceImage(parts[0], int(item), None, parts[2]))
    if int(lines[0][1]) != len(images):
        raise DatasetError(f"{path}: line 1 counts {int(lines[0][1])} images, the file lists {len(images)}; "
                           "the file is damaged or cut short")
    return images


def _lines(path: Path) -> list[tuple[int, str]]:
    """(line number, line) of the non-blank lines of an annotation file."""
    if not path.is_file():
        raise DatasetError(f"missing {path}: the dataset is not complete (or only half-extracted)")
    return [(n, line) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]


def _first_with(roots: list[Path], marker: str, name: str, how: str) -> Path:
    """The first of `roots` holding `marker`, or one error listing where it was looked for."""
    for root in roots:
        if (root / marker).is_file():
            return root.resolve()
    raise DatasetError(f"{name} not found: expected {' or '.join(str(r / marker) for r in roots)}; {how} "
                       f"{roots[0]} or set --data_path")


# ---------------------------------------------------------------- image folders
def folder_identity(cfg: "TrialConfig") -> Path:
    return Path(cfg.data_path).expanduser().resolve()


def locate_folder(cfg: "TrialConfig") -> Path:
    root = folder_identity(cfg)
    if not root.is_dir():
        raise DatasetError(f"image folder not found: {root}; set --data_path to a tree <class name>/<image>")
    return root


def list_folder(root: Path) -> list[tuple[str, str]]:
    """(class name, image path relative to root) of every image, classes and files in sorted order.

    Like torchvision's ImageFolder: every non-hidden sub-folder is a class; images may sit deeper."""
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
    found = []
    for name in classes:
        for folder, dirs, files in os.walk(root / name):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            rel = Path(folder).relative_to(root)
            found += [(name, str(rel / f)) for f in sorted(files)
                      if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
    empty = sorted(set(classes) - {c for c, _ in found})
    if empty:
        raise DatasetError(
            f"{root}: class folder(s) without images: {', '.join(empty[:10])}; "
            f"allowed image types: {' '.join(IMAGE_EXTENSIONS)}"
        )
    return found


def folder_fingerprint(root: Path) -> list[Any]:
    """A digest of every image's path, size and modification time: the tree has no annotation file."""
    digest = hashlib.sha256()
    for _, rel in list_folder(root):
        st = (root / rel).stat()
        digest.update(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return [["listing", digest.hexdigest()]]


def read_folder(root: Path) -> list[SourceImage]:
    entries = list_folder(root)
    ids = {name: i for i, name in enumerate(sorted({c for c, _ in entries}), 1)}
    return [SourceImage(rel, ids[name], None) for name, rel in entries]


# ---------------------------------------------------------------- the embedded synthetic set
def synthetic_identity(cfg: "TrialConfig") -> Path:
    from tune_upl.synthetic import SYNTHETIC_VERSION

    return (Path(cfg.cache_dir).expanduser() / f"synthetic-v{SYNTHETIC_VERSION}-seed{cfg.dataset_seed}").resolve()


def locate_synthetic(cfg: "TrialConfig") -> Path:
    from tune_upl.synthetic import ensure_synthetic

    return ensure_synthetic(Path(cfg.cache_dir).expanduser(), cfg.dataset_seed).resolve()


DATASETS: dict[str, DatasetFormat] = {
    "car": DatasetFormat(car_identity, locate_car, car_fingerprint, read_cars_annos, DATASET_FACTS["car"]),
    "cub": DatasetFormat(cub_identity, locate_cub, cub_fingerprint, read_cub_layout, DATASET_FACTS["cub"]),
    "folder": DatasetFormat(folder_identity, locate_folder, folder_fingerprint, read_folder, DATASET_FACTS["folder"]),
    "inshop": DatasetFormat(inshop_identity, locate_inshop, inshop_fingerprint, read_inshop, DATASET_FACTS["inshop"]),
    "sop": DatasetFormat(sop_identity, locate_sop, sop_fingerprint, read_sop, DATASET_FACTS["sop"]),
    "synthetic": DatasetFormat(synthetic_identity, locate_synthetic, cub_fingerprint, read_cub_layout,
                               DATASET_FACTS["synthetic"]),
}
