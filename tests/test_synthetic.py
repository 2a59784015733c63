"""Tests of the embedded ``synthetic`` dataset (tune_upl/synthetic.py).

The dataset is generated once per module (a few seconds).  The CNN difficulty targets are tested
elsewhere; here: layout, determinism, class split, caching/locking, and that colour statistics
alone do not identify the class.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tune_upl import synthetic as sy

INDEX_FILES = ("images.txt", "classes.txt", "image_class_labels.txt", "bounding_boxes.txt", "train_test_split.txt")


@pytest.fixture(scope="module")
def root(request, tmp_path_factory) -> Path:
    # Reuse the session-wide dataset of conftest.py when there is one (generated once per run).
    try:
        return Path(request.getfixturevalue("synthetic_root"))
    except pytest.FixtureLookupError:
        return sy.ensure_synthetic(tmp_path_factory.mktemp("cache"), dataset_seed=0)


def _rows(root: Path, name: str) -> list[list[str]]:
    return [line.split() for line in (root / name).read_text().splitlines() if line.strip()]


def _ids(rows: list[list[str]]) -> list[int]:
    return [int(r[0]) for r in rows]


def _classes(root: Path) -> dict[int, str]:
    return {int(i): d for i, d in _rows(root, "classes.txt")}


def _labels(root: Path) -> dict[int, int]:
    return {int(i): int(c) for i, c in _rows(root, "image_class_labels.txt")}


def test_root_name_and_marker(root):
    assert root.name == f"synthetic-v{sy.SYNTHETIC_VERSION}-seed0"
    assert (root / ".complete").is_file()
    for name in INDEX_FILES:
        assert (root / name).is_file(), name
    assert not list(root.parent.glob(".*.tmp-*")), "temporary folder left behind"


def test_layout_consistent(root):
    classes = _classes(root)
    n_cls = len(classes)
    assert n_cls >= 48 and n_cls % 2 == 0
    assert sorted(classes) == list(range(1, n_cls + 1))
    for cid, d in classes.items():
        assert d.startswith(f"{cid:03d}."), d
        assert (root / "images" / d).is_dir()

    images = _rows(root, "images.txt")
    n_img = len(images)
    assert _ids(images) == list(range(1, n_img + 1))
    assert all(len(r) == 2 for r in images)
    listed = {r[1] for r in images}
    assert len(listed) == n_img
    on_disk = {p.relative_to(root / "images").as_posix() for p in (root / "images").rglob("*") if p.is_file()}
    assert on_disk == listed, "every image on disk is listed and vice versa"

    labels = _labels(root)
    assert sorted(labels) == list(range(1, n_img + 1))
    per_class = {c: 0 for c in classes}
    for iid, path in images:
        cid = labels[int(iid)]
        assert path.split("/")[0] == classes[cid], "label matches the image's class folder"
        per_class[cid] += 1
    assert set(per_class.values()) == {sy.IMAGES_PER_CLASS}
    assert sy.IMAGES_PER_CLASS >= 30

    split = _rows(root, "train_test_split.txt")
    assert _ids(split) == list(range(1, n_img + 1))
    assert {r[1] for r in split} <= {"0", "1"}


def test_images_are_jpeg_and_boxes_inside(root):
    boxes = {int(r[0]): tuple(map(float, r[1:])) for r in _rows(root, "bounding_boxes.txt")}
    images = _rows(root, "images.txt")
    assert sorted(boxes) == _ids(images)
    for iid, rel in images:
        with Image.open(root / "images" / rel) as im:  # header only: cheap
            assert im.format == "JPEG"
            assert im.mode == "RGB"
            assert im.size == (sy.IMAGE_SIZE, sy.IMAGE_SIZE)
            w_img, h_img = im.size
        x, y, w, h = boxes[int(iid)]
        assert w > 5 and h > 5, "the bird is visible"
        assert 0 <= x and 0 <= y and x + w <= w_img + 1e-6 and y + h <= h_img + 1e-6
    for _, rel in images[:: len(images) // 20]:  # fully decode a sample
        with Image.open(root / "images" / rel) as im:
            im.load()
            assert np.asarray(im).std() > 10


def test_classes_match_table(root):
    table = sy.class_table()
    assert {c.class_id: c.dirname for c in table} == _classes(root)
    half = len(table) // 2
    assert [c.is_train for c in table] == [True] * half + [False] * half


def test_test_classes_are_new_combinations_of_seen_values(root):
    classes = _classes(root)
    n = len(classes)
    combos = {cid: sy.parse_class_dir(d) for cid, d in classes.items()}
    keys = {a.key for a in sy.ATTRIBUTES}
    assert all(set(c) == keys for c in combos.values())
    train = [tuple(sorted(combos[c].items())) for c in range(1, n // 2 + 1)]
    test = [tuple(sorted(combos[c].items())) for c in range(n // 2 + 1, n + 1)]
    assert len(set(train + test)) == n, "one class per combination"
    assert not set(train) & set(test)
    for k in keys:
        seen = {dict(c)[k] for c in train}
        assert {dict(c)[k] for c in test} <= seen, f"attribute {k}: test value unseen in training"
        assert len(seen) >= 3, f"attribute {k} has too few values to be fine-grained"


# What each attribute value looks like after a horizontal flip, written out here rather than read from
# synthetic.py: a colour, and bars/stripes/spots laid across or along the body axis, look the same. A new
# value fails the test below until it is added here with its mirror image.
FLIPPED = {"red": "red", "yellow": "yellow", "blue": "blue", "black": "black", "white": "white",
           "rufous": "rufous", "plain": "plain", "bars": "bars", "stripes": "stripes", "spots": "spots"}


def flip_problems(attributes: tuple[sy.Attribute, ...], flipped: dict[str, str]) -> list[str]:
    """Values whose mirror image is unknown, and classes that look different once flipped: like another
    class (flip augmentation would merge the two) or like none (a chiral value)."""
    unknown = [f"{a.name} {v!r}: mirror image unknown" for a in attributes for v in a.values if v not in flipped]
    if unknown:
        return unknown
    looks = {tuple(a.values[i] for a, i in zip(attributes, c.values)): c.dirname for c in sy.class_table(attributes)}
    return [f"{name} flipped is {looks.get(mirror, 'no class')}" for look, name in looks.items()
            if (mirror := tuple(flipped[v] for v in look)) != look]


def test_no_class_is_a_mirror_of_another():
    # Horizontal-flip augmentation must not merge classes: facing is a per-image nuisance and every
    # attribute value must look the same after a flip (bars/stripes run relative to the body axis,
    # never diagonally). Guard against someone adding chiral values, head colours included.
    for attributes in (sy.ATTRIBUTES, sy.LARGE_ATTRIBUTES):
        assert flip_problems(attributes, FLIPPED) == []
        for a in attributes:
            assert not any(w in a.name for w in ("facing", "left", "right", "diagonal")), a


def test_the_mirror_check_fails_on_a_mirrored_class_or_an_unknown_head_colour(monkeypatch):
    # The check above must be able to fail: a tiny table with diagonal wing bars of both hands.
    tiny = (sy.Attribute("h", "head colour", ("red", "blue")),
            sy.Attribute("w", "wing pattern", ("bars_slash", "bars_backslash")))
    monkeypatch.setattr(sy, "ATTRIBUTES", tiny)  # class_table accepts only its own tables
    chiral = {**FLIPPED, "bars_slash": "bars_backslash", "bars_backslash": "bars_slash"}
    assert flip_problems(tiny, chiral) == ["001.h0_w0 flipped is 003.h0_w1", "002.h1_w1 flipped is 004.h1_w0",
                                           "003.h0_w1 flipped is 001.h0_w0", "004.h1_w0 flipped is 002.h1_w1"]
    # a new head colour is not taken on trust: the table above must say what it looks like flipped
    half = (sy.Attribute("h", "head colour", ("red", "red_left_cheek")),) + tiny[1:]
    assert flip_problems(half, FLIPPED)[0] == "head colour 'red_left_cheek': mirror image unknown"


def test_deterministic_same_seed(root, tmp_path):
    again = sy.generate(tmp_path / "again", dataset_seed=0)
    for name in INDEX_FILES:
        assert (again / name).read_bytes() == (root / name).read_bytes(), name
    images = _rows(root, "images.txt")
    for _, rel in images[:: len(images) // 12]:
        assert (again / "images" / rel).read_bytes() == (root / "images" / rel).read_bytes(), rel


def test_different_seed_gives_different_images(root, tmp_path):
    other = sy.generate(tmp_path / "other", dataset_seed=1, images_per_class=2)
    assert (other / "classes.txt").read_bytes() == (root / "classes.txt").read_bytes()
    rels = [r[1] for r in _rows(other, "images.txt")]
    assert len(rels) == 2 * len(_classes(root))
    same = sum((other / "images" / r).read_bytes() == (root / "images" / r).read_bytes() for r in rels)
    assert same == 0


def test_ensure_synthetic_is_idempotent(root):
    marker = root / ".complete"
    sample = next((root / "images").rglob("*.jpg"))
    before = (marker.stat().st_mtime_ns, sample.stat().st_mtime_ns, (root / "images.txt").stat().st_mtime_ns)
    assert sy.ensure_synthetic(root.parent, dataset_seed=0) == root
    after = (marker.stat().st_mtime_ns, sample.stat().st_mtime_ns, (root / "images.txt").stat().st_mtime_ns)
    assert before == after, "second call must not regenerate"


def _fast_generate(calls: list):
    orig = sy.generate

    def gen(root, dataset_seed=0):
        calls.append(dataset_seed)
        return orig(root, dataset_seed, images_per_class=1)

    return gen


def test_half_written_folder_is_regenerated(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(sy, "generate", _fast_generate(calls))
    name = f"synthetic-v{sy.SYNTHETIC_VERSION}-seed3"
    half = tmp_path / name
    (half / "images").mkdir(parents=True)
    (half / "images.txt").write_text("1 junk/half.jpg\n")  # crashed writer, no marker
    stale = tmp_path / f".{name}.tmp-12345-deadbeef"
    stale.mkdir()

    out = sy.ensure_synthetic(tmp_path, dataset_seed=3)
    assert out == half and calls == [3]
    assert (out / ".complete").is_file()
    assert "junk" not in (out / "images.txt").read_text()
    assert len(_rows(out, "images.txt")) == len(sy.class_table())
    assert not stale.exists()
    assert sy.ensure_synthetic(tmp_path, dataset_seed=3) == out and calls == [3]


def test_concurrent_callers_generate_once(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(sy, "generate", _fast_generate(calls))
    results, errors = [], []

    def worker():
        try:
            results.append(sy.ensure_synthetic(tmp_path / "shared", dataset_seed=5))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert calls == [5], "exactly one caller generates"
    assert len(set(results)) == 1 and (results[0] / ".complete").is_file()


def _test_view(path: Path) -> np.ndarray:
    """The platform's test transform Resize(73) + CenterCrop(64), as uint8 RGB."""
    with Image.open(path) as im:
        im = im.convert("RGB").resize((73, 73), Image.Resampling.BILINEAR)
    off = int(round((73 - 64) / 2.0))
    return np.asarray(im)[off:off + 64, off:off + 64]


