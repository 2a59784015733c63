"""The tested version ranges of the packages the platform runs on, and the one-line warning the CLI prints at
start when an installed one lies outside its range or is missing.

Why a warning and not an exit: a newer release usually works, and a user on a cluster image may not be able
to change it; but a failure deep inside Ray or torch reads better next to a line that says the versions were
never tested. The ranges are those of `requirements.txt` (a test keeps the two equal); `constraints.txt`
holds the exact versions the tests passed with. Torch-free and Ray-free: it reads package metadata only.
"""
from __future__ import annotations

import importlib.util
import sys
from importlib import metadata
from typing import Mapping, Optional, TextIO

# Every package the platform imports at run time, by its distribution name, with its range in requirements.txt.
# Packages that only the tests and benchmarks use are in requirements.txt alone (TEST_ONLY), and never warned of.
RANGES: dict[str, str] = {
    "torch": ">=2.14,<2.15",
    "torchvision": ">=0.29,<0.30",
    "ray": ">=2.60,<2.61",
    "optuna": ">=5.1,<6",
    "pydantic": ">=2.13,<3",
    "pandas": ">=3.1,<4",
    "numpy": ">=2.4,<3",
    "pillow": ">=13.0,<14",
    "pyyaml": ">=6.0,<7",
    "scipy": ">=1.17,<2",
    "matplotlib": ">=3.11,<4",
    "filelock": ">=4.3,<5",
    "tqdm": ">=4.70,<5",
    "tabulate": ">=0.10,<1",
    "threadpoolctl": ">=3.8,<4",
    "pretrainedmodels": ">=0.7.4,<0.8",
    "timm": ">=1.0.31,<1.1",
    "packaging": ">=22",
}

TEST_ONLY = frozenset({"adamp", "pytest", "pytest-xdist", "psutil", "faiss-cpu", "moto", "flask", "flask-cors"})

FOOTNOTE = "(constraints.txt lists the versions the tests passed with)"


def installed_versions(names: Mapping[str, str] | list[str]) -> dict[str, Optional[str]]:
    """Each package's installed version, None where it is not installed. Looks up `metadata.version` at call
    time, so a test can fake it."""
    found: dict[str, Optional[str]] = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def outside(installed: Mapping[str, Optional[str]], ranges: Mapping[str, str] = RANGES) -> list[str]:
    """One phrase per package that is missing, has a version that is not PEP 440, or lies outside its range.
    A pre-release or local build inside the range (2.14.1+cu130) is in range."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    phrases = []
    for name, allowed in ranges.items():
        version = installed.get(name)
        if version is None:
            phrases.append(f"{name} is not installed (tested range {allowed})")
            continue
        try:
            parsed = Version(version)
        except InvalidVersion:
            phrases.append(f"{name} {version} is not a version number (tested range {allowed})")
            continue
        if not SpecifierSet(allowed).contains(parsed, prereleases=True):
            phrases.append(f"{name} {version} is outside the tested range {allowed}")
    return phrases


def check_versions(ranges: Mapping[str, str] = RANGES) -> Optional[str]:
    """The one warning line naming every runtime package outside its tested range, or None when all are in."""
    if importlib.util.find_spec("packaging") is None:  # the check itself reads the ranges with it
        return f"warning: packaging is not installed (tested range {RANGES['packaging']}); versions not checked"
    phrases = outside(installed_versions(list(ranges)), ranges)
    if not phrases:
        return None
    return f"warning: {'; '.join(phrases)} {FOOTNOTE}"


_checked = False  # whether this process has checked: the CLI's main() may run many times in one process (tests)


def warn_versions(stream: Optional[TextIO] = None, once: bool = True) -> Optional[str]:
    """Print `check_versions()`'s line, if any, to stderr; never exits. The CLI calls it at start; with `once`
    only the first call in a process checks (the metadata look-ups take tens of milliseconds)."""
    global _checked
    if once and _checked:
        return None
    _checked = True
    line = check_versions()
    if line is not None:
        print(line, file=stream if stream is not None else sys.stderr, flush=True)
    return line
