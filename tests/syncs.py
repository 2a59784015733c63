"""Host synchronisations of one training step, counted on the CPU.

On a GPU every op that needs a device value on the host (`.item()`, `bool(t)`, `nonzero`, a boolean-mask
index, ...) waits for the device's queue to drain. A CPU has no queue, so the ops are counted instead: a
`TorchDispatchMode` sees every aten op of `engine._step` and counts those that are host syncs on CUDA.
Left out by identity: `.item()` of the optimiser's own `step` counters, which torch keeps on the host on
CUDA too. Not seen: host-to-device copies (the step makes none; its inputs are already on the device).

    PYTHONPATH=. python tests/syncs.py   # the table in docs/benchmarks.md (runs on an older checkout too)
"""
from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
ALWAYS = {  # ops whose result size or value the host must read on CUDA
    aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default, aten.equal.default,
    aten.is_nonzero.default, aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
    aten.bincount.default, aten.repeat_interleave.Tensor,
}
BOOL_INDEXED = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


def _bool_index(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


class SyncCounter(TorchDispatchMode):
    """Counts host syncs (`count`, and `ops` by name), skipping `.item()` of `optimizer`'s step counters."""

    def __init__(self, optimizer: torch.optim.Optimizer | None = None):
        super().__init__()
        self.optimizer = optimizer
        self.ops: list[str] = []

    @property
    def count(self) -> int:
        return len(self.ops)

    def _is_step_counter(self, tensor: Any) -> bool:
        states = self.optimizer.state.values() if self.optimizer is not None else ()
        return any(state.get("step") is tensor for state in states)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in ALWAYS and not (func is aten._local_scalar_dense.default and self._is_step_counter(args[0])):
            self.ops.append(str(func))
        elif func in BOOL_INDEXED and _bool_index(args):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def step_run(backbone: str, loss: str, optimizer: str, image_size: int = 32, batch: int = 4,
             num_classes: int = 6, **extra: Any) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """A CPU run of the engine (no dataset: `build_training` around no loader) and one uint8 batch."""
    from tune_upl.config import make_config
    from tune_upl.engine import build_training, seed_everything

    cfg = make_config(backbone_type=backbone, loss_name=loss, optimizer=optimizer, image_size=image_size,
                      batch_size=batch, pretrained="none", device="cpu", warm_up=0, num_workers=0,
                      weight_decay=1e-4, **extra)
    seed_everything(cfg.seed)
    run = build_training(cfg, torch.device("cpu"), None, num_classes, [], [], "val")
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, image_size, image_size), dtype=torch.uint8, generator=gen)
    labels = torch.arange(batch) % num_classes  # every class present would hide a loss's empty-proxy path
    labels[-1] = 0
    return run, images, labels


def step_syncs(run: Any, images: torch.Tensor, labels: torch.Tensor) -> SyncCounter:
    """The host syncs of one call of `engine._step` (the function that makes one optimisation step)."""
    from tune_upl.engine import _step

    run.model.train()
    with SyncCounter(run.optimizer) as counter:
        _step(run, images, labels)
    return counter


ROWS = [("resnet50", "proxy_anchor", "adamp"), ("tiny", "balanced_proxy", "adamp"),
        ("tiny", "balanced_proxy", "adamw"), ("tiny", "normalized_softmax", "sgd")]

if __name__ == "__main__":
    torch.set_num_threads(1)
    print("| backbone | loss | optimiser | host syncs, first step | second step |")
    print("|---|---|---|---|---|")
    for row in ROWS:
        run, images, labels = step_run(*row)
        first, second = step_syncs(run, images, labels), step_syncs(run, images, labels)
        print(f"| {' | '.join(row)} | {first.count} | {second.count} |")
