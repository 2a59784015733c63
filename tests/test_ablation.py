"""The Unified Proxy Loss's two design axes as options: each anchor × aggregation cell trains as
`UnifiedProxyLoss` with that cell, the loss-specific fields are refused where a loss has no such parameter
(a config, a `studies` product, a searched field, the command line), and the ablation spec plans its cells."""
import itertools
from pathlib import Path

import pytest
import torch
import yaml
from syncs import step_run

from tune_upl.cli import main
from tune_upl.config import make_config
from tune_upl.errors import ConfigError, SpecError
from tune_upl.losses import AGGREGATIONS, ANCHORS, UnifiedProxyLoss
from tune_upl.spec import parse_spec

ROOT = Path(__file__).resolve().parents[1]
CELLS = list(itertools.product(ANCHORS, AGGREGATIONS))


def test_each_cell_trains_one_step_through_trialconfig_as_the_unified_loss():
    """One optimisation step of the engine per cell (tiny backbone, one batch): its loss equals
    UnifiedProxyLoss(anchor, aggregation) on the step's own similarities; unset is the both/mean cell."""
    from tune_upl.engine import _step

    losses = {}
    for anchor, aggregation in [*CELLS, (None, None)]:
        run, images, labels = step_run("tiny", "balanced_proxy", "adamw", batch=8, scale=16.0, margin=0.2,
                                       loss_anchor=anchor, loss_aggregation=aggregation, feature_dim=16)
        run.model.train()
        with torch.no_grad():  # BatchNorm in train mode: batch statistics, the same the step sees
            similarities = run.model.head(run.forward(images))
        expected = UnifiedProxyLoss(16.0, 0.2, anchor or "both", aggregation or "mean")(similarities, labels)
        before = run.model.head.proxies.detach().clone() if hasattr(run.model.head, "proxies") else None
        losses[(anchor, aggregation)] = _step(run, images, labels).item()
        assert losses[(anchor, aggregation)] == pytest.approx(expected.item(), rel=1e-6, abs=1e-7)
        if before is not None:
            assert not torch.equal(before, run.model.head.proxies), "the step trained nothing"
    assert len({round(losses[cell], 6) for cell in CELLS}) == 6  # six different losses: the options take effect
    assert losses[(None, None)] == pytest.approx(losses[("both", "mean")], rel=1e-6)


@pytest.mark.parametrize("values, expected", [
    ({"loss_name": "proxy_nca", "margin": 0.25},
     "TrialConfig.margin = 0.25: loss_name proxy_nca has no margin; the losses that take it: balanced_proxy, "
     "proxy_anchor"),
    ({"loss_name": "proxy_anchor", "loss_anchor": "sample"},
     "TrialConfig.loss_anchor = 'sample': loss_name proxy_anchor has no loss_anchor; the losses that take it: "
     "balanced_proxy"),
    ({"loss_name": "normalized_softmax", "loss_aggregation": "sum"},
     "TrialConfig.loss_aggregation = 'sum': loss_name normalized_softmax has no loss_aggregation; the losses that "
     "take it: balanced_proxy"),
])
def test_a_loss_specific_field_is_refused_for_a_loss_without_it(values, expected):
    with pytest.raises(ConfigError) as error:
        make_config(values)
    assert str(error.value) == expected
    # at its default a field is no choice of the user's: every config carries margin 0.1
    assert make_config(loss_name="proxy_nca", margin=0.1).margin == 0.1
    assert make_config(loss_anchor="proxy", loss_aggregation="sum").loss_anchor == "proxy"


