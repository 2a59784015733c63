"""The GPU check (`scripts/gpu_check.sh`, `benchmarks/gpu_check.py`) on a machine like the lent GPU machine:
only `python3` on PATH (a `python` there fails loudly), a PEP 668 "externally managed" interpreter, and here
no CUDA: its dry mode (`--cpu`) runs every part through the trial loop on the CPU. The interpreter is this
one's binary in a folder of its own whose stdlib links to the real one, with the site-packages each case needs."""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Callable

import psutil
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
CARRIED = ("pydantic", "pydantic_core", "annotated_types", "typing_inspection", "adamp", "pretrainedmodels", "munch",
           "timm")


def externally_managed_python(root: Path, keep: Callable[[str], bool]) -> Path:
    """A non-venv python3 under `root` marked EXTERNALLY-MANAGED, seeing the site-packages entries `keep` takes."""
    stdlib, site = Path(sysconfig.get_path("stdlib")), Path(sysconfig.get_path("purelib"))
    (root / "bin").mkdir(parents=True)
    shutil.copy2(os.path.realpath(sys.executable), root / "bin" / "python3")
    lib = root / "lib" / stdlib.name
    (lib / "site-packages").mkdir(parents=True)
    for entry in stdlib.iterdir():
        if entry.name != "site-packages":
            (lib / entry.name).symlink_to(entry)
    for entry in site.iterdir():
        if keep(entry.name):
            (lib / "site-packages" / entry.name).symlink_to(entry)
    (lib / "EXTERNALLY-MANAGED").write_text("[externally-managed]\nError=a simulated PEP 668 system Python\n")
    return root / "bin" / "python3"


def run_script(tmp_path: Path, python3: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """The script with a PATH whose only Python is `python3` (its own folder, so that a venv made from it
    finds its prefix; a `python` beside it exits 99)."""
    (python3.parent / "python").write_text("#!/bin/sh\necho 'python called' >&2\nexit 99\n")
    (python3.parent / "python").chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "PIP_"))}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=600,
                          env={**clean, "PATH": f"{python3.parent}:/usr/bin:/bin", "TMPDIR": str(tmp_path), **env})


def test_no_torch_or_no_torchvision_is_one_line(tmp_path):
    bare = run_script(tmp_path / "a", externally_managed_python(tmp_path / "a" / "py", lambda name: False))
    assert bare.returncode == 3 and bare.stdout == ""
    assert bare.stderr.splitlines() == [f"gpu_check: torch missing: {tmp_path}/a/py/bin/python3 cannot import it; "
                                        "use a Python with PyTorch and torchvision"]
    no_vision = externally_managed_python(tmp_path / "b" / "py", lambda name: not name.startswith("torchvision"))
    result = run_script(tmp_path / "b", no_vision)
    assert result.returncode == 3 and len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("gpu_check: torchvision missing:")


def test_a_missing_package_without_carried_wheels_is_one_line(tmp_path):
    python3 = externally_managed_python(tmp_path / "py", lambda name: not name.startswith(("adamp", "munch")))
    result = run_script(tmp_path, python3, GPU_WHEELS=str(tmp_path / "none"))
    assert result.returncode == 3 and result.stderr.splitlines() == [
        f"gpu_check: missing adamp munch and no wheels in {tmp_path}/none/: run scripts/gpu_wheels.sh here and "
        "carry .gpu_wheels"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the check goes on to measure")
def test_without_cuda_the_check_says_so_in_one_line(tmp_path):
    python3 = externally_managed_python(tmp_path / "py", lambda name: True)
    result = run_script(tmp_path, python3, OUT=str(tmp_path / "out"))
    assert result.returncode == 4 and result.stdout == "" and not (tmp_path / "out").exists()
    assert result.stderr.splitlines() == [f"gpu_check: no CUDA: torch {torch.__version__} of {python3} sees "
                                          "no GPU; nothing measured (--cpu runs the dry mode)"]


def test_a_part_past_its_deadline_is_killed_and_failed_in_one_line(tmp_path, cache_dir, synthetic_root, capsys):
    """Every wait is bounded: packed trials that outlive the part's deadline are killed (with their loader
    workers), the check says which part in one line, exits 1, and the report keeps what it had."""
    from benchmarks.gpu_check import main

    out = tmp_path / "gpu.md"
    code = main(["--cpu", "--timeout", "2", "--out", str(out), "--work", str(tmp_path / "work"),
                 "--cache_dir", cache_dir])
    err = capsys.readouterr().err.splitlines()
    assert code == 1 and len(err) == 1
    assert err[0].startswith("gpu_check: part a: process 1 of 2 still running after 2 s; killed (log: ")
    assert "**Failed**: part a: process 1 of 2 still running" in out.read_text()
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])]
    assert left == []  # the packed processes and their loader workers are gone


