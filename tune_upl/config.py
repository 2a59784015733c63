"""`TrialConfig`: every knob of one training run, validated once, then passed around read-only.

Configuration flows one way: spec file or command line -> `TrialConfig` -> trainable. The field names
follow the seed's `train.py` where it has one; the defaults are the seed's recipe (`RECIPE.md`) wherever
the part exists. Nothing here reads environment variables: the command line resolves them into fields.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
from typing import Any, Literal, Optional, Union

from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.dataclasses import dataclass
from typing_extensions import Annotated
from tune_upl.errors import ConfigError
from tune_upl.facts import BACKBONES, DATASETS, FAMILY_FIELDS, LOSS_PARAMETERS, is_vit, standard_recalls
from tune_upl.loss_axes import Aggregation, Anchor

Protocol = Literal["val", "seed"]
Pooling = Literal["max", "avg", "avgmax"]


def _registry_names(kind: str) -> list[str]:
    """The names a field may take: the facts' tables (torch-free; the builders agree, tests/test_facts.py)."""
    table = {"backbone_type": BACKBONES, "loss_name": LOSS_PARAMETERS, "data_name": DATASETS}[kind]
    return sorted(table)


# Fields that only some losses take (the others would drop them silently): each loss builder's parameters are
# named as these fields, listed in `facts.LOSS_PARAMETERS`.
LOSS_SPECIFIC = ("margin", "loss_anchor", "loss_aggregation")


def losses_taking(field: str) -> list[str]:
    """The losses whose builder has a parameter named `field`."""
    return sorted(name for name, params in LOSS_PARAMETERS.items() if field in params)


def loss_field_problem(loss_name: Optional[str], field: str, value: Any) -> Optional[str]:
    """Why `field = value` cannot go with `loss_name`, or None. A field at its default is no choice of the
    user's (margin's 0.1 is every config's), so it passes; so does an unknown loss (refused on its own)."""
    if field not in LOSS_SPECIFIC or loss_name is None or value == FIELD_DEFAULTS[field]:
        return None
    takers = losses_taking(field)
    if loss_name in takers or loss_name not in _registry_names("loss_name"):
        return None
    return f"loss_name {loss_name} has no {field}; the losses that take it: {', '.join(takers)}"


# Why a family-specific field (`facts.FAMILY_FIELDS`) means nothing for the other family's backbones.
_FAMILY_REASON = {
    "pooling": "a Vision Transformer's embedding is its class token: there is no feature map to pool",
    "freeze_bn": "a Vision Transformer has no BatchNorm",
    "freeze_patch_embed": "a CNN has no patch embedding",
}


def backbones_taking(field: str) -> list[str]:
    """The backbones of the family a family-specific field belongs to."""
    return sorted(name for name, facts in BACKBONES.items() if facts.family == FAMILY_FIELDS[field])


def backbone_field_problem(backbone_type: Optional[str], field: str, value: Any) -> Optional[str]:
    """Why `field = value` cannot go with `backbone_type`, or None. As for the losses' fields, a value at its
    default is no choice of the user's, so it passes; so does an unknown backbone (refused on its own)."""
    if field not in FAMILY_FIELDS or backbone_type not in BACKBONES or value == FIELD_DEFAULTS[field]:
        return None
    if BACKBONES[backbone_type].family == FAMILY_FIELDS[field]:
        return None
    return (f"backbone_type {backbone_type} takes no {field} ({_FAMILY_REASON[field]}); allowed: leave it at "
            f"{FIELD_DEFAULTS[field]!r}, or a backbone that takes it: {', '.join(backbones_taking(field))}")


