"""`TrialConfig`: every knob of one training run, validated once, then passed around read-only.

Configuration flows one way: spec file or command line -> `TrialConfig` -> trainable. The field names
follow the seed's `train.py` where it has one; the defaults are the seed's recipe (`RECIPE.md`) wherever
the part exists. Nothing here reads environment variables: the command line resolves them into fields.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
from typing import Any, Literal, Union

from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.dataclasses import dataclass
from typing_extensions import Annotated
from tune_upl.errors import ConfigError

Protocol = Literal["val", "seed"]
Pooling = Literal["max", "avg", "avgmax"]



def _registry_names(kind: str) -> list[str]:
    # Imported lazily: the registries live beside the code that builds each kind (one plain dict each).
    if kind == "backbone_type":
        from tune_upl.models import BACKBONES as reg
    elif kind == "loss_name":
        from tune_upl.losses import LOSSES as reg
    else:
        from tune_upl.archives import DATASETS as reg
    return sorted(reg)


@dataclass(frozen=True, config=ConfigDict(extra="forbid", validate_default=True))
class TrialConfig:
    """One training run. Departures from the seed's defaults are listed in the README."""

    # --- the seed's train.py options (same names, same defaults) ---
    data_path: str = "/home/data"  # datasets root: <data_path>/car, <data_path>/cub; folder: the image tree
    data_name: str = "car"  # registry: tune_upl.archives.DATASETS
    backbone_type: str = "resnet50"  # registry: tune_upl.models.BACKBONES
    loss_name: str = "balanced_proxy"  # registry: tune_upl.losses.LOSSES (the seed's default)
    feature_dim: Annotated[int, Field(ge=1, le=65536)] = 512
    batch_size: Annotated[int, Field(ge=2)] = 64
    num_epochs: Annotated[int, Field(ge=1)] = 20
    warm_up: Annotated[int, Field(ge=0)] = 2  # epochs with the backbone frozen
    recalls: tuple[Annotated[int, Field(ge=1)], ...] = (1, 2, 4, 8)
    # --- optimiser and loss (seed recipe: AdamP, StepLR(5, 0.5), scale 32, margin 0.1) ---
    optimizer: Literal["adamp", "adamw", "sgd"] = "adamp"
    lr: Annotated[float, Field(gt=0, le=10)] = 1e-4  # backbone and embedding layer
    proxy_lr: Annotated[float, Field(gt=0, le=100)] = 1e-2
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    lr_step: Annotated[int, Field(ge=1)] = 5  # epochs between learning-rate decays
    lr_gamma: Annotated[float, Field(gt=0, le=1)] = 0.5
    scale: Annotated[float, Field(gt=0, le=1024)] = 32.0
    margin: Annotated[float, Field(ge=-1, le=1)] = 0.1
    # --- model ---
    image_size: Annotated[int, Field(ge=16, le=1024)] = 224
    pooling: Pooling = "max"
    layer_norm: bool = True
    pretrained: str = "auto"  # auto | none | path to a state_dict file
    freeze_bn: Union[bool, Literal["auto"]] = "auto"  # auto: frozen exactly when pretrained
    # --- data and protocol ---
    protocol: Protocol = "val"
    final: bool = False  # the final stage: train on train + validation classes, test once after the last epoch
    val_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.2
    dataset_seed: Annotated[int, Field(ge=0)] = 0
    cache_dir: str = "~/.cache/tune_upl"  # the command line resolves $TUNE_UPL_CACHE into it
    crop: Literal["uncropped", "cropped"] = "uncropped"  # cropped: each image cut to its bounding box
    cache_size: Annotated[int, Field(ge=16, le=4096)] = 256  # shorter side of the prepared images (px)
    num_workers: Union[Annotated[int, Field(ge=0)], Literal["auto"]] = "auto"
    # --- execution ---
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"  # auto: bf16 (fp16 without bf16) on CUDA, off on CPU
    channels_last: Union[bool, Literal["auto"]] = "auto"  # auto: on CUDA only
    deterministic: bool = False  # true: the seed's cudnn.deterministic, no cudnn.benchmark
    compile: bool = False  # torch.compile the embedding network
    seed: Annotated[int, Field(ge=0)] = 1
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_threads: Annotated[int, Field(ge=0)] = 0  # 0: every CPU this process may use
    # --- drills: make a run fail on purpose, to test retries and reports (never in a real search) ---
    inject_fault: Literal["none", "raise", "exit", "nan", "oom"] = "none"
    fault_epoch: Annotated[int, Field(ge=1)] = 1
    fault_times: Annotated[int, Field(ge=1)] = 1  # attempts that fail; the next retry succeeds

    @field_validator("recalls", mode="before")
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
        if not value:
            raise ValueError("must list at least one k, e.g. 1,2,4,8")
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
        if self.warm_up > self.num_epochs:
            raise ValueError(
                f"warm_up={self.warm_up} exceeds num_epochs={self.num_epochs}: the backbone would never train"
            )
        return self

    # --- derived values (never stored, so they cannot disagree with the fields) ---
    @property
    def uses_pretrained_weights(self) -> bool:
        if self.pretrained == "auto":
            return self.backbone_type != "tiny"
        return self.pretrained != "none"

    @property
    def bn_frozen(self) -> bool:
        """The seed freezes BatchNorm statistics of its ImageNet backbones; from scratch they must train."""
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
PATH_FIELDS = ("data_path", "cache_dir", "pretrained")  # made absolute on the driver: trials run elsewhere
NOT_PATHS = ("auto", "none")  # pretrained's values that name no file


