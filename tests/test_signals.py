"""The driver's stop signals without a search: outside a Tune run the first signal raises at once, inside one
it is only recorded (the run stops at its next step); a second always raises; the handlers go back when the
search ends; and the watchdog ends a driver whose Ray is gone, or that has not stopped in time, with the
resume command and 130 or 143. Plus what the resume command, the output folders and the start line say."""
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from experiments import ROOT
from searches import MINI, write_spec

from tune_upl import signals
from tune_upl.cli import build_parser, main, resume_command
from tune_upl.errors import Terminated


def test_the_first_signal_raises_outside_a_run_and_is_only_recorded_inside_one():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    signals.install()
    try:
        with pytest.raises(Terminated):
            os.kill(os.getpid(), signal.SIGTERM)
        assert signals.stop_signal() == signal.SIGTERM
    finally:
        signals.uninstall()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert not signals.stopping()  # forgotten with the handlers: the next search starts clean

    signals.install()
    signals.install()  # nested: the search inside the command line
    try:
        signals.set_run(True)
        os.kill(os.getpid(), signal.SIGINT)  # recorded: Tune stops at its next step
        assert signals.stop_signal() == signal.SIGINT
        assert isinstance(signals.stop_error("x"), signals.Interrupted)
        with pytest.raises(signals.Interrupted, match="SIGTERM again"):
            os.kill(os.getpid(), signal.SIGTERM)  # a second signal does not wait
        signals.set_run(False)
        signals.uninstall()
        assert signal.getsignal(signal.SIGINT) is not before[0]  # still the outer level's
    finally:
        signals.uninstall()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


# the main thread blocked in C code that never returns to Python (as in Ray's core worker waiting for a GCS
# that is gone): a second lock of a default pthread mutex by its owner never returns, and signals do not end it
BLOCK_IN_C = """
import ctypes
mutex = ctypes.create_string_buffer(64)  # zeroed: PTHREAD_MUTEX_INITIALIZER on glibc
libc = ctypes.CDLL(None)
libc.pthread_mutex_lock(mutex)
libc.pthread_mutex_lock(mutex)
"""


def _driver_that_hangs(tmp_path, probe: str, deadline: float, in_c: bool = False) -> tuple[subprocess.CompletedProcess, float]:
    """A process that arms the watchdog, is inside a 'run', receives SIGTERM and then never returns (in
    Python, or `in_c`, where Python never runs the signal's handler)."""
    script = textwrap.dedent(f"""
        import os, signal, threading, time
        from tune_upl import signals
        signals.DEADLINE_S = {deadline}
        signals.install("python run_search.py search --resume --name 'a b'", watchdog=True)
        signals.set_ray_probe(lambda: {probe})
        signals.set_run(True)
        print("ready", flush=True)
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
    """) + (BLOCK_IN_C if in_c else "time.sleep(60)\n")
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=90)
    return out, time.monotonic() - start


def test_the_watchdog_ends_a_driver_whose_ray_is_gone_at_once_with_the_resume_command(tmp_path):
    out, seconds = _driver_that_hangs(tmp_path, '"no GCS at 10.0.0.1:6379"', deadline=30)
    assert out.returncode == 143 and seconds < 10, (seconds, out.stderr)
    assert out.stderr.strip() == ("terminated (SIGTERM): no GCS at 10.0.0.1:6379; the experiment state Tune saved "
                                  "last resumes; continue with: python run_search.py search --resume --name 'a b'")


def test_the_watchdog_starts_from_the_signal_even_while_python_cannot_run_its_handler(tmp_path):
    out, seconds = _driver_that_hangs(tmp_path, '"no GCS at 10.0.0.1:6379"', deadline=30, in_c=True)
    assert out.returncode == 143 and seconds < 10, (seconds, out.stderr)
    assert out.stderr.strip().startswith("terminated (SIGTERM): no GCS at 10.0.0.1:6379;"), out.stderr


def test_the_watchdog_ends_a_driver_that_does_not_stop_in_time(tmp_path):
    out, seconds = _driver_that_hangs(tmp_path, "None", deadline=3)
    assert out.returncode == 143 and 3 <= seconds < 20, (seconds, out.stderr)
    assert "terminated (SIGTERM): Tune did not stop within 3 s; the experiment state Tune saved last resumes" in out.stderr


def test_the_resume_command_is_quoted_for_the_shell_and_absolute(tmp_path):
    storage, reports = tmp_path / "st ü" / " runs", tmp_path / "my reports"
    args = build_parser().parse_args(["search", "--name", "mini", "--storage", str(storage), "--reports-dir",
                                      str(reports), "--address", "auto"])
    command = resume_command(args)
    assert shlex.split(command) == ["python", "run_search.py", "search", "--resume", "--name", "mini", "--storage",
                                    str(storage), "--reports-dir", str(reports), "--address", "auto"]
    args = build_parser().parse_args(["search", "--name", "mini"])
    assert shlex.split(resume_command(args))[-2:] == ["--storage", str(Path.cwd() / "runs")]


def test_an_unusable_reports_folder_is_refused_before_any_work(tmp_path, capsys):
    spec, runs = write_spec(tmp_path), tmp_path / "runs"
    taken = tmp_path / "a-file"
    taken.write_text("not a folder\n")
    for command in (("search", "--space", str(spec), "--storage", str(runs)),
                    ("report", "--name", "mini", "--storage", str(runs))):
        code = main([*command, "--reports-dir", str(taken / "reports")])
        err = capsys.readouterr().err
        assert code == 2 and err == (f"error: --reports-dir {taken / 'reports'}: {taken} is a file, not a folder; "
                                     "allowed: a folder (made if missing) whose parents are folders\n")
    assert not runs.exists()  # the search started nothing


def test_the_start_line_counts_no_more_trials_per_study_than_it_has(tmp_path, capsys):
    spec = write_spec(tmp_path, num_samples=2, max_concurrent=5, final_seeds=1)
    assert main(["--space", str(spec), "--dry-run", "--storage", str(tmp_path / "runs")]) == 0
    assert "up to 2 trials at once (2 per study)" in capsys.readouterr().out
    assert MINI["max_concurrent"] == 1  # the shared spec is unchanged
