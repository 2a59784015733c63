"""scripts/gpu_bench.sh on a machine like the lent GPU machine: only `python3` on PATH (a `python` there
fails loudly), a PEP 668 "externally managed" interpreter (not a venv, an EXTERNALLY-MANAGED marker in its
stdlib), and here no CUDA. The interpreter is this one's binary in a folder of its own whose stdlib links to
the real one, with the site-packages each case needs."""
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Callable

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_bench.sh"


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


def run_script(tmp_path: Path, python3: Path, **env: str) -> subprocess.CompletedProcess:
    """The script with a PATH whose only Python is `python3` (its own folder, so that a venv made from it
    finds its prefix; a `python` beside it exits 99)."""
    (python3.parent / "python").write_text("#!/bin/sh\necho 'python called' >&2\nexit 99\n")
    (python3.parent / "python").chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "PIP_"))}
    return subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=300,
                          env={**clean, "PATH": f"{python3.parent}:/usr/bin:/bin", "TMPDIR": str(tmp_path), **env})


def test_no_torch_or_no_torchvision_is_one_line(tmp_path):
    bare = run_script(tmp_path / "a", externally_managed_python(tmp_path / "a" / "py", lambda name: False))
    assert bare.returncode == 3 and bare.stdout == ""
    assert bare.stderr.splitlines() == [f"gpu_bench: torch missing: {tmp_path}/a/py/bin/python3 cannot import it; "
                                        "use a Python with PyTorch and torchvision"]
    no_vision = externally_managed_python(tmp_path / "b" / "py", lambda name: not name.startswith("torchvision"))
    result = run_script(tmp_path / "b", no_vision)
    assert result.returncode == 3 and len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("gpu_bench: torchvision missing:")


def adamp_wheel(folder: Path) -> Path:
    """adamp as a wheel, built from its installed files (its sdist needs the registry)."""
    dist = metadata.distribution("adamp")
    files = [f for f in dist.files if "__pycache__" not in f.parts and f.name not in ("RECORD", "INSTALLER")]
    info = f"adamp-{dist.version}.dist-info"
    wheel = folder / f"adamp-{dist.version}-py3-none-any.whl"
    folder.mkdir()
    with zipfile.ZipFile(wheel, "w") as archive:
        for file in files:
            archive.write(file.locate(), str(file))
        archive.writestr(f"{info}/RECORD", "\n".join([*(str(f) for f in files), f"{info}/RECORD"]) + "\n")
    return wheel


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script goes on to measure")
def test_a_pep_668_python3_gets_the_missing_wheels_in_a_venv_then_says_no_cuda(tmp_path):
    """The interpreter lacks adamp; pip refuses to install into it; the script installs the carried wheel into
    a venv over the system packages and runs on to its no-CUDA line (about 20 s: a venv with pip)."""
    python3 = externally_managed_python(tmp_path / "py", lambda name: not name.startswith("adamp"))
    wheels = adamp_wheel(tmp_path / "wheels").parent
    refused = subprocess.run([str(python3), "-m", "pip", "install", "--no-index", "--find-links", str(wheels),
                              "adamp"], capture_output=True, text=True)
    assert refused.returncode != 0 and "externally-managed-environment" in refused.stderr
    venv = tmp_path / "venv"
    result = run_script(tmp_path, python3, GPU_WHEELS=str(wheels), GPU_VENV=str(venv))
    assert result.returncode == 4, result.stderr
    assert result.stderr.splitlines()[-1] == (f"gpu_bench: no CUDA: torch {torch.__version__} of {venv}/bin/python "
                                              "sees no GPU; nothing measured")
    assert list(venv.glob("lib/python3*/site-packages/adamp/adamp.py"))
    assert not list(python3.parents[1].glob("lib/python3*/site-packages/adamp"))  # the system stays as it was
