"""What a laptop without a training set-up runs: spec validation, `search --dry-run` and `report` of a finished
experiment, each in a process where importing torch or Ray raises (a finder on `sys.meta_path`, installed by a
`sitecustomize.py` on PYTHONPATH)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKER = '''import sys


class NoTorchNoRay:
    """Refuses torch and Ray, and every submodule of them."""

    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in ("torch", "ray"):
            raise ImportError(f"{top} is not to be imported here")
        return None


sys.meta_path.insert(0, NoTorchNoRay())
'''


@pytest.fixture
def env(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    path = os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**os.environ, "PYTHONPATH": path, "RAY_AUTH_MODE": "disabled"}


def run(env, *args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def errors(stderr):
    """stderr's `error:` lines (a version warning may stand beside them)."""
    return [line for line in stderr.splitlines() if not line.startswith("warning:")]


def test_the_blocker_refuses_torch_and_ray(env):
    for module in ("torch", "ray.tune", "torchvision"):
        out = run(env, "-c", f"import {module}")
        assert out.returncode == 1 and out.stderr.strip().endswith("is not to be imported here"), module


def test_dry_run_needs_neither_torch_nor_ray(env, tmp_path):
    out = run(env, "run_search.py", "search", "--dry-run", "--storage", str(tmp_path / "runs"),
              "--reports-dir", str(tmp_path / "reports"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert errors(out.stderr) == []
    lines = out.stdout.splitlines()
    assert lines[0].startswith("experiment demo: tpe + asha, objective val_recall@1 (max), protocol val, all 1 study "
                               "in one run: up to 2 trials at once (2 per study)")
    assert lines[1].startswith("  study main: 8 trials, up to 4 epochs each, synthetic/tiny/balanced_proxy")


@pytest.mark.parametrize("fixed, message", [
    ("{backbone_type: resnet51}", "fixed.backbone_type = 'resnet51': unknown backbone_type 'resnet51'; allowed: "
                                  "deit3_small_patch16_224.fb_in22k_ft_in1k, deit_small_patch16_224.fb_in1k, "
                                  "googlenet, inception, resnet18, resnet50, tiny, vit_base_patch16_224.dino, "
                                  "vit_small_patch16_224.dino"),
    ("{loss_name: proxy_nca, margin: 0.2}", "the combination loss_name=proxy_nca (fixed) with margin=0.2 (fixed) is "
                                            "refused: loss_name proxy_nca has no margin; the losses that take it: "
                                            "balanced_proxy, proxy_anchor"),
])
def test_a_bad_spec_is_one_error_without_torch(env, tmp_path, fixed, message):
    spec = tmp_path / "bad.yaml"
    spec.write_text(f"name: bad\nfixed: {fixed}\n")
    out = run(env, "run_search.py", "search", "--dry-run", "--space", str(spec), "--storage", str(tmp_path / "runs"))
    assert out.returncode == 2
    assert errors(out.stderr) == [f"error: {spec}: {message}"]
    assert out.stdout == ""


def test_report_of_a_finished_experiment_needs_neither_torch_nor_ray(env, demo_search, tmp_path):
    _, experiment, _ = demo_search
    reports = tmp_path / "reports"
    out = run(env, "run_search.py", "report", "--name", "demo", "--storage", str(experiment.parent),
              "--reports-dir", str(reports))
    assert out.returncode == 0, out.stderr[-3000:]
    assert errors(out.stderr) == [] and out.stdout.strip() == str(reports / "demo.md")
    text = (reports / "demo.md").read_text()
    assert "- status: complete" in text and "## Not drawn" not in text
    assert "![retrieval: query and its top 8](demo/retrieval_synthetic.png)" in text
    # the picture is the one the final run with the lowest seed drew when it ended
    finals = sorted(experiment.glob("trials/*.final/checkpoint_*/retrieval.png"))
    drawn = {p.read_bytes() for p in finals}
    assert len(finals) == 2 and (reports / "demo" / "retrieval_synthetic.png").read_bytes() in drawn
