"""Vision Transformer backbones through timm: their facts are timm's pretrained configuration; stand-in weight
files with the published names and shapes (never downloaded) load through the product's path, `pretrained:
auto` and a file, into what timm's own `pretrained_cfg_overlay=dict(file=...)` route loads; a wrong file is one
error naming the file, the key and the shapes; options a ViT cannot take are refused; a ViT-S/16 trains an
epoch on the synthetic dataset at 32 px with the ViT options (cosine warm-up, clipping, a frozen patch embedding).
ViT-B/16's stand-in (344 MB) is in the slow run."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.stand_ins import write_vit_stand_in
from tune_upl.config import make_config
from tune_upl.engine import EpochFactor, build_run, train_epoch
from tune_upl.errors import ConfigError, WeightsMissing
from tune_upl.facts import BACKBONES, is_vit
from tune_upl.models import build_model

VITS = [name for name in BACKBONES if is_vit(name)]
BASE = "vit_base_patch16_224.dino"
SMALL = [name for name in VITS if name != BASE]
ROOT = Path(__file__).parents[1]


def _timm_model(name: str, num_classes: int, image_size: int = 224) -> torch.nn.Module:
    import timm

    return timm.create_model(name, pretrained=False, num_classes=num_classes, img_size=image_size)


def _timm_route(name: str, file: Path, image_size: int) -> dict[str, torch.Tensor]:
    """What timm itself loads from the file: `pretrained_cfg_overlay=dict(file=...)`, as the issue names it."""
    import timm

    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(file)), num_classes=0,
                              global_pool="token", img_size=image_size)
    return model.state_dict()


@pytest.mark.parametrize("name", VITS)
def test_facts_are_timms_pretrained_configuration(name):
    import timm

    cfg, facts = timm.models.get_pretrained_cfg(name), BACKBONES[name]
    assert facts.weights_url == cfg.url and facts.weights_name == cfg.url.rsplit("/", 1)[-1]
    assert facts.interpolation == cfg.interpolation == "bicubic"
    assert math.isclose(facts.test_resize, 1 / cfg.crop_pct)
    assert (facts.input.mean, facts.input.std) == (tuple(cfg.mean), tuple(cfg.std))
    assert cfg.input_size == (3, 224, 224) and facts.patch_size == 16
    assert facts.dim == _timm_model(name, 0).num_features
    assert ("21k" in facts.pretraining) == ("in22k" in name)  # ImageNet-21k is said, for CUB's overlap


def _load_both_ways(name: str, tmp_path: Path, image_size: int) -> None:
    folder = tmp_path / "weights"
    folder.mkdir()
    file = write_vit_stand_in(name, folder)
    expected = _timm_route(name, file, image_size)
    common = dict(backbone_type=name, image_size=image_size, weights_dir=str(folder))
    by_auto = build_model(make_config(common, pretrained="auto"), 3).net.backbone.state_dict()
    by_path = build_model(make_config(common, pretrained=str(file)), 3).net.backbone.state_dict()
    fresh = build_model(make_config(common, pretrained="none"), 3).net.backbone.state_dict()
    assert set(by_auto) == set(expected) == set(by_path)
    for key, value in expected.items():
        assert torch.equal(by_auto[key], value) and torch.equal(by_path[key], value), key
    assert not torch.equal(fresh["blocks.0.attn.qkv.weight"], expected["blocks.0.attn.qkv.weight"])
    tokens = (image_size // 16) ** 2 + (0 if name.startswith("deit3") else 1)  # DeiT-III: no class pos_embed
    assert by_auto["pos_embed"].shape[1] == tokens


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("image_size", [224, 32], ids=["224px", "32px-pos-embed-resampled"])
def test_a_stand_in_file_loads_as_timm_loads_it(name, image_size, tmp_path):
    _load_both_ways(name, tmp_path, image_size)


@pytest.mark.slow
def test_vit_base_dino_stand_in_loads_as_timm_loads_it(tmp_path):
    """ViT-B/16's published file is 344 MB: its stand-in is as large, so it loads in the slow run only."""
    _load_both_ways(BASE, tmp_path, 224)
    assert (tmp_path / "weights" / "dino_vitbase16_pretrain.pth").stat().st_size > 340e6


