"""Embedded, deterministic, fine-grained image dataset ``synthetic``.

Why: a real fine-grained benchmark (CUB-200-2011) is large and has to be downloaded; for tests,
smoke runs and cheap search-space checks we want a dataset that is generated in seconds, needs no
internet, and goes through exactly the same loading path as CUB.  So we write real JPEG files in the
CUB_200_2011 on-disk layout (``images/``, ``images.txt``, ``classes.txt``,
``image_class_labels.txt``, ``bounding_boxes.txt``, ``train_test_split.txt``; 1-based ids).

Each image shows one stylised "bird" (body, head, beak, eye, wing, tail, legs).  A class is a
combination of three subtle attributes of that bird (see ``SHAPES``, ``HEAD_COLOURS``,
``PATTERNS``):

* ``s`` shape: body aspect ratio (slim / round) x head size (small / large)  -> 4 values
* ``h`` head colour from a small palette                                    -> 4 values
* ``p`` pattern on the body: plain / transverse bars / spots                 -> 3 values

giving 4 x 4 x 3 = 48 classes.  Per image nuisances dominate global statistics: pose (rotation,
facing left or right), scale, position, background clutter of random shapes and lines in random
colours (including the head palette), occluding twigs, global colour cast, brightness, a lighting
gradient and sensor noise.  Facing is a per-image nuisance and every attribute value is symmetric
under a horizontal flip, so no class is the mirror image of another (flip augmentation is safe).

Class ids: the first half are the training classes and the second half the test classes (the
platform splits like CUB: first half train, second half test).  The test classes are the
combinations with ``(s + h + p)`` odd: new combinations whose attribute values all occur in training
classes (asserted in ``class_table``).

Generation is deterministic from ``dataset_seed`` alone: every image gets its own
``numpy.random.Generator`` seeded from ``(dataset_seed, class index, image index)``; no global RNG.
"""

from __future__ import annotations

import math
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock
from PIL import Image, ImageDraw

__all__ = [
    "SYNTHETIC_VERSION",
    "IMAGE_SIZE",
    "IMAGES_PER_CLASS",
    "SHAPES",
    "HEAD_COLOURS",
    "PATTERNS",
    "SynthClass",
    "class_table",
    "generate",
    "ensure_synthetic",
    "render_image",
    "Nuisance",
    "NUISANCE",
]

# Bump whenever the generated files change (names, layout, pixels): the cache folder name carries it.
SYNTHETIC_VERSION = 1

IMAGE_SIZE = 80  # written image size (px); the model sees Resize(73)+CenterCrop(64)
IMAGES_PER_CLASS = 40
JPEG_QUALITY = 90
_SS = 2  # supersampling factor: draw at 2x and downsample, for anti-aliased edges
_MARKER = ".complete"


@dataclass(frozen=True)
class Shape:
    name: str
    aspect: float  # body length / body height
    head: float  # head radius relative to the body half-length
    tail: float  # tail length beyond the body, relative to the body half-length


# Attribute tables.  Indices are what goes into the class directory name (``s1_h3_p0``).
SHAPES: tuple[Shape, ...] = (
    Shape("shorttail_smallhead", 1.9, 0.28, 0.45),
    Shape("shorttail_bighead", 1.9, 0.44, 0.45),
    Shape("longtail_smallhead", 1.9, 0.28, 0.95),
    Shape("longtail_bighead", 1.9, 0.44, 0.95),
)
HEAD_COLOURS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red", (205, 45, 40)),
    ("yellow", (225, 200, 45)),
    ("blue", (45, 85, 205)),
    ("white", (235, 235, 230)),
)
# All patterns are symmetric under a horizontal flip (no "/" vs "\" stripes).
PATTERNS: tuple[str, ...] = ("plain", "bars", "spots")


