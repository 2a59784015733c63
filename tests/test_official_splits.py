"""Stanford Online Products and In-Shop Clothes from fake archives in their official layouts
(tests/official_formats.py): their own partitions become the splits (SOP's two lists, In-Shop's train, query
and gallery), a damaged image is left out and listed, a partition mixing classes is refused before any image
is decoded, In-Shop's test split evaluates its queries against its gallery, and a one-trial search on each
writes a report with that dataset's Recall@K columns."""
import json
from pathlib import Path

import pytest
import torch

from experiments import trial_results
from official_formats import make_inshop, make_sop
from tune_upl.config import make_config
from tune_upl.data import SplitManager, load_records
from tune_upl.engine import query_gallery
from tune_upl.errors import DatasetError
from tune_upl.prepare import MARKER_FILE, entry_dir, prepare_dataset, read_manifest

SIZE = 32


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    """sop/ (the zip's Stanford_Online_Products/ one level down) and inshop/, each 6 + 6 classes of 4 images."""
    base = tmp_path_factory.mktemp("official") / "data"
    make_sop(base / "sop")
    make_inshop(base / "inshop")
    return base


def config(data_path, tmp_path, name, **values):
    return make_config({"data_name": name, "data_path": str(data_path), "cache_dir": str(tmp_path / "cache"),
                        "cache_size": SIZE, "image_size": 28, **values})


def test_sop_splits_by_its_two_lists_and_reports_its_own_recall_columns(data_path, tmp_path):
    cfg = config(data_path, tmp_path, "sop")
    prepared = prepare_dataset(cfg, progress=False)
    assert (prepared.images, prepared.train_classes, prepared.test_classes) == (48, 6, 6)
    marker = json.loads((prepared.entry / MARKER_FILE).read_text())
    assert marker["split_images"] == {"train": 24, "test": 24} and marker["skipped"] == []
    _, source, rows = read_manifest(cfg)
    assert source == (data_path / "sop" / "Stanford_Online_Products").resolve()
    assert {s: sorted({r.class_id for r in rows if r.split == s}) for s in ("train", "test")} == \
        {"train": [1, 2, 3, 4, 5, 6], "test": [7, 8, 9, 10, 11, 12]}
    seed = SplitManager(load_records(cfg), "seed", 0.5)
    assert (seed.train_classes, seed.test_classes) == ([1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12])
    val = SplitManager(load_records(cfg), "val", 0.5)
    assert len(val.val_classes) == 3 and set(val.val_classes) | set(val.train_classes) == set(range(1, 7))
    assert cfg.recalls == (1, 10, 100, 1000) and config(data_path, tmp_path, "sop", recalls="1,5").recalls == (1, 5)
    assert config(data_path, tmp_path, "cub").recalls == (1, 2, 4, 8)  # the seed's


def test_inshop_keeps_its_queries_and_gallery_apart_and_evaluates_queries_against_the_gallery(data_path, tmp_path):
    cfg = config(data_path, tmp_path, "inshop")
    prepared = prepare_dataset(cfg, progress=False)
    assert (prepared.images, prepared.train_classes, prepared.test_classes) == (48, 6, 6)
    marker = json.loads((prepared.entry / MARKER_FILE).read_text())
    assert marker["split_images"] == {"gallery": 12, "query": 12, "train": 24}
    splits = SplitManager(load_records(cfg), "val", 0.5)
    test = splits.get("test", final=True)
    assert len(test) == 24 and {r.class_id for r in test} == {3 * n + 2 for n in range(6, 12)}
    queries, gallery = query_gallery(test, torch.device("cpu"))
    assert [test[i].split for i in queries.tolist()] == ["query"] * 12
    assert [test[i].split for i in gallery.tolist()] == ["gallery"] * 12
    assert query_gallery(splits.get("val"), torch.device("cpu")) is None  # validation: every image against the rest
    assert cfg.recalls == (1, 10, 20, 30, 40, 50)


def test_a_damaged_image_is_left_out_and_listed_not_fatal(tmp_path):
    top = make_sop(tmp_path / "data" / "sop")
    broken = sorted(top.rglob("*.JPG"))[5]
    broken.write_bytes(broken.read_bytes()[:200])  # truncated
    cfg = make_config(data_name="sop", data_path=str(tmp_path / "data"), cache_dir=str(tmp_path / "c"),
                      cache_size=SIZE)
    prepared = prepare_dataset(cfg, progress=False)
    assert prepared.images == 47 and len(prepared.skipped) == 1 and str(broken) in prepared.skipped[0]
    assert f"1 damaged image(s) left out, listed in {prepared.entry / MARKER_FILE}" in prepared.summary(cfg)
    _, _, rows = read_manifest(cfg)
    assert len(rows) == 47 and broken.name not in {Path(r.image).name for r in rows}


def test_a_partition_that_puts_one_class_in_train_and_test_is_refused_before_decoding(tmp_path):
    top = make_inshop(tmp_path / "data" / "inshop")
    partition = top / "Eval" / "list_eval_partition.txt"
    lines = partition.read_text().splitlines()
    lines[2] = lines[2].replace("train", "query")  # item 2's first image becomes a test query
    partition.write_text("\n".join(lines) + "\n")
    cfg = make_config(data_name="inshop", data_path=str(tmp_path / "data"), cache_dir=str(tmp_path / "c"))
    with pytest.raises(DatasetError, match=r"1 classes have both training and test images \(e.g. class 2\)"):
        prepare_dataset(cfg, progress=False)
    assert not entry_dir(cfg).exists()


