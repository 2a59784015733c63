"""Embedded, deterministic, fine-grained image dataset ``synthetic``.

Why: the real fine-grained benchmark (CUB-200-2011) is large and has to be downloaded; for tests,
smoke runs and cheap search-space checks we want a dataset that is generated in seconds without
internet and goes through exactly the same loading path as CUB.  So we write real JPEG files in the
CUB_200_2011 on-disk layout (``images/``, ``images.txt``, ``classes.txt``,
``image_class_labels.txt``, ``bounding_boxes.txt``, ``train_test_split.txt``; 1-based ids).

Each image shows one stylised bird (body, head, beak, eye, wing, tail, legs).  A class is a
combination of three attributes of that bird, like a birder's field marks (see ``ATTRIBUTES``):

* ``h`` head colour: red / yellow / blue                                   -> 3 values
* ``w`` wing pattern, pale on the wing: plain / bars / stripes / spots     -> 4 values
* ``p`` breast pattern, dark on the body: plain / bars / stripes / spots   -> 4 values

giving 3 x 4 x 4 = 48 classes (class directory e.g. ``007.h0_w3_p1``).  Bars run across the body
axis and stripes along it, so every value is symmetric under a horizontal flip; the facing
direction is a per-image nuisance: no class is the mirror image of another.

Per-image nuisances dominate global statistics: body proportions (aspect ratio, head size, tail
length), pose (rotation, facing), scale, position, background gradient and clutter of random
shapes and lines in random colours, plus distractors that reuse the class cues away from the bird
(discs in the head colours, dotted and barred patches), occluding twigs, global colour cast,
brightness, a lighting gradient and noise.  Hence a colour histogram or an untrained CNN cannot
tell the classes apart, while a briefly trained CNN learns the field marks.

Class ids: the first half (1..24) are the training classes and the second half (25..48) the test
classes (the platform splits like CUB).  The test classes are the combinations whose value indices
sum to an odd number: new combinations whose attribute values all occur in training classes
(asserted in ``class_table``).

Generation is deterministic from ``dataset_seed`` alone: every image gets its own
``numpy.random.Generator`` seeded from ``(dataset_seed, class index, image index)``; no global RNG.
The full set (1920 images of 80x80 px) takes a few seconds.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from tune_upl.atomic import build_once

__all__ = [
    "SYNTHETIC_VERSION",
    "IMAGE_SIZE",
    "IMAGES_PER_CLASS",
    "HEAD_COLOURS",
    "PATTERNS",
    "ATTRIBUTES",
    "LARGE_ATTRIBUTES",
    "TAIL_COLOURS",
    "Attribute",
    "Nuisance",
    "NUISANCE",
    "SynthClass",
    "class_table",
    "parse_class_dir",
    "render_image",
    "generate",
    "ensure_synthetic",
]

# Bump whenever the generated files change (names, layout, pixels): the cache folder name carries it.
SYNTHETIC_VERSION = 2

IMAGE_SIZE = 80  # written image size (px); the model sees Resize(73)+CenterCrop(64)
IMAGES_PER_CLASS = 40
JPEG_QUALITY = 90
_SS = 2  # supersampling factor: draw at 2x and downsample, for anti-aliased edges
_MARKER = ".complete"


@dataclass(frozen=True)
class Attribute:
    """One class attribute: a letter for the class directory name and the value names."""

    key: str
    name: str
    values: tuple[str, ...]


HEAD_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (205, 45, 40),
    "yellow": (225, 200, 45),
    "blue": (45, 85, 205),
}
# Every pattern is symmetric under a horizontal flip (no "/" vs "\" stripes).
PATTERNS: tuple[str, ...] = ("plain", "bars", "stripes", "spots")

ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute("h", "head colour", tuple(HEAD_COLOURS)),
    Attribute("w", "wing pattern", PATTERNS),
    Attribute("p", "breast pattern", PATTERNS),
)
# A fourth field mark for larger sets (the search benchmark's 144 classes); the 48-class `synthetic`
# dataset does not use it, and its images are unchanged by it.
TAIL_COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (25, 25, 30),
    "white": (235, 235, 225),
    "rufous": (185, 85, 30),
}
TAIL = Attribute("t", "tail colour", tuple(TAIL_COLOURS))
LARGE_ATTRIBUTES: tuple[Attribute, ...] = ATTRIBUTES + (TAIL,)


@dataclass(frozen=True)
class Nuisance:
    """Per-image nuisance ranges (no class information).  Tuned so that a colour histogram and an
    untrained CNN reach test Recall@1 < 0.15 while 5 epochs of training gain > +0.25."""

    body_len: float = 0.33  # body half-length as a fraction of the image side
    scale: tuple[float, float] = (0.9, 1.1)  # bird size factor
    rotation_deg: float = 20.0
    shift: float = 0.08  # centre jitter as a fraction of the image side
    aspect: tuple[float, float] = (1.6, 2.3)  # body length / height
    head: tuple[float, float] = (0.3, 0.4)  # head radius / body half-length
    tail: tuple[float, float] = (0.5, 0.9)  # tail length / body half-length
    clutter: tuple[int, int] = (8, 16)  # number of background shapes [lo, hi)
    berries: tuple[int, int] = (1, 4)  # extra discs in head colours [lo, hi)
    twigs: tuple[int, int] = (0, 3)  # occluding lines in front of the bird [lo, hi)
    brightness: tuple[float, float] = (0.7, 1.25)
    cast: tuple[float, float] = (0.7, 1.3)  # per-channel gain
    offset: float = 20.0  # per-channel additive shift
    gradient: float = 0.6  # lighting gradient strength across the image
    noise: tuple[float, float] = (2.0, 6.0)  # Gaussian noise sigma
    body_jitter: float = 35.0  # body colour jitter per channel
    dark: tuple[float, float] = (0.3, 0.45)  # breast pattern colour = body colour x this
    pale: tuple[float, float] = (0.7, 0.9)  # wing pattern colour: mix of wing colour and off-white


NUISANCE = Nuisance()


@dataclass(frozen=True)
class SynthClass:
    class_id: int  # 1-based, CUB style
    values: tuple[int, ...]  # one value index per entry of ``ATTRIBUTES`` (or ``LARGE_ATTRIBUTES``)
    is_train: bool

    @property
    def attrs(self) -> dict[str, str]:
        """``{'h': 'red', 'w': 'bars', 'p': 'plain'}``."""
        return {a.key: a.values[v] for a, v in zip(LARGE_ATTRIBUTES, self.values)}

    @property
    def dirname(self) -> str:
        return f"{self.class_id:03d}." + "_".join(f"{a.key}{v}" for a, v in zip(LARGE_ATTRIBUTES, self.values))


def parse_class_dir(dirname: str) -> dict[str, int]:
    """``'007.h1_w2_p0'`` -> ``{'h': 1, 'w': 2, 'p': 0}`` (value indices into ``ATTRIBUTES``)."""
    return {t[0]: int(t[1:]) for t in dirname.split(".", 1)[1].split("_")}


def class_table(attributes: tuple[Attribute, ...] = ATTRIBUTES) -> list[SynthClass]:
    """All classes, training combinations first (ids 1..n/2), test combinations second.

    Test classes are the combinations whose value indices sum to an odd number: each is a new
    combination, and every attribute value occurs in both halves. `LARGE_ATTRIBUTES` gives 144 classes.
    """
    assert attributes in (ATTRIBUTES, LARGE_ATTRIBUTES), "render_image draws these field marks only"
    combos = list(itertools.product(*(range(len(a.values)) for a in attributes)))
    train = [c for c in combos if sum(c) % 2 == 0]
    test = [c for c in combos if sum(c) % 2 == 1]
    assert len(train) == len(test), "the platform splits the class ids in two halves"
    assert not set(train) & set(test)
    for k, a in enumerate(attributes):
        seen = {c[k] for c in train}
        assert all(c[k] in seen for c in test), f"a value of {a.name!r} is unseen in training"
    return [SynthClass(i + 1, c, i < len(train)) for i, c in enumerate(train + test)]


# --------------------------------------------------------------------------------------------
# rendering


@functools.lru_cache(maxsize=None)
def _unit_circle(n: int) -> tuple[np.ndarray, np.ndarray]:
    t = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
    return np.cos(t), np.sin(t)


@functools.lru_cache(maxsize=None)
def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) coordinates in [-0.5, 0.5] of an n x n image."""
    g = np.mgrid[0:n, 0:n].astype(np.float32) / (n - 1) - 0.5
    return g[0], g[1]