def test_a_wrong_file_is_one_error_naming_the_file_the_key_and_the_shapes(tmp_path):
    name = "vit_small_patch16_224.dino"
    file = write_vit_stand_in(name, tmp_path)
    state = torch.load(file, weights_only=True)
    state["blocks.3.mlp.fc1.weight"] = torch.zeros(768, 384)
    torch.save(state, file)
    with pytest.raises(ConfigError) as error:
        build_model(make_config(backbone_type=name, pretrained=str(file), image_size=32), 3)
    message = str(error.value)
    assert str(file) in message and "blocks.3.mlp.fc1.weight" in message
    assert "(768, 384)" in message and "(1536, 384)" in message and "\n" not in message


def test_another_models_file_names_its_missing_keys(tmp_path):
    """A ResNet's file given for a ViT: keys, not shapes, are wrong; one line names the file and examples."""
    file = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(1000, 2048)}, file)
    with pytest.raises(ConfigError) as error:
        build_model(make_config(backbone_type="deit_small_patch16_224.fb_in1k", pretrained=str(file), image_size=32), 3)
    message = str(error.value)
    assert str(file) in message and "keys of the backbone missing" in message and "conv1.weight" in message


def test_a_missing_file_names_it_and_its_url(tmp_path):
    name = "deit3_small_patch16_224.fb_in22k_ft_in1k"
    with pytest.raises(WeightsMissing) as error:
        build_model(make_config(backbone_type=name, weights_dir=str(tmp_path), image_size=32), 3)
    assert f"deit_3_small_224_21k.pth in {tmp_path}" in str(error.value)
    assert BACKBONES[name].weights_url in str(error.value)
    with pytest.raises(ConfigError, match="no such file"):
        build_model(make_config(backbone_type=name, pretrained=str(tmp_path / "nope.pth"), image_size=32), 3)


@pytest.mark.parametrize("values, message", [
    (dict(backbone_type="vit_small_patch16_224.dino", pooling="avg"), "takes no pooling"),
    (dict(backbone_type="vit_small_patch16_224.dino", freeze_bn=True), "takes no freeze_bn"),
    (dict(backbone_type="resnet50", freeze_patch_embed=2), "takes no freeze_patch_embed"),
    (dict(backbone_type="vit_small_patch16_224.dino", image_size=40), "not a multiple of"),
    (dict(lr_schedule="cosine", lr_warmup_epochs=20, num_epochs=20), "leaves no epoch"),
], ids=["pooling", "freeze_bn", "patch-embed-on-cnn", "image-size", "warm-up-too-long"])
def test_options_a_backbone_cannot_take_are_refused(values, message):
    with pytest.raises(ConfigError, match=message):
        make_config(values)


def test_the_command_line_refuses_pooling_for_a_vit(tmp_path):
    result = subprocess.run([sys.executable, "run_search.py", "train", "--data_name", "synthetic", "--backbone_type",
                             "vit_small_patch16_224.dino", "--pooling", "avg", "--cache_dir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "takes no pooling" in result.stderr and "vit_small_patch16_224.dino" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_spec_searching_pooling_for_a_vit_is_refused():
    from tune_upl.errors import SpecError
    from tune_upl.spec import parse_spec

    spec = {"name": "v", "objective": {"metric": "val_recall@1", "mode": "max"}, "num_samples": 2,
            "fixed": {"backbone_type": "vit_small_patch16_224.dino"}, "space": {"pooling": {"choice": ["max", "avg"]}}}
    with pytest.raises(SpecError, match="space.pooling: searched for backbone_type vit_small_patch16_224.dino"):
        parse_spec(spec)


def test_epoch_factor_warms_up_then_follows_the_cosine():
    factor = EpochFactor("cosine", epochs=6, warmup=2, step=5, gamma=0.5)
    assert [factor(i) for i in range(6)] == pytest.approx(
        [1 / 3, 2 / 3, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))])
    assert [EpochFactor("step", 6, 1, 2, 0.5)(i) for i in range(6)] == [0.5, 1, 1, 0.5, 0.5, 0.25]
    assert [EpochFactor("constant", 6, 0, 2, 0.5)(i) for i in range(6)] == [1.0] * 6


