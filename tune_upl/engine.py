"""One training run, epoch by epoch: the seed's recipe, shared by the `train` command and every trial.

`build_run` turns a `TrialConfig` into a `Run` (data, model, loss, optimiser, scheduler); `train_epoch`
trains and evaluates one epoch and returns its metrics; `final_test` touches the test classes once.
A `final` run trains on all training classes and evaluates the test classes after its last epoch only.
A `Run` can save and restore its full state (model, optimiser, scheduler, epoch, RNG states) so that a
restarted trial continues at the next epoch.
"""
from __future__ import annotations

import math
import os
import random
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from tune_upl.config import TrialConfig
from tune_upl.faults import fault_due, fire
from tune_upl.data import ImageDataset, SplitManager, load_records, make_loader, run_transforms
from tune_upl.facts import LOSS_PARAMETERS
from tune_upl.losses import build_loss
from tune_upl.metrics import retrieval_metrics
from tune_upl.models import MetricModel, build_model
from tune_upl.optim import OPTIMIZERS
from tune_upl.errors import CheckpointError, DivergedError, NoGPU, OutOfMemory, first_line
from tune_upl.gpu_memory import memory_cap


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """numpy and torch seeded as the seed does; cudnn deterministic (the seed) or benchmarked (fast)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


def resolve_amp(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype: bf16 where the GPU has it, fp16 (with a grad scaler) where not, none on CPU."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "auto":  # emulated bf16 (V100, T4) is slow: only native bf16 counts, else fp16 + grad scaler
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16


def resolve_device(name: str, gpu_share: float = 0.0) -> torch.device:
    """The run's device, always with an index where it is a GPU (torch's memory functions refuse an
    index-less `cuda`). `auto` and `cuda` are the current CUDA device (inside a Ray trial, index 0 of the
    GPUs Ray made visible); a trial Ray gave a GPU (`gpu_share` > 0) that sees none fails (NoGPU): a silent
    CPU run would be slow and counted as accelerator time. `cpu` is honoured."""
    if name != "cpu" and gpu_share > 0 and not torch.cuda.is_available():
        raise NoGPU(
            f"Ray gave this trial {gpu_share:g} GPU but torch on node {socket.gethostname()} sees no CUDA device "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}, device {name!r}); allowed: a "
            "node whose GPU torch can use, `device: cpu`, or --allow-cpu on a cluster without GPUs"
        )
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but torch sees no CUDA device")
    _, _, index = name.partition(":")
    if not index:
        return torch.device("cuda", torch.cuda.current_device())
    count = torch.cuda.device_count()
    if int(index) >= count:
        raise RuntimeError(
            f"device {name!r}: torch sees {count} CUDA device(s) here (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}); allowed: auto, cuda or cuda:0 to cuda:{count - 1}"
        )
    return torch.device("cuda", int(index))


def claim_gpu(device: torch.device, gpu_share: float) -> Optional[float]:
    """A packed trial (a fraction of a GPU) may allocate only its share less its process's overhead
    (`memory_cap`), so its growth fails itself, not a neighbour; the peak-memory statistic restarts, so a
    reused worker reports this trial's peak only. Returns the cap (None: uncapped)."""
    if device.type != "cuda":
        return None
    cap = None
    if 0 < gpu_share < 1:
        cap = memory_cap(gpu_share, torch.cuda.mem_get_info(device)[1])
        torch.cuda.set_per_process_memory_fraction(cap, device)
    torch.cuda.reset_peak_memory_stats(device)
    return cap


def is_out_of_memory(error: BaseException) -> bool:
    """torch's out-of-memory error, or the allocation failures cuDNN and cuBLAS raise as RuntimeErrors."""
    return isinstance(error, torch.OutOfMemoryError) or (isinstance(error, RuntimeError) and any(
        text in str(error) for text in ("out of memory", "CUDNN_STATUS_ALLOC_FAILED", "CUBLAS_STATUS_ALLOC_FAILED")))


def out_of_memory(cfg: TrialConfig, device: Any, error: BaseException) -> OutOfMemory:
    """The OutOfMemory error of a run: what to lower, and the original error's first line."""
    return OutOfMemory(
        f"out of memory with batch_size {cfg.batch_size}, backbone {cfg.backbone_type}, image_size "
        f"{cfg.image_size} on {device}: lower batch_size or image_size, or give the trial more "
        f"GPU memory ({first_line(error)})"
    )