def test_packed_trials_that_cannot_start_fail_the_part_at_once_with_the_cause(tmp_path, cache_dir, synthetic_root):
    """Packed trials wait for each other after their start; one that never starts must not keep the others
    waiting until the deadline: the part fails within seconds, naming the failure."""
    from benchmarks.gpu_check import Failure, make_plan, spawn

    plan = make_plan(True, tmp_path, Path(cache_dir), 120)
    values = dict(plan.trial, pretrained="none", dataset_seed=99)  # a synthetic set nobody prepared
    start = time.monotonic()
    with pytest.raises(Failure, match=r"part a: process \d of 2 exited 1: .*synthetic is not prepared"):
        spawn(plan, "a", "trial", tmp_path, 2, config=values, share=0.5)
    assert time.monotonic() - start < 60


def installed_wheel(dist_name: str, folder: Path) -> Path:
    """An installed distribution packed back into a wheel from its files (the registry is not needed)."""
    dist = metadata.distribution(dist_name)
    files = [f for f in dist.files if "__pycache__" not in f.parts and f.name not in ("RECORD", "INSTALLER")
             and not str(f).startswith("..")]
    info = f"{dist.metadata['Name'].replace('-', '_')}-{dist.version}.dist-info"
    wheel = folder / f"{dist.metadata['Name'].replace('-', '_')}-{dist.version}-py3-none-any.whl"
    folder.mkdir(exist_ok=True)
    with zipfile.ZipFile(wheel, "w") as archive:
        for file in files:
            archive.write(file.locate(), str(file))
        archive.writestr(f"{info}/RECORD", "\n".join([*(str(f) for f in files), f"{info}/RECORD"]) + "\n")
    return wheel


@pytest.mark.slow  # about a minute: the carried wheels installed, then every part of the check on the CPU
def test_the_dry_run_installs_the_carried_wheels_beside_the_interpreter_and_runs_every_part(tmp_path, cache_dir,
                                                                                                synthetic_root):
    """The interpreter lacks what the wheels carry and refuses `pip install` (PEP 668); the script installs
    them into a folder of its own on PYTHONPATH, then runs the check's dry mode: packed trials, one alone, the
    in-memory step, the evaluation, each through the trial loop, and writes gpu.md into $OUT."""
    python3 = externally_managed_python(tmp_path / "py", lambda name: not name.startswith(CARRIED))
    for name in ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "adamp", "pretrainedmodels",
                 "munch", "typing-extensions", "timm"):
        installed_wheel(name, tmp_path / "wheels")
    refused = subprocess.run([str(python3), "-m", "pip", "install", "--no-index", "--find-links",
                              str(tmp_path / "wheels"), "adamp"], capture_output=True, text=True)
    assert refused.returncode != 0 and "externally-managed-environment" in refused.stderr
    site = tmp_path / "site"
    result = run_script(tmp_path, python3, "--cpu", "--work", str(tmp_path / "work"), "--cache_dir", cache_dir,
                        GPU_WHEELS=str(tmp_path / "wheels"), GPU_SITE=str(site), OUT=str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert {p.name for p in site.iterdir()} >= set(CARRIED)
    assert not (site / "typing_extensions.py").exists()  # the interpreter has it: its own copy stays in use
    assert not list(python3.parents[1].glob("lib/python3*/site-packages/adamp"))  # the system stays as it was
    report = (tmp_path / "out" / "gpu.md").read_text()
    figures = json.loads((tmp_path / "out" / "gpu.json").read_text())
    for part in ("| (a) packed | 2 trials at resources.gpu 0.5", "| (a) trial 2 |", "| (b) alone |",
                 "over 47 in-memory batches", "| (c) packing |", "| (d) eval |", "| (e) ViT-S/16 |"):
        assert part in report
    runs = figures["a"]["runs"]
    assert len(runs) == 2 and all(r["results"][-1]["val_recall@1"] > 0 and r["checkpoint_bytes"] > 0 for r in runs)
    assert max(r["train_start"] for r in runs) - min(r["train_start"] for r in runs) < 1.0  # they started together
    assert figures["a"]["aggregate"] > 0 and figures["c"] > 0 and figures["d"]["largest_gap_to_cpu"] == 0