def _ellipse(cx: float, cy: float, rx: float, ry: float, rot: float = 0.0, n: int = 40) -> np.ndarray:
    ct, st = _unit_circle(n)
    x, y = rx * ct, ry * st
    c, s = math.cos(rot), math.sin(rot)
    return np.stack([cx + c * x - s * y, cy + s * x + c * y], axis=1)


def _flat(pts: np.ndarray) -> list[float]:
    return np.asarray(pts, dtype=np.float64).ravel().tolist()


def _jitter_colour(rng: np.random.Generator, rgb, amount: float) -> tuple[int, int, int]:
    v = np.asarray(rgb, dtype=np.float64) + rng.uniform(-amount, amount, size=3)
    return tuple(int(x) for x in np.clip(v, 0, 255))


def _rand_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(x) for x in rng.integers(0, 256, size=3))


def _disc(draw: ImageDraw.ImageDraw, x: float, y: float, r: float, fill) -> None:
    draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)


def _draw_berry(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int, cx: float, cy: float) -> None:
    """A disc in one of the head colours: head colour must not be a global cue."""
    names = tuple(HEAD_COLOURS)
    pal = HEAD_COLOURS[names[int(rng.integers(0, len(names)))]]
    _disc(draw, cx, cy, rng.uniform(0.03, 0.07) * size, _jitter_colour(rng, pal, 25))


