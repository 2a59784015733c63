"""The Ray Tune function trainable: one trial = one `TrialConfig` trained epoch by epoch.

After every epoch it reports the epoch's metrics with a checkpoint (model, optimiser, scheduler, epoch,
RNG states); when Tune restarts the trial (a failure, or a resumed search) it continues at the next
epoch from `ray.tune.get_checkpoint()`. Only the Tune API from `ray.tune` is used (in Ray 2.60
`ray.train.report` raises inside a Tune trial). The data were prepared by the driver; a trial only reads.
"""
from __future__ import annotations

import gc
import os
import tempfile
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from tune_upl.config import make_config
from tune_upl.engine import Run, build_run, load_state, save_state, train_epoch
from tune_upl.errors import DivergedError, OutOfMemory
from tune_upl.layout import CHECKPOINT_FILE, DIVERGED_FLAG, EMBEDDINGS_FILE, ERROR_KEY, OOM_FLAG

# With `reuse_actors`, Ray waits this long (default 2 s) for the previous trial's thread to end before it hands
# the worker to the next trial; past it the *next* trial fails ("reuse requires reset_config()"). Releasing a
# stopped trial (its loaders, model and a gc pass) takes longer than 2 s on a busy node, so wait longer here.
REUSE_WAIT_S = "120"


def worst_metrics(run: Run) -> dict[str, float]:
    """Every retrieval metric at 0, its worst value: a stopped trial can never be selected."""
    prefix = run.metric_prefix
    names = [f"{prefix}_recall@{k}" for k in run.cfg.recalls] + [f"{prefix}_map@r", f"{prefix}_r_precision"]
    return {"epoch": run.epoch + 1, **{name: 0.0 for name in names}}


def fault_folder() -> Path:
    """Where drills count the faults they fired: the trial's folder in storage when that is a local or shared
    path, the same for every attempt on any worker (Ray gives a reused worker process another working
    folder for the same trial); on a URI storage, the attempt's working folder."""
    import pyarrow.fs

    context = tune.get_context()
    storage = context.get_storage()
    if isinstance(getattr(storage, "storage_filesystem", None), pyarrow.fs.LocalFileSystem):
        return Path(storage.trial_fs_path)
    return Path(context.get_trial_dir())


def train_trial(config: dict[str, Any]) -> None:
    """Ray Tune entry point; `config` holds every TrialConfig field (fixed values and sampled ones).

    With `reuse_actors` the next trial runs in this same process: everything a trial holds is released
    when it returns (loader workers, the model, cached GPU memory)."""
    os.environ["TUNE_FUNCTION_THREAD_TIMEOUT_S"] = REUSE_WAIT_S  # read by this worker when Tune reuses it
    cfg = make_config(config)
    run = build_run(cfg)
    try:
        _train(run)
    finally:
        del run
        gc.collect()  # loader workers and CUDA tensors held in reference cycles go now, not at some later gc
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()


def _train(run: Run) -> None:
    cfg = run.cfg
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            run.load_state_dict(load_state(Path(folder) / CHECKPOINT_FILE))
    run.fault_dir = fault_folder()
    node = ray.get_runtime_context().get_node_id()
    while run.epoch < cfg.num_epochs:
        try:
            metrics = train_epoch(run)
        except (DivergedError, OutOfMemory) as error:
            # hopeless for this configuration, harmless for the search: the worst score, a flag, stop
            flag = DIVERGED_FLAG if isinstance(error, DivergedError) else OOM_FLAG
            tune.report({**worst_metrics(run), flag: True, ERROR_KEY: str(error), "node_id": node})
            return
        with tempfile.TemporaryDirectory() as folder:
            save_state(run, Path(folder) / CHECKPOINT_FILE)
            if run.test_database is not None:
                torch.save(run.test_database, Path(folder) / EMBEDDINGS_FILE)
            tune.report({**metrics, "node_id": node}, checkpoint=tune.Checkpoint.from_directory(folder))
