"""proxies suite: what a proxy loss costs at Stanford Online Products' 11,318 training classes against
CUB-200-2011's 100 (In-Shop's 3,997 between): the proxies' memory and their optimiser state, and the time
of one training step of the platform's own step (`engine._step`: embedding, similarities to every proxy,
loss, backward, AdamP), for each loss.

The step runs the `tiny` backbone on small images so that the proxies' share shows: on a full backbone the
same proxy work is added to a larger step. The batch is the recipe's for SOP (180); labels are drawn from
every class, so each step touches a batch's worth of proxies among all C. Imports `tune_upl.engine`.
"""
from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from benchmarks.harness import Row, SuiteResult, sync

CLASSES = (100, 3997, 11318)  # CUB-200-2011's, In-Shop's and SOP's training classes
BATCH = 180  # the Proxy-Anchor code's SOP and In-Shop batch
STEPS = 5  # timed steps after one untimed (which makes the optimiser's state)


def step_seconds(run: Any, images: torch.Tensor, labels: torch.Tensor, steps: int) -> float:
    """Median seconds of one `engine._step` over `steps` steps, after a first one that builds the state."""
    from tune_upl.engine import _step

    run.model.train()
    _step(run, images, labels)
    sync(run.device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        _step(run, images, labels)
        sync(run.device)
        times.append(time.perf_counter() - start)
    return float(torch.tensor(times).median())


def head_megabytes(run: Any) -> tuple[float, float]:
    """(proxies, their optimiser state) in MB: what grows with the number of classes."""
    params = list(run.model.head.parameters())
    weights = sum(p.numel() * p.element_size() for p in params)
    state = sum(v.numel() * v.element_size() for p in params for v in run.optimizer.state.get(p, {}).values()
                if isinstance(v, torch.Tensor))
    return weights / 2**20, state / 2**20


def measure(args: argparse.Namespace) -> SuiteResult:
    from tune_upl.config import make_config
    from tune_upl.engine import build_training, resolve_device, seed_everything
    from tune_upl.losses import LOSSES

    result = SuiteResult("proxies")
    device = resolve_device(args.device)
    losses = ("proxy_anchor",) if args.quick else tuple(LOSSES)
    classes = (100, 11318) if args.quick else CLASSES
    steps = 2 if args.quick else STEPS
    for loss in losses:
        seconds: dict[int, float] = {}
        for count in classes:
            cfg = make_config(backbone_type="tiny", loss_name=loss, image_size=32, batch_size=BATCH, warm_up=0,
                              pretrained="none", device=args.device, num_workers=0)
            seed_everything(cfg.seed)
            run = build_training(cfg, device, None, count, [], [], "val")
            gen = torch.Generator().manual_seed(0)
            images = torch.randint(0, 256, (BATCH, 3, 32, 32), dtype=torch.uint8, generator=gen).to(device)
            labels = torch.randint(0, count, (BATCH,), generator=gen).to(device)
            seconds[count] = step_seconds(run, images, labels, steps)
            weights, state = head_megabytes(run)
            result.details[(loss, count)] = {"seconds": seconds[count], "proxies_mb": weights, "state_mb": state}
            result.rows.append(Row(
                "proxies", f"one training step, {loss}, {count:,} classes ({cfg.feature_dim}-d proxies, batch "
                f"{BATCH}, tiny backbone at 32 px, {cfg.optimizer})", seconds[count], "s",
                f"the same at {classes[0]} classes", seconds[classes[0]],
                note=f"proxies {weights:.1f} MB + optimiser state {state:.1f} MB"))
            del run
    return result
