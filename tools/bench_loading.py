"""Training images/s per core: raw archive JPEGs against the prepared cache (README, "Data").

    python tools/bench_loading.py [--images 300] [--image_size 224] [--folder DIR]

Writes a CUB-layout archive of 500x375 JPEGs (quality 90, 1/f "natural" texture, so they compress like
photos: ~80 KB each) unless --folder holds a CUB-layout dataset already, prepares it (cache_size 256),
then times one process on one thread (one core) through the training transform at `image_size`:

- raw, PIL + v1 transforms: the seed's loader (PIL decode, RandomResizedCrop on PIL, ToTensor, Normalize);
- raw, ours: torchvision's decoder (PIL where it cannot) + our uint8-tensor transforms;
- cache: the prepared uint8 cache + our transforms (what trials use).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tune_upl.config import make_config  # noqa: E402
from tune_upl.data import IMAGENET_MEAN, IMAGENET_STD, ImageDataset, Record, load_records, train_transform  # noqa: E402
from tune_upl.prepare import prepare_dataset  # noqa: E402


def natural_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Sum of upsampled random fields, amplitude ~ scale (a 1/f spectrum, like photographs), plus grain."""
    image = np.zeros((height, width, 3))
    for cells in (2, 4, 8, 16, 32, 64, 128):
        field = rng.normal(0, 1, (cells * height // width + 1, cells + 1, 3))
        channels = [Image.fromarray(field[..., c].astype(np.float32)).resize((width, height), Image.BICUBIC)
                    for c in range(3)]
        up = np.stack([np.asarray(c) for c in channels], axis=-1)
        image += up * 40.0 / cells ** 0.15
    image += rng.normal(0, 10, image.shape)
    return Image.fromarray(np.clip(128 + image, 0, 255).astype(np.uint8))


def write_archive(root: Path, n: int, classes: int = 10) -> Path:
    """A CUB-layout folder (images.txt, image_class_labels.txt, images/) of n 500x375 JPEGs."""
    rng = np.random.default_rng(0)
    images, labels = [], []
    for i in range(1, n + 1):
        rel = f"{i % classes + 1:03d}/{i:05d}.jpg"
        (root / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
        natural_image(rng, 500, 375).save(root / "images" / rel, quality=90)
        images.append(f"{i} {rel}")
        labels.append(f"{i} {i % classes + 1}")
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    return root


def images_per_second(read, n: int, repeats: int = 2) -> float:
    read(0)  # warm-up
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(n):
            read(i)
        best = max(best, n / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--folder", help="a CUB-layout dataset (default: write one in a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.folder) if args.folder else write_archive(Path(tmp) / "data" / "cub", args.images)
        data_path = data.parent if data.name == "cub" else data.parent.parent
        cfg = make_config(data_name="cub", data_path=str(data_path), cache_dir=str(Path(tmp) / "cache"),
                          image_size=args.image_size, cache_size=256)
        start = time.perf_counter()
        prepared = prepare_dataset(cfg, workers=1, progress=False)
        prepare_rate = prepared.images / (time.perf_counter() - start)
        cached = load_records(cfg)[: args.images]
        raw = [Record(r.path, r.class_id) for r in cached]
        kb = np.mean([r.path.stat().st_size for r in raw]) / 1024
        n = len(cached)

        from torchvision import transforms as T

        seed = T.Compose([T.RandomResizedCrop(args.image_size), T.RandomHorizontalFlip(), T.ToTensor(),
                          T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

        def seed_read(i: int) -> torch.Tensor:
            with Image.open(raw[i].path) as image:
                return seed(image.convert("RGB"))

        ours = train_transform(args.image_size)
        rates = {
            "raw archive, PIL + v1 transforms (the seed's loader)": images_per_second(seed_read, n),
            "raw archive, torchvision decoder + uint8 transforms": images_per_second(
                lambda i, d=ImageDataset(raw, ours): d[i], n),
            "prepared cache (uint8) + uint8 transforms": images_per_second(
                lambda i, d=ImageDataset(cached, ours): d[i], n),
        }
    print(f"{n} images, 500x375 JPEG q90 (mean {kb:.0f} KB), train transform at {args.image_size} px, 1 thread; "
          f"torch {torch.__version__}")
    print(f"prepare (decode, shrink to 256, write): {prepare_rate:.0f} images/s per core")
    for name, rate in rates.items():
        print(f"{name:<55} {rate:6.0f} images/s per core")


if __name__ == "__main__":
    main()
