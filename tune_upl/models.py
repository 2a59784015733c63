"""Backbones, the embedding head and the class proxies.

The head is the seed's: backbone feature map -> global max pooling -> layer norm (no affine) ->
bias-free Linear(backbone_dim, feature_dim) -> L2 normalisation. Proxies live in `ProxyHead`, which turns
embeddings into cosine similarities, so every loss sees only `(similarities, labels)`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from tune_upl.errors import ConfigError

if TYPE_CHECKING:  # config validates names against BACKBONES: the dependency runs from config to here only
    from tune_upl.config import TrialConfig


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BNINCEPTION_MEAN = (104.0, 117.0, 128.0)  # BGR order, 0-255 scale (pretrainedmodels' bninception)


@dataclass(frozen=True)
class InputNorm:
    """How uint8 RGB images become a backbone's input: the normalisation its ImageNet weights were trained with."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    unit_scale: bool = True  # divide by 255 first (torchvision); Caffe models take 0-255
    bgr: bool = False  # channels in BGR order (Caffe)


TORCHVISION_INPUT = InputNorm(IMAGENET_MEAN, IMAGENET_STD)
CAFFE_BGR_INPUT = InputNorm(BNINCEPTION_MEAN, (1.0, 1.0, 1.0), unit_scale=False, bgr=True)


@dataclass(frozen=True)
class BackboneEntry:
    """Everything the platform knows about one backbone, in one place: how to build it (with or without its
    ImageNet weights), the channels of its feature map, its input normalisation, where its published weights
    live, and its name in reports."""

    build: Callable[[bool], nn.Module]
    dim: int
    input: InputNorm
    weights_url: str  # the published ImageNet weights ("" for none)
    display: str


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True), nn.MaxPool2d(2)
    )


TINY_CHANNELS = (3, 32, 64, 128, 256)


def build_tiny(pretrained: bool) -> nn.Module:
    """Four conv blocks (32-64-128-256 channels): trains in seconds on a CPU at 64 px."""
    if pretrained:
        raise ConfigError("TrialConfig.pretrained: the tiny backbone has no ImageNet weights; use none or a file")
    return nn.Sequential(*[_conv_block(a, b) for a, b in zip(TINY_CHANNELS, TINY_CHANNELS[1:])])


def _torchvision_weights(name: str, pretrained: bool) -> Any:
    """The ImageNet weights enum of a torchvision model, or None."""
    from torchvision import models

    enum = {"resnet18": models.ResNet18_Weights, "resnet50": models.ResNet50_Weights,
            "googlenet": models.GoogLeNet_Weights}[name]
    return enum.IMAGENET1K_V1 if pretrained else None


def _fetch(build: Callable[[], nn.Module], url: str) -> nn.Module:
    """Build a model whose constructor may download weights; offline clusters get a hand-placement hint."""
    try:
        return build()
    except Exception as error:
        if isinstance(error, (ValueError, TypeError)):
            raise
        raise ConfigError(_download_help(url, error)) from None


class ResNetFeatures(nn.Module):
    """A torchvision ResNet up to layer4; keeps torchvision's parameter names so its weight files load."""

    def __init__(self, net: nn.Module):
        super().__init__()
        net.fc, net.avgpool = nn.Identity(), nn.Identity()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        for layer in (n.conv1, n.bn1, n.relu, n.maxpool, n.layer1, n.layer2, n.layer3, n.layer4):
            x = layer(x)
        return x


def _resnet(name: str, pretrained: bool) -> nn.Module:
    from torchvision import models

    weights = _torchvision_weights(name, pretrained)
    return ResNetFeatures(_fetch(lambda: getattr(models, name)(weights=weights), weights.url if weights else ""))


def build_resnet18(pretrained: bool) -> nn.Module:
    """torchvision ResNet18 (512-d feature map): a quick real backbone."""
    return _resnet("resnet18", pretrained)


def build_resnet50(pretrained: bool) -> nn.Module:
    """torchvision ResNet50 (2048-d feature map), the seed's default."""
    return _resnet("resnet50", pretrained)


class GoogLeNetFeatures(nn.Module):
    """torchvision GoogLeNet up to inception5b (1024-d), with its own input transform for ImageNet weights."""

    def __init__(self, net: nn.Module):
        super().__init__()
        net.fc, net.avgpool, net.dropout = nn.Identity(), nn.Identity(), nn.Identity()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = n._transform_input(x)
        for layer in (n.conv1, n.maxpool1, n.conv2, n.conv3, n.maxpool2, n.inception3a, n.inception3b, n.maxpool3,
                      n.inception4a, n.inception4b, n.inception4c, n.inception4d, n.inception4e, n.maxpool4,
                      n.inception5a, n.inception5b):
            x = layer(x)
        return x


def build_googlenet(pretrained: bool) -> nn.Module:
    from torchvision.models import googlenet

    weights = _torchvision_weights("googlenet", pretrained)
    net = _fetch(lambda: googlenet(weights=weights, aux_logits=False, init_weights=not pretrained),
                 weights.url if weights else "")
    return GoogLeNetFeatures(net)


