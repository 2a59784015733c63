"""Small archives in the exact official on-disk formats, written on the fly for the dataset tests.

Every image is a JPEG of WIDTH x HEIGHT px: a noisy grey background with its object box filled in its
class colour, so a cropped cache image can be checked against the box.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy.io import savemat

WIDTH, HEIGHT = 64, 48
CLASSES, PER_CLASS = 8, 4


def colour(class_id: int) -> tuple[int, int, int]:
    """A saturated colour per class, far from the grey background."""
    hues = [(220, 30, 30), (30, 200, 40), (40, 60, 220), (230, 200, 20),
            (200, 40, 200), (20, 200, 210), (240, 120, 20), (120, 20, 160)]
    return hues[(class_id - 1) % len(hues)]


def box_of(index: int) -> tuple[int, int, int, int]:
    """x, y, width, height of image `index` (0-based): varied positions and shapes inside the image."""
    return 4 + 3 * (index % 5), 3 + 2 * (index % 4), 24 + 2 * (index % 3), 18 + (index % 5)


def write_image(path: Path, class_id: int, index: int) -> tuple[int, int, int, int]:
    rng = np.random.default_rng(index)
    pixels = np.clip(128 + rng.normal(0, 12, (HEIGHT, WIDTH, 3)), 0, 255).astype(np.uint8)
    x, y, w, h = box_of(index)
    pixels[y:y + h, x:x + w] = colour(class_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="JPEG", quality=95)
    return x, y, w, h


def make_cub(root: Path, classes: int = CLASSES, per_class: int = PER_CLASS) -> Path:
    """CUB_200_2011/ as extracted from CUB_200_2011.tgz (the tar holds that top folder): 1-based ids."""
    top = root / "CUB_200_2011"
    images, labels, boxes, split, names = [], [], [], [], []
    image_id = 0
    for c in range(1, classes + 1):
        folder = f"{c:03d}.Bird_{c}"
        names.append(f"{c} {folder}")
        for k in range(per_class):
            image_id += 1
            rel = f"{folder}/Bird_{c}_{k + 1:04d}_{image_id}.jpg"
            x, y, w, h = write_image(top / "images" / rel, c, image_id - 1)
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {c}")
            boxes.append(f"{image_id} {x:.1f} {y:.1f} {w:.1f} {h:.1f}")
            split.append(f"{image_id} {k % 2}")  # the archive's own image split: ignored by the platform
    for name, lines in {"images.txt": images, "image_class_labels.txt": labels, "bounding_boxes.txt": boxes,
                        "train_test_split.txt": split, "classes.txt": names}.items():
        (top / name).write_text("\n".join(lines) + "\n")
    return top


def make_cars(root: Path, classes: int = CLASSES, per_class: int = PER_CLASS) -> Path:
    """car_ims/ and cars_annos.mat: `annotations` a 1xN struct array, `class_names` a 1xC cell array,
    with the official field names; numbers wrapped as MATLAB scalars ([[v]]), boxes as corners."""
    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    n = classes * per_class
    annotations = np.zeros((1, n), dtype=[(f, "O") for f in fields])
    for index in range(n):
        c = index // per_class + 1
        rel = f"car_ims/{index + 1:06d}.jpg"
        x, y, w, h = write_image(root / rel, c, index)
        test = int(index % 3 == 0)  # the archive's own flag: not the metric-learning split
        values = [np.array([rel]), *(np.array([[v]], dtype=np.uint8) for v in (x, y, x + w, y + h)),
                  np.array([[c]], dtype=np.uint8), np.array([[test]], dtype=np.uint8)]
        annotations[0, index] = tuple(values)
    class_names = np.empty((1, classes), dtype=object)
    for c in range(classes):
        class_names[0, c] = np.array([f"Make Model {c + 1} 2012"])
    savemat(str(root / "cars_annos.mat"), {"annotations": annotations, "class_names": class_names})
    return root


def make_folder(root: Path, names: tuple[str, ...], per_class: int = PER_CLASS) -> Path:
    """An ImageFolder tree <class name>/<image>, with a stray non-image file that must be ignored."""
    for c, name in enumerate(names, 1):
        for k in range(per_class):
            write_image(root / name / f"img_{k}.jpg", c, c * per_class + k)
    (root / names[0] / "notes.txt").write_text("not an image\n")
    return root


SOP_SUPER = ("bicycle_final", "chair_final", "lamp_final")


def make_sop(root: Path, train_classes: int = 6, test_classes: int = 6, per_class: int = PER_CLASS) -> Path:
    """Stanford_Online_Products/ as extracted from Stanford_Online_Products.zip: Ebay_train.txt lists the
    first `train_classes` classes, Ebay_test.txt the rest (a header, then image_id class_id super_class_id
    path, ids 1-based and restarting in each list), the images in <super class>_final/<product>_<k>.JPG."""
    top = root / "Stanford_Online_Products"
    lists = {"Ebay_train.txt": ["image_id class_id super_class_id path"],
             "Ebay_test.txt": ["image_id class_id super_class_id path"]}
    index = 0
    for c in range(1, train_classes + test_classes + 1):
        name = "Ebay_train.txt" if c <= train_classes else "Ebay_test.txt"
        sup = (c - 1) % len(SOP_SUPER) + 1
        for k in range(per_class):
            rel = f"{SOP_SUPER[sup - 1]}/{111085122800 + c}_{k}.JPG"
            write_image(top / rel, c, index)
            index += 1
            lists[name].append(f"{len(lists[name])} {c} {sup} {rel}")
    for name, lines in lists.items():
        (top / name).write_text("\n".join(lines) + "\n")
    return top


def make_inshop(root: Path, train_items: int = 6, test_items: int = 6, per_item: int = PER_CLASS) -> Path:
    """The In-shop Clothes Retrieval Benchmark's Eval/list_eval_partition.txt (the image count, a header, then
    image_name item_id evaluation_status, columns padded with spaces as in the official file) and img/
    (Img/img.zip): the first `train_items` items train; each test item's first half of images are queries,
    the rest gallery. Item ids are not consecutive (id_00000002, id_00000005, ...), as in the archive."""
    rows = []
    index = 0
    for n in range(train_items + test_items):
        item = 3 * n + 2
        for k in range(per_item):
            rel = f"img/WOMEN/Dresses/id_{item:08d}/{k + 1:02d}_{k % 2 + 1}_{('front', 'side')[k % 2]}.jpg"
            write_image(root / rel, n + 1, index)
            index += 1
            status = "train" if n < train_items else ("query" if k < per_item // 2 else "gallery")
            rows.append(f"{rel:<60}id_{item:08d}          {status}")
    (root / "Eval").mkdir(parents=True, exist_ok=True)
    (root / "Eval" / "list_eval_partition.txt").write_text(
        "\n".join([str(len(rows)), "image_name item_id evaluation_status", *rows]) + "\n")
    return root