def test_a_vit_s_trains_an_epoch_on_the_synthetic_dataset(tiny_values, small_run):
    """The real loop at 32 px (4 patches): the recipe's kind of run (AdamW, clipping to norm 3, cosine with a
    warm-up epoch, the patch embedding frozen for the first epoch), a whole epoch then a second on a slice."""
    cfg = make_config(tiny_values, backbone_type="vit_small_patch16_224.dino", pretrained="none", image_size=32,
                      batch_size=32, num_epochs=3, optimizer="adamw", lr=2e-4, lr_schedule="cosine",
                      lr_warmup_epochs=1, grad_clip=3.0, freeze_patch_embed=1, feature_dim=64)
    run = build_run(cfg)
    assert not run.channels_last and run.model.net.pooling == "max"  # the pooling default is not used
    patch = run.model.net.backbone.patch_embed.proj.weight.detach().clone()
    block = run.model.net.backbone.blocks[0].attn.qkv.weight.detach().clone()
    first = train_epoch(run)
    assert torch.equal(patch, run.model.net.backbone.patch_embed.proj.weight)  # frozen in epoch 1
    assert not torch.equal(block, run.model.net.backbone.blocks[0].attn.qkv.weight)
    assert first["lr"] == pytest.approx(1e-4) and math.isfinite(first["train_loss"])  # warm-up: half the lr
    assert 0 <= first["val_recall@1"] <= 1 and first["images_per_s"] > 0
    second = small_run(cfg)  # the same start (same seed), two batches of epoch 2: the patch embedding trains
    assert torch.equal(patch, second.model.net.backbone.patch_embed.proj.weight)
    second.epoch = 1
    train_epoch(second)
    assert second.model.net.backbone.patch_embed.proj.weight.requires_grad
    assert not torch.equal(patch, second.model.net.backbone.patch_embed.proj.weight)


@pytest.mark.slow
def test_a_vit_s_lifts_test_recall_above_untrained(tiny_values):
    """From random weights (no published file here) at 32 px, 4 patches an image: eight epochs of the real loop
    lift the test classes' Recall@1 well above the untrained model's, which sits near chance. A ViT from
    scratch on 760 images learns only from crops of nearly the whole image (`crop_scale` 1.0: at the seed's
    0.08 or the ViT recipe's 0.2 its test Recall@1 stays near chance here; the CNN's inductive bias is what
    makes `tiny` learn from small crops)."""
    from tune_upl.engine import final_test

    cfg = make_config(tiny_values, backbone_type="vit_small_patch16_224.dino", pretrained="none", image_size=32,
                      batch_size=32, num_epochs=8, optimizer="adamw", lr=1e-4, proxy_lr=1e-2, lr_schedule="constant",
                      grad_clip=3.0, crop_scale=1.0, feature_dim=128)
    run = build_run(cfg)
    untrained = final_test(run)["test_recall@1"]
    history = [train_epoch(run) for _ in range(cfg.num_epochs)]
    trained = final_test(run)["test_recall@1"]
    print(f"untrained {untrained:.3f} -> trained {trained:.3f}")
    assert untrained <= 0.06
    assert trained >= untrained + 0.06
    assert history[-1]["train_loss"] < history[0]["train_loss"] - 1.0


