"""Backbones and head: shapes, normalisation, BatchNorm freezing, warm-up freezing."""
import pytest
import torch

from tune_upl.config import ConfigError, make_config
from tune_upl.models import build_model


def test_resnet50_without_weights_gives_feature_dim_embeddings():
    torch.manual_seed(0)
    model = build_model(make_config(backbone_type="resnet50", pretrained="none", feature_dim=128), num_classes=5)
    model.eval()
    with torch.no_grad():
        emb = model(torch.randn(2, 3, 224, 224))
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
    model(torch.randn(4, 3, 32, 32))
    assert not bn.training and torch.equal(before, bn.running_mean)
    free = build_model(cfg.replace(freeze_bn=False), num_classes=3).train()
    bn = next(m for m in free.modules() if isinstance(m, torch.nn.BatchNorm2d))
    free(torch.randn(4, 3, 32, 32))
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
