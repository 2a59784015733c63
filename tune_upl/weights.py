"""ImageNet weights files, fetched once per machine before any trial starts.

Why: when each trial downloaded its own weights, dozens of trials on a node downloaded the same file at
once, and on an offline cluster every trial failed, one by one. Now the driver (and `train`, and
`prepare --backbone_type`) finds or downloads each file a search needs into `weights_dir` first, and
stops with one message naming every file it cannot get; trials only read files (`models.read_weights`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from tune_upl.atomic import build_file_once
from tune_upl.config import TrialConfig
from tune_upl.errors import WeightsMissing
from tune_upl.facts import BACKBONES, imagenet_file


@dataclass(frozen=True)
class WeightsFile:
    """One published weights file: the backbone it belongs to, where it goes, where it comes from."""

    backbone: str
    path: Path
    url: str


def needed_weights(configs: Iterable[TrialConfig]) -> list[WeightsFile]:
    """The published files that `pretrained: auto` runs of these configs read, each once (files named by
    `pretrained: PATH` are the user's, and tiny has none)."""
    files: dict[Path, WeightsFile] = {}
    for cfg in configs:
        if cfg.pretrained == "auto" and cfg.uses_pretrained_weights:
            path = imagenet_file(cfg.backbone_type, cfg.weights_dir)
            files.setdefault(path, WeightsFile(cfg.backbone_type, path, BACKBONES[cfg.backbone_type].weights_url))
    return list(files.values())


def _download(file: WeightsFile, progress: bool) -> bool:
    """Download one file unless it is there (under a lock, through a temporary name); True if downloaded now."""
    import torch.hub

    def write(tmp: Path) -> None:
        torch.hub.download_url_to_file(file.url, str(tmp), progress=progress)

    return build_file_once(file.path, write)


def ensure_weights(configs: Iterable[TrialConfig], progress: bool = True) -> list[WeightsFile]:
    """Make sure every published file these configs read is on this machine; returns those downloaded now.

    Raises one `WeightsMissing` naming every file that is neither there nor downloadable (file, URL,
    folder, and the `prepare` command to run where the URL can be reached)."""
    fetched, missing, reasons = [], [], []
    for file in needed_weights(configs):
        try:
            if _download(file, progress):
                fetched.append(file)
                print(f"downloaded the ImageNet weights of {file.backbone} to {file.path}", flush=True)
        except Exception as error:  # offline, refused, read-only folder: each is the same advice
            missing.append((file.backbone, str(file.path), file.url))
            reason = f"{type(error).__name__}: {error}"
            if reason not in reasons:
                reasons.append(reason)
    if missing:
        raise WeightsMissing(missing, "; ".join(reasons))
    return fetched
