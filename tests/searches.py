"""The small real search the tests share: the demo spec at reduced size (3 trials of 2 epochs, 2 final seeds)."""
from pathlib import Path

from tune_upl.spec import load_spec, parse_spec

DEMO = Path(__file__).resolve().parents[1] / "search_spaces" / "demo.yaml"
SAMPLES = 3


def small_demo():
    spec = load_spec(DEMO)
    data = spec.model_dump()
    data["num_samples"] = SAMPLES
    data["final_seeds"] = 2
    data["fixed"] = {**data["fixed"], "num_epochs": 2, "image_size": 48}
    return parse_spec(data)