def _recall_at_1(feats: np.ndarray, labels: np.ndarray) -> float:
    f = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    sim = f @ f.T
    np.fill_diagonal(sim, -np.inf)  # exclude the query itself
    return float((labels[sim.argmax(axis=1)] == labels).mean())


def test_colour_histogram_knn_cannot_identify_test_classes(root):
    classes = _classes(root)
    half = len(classes) // 2
    labels = _labels(root)
    feats, ys = [], []
    for iid, rel in _rows(root, "images.txt"):
        y = labels[int(iid)]
        if y <= half:
            continue
        q = _test_view(root / "images" / rel).astype(np.int64) // 32  # 8 bins per channel
        h = np.bincount((q[..., 0] * 64 + q[..., 1] * 8 + q[..., 2]).ravel(), minlength=512)
        feats.append(h / h.sum())
        ys.append(y)
    ys = np.array(ys)
    assert len(ys) == half * sy.IMAGES_PER_CLASS
    r1 = _recall_at_1(np.array(feats, dtype=np.float64), ys)
    chance = (sy.IMAGES_PER_CLASS - 1) / (len(ys) - 1)
    assert r1 <= 0.15, f"colour histogram k-NN Recall@1 {r1:.3f}: colour alone identifies the class"
    assert r1 >= 0.5 * chance  # sanity: the computation itself is not broken


