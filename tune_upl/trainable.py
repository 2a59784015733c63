"""The Ray Tune function trainable: one trial = one `TrialConfig` trained epoch by epoch.

After every epoch it reports the epoch's metrics with a checkpoint (model, optimiser, scheduler, epoch,
RNG states); when Tune restarts the trial (a failure, or a resumed search) it continues at the next
epoch from `ray.tune.get_checkpoint()`. Only the Tune API from `ray.tune` is used (in Ray 2.60
`ray.train.report` raises inside a Tune trial). The data were prepared by the driver; a trial only reads.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from ray import tune

from tune_upl.config import make_config
from tune_upl.engine import build_run, load_state, save_state, train_epoch

CHECKPOINT_FILE = "state.pt"


def train_trial(config: dict[str, Any]) -> None:
    """Ray Tune entry point; `config` holds every TrialConfig field (fixed values and sampled ones)."""
    cfg = make_config(config)
    run = build_run(cfg)
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            run.load_state_dict(load_state(Path(folder) / CHECKPOINT_FILE))
    while run.epoch < cfg.num_epochs:
        metrics = train_epoch(run)
        with tempfile.TemporaryDirectory() as folder:
            save_state(run, Path(folder) / CHECKPOINT_FILE)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
