"""Each use of Ray / Tune that is not documented public API (`tune_upl.ray_private`), checked against the
installed Ray: a failure says which Ray the code was written for and which one changed it.

One tiny real Tune run (three trials of a trivial function: one completes, one raises, one is stopped
mid-run through Tune's own stop) gives a real saved state, a real storage context inside trials and real
checkpoint bookkeeping on the driver."""
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tune_upl.layout import error_line
from tune_upl.ray_private import (
    CHECKPOINT_LOGGER, OLD_OUTPUT_VARIABLE, WRITTEN_FOR, MissingScoreFilter, TuneStateError, asha_bracket,
    asha_rung_epochs, bracket_recorded, changed, read_saved_trials, stub_trial, use_old_console_output,
)

LONG_EPOCHS = 300  # the trial that is stopped: it would report this many times, 0.1 s apart
STOPS: list[bool] = []  # what `stop_tune_run` answered inside the run (the callback is Tune's to copy)


def _installed() -> str:
    import ray

    return ray.__version__


def _changed(what: str) -> str:
    return changed(what, _installed())


def _internal(module: str, name: str):
    """A private name of Ray's, or a failure naming both versions when it is gone."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        pytest.fail(_changed(f"{module}.{name} ({error})"))


def _trial(config):
    """Reports the trial's folder as `local_trial_folder` finds it; `done` reports a checkpoint without the
    score attribute, then one with it (Ray's checkpoint manager logs an error when it ranks the first)."""
    from ray import tune

    from tune_upl.ray_private import local_trial_folder

    folder = str(local_trial_folder())
    if config["kind"] == "done":
        for result in ({"folder": folder}, {"score": 1.0, "folder": folder}):
            with tempfile.TemporaryDirectory() as checkpoint:
                Path(checkpoint, "state").write_text("1")
                tune.report(result, checkpoint=tune.Checkpoint.from_directory(checkpoint))
    elif config["kind"] == "error":
        tune.report({"score": 0.5, "folder": folder})
        raise RuntimeError("planned failure")
    else:
        for _ in range(LONG_EPOCHS):
            tune.report({"score": 0.1, "folder": folder})
            time.sleep(0.1)


@pytest.fixture(scope="module")
def tiny_run(ray_session, tmp_path_factory):
    """The run's Tune folder, the records Ray's checkpoint logger emitted, and the run's length."""
    import logging

    from ray import cloudpickle, tune

    from tune_upl.ray_private import stop_tune_run

    class StopOnceTwoEnded(tune.Callback):
        def on_step_begin(self, iteration, trials, **info):
            ended = [t for t in trials if t.status in ("TERMINATED", "ERROR")]
            running = [t for t in trials if t.config.get("kind") == "long" and t.status == "RUNNING" and t.last_result]
            if not STOPS and len(ended) == 2 and running:
                STOPS.append(stop_tune_run())

    class Recorder(logging.Handler):
        def __init__(self):
            super().__init__(logging.DEBUG)
            self.records = []

        def emit(self, record):
            self.records.append(record)

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import a test module
    storage = tmp_path_factory.mktemp("tune")
    recorder = Recorder()
    logger = logging.getLogger(CHECKPOINT_LOGGER)
    logger.addHandler(recorder)
    started = time.monotonic()
    try:
        tune.Tuner(
            _trial,
            param_space={"kind": tune.grid_search(["done", "error", "long"]), "tuple": (1, 2)},
            tune_config=tune.TuneConfig(max_concurrent_trials=2),
            run_config=tune.RunConfig(
                name="tiny", storage_path=str(storage), verbose=0, callbacks=[StopOnceTwoEnded()],
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="score",
                                                        checkpoint_score_order="max")),
        ).fit()
    finally:
        logger.removeHandler(recorder)
    return storage / "tiny", recorder.records, time.monotonic() - started


def _saved(folder: Path):
    """`read_saved_trials` of the tiny run, or a failure naming both versions when Tune's file changed."""
    try:
        return read_saved_trials(folder)
    except TuneStateError as error:
        pytest.fail(_changed(f"its saved experiment state ({error})"))


