"""Class-disjoint splits read through the CUB layout, and the guard on the test classes."""
import pytest

import numpy as np
import torch

from tune_upl.archives import read_cub_layout
from tune_upl.config import make_config
from tune_upl.data import ImageDataset, SplitManager, eval_transform, load_records, train_transform
from tune_upl.errors import SplitAccessError
from tune_upl.models import BNINCEPTION_MEAN, IMAGENET_MEAN, IMAGENET_STD
from tune_upl.prepare import decode_image_file


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


def test_records_come_from_the_cache_in_archive_order_with_the_source_pixels(records, synthetic_root):
    source = read_cub_layout(synthetic_root)
    assert [(r.path, r.class_id) for r in records] == [(synthetic_root / s.name, s.class_id) for s in source]
    dataset = ImageDataset(records[:3], train_transform(64))
    for i in range(3):  # 80 px images under cache_size 256: stored as decoded, never enlarged
        cached = dataset.read(i)
        assert cached.shape == (3, 80, 80) and cached.dtype == torch.uint8
        assert torch.equal(cached, decode_image_file(records[i].path))


def test_images_decode_to_normalised_tensors(records):
    train = ImageDataset(records[:8], train_transform(64))
    image, label = train[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32 and label == 0
    test = ImageDataset(records[:8], eval_transform(64))
    assert test[0][0].shape == (3, 64, 64) and abs(float(test[0][0].mean())) < 3


def test_eval_transform_scales_resize_and_crop_from_image_size():
    image = torch.randint(0, 256, (3, 300, 400), dtype=torch.uint8)
    assert eval_transform(224)(image).shape == (3, 224, 224)
    assert train_transform(96)(image).shape == (3, 96, 96)
    # 224 -> Resize(256) + CenterCrop(224): a 256-high image keeps its scale, the centre is cut out
    flat = torch.zeros(3, 256, 320, dtype=torch.uint8)
    flat[:, 16:240, 48:272] = 255  # exactly the central 224 x 224
    white = (1 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    assert np.allclose(eval_transform(224)(flat).amin(dim=(1, 2)).numpy(), white, atol=1e-4)  # no black border


def test_bn_inception_input_is_bgr_0_255_minus_its_mean():
    rgb = torch.tensor([200, 100, 50], dtype=torch.uint8).view(3, 1, 1).expand(3, 40, 40).contiguous()
    out = eval_transform(32, "inception")(rgb)
    expected = np.array([50 - BNINCEPTION_MEAN[0], 100 - BNINCEPTION_MEAN[1], 200 - BNINCEPTION_MEAN[2]])
    assert np.allclose(out.mean(dim=(1, 2)).numpy(), expected, atol=1e-3)  # B, G, R; std 1
    default = eval_transform(32)(rgb)  # any other backbone: ImageNet RGB in 0-1
    expected = (np.array([200, 100, 50]) / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    assert np.allclose(default.mean(dim=(1, 2)).numpy(), expected, atol=1e-3)
    assert train_transform(32, "inception")(rgb).shape == (3, 32, 32)
