"""The loop one trial runs, with or without Ray: build the run (claiming its GPU), continue from a saved
state, train epoch by epoch, evaluate, checkpoint (a tested epoch's checkpoint with its retrieval picture, which
the report then copies without loading torch) and report, through plain callbacks (`TrialHooks`).

Tune's trainable (`trainable.py`) passes Tune's report and checkpoint; the GPU check (`benchmarks/gpu_check.py`)
passes plain ones on a machine without Ray. One loop, so what the check measures is what a trial runs.

A failure no retry can mend ends the trial with the worst score, a flag naming it and the message, reported
as its last result (Tune has no per-exception "do not retry"): a diverged loss, out of memory anywhere, a GPU
torch cannot see, a missing weights file, and on a GPU node any failure while the run is built (claiming the
device, its memory share, data, model): each attempt there fails the same way and holds a GPU while it does.
"""
from __future__ import annotations

import gc
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from tune_upl.atomic import write_json
from tune_upl.config import TrialConfig
from tune_upl.engine import Run, build_run, evaluated_split, is_out_of_memory, out_of_memory, save_state, train_epoch
from tune_upl.errors import DivergedError, NoGPU, OutOfMemory, WeightsMissing, first_line
from tune_upl.layout import (
    CHECKPOINT_FILE, DIVERGED_FLAG, EMBEDDINGS_FILE, ERROR_KEY, GPU_START_FLAG, NO_GPU_FLAG, NO_WEIGHTS_FLAG, OOM_FLAG,
)
from tune_upl.metrics import RetrievalResult
from tune_upl.saved_models import RETRIEVAL_NUM, RETRIEVAL_PICTURE, RETRIEVAL_QUERIES, RETRIEVAL_QUERIES_FILE

# Failures no retry can mend, and the flag each sets in the trial's last result (see layout.trial_state): the
# configuration's own (a diverged loss, out of memory) and the node's (a GPU torch cannot see, a missing
# weights file: every attempt there fails the same way, so retrying only wastes the retries).
STOPS = {DivergedError: DIVERGED_FLAG, OutOfMemory: OOM_FLAG, NoGPU: NO_GPU_FLAG, WeightsMissing: NO_WEIGHTS_FLAG}


@dataclass
class TrialHooks:
    """What the loop needs from whoever runs it.

    `report(result, folder)`: an epoch's metrics, with the folder holding its checkpoint (valid during the
    call only) or None. `restore()`: the saved state to continue from, or None. `started(run)`: called once the
    run is built and restored, before its first epoch (the GPU check starts packed trials together there).
    `fault_dir`: where injected faults are counted; `node`: the node's name in results and messages."""

    report: Callable[[dict[str, Any], Optional[Path]], None]
    restore: Callable[[], Optional[dict[str, Any]]] = lambda: None
    started: Callable[[Run], None] = lambda run: None
    fault_dir: Optional[Path] = None
    node: str = "local"


def worst_metrics(cfg: TrialConfig, epoch: int) -> dict[str, float]:
    """Every retrieval metric at 0, its worst value: a stopped trial can never be selected."""
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
    return improves_best(cfg, history)


def improves_best(cfg: TrialConfig, history: list[dict[str, float]]) -> bool:
    """Under protocol seed, whether the epoch just trained improves `checkpoint_best` over the earlier ones."""
    if cfg.protocol != "seed" or cfg.final or cfg.checkpoint_best == "none":
        return False
    metric, _, mode = cfg.checkpoint_best.partition(":")
    sign = -1.0 if mode == "min" else 1.0
    earlier = [sign * m[metric] for m in history[:-1] if metric in m]
    return metric in history[-1] and (not earlier or sign * history[-1][metric] > max(earlier))


def stop_result(cfg: TrialConfig, run: Optional[Run], error: BaseException, node: str,
                gpu_start: bool = False) -> Optional[dict[str, Any]]:
    """The last result of a trial ended by a failure no retry can mend (the worst score, its flag, the
    message), or None for an error a retry may mend. `run` is None when the failure came while building it;
    `gpu_start`: the failure came while a trial Ray gave a GPU was starting, which no retry mends either."""
    if is_out_of_memory(error) and not isinstance(error, OutOfMemory):
        error = out_of_memory(cfg, run.device if run else cfg.device, error)
    device = {"device": str(run.device)} if run else {}
    last = worst_metrics(cfg, (run.epoch if run else 0) + 1)
    if type(error) in STOPS:
        message = f"{error} (Ray node {node})" if isinstance(error, (NoGPU, WeightsMissing)) else str(error)
        return {**last, STOPS[type(error)]: True, ERROR_KEY: message, "node_id": node, **device}
    if gpu_start:
        message = (f"the trial's start on its GPU failed (Ray node {node}, CUDA_VISIBLE_DEVICES="
                   f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}): {type(error).__name__}: {first_line(error)}")
        return {**last, GPU_START_FLAG: True, ERROR_KEY: message, "node_id": node, **device}
    return None


