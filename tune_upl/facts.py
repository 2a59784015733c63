"""The names and facts of every backbone, loss and dataset, without torch: one copy of each fact.

Why a module of its own: `config` validates names against these tables, and the report names things by
them, on machines and in commands that never train (`--dry-run`, a bad spec, `report` on a laptop), so
they must not load torch. The modules that build each kind (`models`, `losses`, `archives`) read their
facts from here and add only the builders; `tests/test_facts.py` checks that the two agree.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tune_upl.errors import ConfigError

# ---------------------------------------------------------------- backbones
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
TINY_CHANNELS = (3, 32, 64, 128, 256)  # the tiny CNN's four conv blocks (models.build_tiny)


CNN_TEST_RESIZE = 256 / 224  # Resize(256) + CenterCrop(224): the seed's test crop, scaled with image_size


@dataclass(frozen=True)
class BackboneFacts:
    """What is known about a backbone without building it: the width of its feature (the embedding layer's
    input), its input normalisation, where its published weights live ("" for none) and its name in reports.

    A `vit` backbone (a timm Vision Transformer, built by its timm name) gives one vector per image, its
    class token, where a `cnn` gives a feature map that `pooling` reduces. `interpolation` and `test_resize`
    (the test resize over the crop, 1 / timm's crop_pct) are the ones its weights were trained and
    evaluated with; `pretraining` names the data they saw, since ImageNet-21k overlaps CUB's classes."""

    dim: int
    input: InputNorm
    weights_url: str
    display: str
    family: str = "cnn"  # cnn | vit
    interpolation: str = "bilinear"
    test_resize: float = CNN_TEST_RESIZE
    pretraining: str = "ImageNet-1k"
    patch_size: int = 0  # a ViT's patch in pixels: image_size must be a multiple of it

    @property
    def weights_name(self) -> str:
        """The published weights file's name, as torch's hub cache stores it ("" for none)."""
        return self.weights_url.rsplit("/", 1)[-1] if self.weights_url else ""


BACKBONES: dict[str, BackboneFacts] = {
    "googlenet": BackboneFacts(1024, TORCHVISION_INPUT, "https://download.pytorch.org/models/googlenet-1378be20.pth",
                               "GoogLeNet"),
    "inception": BackboneFacts(1024, CAFFE_BGR_INPUT,
                               "http://data.lip6.fr/cadene/pretrainedmodels/bn_inception-52deb4733.pth", "Inception"),
    "resnet18": BackboneFacts(512, TORCHVISION_INPUT, "https://download.pytorch.org/models/resnet18-f37072fd.pth",
                              "ResNet18"),
    "resnet50": BackboneFacts(2048, TORCHVISION_INPUT, "https://download.pytorch.org/models/resnet50-0676ba61.pth",
                              "ResNet50"),
    "tiny": BackboneFacts(TINY_CHANNELS[-1], TORCHVISION_INPUT, "", "Tiny"),
    # timm's Vision Transformers by their timm name; URL, input, interpolation and crop from timm's pretrained
    # configuration (timm 1.0.31, `timm.models.get_pretrained_cfg(name)`; tests/test_vit.py compares them)
    "vit_small_patch16_224.dino": BackboneFacts(
        384, TORCHVISION_INPUT, "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/"
        "dino_deitsmall16_pretrain.pth", "ViT-S/16 DINO", "vit", "bicubic", 1 / 0.9,
        "ImageNet-1k, self-supervised (DINO)", 16),
    "vit_base_patch16_224.dino": BackboneFacts(
        768, TORCHVISION_INPUT, "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/"
        "dino_vitbase16_pretrain.pth", "ViT-B/16 DINO", "vit", "bicubic", 1 / 0.9,
        "ImageNet-1k, self-supervised (DINO)", 16),
    "deit_small_patch16_224.fb_in1k": BackboneFacts(
        384, TORCHVISION_INPUT, "https://dl.fbaipublicfiles.com/deit/deit_small_patch16_224-cd65a155.pth",
        "DeiT-S/16", "vit", "bicubic", 1 / 0.9, "ImageNet-1k, supervised", 16),
    "deit3_small_patch16_224.fb_in22k_ft_in1k": BackboneFacts(
        384, TORCHVISION_INPUT, "https://dl.fbaipublicfiles.com/deit/deit_3_small_224_21k.pth",
        "DeiT-III-S/16 (IN-21k)", "vit", "bicubic", 1.0,
        "ImageNet-21k, then ImageNet-1k, supervised (overlaps CUB's classes)", 16),
}


def is_vit(backbone_type: str) -> bool:
    """Whether a backbone is a Vision Transformer (one class-token vector an image, no feature map)."""
    facts = BACKBONES.get(backbone_type)
    return facts is not None and facts.family == "vit"


# Fields that mean something for one family of backbones only: config refuses them for the other family
# (a ViT has no feature map to pool and no BatchNorm; a CNN has no patch embedding).
FAMILY_FIELDS: dict[str, str] = {"pooling": "cnn", "freeze_bn": "cnn", "freeze_patch_embed": "vit"}


def imagenet_file(backbone_type: str, weights_dir: str) -> Path:
    """Where `pretrained: auto` reads a backbone's ImageNet weights: its published file name in weights_dir."""
    name = BACKBONES[backbone_type].weights_name
    if not name:
        raise ConfigError(f"TrialConfig.pretrained: the {backbone_type} backbone has no ImageNet weights; "
                          "use none or a file")
    return Path(weights_dir).expanduser() / name


# ---------------------------------------------------------------- losses
# The TrialConfig fields each loss takes, in its builder's parameter order (`losses.LOSSES`; a margin only
# where the loss has one). config refuses a loss-specific field for a loss without it.
LOSS_PARAMETERS: dict[str, tuple[str, ...]] = {
    "balanced_proxy": ("scale", "margin", "loss_anchor", "loss_aggregation"),
    "normalized_softmax": ("scale",),
    "proxy_anchor": ("scale", "margin"),
    "proxy_nca": ("scale",),
}


# ---------------------------------------------------------------- datasets
SEED_RECALLS = (1, 2, 4, 8)  # the seed's --recalls: the columns of the CUB-200-2011 and CARS196 tables


@dataclass(frozen=True)
class DatasetFacts:
    """A dataset's name in reports, whether its annotations carry bounding boxes (what `crop: cropped`
    needs), the Recall@K columns its papers report (`recalls` when a config leaves it empty), and whether its
    archive fixes the split (SOP's and In-Shop's official partitions) instead of the seed's class halves."""

    display: str
    has_boxes: bool
    recalls: tuple[int, ...] = SEED_RECALLS
    official_split: bool = False


DATASETS: dict[str, DatasetFacts] = {
    "car": DatasetFacts("CARS196", has_boxes=True),
    "cub": DatasetFacts("CUB200-2011", has_boxes=True),
    "folder": DatasetFacts("image folder", has_boxes=False),
    "inshop": DatasetFacts("In-Shop Clothes", has_boxes=False, recalls=(1, 10, 20, 30, 40, 50), official_split=True),
    "sop": DatasetFacts("Stanford Online Products", has_boxes=False, recalls=(1, 10, 100, 1000), official_split=True),
    "synthetic": DatasetFacts("synthetic", has_boxes=True),
}


def standard_recalls(data_name: str, recalls: "tuple[int, ...] | list[int]" = ()) -> tuple[int, ...]:
    """The Recall@K values a run reports: `recalls` when given, else its dataset's standard columns."""
    if recalls:
        return tuple(recalls)
    facts = DATASETS.get(data_name)
    return facts.recalls if facts is not None else SEED_RECALLS
