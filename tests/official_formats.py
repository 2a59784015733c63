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