def _draw_clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int, n: int) -> None:
    """Random shapes behind the bird.  Some reuse the bird's cues on purpose (discs in the head
    colours, dotted and barred patches) so that untrained colour/texture features cannot find the
    class; a trained model has to look at them on the bird."""
    for _ in range(n):
        kind = int(rng.integers(0, 7))
        col = _rand_colour(rng)
        cx, cy = rng.uniform(-0.1, 1.1, size=2) * size
        r = rng.uniform(0.03, 0.16) * size
        if kind == 0:  # blob
            draw.polygon(_flat(_ellipse(cx, cy, r, r * rng.uniform(0.4, 1.0), rng.uniform(0, math.pi), 24)), fill=col)
        elif kind == 1:  # rotated rectangle
            draw.polygon(_flat(_ellipse(cx, cy, r, r * rng.uniform(0.3, 1.0), rng.uniform(0, math.pi), 4)), fill=col)
        elif kind == 2:  # triangle
            draw.polygon(_flat(np.array([cx, cy]) + rng.uniform(-r, r, size=(3, 2))), fill=col)
        elif kind == 3:  # line / branch
            a = rng.uniform(0, math.pi)
            dx, dy = math.cos(a) * r * 2, math.sin(a) * r * 2
            draw.line([cx - dx, cy - dy, cx + dx, cy + dy], fill=col, width=int(rng.integers(1, 4)) * _SS)
        elif kind == 4:  # disc in a head colour ("berry")
            _draw_berry(draw, rng, size, cx, cy)
        else:  # patch with dots (5) or bars (6), like the bird's patterns
            rx, ry = r * 1.2, r * rng.uniform(0.5, 0.9)
            ang = rng.uniform(0, math.pi)
            draw.polygon(_flat(_ellipse(cx, cy, rx, ry, ang, 24)), fill=col)
            dcol = tuple(int(v * rng.uniform(0.2, 0.45)) for v in col)
            ca, sa = math.cos(ang), math.sin(ang)
            step = 0.035 * size
            for u in np.arange(-rx + step / 2, rx, step * (1.0 if kind == 5 else 1.4)):
                if kind == 5:
                    for v in np.arange(-ry + step / 2, ry, step):
                        if (u / rx) ** 2 + (v / ry) ** 2 < 0.8:
                            _disc(draw, cx + ca * u - sa * v, cy + sa * u + ca * v, 0.011 * size, dcol)
                else:
                    h = ry * math.sqrt(max(0.0, 1 - (u / rx) ** 2)) * 0.9
                    w = 0.012 * size
                    quad = ((u - w, -h), (u + w, -h), (u + w, h), (u - w, h))
                    draw.polygon([(cx + ca * x - sa * y, cy + sa * x + ca * y) for x, y in quad], fill=dcol)


