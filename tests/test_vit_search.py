"""A small ViT search on the synthetic dataset, end to end: a real Ray Tune run of DINO ViT-S/16 (from random
weights, 32 px, one epoch) whose report sets the published rows of that backbone beside its results and
leaves out every other backbone's rows."""
from __future__ import annotations

import pytest
from experiments import trial_results

from tune_upl.references import load_references

VIT = "vit_small_patch16_224.dino"


def _rows(report: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in report.splitlines() if line.startswith("|")]


@pytest.mark.ray
def test_a_vit_search_report_shows_the_rows_of_its_backbone_only(ray_session, cache_dir, synthetic_root, tmp_path):
    from tune_upl.experiment import Options, run_search
    from tune_upl.report import write_report
    from tune_upl.spec import parse_spec

    spec = parse_spec({
        "name": "vit-small", "searcher": {"type": "random", "seed": 0}, "scheduler": {"type": "fifo"},
        "num_samples": 1, "max_concurrent": 1, "baseline": False, "final_seeds": 1,
        "fixed": {"data_name": "synthetic", "backbone_type": VIT, "pretrained": "none", "image_size": 32,
                  "num_epochs": 1, "warm_up": 0, "batch_size": 32, "feature_dim": 32, "num_workers": 0,
                  "optimizer": "adamw", "grad_clip": 3.0, "freeze_patch_embed": 1},
        "space": {"lr": {"loguniform": [1e-5, 1e-4]}},
    })
    experiment = run_search(spec, {"cache_dir": cache_dir}, Options(storage=tmp_path / "runs"))
    (final,) = [row for rows in trial_results(experiment / "trials", final=True).values() for row in rows]
    assert 0 <= final["test_recall@1"] <= final["test_recall@8"] <= 1
    report = write_report(experiment, tmp_path / "reports").read_text()
    references = report.split("## References", 1)[1]
    refs = load_references()
    ours = [r for r in refs.results if r.backbone == VIT]
    others = {r.backbone for r in refs.results} - {VIT}
    assert len(ours) == 4 and others >= {"resnet50", "inception", "googlenet"}
    rows = [row for row in _rows(references) if row[0] in {s.label for s in refs.sources.values()}]
    assert len(rows) == len(ours) and all(row[2] == VIT for row in rows)
    assert "Hyp-ViT paper" in references and "OML zoo" in references and "seed README" not in references
    assert "NOT the class-disjoint benchmark" in references  # OML's protocol column
    assert "| ViT-S/16 DINO |" in report.split("## References", 1)[0]  # the benchmark row names the backbone
