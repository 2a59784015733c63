"""Class-disjoint splits read through the CUB layout, and the guard on the test classes."""
import warnings

import pytest
import torch
from fake_cuda import fake_cuda
from torchvision.transforms import v2

from tune_upl.archives import read_cub_layout
from tune_upl.config import make_config
from tune_upl.data import ImageDataset, SplitManager, eval_transform, load_records, make_loader, train_transform
from tune_upl.errors import SplitAccessError
from tune_upl.facts import BACKBONES, BNINCEPTION_MEAN, IMAGENET_MEAN, IMAGENET_STD
from tune_upl.models import build_model
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


def test_images_decode_to_uint8_tensors(records):
    train = ImageDataset(records[:8], train_transform(64))
    image, label = train[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.uint8 and label == 0
    test = ImageDataset(records[:8], eval_transform(64))
    assert test[0][0].shape == (3, 64, 64) and test[0][0].dtype == torch.uint8


def test_loader_batches_are_uint8_a_quarter_of_float32s_bytes(tiny_values, records):
    cfg = make_config(tiny_values, batch_size=8)
    images, labels = next(iter(make_loader(ImageDataset(records[:16], train_transform(64)), cfg, train=True)))
    assert images.shape == (8, 3, 64, 64) and images.dtype == torch.uint8 and labels.shape == (8,)
    as_float = images.float()
    assert images.nbytes == 8 * 3 * 64 * 64 == as_float.nbytes // 4


def test_eval_transform_scales_resize_and_crop_from_image_size():
    image = torch.randint(0, 256, (3, 300, 400), dtype=torch.uint8)
    assert eval_transform(224)(image).shape == (3, 224, 224)
    assert train_transform(96)(image).shape == (3, 96, 96)
    # 224 -> Resize(256) + CenterCrop(224): a 256-high image keeps its scale, the centre is cut out
    flat = torch.zeros(3, 256, 320, dtype=torch.uint8)
    flat[:, 16:240, 48:272] = 255  # exactly the central 224 x 224
    assert int(eval_transform(224)(flat).min()) == 255  # no black border


def old_float_pipeline(image: torch.Tensor, norm) -> torch.Tensor:
    """The loaders' former last steps (ToDtype + BGR flip + Normalize, on the CPU), for comparison."""
    x = v2.ToDtype(torch.float32, scale=norm.unit_scale)(image)
    return v2.Normalize(norm.mean, norm.std)(x.flip(-3) if norm.bgr else x)


@pytest.mark.parametrize("backbone", ["resnet18", "inception"])
def test_the_model_normalises_uint8_input_as_the_old_float_pipeline_did(backbone):
    """torchvision: RGB (x / 255 - mean) / std; BN-Inception: BGR, 0-255, minus its mean. On the model's own
    device, in float32; the uint8 batch's memory format (channels-last on a GPU) is kept."""
    batch = torch.randint(0, 256, (4, 3, 20, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    net = build_model(make_config(backbone_type=backbone, pretrained="none", feature_dim=8), 3).net
    out = net.input_norm(batch)
    x = batch.double()
    if backbone == "inception":
        direct = x.flip(1) - torch.tensor(BNINCEPTION_MEAN, dtype=torch.double).view(1, 3, 1, 1)
    else:
        mean, std = (torch.tensor(v, dtype=torch.double).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
        direct = (x / 255 - mean) / std
    assert out.dtype == torch.float32
    assert torch.allclose(out.double(), direct, atol=1e-5, rtol=0)
    old = torch.stack([old_float_pipeline(image, BACKBONES[backbone].input) for image in batch])
    assert torch.allclose(out, old, atol=1e-5, rtol=0)
    last = net.input_norm(batch.contiguous(memory_format=torch.channels_last))
    assert last.is_contiguous(memory_format=torch.channels_last) and torch.equal(last, out)
    assert "input_norm.mean" not in net.state_dict()  # checkpoints keep their keys
    with pytest.raises(TypeError, match="takes uint8 RGB images"):
        net(batch.float())


def test_a_gpu_trial_without_loader_workers_warns_once_with_the_fix(tiny_values, records):
    """`resources.cpu: 1` gives num_threads 1, so `num_workers: auto` resolves to 0: on a GPU the decoding then
    runs in series with every step. The GPU is the CUDA stand-in beneath torch (no tensor moves)."""
    dataset = ImageDataset(records[:8], eval_transform(32))
    one_cpu = make_config(tiny_values, num_workers="auto", num_threads=1)
    assert one_cpu.resolved_num_workers == 0
    with fake_cuda():
        with pytest.warns(UserWarning) as caught:
            assert make_loader(dataset, one_cpu, train=True).pin_memory
            make_loader(dataset, one_cpu, train=False)  # the evaluation loader of the same trial: no second warning
        assert len(caught) == 1
        assert "0 loader workers" in str(caught[0].message) and "resources.cpu >= 2" in str(caught[0].message)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            make_loader(dataset, make_config(tiny_values, num_workers="auto", num_threads=2), train=True)
            cpu = make_loader(dataset, make_config(tiny_values, device="cpu", num_workers=0), train=True)
            assert not cpu.pin_memory
    with fake_cuda(physical=0), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not make_loader(dataset, one_cpu, train=True).pin_memory  # auto device without a GPU: no warning


def test_the_driver_warns_before_any_trial_when_gpu_trials_get_no_loader_worker():
    """A trial's own warning reaches only its Ray worker's log; the driver says it once per study, up front."""
    from searches import small_demo
    from tune_upl.planning import plan_studies, serial_loading

    def warned(**resources):
        spec = small_demo().model_copy(update={"resources": small_demo().resources.model_copy(update=resources)})
        return serial_loading(spec, plan_studies(spec, {"cache_dir": "/x"}))

    assert len(warned(cpu=1, gpu=0.5)) == 1 and "0 loader workers (resources.cpu 1" in warned(cpu=1, gpu=0.5)[0]
    assert "give resources.cpu >= 2" in warned(cpu=1, gpu=1)[0]
    assert warned(cpu=2, gpu=0.5) == [] and warned(cpu=1, gpu=0) == []  # a worker, or CPU trials