@dataclass(frozen=True)
class Nuisance:
    """Per-image nuisance ranges (not class information)."""

    scale: tuple[float, float] = (0.9, 1.1)  # bird size factor
    body_len: float = 0.33  # body half-length as a fraction of the image side
    rotation_deg: float = 20.0
    shift: float = 0.08  # centre jitter as a fraction of the image side
    clutter: tuple[int, int] = (8, 16)  # number of background shapes [lo, hi)
    berries: tuple[int, int] = (0, 1)  # extra discs in head colours [lo, hi)
    twigs: tuple[int, int] = (0, 3)  # occluding lines in front of the bird [lo, hi)
    brightness: tuple[float, float] = (0.7, 1.25)
    cast: tuple[float, float] = (0.75, 1.25)  # per-channel gain
    offset: float = 20.0  # per-channel additive shift
    gradient: float = 0.6  # lighting gradient strength across the image
    noise: tuple[float, float] = (2.0, 6.0)  # Gaussian noise sigma
    body_jitter: float = 35.0  # body colour jitter per channel


NUISANCE = Nuisance()


@dataclass(frozen=True)
class SynthClass:
    class_id: int  # 1-based, CUB style
    shape: int
    head: int
    pattern: int
    is_train: bool

    @property
    def attrs(self) -> tuple[int, int, int]:
        return (self.shape, self.head, self.pattern)

    @property
    def dirname(self) -> str:
        return f"{self.class_id:03d}.s{self.shape}_h{self.head}_p{self.pattern}"


def class_table() -> list[SynthClass]:
    """All classes, training combinations first (ids 1..n/2), test combinations second."""
    combos = [
        (s, h, p)
        for s in range(len(SHAPES))
        for h in range(len(HEAD_COLOURS))
        for p in range(len(PATTERNS))
    ]
    train = [c for c in combos if sum(c) % 2 == 0]
    test = [c for c in combos if sum(c) % 2 == 1]
    assert len(train) == len(test), "the platform splits the class ids in two halves"
    # Test classes must be new combinations built only from attribute values seen in training.
    assert not set(train) & set(test)
    for k in range(3):
        seen = {c[k] for c in train}
        assert all(c[k] in seen for c in test), f"attribute {k} value unseen in training"
    out = []
    for i, c in enumerate(train + test):
        out.append(SynthClass(i + 1, *c, is_train=i < len(train)))
    return out


# --------------------------------------------------------------------------------------------
# rendering


def _ellipse(cx: float, cy: float, rx: float, ry: float, rot: float = 0.0, n: int = 48) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
    x, y = rx * np.cos(t), ry * np.sin(t)
    c, s = math.cos(rot), math.sin(rot)
    return np.stack([cx + c * x - s * y, cy + s * x + c * y], axis=1)


def _jitter_colour(rng: np.random.Generator, rgb, amount: float) -> tuple[int, int, int]:
    v = np.asarray(rgb, dtype=np.float64) + rng.uniform(-amount, amount, size=3)
    return tuple(int(x) for x in np.clip(v, 0, 255))


def _rand_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(x) for x in rng.integers(0, 256, size=3))


def _draw_berry(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int,
                cx: float | None = None, cy: float | None = None) -> None:
    """A disc in one of the head colours: head colour must not be a global cue."""
    if cx is None or cy is None:
        cx, cy = rng.uniform(0.0, 1.0, size=2) * size
    pal = HEAD_COLOURS[int(rng.integers(0, len(HEAD_COLOURS)))][1]
    rr = rng.uniform(0.03, 0.07) * size
    pts = _ellipse(cx, cy, rr, rr, 0.0, 20)
    draw.polygon([tuple(p) for p in pts], fill=_jitter_colour(rng, pal, 25))