def test_the_command_line_refuses_it_in_one_line_with_exit_2(capsys):
    assert main(["train", "--loss_name", "proxy_nca", "--margin", "0.25"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: TrialConfig.margin = '0.25': loss_name proxy_nca has no margin; the losses that take it: "
        "balanced_proxy, proxy_anchor"]


def _spec(**changes):
    data = {"name": "x", "fixed": {"data_name": "synthetic", "backbone_type": "tiny"},
            "space": {"lr": {"loguniform": [1e-4, 1e-2]}}}
    return {**data, **changes}


@pytest.mark.parametrize("changes, expected", [
    ({"studies": {"loss_name": ["balanced_proxy", "proxy_anchor"], "loss_anchor": ["proxy", "both"]}},
     "spec: the combination loss_name=proxy_anchor (studies) with loss_anchor=proxy (studies) is refused: "
     "loss_name proxy_anchor has no loss_anchor; the losses that take it: balanced_proxy"),
    ({"studies": {"loss_name": ["proxy_nca", "balanced_proxy"]},
      "fixed": {"data_name": "synthetic", "margin": 0.2}},
     "spec: the combination loss_name=proxy_nca (studies) with margin=0.2 (fixed) is refused: loss_name "
     "proxy_nca has no margin; the losses that take it: balanced_proxy, proxy_anchor"),
    ({"studies": {"loss_name": ["balanced_proxy", "proxy_nca"]}, "space": {"margin": {"uniform": [0.0, 0.3]}}},
     "spec: space.margin: searched for loss_name proxy_nca (study loss_name=proxy_nca), which has no margin; "
     "give it when: {loss_name: [balanced_proxy, proxy_anchor]}"),
    ({"fixed": {"loss_name": "proxy_anchor"}, "space": {"loss_aggregation": {"choice": ["sum", "mean"]}}},
     "spec: space.loss_aggregation: searched for loss_name proxy_anchor, which has no loss_aggregation; give it "
     "when: {loss_name: [balanced_proxy]}"),
])
def test_a_spec_that_crosses_a_loss_with_a_field_it_lacks_is_refused(changes, expected):
    with pytest.raises(SpecError) as error:
        parse_spec(_spec(**changes))
    assert str(error.value) == expected


def test_the_cells_are_searchable_and_usable_under_studies():
    parse_spec(_spec(studies={"loss_name": ["proxy_nca", "balanced_proxy"]},
                     space={"margin": {"uniform": [0.0, 0.3], "when": {"loss_name": ["balanced_proxy"]}},
                            "loss_anchor": {"choice": list(ANCHORS), "when": {"loss_name": ["balanced_proxy"]}}}))
    spec = parse_spec(_spec(studies={"loss_anchor": ["proxy", "sample"], "loss_aggregation": ["sum", "mean"]}))
    assert len(spec.study_points()) == 4


def test_a_command_line_loss_against_a_searched_field_is_refused_at_dry_run(tmp_path, capsys):
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump(_spec(space={"margin": {"uniform": [0.0, 0.3]}})))
    assert main(["search", "--space", str(path), "--dry-run", "--loss_name", "proxy_nca"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: space.margin: searched for loss_name proxy_nca, which has no margin; give it when: "
        "{loss_name: [balanced_proxy, proxy_anchor]}"]


def test_the_ablation_spec_dry_run_shows_its_twelve_cells_with_one_budget(capsys):
    assert main(["search", "--space", str(ROOT / "search_spaces" / "upl_ablation.yaml"), "--dry-run"]) == 0
    studies = [line.strip() for line in capsys.readouterr().out.splitlines() if line.strip().startswith("study ")]
    assert len(studies) == 12
    cells = {tuple(part.split("=")[1] for part in line.split(":")[0].split(",")[1:]) for line in studies}
    assert cells == set(CELLS)
    assert {line.split(": ", 1)[1].split(",")[0] for line in studies} == {"24 trials"}
    assert all(line.endswith("searching scale, margin, lr, proxy_lr") and "up to 20 epochs" in line
               and "/resnet50/balanced_proxy," in line for line in studies)
    spec = yaml.safe_load((ROOT / "search_spaces" / "upl_ablation.yaml").read_text())
    assert (spec["scheduler"], spec["protocol"], spec["final_seeds"]) == (
        {"type": "asha", "grace_period": 4, "reduction_factor": 2}, "val", 3)
