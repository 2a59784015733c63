"""Backbones, the embedding head and the class proxies.

The head is the seed's: backbone feature map -> global max pooling -> layer norm (no affine) ->
bias-free Linear(backbone_dim, feature_dim) -> L2 normalisation. A Vision Transformer (timm) gives its class
token instead of a feature map, which takes the place of the pooled feature. Proxies live in `ProxyHead`, which
turns embeddings into cosine similarities, so every loss sees only `(similarities, labels)`.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from tune_upl.errors import ConfigError, WeightsMissing
from tune_upl.facts import (
    BACKBONES as BACKBONE_FACTS, TINY_CHANNELS, TORCHVISION_INPUT, BackboneFacts, InputNorm, imagenet_file,
)

if TYPE_CHECKING:
    from tune_upl.config import TrialConfig


@dataclass(frozen=True)
class Weights:
    """A state dict read from a weights file, with the file's name for messages."""

    state: dict[str, torch.Tensor]
    source: str

    def load_into(self, module: nn.Module, optional: tuple[str, ...] = ()) -> None:
        """Load into `module` strictly, by its own parameter names. Keys under an `optional` prefix (a
        classifier the backbone drops anyway) may be missing, or in the file only (then left out); a tensor whose
        shape differs from the model's only in size-1 dimensions (BN-Inception's published BatchNorm tensors are (1, C)) is reshaped."""
        own = module.state_dict()
        state = {}
        for key, value in self.state.items():
            if key not in own and key.startswith(optional):
                continue
            if key in own and value.shape != own[key].shape:
                if [d for d in value.shape if d != 1] != [d for d in own[key].shape if d != 1]:
                    raise ConfigError(f"weights file {self.source}: {key} has shape {tuple(value.shape)}, the "
                                      f"backbone needs {tuple(own[key].shape)}; is it this backbone's file?")
                value = value.reshape(own[key].shape)
            state[key] = value
        missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")
                   and not k.startswith(optional)]
        unexpected = [k for k in state if k not in own]
        if missing or unexpected:
            raise ConfigError(f"weights file {self.source}: {len(missing)} keys of the backbone missing (e.g. "
                              f"{missing[:3]}), {len(unexpected)} unknown (e.g. {unexpected[:3]}); "
                              "is it this backbone's file?")
        module.load_state_dict(state, strict=False)


@dataclass(frozen=True)
class BackboneEntry:
    """A backbone's builder (with the weights read from a file, or without, at the run's image size) beside
    its facts (`facts.BACKBONES`: feature width, input normalisation, published weights, report name). No
    builder downloads: `weights.py` fetches files once, in the driver, before any trial."""

    build: Callable[[Optional[Weights], int], nn.Module]
    facts: BackboneFacts


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True), nn.MaxPool2d(2)
    )


def build_tiny(weights: Optional[Weights], image_size: int = 224) -> nn.Module:
    """Four conv blocks (32-64-128-256 channels): trains in seconds on a CPU at 64 px."""
    net = nn.Sequential(*[_conv_block(a, b) for a, b in zip(TINY_CHANNELS, TINY_CHANNELS[1:])])
    if weights:
        weights.load_into(net)
    return net


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


def _resnet(name: str, weights: Optional[Weights]) -> nn.Module:
    from torchvision import models

    net = getattr(models, name)(weights=None)
    if weights:
        weights.load_into(net, optional=("fc.",))  # a classifier file carries fc; the backbone drops it
    return ResNetFeatures(net)


def build_resnet18(weights: Optional[Weights], image_size: int = 224) -> nn.Module:
    """torchvision ResNet18 (512-d feature map): a quick real backbone."""
    return _resnet("resnet18", weights)


def build_resnet50(weights: Optional[Weights], image_size: int = 224) -> nn.Module:
    """torchvision ResNet50 (2048-d feature map), the seed's default."""
    return _resnet("resnet50", weights)


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


