"""The command line as a user meets it: a subprocess, its output lines and its exit codes."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "run_search.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_train_prints_epochs_and_final_test(cache_dir, synthetic_root):
    # one thread: the other xdist worker has the other core
    out = run_cli("train", "--data_name", "synthetic", "--backbone-type", "tiny", "--image_size", "32",
                  "--num-epochs", "2", "--warm_up", "0", "--lr", "1e-3", "--cache-dir", cache_dir,
                  "--feature_dim", "32", "--num_threads", "1")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    epochs = [line for line in lines if line.startswith("epoch")]
    assert len(epochs) == 2 and "val R@1" in epochs[0] and "img/s" in epochs[0]
    assert any(line.startswith("test after epoch 2") and "R@8" in line for line in lines)


def test_seed_protocol_reports_the_test_selected_best_epoch(cache_dir, synthetic_root):
    out = run_cli("train", "--data_name", "synthetic", "--backbone_type", "tiny", "--image_size", "32",
                  "--num_epochs", "2", "--warm_up", "0", "--cache_dir", cache_dir, "--protocol", "seed",
                  "--feature_dim", "16", "--num_threads", "1")
    assert out.returncode == 0, out.stderr
    assert "test R@1" in out.stdout.splitlines()[1]
    assert "best epoch" in out.stdout and "test-selected" in out.stdout


def test_bad_option_value_is_one_line_and_exit_2():
    out = run_cli("train", "--feature-dim", "0")
    assert out.returncode == 2
    assert out.stderr.strip() == "error: TrialConfig.feature_dim = '0': Input should be greater than or equal to 1"


def test_bad_spec_fails_before_ray_starts(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text("name: bad\nspace:\n  lr: {loguniform: [0.1, 0.01]}\n")
    out = run_cli("search", "--space", str(spec), "--storage", str(tmp_path / "runs"))
    assert out.returncode == 2
    assert out.stderr.strip() == f"error: {spec}: space.lr: low must be below high, got [0.1, 0.01]"
    assert not (tmp_path / "runs").exists() and "Traceback" not in out.stderr


def test_missing_dataset_is_named():
    out = run_cli("train", "--data_name", "cub", "--data_path", "/nonexistent")
    assert out.returncode == 2 and "CUB-200-2011 not found: expected /nonexistent/cub/images.txt" in out.stderr


def test_report_of_unknown_experiment_is_named(tmp_path):
    out = run_cli("report", "--name", "nope", "--storage", str(tmp_path))
    assert out.returncode == 2
    assert out.stderr.strip() == f"error: no experiment at {tmp_path}/nope (missing search_spec.json); check --name and --storage"


def test_help_shows_every_fields_description_and_default(capsys):
    """`--help` is generated from the TrialConfig field descriptions: one source, so it cannot go stale."""
    import pytest

    from tune_upl.cli import main
    from tune_upl.config import FIELD_DEFAULTS, FIELD_HELP

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for name, description in FIELD_HELP.items():
        default = FIELD_DEFAULTS[name]
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else "unset" if default is None else default
        assert f"{' '.join(description.split())} [default: {shown}]" in text, name
    assert "[default: None]" not in text  # an unset field says so in words