def is_path(name: str, value: Any) -> bool:
    """Whether `value` of field `name` is a file or folder path (to be made absolute)."""
    return name in PATH_FIELDS and isinstance(value, str) and not (name == "pretrained" and value in NOT_PATHS)


@dataclasses.dataclass(frozen=True)
class Paths:
    """The driver's paths: the defaults of data_path and cache_dir, and every path a spec or the command
    line names, made absolute once by the command line (which alone reads the home folder, the working
    directory and $TUNE_UPL_CACHE). Plain data, so an experiment keeps it and a resume plans the same
    studies; empty, it changes nothing."""

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
    try:
        return getattr(TrialConfig(**probe), name)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error)) from None


FIELD_HELP: dict[str, str] = {
    "data_path": "datasets root holding car/ and cub/; for folder, the image tree itself (seed default /home/data)",
    "data_name": "dataset: car, cub, folder (a tree <class>/<image>), or synthetic (embedded, generated into cache_dir)",
    "backbone_type": "backbone network: resnet50 (seed default) or tiny (a small CNN for CPUs)",
    "loss_name": "loss: balanced_proxy (the Unified Proxy Loss, seed default) or proxy_anchor",
    "feature_dim": "embedding dimension (seed default 512)",
    "batch_size": "training batch size (seed default 64)",
    "num_epochs": "training epochs (seed default 20)",
    "warm_up": "epochs at the start with the backbone frozen (seed default 2)",
    "recalls": "Recall@K values to report, comma-separated (seed default 1,2,4,8)",
    "optimizer": "adamp (seed), adamw or sgd (momentum 0.9); proxies always at proxy_lr",
    "lr": "learning rate of backbone and embedding layer (seed: 1e-4)",
    "proxy_lr": "learning rate of the proxies (seed: 1e-2)",
    "weight_decay": "AdamP weight decay (seed: 0)",
    "lr_step": "epochs between learning-rate decays, StepLR (seed: 5)",
    "lr_gamma": "learning-rate decay factor, StepLR (seed: 0.5)",
    "scale": "loss scale alpha (seed: 32)",
    "margin": "loss margin delta (seed: 0.1)",
    "image_size": "training and test crop size in pixels (seed: 224)",
    "pooling": "global pooling of the feature map: max (seed), avg, avgmax",
    "layer_norm": "layer norm over the pooled backbone feature, no affine (seed: true)",
    "pretrained": "backbone weights: auto (ImageNet except tiny), none, or a state_dict file",
    "freeze_bn": "keep BatchNorm statistics frozen: auto (when pretrained, as the seed), true, false",
    "protocol": "val: select on validation classes, test once at the end; seed: the seed's test-selected protocol",
    "final": "final-stage run: train on all training classes (train + validation), test once after the last epoch",
    "val_fraction": "share of the training classes held out for validation under protocol val (ours: 0.2)",
    "dataset_seed": "seed of the embedded synthetic dataset's generator (independent of seed)",
    "cache_dir": "folder for generated and prepared data (default $TUNE_UPL_CACHE, else ~/.cache/tune_upl)",
    "crop": "image variant: uncropped (seed) or cropped to the bounding boxes (cub, car, synthetic)",
    "cache_size": "shorter side in px of the prepared images; never enlarged (default 256 = the test resize at 224)",
    "num_workers": "data-loader workers: auto (min(8, threads-1)) or a number (seed: 8)",
    "seed": "training seed: numpy, torch, loader shuffling (seed: 1)",
    "device": "auto (cuda when available), cpu, cuda or cuda:N",
    "amp": "mixed precision: auto (bf16 on CUDA, fp16 where bf16 is missing; off on CPU), bf16, fp16, off",
    "channels_last": "channels-last memory format: auto (on CUDA), true, false",
    "deterministic": "cudnn deterministic and no cudnn.benchmark, as the seed (slower); false: benchmark on",
    "compile": "torch.compile the embedding network (startup cost, faster steps on a GPU)",
    "num_threads": "torch CPU threads; 0 = every CPU this process may use",
    "inject_fault": "drills and tests only: none, raise (an exception), exit (the process dies), nan (the loss "
    "diverges), oom (an out-of-memory error), at fault_epoch",
    "fault_epoch": "the epoch whose training step injects the fault",
    "fault_times": "how many attempts of a trial fail before a retry succeeds (a large number: it keeps failing)",
}
assert set(FIELD_HELP) == set(FIELD_NAMES), "every TrialConfig field is documented"
