"""The tested version ranges: the warning line names every runtime package outside its range (faked
`importlib.metadata`), the ranges equal requirements.txt's, and they admit what is installed here. Plain
metadata reads, no torch or Ray: well under a second."""
import io
import re
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from tune_upl import versions

ROOT = Path(__file__).resolve().parents[1]


def requirement_lines(path):
    """The requirement lines of a requirements file, comments and options (-c) dropped."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [Requirement(line) for line in lines if line and not line.startswith("-")]


def requirements():
    return {canonicalize_name(req.name): req for req in requirement_lines(ROOT / "requirements.txt")}


def constraints():
    """name -> the exact version constraints.txt pins."""
    pins = {}
    for req in requirement_lines(ROOT / "constraints.txt"):
        (spec,) = req.specifier
        assert spec.operator == "==", f"constraints.txt: {req} is not an exact pin"
        pins[canonicalize_name(req.name)] = spec.version
    return pins


def fake_metadata(monkeypatch, installed):
    """`metadata.version` as the module looks it up, answering from `installed` (None: not installed)."""
    def version(name):
        found = installed.get(canonicalize_name(name))
        if found is None:
            raise metadata.PackageNotFoundError(name)
        return found
    monkeypatch.setattr(versions.metadata, "version", version)


@pytest.fixture
def tested():
    """Every runtime package at the version constraints.txt pins."""
    pins = constraints()
    return {name: pins[name] for name in versions.RANGES}


def test_all_in_range_gives_none(monkeypatch, tested):
    fake_metadata(monkeypatch, tested)
    assert versions.check_versions() is None
    stream = io.StringIO()
    assert versions.warn_versions(stream, once=False) is None
    assert stream.getvalue() == ""


def test_old_optuna_is_named(monkeypatch, tested):
    fake_metadata(monkeypatch, {**tested, "optuna": "4.5.0"})
    line = versions.check_versions()
    assert line == ("warning: optuna 4.5.0 is outside the tested range >=5.1,<6 "
                    "(constraints.txt lists the versions the tests passed with)")


def test_every_package_outside_and_missing_is_named_in_one_line(monkeypatch, tested):
    fake_metadata(monkeypatch, {**tested, "torch": None, "ray": "2.61.0", "numpy": "1.26.4", "pandas": "banana"})
    stream = io.StringIO()
    line = versions.warn_versions(stream, once=False)
    assert stream.getvalue() == line + "\n" and "\n" not in line
    assert line.startswith("warning: ")
    phrases = line[len("warning: "):].split("; ")
    assert phrases[0] == "torch is not installed (tested range >=2.14,<2.15)"
    assert phrases[1] == "ray 2.61.0 is outside the tested range >=2.60,<2.61"
    assert phrases[2] == "pandas banana is not a version number (tested range >=3.1,<4)"
    assert phrases[3].startswith("numpy 1.26.4 is outside the tested range >=2.4,<3 ")
    assert len(phrases) == 4


def test_local_and_prerelease_builds_inside_the_range_pass(monkeypatch, tested):
    fake_metadata(monkeypatch, {**tested, "torch": "2.14.1+cu130", "ray": "2.60.1.dev0", "torchvision": "0.30.0rc1"})
    line = versions.check_versions()
    assert line == ("warning: torchvision 0.30.0rc1 is outside the tested range >=0.29,<0.30 "
                    "(constraints.txt lists the versions the tests passed with)")


def test_ranges_admit_every_installed_version_here():
    installed = versions.installed_versions(list(versions.RANGES))
    assert versions.outside(installed) == []
    assert versions.check_versions() is None


def test_ranges_equal_requirements_txt():
    reqs = requirements()
    for name, allowed in versions.RANGES.items():
        assert name in reqs, f"requirements.txt does not name {name}"
        assert reqs[name].specifier == SpecifierSet(allowed), f"{name}: {reqs[name].specifier} != {allowed}"
    ranged = {name for name, req in reqs.items() if req.specifier}
    assert ranged - set(versions.RANGES) == set(versions.TEST_ONLY)
    assert not set(versions.RANGES) & versions.TEST_ONLY


def test_requirements_are_constrained_and_pins_lie_in_their_ranges():
    first = (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines()[0]
    assert first == "-c constraints.txt"
    pins = constraints()
    for name, req in requirements().items():
        assert name in pins, f"constraints.txt does not pin {name}"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} outside {req.specifier}"
    left_to_torch = [name for name in pins if re.match(r"(nvidia-|cuda-|triton$)", name)]
    assert left_to_torch == []
    assert pins["torch"] == "2.14.1" and pins["ray"] == "2.60.0" and pins["optuna"] == "5.1.0"


def test_the_cli_warns_once_a_process(monkeypatch, tested):
    fake_metadata(monkeypatch, {**tested, "optuna": "4.5.0"})
    monkeypatch.setattr(versions, "_checked", False)
    first, second = io.StringIO(), io.StringIO()
    assert versions.warn_versions(first).startswith("warning: optuna 4.5.0 ")
    assert versions.warn_versions(second) is None
    assert first.getvalue().count("\n") == 1 and second.getvalue() == ""