def build_googlenet(weights: Optional[Weights], image_size: int = 224) -> nn.Module:
    """torchvision GoogLeNet built as `googlenet(weights=...)` builds it: its ImageNet weights were trained on
    input it re-normalises itself (`transform_input`), and the published file carries the auxiliary heads,
    which are dropped after loading. Without weights: no transform, no auxiliary heads."""
    from torchvision.models import googlenet

    if weights is None:
        return GoogLeNetFeatures(googlenet(weights=None, aux_logits=False, init_weights=True))
    net = googlenet(weights=None, aux_logits=True, transform_input=True, init_weights=False)
    weights.load_into(net, optional=("aux1.", "aux2.", "fc."))
    net.aux_logits, net.aux1, net.aux2 = False, None, None  # as torchvision does when aux_logits is not asked for
    return GoogLeNetFeatures(net)


class BNInceptionFeatures(nn.Module):
    """BN-Inception's convolutional trunk (1024-d); expects BGR input in 0-255 minus its mean (`InputNormalize`)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        net.last_linear = nn.Identity()  # the classifier is not part of the backbone
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x)


def build_inception(weights: Optional[Weights], image_size: int = 224) -> nn.Module:
    """BN-Inception from `pretrainedmodels`, as the seed and Proxy-Anchor use. Its published file stores the
    BatchNorm tensors as (1, C); `load_into` reshapes them, as Proxy-Anchor's code squeezes them."""
    import pretrainedmodels

    net = pretrainedmodels.bninception(num_classes=1000, pretrained=None)
    if weights:
        weights.load_into(net, optional=("last_linear.",))
    return BNInceptionFeatures(net)


def timm_filter(name: str) -> Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]]:
    """The filter timm's entry point of `name` applies to its files: `vision_transformer.checkpoint_filter_fn`
    for the `vit_*` models (pos_embed resampled to the model's grid, the patch embedding to its patch), the DeiT
    one with `adapt_layer_scale` for the `deit*` models (also DeiT-III's `gamma_1/2` renamed to LayerScale)."""
    if name.startswith("deit"):
        from timm.models.deit import checkpoint_filter_fn as deit_filter

        return partial(deit_filter, adapt_layer_scale=True)
    from timm.models.vision_transformer import checkpoint_filter_fn

    return checkpoint_filter_fn


def build_vit(name: str, weights: Optional[Weights], image_size: int) -> nn.Module:
    """A timm Vision Transformer at `image_size`, giving its class token after the final norm (`global_pool
    token`, no classifier): DINO's k-NN feature and Hyp-ViT's embedding.

    Its weights go through the filter timm's own loader applies to this model's files (so pos_embed is
    resampled to a smaller image's grid), then `Weights.load_into`, whose error names the file, the key and
    both shapes; the published classifier (`head.`, DeiT's) is dropped, as timm drops it at num_classes=0.
    tests/test_vit.py checks that this loads what timm's `pretrained_cfg_overlay=dict(file=...)` loads."""
    import timm

    model = timm.create_model(name, pretrained=False, num_classes=0, global_pool="token", img_size=image_size)
    if weights:
        try:
            state = timm_filter(name)(dict(weights.state), model)
        except Exception as error:  # a file of another model: its tensors do not fit timm's conversions
            raise ConfigError(f"weights file {weights.source}: timm could not adapt it to {name} at {image_size} "
                              f"px ({type(error).__name__}: {error}); is it this backbone's file?") from None
        Weights(state, weights.source).load_into(model, optional=("head.", "head_dist."))
    return model