def test_a_vit_studys_benchmark_table_sets_other_methods_published_rows_beside_it():
    """A tested ViT-S/16 DINO study on CUB: Hyp-ViT's and OML's rows of that backbone stand beside it as rows of
    their own, marked (published); no CNN row, and no row of another ViT (Hyp-ViT's ImageNet-21k ViT-S)."""
    from test_ablation import _data, _final
    from test_report import cells_of

    from tune_upl.references import load_references
    from tune_upl.report import benchmark_tables, experiment_backbones, references_section

    final = _final("vit", [0.70, 0.72], dim=384, data_name="cub", backbone_type="vit_small_patch16_224.dino",
                   loss_name="proxy_anchor")
    data = _data([final])
    text = "\n".join(benchmark_tables(data, load_references()))
    rows = {cells[1]: cells for cells in cells_of(text, "ViT-S/16 DINO") if len(cells) == 9}
    assert set(rows) == {"proxy_anchor", "hyp_vit_pairwise (published)", "triplet (published)"}
    assert rows["hyp_vit_pairwise (published)"][3:8] == ["80.9", "-", "-", "-", "-"]
    assert rows["triplet (published)"][3] == "83.7" and rows["proxy_anchor"][-1] == "-"
    assert "85.6" not in text and "ResNet" not in text  # the 21k ViT-S's row, the CNNs' rows
    assert experiment_backbones(data) == {"vit_small_patch16_224.dino"}
    references = "\n".join(references_section(load_references(), experiment_backbones(data)))
    assert "Hyp-ViT paper" in references and "seed README" not in references and "85.6" not in references


def test_the_plan_names_where_a_vit_study_departs_from_its_training_recipe(tmp_path):
    """A ViT study that fixes little trains with the seed's CNN settings: `--dry-run` says which, beside the
    recipe's values; vit_optuna.yaml departs in its epochs only (a patch embedding frozen throughout is
    frozen throughout, whatever the number)."""
    spec = tmp_path / "vit.yaml"
    spec.write_text("name: v\nobjective: {metric: val_recall@1, mode: max}\nnum_samples: 2\n"
                    "fixed: {backbone_type: vit_small_patch16_224.dino, data_name: synthetic, optimizer: adamw}\n"
                    "space: {lr: {loguniform: [1.0e-6, 1.0e-4]}}\n")
    runs = [subprocess.run([sys.executable, "run_search.py", "--space", str(path), "--dry-run"], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
            for path in (spec, ROOT / "search_spaces" / "vit_optuna.yaml")]
    assert [run.returncode for run in runs] == [0, 0], runs[1].stderr
    (note,) = [line for line in runs[0].stdout.splitlines() if "note:" in line]
    assert "weight_decay 0.0 (recipe 0.01), lr_schedule 'step' (recipe 'constant'), grad_clip 0.0 (recipe 3.0)" in note
    fields = [part.split(" ")[0] for part in note.split("backbone_recipes): ")[1].split("; fix")[0].split(", ")]
    assert fields == ["proxy_lr", "weight_decay", "lr_schedule", "grad_clip", "freeze_patch_embed", "warm_up",
                      "batch_size", "num_epochs", "crop_scale"]  # not optimizer (fixed as the recipe), nor lr (searched)
    notes = [line for line in runs[1].stdout.splitlines() if "note:" in line]
    assert len(notes) == 4 and all(line.endswith("num_epochs 40 (recipe 100); fix them in the spec to train as the "
                                                 "recipe does") for line in notes)


def test_a_cosine_schedule_with_warm_up_resumes_from_a_checkpoint(tiny_values, small_run, tmp_path):
    """The LambdaLR of `EpochFactor` saves and loads with the run (weights_only): a restored run trains its
    next epoch at the learning rate the uninterrupted one does. The tiny CNN: the schedule is the same."""
    from tune_upl.engine import load_state, save_state

    cfg = make_config(tiny_values, num_epochs=5, lr=1e-3, lr_schedule="cosine", lr_warmup_epochs=2, image_size=32,
                      feature_dim=16)
    run = small_run(cfg)
    lrs = [train_epoch(run)["lr"] for _ in range(2)]
    save_state(run, tmp_path / "state.pt")
    third = train_epoch(run)["lr"]
    restored = small_run(cfg)
    restored.load_state_dict(load_state(tmp_path / "state.pt"))
    assert train_epoch(restored)["lr"] == pytest.approx(third)
    assert lrs + [third] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3])  # warm-up 1/3, 2/3, then the cosine's top
    assert restored.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi / 3)))