@dataclass(frozen=True, config=ConfigDict(extra="forbid", validate_default=True))
class TrialConfig:
    """One training run. Departures from the seed's defaults are listed in the README."""

    # --- the seed's train.py options (same names, same defaults) ---
    data_path: Annotated[str, Field(
        description=(
            "datasets root holding car/ and cub/; for folder, the image tree itself (seed default "
            "/home/data)"
        ),
    )] = "/home/data"
    data_name: Annotated[str, Field(
        description=(
            "dataset: car, cub, sop (Stanford Online Products), inshop (In-Shop Clothes), folder (a tree "
            "<class>/<image>), or synthetic (embedded, generated into cache_dir)"
        ),
    )] = "car"
    backbone_type: Annotated[str, Field(
        description=(
            "backbone network: resnet50 (seed default), inception (BN-Inception), googlenet, resnet18, tiny (a "
            "small CNN for CPUs), or a timm Vision Transformer by its timm name: vit_small_patch16_224.dino, "
            "vit_base_patch16_224.dino, deit_small_patch16_224.fb_in1k, deit3_small_patch16_224.fb_in22k_ft_in1k "
            "(ImageNet-21k pre-training, which overlaps CUB's classes)"
        ),
    )] = "resnet50"
    loss_name: Annotated[str, Field(
        description=(
            "loss: balanced_proxy (the Unified Proxy Loss, seed default), proxy_anchor, proxy_nca or "
            "normalized_softmax"
        ),
    )] = "balanced_proxy"
    feature_dim: Annotated[int, Field(ge=1, le=65536, description="embedding dimension (seed default 512)")] = 512
    batch_size: Annotated[int, Field(ge=2, description="training batch size (seed default 64)")] = 64
    num_epochs: Annotated[int, Field(ge=1, description="training epochs (seed default 20)")] = 20
    warm_up: Annotated[int, Field(
        ge=0,
        description="epochs at the start with the backbone frozen (seed default 2)",
    )] = 2
    recalls: Annotated[tuple[Annotated[int, Field(ge=1)], ...], Field(
        description="Recall@K values to report, comma-separated; empty (the default): the dataset's standard "
                    "columns, 1,2,4,8 (the seed's) for car, cub, folder and synthetic, 1,10,100,1000 for sop, "
                    "1,10,20,30,40,50 for inshop",
    )] = ()
    # --- optimiser and loss (seed recipe: AdamP, StepLR(5, 0.5), scale 32, margin 0.1) ---
    optimizer: Annotated[Literal["adamp", "adamw", "sgd"], Field(
        description="adamp (seed; tune_upl.optim.AdamP, the package's update without host syncs), adamw or sgd "
                    "(momentum 0.9); proxies always at proxy_lr",
    )] = "adamp"
    lr: Annotated[float, Field(
        gt=0, le=10,
        description="learning rate of backbone and embedding layer (seed: 1e-4)",
    )] = 1e-4
    proxy_lr: Annotated[float, Field(gt=0, le=100, description="learning rate of the proxies (seed: 1e-2)")] = 1e-2
    weight_decay: Annotated[float, Field(ge=0, description="AdamP weight decay (seed: 0)")] = 0.0
    lr_step: Annotated[int, Field(ge=1, description="epochs between learning-rate decays, StepLR (seed: 5)")] = 5
    lr_gamma: Annotated[float, Field(gt=0, le=1, description="learning-rate decay factor, StepLR (seed: 0.5)")] = 0.5
    lr_schedule: Annotated[Literal["step", "cosine", "constant"], Field(
        description="learning-rate schedule, stepped once an epoch: step (StepLR by lr_step and lr_gamma, seed), "
                    "cosine (to zero at the last epoch) or constant",
    )] = "step"
    lr_warmup_epochs: Annotated[int, Field(
        ge=0,
        description="epochs of linear learning-rate warm-up before the schedule, every group (seed: 0)",
    )] = 0
    grad_clip: Annotated[float, Field(
        ge=0,
        description="clip the gradients' global L2 norm to this value each step; 0 = off (seed: off)",
    )] = 0.0
    freeze_patch_embed: Annotated[int, Field(
        ge=0,
        description="Vision Transformers only: epochs at the start with the patch embedding frozen; num_epochs "
                    "or more: throughout (default 0)",
    )] = 0
    scale: Annotated[float, Field(gt=0, le=1024, description="loss scale alpha (seed: 32)")] = 32.0
    margin: Annotated[float, Field(
        ge=-1, le=1,
        description="loss margin delta, for the losses with one (seed: 0.1)",
    )] = 0.1
    loss_anchor: Annotated[Optional[Anchor], Field(
        description=(
            "balanced_proxy only: what its terms anchor on, proxy (Proxy-Anchor's), sample or both; unset: the "
            "loss's own (both)"
        ),
    )] = None
    loss_aggregation: Annotated[Optional[Aggregation], Field(
        description=(
            "balanced_proxy only: how a term adds its entries, sum (Proxy-Anchor's) or mean (count-balanced); "
            "unset: the loss's own (mean)"
        ),
    )] = None
    # --- model ---
    image_size: Annotated[int, Field(
        ge=16, le=1024,
        description="training and test crop size in pixels (seed: 224)",
    )] = 224
    crop_scale: Annotated[float, Field(
        gt=0, le=1,
        description="smallest share of the image's area a training crop covers (RandomResizedCrop's scale; "
                    "seed: torchvision's 0.08)",
    )] = 0.08
    pooling: Annotated[Pooling, Field(description="global pooling of the feature map: max (seed), avg, avgmax")] = "max"
    layer_norm: Annotated[bool, Field(
        description="layer norm over the pooled backbone feature, no affine (seed: true)",
    )] = True
    pretrained: Annotated[str, Field(
        description="backbone weights: auto (ImageNet except tiny), none, or a state_dict file",
    )] = "auto"
    freeze_bn: Annotated[Union[bool, Literal["auto"]], Field(
        description="keep BatchNorm statistics frozen: auto (when pretrained, as the seed), true, false",
    )] = "auto"
    # --- data and protocol ---
    protocol: Annotated[Protocol, Field(
        description=(
            "val: select on validation classes, test once at the end; seed: the seed's test-selected "
            "protocol"
        ),
    )] = "val"
    final: Annotated[bool, Field(
        description=(
            "final-stage run: train on all training classes (train + validation), test once after the last "
            "epoch"
        ),
    )] = False
    val_fraction: Annotated[float, Field(
        gt=0, lt=1,
        description="share of the training classes held out for validation under protocol val (ours: 0.2)",
    )] = 0.2
    dataset_seed: Annotated[int, Field(
        ge=0,
        description="seed of the embedded synthetic dataset's generator (independent of seed)",
    )] = 0
    cache_dir: Annotated[str, Field(
        description="folder for generated and prepared data (default $TUNE_UPL_CACHE, else ~/.cache/tune_upl)",
    )] = "~/.cache/tune_upl"
    weights_dir: Annotated[str, Field(
        description=(
            "folder of the published ImageNet weights files that pretrained auto reads, fetched there once before "
            "any trial (default torch's hub cache: $TORCH_HOME, else $XDG_CACHE_HOME/torch, else ~/.cache/torch, "
            "+ /hub/checkpoints)"
        ),
    )] = "~/.cache/torch/hub/checkpoints"
    crop: Annotated[Literal["uncropped", "cropped"], Field(
        description="image variant: uncropped (seed) or cropped to the bounding boxes (cub, car, synthetic)",
    )] = "uncropped"
    cache_size: Annotated[int, Field(
        ge=16, le=4096,
        description=(
            "shorter side in px of the prepared images; never enlarged (default 256 = the test resize at "
            "224)"
        ),
    )] = 256
    num_workers: Annotated[Union[Annotated[int, Field(ge=0)], Literal["auto"]], Field(
        description="data-loader workers: auto (min(8, threads-1)) or a number (seed: 8)",
    )] = "auto"
    # --- execution ---
    amp: Annotated[Literal["auto", "bf16", "fp16", "off"], Field(
        description="mixed precision: auto (bf16 on CUDA, fp16 where bf16 is missing; off on CPU), bf16, fp16, off",
    )] = "auto"
    channels_last: Annotated[Union[bool, Literal["auto"]], Field(
        description="channels-last memory format: auto (on CUDA), true, false",
    )] = "auto"
    deterministic: Annotated[bool, Field(
        description="cudnn deterministic and no cudnn.benchmark, as the seed (slower); false: benchmark on",
    )] = False
    compile: Annotated[bool, Field(
        description="torch.compile the embedding network (startup cost, faster steps on a GPU)",
    )] = False
    seed: Annotated[int, Field(ge=0, description="training seed: numpy, torch, loader shuffling (seed: 1)")] = 1
    device: Annotated[str, Field(description="auto (cuda when available), cpu, cuda or cuda:N")] = "auto"
    num_threads: Annotated[int, Field(ge=0, description="torch CPU threads; 0 = every CPU this process may use")] = 0
    # --- checkpoints: when a trial saves its state (a save of resnet50 + AdamP is ~300 MB) ---
    checkpoint_every: Annotated[int, Field(
        ge=1,
        description=(
            "epochs between regular checkpoints (also at checkpoint_epochs and the last epoch); a resumed or "
            "retried trial repeats the epochs since its last one"
        ),
    )] = 5
    checkpoint_epochs: Annotated[tuple[Annotated[int, Field(ge=1)], ...], Field(
        description=(
            "more epochs to checkpoint, comma-separated: the driver sets ASHA's rung epochs, where a trial "
            "may be stopped"
        ),
    )] = ()
    checkpoint_best: Annotated[str, Field(
        pattern=r"^(none|(val|test)_(recall@[1-9][0-9]*|map@r|r_precision)(:min)?)$",
        description=(
            "protocol seed: also checkpoint every epoch that improves this metric (:min when lower is better), "
            "since retrieve loads the test-selected epoch's model; the driver sets the objective; none: off"
        ),
    )] = "test_recall@1"
    # --- drills: make a run fail on purpose, to test retries and reports (never in a real search) ---
    inject_fault: Annotated[Literal["none", "raise", "exit", "nan", "oom"], Field(
        description=(
            "drills and tests only: none, raise (an exception), exit (the process dies), nan (the loss "
            "diverges), oom (an out-of-memory error), at fault_epoch"
        ),
    )] = "none"
    fault_epoch: Annotated[int, Field(ge=1, description="the epoch whose training step injects the fault")] = 1
    fault_times: Annotated[int, Field(
        ge=1,
        description="how many attempts of a trial fail before a retry succeeds (a large number: it keeps failing)",
    )] = 1

    @field_validator("recalls", "checkpoint_epochs", mode="before")
    @classmethod
    def _parse_recalls(cls, value: Any) -> Any:
        if isinstance(value, str):  # the seed's spelling: --recalls 1,2,4,8
            try:
                return tuple(int(v) for v in value.split(",") if v.strip())
            except ValueError:
                raise ValueError("must be comma-separated positive integers, e.g. 1,2,4,8") from None
        if isinstance(value, int):
            return (value,)
        return value

    @field_validator("recalls")
    @classmethod
    def _check_recalls(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if len(set(value)) != len(value):
            raise ValueError("must not repeat a k")
        return tuple(sorted(value))

    @field_validator("data_name", "backbone_type", "loss_name")
    @classmethod
    def _check_registered(cls, value: str, info: Any) -> str:
        names = _registry_names(info.field_name)
        if value not in names:
            raise ValueError(f"unknown {info.field_name} {value!r}; allowed: {', '.join(names)}")
        return value

    @field_validator(*LOSS_SPECIFIC, *FAMILY_FIELDS)
    @classmethod
    def _check_field_fits(cls, value: Any, info: Any) -> Any:
        """A loss-specific field needs a loss that takes it, a family-specific one a backbone of that family."""
        name = info.field_name
        problem = (loss_field_problem(info.data.get("loss_name"), name, value) if name in LOSS_SPECIFIC
                   else backbone_field_problem(info.data.get("backbone_type"), name, value))
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("pretrained")
    @classmethod
    def _check_pretrained(cls, value: str) -> str:
        if not value:
            raise ValueError("must be auto, none, or the path of a weights file")
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        base, _, index = value.partition(":")
        if base not in ("auto", "cpu", "cuda") or (index and (base != "cuda" or not index.isdigit())):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return value

    @model_validator(mode="after")
    def _check_combination(self) -> "TrialConfig":
        if self.final and self.protocol != "val":
            raise ValueError("final=true belongs to protocol val (protocol seed has no final stage)")
        if not self.recalls:  # the dataset's standard columns, stored: every reader sees the same ks
            object.__setattr__(self, "recalls", standard_recalls(self.data_name))
        if self.warm_up > self.num_epochs:
            raise ValueError(
                f"warm_up={self.warm_up} exceeds num_epochs={self.num_epochs}: the backbone would never train"
            )
        if self.lr_warmup_epochs >= self.num_epochs and self.lr_schedule != "constant":
            raise ValueError(f"lr_warmup_epochs={self.lr_warmup_epochs} leaves no epoch of the {self.lr_schedule} "
                             f"schedule in num_epochs={self.num_epochs}; allowed: 0 to {self.num_epochs - 1}")
        patch = BACKBONES[self.backbone_type].patch_size
        if patch and self.image_size % patch:
            raise ValueError(f"image_size={self.image_size} is not a multiple of {self.backbone_type}'s "
                             f"{patch}-pixel patches; allowed: {patch * (self.image_size // patch)} or "
                             f"{patch * (self.image_size // patch + 1)}")
        return self

    # --- derived values (never stored, so they cannot disagree with the fields) ---
    @property
    def uses_pretrained_weights(self) -> bool:
        if self.pretrained == "auto":
            return self.backbone_type != "tiny"
        return self.pretrained != "none"

    @property
    def is_vit(self) -> bool:
        return is_vit(self.backbone_type)

    @property
    def bn_frozen(self) -> bool:
        """The seed freezes BatchNorm statistics of its ImageNet backbones; from scratch they must train. A
        ViT has none."""
        if self.is_vit:
            return False
        return self.uses_pretrained_weights if self.freeze_bn == "auto" else bool(self.freeze_bn)

    @property
    def resolved_num_threads(self) -> int:
        return self.num_threads or available_cpus()

    @property
    def resolved_num_workers(self) -> int:
        if self.num_workers != "auto":
            return int(self.num_workers)
        return min(8, max(0, self.resolved_num_threads - 1))  # seed: 8 workers; leave a core for the loop

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def replace(self, **changes: Any) -> "TrialConfig":
        return make_config({**self.to_dict(), **changes})


FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(TrialConfig))
FIELD_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(TrialConfig)}
PATH_FIELDS = ("data_path", "cache_dir", "weights_dir", "pretrained")  # made absolute on the driver: trials run elsewhere
NOT_PATHS = ("auto", "none")  # pretrained's values that name no file