def _by_kind(folder: Path):
    return {t.config["kind"]: t for t in _saved(folder)}


def test_the_saved_state_reader_gives_what_tunes_own_analysis_gives(tiny_run):
    """`read_saved_trials` (no Ray) against the public `ExperimentAnalysis(folder).trials`: every trial's
    id, state, config, last result and folder; a running trial saved is restored as pending."""
    from ray.tune import ExperimentAnalysis

    folder, _, _ = tiny_run
    ours = _saved(folder)
    theirs = {t.trial_id: t for t in ExperimentAnalysis(str(folder)).trials}
    assert sorted(t.trial_id for t in ours) == sorted(theirs), _changed("the trials of experiment_state-*.json")
    for trial in ours:
        tune_trial = theirs[trial.trial_id]
        seen = (trial.status, trial.config, trial.last_result, str(trial.path))
        assert seen == (tune_trial.status, tune_trial.config, tune_trial.last_result, tune_trial.path), \
            _changed(f"trial {trial.trial_id} in experiment_state-*.json (its status, config, last_result or "
                     "relative_logdir)")
    kinds = _by_kind(folder)
    assert {k: t.status for k, t in kinds.items()} == {"done": "TERMINATED", "error": "ERROR", "long": "PENDING"}, \
        _changed("the saved trial states")
    assert kinds["done"].config["tuple"] == [1, 2] and kinds["done"].last_result["score"] == 1.0
    assert kinds["done"].last_result["training_iteration"] == 2 and kinds["done"].error_file is None
    assert error_line(kinds["error"].error_file) == "RuntimeError: planned failure", \
        _changed("the run metadata's error_filename")


