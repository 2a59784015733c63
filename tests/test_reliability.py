"""A refused start leaves no stub, an unusable storage or a damaged experiment file is one line and exit 2
(never a traceback), damaged trial results are named in the report, `--name` is a plain name, and resumed
progress lines continue the experiment's count (stop signals: test_signals.py, test_interruptions.py).

The damaged files are copies of the shared small demo search's, cut or garbled here."""
import json
import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest
from official_formats import make_folder
from searches import MINI, write_spec

from tune_upl.cli import build_parser, main
from tune_upl.errors import SpecError
from tune_upl.spec import load_spec, parse_spec


def run_main(capsys, *argv):
    """`python run_search.py ARGV` in this process: (exit code, stderr); a traceback would raise here."""
    code = main(list(argv))
    return code, capsys.readouterr().err


def one_line(err: str) -> str:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


# ---------------------------------------------------------------- 1. the scheduler's rules in the spec check
def test_a_grace_period_longer_than_the_training_is_refused_by_the_spec_check_and_dry_run(tmp_path, capsys):
    expected = ("scheduler.grace_period = 5: longer than the training of study main (num_epochs up to 2); "
                "allowed: 1 to 2, or scheduler type fifo")
    with pytest.raises(SpecError) as error:
        parse_spec({**MINI, "scheduler": {"type": "asha", "grace_period": 5}, "fixed": {**MINI["fixed"], "num_epochs": 2}})
    assert str(error.value) == f"spec: {expected}"
    spec = write_spec(tmp_path, scheduler={"type": "asha", "grace_period": 3})  # 3 epochs in the spec, 2 given
    code, err = run_main(capsys, "search", "--space", str(spec), "--num_epochs", "2", "--dry-run")
    assert code == 2 and one_line(err) == f"error: {expected}".replace("= 5", "= 3")