class _Pose:
    """Object units (body half-length 1, facing +x, y down) -> supersampled pixel coordinates."""

    def __init__(self, L: float, rot: float, facing: float, cx: float, cy: float):
        c, s = math.cos(rot), math.sin(rot)
        # x_pix = cx + L * (c * f * u - s * v),  y_pix = cy + L * (s * f * u + c * v)
        self.m = np.array([[c * facing, s * facing], [-s, c]]) * L
        self.t = np.array([cx, cy])
        self.L = L

    def pts(self, p) -> np.ndarray:
        return np.asarray(p, dtype=np.float64) @ self.m + self.t

    def __call__(self, p) -> list[float]:
        return _flat(self.pts(p))


def _pattern_mask(kind: str, S: int, tf: _Pose, rng: np.random.Generator,
                  part: tuple[float, float, float, float]) -> Image.Image | None:
    """Mask of a pattern clipped to an ellipse-shaped part ``(cx, cy, rx, ry)`` in object units.

    Element sizes and spacings are absolute (object units), so a pattern looks the same on the
    body and on the smaller wing; the phase is random per image.
    """
    if kind == "plain":
        return None
    cx, cy, rx, ry = part
    mask = Image.new("L", (S, S), 0)
    md = ImageDraw.Draw(mask)
    if kind == "bars":  # across the body axis
        step, w = 0.3, 0.075
        for x0 in np.arange(cx - rx - rng.uniform(0, step), cx + rx + step, step):
            md.polygon(tf([[x0 - w, cy - ry], [x0 + w, cy - ry], [x0 + w, cy + ry], [x0 - w, cy + ry]]), fill=255)
    elif kind == "stripes":  # along the body axis
        step, w = 0.2, 0.05
        for y0 in np.arange(cy - ry - rng.uniform(0, step), cy + ry + step, step):
            md.polygon(tf([[cx - rx, y0 - w], [cx + rx, y0 - w], [cx + rx, y0 + w], [cx - rx, y0 + w]]), fill=255)
    elif kind == "spots":
        sx, sy, r = 0.3, 0.2, 0.065
        ox, oy = rng.uniform(0, sx), rng.uniform(0, sy)
        centres = []
        for j, y0 in enumerate(np.arange(cy - ry - oy, cy + ry + sy, sy)):
            for x0 in np.arange(cx - rx - ox - (sx / 2) * (j % 2), cx + rx + sx, sx):
                centres.append((x0 + rng.uniform(-0.03, 0.03), y0))
        for x, y in tf.pts(centres):
            _disc(md, x, y, r * tf.L, 255)
    else:
        raise ValueError(kind)
    region = Image.new("L", (S, S), 0)
    ImageDraw.Draw(region).polygon(tf(_ellipse(cx, cy, rx, ry)), fill=255)
    return Image.fromarray(np.minimum(np.asarray(mask), np.asarray(region)))


