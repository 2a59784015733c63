"""The small real searches the tests share: the demo spec at reduced size (3 trials of 2 epochs at 32 px, 2 final
seeds), and `MINI`, a one-parameter TPE search the driver tests (resume, storage) run from a YAML file."""
from pathlib import Path
from typing import Any

import yaml

from tune_upl.spec import SearchSpec, load_spec, parse_spec

DEMO = Path(__file__).resolve().parents[1] / "search_spaces" / "demo.yaml"
SAMPLES = 3
MINI: dict[str, Any] = {
    "name": "mini",
    "objective": {"metric": "val_recall@1", "mode": "max"},
    "searcher": {"type": "tpe", "seed": 0, "n_startup_trials": 2},
    "scheduler": {"type": "fifo"},
    "num_samples": 3,
    "max_concurrent": 1,
    "final_seeds": 2,
    "fixed": {"data_name": "synthetic", "backbone_type": "tiny", "image_size": 32, "num_epochs": 3, "warm_up": 0,
              "feature_dim": 16, "num_workers": 0},
    "space": {"lr": {"loguniform": [1.0e-4, 1.0e-2]}},
}


def small_demo() -> SearchSpec:
    spec = load_spec(DEMO)
    data = spec.model_dump()
    data["num_samples"] = SAMPLES
    data["final_seeds"] = 2
    data["fixed"] = {**data["fixed"], "num_epochs": 2, "image_size": 32}
    return parse_spec(data)


def write_spec(folder: Path, **changes: Any) -> Path:
    """`MINI` with `changes` as `<folder>/mini.yaml`: the driver tests start the command line on a file."""
    path = folder / "mini.yaml"
    path.write_text(yaml.safe_dump({**MINI, **changes}))
    return path


ABLATION_DEMO = DEMO.with_name("ablation_demo.yaml")


def small_ablation() -> SearchSpec:
    """`ablation_demo.yaml` at its smallest: 2 cells (Proxy-Anchor's corner and both/sum), 2 trials of 1 epoch
    each over two feature dims, 2 final seeds (the fewest a Welch interval needs)."""
    data = load_spec(ABLATION_DEMO).model_dump()
    data.update(num_samples=2, final_seeds=2, studies={"loss_anchor": ["proxy", "both"]})
    data["fixed"] = {**data["fixed"], "loss_aggregation": "sum", "num_epochs": 1}
    data["space"] = {**data["space"], "feature_dim": {"choice": [16, 64]}}
    return parse_spec(data)
