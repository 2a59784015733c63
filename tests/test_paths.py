"""Paths resolved per study: a study's own data_path wins over the default, a command-line --data_path over
everything, each made absolute on the driver; and a resume plans the same studies from the record."""
from pathlib import Path

import pytest
import yaml

from tune_upl.cli import build_parser, main, search_spec
from tune_upl.errors import SpecError
from tune_upl.experiment import Options, open_experiment
from tune_upl.planning import plan_studies

SPEC = {"name": "two-data", "fixed": {"data_name": "cub", "backbone_type": "tiny"},
        "space": {"lr": {"loguniform": [1.0e-4, 1.0e-2]}}}


@pytest.fixture
def here(tmp_path, monkeypatch):
    """A working directory, a home folder and a $TUNE_UPL_CACHE of the test's own."""
    work, home = (tmp_path / "work").resolve(), (tmp_path / "home").resolve()
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("TUNE_UPL_CACHE", "cache")
    return work, home


def write_spec(folder: Path, data_paths: list[str]) -> Path:
    path = folder / "two-data.yaml"
    path.write_text(yaml.safe_dump({**SPEC, "studies": {"data_path": data_paths}}))
    return path


def planned(*argv: str) -> list[tuple[str, str, str]]:
    """(study, data_path, cache_dir) of each study `search ARGV` would run."""
    args = build_parser().parse_args(["search", *argv])
    spec, overrides, paths = search_spec(args, Path("runs").resolve())
    return [(s.key, s.base["data_path"], s.base["cache_dir"]) for s in plan_studies(spec, overrides, paths)]


def test_each_study_reads_its_own_data_path_unless_the_command_line_gives_one(here, capsys):
    work, home = here
    spec = write_spec(work, ["/data/a", "b"])
    cache = str(work / "cache")  # $TUNE_UPL_CACHE, relative to the working directory
    assert planned("--space", str(spec)) == [("data_path=%2Fdata%2Fa", "/data/a", cache),
                                             ("data_path=b", str(work / "b"), cache)]
    assert planned("--space", str(spec), "--cache_dir", "/x") == [
        ("data_path=%2Fdata%2Fa", "/data/a", "/x"), ("data_path=b", str(work / "b"), "/x")]
    with pytest.raises(SpecError, match="data_path is listed under studies"):
        planned("--space", str(spec), "--data_path", "~/c")  # both studies would read one folder
    assert main(["search", "--space", str(spec), "--dry-run"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  study ")]
    assert len(lines) == 2
    assert "study data_path=%2Fdata%2Fa:" in lines[0] and f"data /data/a, cache {cache}," in lines[0]
    assert "study data_path=b:" in lines[1] and f"data {work / 'b'}, cache {cache}," in lines[1]


def test_a_resume_plans_the_studies_of_the_record_wherever_it_runs(here, tmp_path, monkeypatch):
    work, _ = here
    spec_file = write_spec(work, ["~/a", "b"])
    args = build_parser().parse_args(["search", "--space", str(spec_file), "--lr", "1e-3"])
    spec, overrides, paths = search_spec(args, work / "runs")
    assert overrides == {"lr": 1e-3}  # only what the command line gave
    first = plan_studies(spec, overrides, paths)
    open_experiment(spec, overrides, Options(storage=work / "runs"), paths)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # another working directory, home and cache: the record decides
    monkeypatch.setenv("HOME", str(elsewhere))
    monkeypatch.setenv("TUNE_UPL_CACHE", str(elsewhere / "cache"))
    resumed = search_spec(build_parser().parse_args(["search", "--resume", "--name", "two-data"]), work / "runs")
    assert plan_studies(*resumed) == first
    assert [s.base["cache_dir"] for s in first] == [str(work / "cache")] * 2