def _draw_clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int, n: int) -> None:
    """Random shapes behind the bird.  Some reuse the bird's cues on purpose (discs in the head
    palette, dotted and barred patches) so that untrained texture/colour features cannot find
    the class; a trained model has to look at them *on the bird*."""
    for _ in range(n):
        kind = rng.integers(0, 7)
        col = _rand_colour(rng)
        cx, cy = rng.uniform(-0.1, 1.1, size=2) * size
        r = rng.uniform(0.03, 0.16) * size
        if kind == 0:  # ellipse / blob
            pts = _ellipse(cx, cy, r, r * rng.uniform(0.4, 1.0), rng.uniform(0, math.pi), 24)
            draw.polygon([tuple(p) for p in pts], fill=col)
        elif kind == 1:  # rotated rectangle
            pts = _ellipse(cx, cy, r, r * rng.uniform(0.3, 1.0), rng.uniform(0, math.pi), 4)
            draw.polygon([tuple(p) for p in pts], fill=col)
        elif kind == 2:  # triangle
            pts = np.array([cx, cy]) + rng.uniform(-r, r, size=(3, 2))
            draw.polygon([tuple(p) for p in pts], fill=col)
        elif kind == 3:  # line / branch
            a = rng.uniform(0, math.pi)
            d = np.array([math.cos(a), math.sin(a)]) * r * 2
            draw.line([(cx - d[0], cy - d[1]), (cx + d[0], cy + d[1])], fill=col,
                      width=int(rng.integers(1, 4) * _SS))
        elif kind == 4:  # disc in a head colour ("berry")
            _draw_berry(draw, rng, size, cx, cy)
        else:  # patch with dots (5) or bars (6) like the body patterns
            rx, ry = r * 1.2, r * rng.uniform(0.5, 0.9)
            ang = rng.uniform(0, math.pi)
            draw.polygon([tuple(p) for p in _ellipse(cx, cy, rx, ry, ang, 24)], fill=col)
            dcol = tuple(int(v * rng.uniform(0.2, 0.45)) for v in col)
            ca, sa = math.cos(ang), math.sin(ang)
            step = 0.035 * size
            for u in np.arange(-rx + step / 2, rx, step * (1.0 if kind == 5 else 1.4)):
                if kind == 5:
                    for v in np.arange(-ry + step / 2, ry, step):
                        if (u / rx) ** 2 + (v / ry) ** 2 < 0.8:
                            px, py = cx + ca * u - sa * v, cy + sa * u + ca * v
                            draw.polygon([tuple(p) for p in _ellipse(px, py, 0.011 * size, 0.011 * size, 0, 10)], fill=dcol)
                else:
                    h = ry * math.sqrt(max(0.0, 1 - (u / rx) ** 2)) * 0.9
                    w = 0.012 * size
                    quad = [(u - w, -h), (u + w, -h), (u + w, h), (u - w, h)]
                    draw.polygon([(cx + ca * x - sa * y, cy + sa * x + ca * y) for x, y in quad], fill=dcol)