# ---------------------------------------------------------------- 2. an unusable --storage
def _unwritable_folder(tmp_path: Path) -> Path:
    """A real folder this process cannot create files in: read-only by mode, or for root (whom modes do not
    stop) sysfs, which takes no new files from anyone."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir(mode=0o555)
        return folder
    try:
        tempfile.TemporaryFile(dir="/sys").close()
    except OSError:
        return Path("/sys")
    pytest.skip("running as root on a writable /sys: no unwritable folder to try")


def test_an_unusable_storage_is_one_line_and_exit_2(tmp_path, capsys):
    spec = write_spec(tmp_path)
    taken = tmp_path / "a-file"
    taken.write_text("not a folder\n")
    for storage in (taken, taken / "runs"):
        code, err = run_main(capsys, "search", "--space", str(spec), "--storage", str(storage))
        assert code == 2 and one_line(err) == (f"error: --storage {storage}: {taken} is a file, not a folder; "
                                               "allowed: a folder (made if missing) whose parents are folders, or a URI")
    folder = _unwritable_folder(tmp_path)
    code, err = run_main(capsys, "search", "--space", str(spec), "--storage", str(folder / "runs"))
    assert code == 2 and one_line(err).startswith(f"error: --storage {folder / 'runs'}: cannot write in {folder} (")


# ---------------------------------------------------------------- 3. a refused start leaves no stub
def test_a_refused_start_writes_nothing_so_the_same_command_says_the_same(tmp_path, capsys):
    spec, runs = write_spec(tmp_path), tmp_path / "runs"
    command = ("search", "--space", str(spec), "--storage", str(runs), "--data_name", "cub", "--data_path",
               str(tmp_path / "nowhere"), "--cache_dir", str(tmp_path / "cache"))
    first = run_main(capsys, *command)
    assert first[0] == 2 and f"expected {tmp_path / 'nowhere'}/cub/images.txt" in one_line(first[1])
    assert not runs.exists()  # neither the experiment nor its lock file, nor the storage folder made for them
    assert run_main(capsys, *command) == first  # not "unfinished: add --resume"
    runs.mkdir()
    assert run_main(capsys, *command) == first and not list(runs.iterdir())  # a storage that was there stays


def test_prepare_and_search_refuse_a_one_class_tree_alike_and_leave_no_stub(tmp_path, capsys):
    tree = make_folder(tmp_path / "tree", ("wren",))
    spec, runs, cache = write_spec(tmp_path), tmp_path / "runs", str(tmp_path / "cache")
    expected = (f"error: {tree}: need at least 4 classes for class-disjoint splits, found 1; allowed: a dataset "
                "with 4 or more classes")
    code, err = run_main(capsys, "prepare", "--data_name", "folder", "--data_path", str(tree), "--cache_dir", cache)
    assert code == 2 and one_line(err) == expected
    assert not list((tmp_path / "cache").glob("prepared/folder-*/prepared.json"))
    code, err = run_main(capsys, "search", "--space", str(spec), "--storage", str(runs), "--data_name", "folder",
                         "--data_path", str(tree), "--cache_dir", cache)
    assert code == 2 and one_line(err) == expected and not (runs / "mini").exists()


def test_a_start_refused_for_resources_writes_nothing(ray_session, tmp_path, capsys, cache_dir, synthetic_root):
    spec, runs = write_spec(tmp_path), tmp_path / "runs"
    handler = signal.getsignal(signal.SIGTERM)
    code, err = run_main(capsys, "search", "--space", str(spec), "--storage", str(runs), "--cache_dir", cache_dir,
                         "--cpus-per-trial", "64")
    assert code == 2 and one_line(err).startswith("error: resources = 64 CPU + 0 GPU per trial: no node")
    assert not runs.exists()
    assert signal.getsignal(signal.SIGTERM) == handler  # the driver's SIGTERM handler lasts only for its run


# ---------------------------------------------------------------- 4. damaged driver files
@pytest.fixture
def demo_copy(demo_search, tmp_path):
    """A copy of the finished small demo experiment, to damage: (storage, experiment)."""
    _, experiment, _ = demo_search
    copy = tmp_path / "runs" / "demo"
    shutil.copytree(experiment, copy)
    return tmp_path / "runs", copy


def test_damaged_driver_files_are_one_line_naming_the_file_and_the_fix(demo_copy, tmp_path, capsys):
    runs, experiment = demo_copy
    report = ("report", "--name", "demo", "--storage", str(runs), "--reports-dir", str(tmp_path / "reports"))
    resume = ("search", "--resume", "--name", "demo", "--storage", str(runs))
    spec_file, selection, record, database = (experiment / "search_spec.json", experiment / "main" / "selection.json",
                                              experiment / "record.json", experiment / "optuna.db")
    for path, cut, commands, fix in (
        (spec_file, 0.5, (report, resume), "--overwrite` (the old folder is kept)"),
        (selection, 0.5, (report, resume), f"`python run_search.py search --resume --name demo --storage {runs}` "
                                           "selects the study again from its trials"),
        (record, 0.0, (report,), "delete it to report without it"),
    ):
        kept = path.read_bytes()
        path.write_bytes(kept[: int(len(kept) * cut)])
        for command in commands:
            code, err = run_main(capsys, *command)
            assert code == 2 and one_line(err).startswith(f"error: {path}: damaged (") and fix in err, command
        path.write_bytes(kept)
    (experiment / "COMPLETE").unlink()  # an interrupted search: its study not selected yet, its database open
    saved = json.loads(spec_file.read_text())  # made here, not copied (a copy is refused before its database)
    spec_file.write_text(json.dumps({**saved, "location": str(experiment.resolve())}))
    selection.unlink()
    database.write_bytes(database.read_bytes()[:5000])
    code, err = run_main(capsys, *resume)
    assert code == 2 and one_line(err).startswith(f"error: {database}: damaged (")
    assert "restore it from a copy, or start the experiment again with --overwrite" in err


# ---------------------------------------------------------------- 5. damaged trial results
def test_a_damaged_trial_result_is_read_to_its_good_rows_and_named_in_the_report(demo_copy, tmp_path):
    from experiments import trial_results

    from tune_upl.report import write_report
    from tune_upl.results import load_experiment

    _, experiment = demo_copy
    raw = trial_results(experiment / "trials", final=False)
    chosen = next(t for t, r in raw.items() if r[-1]["training_iteration"] == 2)  # a trial that ran both epochs
    garbled = experiment / "trials" / chosen / "result.json"  # epoch 1's metric not a number
    rows = garbled.read_text().splitlines()
    rows[0] = json.dumps({**json.loads(rows[0]), "val_recall@1": "abc"})
    garbled.write_text("\n".join(rows) + "\n")
    other = next(t for t in raw if t != chosen)  # another trial, its last row cut off
    cut = experiment / "trials" / other / "result.json"
    cut.write_text(cut.read_text()[:-100])
    left = max([r["training_iteration"] for r in raw[other][:-1]], default=0)
    binary = sorted((experiment / "trials").glob("*.final/result.json"))[0]
    binary.write_bytes(b"\xff\xfe\x00 not text " * 40)
    data = load_experiment(experiment)
    epochs = dict(zip(data.trials["trial"], data.trials["epochs"]))
    assert epochs[chosen] == 2 and epochs[other] == left
    assert sorted(data.damaged) == sorted(f"{path}: 1 unreadable row skipped" for path in (garbled, cut, binary))
    text = write_report(experiment, tmp_path / "reports").read_text()
    assert "## Damaged files" in text and all(f"- `{line}`" in text for line in data.damaged)


# ---------------------------------------------------------------- 7. smaller points
def test_done_is_read_from_the_folder_every_selection_and_every_final_runs_last_epoch(demo_copy):
    """What `--resume` must still do, read from the files alone (Tune's counts call a stopped trial ended)."""
    from searches import small_demo

    from tune_upl.final import unfinished

    spec, (_, experiment) = small_demo(), demo_copy
    assert unfinished(spec, ["main"], experiment) == []
    final = sorted(experiment.glob("trials/*.final/result.json"))[0]
    final.write_text(final.read_text().splitlines(keepends=True)[0])  # stopped after its first epoch
    seed = json.loads((final.parent / "params.json").read_text())["seed"]
    assert unfinished(spec, ["main"], experiment) == [
        f"study main: final run of seed {seed} without 2 epochs and a test result"]
    (experiment / "main" / "selection.json").unlink()
    assert unfinished(spec, ["main"], experiment) == ["study main not selected"]


def test_a_copied_experiment_is_refused_before_ray_and_left_as_it_was_unless_complete(demo_search, demo_copy,
                                                                                        tmp_path, capsys):
    """A copy (`cp -a`) resumed where it lies would write into the original (Tune's state names that folder):
    one line naming the original and the command that resumes it; a complete copy is only reported."""
    _, original, _ = demo_search
    runs, copy = demo_copy
    resume = ("search", "--resume", "--name", "demo", "--storage", str(runs), "--reports-dir", str(tmp_path / "r"))
    assert main(list(resume)) == 0 and "experiment demo is complete already" in capsys.readouterr().out
    (copy / "COMPLETE").unlink()
    before = {p: p.stat().st_mtime for p in copy.rglob("*")}
    code, err = run_main(capsys, *resume)
    assert code == 2 and one_line(err) == (
        f"error: --resume: {copy} is a copy of experiment demo at {original} (Tune's saved state names that folder, "
        f"so a resume here would write into the original); resume the original with: python run_search.py search "
        f"--resume --name demo --storage {original.parent}")
    assert {p: p.stat().st_mtime for p in copy.rglob("*")} == before


def test_the_resume_command_names_the_storage_and_a_reports_folder_that_is_not_the_default(tmp_path):
    from tune_upl.cli import resume_command

    args = build_parser().parse_args(["search", "--name", "mini", "--storage", str(tmp_path / "runs"),
                                      "--reports-dir", str(tmp_path / "reports")])
    assert resume_command(args) == (f"python run_search.py search --resume --name mini --storage {tmp_path / 'runs'}"
                                    f" --reports-dir {tmp_path / 'reports'}")
    args = build_parser().parse_args(["search", "--name", "mini"])
    assert resume_command(args) == f"python run_search.py search --resume --name mini --storage {Path.cwd() / 'runs'}"


def test_a_directory_given_as_space_is_named_a_directory(tmp_path):
    write_spec(tmp_path)
    with pytest.raises(SpecError) as error:
        load_spec(tmp_path)
    assert str(error.value) == f"spec file {tmp_path} is a directory; give a YAML file in it (found: mini.yaml)"


@pytest.mark.parametrize("command", [("report",), ("retrieve", "--query_img_name", "x.jpg"), ("search", "--resume"),
                                     ("search", "--dry-run")])
def test_name_is_one_plain_folder_name_for_every_command(tmp_path, capsys, command):
    outside = tmp_path / "x"
    outside.mkdir()
    (outside / "search_spec.json").write_text("{}")  # an experiment beside the storage must not be read
    for name in ("../x", "a/b", ".."):
        code, err = run_main(capsys, *command, "--name", name, "--storage", str(tmp_path / "runs"))
        assert code == 2 and one_line(err) == (
            f"error: --name {name!r}: an experiment name is one plain folder name; allowed: letters, digits and "
            "_ . - (starting with a letter or digit), no path separators")


def test_progress_lines_of_a_restored_run_continue_its_count_and_best(capsys, tmp_path):
    from tune_upl.multistudy import Session, StudySearcher
    from tune_upl.planning import plan_studies
    from tune_upl.ray_private import stub_trial
    from tune_upl.search import TrialLines

    def trial(trial_id: str, status: str, score: float):
        return stub_trial(trial_id, {"num_epochs": 3, "lr": 0.1}, status, {"val_recall@1": score, "training_iteration": 3})

    spec = parse_spec(MINI)
    studies = plan_studies(spec, {"cache_dir": str(tmp_path)})
    searcher = StudySearcher(spec, studies, Session(tmp_path, None, 1))
    lines = TrialLines(spec, ["lr"], 3, tuple(studies), searcher)  # as restored: pickled before any trial ended
    ended = [trial("a", "TERMINATED", 0.7), trial("b", "TERMINATED", 0.4)]
    running = trial("c", "RUNNING", 0.5)
    lines.on_step_begin(0, ended + [running])
    running.set_status("TERMINATED")
    lines.on_trial_complete(1, ended + [running], running)
    line = capsys.readouterr().out.strip()
    assert line.startswith("[3/3] trial c completed") and line.endswith("best 0.7000 (a)")
