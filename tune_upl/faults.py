"""Failures on purpose, for tests and drills: the `inject_fault` field of a `TrialConfig`.

A real search never sets it. It proves that a failing trial is retried from its last checkpoint, that
one which keeps failing is marked errored, that a diverging loss or an out-of-memory error ends only
that trial, and that a dying worker process does not take the search with it. The count of faults
already fired lives in marker files in the trial's folder, since the process that fired them may be gone.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:  # only reads a config's fields
    from tune_upl.config import TrialConfig


def fault_due(cfg: TrialConfig, epoch: int, marker_dir: Optional[Path]) -> bool:
    """True when this attempt must fail at this epoch; records the firing (at most `fault_times`)."""
    if cfg.inject_fault == "none" or epoch != cfg.fault_epoch:
        return False
    if marker_dir is None:  # outside Tune (the train command): every attempt fails
        return True
    marker_dir.mkdir(parents=True, exist_ok=True)
    fired = len(list(marker_dir.glob("fault-*.fired")))
    if fired >= cfg.fault_times:
        return False
    (marker_dir / f"fault-{fired + 1}.fired").write_text(f"{cfg.inject_fault} at epoch {epoch}, {time.time()}\n")
    return True


def fire(cfg: TrialConfig, epoch: int) -> None:
    """Raise or die as `inject_fault` says (`nan` is applied to the loss by the engine instead)."""
    where = f"(injected fault: inject_fault={cfg.inject_fault}, epoch {epoch})"
    if cfg.inject_fault == "raise":
        raise RuntimeError(f"a training step failed {where}")
    if cfg.inject_fault == "oom":
        raise torch.OutOfMemoryError(f"CUDA out of memory {where}")
    if cfg.inject_fault == "exit":
        os._exit(3)  # the worker process dies without cleanup, as when a node is lost
