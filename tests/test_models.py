"""Backbones and head: shapes, normalisation, BatchNorm freezing, warm-up freezing."""
import pytest
import torch

from tune_upl.config import make_config
from tune_upl.config import FIELD_HELP
from tune_upl.errors import ConfigError, WeightsMissing
from tune_upl.facts import BACKBONES, imagenet_file
from tune_upl.models import build_model


def images(*shape: int) -> torch.Tensor:
    """uint8 RGB images, as the loaders give them: the model normalises its input itself."""
    return torch.randint(0, 256, shape, dtype=torch.uint8)


def test_resnet50_without_weights_gives_feature_dim_embeddings():
    torch.manual_seed(0)
    model = build_model(make_config(backbone_type="resnet50", pretrained="none", feature_dim=128), num_classes=5)
    model.eval()
    with torch.no_grad():
        emb = model(images(2, 3, 224, 224))
        sims = model.head(emb)
    assert emb.shape == (2, 128) and sims.shape == (2, 5)
    assert torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-5)
    assert sims.abs().max() <= 1 + 1e-5
    assert model.net.embedding.bias is None and model.net.embedding.in_features == 2048


def test_frozen_batchnorm_statistics_do_not_move():
    cfg = make_config(backbone_type="tiny", freeze_bn=True, feature_dim=16)
    model = build_model(cfg, num_classes=3).train()
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    model(images(4, 3, 32, 32))
    assert not bn.training and torch.equal(before, bn.running_mean)
    free = build_model(cfg.replace(freeze_bn=False), num_classes=3).train()
    bn = next(m for m in free.modules() if isinstance(m, torch.nn.BatchNorm2d))
    free(images(4, 3, 32, 32))
    assert not torch.equal(before, bn.running_mean)


def test_pretrained_file_loads_and_bad_file_is_named(tmp_path):
    cfg = make_config(backbone_type="tiny", pretrained="none", feature_dim=16)
    source = build_model(cfg, num_classes=3)
    path = tmp_path / "tiny.pth"
    torch.save(source.net.backbone.state_dict(), path)
    loaded = build_model(cfg.replace(pretrained=str(path)), num_classes=3)
    assert all(torch.equal(a, b) for a, b in zip(source.net.backbone.parameters(), loaded.net.backbone.parameters()))
    with pytest.raises(ConfigError, match="no such file"):
        build_model(cfg.replace(pretrained=str(tmp_path / "nope.pth")), num_classes=3)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="unreadable weights file"):
        build_model(cfg.replace(pretrained=str(bad)), num_classes=3)


@pytest.mark.parametrize("name, dim", [("resnet18", 512), ("googlenet", 1024), ("inception", 1024), ("tiny", 256)])
def test_every_backbone_builds_without_weights_and_runs_forward(name, dim):
    torch.manual_seed(0)
    model = build_model(make_config(backbone_type=name, pretrained="none", feature_dim=64), num_classes=4).eval()
    with torch.no_grad():
        maps = model.net.backbone(torch.randn(2, 3, 96, 96))
        emb = model(images(2, 3, 96, 96))
    assert emb.shape == (2, 64) and model.net.embedding.in_features == dim == BACKBONES[name].dim
    assert maps.shape[1] == dim  # the registry's feature size is the feature map's channel count
    assert torch.isfinite(emb).all() and torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-5)


def test_registry_weights_are_the_libraries_published_files_and_every_name_is_documented():
    """Each entry's weights URL is the one its library would download (nothing is downloaded here), and the
    option help of backbone_type names every registered backbone, so neither can drift from the code."""
    import pretrainedmodels
    import timm
    from torchvision import models

    published = {
        **{name: timm.models.get_pretrained_cfg(name).url for name in BACKBONES if BACKBONES[name].family == "vit"},
        "googlenet": models.GoogLeNet_Weights.IMAGENET1K_V1.url,
        "inception": pretrainedmodels.pretrained_settings["bninception"]["imagenet"]["url"],
        "resnet18": models.ResNet18_Weights.IMAGENET1K_V1.url,
        "resnet50": models.ResNet50_Weights.IMAGENET1K_V1.url,
        "tiny": "",
    }
    assert {name: entry.weights_url for name, entry in BACKBONES.items()} == published
    assert all(name in FIELD_HELP["backbone_type"] for name in BACKBONES)
    assert len({entry.display for entry in BACKBONES.values()}) == len(BACKBONES)


def test_a_torchvision_weight_file_loads_by_its_own_parameter_names(tmp_path):
    from torchvision.models import resnet18

    torch.manual_seed(3)
    source = resnet18(weights=None)
    torch.save(source.state_dict(), tmp_path / "resnet18.pth")  # a classifier checkpoint, fc included
    model = build_model(make_config(backbone_type="resnet18", pretrained=str(tmp_path / "resnet18.pth")), 3)
    assert torch.equal(model.net.backbone.net.conv1.weight, source.conv1.weight)
    assert model.freeze_bn  # a pretrained backbone keeps BatchNorm frozen under freeze_bn auto


@pytest.mark.parametrize("name", ["resnet50", "inception", "googlenet"])
def test_a_missing_imagenet_file_is_named_and_never_downloaded(name, tmp_path, monkeypatch):
    """Trials never download (the driver fetches before any trial): a missing file names itself, its URL, its
    folder and the prepare command; the message holds no node-specific error."""
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_download)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _no_download)
    file = tmp_path / BACKBONES[name].weights_url.rsplit("/", 1)[-1]
    with pytest.raises(WeightsMissing) as caught:
        build_model(make_config(backbone_type=name, pretrained="auto", weights_dir=str(tmp_path)), 3)
    assert str(caught.value) == (
        f"ImageNet weights missing: {name} needs {file.name} in {tmp_path} (from {BACKBONES[name].weights_url}; or "
        f"run: python run_search.py prepare --backbone_type {name} --weights_dir {tmp_path}); or set pretrained "
        "to none or a weights file")
    assert imagenet_file(name, str(tmp_path)) == file
    with pytest.raises(ConfigError, match="the tiny backbone has no ImageNet weights"):
        imagenet_file("tiny", str(tmp_path))


def _no_download(*args, **kwargs):
    raise AssertionError("a trial downloaded weights")


def test_pooling_and_layer_norm_options_change_the_embedding():
    torch.manual_seed(0)
    batch = images(2, 3, 32, 32)
    outputs = {}
    for pooling, layer_norm in [("max", True), ("avg", True), ("avgmax", True), ("max", False)]:
        torch.manual_seed(1)  # same weights for every variant
        model = build_model(make_config(backbone_type="tiny", feature_dim=8, pooling=pooling, layer_norm=layer_norm), 3)
        with torch.no_grad():
            features = model.eval().net.features(batch)
            outputs[(pooling, layer_norm)] = features
    maxed, averaged, both = outputs[("max", True)], outputs[("avg", True)], outputs[("avgmax", True)]
    assert not torch.allclose(maxed, averaged) and not torch.allclose(maxed, both)
    assert torch.allclose(maxed.mean(dim=1), torch.zeros(2), atol=1e-5)  # layer norm centres each feature
    assert not torch.allclose(outputs[("max", False)].mean(dim=1), torch.zeros(2), atol=1e-3)