def render_image(
    values: tuple[int, ...], rng: np.random.Generator, nz: Nuisance | None = None
) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """Render one image of the class with attribute value indices ``values`` (h, w, p, and optionally t).

    Returns the image and the bird's box ``(x, y, width, height)`` in output pixels."""
    nz = NUISANCE if nz is None else nz
    head_name, wing_pat, breast_pat = (a.values[v] for a, v in zip(ATTRIBUTES, values[:3]))
    S = IMAGE_SIZE * _SS

    # ---- background: smooth two-colour gradient + clutter ------------------------------------
    c0, c1 = _rand_colour(rng), _rand_colour(rng)
    a = rng.uniform(0, 2 * math.pi)
    gy, gx = _grid(S)
    t = np.clip(127.5 + 255.0 * (gx * math.cos(a) + gy * math.sin(a)), 0, 255).astype(np.uint8)
    img = Image.composite(Image.new("RGB", (S, S), c1), Image.new("RGB", (S, S), c0), Image.fromarray(t, "L"))
    draw = ImageDraw.Draw(img)
    _draw_clutter(draw, rng, S, int(rng.integers(*nz.clutter)))
    for _ in range(int(rng.integers(*nz.berries))):
        x, y = rng.uniform(0.0, 1.0, size=2) * S
        _draw_berry(draw, rng, S, x, y)

    # ---- pose ---------------------------------------------------------------------------------
    L = S * nz.body_len * rng.uniform(*nz.scale)  # body half-length in pixels
    rot = math.radians(rng.uniform(-nz.rotation_deg, nz.rotation_deg))
    facing = 1.0 if rng.random() < 0.5 else -1.0  # nuisance: flip is not a class attribute
    cx = S / 2 + rng.uniform(-nz.shift, nz.shift) * S
    cy = S / 2 + rng.uniform(-nz.shift, nz.shift) * S
    tf = _Pose(L, rot, facing, cx, cy)

    # ---- proportions and colours (nuisance) ---------------------------------------------------
    aspect, hr, tail_len = rng.uniform(*nz.aspect), rng.uniform(*nz.head), rng.uniform(*nz.tail)
    b_ = 1.0 / aspect  # body half-height (half-length is 1)
    body_col = _jitter_colour(rng, (135, 110, 85), nz.body_jitter)
    dark = tuple(int(v * rng.uniform(*nz.dark)) for v in body_col)
    wing_col = tuple(int(v * rng.uniform(0.7, 0.85)) for v in body_col)
    mix = rng.uniform(*nz.pale)
    pale = _jitter_colour(rng, [mix * 225 + (1 - mix) * w for w in wing_col], 20)
    head_col = _jitter_colour(rng, HEAD_COLOURS[head_name], 25)

    # ---- bird in object units -------------------------------------------------------------------
    body = _ellipse(0, 0, 1.0, b_)
    hx, hy = 0.92, -0.75 * b_ - 0.2 * hr
    head = _ellipse(hx, hy, hr, hr)
    tl = 0.8 + tail_len
    tail = np.array([[-0.8, -0.25 * b_], [-tl + 0.05, -0.55 * b_ - 0.08], [-tl, -0.1 * b_], [-0.8, 0.3 * b_]])
    beak = np.array([[hx + 0.75 * hr, hy - 0.35 * hr], [hx + hr + 0.28, hy + 0.05 * hr],
                     [hx + 0.75 * hr, hy + 0.35 * hr]])
    wing_geo = (-0.2, -0.25 * b_, 0.62, 0.6 * b_)  # centre x, y, semi-axes
    legs = np.array([[-0.15, 0.8 * b_], [-0.2, 0.8 * b_ + 0.45], [0.2, 0.8 * b_], [0.15, 0.8 * b_ + 0.45]])

    leg_col = _jitter_colour(rng, (70, 60, 50), 20)
    leg_w = max(1, int(round(0.045 * L)))
    draw.line(tf(legs[:2]), fill=leg_col, width=leg_w)
    draw.line(tf(legs[2:]), fill=leg_col, width=leg_w)
    # the tail takes the wing colour, or the class's tail colour (an extra draw only for 4-value classes)
    tail_col = wing_col if len(values) == 3 else _jitter_colour(rng, TAIL_COLOURS[TAIL.values[values[3]]], 20)
    draw.polygon(tf(tail), fill=tail_col)
    draw.polygon(tf(body), fill=body_col)
    m = _pattern_mask(breast_pat, S, tf, rng, (0.0, 0.0, 1.0, b_))
    if m is not None:
        img.paste(dark, (0, 0, S, S), m)
    draw = ImageDraw.Draw(img)
    draw.polygon(tf(_ellipse(*wing_geo)), fill=wing_col)
    m = _pattern_mask(wing_pat, S, tf, rng, wing_geo)
    if m is not None:
        img.paste(pale, (0, 0, S, S), m)
    draw = ImageDraw.Draw(img)
    draw.polygon(tf(beak), fill=_jitter_colour(rng, (60, 55, 45), 20))
    draw.polygon(tf(head), fill=head_col)
    ex, ey = tf.pts([[hx + 0.35 * hr, hy - 0.15 * hr]])[0]
    _disc(draw, ex, ey, (0.16 * hr + 0.02) * L, (15, 15, 15))

    pts = tf.pts(np.concatenate([body, head, tail, beak, legs]))
    x0, y0 = pts.min(axis=0)
    x1, y1 = pts.max(axis=0)

    # occluding twigs in front of the bird
    for _ in range(int(rng.integers(*nz.twigs))):
        p = rng.uniform(0, S, size=4).tolist()
        draw.line(p, fill=_rand_colour(rng), width=int(rng.integers(1, 3)) * _SS)

    img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)

    # ---- photometric nuisances: lighting gradient, brightness, colour cast, noise --------------
    arr = np.asarray(img, dtype=np.float32)
    gy, gx = _grid(IMAGE_SIZE)
    la = rng.uniform(0, 2 * math.pi)
    light = 1.0 + rng.uniform(0.0, nz.gradient) * (gx * math.cos(la) + gy * math.sin(la))
    gain = (rng.uniform(*nz.brightness) * rng.uniform(*nz.cast, size=3)).astype(np.float32)
    offset = rng.uniform(-nz.offset, nz.offset, size=3).astype(np.float32)
    arr = arr * light[..., None] * gain + offset
    arr += rng.normal(0.0, rng.uniform(*nz.noise), size=arr.shape).astype(np.float32)
    out = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "RGB")

    bx0, by0 = max(0.0, x0 / _SS), max(0.0, y0 / _SS)
    bx1, by1 = min(float(IMAGE_SIZE), x1 / _SS), min(float(IMAGE_SIZE), y1 / _SS)
    return out, (bx0, by0, bx1 - bx0, by1 - by0)