def render_image(
    cls: SynthClass, rng: np.random.Generator, nz: Nuisance | None = None
) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """Render one image of ``cls``; return it and the bird's box (x, y, w, h) in output pixels."""
    nz = NUISANCE if nz is None else nz
    S = IMAGE_SIZE * _SS
    shape = SHAPES[cls.shape]

    # ---- background: smooth two-colour gradient + clutter ------------------------------------
    c0 = np.array(_rand_colour(rng), dtype=np.float64)
    c1 = np.array(_rand_colour(rng), dtype=np.float64)
    a = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:S, 0:S] / (S - 1) - 0.5
    t = np.clip(0.5 + (xx * math.cos(a) + yy * math.sin(a)), 0, 1)[..., None]
    bg = (c0 * (1 - t) + c1 * t).astype(np.uint8)
    img = Image.fromarray(bg, "RGB")
    draw = ImageDraw.Draw(img)
    _draw_clutter(draw, rng, S, int(rng.integers(*nz.clutter)))
    for _ in range(int(rng.integers(*nz.berries))):
        _draw_berry(draw, rng, S)

    # ---- pose ---------------------------------------------------------------------------------
    L = S * nz.body_len * rng.uniform(*nz.scale)  # body half-length in pixels
    rot = math.radians(rng.uniform(-nz.rotation_deg, nz.rotation_deg))
    facing = 1.0 if rng.random() < 0.5 else -1.0  # nuisance: flip is not a class attribute
    cx = S / 2 + rng.uniform(-nz.shift, nz.shift) * S
    cy = S / 2 + rng.uniform(-nz.shift, nz.shift) * S
    cr, sr = math.cos(rot), math.sin(rot)

    def tf(pts) -> list[tuple[float, float]]:
        p = np.asarray(pts, dtype=np.float64) * L
        x, y = p[:, 0] * facing, p[:, 1]
        return [(cx + cr * u - sr * v, cy + sr * u + cr * v) for u, v in zip(x, y)]

    # ---- bird in object units (body half-length 1, facing +x, y down) --------------------------
    a_ = 1.0
    b_ = 1.0 / (shape.aspect * rng.uniform(0.9, 1.1))  # body half-height
    hr = shape.head
    body_col = _jitter_colour(rng, (135, 110, 85), nz.body_jitter)
    dark = tuple(int(v * rng.uniform(0.25, 0.4)) for v in body_col)
    wing_col = tuple(int(v * rng.uniform(0.7, 0.85)) for v in body_col)
    head_col = _jitter_colour(rng, HEAD_COLOURS[cls.head][1], 25)

    body = _ellipse(0, 0, a_, b_)
    head_c = np.array([0.92 * a_, -0.75 * b_ - 0.2 * hr])
    head = _ellipse(head_c[0], head_c[1], hr, hr)
    tl = 0.8 + shape.tail
    tail = np.array([[-0.8, -0.25 * b_], [-tl + 0.05, -0.55 * b_ - 0.08], [-tl, -0.1 * b_], [-0.8, 0.3 * b_]])
    beak = np.array([head_c + [0.75 * hr, -0.35 * hr], head_c + [hr + 0.28, 0.05 * hr],
                     head_c + [0.75 * hr, 0.35 * hr]])
    eye = _ellipse(head_c[0] + 0.35 * hr, head_c[1] - 0.15 * hr, 0.16 * hr + 0.02, 0.16 * hr + 0.02, n=16)
    wing = _ellipse(-0.2, -0.25 * b_, 0.55, 0.42 * b_, rot=-0.12)

    leg_w = max(1, int(round(0.045 * L)))
    leg_col = _jitter_colour(rng, (70, 60, 50), 20)
    for lx in (-0.15, 0.2):
        draw.line(tf([[lx, 0.8 * b_], [lx - 0.05, 0.8 * b_ + 0.45]]), fill=leg_col, width=leg_w)
    draw.polygon(tf(tail), fill=wing_col)
    draw.polygon(tf(body), fill=body_col)

    # pattern on the body, clipped to the body outline
    if cls.pattern != 0:
        mask = Image.new("L", (S, S), 0)
        mdraw = ImageDraw.Draw(mask)
        if cls.pattern == 1:  # transverse bars (perpendicular to the body axis)
            w = 0.09
            for x0 in np.linspace(-0.7, 0.7, 5) + rng.uniform(-0.05, 0.05):
                mdraw.polygon(tf([[x0 - w, -1.5], [x0 + w, -1.5], [x0 + w, 1.5], [x0 - w, 1.5]]), fill=255)
        else:  # spots on a jittered grid
            for gx in np.linspace(-0.7, 0.7, 5):
                for gy in (-0.45, 0.0, 0.45):
                    px = gx + rng.uniform(-0.06, 0.06) + (0.14 if gy == 0.0 else 0.0)
                    py = gy * b_ + rng.uniform(-0.04, 0.04)
                    rr = 0.085
                    mdraw.polygon(tf(_ellipse(px, py, rr, rr, n=12)), fill=255)
        body_mask = Image.new("L", (S, S), 0)
        ImageDraw.Draw(body_mask).polygon(tf(body), fill=255)
        mask = Image.fromarray(np.minimum(np.asarray(mask), np.asarray(body_mask)))
        img.paste(dark, (0, 0, S, S), mask)
        draw = ImageDraw.Draw(img)

    draw.polygon(tf(wing), fill=wing_col)
    draw.polygon(tf(beak), fill=_jitter_colour(rng, (60, 55, 45), 20))
    draw.polygon(tf(head), fill=head_col)
    draw.polygon(tf(eye), fill=(15, 15, 15))

    pts = np.array(tf(np.concatenate([body, head, tail, beak])), dtype=np.float64)
    x0, y0 = pts.min(axis=0)
    x1, y1 = pts.max(axis=0)

    # occluding twigs in front of the bird
    for _ in range(int(rng.integers(*nz.twigs))):
        p = rng.uniform(0, S, size=(2, 2))
        draw.line([tuple(p[0]), tuple(p[1])], fill=_rand_colour(rng), width=int(rng.integers(1, 3) * _SS))

    img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)

    # ---- photometric nuisances: lighting gradient, brightness, colour cast, noise --------------
    arr = np.asarray(img, dtype=np.float32)
    n = IMAGE_SIZE
    g = np.mgrid[0:n, 0:n].astype(np.float32) / (n - 1) - 0.5
    la = rng.uniform(0, 2 * math.pi)
    light = 1.0 + rng.uniform(0.0, nz.gradient) * (g[1] * math.cos(la) + g[0] * math.sin(la))
    gain = rng.uniform(*nz.brightness) * rng.uniform(*nz.cast, size=3)
    offset = rng.uniform(-nz.offset, nz.offset, size=3)
    arr = arr * light[..., None] * gain[None, None, :] + offset[None, None, :]
    arr = arr + rng.normal(0.0, rng.uniform(*nz.noise), size=arr.shape)
    out = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "RGB")

    box_x0, box_y0 = max(0.0, x0 / _SS), max(0.0, y0 / _SS)
    box_x1, box_y1 = min(float(IMAGE_SIZE), x1 / _SS), min(float(IMAGE_SIZE), y1 / _SS)
    return out, (box_x0, box_y0, box_x1 - box_x0, box_y1 - box_y0)


