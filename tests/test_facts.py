"""The torch-free facts (`tune_upl.facts`) agree with the code that builds each backbone, loss and dataset, and
config validates against them without loading torch."""
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tune_upl import archives, facts, losses, models
from tune_upl.config import FIELD_NAMES, LOSS_SPECIFIC, losses_taking, make_config
from tune_upl.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_each_loss_takes_the_parameters_its_facts_list():
    assert set(losses.LOSSES) == set(facts.LOSS_PARAMETERS)
    for name, builder in losses.LOSSES.items():
        assert tuple(inspect.signature(builder).parameters) == facts.LOSS_PARAMETERS[name], name
    assert all(set(params) <= set(FIELD_NAMES) for params in facts.LOSS_PARAMETERS.values())
    assert not hasattr(losses, "LOSS_PARAMETERS")  # one table, in facts: no second copy beside the builders


def test_each_backbone_has_a_builder_whose_feature_map_is_as_wide_as_its_facts_say():
    assert set(models.BACKBONES) == set(facts.BACKBONES)
    for name, entry in models.BACKBONES.items():
        assert entry.facts is facts.BACKBONES[name] and callable(entry.build), name
    import torch

    with torch.no_grad():  # the small one is built here; test_models builds every backbone
        maps = models.BACKBONES["tiny"].build(None)(torch.zeros(1, 3, 32, 32))
    assert maps.shape[1] == facts.BACKBONES["tiny"].dim == 256


def test_published_weights_files_are_named_by_their_urls(tmp_path):
    assert facts.BACKBONES["resnet50"].weights_name == "resnet50-0676ba61.pth"
    assert facts.imagenet_file("inception", str(tmp_path)) == tmp_path / "bn_inception-52deb4733.pth"
    with pytest.raises(ConfigError, match="the tiny backbone has no ImageNet weights"):
        facts.imagenet_file("tiny", str(tmp_path))
    caffe = facts.BACKBONES["inception"].input
    assert (caffe.bgr, caffe.unit_scale, caffe.mean) == (True, False, (104.0, 117.0, 128.0))


def test_each_dataset_has_a_reader_and_its_facts():
    assert set(archives.DATASETS) == set(facts.DATASETS)
    for name, fmt in archives.DATASETS.items():
        assert fmt.facts is facts.DATASETS[name] and callable(fmt.read) and callable(fmt.locate), name
    assert [n for n, f in facts.DATASETS.items() if not f.has_boxes] == ["folder", "inshop", "sop"]
    assert [n for n, f in facts.DATASETS.items() if f.official_split] == ["inshop", "sop"]


def test_config_refuses_names_and_loss_fields_from_the_facts():
    with pytest.raises(ConfigError) as error:
        make_config(backbone_type="resnet51")
    assert str(error.value) == ("TrialConfig.backbone_type = 'resnet51': unknown backbone_type 'resnet51'; allowed: "
                                "deit3_small_patch16_224.fb_in22k_ft_in1k, deit_small_patch16_224.fb_in1k, googlenet, "
                                "inception, resnet18, resnet50, tiny, vit_base_patch16_224.dino, "
                                "vit_small_patch16_224.dino")
    with pytest.raises(ConfigError, match="unknown data_name 'cars'; allowed: car, cub, folder, inshop, sop, synthetic"):
        make_config(data_name="cars")
    with pytest.raises(ConfigError, match="loss_name proxy_nca has no margin; the losses that take it: balanced_proxy, "
                                          "proxy_anchor"):
        make_config(loss_name="proxy_nca", margin=0.2)
    assert losses_taking("loss_anchor") == ["balanced_proxy"]
    params = [set(p) for p in facts.LOSS_PARAMETERS.values()]
    assert set(LOSS_SPECIFIC) == set.union(*params) - set.intersection(*params)


def test_facts_and_config_load_no_torch():
    code = ("import json, sys; from tune_upl.config import make_config; import tune_upl.facts, tune_upl.archives, "
            "tune_upl.weights; make_config(backbone_type='resnet50', loss_name='proxy_anchor', data_name='cub'); "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(out.stdout.splitlines()[-1]) == []