@dataclass
class Run:
    """Everything one training run owns; `epoch` counts finished epochs."""

    cfg: TrialConfig
    device: torch.device
    splits: SplitManager
    model: MetricModel
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_loader: DataLoader
    eval_loader: DataLoader
    eval_split: str
    amp_dtype: Optional[torch.dtype] = None
    memory_cap: Optional[float] = None  # the share of the GPU's memory torch may hold (a packed trial)
    scaler: Optional[torch.amp.GradScaler] = None
    channels_last: bool = False
    forward: Optional[Callable[[torch.Tensor], torch.Tensor]] = None  # the (compiled) training forward
    test_database: Optional[dict[str, Any]] = None  # a final run's test embeddings, labels and image paths
    # In-Shop's test split: the positions of its queries and of its gallery in the evaluated split (on the
    # run's device); None: every image is a query against all others
    query_gallery: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    fault_dir: Optional[Path] = None  # where injected faults are counted (the trial's folder under Tune)
    epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def metric_prefix(self) -> str:
        return "test" if self.eval_split == "test" else "val"

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "history": self.history,
            "rng": {
                "python": random.getstate(),
                "numpy": _numpy_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "loader": self.train_loader.generator.get_state(),
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.history = list(state["history"])
        rng = state["rng"]
        random.setstate(rng["python"])
        np.random.set_state(("MT19937", rng["numpy"]["keys"].numpy(), *rng["numpy"]["rest"]))
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.train_loader.generator.set_state(rng["loader"])


def _numpy_state() -> dict[str, Any]:
    """numpy's RNG state as tensors and numbers, so checkpoints load with `weights_only=True`."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {"keys": torch.from_numpy(keys.astype(np.int64)), "rest": [int(pos), int(has_gauss), float(cached)]}


def save_state(run: Run, path: Path) -> None:
    torch.save(run.state_dict(), path)



def load_state(path: Path) -> dict[str, Any]:
    """Read a checkpoint without unpickling code (weights_only), or say which file is unreadable."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"unreadable checkpoint {path}: {type(error).__name__}: {error}") from None


@dataclass(frozen=True)
class EpochFactor:
    """The learning-rate factor of epoch index `i` (0-based, LambdaLR's count): a linear warm-up over
    `warmup` epochs ((i + 1) / (warmup + 1)), then the schedule: cosine from 1 to 0 at the last epoch's end,
    StepLR's gamma ** (epochs since the warm-up // step), or constant. A dataclass, so LambdaLR saves it."""

    schedule: str
    epochs: int
    warmup: int
    step: int
    gamma: float

    def __call__(self, i: int) -> float:
        if i < self.warmup:
            return (i + 1) / (self.warmup + 1)
        after = i - self.warmup
        if self.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * after / (self.epochs - self.warmup)))
        if self.schedule == "step":
            return self.gamma ** (after // self.step)
        return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrialConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """The seed's StepLR itself where the run asks for it (its checkpoints keep loading), else a LambdaLR of
    `EpochFactor`; either is stepped once an epoch."""
    if cfg.lr_schedule == "step" and cfg.lr_warmup_epochs == 0:
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
    factor = EpochFactor(cfg.lr_schedule, cfg.num_epochs, cfg.lr_warmup_epochs, cfg.lr_step, cfg.lr_gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_optimizer(
    model: MetricModel, cfg: TrialConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """`lr` for backbone and embedding layer, `proxy_lr` for the proxies; the schedule stepped once an epoch."""
    groups = [
        {"params": model.backbone_parameters(), "lr": cfg.lr, "name": "backbone"},
        {"params": list(model.net.embedding.parameters()), "lr": cfg.lr, "name": "embedding"},
        {"params": list(model.head.parameters()), "lr": cfg.proxy_lr, "name": "proxies"},
    ]
    optimizer = OPTIMIZERS[cfg.optimizer](groups, cfg.weight_decay)
    return optimizer, build_scheduler(optimizer, cfg)


def evaluated_split(cfg: TrialConfig) -> str:
    """The split each epoch evaluates (and names its metrics by): test under protocol seed and in a final run."""
    return "test" if cfg.protocol == "seed" or cfg.final else "val"


def build_run(cfg: TrialConfig, gpu_share: float = 0.0) -> Run:
    """Data, model, loss and optimiser of one run. Under protocol `seed` the epochs evaluate on test.
    `gpu_share` is the GPU Ray gave the trial (0 outside Ray): see `resolve_device` and `claim_gpu`."""
    torch.set_num_threads(cfg.resolved_num_threads)
    seed_everything(cfg.seed, cfg.deterministic)
    device = resolve_device(cfg.device, gpu_share)
    cap = claim_gpu(device, gpu_share)
    splits = SplitManager(load_records(cfg), cfg.protocol, cfg.val_fraction)
    train_images, test_images = run_transforms(cfg)
    train_set = ImageDataset(splits.get("trainval" if cfg.final else "train"), train_images)
    eval_split = evaluated_split(cfg)
    eval_set = ImageDataset(splits.get(eval_split, final=cfg.final), test_images)
    run = build_training(cfg, device, splits, train_set.num_classes, make_loader(train_set, cfg, train=True),
                         make_loader(eval_set, cfg, train=False), eval_split)
    run.memory_cap = cap
    run.query_gallery = query_gallery(eval_set.records, device)
    return run


def query_gallery(records: list[Any], device: torch.device) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """Index tensors of the query and gallery images of an evaluated split, or None for a split without
    those roles. Indices, not masks: selecting with them on a GPU does not wait for the host."""
    roles = [r.split for r in records]
    if "query" not in roles:
        return None
    queries = [i for i, role in enumerate(roles) if role == "query"]
    gallery = [i for i, role in enumerate(roles) if role == "gallery"]
    return torch.tensor(queries, device=device), torch.tensor(gallery, device=device)


def score(embeddings: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...], prefix: str,
          roles: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> dict[str, float]:
    """The split's retrieval metrics named `<prefix>_...`: every image against all others, or with `roles`
    (In-Shop's test split) each query against the gallery only."""
    if roles is None:
        return retrieval_metrics(embeddings, labels, ks).as_metrics(prefix)
    queries, gallery = roles
    return retrieval_metrics(embeddings[queries], labels[queries], ks, references=embeddings[gallery],
                             reference_labels=labels[gallery]).as_metrics(prefix)


def build_training(cfg: TrialConfig, device: torch.device, splits: Optional[SplitManager], num_classes: int,
                   train_loader: Any, eval_loader: Any, eval_split: str) -> Run:
    """The model, loss, optimiser and precision settings of a run around the given loaders (the benchmark
    passes fixed in-memory batches)."""
    # auto: on a GPU, for a CNN (its convolutions run faster so); a ViT's one strided conv gains nothing from it
    channels_last = cfg.channels_last is True or (cfg.channels_last == "auto" and device.type == "cuda"
                                                  and not cfg.is_vit)
    model = build_model(cfg, num_classes).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer, scheduler = build_optimizer(model, cfg)
    loss_fn = build_loss(cfg.loss_name, **{name: getattr(cfg, name) for name in LOSS_PARAMETERS[cfg.loss_name]})
    amp_dtype = resolve_amp(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    return Run(
        cfg=cfg,
        device=device,
        splits=splits,
        model=model,
        loss_fn=loss_fn,
        optimizer=optimizer,
        scheduler=scheduler,
        train_loader=train_loader,
        eval_loader=eval_loader,
        eval_split=eval_split,
        amp_dtype=amp_dtype,
        scaler=scaler,
        channels_last=channels_last,
        forward=torch.compile(model.net) if cfg.compile else model.net,
    )


def _to_device(run: Run, images: torch.Tensor) -> torch.Tensor:
    """uint8 images to the run's device (the model normalises them there, keeping channels-last)."""
    images = images.to(run.device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if run.channels_last else images


def _autocast(run: Run) -> Any:
    return torch.autocast(run.device.type, dtype=run.amp_dtype or torch.float32, enabled=run.amp_dtype is not None)


@torch.inference_mode()
def embed(run: Run, loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 embeddings and labels of a whole split, in loader order, on the run's device."""
    run.model.eval()
    chunks, labels = [], []
    for images, batch_labels in loader:
        with _autocast(run):
            chunks.append(run.model(_to_device(run, images)).float())
        labels.append(batch_labels.to(run.device, non_blocking=True))
    return torch.cat(chunks), torch.cat(labels)


def evaluate(run: Run, loader: DataLoader, prefix: str) -> dict[str, float]:
    """Recall@K, MAP@R and R-precision of a split, named `<prefix>_recall@K`, `<prefix>_map@r`, ..."""
    embeddings, labels = embed(run, loader)
    return score(embeddings, labels, run.cfg.recalls, prefix, query_gallery(loader.dataset.records, run.device))


def _step(run: Run, images: torch.Tensor, labels: torch.Tensor, poison: bool = False) -> torch.Tensor:
    """One optimisation step; returns the (float32) loss without waiting for it on the host."""
    with _autocast(run):  # backbone and embedding layer; the L2 normalisation inside is float32
        embeddings = run.forward(images)
    similarities = run.model.head(embeddings)  # float32, outside autocast: not rounded to bf16/fp16 steps
    loss = run.loss_fn(similarities, labels)
    if poison:  # inject_fault: nan
        loss = loss * float("nan")
    run.optimizer.zero_grad(set_to_none=True)
    clip = run.cfg.grad_clip
    if run.scaler is not None:
        run.scaler.scale(loss).backward()
        if clip:
            run.scaler.unscale_(run.optimizer)  # clip the true gradients, not the scaled ones
            clip_gradients(run.model, clip)
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        loss.backward()
        if clip:
            clip_gradients(run.model, clip)
        run.optimizer.step()
    return loss


def clip_gradients(model: torch.nn.Module, max_norm: float) -> None:
    """Scale every gradient so their global L2 norm is at most `max_norm` (torch's clip_grad_norm_, which
    reads no value on the host: the factor stays on the device)."""
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_norm, foreach=True)


def train_epoch(run: Run) -> dict[str, float]:
    """Train one epoch, then evaluate; returns the epoch's metrics (also appended to `run.history`)."""
    cfg, model = run.cfg, run.model
    epoch = run.epoch + 1
    model.set_backbone_trainable(epoch > cfg.warm_up)
    if epoch <= cfg.freeze_patch_embed:
        model.freeze_patch_embedding()
    model.train()
    lrs = {g["name"]: g["lr"] for g in run.optimizer.param_groups}
    loss_sum = torch.zeros((), device=run.device)  # summed on the device: no host sync per step
    seen, start = 0, time.perf_counter()
    fault = fault_due(cfg, epoch, run.fault_dir)
    try:
        for images, labels in run.train_loader:
            images, labels = _to_device(run, images), labels.to(run.device, non_blocking=True)
            if fault:
                fire(cfg, epoch)
            loss = _step(run, images, labels, poison=fault and cfg.inject_fault == "nan")
            loss_sum += loss.detach() * len(labels)
            seen += len(labels)
    except RuntimeError as error:  # torch.OutOfMemoryError is one
        if not is_out_of_memory(error):
            raise
        raise out_of_memory(cfg, run.device, error) from None
    total_loss = float(loss_sum)  # the epoch's one host sync
    if not math.isfinite(total_loss):
        raise DivergedError(epoch)
    train_seconds = time.perf_counter() - start
    run.scheduler.step()
    # the final stage touches the test classes once, after its last epoch; every other run evaluates each epoch
    last = epoch == cfg.num_epochs
    metrics = {}
    if not cfg.final or last:
        embeddings, labels = embed(run, run.eval_loader)
        metrics = score(embeddings, labels, cfg.recalls, run.metric_prefix, run.query_gallery)
        if run.eval_split == "test":  # kept with the final (or, under seed, selected) model: its picture and `retrieve`
            paths = [str(r.path) for r in run.eval_loader.dataset.records]
            run.test_database = {"embeddings": embeddings.cpu(), "labels": labels.cpu(), "paths": paths}
    run.epoch = epoch
    result = {
        "epoch": epoch,
        "train_loss": total_loss / max(seen, 1),
        "images_per_s": seen / max(train_seconds, 1e-9),
        "epoch_seconds": time.perf_counter() - start,
        "lr": lrs["embedding"],
        "proxy_lr": lrs["proxies"],
        **metrics,
    }
    if run.device.type == "cuda":
        result["peak_memory_mb"] = torch.cuda.max_memory_allocated(run.device) / 2**20
    run.history.append(result)
    return result


def final_test(run: Run) -> dict[str, float]:
    """Evaluate once on the test classes: the only place (besides protocol seed) they are read."""
    test_set = ImageDataset(run.splits.get("test", final=True), run_transforms(run.cfg)[1])
    return evaluate(run, make_loader(test_set, run.cfg, train=False), "test")