# --------------------------------------------------------------------------------------------
# dataset on disk


def _image_rng(dataset_seed: int, class_index: int, image_index: int) -> np.random.Generator:
    # Independent stream per image: output does not depend on generation order.
    return np.random.default_rng(np.random.SeedSequence([int(dataset_seed), class_index, image_index, 0x5EED]))


def generate(root: str | Path, dataset_seed: int = 0, images_per_class: int = IMAGES_PER_CLASS) -> Path:
    """Write the whole dataset (CUB_200_2011 layout) under ``root`` (created; must not hold files)."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    classes = class_table()
    images, labels, boxes, split = [], [], [], []
    image_id = 0
    for ci, cls in enumerate(classes):
        cdir = root / "images" / cls.dirname
        cdir.mkdir(exist_ok=True)
        for k in range(images_per_class):
            image_id += 1
            img, (bx, by, bw, bh) = render_image(cls, _image_rng(dataset_seed, ci, k))
            rel = f"{cls.dirname}/{cls.dirname.split('.', 1)[1]}_{k + 1:04d}.jpg"
            img.save(root / "images" / rel, format="JPEG", quality=JPEG_QUALITY)
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {cls.class_id}")
            boxes.append(f"{image_id} {bx:.1f} {by:.1f} {bw:.1f} {bh:.1f}")
            split.append(f"{image_id} {int(cls.is_train)}")
    files = {
        "images.txt": images,
        "classes.txt": [f"{c.class_id} {c.dirname}" for c in classes],
        "image_class_labels.txt": labels,
        "bounding_boxes.txt": boxes,
        "train_test_split.txt": split,
    }
    for name, lines in files.items():
        (root / name).write_text("\n".join(lines) + "\n")
    return root


def ensure_synthetic(cache_dir: str | Path, dataset_seed: int = 0) -> Path:
    """Generate (once) and return the dataset root: cache_dir / f"synthetic-v{SYNTHETIC_VERSION}-seed{dataset_seed}".

    Idempotent and safe when several processes call it at once: a ``filelock.FileLock`` on a sibling
    ``.lock`` file serialises generation, which writes into a temporary sibling folder that is then
    renamed into place; the ``.complete`` marker (written last) tells a finished dataset from a
    half-written one, which is removed and regenerated.
    """
    cache_dir = Path(cache_dir)
    name = f"synthetic-v{SYNTHETIC_VERSION}-seed{int(dataset_seed)}"
    root = cache_dir / name
    if (root / _MARKER).is_file():
        return root
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_dir / f"{name}.lock")):
        if (root / _MARKER).is_file():  # another process finished while we waited
            return root
        # Under the lock nobody else is generating: leftovers of crashed runs are stale.
        for stale in cache_dir.glob(f".{name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = cache_dir / f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            generate(tmp, dataset_seed)
            n = len(class_table()) * IMAGES_PER_CLASS
            (tmp / _MARKER).write_text(f"version {SYNTHETIC_VERSION}\nseed {int(dataset_seed)}\nimages {n}\n")
            if root.exists():  # half-written (no marker): replace it
                shutil.rmtree(root)
            os.replace(tmp, root)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return root
