"""Preparing CUB-200-2011, CARS196 and image folders from archives in their official formats.

The archives are written on the fly (tests/official_formats.py): JPEGs, the CUB text files, a
cars_annos.mat saved with scipy. Checked: class counts per split, crops against the boxes, the cache's
pixels, the cache key, the messages for missing and corrupt files, interruption, and a one-trial
search on each format.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tune_upl.prepare as prep
from experiments import trial_results
from official_formats import CLASSES, HEIGHT, PER_CLASS, WIDTH, box_of, colour, make_cars, make_cub, make_folder
from tune_upl.config import make_config
from tune_upl.data import ImageDataset, SplitManager, load_records
from tune_upl.prepare import decode_image_file, entry_dir, prepare_dataset, read_manifest
from tune_upl.errors import DatasetError, SpecError

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32  # cache_size of these tests: the 64 x 48 images shrink to 42 x 32
FOLDER_NAMES = ("wren", "auk", "kite", "emu", "tern", "jay")  # sorted: auk emu jay | kite tern wren


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    """data_path with cub/ (one level down in CUB_200_2011/, as the tar extracts) and car/, plus a folder tree."""
    base = tmp_path_factory.mktemp("archives")
    make_cub(base / "data" / "cub")
    make_cars((base / "data" / "car"))
    make_folder(base / "tree", FOLDER_NAMES)
    return base


def config(archives, tmp_path, name, **values):
    data_path = archives / ("tree" if name == "folder" else "data")
    return make_config({"data_name": name, "data_path": str(data_path), "cache_dir": str(tmp_path / "cache"),
                        "cache_size": SIZE, "image_size": 28, **values})  # 28 * 256/224 = SIZE


def cached_pixels(cfg):
    records = load_records(cfg)
    dataset = ImageDataset(records, lambda image: image)
    return records, [dataset.read(i).permute(1, 2, 0).numpy() for i in range(len(records))]


@pytest.mark.parametrize("name", ["cub", "car"])
def test_first_half_of_the_class_ids_train_whatever_the_archive_flags(archives, tmp_path, name):
    cfg = config(archives, tmp_path, name)
    prepared = prepare_dataset(cfg, progress=False)
    assert (prepared.images, prepared.train_classes, prepared.test_classes) == (CLASSES * PER_CLASS, 4, 4)
    _, _, rows = read_manifest(cfg)
    per_split = {s: sorted({r.class_id for r in rows if r.split == s}) for s in ("train", "test")}
    assert per_split == {"train": [1, 2, 3, 4], "test": [5, 6, 7, 8]}  # CUB 1-100 / CARS 1-98 at full size
    assert all(sum(r.class_id == c for r in rows) == PER_CLASS for c in range(1, CLASSES + 1))
    splits = SplitManager(load_records(cfg), "val", 0.2)
    assert splits.test_classes == [5, 6, 7, 8] and len(splits.val_classes) == 2


@pytest.mark.parametrize("name", ["cub", "car"])
def test_cropped_images_are_the_boxes_and_uncropped_the_whole_image(archives, tmp_path, name):
    cropped = config(archives, tmp_path, name, crop="cropped")
    prepare_dataset(cropped, progress=False)
    records, images = cached_pixels(cropped)
    for index, (record, image) in enumerate(zip(records, images)):
        x, y, w, h = box_of(index)  # both archives number their images 0.. in class order
        assert image.shape == (h, w, 3)  # boxes under 32 px are stored as decoded, never enlarged
        source = decode_image_file(record.path).permute(1, 2, 0).numpy()
        assert np.array_equal(image, source[y:y + h, x:x + w])
        inside = image[3:-3, 3:-3].reshape(-1, 3).mean(0)  # JPEG's chroma subsampling blurs the edges
        assert np.abs(inside - colour(record.class_id)).max() < 12
    whole = config(archives, tmp_path, name)
    prepare_dataset(whole, progress=False)
    _, images = cached_pixels(whole)
    assert {im.shape for im in images} == {(SIZE, int(SIZE * WIDTH / HEIGHT), 3)}  # shorter side 32: 42 x 32


def test_folder_classes_follow_sorted_names_and_have_no_boxes(archives, tmp_path):
    cfg = config(archives, tmp_path, "folder")
    prepared = prepare_dataset(cfg, progress=False)
    assert (prepared.images, prepared.train_classes, prepared.test_classes) == (24, 3, 3)  # notes.txt ignored
    _, _, rows = read_manifest(cfg)
    train = sorted({r.image.split("/")[0] for r in rows if r.split == "train"})
    assert train == ["auk", "emu", "jay"] and {r.class_id for r in rows if r.image.startswith("wren/")} == {6}
    with pytest.raises(DatasetError, match="data_name folder has no bounding boxes; allowed crop: uncropped"):
        prepare_dataset(config(archives, tmp_path, "folder", crop="cropped"), progress=False)
    inside = make_config({**cfg.to_dict(), "cache_dir": str(archives / "tree" / ".cache")})
    with pytest.raises(DatasetError, match="lies inside the image tree"):
        prepare_dataset(inside, progress=False)


def test_large_images_shrink_to_cache_size_with_the_same_pixels_from_a_worker_pool(tmp_path):
    from PIL import Image

    for c in range(1, 5):  # 4 classes of 2 large JPEGs each (decoded in draft mode) in a folder tree
        for k in range(2):
            rng = np.random.default_rng(10 * c + k)
            pixels = np.kron(rng.integers(0, 255, (15, 20, 3)), np.ones((40, 40, 1))).astype(np.uint8)
            (tmp_path / "tree" / f"c{c}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(tmp_path / "tree" / f"c{c}" / f"{k}.jpg", quality=90)  # 800 x 600
    base = {"data_name": "folder", "data_path": str(tmp_path / "tree"), "cache_size": 96, "image_size": 84}
    alone = make_config(base, cache_dir=str(tmp_path / "a"))
    pooled = make_config(base, cache_dir=str(tmp_path / "b"))
    prepare_dataset(alone, workers=1, progress=False)
    prepare_dataset(pooled, workers=2, progress=False)
    a, b = cached_pixels(alone)[1], cached_pixels(pooled)[1]
    assert {im.shape for im in a} == {(96, 128, 3)}
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    # the 40 px squares of the source survive the shrink: the centre of a square keeps its colour
    source = decode_image_file(tmp_path / "tree" / "c1" / "0.jpg").permute(1, 2, 0).numpy().astype(int)
    assert np.abs(a[0][3, 3].astype(int) - source[20, 20]).max() < 12


def test_prepare_is_idempotent_and_keyed_by_source_variant_and_size(archives, tmp_path):
    cfg = config(archives, tmp_path, "cub")
    first = prepare_dataset(cfg, progress=False)
    pixels = first.entry / prep.PIXELS_FILE
    stamp = pixels.stat().st_mtime_ns
    again = prepare_dataset(cfg, progress=False)
    assert again.entry == first.entry and not again.built and pixels.stat().st_mtime_ns == stamp
    others = {entry_dir(cfg.replace(**change)) for change in
              ({"crop": "cropped"}, {"cache_size": 64}, {"data_name": "car"}, {"data_path": str(tmp_path)})}
    assert len(others | {first.entry}) == 5  # no two datasets or variants share an entry
    seeds = {entry_dir(make_config(data_name="synthetic", cache_dir=cfg.cache_dir, dataset_seed=s)) for s in (0, 1)}
    assert len(seeds) == 2


def test_a_changed_annotation_file_is_prepared_again(tmp_path):
    make_cub(tmp_path / "data" / "cub", classes=4, per_class=2)
    cfg = make_config(data_name="cub", data_path=str(tmp_path / "data"), cache_dir=str(tmp_path / "c"),
                      cache_size=SIZE, image_size=28)
    assert prepare_dataset(cfg, progress=False).built
    labels = tmp_path / "data" / "cub" / "CUB_200_2011" / "image_class_labels.txt"
    lines = labels.read_text().splitlines()
    labels.write_text("\n".join(lines[:-1] + [lines[-1].split()[0] + " 3"]) + "\n")  # last image relabelled 4 -> 3
    again = prepare_dataset(cfg, progress=False)
    assert again.built and [r.class_id for r in load_records(cfg)][-1] == 3
    assert sorted(p.name for p in again.entry.parent.iterdir()) == [again.entry.name, f"{again.entry.name}.lock"]
    (tmp_path / "data").rename(tmp_path / "gone")  # a prepared entry serves without its archive
    assert not prepare_dataset(cfg, progress=False).built and len(load_records(cfg)) == 8


def test_missing_files_fail_at_once_naming_the_file_and_the_command(archives, tmp_path):
    cfg = config(archives, tmp_path, "car", crop="cropped")
    with pytest.raises(DatasetError) as error:
        load_records(cfg)
    entry = entry_dir(cfg)
    assert str(error.value) == (
        f"car is not prepared: missing {entry / prep.MARKER_FILE}; run: python run_search.py prepare "
        f"--data_name car --data_path {archives / 'data'} --crop cropped --cache_size {SIZE} "
        f"--cache_dir {tmp_path / 'cache'}"
    )
    empty = make_config(data_name="car", data_path=str(tmp_path), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DatasetError, match=f"CARS196 not found: expected {tmp_path / 'car' / 'cars_annos.mat'}"):
        prepare_dataset(empty, progress=False)
    (tmp_path / "cub" / "CUB_200_2011").mkdir(parents=True)
    (tmp_path / "cub" / "CUB_200_2011" / "images.txt").write_text("1 a/b.jpg\n")
    cub = make_config(data_name="cub", data_path=str(tmp_path), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DatasetError, match="missing .*image_class_labels.txt"):
        prepare_dataset(cub, progress=False)


def test_more_than_a_few_unreadable_images_are_listed_in_one_error_and_nothing_is_kept(tmp_path):
    top = make_cub(tmp_path / "data" / "cub", classes=4, per_class=3)
    images = sorted((top / "images").rglob("*.jpg"))
    images[1].write_bytes(b"this is not a jpeg")
    images[4].write_bytes(images[4].read_bytes()[:300])  # truncated
    images[7].unlink()
    cfg = make_config(data_name="cub", data_path=str(tmp_path / "data"), cache_dir=str(tmp_path / "c"))
    with pytest.raises(DatasetError) as error:
        prepare_dataset(cfg, progress=False)
    message = str(error.value)
    assert message.startswith("3 of 12 images cannot be read (more than 5%: is the archive fully extracted?); fix "
                              "or remove them, then prepare again:")
    assert all(str(images[i]) in message for i in (1, 4, 7)) and "truncated" in message.lower()
    assert not entry_dir(cfg).exists() and not list(entry_dir(cfg).parent.glob(".*tmp*"))


def test_an_interrupted_prepare_is_never_taken_for_complete(archives, tmp_path, monkeypatch):
    cfg = config(archives, tmp_path, "cub")
    real, calls = prep.load_for_cache, []

    def interrupted(job):
        calls.append(job)
        if len(calls) == 10:
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(prep, "load_for_cache", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(cfg, progress=False)
    entry = entry_dir(cfg)
    assert not entry.exists()
    # a crash (kill -9) leaves its temporary folder, and a half-written entry has no marker
    stale = entry.parent / f".{entry.name}.tmp-1-deadbeef"
    stale.mkdir()
    (stale / prep.MANIFEST_FILE).write_text("image\n")
    entry.mkdir()
    (entry / prep.MANIFEST_FILE).write_text("image\tclass\n")
    with pytest.raises(DatasetError, match="cub is not prepared: missing .*prepared.json"):
        load_records(cfg)
    monkeypatch.setattr(prep, "load_for_cache", real)
    assert prepare_dataset(cfg, progress=False).built
    assert len(load_records(cfg)) == CLASSES * PER_CLASS and not stale.exists()


def test_dataset_fields_are_not_searchable_since_the_driver_prepares_them():
    from tune_upl.planning import plan_studies, prepare_data
    from tune_upl.spec import parse_spec

    spec = parse_spec({"name": "x", "space": {"crop": {"choice": ["uncropped", "cropped"]}}})
    with pytest.raises(SpecError, match="space.crop: the dataset is prepared before the trials start"):
        prepare_data(plan_studies(spec, {}))


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "run_search.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def test_prepare_command_uses_tune_upl_cache_and_exits_2_on_bad_input(archives, tmp_path):
    data = str(archives / "data")
    out = run_cli("prepare", "--data_name", "car", "--data-path", data, "--crop", "cropped",
                  "--cache_size", "40", env={"TUNE_UPL_CACHE": str(tmp_path / "env-cache")})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("prepared car (cropped, shorter side <= 40 px): 32 images, 4 train + 4 test classes")
    assert "100%" in out.stderr  # the progress bar
    marker = json.loads(next((tmp_path / "env-cache" / "prepared").glob("car-cropped-40-*/prepared.json")).read_text())
    assert marker["images"] == 32 and marker["key"]["source"] == str(archives / "data" / "car")
    bad = run_cli("prepare", "--data_name", "car", "--crop", "tight")
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: TrialConfig.crop = 'tight': Input should be 'uncropped' or 'cropped'"


# one search per format costs ~13 s each in the Ray group: cub in the default run (each format's reading and
# preparing is tested above in seconds), car and folder in the slow run
@pytest.mark.parametrize("name", ["cub", pytest.param("car", marks=[pytest.mark.slow, pytest.mark.ray]),
                                  pytest.param("folder", marks=[pytest.mark.slow, pytest.mark.ray])])
def test_one_trial_search_prepares_and_trains_on_each_format(ray_session, archives, tmp_path, name):
    from tune_upl.experiment import Options, run_search
    from tune_upl.spec import parse_spec

    data_path = archives / ("tree" if name == "folder" else "data")
    spec = parse_spec({
        "name": f"one-{name}", "searcher": {"type": "random", "seed": 0}, "scheduler": {"type": "fifo"},
        "num_samples": 1, "max_concurrent": 1, "baseline": False, "final_seeds": 1,
        "fixed": {"data_name": name, "data_path": str(data_path), "backbone_type": "tiny", "image_size": 32,
                  "cache_size": 40, "num_epochs": 1, "warm_up": 0, "batch_size": 8, "feature_dim": 16,
                  "num_workers": 0, "crop": "uncropped" if name == "folder" else "cropped"},
        "space": {"lr": {"loguniform": [1e-4, 1e-2]}},
    })
    cache = tmp_path / "cache"
    experiment = run_search(spec, {"cache_dir": str(cache)}, Options(storage=tmp_path / "runs"))
    assert len(list((cache / "prepared").glob(f"{name}-*-40-*/prepared.json"))) == 1  # prepared by the driver

    def results(final):
        return [row for rows in trial_results(experiment / "trials", final=final).values() for row in rows]

    trial, final = results(False), results(True)
    assert len(trial) == 1 and 0 < trial[0]["val_recall@1"] <= 1
    assert len(final) == 1 and 0 < final[0]["test_recall@1"] <= 1
