"""Class-disjoint splits read through the CUB layout, and the guard on the test classes."""
import pytest

from tune_upl.config import make_config
from tune_upl.data import (
    ImageDataset,
    SplitManager,
    SplitAccessError,
    load_records,
    read_cub_layout,
    eval_transform,
    train_transform,
)


@pytest.fixture(scope="module")
def records(tiny_values):
    return load_records(make_config(tiny_values))


def test_first_half_trains_second_half_tests(records):
    classes = sorted({r.class_id for r in records})
    splits = SplitManager(records, "val", 0.2)
    half = len(classes) // 2
    assert splits.test_classes == classes[half:]
    assert sorted(splits.train_classes + splits.val_classes) == classes[:half]
    assert len(splits.val_classes) == max(2, round(0.2 * half))
    assert not set(splits.train_classes) & set(splits.val_classes)


def test_validation_is_deterministic_and_test_independent_of_val_fraction(records):
    a, b = SplitManager(records, "val", 0.2), SplitManager(records, "val", 0.2)
    assert a.val_classes == b.val_classes
    small, large = SplitManager(records, "val", 0.05), SplitManager(records, "val", 0.5)
    assert len(small.val_classes) == 2  # at least 2
    assert small.get("test", final=True) == large.get("test", final=True) == a.get("test", final=True)


def test_test_split_only_for_final_evaluation_or_seed_protocol(records):
    splits = SplitManager(records, "val", 0.2)
    with pytest.raises(SplitAccessError, match="final evaluation only"):
        splits.get("test")
    assert len(splits.get("test", final=True)) > 0
    seed = SplitManager(records, "seed", 0.2)
    assert seed.val_classes == [] and seed.get("test") == splits.get("test", final=True)
    assert sorted(seed.train_classes) == sorted(splits.train_classes + splits.val_classes)


def test_disjointness_is_asserted_at_run_time(records):
    splits = SplitManager(records, "val", 0.2)
    splits.val_classes.append(splits.test_classes[0])  # a bug elsewhere that leaks a test class
    with pytest.raises(AssertionError, match="validation and test classes overlap"):
        splits.get("train")


def test_images_decode_to_normalised_tensors(records, synthetic_root):
    assert read_cub_layout(synthetic_root) == records
    train = ImageDataset(records[:8], train_transform(64))
    image, label = train[0]
    assert image.shape == (3, 64, 64) and label == 0
    test = ImageDataset(records[:8], eval_transform(64))
    assert test[0][0].shape == (3, 64, 64) and abs(float(test[0][0].mean())) < 3
