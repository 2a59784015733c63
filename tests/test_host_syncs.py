"""A training step never waits on the host: `engine._step` makes no host synchronisation (counted on the CPU
by `tests/syncs.py`) for every loss and every optimiser, on `tiny` and on resnet50's shapes, on the first
call (which creates the optimiser's state) and on the next. The one exception is fp16, whose GradScaler
reads `found_inf` once a step to decide whether to skip it.

A resnet50 case takes 1-2 s on one core (two steps, the optimiser over 25M weights): the default run steps
the recipe's step (proxy_anchor, adamp: AdamP's projection over every resnet50 weight shape; the losses see only
[B, C] similarities, the same on any backbone, and `tiny` runs every pair); the slow run adds resnet50's
remaining pairs."""
import pytest

from syncs import step_run, step_syncs
from tune_upl.losses import LOSSES
from tune_upl.optim import OPTIMIZERS

RECIPE = ("proxy_anchor", "adamp")
CASES = [pytest.param("tiny", loss, optimizer, id=f"tiny-{loss}-{optimizer}")
         for loss in LOSSES for optimizer in OPTIMIZERS] + [
    pytest.param("resnet50", loss, optimizer, id=f"resnet50-{loss}-{optimizer}",
                 marks=() if (loss, optimizer) == RECIPE else pytest.mark.slow)
    for loss in LOSSES for optimizer in OPTIMIZERS]


@pytest.mark.parametrize("backbone, loss, optimizer", CASES)
def test_a_training_step_makes_no_host_sync(backbone, loss, optimizer):
    run, images, labels = step_run(backbone, loss, optimizer)
    first = step_syncs(run, images, labels)
    assert len(run.optimizer.state) == len(list(run.model.parameters()))  # the first call made every state
    second = step_syncs(run, images, labels)
    assert (first.ops, second.ops) == ([], [])


def test_fp16_makes_one_sync_a_step_the_grad_scalers_found_inf():
    """fp16's GradScaler skips a step whose gradients overflowed: it reads `found_inf` on the host (`.item()`),
    once per step. bf16 (the GPU default where native) has no scaler and no sync."""
    run, images, labels = step_run("tiny", RECIPE[0], RECIPE[1], amp="fp16")
    assert run.scaler is not None
    counts = [step_syncs(run, images, labels).ops for _ in range(2)]
    assert counts == [["aten._local_scalar_dense.default"]] * 2


@pytest.mark.parametrize("loss", list(LOSSES))
def test_a_step_with_stanford_online_products_11318_proxies_makes_no_host_sync(loss):
    """SOP's 11,318 training classes: a proxy per class, a batch touching a handful of them (the losses' paths
    for proxies without a positive in the batch are the ones that could read a count on the host)."""
    run, images, labels = step_run("tiny", loss, "adamp", batch=8, num_classes=11318)
    assert run.model.head.proxies.shape[0] == 11318
    assert (step_syncs(run, images, labels).ops, step_syncs(run, images, labels).ops) == ([], [])


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_a_vit_step_with_its_recipes_options_makes_no_host_sync(optimizer):
    """DINO ViT-S/16 at 32 px as its recipe trains it: gradients clipped to a global norm (torch's clip keeps the
    factor on the device), the patch embedding frozen (its weights get no gradient and no optimiser state), under bf16
    autocast."""
    run, images, labels = step_run("vit_small_patch16_224.dino", "proxy_anchor", optimizer, grad_clip=3.0,
                                   amp="bf16")
    run.model.freeze_patch_embedding()
    counts = [step_syncs(run, images, labels).ops for _ in range(2)]
    assert counts == [[], []]
    frozen = set(run.model.net.backbone.patch_embed.parameters())
    assert len(run.optimizer.state) == len(list(run.model.parameters())) - len(frozen)
    assert not frozen & set(run.optimizer.state)
