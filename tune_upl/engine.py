"""One training run, epoch by epoch: the seed's recipe, shared by the `train` command and every trial.

`build_run` turns a `TrialConfig` into a `Run` (data, model, loss, optimiser, scheduler); `train_epoch`
trains and evaluates one epoch and returns its metrics; `final_test` touches the test classes once.
A `Run` can save and restore its full state (model, optimiser, scheduler, epoch, RNG states) so that a
restarted trial continues at the next epoch.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from adamp import AdamP
from torch.utils.data import DataLoader

from tune_upl.config import TrialConfig
from tune_upl.data import ImageDataset, SplitManager, load_records, make_loader, eval_transform, train_transform
from tune_upl.losses import build_loss
from tune_upl.metrics import knn_recall
from tune_upl.models import MetricModel, build_model


def seed_everything(seed: int) -> None:
    """The seed's determinism settings: numpy and torch seeded, cudnn deterministic, benchmark off."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but torch sees no CUDA device")
    return torch.device(name)


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
    """Read a checkpoint without unpickling code (weights_only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def build_optimizer(model: MetricModel, cfg: TrialConfig) -> tuple[AdamP, torch.optim.lr_scheduler.StepLR]:
    """AdamP: `lr` for backbone and embedding layer, `proxy_lr` for the proxies; StepLR once per epoch."""
    groups = [
        {"params": model.backbone_parameters(), "lr": cfg.lr, "name": "backbone"},
        {"params": list(model.net.embedding.parameters()), "lr": cfg.lr, "name": "embedding"},
        {"params": list(model.head.parameters()), "lr": cfg.proxy_lr, "name": "proxies"},
    ]
    optimizer = AdamP(groups, weight_decay=cfg.weight_decay)
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step, gamma=cfg.lr_gamma)


def build_run(cfg: TrialConfig) -> Run:
    """Data, model, loss and optimiser of one run. Under protocol `seed` the epochs evaluate on test."""
    torch.set_num_threads(cfg.resolved_num_threads)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    splits = SplitManager(load_records(cfg), cfg.protocol, cfg.val_fraction)
    train_set = ImageDataset(splits.get("train"), train_transform(cfg.image_size))
    eval_split = "test" if cfg.protocol == "seed" else "val"
    eval_set = ImageDataset(splits.get(eval_split), eval_transform(cfg.image_size))
    model = build_model(cfg, train_set.num_classes).to(device)
    optimizer, scheduler = build_optimizer(model, cfg)
    loss_fn = build_loss(cfg.loss_name, scale=cfg.scale, margin=cfg.margin)
    return Run(
        cfg=cfg,
        device=device,
        splits=splits,
        model=model,
        loss_fn=loss_fn,
        optimizer=optimizer,
        scheduler=scheduler,
        train_loader=make_loader(train_set, cfg, train=True),
        eval_loader=make_loader(eval_set, cfg, train=False),
        eval_split=eval_split,
    )


@torch.no_grad()
def embed(model: MetricModel, loader: DataLoader, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings and labels of a whole split, in loader order, on `device`."""
    model.eval()
    chunks, labels = [], []
    for images, batch_labels in loader:
        chunks.append(model(images.to(device, non_blocking=True)))
        labels.append(batch_labels.to(device))
    return torch.cat(chunks), torch.cat(labels)


def evaluate(model: MetricModel, loader: DataLoader, device: torch.device, ks: tuple[int, ...], prefix: str) -> dict[str, float]:
    embeddings, labels = embed(model, loader, device)
    result = knn_recall(embeddings, labels, ks)
    return {f"{prefix}_recall@{k}": value for k, value in result.recall.items()}


def train_epoch(run: Run) -> dict[str, float]:
    """Train one epoch, then evaluate; returns the epoch's metrics (also appended to `run.history`)."""
    cfg, model = run.cfg, run.model
    epoch = run.epoch + 1
    model.set_backbone_trainable(epoch > cfg.warm_up)
    model.train()
    lrs = {g["name"]: g["lr"] for g in run.optimizer.param_groups}
    total_loss, seen, start = 0.0, 0, time.perf_counter()
    for images, labels in run.train_loader:
        images, labels = images.to(run.device, non_blocking=True), labels.to(run.device, non_blocking=True)
        loss = run.loss_fn(model.head(model(images)), labels)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        total_loss += float(loss.detach()) * len(labels)
        seen += len(labels)
    train_seconds = time.perf_counter() - start
    run.scheduler.step()
    metrics = evaluate(model, run.eval_loader, run.device, cfg.recalls, run.metric_prefix)
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
    test_set = ImageDataset(run.splits.get("test", final=True), eval_transform(run.cfg.image_size))
    loader = make_loader(test_set, run.cfg, train=False)
    return evaluate(run.model, loader, run.device, run.cfg.recalls, "test")