def test_reading_saved_trials_loads_no_ray(tiny_run):
    folder, _, _ = tiny_run
    code = ("import sys; from pathlib import Path; from tune_upl.ray_private import read_saved_trials; "
            f"n = len(read_saved_trials(Path({str(folder)!r}))); "
            "print(n, sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["3", "[]"]


def test_tunes_stop_handler_ends_the_run_saved(tiny_run):
    """`stop_tune_run` (Tune's SIGUSR1 handler, installed for the length of a run) ends it at once, saved:
    the long trial stopped after a few of its epochs."""
    folder, _, seconds = tiny_run
    assert STOPS == [True], _changed("the SIGUSR1 handler Tune installs during Tuner.fit")
    epochs = _by_kind(folder)["long"].last_result.get("training_iteration", 0)
    assert 1 <= epochs < LONG_EPOCHS / 2 and seconds < LONG_EPOCHS * 0.1 / 2, \
        _changed(f"how Tune stops on SIGUSR1 (the trial ran {epochs} epochs, the run {seconds:.0f} s)")


def test_the_storage_context_gives_each_trial_its_folder_in_storage(tiny_run):
    """`local_trial_folder` inside a trial (TuneContext.get_storage(), storage_filesystem, trial_fs_path)
    is the trial's folder in the experiment's storage."""
    folder, _, _ = tiny_run
    rows = {}
    for trial in _saved(folder):
        lines = (trial.path / "result.json").read_text().splitlines() if (trial.path / "result.json").is_file() else []
        rows[trial.config["kind"]] = (trial.path, [json.loads(line).get("folder") for line in lines])
    for kind, (path, reported) in rows.items():
        assert reported and set(reported) == {str(path)}, \
            _changed(f"TuneContext.get_storage() (trial {kind} found {sorted(set(map(str, reported)))}, not {path})")


def test_rays_checkpoint_logger_names_a_checkpoint_without_the_score(tiny_run):
    """The logger `drop_missing_score_errors` filters exists under that name and logs the message it drops."""
    _, records, _ = tiny_run
    dropped = [r for r in records if not MissingScoreFilter("score").filter(r)]
    assert dropped and all(r.name == CHECKPOINT_LOGGER for r in dropped), _changed(
        f"the error logged for a checkpoint without its score attribute (logger {CHECKPOINT_LOGGER}: "
        f"{[r.getMessage()[:80] for r in records]})")
    assert MissingScoreFilter("val_recall@1").filter(dropped[0])  # another metric's message is kept


def test_the_old_console_output_variable_is_read_by_tune(monkeypatch):
    """`use_old_console_output` sets the variable Tune's `get_air_verbosity` reads: no new output engine."""
    get_air_verbosity = _internal("ray.tune.experimental.output", "get_air_verbosity")
    monkeypatch.setenv(OLD_OUTPUT_VARIABLE, "1")
    assert get_air_verbosity(0) is not None, _changed(f"{OLD_OUTPUT_VARIABLE}=1 (the new output engine)")
    monkeypatch.delenv(OLD_OUTPUT_VARIABLE)
    use_old_console_output()
    assert os.environ[OLD_OUTPUT_VARIABLE] == "0"
    assert get_air_verbosity(0) is None, _changed(f"{OLD_OUTPUT_VARIABLE}=0 (still read by get_air_verbosity?)")
    monkeypatch.setenv(OLD_OUTPUT_VARIABLE, "1")
    use_old_console_output()  # the user's own setting is kept
    assert os.environ[OLD_OUTPUT_VARIABLE] == "1"


def test_rung_epochs_are_those_where_rays_own_bracket_decides():
    """`asha_rung_epochs` equals the epochs at which Ray's own `_Bracket` records a result for a rung."""
    _internal("ray.tune.schedulers.async_hyperband", "_Bracket")

    class Trial:
        trial_id = "t"

    for grace, factor, max_t in [(1, 2, 4), (1, 2, 20), (2, 3, 20), (1, 4, 100), (3, 2.5, 30), (1, 10, 1000), (5, 2, 5)]:
        bracket, decided = asha_bracket(grace, max_t, factor), []
        for epoch in range(1, max_t + 1):
            before = bracket_recorded(bracket)
            assert bracket.on_result(Trial(), epoch, 1.0) in ("CONTINUE", "STOP")
            if bracket_recorded(bracket) > before and epoch < max_t:
                decided.append(epoch)
        assert asha_rung_epochs(grace, factor, max_t) == tuple(decided), _changed(
            f"ASHA's rungs (grace {grace}, factor {factor}, max_t {max_t}: Ray decides at {decided})")


def test_a_stub_trial_holds_what_it_was_made_with():
    """`stub_trial` (a Trial stub whose last result is set through its private run metadata)."""
    result = {"val_recall@1": 0.5, "training_iteration": 2}
    made = stub_trial("a", {"lr": 0.1, "num_epochs": 3}, "RUNNING", result)
    seen = (made.trial_id, made.status, made.config, made.last_result)
    assert seen[:3] == ("a", "RUNNING", {"lr": 0.1, "num_epochs": 3}) and result.items() <= seen[3].items(), \
        _changed(f"a Trial stub or its run_metadata ({seen})")


def test_a_damaged_state_file_is_one_error_naming_it(tmp_path):
    with pytest.raises(TuneStateError, match=rf"^{re.escape(str(tmp_path))}: no experiment_state-\*\.json$"):
        read_saved_trials(tmp_path)
    (tmp_path / "experiment_state-2026-01-01_00-00-00.json").write_text('{"trial_data": [["{}", "{}"]]}')
    newer = tmp_path / "experiment_state-2026-01-02_00-00-00.json"  # the newest is read, as Tune does
    newer.write_text('{"trial_data": [["{\\"status\\"')
    with pytest.raises(TuneStateError, match=rf"^{re.escape(str(newer))}: not JSON: "):
        read_saved_trials(tmp_path)
    newer.write_text('{"trial_data": [["{}", "{}"]]}')
    with pytest.raises(TuneStateError, match=rf"^{re.escape(str(newer))}: not Tune's format as of Ray {WRITTEN_FOR}: KeyError "):
        read_saved_trials(tmp_path)
