"""Stand-in weight files: the published file's name, layout, keys and shapes, with random values, so the
platform's loading path runs where the published file cannot be downloaded (the tests, the GPU check)."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from tune_upl.facts import BACKBONES


def write_vit_stand_in(name: str, folder: Path, seed: int = 0) -> Path:
    """A timm ViT's published file in `folder`, under its published name: DINO's a bare state dict without
    classifier, DeiT's `{"model": ...}` with the 1000-class head, DeiT-III's LayerScale as `gamma_1`/`gamma_2`
    (its published names, which timm's filter renames). Seeded random values."""
    import timm

    torch.manual_seed(seed)
    classes = timm.models.get_pretrained_cfg(name).num_classes
    state = timm.create_model(name, pretrained=False, num_classes=classes).state_dict()
    if name.startswith("deit3"):
        state = {re.sub(r"ls([12])\.gamma", r"gamma_\1", k): v for k, v in state.items()}
    path = Path(folder) / BACKBONES[name].weights_name
    torch.save({"model": state} if name.startswith("deit") else state, path)
    return path
