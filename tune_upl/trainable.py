"""The Ray Tune function trainable: one trial = one `TrialConfig` run through the trial loop (`loop.py`) with
Tune's report and checkpoints.

After every epoch it reports the epoch's metrics; at some epochs (`loop.checkpoint_due`) with a checkpoint
(model, optimiser, scheduler, epoch, RNG states, the metrics so far). When Tune restarts the trial (a
failure, or a resumed search) it continues after its last checkpoint from `ray.tune.get_checkpoint()`,
so the epochs since then run (and are reported) again. Only the Tune API from `ray.tune` is used (in Ray 2.60
`ray.train.report` raises inside a Tune trial), and `ray_private` for the trial's folder in storage. The
data were prepared by the driver; a trial only reads.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import ray
from ray import tune

from tune_upl.config import make_config
from tune_upl.engine import load_state
from tune_upl.layout import CHECKPOINT_FILE, trial_fields
from tune_upl.loop import TrialHooks, run_trial
from tune_upl.ray_private import local_trial_folder

# With `reuse_actors`, Ray waits this long (default 2 s) for the previous trial's thread to end before it hands
# the worker to the next trial; past it the *next* trial fails ("reuse requires reset_config()"). Releasing a
# stopped trial (its loaders, model and a gc pass) takes longer than 2 s on a busy node, so wait longer here.
REUSE_WAIT_S = "120"


def gpu_share() -> float:
    """The GPU Ray gave this trial: the sum over its placement group's bundles (0 without one)."""
    return float(tune.get_context().get_trial_resources().required_resources.get("GPU", 0.0))


def fault_folder() -> Path:
    """Where drills count the faults they fired: the trial's folder in storage when that is a local or shared
    path, the same for every attempt on any worker (Ray gives a reused worker process another working
    folder for the same trial); on a URI storage, the attempt's working folder."""
    return local_trial_folder() or Path(tune.get_context().get_trial_dir())


def report(result: dict[str, Any], folder: Optional[Path]) -> None:
    """An epoch's result to Tune, with its checkpoint folder when it has one (Tune copies it to storage)."""
    tune.report(result, checkpoint=tune.Checkpoint.from_directory(folder) if folder else None)


def restore() -> Optional[dict[str, Any]]:
    """The state of the trial's last checkpoint, when Tune restarts it (a retry, or a resumed search)."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        return load_state(Path(folder) / CHECKPOINT_FILE)


def train_trial(config: dict[str, Any]) -> None:
    """Ray Tune entry point; `config` holds every TrialConfig field (fixed values and sampled ones), and the
    searcher's names for the trial (`layout.SEARCH_KEYS`), which are not the model's."""
    os.environ["TUNE_FUNCTION_THREAD_TIMEOUT_S"] = REUSE_WAIT_S  # read by this worker when Tune reuses it
    hooks = TrialHooks(report=report, restore=restore, fault_dir=fault_folder(),
                       node=ray.get_runtime_context().get_node_id())
    run_trial(make_config(trial_fields(config)), gpu_share(), hooks)