BACKBONES: dict[str, BackboneEntry] = {
    "googlenet": BackboneEntry(build_googlenet, BACKBONE_FACTS["googlenet"]),
    "inception": BackboneEntry(build_inception, BACKBONE_FACTS["inception"]),
    "resnet18": BackboneEntry(build_resnet18, BACKBONE_FACTS["resnet18"]),
    "resnet50": BackboneEntry(build_resnet50, BACKBONE_FACTS["resnet50"]),
    "tiny": BackboneEntry(build_tiny, BACKBONE_FACTS["tiny"]),
    **{name: BackboneEntry(partial(build_vit, name), facts) for name, facts in BACKBONE_FACTS.items()
       if facts.family == "vit"},
}


def weights_file(cfg: TrialConfig) -> Optional[Path]:
    """The file a run's backbone weights come from, or None (pretrained none, or tiny under auto)."""
    if not cfg.uses_pretrained_weights:
        return None
    if cfg.pretrained != "auto":
        return Path(cfg.pretrained).expanduser()
    return imagenet_file(cfg.backbone_type, cfg.weights_dir)


def read_weights(cfg: TrialConfig) -> Optional[Weights]:
    """The run's weights file, read with weights_only (no code in it runs); a missing ImageNet file is the
    driver's error message (the trial never downloads), a missing own file a ConfigError."""
    file = weights_file(cfg)
    if file is None:
        return None
    if not file.is_file():
        if cfg.pretrained == "auto":
            raise WeightsMissing([(cfg.backbone_type, str(file), BACKBONE_FACTS[cfg.backbone_type].weights_url)])
        raise ConfigError(f"TrialConfig.pretrained = {cfg.pretrained!r}: no such file; "
                          "allowed: auto, none or a weights file")
    try:
        state = _read_state(file, cfg.is_vit)
    except Exception as error:
        raise ConfigError(f"TrialConfig.pretrained = {cfg.pretrained!r}: unreadable weights file {file} ({error})"
                          ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"weights file {file}: not a state dict (a mapping of names to tensors)")
    return Weights(dict(state), str(file))


def _read_state(file: Path, vit: bool) -> Any:
    """A weights file's contents, no code in it run (weights_only). A ViT's file is read as timm reads it
    (`timm.models.load_state_dict`: the `model` or `state_dict` entry of a training checkpoint, e.g. DeiT's,
    its EMA weights where it holds them, a `module.` prefix dropped)."""
    if vit:
        from timm.models import load_state_dict

        return load_state_dict(str(file), weights_only=True)
    return torch.load(file, map_location="cpu", weights_only=True)


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
        if maps.dim() == 2:  # a ViT's class token: already one vector an image
            pooled = maps
        elif self.pooling == "max":
            pooled = F.adaptive_max_pool2d(maps, 1)
        elif self.pooling == "avg":
            pooled = F.adaptive_avg_pool2d(maps, 1)
        else:  # avgmax: the sum of both, as in several proxy-loss codebases
            pooled = F.adaptive_max_pool2d(maps, 1) + F.adaptive_avg_pool2d(maps, 1)
        pooled = pooled.flatten(1)  # a no-op on a class token
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

    def freeze_patch_embedding(self) -> None:
        """A ViT's patch embedding frozen (requires_grad=False), as Hyp-ViT trains; after
        `set_backbone_trainable`, which would unfreeze it."""
        patch_embed = getattr(self.net.backbone, "patch_embed", None)
        if patch_embed is None:
            raise TypeError(f"{type(self.net.backbone).__name__} has no patch embedding")
        patch_embed.requires_grad_(False)


def build_model(cfg: TrialConfig, num_classes: int) -> MetricModel:
    """Build backbone, head and proxies from the config; seeds must be set by the caller."""
    entry = BACKBONES[cfg.backbone_type]
    backbone = entry.build(read_weights(cfg), cfg.image_size)  # library models load by their own parameter names
    net = EmbeddingNet(backbone, entry.facts.dim, cfg.feature_dim, cfg.pooling, cfg.layer_norm, entry.facts.input)
    return MetricModel(net, ProxyHead(num_classes, cfg.feature_dim), freeze_bn=cfg.bn_frozen)