class BNInceptionFeatures(nn.Module):
    """BN-Inception's convolutional trunk (1024-d); expects BGR input in 0-255 minus its mean (`InputNormalize`)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        net.last_linear = nn.Identity()  # the classifier is not part of the backbone
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x)


def build_inception(pretrained: bool) -> nn.Module:
    """BN-Inception from `pretrainedmodels` (`pretrained='imagenet'`), as the seed and Proxy-Anchor use."""
    import pretrainedmodels

    url = pretrainedmodels.pretrained_settings["bninception"]["imagenet"]["url"]
    net = _fetch(lambda: pretrainedmodels.bninception(num_classes=1000, pretrained="imagenet" if pretrained else None),
                 url)
    return BNInceptionFeatures(net)


def _download_help(url: str, error: Exception) -> str:
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    return (
        f"could not fetch ImageNet weights from {url} ({type(error).__name__}: {error}); "
        f"place the file {url.rsplit('/', 1)[-1]} in {folder} by hand, or set pretrained to none or a file path"
    )


BACKBONES: dict[str, BackboneEntry] = {
    "googlenet": BackboneEntry(build_googlenet, 1024, TORCHVISION_INPUT,
                               "https://download.pytorch.org/models/googlenet-1378be20.pth", "GoogLeNet"),
    "inception": BackboneEntry(build_inception, 1024, CAFFE_BGR_INPUT,
                               "http://data.lip6.fr/cadene/pretrainedmodels/bn_inception-52deb4733.pth", "Inception"),
    "resnet18": BackboneEntry(build_resnet18, 512, TORCHVISION_INPUT,
                              "https://download.pytorch.org/models/resnet18-f37072fd.pth", "ResNet18"),
    "resnet50": BackboneEntry(build_resnet50, 2048, TORCHVISION_INPUT,
                              "https://download.pytorch.org/models/resnet50-0676ba61.pth", "ResNet50"),
    "tiny": BackboneEntry(build_tiny, TINY_CHANNELS[-1], TORCHVISION_INPUT, "", "Tiny"),
}


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


class InputNormalize(nn.Module):
    """uint8 RGB images [B, 3, H, W] -> the backbone's float input, as its `InputNorm` says, on the images' device.

    Why in the model: the loaders then ship uint8 batches (a quarter of float32's bytes through shared memory
    and to the GPU), and every caller (training, evaluation, retrieval, the benchmarks) feeds the model the
    same kind of tensor, so none can forget or repeat the normalisation. The constants are non-persistent
    buffers: they follow `.to(device)` and stay out of checkpoints, whose keys do not change. The input's
    memory format (channels-last on a GPU) is kept."""

    def __init__(self, norm: InputNorm):
        super().__init__()
        self.bgr = norm.bgr
        scale = 255.0 if norm.unit_scale else 1.0  # (x / 255 - mean) / std == (x - 255 mean) / (255 std)
        self.register_buffer("mean", torch.tensor(norm.mean).mul(scale).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(norm.std).mul(scale).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise TypeError(f"the model takes uint8 RGB images [B, 3, H, W] (the loaders' batches) and normalises "
                            f"them itself; got {images.dtype} {list(images.shape)}")
        x = images.float()
        return ((x.flip(1) if self.bgr else x) - self.mean) / self.std


class EmbeddingNet(nn.Module):
    """Input normalisation + backbone + pooling + layer norm + bias-free linear embedding, L2-normalised.

    The backbone and the embedding layer run under the caller's autocast; the L2 normalisation runs in
    float32 with autocast off, so the cosine similarities after it are not rounded to bf16/fp16 steps."""

    def __init__(self, backbone: nn.Module, backbone_dim: int, feature_dim: int, pooling: str = "max",
                 layer_norm: bool = True, norm: InputNorm = TORCHVISION_INPUT):
        super().__init__()
        self.input_norm = InputNormalize(norm)
        self.backbone = backbone
        self.pooling = pooling
        self.layer_norm = layer_norm
        self.embedding = nn.Linear(backbone_dim, feature_dim, bias=False)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.backbone(self.input_norm(images))
        if self.pooling == "max":
            pooled = F.adaptive_max_pool2d(maps, 1)
        elif self.pooling == "avg":
            pooled = F.adaptive_avg_pool2d(maps, 1)
        else:  # avgmax: the sum of both, as in several proxy-loss codebases
            pooled = F.adaptive_max_pool2d(maps, 1) + F.adaptive_avg_pool2d(maps, 1)
        pooled = pooled.flatten(1)
        return F.layer_norm(pooled, pooled.shape[-1:]) if self.layer_norm else pooled

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.embedding(self.features(images))
        with torch.autocast(x.device.type, enabled=False):
            return F.normalize(x.float(), dim=-1)


class ProxyHead(nn.Module):
    """One learnable proxy per training class; outputs cosine similarities [B, C], always in float32 (autocast
    off): under bf16 they would reach the loss in steps of ~0.004 near +-1, a quarter logit at scale 64."""

    def __init__(self, num_classes: int, feature_dim: int):
        super().__init__()
        self.proxies = nn.Parameter(F.normalize(torch.randn(num_classes, feature_dim), dim=-1))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        with torch.autocast(embeddings.device.type, enabled=False):
            return embeddings.float() @ F.normalize(self.proxies.float(), dim=-1).t()


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
    entry = BACKBONES[cfg.backbone_type]
    backbone = entry.build(cfg.uses_pretrained_weights and not pretrained_file)
    if pretrained_file:  # library backbones wrap the library's model as `.net`, whose names weight files use
        load_weights_file(getattr(backbone, "net", backbone), cfg.pretrained)
    net = EmbeddingNet(backbone, entry.dim, cfg.feature_dim, cfg.pooling, cfg.layer_norm, entry.input)
    return MetricModel(net, ProxyHead(num_classes, cfg.feature_dim), freeze_bn=cfg.bn_frozen)
