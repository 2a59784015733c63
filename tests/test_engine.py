"""One training run on the embedded dataset: it must learn from an untrained floor near chance. Tests of a
schedule, a checkpoint or a precision path train a few batches of an epoch (`small_run`), not whole epochs;
how fast the loop is belongs to the benchmark's train suite, measured beside a bare loop."""
import pytest
import torch
from fake_cuda import fake_cuda

from tune_upl.config import make_config
from tune_upl.engine import build_run, evaluate, final_test, load_state, save_state, train_epoch
from tune_upl.errors import CheckpointError


def test_five_cpu_epochs_lift_test_recall_well_above_untrained(tiny_values):
    cfg = make_config(tiny_values, num_epochs=5, lr=1e-3, feature_dim=128, image_size=48)
    run = build_run(cfg)
    untrained = final_test(run)["test_recall@1"]
    history = [train_epoch(run) for _ in range(cfg.num_epochs)]
    trained = final_test(run)["test_recall@1"]
    print(f"untrained {untrained:.3f} -> trained {trained:.3f}")
    assert untrained <= 0.15
    assert trained >= untrained + 0.20
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5]
    assert all("val_recall@1" in h and "test_recall@1" not in h for h in history)  # epochs never see test
    assert history[0]["lr"] == 1e-3 and history[0]["proxy_lr"] == 1e-2


def test_warm_up_freezes_the_backbone_then_releases_it(tiny_values, small_run):
    run = small_run(make_config(tiny_values, num_epochs=2, warm_up=1, feature_dim=32, lr=1e-3, image_size=32))
    backbone = [p.detach().clone() for p in run.model.backbone_parameters()]
    embedding = run.model.net.embedding.weight.detach().clone()
    train_epoch(run)
    assert all(torch.equal(a, b) for a, b in zip(backbone, run.model.backbone_parameters()))
    assert not torch.equal(embedding, run.model.net.embedding.weight)
    train_epoch(run)
    assert not all(torch.equal(a, b) for a, b in zip(backbone, run.model.backbone_parameters()))


def test_step_lr_halves_every_lr_step_epochs(tiny_values, small_run):
    run = small_run(make_config(tiny_values, num_epochs=5, lr_step=2, feature_dim=16, lr=1e-3, image_size=32),
                    train_batches=1, eval_images=16)
    history = [train_epoch(run) for _ in range(5)]
    assert [h["lr"] for h in history] == [1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4]
    assert [h["proxy_lr"] for h in history] == [1e-2, 1e-2, 5e-3, 5e-3, 2.5e-3]


def test_checkpoint_restores_and_continues_identically(tiny_values, small_run, tmp_path):
    """A restarted trial continues at the next epoch exactly as if it had not stopped."""
    cfg = make_config(tiny_values, num_epochs=2, feature_dim=16, lr=1e-3, image_size=32)
    straight = small_run(cfg, train_batches=3)
    train_epoch(straight)
    save_state(straight, tmp_path / "state.pt")
    expected = train_epoch(straight)
    resumed = small_run(cfg, train_batches=3)
    resumed.load_state_dict(load_state(tmp_path / "state.pt"))
    assert resumed.epoch == 1
    again = train_epoch(resumed)
    assert again["epoch"] == 2
    assert again["train_loss"] == expected["train_loss"]
    assert again["val_recall@1"] == expected["val_recall@1"]


def test_every_epoch_reports_map_at_r_and_r_precision(tiny_values, small_run):
    run = small_run(make_config(tiny_values, num_epochs=1, feature_dim=16, lr=1e-3, optimizer="adamw", image_size=32))
    metrics = train_epoch(run)
    assert 0 < metrics["val_map@r"] <= metrics["val_r_precision"] <= 1
    assert set(metrics) >= {"val_recall@1", "val_recall@8", "val_map@r", "val_r_precision", "train_loss", "lr"}


def test_bf16_autocast_and_sgd_train_with_finite_float32_loss(tiny_values, small_run):
    """bf16 is emulated (slow) on CPUs without native bf16: two batches of 16 at 32 px keep this to seconds."""
    cfg = make_config(tiny_values, num_epochs=1, feature_dim=16, lr=1e-2, optimizer="sgd", amp="bf16",
                      image_size=32, batch_size=16)
    run = small_run(cfg, train_batches=2, eval_images=32)
    assert run.amp_dtype == torch.bfloat16 and isinstance(run.optimizer, torch.optim.SGD)
    seen = []
    hook = run.model.net.backbone.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    metrics = train_epoch(run)
    hook.remove()
    assert seen and all(dtype == torch.bfloat16 for dtype in seen)  # the network ran under bf16 autocast
    assert torch.isfinite(torch.tensor(metrics["train_loss"])) and metrics["val_recall@1"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("loss_name", ["balanced_proxy", "proxy_anchor", "proxy_nca", "normalized_softmax"])
def test_each_loss_lifts_validation_recall_over_the_untrained_model(tiny_values, loss_name):
    run = build_run(make_config(tiny_values, num_epochs=5, lr=1e-3, feature_dim=128, loss_name=loss_name, scale=16))
    untrained = evaluate(run, run.eval_loader, "val")["val_recall@1"]
    best = max(train_epoch(run)["val_recall@1"] for _ in range(5))
    print(f"{loss_name}: untrained {untrained:.3f} -> best {best:.3f}")
    assert best >= untrained + 0.10


def test_final_stage_trains_on_all_training_classes_and_tests_once_at_the_end(tiny_values, small_run):
    search = build_run(make_config(tiny_values, num_epochs=2, feature_dim=16))
    final_cfg = make_config(tiny_values, num_epochs=2, feature_dim=16, final=True, image_size=32)
    assert build_run(final_cfg).train_loader.dataset.num_classes == (
        search.train_loader.dataset.num_classes + len(search.splits.val_classes))
    final = small_run(final_cfg)
    first, last = train_epoch(final), train_epoch(final)
    assert not any(k.startswith(("val_", "test_")) for k in first)
    assert {"test_recall@1", "test_map@r"} <= set(last) and not any(k.startswith("val_") for k in last)


def test_an_unreadable_checkpoint_is_named(tmp_path):

    bad = tmp_path / "state.pt"
    bad.write_bytes(b"\x00 not a checkpoint")
    with pytest.raises(CheckpointError, match=f"unreadable checkpoint {bad}"):
        load_state(bad)
    code = tmp_path / "code.pt"
    torch.save({"hook": print}, code)  # pickled code: refused by weights_only loading
    with pytest.raises(CheckpointError, match="unreadable checkpoint"):
        load_state(code)


@pytest.mark.parametrize("capability, expected", [((8, 0), torch.bfloat16), ((7, 5), torch.float16)])
def test_auto_precision_takes_bf16_only_where_the_gpu_has_it_natively(capability, expected):
    """A T4 (7.5) reports bf16 as supported when emulation counts (torch's default); `amp: auto` must then
    take fp16 with a grad scaler, not the slow emulated bf16. The GPU is the CUDA stand-in beneath torch, so
    torch's own capability check decides."""
    from tune_upl.engine import resolve_amp

    with fake_cuda(capability=capability):
        assert resolve_amp("auto", torch.device("cuda", 0)) == expected
        assert resolve_amp("bf16", torch.device("cuda", 0)) == torch.bfloat16
    assert resolve_amp("auto", torch.device("cpu")) is None