def test_recall_helper_detects_a_leak():
    # The k-NN above must be able to fail: features that carry the label give Recall@1 = 1.
    ys = np.repeat(np.arange(5), 4)
    feats = np.eye(5)[ys] + 0.01 * np.random.default_rng(0).random((20, 5))
    assert _recall_at_1(feats, ys) == 1.0


def test_the_large_table_adds_a_tail_colour_and_keeps_the_48_class_images():
    """The search benchmark's 144 classes (a fourth field mark) leave the 48-class `synthetic` set as it was:
    a change of its pixels must bump SYNTHETIC_VERSION (the cache folder name carries it)."""
    import hashlib

    large = sy.class_table(sy.LARGE_ATTRIBUTES)
    train = [c for c in large if c.is_train]
    assert len(large) == 144 and len(train) == 72 and [c.class_id for c in large] == list(range(1, 145))
    assert large[0].dirname.count("_") == 3 and set(large[0].attrs) == {"h", "w", "p", "t"}
    assert {c.values[3] for c in train} == {c.values[3] for c in large if not c.is_train} == {0, 1, 2}
    image, _ = sy.render_image((1, 2, 3), sy._image_rng(0, 5, 1))
    assert sy.SYNTHETIC_VERSION == 2
    assert hashlib.sha256(np.asarray(image).tobytes()).hexdigest()[:16] == "ebfd4ba56164c334"
    tails = [np.asarray(sy.render_image((1, 2, 3, t), sy._image_rng(0, 5, 1))[0]) for t in range(3)]
    assert not np.array_equal(tails[0], tails[1]) and not np.array_equal(tails[1], tails[2])
