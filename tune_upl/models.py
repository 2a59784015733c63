"""Backbones, the embedding head and the class proxies.

The head is the seed's: backbone feature map -> global max pooling -> layer norm (no affine) ->
bias-free Linear(backbone_dim, feature_dim) -> L2 normalisation. Proxies live in `ProxyHead`, which turns
embeddings into cosine similarities, so every loss sees only `(similarities, labels)`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tune_upl.config import ConfigError, TrialConfig


@dataclass(frozen=True)
class Backbone:
    """A feature-map extractor and the channel count of its output."""

    module: nn.Module
    dim: int


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True), nn.MaxPool2d(2)
    )


def build_tiny(pretrained: bool) -> Backbone:
    """Four conv blocks (32-64-128-256 channels): trains in seconds on a CPU at 64 px."""
    if pretrained:
        raise ConfigError("TrialConfig.pretrained: the tiny backbone has no ImageNet weights; use none or a file")
    channels = [3, 32, 64, 128, 256]
    return Backbone(nn.Sequential(*[_conv_block(a, b) for a, b in zip(channels, channels[1:])]), channels[-1])


def build_resnet50(pretrained: bool) -> Backbone:
    """torchvision ResNet50 without its average pool and classifier (2048-d feature map)."""
    from torchvision.models import ResNet50_Weights, resnet50

    weights = ResNet50_Weights.IMAGENET1K_V1 if pretrained else None
    try:
        net = resnet50(weights=weights)
    except Exception as error:  # offline clusters: say where the file goes
        raise ConfigError(_download_help(weights.url, error)) from None
    return Backbone(nn.Sequential(*list(net.children())[:-2]), 2048)


def _download_help(url: str, error: Exception) -> str:
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    return (
        f"could not fetch ImageNet weights from {url} ({type(error).__name__}: {error}); "
        f"place the file {url.rsplit('/', 1)[-1]} in {folder} by hand, or set pretrained to none or a file path"
    )


BACKBONES: dict[str, Callable[[bool], Backbone]] = {"tiny": build_tiny, "resnet50": build_resnet50}


def load_weights_file(module: nn.Module, path: str) -> None:
    """Load a state_dict saved with torch.save into the backbone; weights_only, so no code runs."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"TrialConfig.pretrained = {path!r}: no such file; allowed: auto, none or a weights file")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ConfigError(f"TrialConfig.pretrained = {path!r}: unreadable weights file ({error})") from None
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing:
        raise ConfigError(f"TrialConfig.pretrained = {path!r}: missing keys for the backbone, e.g. {missing[:3]}")
    del unexpected  # a full classifier checkpoint carries an fc layer the backbone no longer has


class EmbeddingNet(nn.Module):
    """Backbone + pooling + layer norm + bias-free linear embedding, L2-normalised."""

    def __init__(self, backbone: Backbone, feature_dim: int, pooling: str = "max", layer_norm: bool = True):
        super().__init__()
        self.backbone = backbone.module
        self.pooling = pooling
        self.layer_norm = layer_norm
        self.embedding = nn.Linear(backbone.dim, feature_dim, bias=False)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.backbone(images)
        if self.pooling == "max":
            pooled = F.adaptive_max_pool2d(maps, 1)
        elif self.pooling == "avg":
            pooled = F.adaptive_avg_pool2d(maps, 1)
        else:  # avgmax: the sum of both, as in several proxy-loss codebases
            pooled = F.adaptive_max_pool2d(maps, 1) + F.adaptive_avg_pool2d(maps, 1)
        pooled = pooled.flatten(1)
        return F.layer_norm(pooled, pooled.shape[-1:]) if self.layer_norm else pooled

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.embedding(self.features(images)), dim=-1)


class ProxyHead(nn.Module):
    """One learnable proxy per training class; outputs cosine similarities [B, C]."""

    def __init__(self, num_classes: int, feature_dim: int):
        super().__init__()
        self.proxies = nn.Parameter(F.normalize(torch.randn(num_classes, feature_dim), dim=-1))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return embeddings @ F.normalize(self.proxies, dim=-1).t()


class MetricModel(nn.Module):
    """The embedding network and its proxies; `train()` keeps BatchNorm frozen when asked (the seed's rule)."""

    def __init__(self, net: EmbeddingNet, head: ProxyHead, freeze_bn: bool):
        super().__init__()
        self.net = net
        self.head = head
        self.freeze_bn = freeze_bn

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def train(self, mode: bool = True) -> "MetricModel":
        super().train(mode)
        if mode and self.freeze_bn:
            for module in self.net.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.net.backbone.parameters())

    def set_backbone_trainable(self, trainable: bool) -> None:
        """Warm-up: the seed freezes the backbone (requires_grad=False) for its first epochs."""
        for parameter in self.backbone_parameters():
            parameter.requires_grad_(trainable)


def build_model(cfg: TrialConfig, num_classes: int) -> MetricModel:
    """Build backbone, head and proxies from the config; seeds must be set by the caller."""
    pretrained_file = cfg.pretrained not in ("auto", "none")
    backbone = BACKBONES[cfg.backbone_type](cfg.uses_pretrained_weights and not pretrained_file)
    if pretrained_file:
        load_weights_file(backbone.module, cfg.pretrained)
    net = EmbeddingNet(backbone, cfg.feature_dim, cfg.pooling, cfg.layer_norm)
    return MetricModel(net, ProxyHead(num_classes, cfg.feature_dim), freeze_bn=cfg.bn_frozen)
