"""TrialConfig: the seed's defaults, and one precise message per bad value."""
import pytest

from tune_upl.config import FIELD_NAMES, make_config
from tune_upl.errors import ConfigError


def test_defaults_are_the_seed_recipe():
    cfg = make_config()
    assert (cfg.data_name, cfg.backbone_type, cfg.loss_name) == ("car", "resnet50", "balanced_proxy")
    assert (cfg.feature_dim, cfg.batch_size, cfg.num_epochs, cfg.warm_up) == (512, 64, 20, 2)
    assert cfg.recalls == (1, 2, 4, 8)
    assert (cfg.lr, cfg.proxy_lr, cfg.lr_step, cfg.lr_gamma) == (1e-4, 1e-2, 5, 0.5)
    assert (cfg.scale, cfg.margin, cfg.image_size, cfg.seed, cfg.pooling) == (32, 0.1, 224, 1, "max")
    assert cfg.uses_pretrained_weights and cfg.bn_frozen  # the seed: ImageNet weights, frozen BatchNorm


def test_freeze_bn_auto_follows_pretrained():
    assert not make_config(backbone_type="tiny").bn_frozen  # from scratch: BatchNorm must learn
    assert not make_config(pretrained="none").bn_frozen
    assert make_config(backbone_type="tiny", freeze_bn=True).bn_frozen


def test_command_line_strings_are_converted():
    cfg = make_config(feature_dim="128", lr="1e-3", recalls="8,1,2", layer_norm="false", freeze_bn="auto")
    assert (cfg.feature_dim, cfg.lr, cfg.recalls, cfg.layer_norm) == (128, 1e-3, (1, 2, 8), False)


@pytest.mark.parametrize(
    "values, expected",
    [
        ({"feature_dim": 0}, r"TrialConfig.feature_dim = 0: Input should be greater than or equal to 1"),
        ({"backbone_type": "vgg"}, r"backbone_type = 'vgg': unknown backbone_type 'vgg'; allowed: "
         r"deit3_small_patch16_224\.fb_in22k_ft_in1k, deit_small_patch16_224\.fb_in1k, googlenet, inception, resnet18, "
         r"resnet50, tiny, "
         r"vit_base_patch16_224\.dino, vit_small_patch16_224\.dino"),
        ({"loss_name": "x"}, r"allowed: balanced_proxy, normalized_softmax, proxy_anchor, proxy_nca"),
        ({"data_name": "imagenet"}, r"allowed: car, cub, folder, inshop, sop, synthetic"),
        ({"protocol": "test"}, r"protocol = 'test': Input should be 'val' or 'seed'"),
        ({"recalls": "1,1"}, r"recalls.*must not repeat"),
        ({"val_fraction": 1.0}, r"val_fraction = 1.0: Input should be less than 1"),
        ({"device": "tpu"}, r"device = 'tpu': must be auto, cpu, cuda or cuda:N"),
        ({"warm_up": 5, "num_epochs": 3}, r"warm_up=5 exceeds num_epochs=3"),
        ({"lrr": 1}, r"unknown field 'lrr' \(did you mean 'lr'\?\); allowed: data_path"),
    ],
)
def test_bad_values_name_field_value_and_allowed(values, expected):
    with pytest.raises(ConfigError, match=expected):
        make_config(values)


def test_config_is_frozen_and_replace_revalidates():
    cfg = make_config(backbone_type="tiny")
    with pytest.raises(Exception):
        cfg.lr = 1.0
    assert cfg.replace(lr=0.5).lr == 0.5
    with pytest.raises(ConfigError, match="lr"):
        cfg.replace(lr=-1)
    assert set(cfg.to_dict()) == set(FIELD_NAMES)