def is_path(name: str, value: Any) -> bool:
    """Whether `value` of field `name` is a file or folder path (to be made absolute)."""
    return name in PATH_FIELDS and isinstance(value, str) and not (name == "pretrained" and value in NOT_PATHS)


@dataclasses.dataclass(frozen=True)
class Paths:
    """The driver's paths: the defaults of data_path, cache_dir and weights_dir, and every path a spec or
    the command line names, made absolute once by the command line (which alone reads the home folder, the
    working directory, $TUNE_UPL_CACHE and torch's cache variables). Plain data, so an experiment keeps it
    and a resume plans the same studies; empty, it changes nothing."""

    defaults: dict[str, str] = dataclasses.field(default_factory=dict)  # below the spec's own values
    absolute: dict[str, str] = dataclasses.field(default_factory=dict)  # a path as written -> absolute

    def apply(self, values: dict[str, Any]) -> dict[str, Any]:
        """`values` over the defaults, each path made absolute (one it does not know is kept as is)."""
        merged = {**self.defaults, **values}
        return {k: self.absolute.get(v, v) if is_path(k, v) else v for k, v in merged.items()}

    def to_dict(self) -> dict[str, dict[str, str]]:
        return dataclasses.asdict(self)


def available_cpus() -> int:
    """CPUs this process may run on (respects taskset/cgroups affinity, unlike os.cpu_count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def unknown_field_message(name: str, where: str = "TrialConfig") -> str:
    close = difflib.get_close_matches(name, FIELD_NAMES, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{where}: unknown field {name!r}{hint}; allowed: {', '.join(FIELD_NAMES)}"


def format_validation_error(error: ValidationError, where: str = "TrialConfig") -> str:
    """One line per problem: key path, bad value, what is allowed. No pydantic URLs."""
    lines = []
    for item in error.errors(include_url=False):
        path = ".".join(str(p) for p in item["loc"]) or "(whole config)"
        message = item["msg"].removeprefix("Value error, ")
        value = item.get("input")
        shown = f" = {value!r}" if not isinstance(value, (dict, type(None))) and item["loc"] else ""
        lines.append(f"{where}.{path}{shown}: {message}")
    return "\n".join(lines)


def make_config(values: dict[str, Any] | None = None, **overrides: Any) -> TrialConfig:
    """Build a validated `TrialConfig`, raising `ConfigError` with a precise one-line message."""
    merged = {**(values or {}), **overrides}
    for name in merged:
        if name not in FIELD_NAMES:
            raise ConfigError(unknown_field_message(name))
    try:
        return TrialConfig(**merged)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error)) from None


def validate_field(name: str, value: Any) -> Any:
    """Validate one field's value alone (used by the spec loader for fixed values and choices)."""
    if name not in FIELD_NAMES:
        raise ConfigError(unknown_field_message(name))
    # A config with only this field changed; cross-field checks are relaxed by taking a legal partner.
    probe: dict[str, Any] = {"warm_up": 0, name: value}
    if name == "warm_up" and isinstance(value, int):
        probe["num_epochs"] = max(1, value)
    if name == "lr_warmup_epochs" and isinstance(value, int):
        probe["num_epochs"] = max(1, value + 1)
    if name in FAMILY_FIELDS:  # a backbone of the family that takes it
        probe["backbone_type"] = backbones_taking(name)[0]
    try:
        return getattr(TrialConfig(**probe), name)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error)) from None


# The --help text of each option: the field descriptions above are its one source.
FIELD_HELP: dict[str, str] = {name: info.description or "" for name, info in TrialConfig.__pydantic_fields__.items()}
