"""The Ray Tune function trainable: one trial = one `TrialConfig` trained epoch by epoch.

After every epoch it reports the epoch's metrics; at some epochs (`checkpoint_due`) with a checkpoint
(model, optimiser, scheduler, epoch, RNG states, the metrics so far). When Tune restarts the trial (a
failure, or a resumed search) it continues after its last checkpoint from `ray.tune.get_checkpoint()`,
so the epochs since then run (and are reported) again. Only the Tune API from `ray.tune` is used (in Ray 2.60
`ray.train.report` raises inside a Tune trial). The data were prepared by the driver; a trial only reads.
"""
from __future__ import annotations

import gc
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import ray
import torch
from ray import tune

from tune_upl.config import TrialConfig, make_config
from tune_upl.engine import (
    Run, build_run, evaluated_split, is_out_of_memory, load_state, out_of_memory, save_state, train_epoch,
)
from tune_upl.errors import DivergedError, NoGPU, OutOfMemory, WeightsMissing
from tune_upl.metrics import RetrievalResult
from tune_upl.layout import CHECKPOINT_FILE, DIVERGED_FLAG, EMBEDDINGS_FILE, ERROR_KEY, NO_GPU_FLAG, NO_WEIGHTS_FLAG, OOM_FLAG

# With `reuse_actors`, Ray waits this long (default 2 s) for the previous trial's thread to end before it hands
# the worker to the next trial; past it the *next* trial fails ("reuse requires reset_config()"). Releasing a
# stopped trial (its loaders, model and a gc pass) takes longer than 2 s on a busy node, so wait longer here.
REUSE_WAIT_S = "120"
# Failures no retry can mend, and the flag each sets in the trial's last result (see layout.trial_state): the
# configuration's own (a diverged loss, out of memory) and the node's (a GPU torch cannot see, a missing
# weights file: every attempt there fails the same way, so retrying only wastes the retries).
STOPS = {DivergedError: DIVERGED_FLAG, OutOfMemory: OOM_FLAG, NoGPU: NO_GPU_FLAG, WeightsMissing: NO_WEIGHTS_FLAG}


def worst_metrics(cfg: TrialConfig, epoch: int) -> dict[str, float]:
    """Every retrieval metric at 0, its worst value: a stopped trial can never be selected. (A node's failure
    scores 0 too: Ray's Optuna searcher cannot record a trial without a score as failed, only leave it running.)"""
    zero = RetrievalResult({k: 0.0 for k in cfg.recalls}, 0.0, 0.0, num_queries=0, num_excluded=0)
    return {"epoch": epoch, **zero.as_metrics(evaluated_split(cfg))}  # the names every epoch reports


def checkpoint_due(cfg: TrialConfig, history: list[dict[str, float]]) -> bool:
    """Whether the epoch just trained (the last of `history`) saves a checkpoint: its last epoch, ASHA's rung
    epochs (a trial stopped there keeps its state), every `checkpoint_every` epochs, and under protocol seed
    each epoch that improves `checkpoint_best` (retrieve needs the test-selected epoch's model). Not every
    epoch: a save of resnet50 with AdamP's state is ~300 MB."""
    epoch = int(history[-1]["epoch"])
    if epoch == cfg.num_epochs or epoch in cfg.checkpoint_epochs or epoch % cfg.checkpoint_every == 0:
        return True
    if cfg.protocol != "seed" or cfg.final or cfg.checkpoint_best == "none":
        return False
    metric, _, mode = cfg.checkpoint_best.partition(":")
    sign = -1.0 if mode == "min" else 1.0
    earlier = [sign * m[metric] for m in history[:-1] if metric in m]
    return metric in history[-1] and (not earlier or sign * history[-1][metric] > max(earlier))


def gpu_share() -> float:
    """The GPU Ray gave this trial: the sum over its placement group's bundles (0 without one)."""
    return float(tune.get_context().get_trial_resources().required_resources.get("GPU", 0.0))


def stop_result(cfg: TrialConfig, run: Optional[Run], error: BaseException, node: str) -> Optional[dict[str, Any]]:
    """The last result of a trial ended by a failure no retry can mend (the worst score, its flag, the
    message), or None for an error Tune should retry. `run` is None when the failure came while building it."""
    if is_out_of_memory(error) and not isinstance(error, OutOfMemory):
        error = out_of_memory(cfg, run.device if run else cfg.device, error)
    if type(error) not in STOPS:
        return None
    message = f"{error} (Ray node {node})" if isinstance(error, (NoGPU, WeightsMissing)) else str(error)
    device = {"device": str(run.device)} if run else {}
    return {**worst_metrics(cfg, (run.epoch if run else 0) + 1), STOPS[type(error)]: True, ERROR_KEY: message,
            "node_id": node, **device}


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

    A failure no retry can mend (a diverged loss, out of memory anywhere in the trial, a GPU torch cannot
    see) ends the trial with the worst score, a flag and the message: Tune has no per-exception "do not
    retry". With `reuse_actors` the next trial runs in this same process: everything a trial holds is
    released when it returns (loader workers, the model, cached GPU memory)."""
    os.environ["TUNE_FUNCTION_THREAD_TIMEOUT_S"] = REUSE_WAIT_S  # read by this worker when Tune reuses it
    cfg = make_config(config)
    node = ray.get_runtime_context().get_node_id()
    run = None
    try:
        run = build_run(cfg, gpu_share=gpu_share())
        _train(run, node)
    except RuntimeError as error:  # torch.OutOfMemoryError and the errors of STOPS are RuntimeErrors
        result = stop_result(cfg, run, error, node)
        if result is None:
            raise  # retried by Tune (max_failures), from the last checkpoint
        tune.report(result)
    finally:
        del run
        gc.collect()  # loader workers and CUDA tensors held in reference cycles go now, not at some later gc
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()


def _train(run: Run, node: str) -> None:
    cfg = run.cfg
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            run.load_state_dict(load_state(Path(folder) / CHECKPOINT_FILE))
    run.fault_dir = fault_folder()
    while run.epoch < cfg.num_epochs:
        metrics = train_epoch(run)
        result = {**metrics, "node_id": node, "device": str(run.device)}
        if not checkpoint_due(cfg, run.history):
            tune.report(result)
            continue
        with tempfile.TemporaryDirectory() as folder:
            save_state(run, Path(folder) / CHECKPOINT_FILE)
            if run.test_database is not None:
                torch.save(run.test_database, Path(folder) / EMBEDDINGS_FILE)
            tune.report(result, checkpoint=tune.Checkpoint.from_directory(folder))