# --------------------------------------------------------------------------------------------
# dataset on disk


def _image_rng(dataset_seed: int, class_index: int, image_index: int) -> np.random.Generator:
    """Independent stream per image: the output does not depend on generation order."""
    return np.random.default_rng(np.random.SeedSequence([int(dataset_seed), class_index, image_index, 0x5EED]))


def generate(root: str | Path, dataset_seed: int = 0, images_per_class: int = IMAGES_PER_CLASS,
             attributes: tuple[Attribute, ...] = ATTRIBUTES) -> Path:
    """Write the whole dataset (CUB_200_2011 layout) under ``root``; no locking, no marker
    (use ``ensure_synthetic`` for the cached, process-safe version). `LARGE_ATTRIBUTES`: 144 classes."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    classes = class_table(attributes)
    images, labels, boxes, split = [], [], [], []
    image_id = 0
    for ci, cls in enumerate(classes):
        (root / "images" / cls.dirname).mkdir(exist_ok=True)
        stem = cls.dirname.split(".", 1)[1]
        for k in range(images_per_class):
            image_id += 1
            img, (bx, by, bw, bh) = render_image(cls.values, _image_rng(dataset_seed, ci, k))
            rel = f"{cls.dirname}/{stem}_{k + 1:04d}.jpg"
            img.save(root / "images" / rel, format="JPEG", quality=JPEG_QUALITY)
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {cls.class_id}")
            boxes.append(f"{image_id} {bx:.1f} {by:.1f} {bw:.1f} {bh:.1f}")
            split.append(f"{image_id} {int(cls.is_train)}")  # ignored by the platform
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
    name = f"synthetic-v{SYNTHETIC_VERSION}-seed{int(dataset_seed)}"

    def build(tmp: Path) -> str:
        generate(tmp, dataset_seed)
        n = len(class_table()) * IMAGES_PER_CLASS
        return f"version {SYNTHETIC_VERSION}\nseed {int(dataset_seed)}\nimages {n}\n"

    return build_once(Path(cache_dir), name, build, _MARKER)[0]