def run_trial(cfg: TrialConfig, gpu_share: float, hooks: TrialHooks) -> None:
    """Train `cfg` to its last epoch (or its first unmendable failure), reporting every epoch through `hooks`.
    `gpu_share` is the GPU the trial was given (0: none). Everything the trial holds is released on return
    (loader workers, the model, cached GPU memory): a reused worker process runs the next trial."""
    run = None
    try:
        try:
            run = build_run(cfg, gpu_share=gpu_share)
        except Exception as error:
            _stop(cfg, None, error, hooks, gpu_start=gpu_share > 0 and cfg.device != "cpu")
            return
        state = hooks.restore()  # reading a checkpoint may fail for the storage's sake: left to Tune's retries
        if state is not None:
            run.load_state_dict(state)
        run.fault_dir = hooks.fault_dir
        hooks.started(run)
        try:
            _epochs(run, hooks)
        except RuntimeError as error:  # torch.OutOfMemoryError and the errors of STOPS are RuntimeErrors
            _stop(cfg, run, error, hooks)
    finally:
        del run
        gc.collect()  # loader workers and CUDA tensors held in reference cycles go now, not at some later gc
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()


def _stop(cfg: TrialConfig, run: Optional[Run], error: Exception, hooks: TrialHooks, gpu_start: bool = False) -> None:
    """Report the trial's last result if no retry can mend `error`; else raise it again, for Tune to retry
    the trial (max_failures) from its last checkpoint."""
    result = stop_result(cfg, run, error, hooks.node, gpu_start)
    if result is None:
        raise error
    hooks.report(result, None)


def _epochs(run: Run, hooks: TrialHooks) -> None:
    cfg = run.cfg
    while run.epoch < cfg.num_epochs:
        metrics = train_epoch(run)
        result = {**metrics, "node_id": hooks.node, "device": str(run.device)}
        if not checkpoint_due(cfg, run.history):
            hooks.report(result, None)
            continue
        with tempfile.TemporaryDirectory() as folder:
            save_state(run, Path(folder) / CHECKPOINT_FILE)
            if cfg.final and run.test_database is not None:
                torch.save(run.test_database, Path(folder) / EMBEDDINGS_FILE)
            if picture_due(run):
                save_picture(run, Path(folder))
            hooks.report(result, Path(folder))


def picture_due(run: Run) -> bool:
    """Whether the epoch just trained is one a report shows retrieval for, with its test database at hand: a
    final run's last epoch, or under protocol seed an epoch that improves `checkpoint_best` (the selection
    takes a trial's best epoch, whose checkpoint this is)."""
    cfg = run.cfg
    if run.test_database is None:
        return False
    return run.epoch == cfg.num_epochs if cfg.final else improves_best(cfg, run.history)


def save_picture(run: Run, folder: Path) -> None:
    """Draw the retrieval picture of the epoch just evaluated into its checkpoint `folder`, from the test
    embeddings the evaluation already made (a few dozen images read and resized), so that the report reads
    a file instead of loading torch to embed. A picture that cannot be drawn is named, never fails the run."""
    from tune_upl.retrieve import as_database, draw_picture

    try:
        records = {str(r.path): r for r in run.eval_loader.dataset.records}
        db = as_database(run.test_database, "", run.cfg.to_dict(), folder / CHECKPOINT_FILE, "this run")
        queries = draw_picture(db, folder / RETRIEVAL_PICTURE, records, RETRIEVAL_QUERIES, RETRIEVAL_NUM)
        write_json(folder / RETRIEVAL_QUERIES_FILE, {"queries": queries})
    except Exception as error:  # the run trained and tested: a picture is not worth failing it
        print(f"warning: retrieval picture not drawn: {type(error).__name__}: {first_line(error)}", file=sys.stderr,
              flush=True)