@pytest.mark.parametrize("name, damage, message", [
    ("sop", ("Ebay_train.txt", 0, "id class super path"), r"Ebay_train.txt line 1: expected the header"),
    ("sop", ("Ebay_test.txt", 3, "3 x 1 a.JPG"), r"Ebay_test.txt line 4: expected image_id class_id"),
    ("inshop", ("Eval/list_eval_partition.txt", 0, "47"), r"line 1 counts 47 images, the file lists 48"),
    ("inshop", ("Eval/list_eval_partition.txt", 5, "img/a.jpg id_00000002 test"),
     r"line 6: expected image_name item_id \(id_NNNNNNNN\) and one of train, query, gallery"),
])
def test_a_malformed_list_is_one_error_naming_file_and_line(tmp_path, name, damage, message):
    top = (make_sop if name == "sop" else make_inshop)(tmp_path / "data" / name)
    path = top / damage[0]
    lines = path.read_text().splitlines()
    lines[damage[1]] = damage[2]
    path.write_text("\n".join(lines) + "\n")
    cfg = make_config(data_name=name, data_path=str(tmp_path / "data"), cache_dir=str(tmp_path / "c"))
    with pytest.raises(DatasetError, match=message):
        prepare_dataset(cfg, progress=False)


def test_a_missing_archive_names_every_place_looked_for(tmp_path):
    cfg = make_config(data_name="inshop", data_path=str(tmp_path), cache_dir=str(tmp_path / "c"))
    with pytest.raises(DatasetError) as error:
        prepare_dataset(cfg, progress=False)
    assert str(error.value).startswith(f"In-Shop Clothes not found: expected "
                                       f"{tmp_path / 'inshop' / 'Eval/list_eval_partition.txt'} or "
                                       f"{tmp_path / 'Inshop_Clothes' / 'Eval/list_eval_partition.txt'}")


# a search each (~13 s in the Ray group): In-Shop, whose test is queries against a gallery, in the default run
@pytest.mark.parametrize("name, columns", [
    ("inshop", (1, 10, 20, 30, 40, 50)),
    pytest.param("sop", (1, 10, 100, 1000), marks=[pytest.mark.slow, pytest.mark.ray]),
])
def test_one_trial_search_reports_the_datasets_own_recall_columns(ray_session, data_path, tmp_path, name, columns):
    from tune_upl.experiment import Options, run_search
    from tune_upl.report import write_report
    from tune_upl.spec import parse_spec

    spec = parse_spec({
        "name": f"one-{name}", "searcher": {"type": "random", "seed": 0}, "scheduler": {"type": "fifo"},
        "num_samples": 1, "max_concurrent": 1, "baseline": False, "final_seeds": 1,
        "fixed": {"data_name": name, "data_path": str(data_path), "backbone_type": "tiny", "image_size": 32,
                  "cache_size": 40, "num_epochs": 1, "warm_up": 0, "batch_size": 8, "feature_dim": 16,
                  "num_workers": 0},
        "space": {"lr": {"loguniform": [1e-4, 1e-2]}},
    })
    experiment = run_search(spec, {"cache_dir": str(tmp_path / "cache")}, Options(storage=tmp_path / "runs"))
    (trial,) = [row for rows in trial_results(experiment / "trials", final=False).values() for row in rows]
    (final,) = [row for rows in trial_results(experiment / "trials", final=True).values() for row in rows]
    assert all(0 <= trial[f"val_recall@{k}"] <= 1 for k in columns) and "val_recall@2" not in trial
    assert all(0 <= final[f"test_recall@{k}"] <= 1 for k in columns)
    assert final["test_recall@1"] <= final[f"test_recall@{columns[-1]}"] == 1.0  # 12 candidates at most
    report = write_report(experiment, tmp_path / "reports").read_text()
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in report.splitlines() if line.startswith("|")]
    header = next(row for row in rows if row[:3] == ["Backbone", "Loss", "Dim"])
    assert header[3:3 + len(columns) + 1] == [*(f"R@{k}" for k in columns), "Runs"], header


def test_an_objective_the_datasets_recall_columns_lack_is_refused_before_ray(tmp_path):
    """SOP reports Recall@1,10,100,1000: a spec selecting on val_recall@2 there would never see its objective.
    `--dry-run` (no Ray) refuses it in one line, exit 2; naming recalls under fixed makes it valid."""
    import subprocess
    import sys

    import yaml

    spec = {"name": "sop-r2", "objective": {"metric": "val_recall@2"}, "fixed": {"data_name": "sop"},
            "space": {"lr": {"loguniform": [1.0e-4, 1.0e-2]}}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "run_search.py", "--space", str(path), "--dry-run"], cwd=root,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.strip() == ("error: objective.metric = 'val_recall@2': study main reports Recall@1,10,100,1000 "
                                  "(data_name sop's Recall@K columns); allowed: one of those, or recalls under fixed "
                                  "including 2")
    path.write_text(yaml.safe_dump({**spec, "fixed": {"data_name": "sop", "recalls": "1,2,10"}}))
    fine = subprocess.run([sys.executable, "run_search.py", "--space", str(path), "--dry-run"], cwd=root,
                          capture_output=True, text=True, timeout=120)
    assert fine.returncode == 0 and "study main" not in fine.stderr, fine.stderr
