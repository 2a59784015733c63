"""A search stopped by SIGINT or SIGTERM, to the driver's PID or to its whole process group (as `scancel`
sends it), at each moment of a search: before the first result, during a search trial, once every search
trial has started, while a study is selected, during the last final run. Each stop must exit 130 or 143
within 30 s with the shell-quoted resume command and nothing after the signal (no selection, no final
stage, no "done"); the printed command, run as printed, must finish the search with every trial once and
every study's test numbers in the report. A moved or copied experiment is refused before Ray starts, and
left as it was.

Two chains of stops, one experiment each: every moment is stopped once by PID and once by group, and each
resume is the next moment's driver."""
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pytest
import yaml
from experiments import ROOT, result_rows
from searches import MINI

pytestmark = [pytest.mark.slow, pytest.mark.ray]

STUDIES = ["proxy_anchor", "normalized_softmax"]
SAMPLES = 2  # per study; one at a time per study, so a study's last search trial starts after its first ended
SPEC = {**MINI, "num_samples": SAMPLES, "final_seeds": 1, "studies": {"loss_name": STUDIES},
        "fixed": {**MINI["fixed"], "num_epochs": 2, "checkpoint_every": 1}}
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled"}
DRILL = str(ROOT / "tests" / "drill_driver.py")
AFTER_SIGNAL = ("selected trial", "final stage", " done in ", "report:")


class Driver:
    """A driver process in its own session, its output read as it comes (so that what it printed after the
    signal is known)."""

    def __init__(self, argv: list[str]):
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True)
        self.out: list[tuple[float, str]] = []
        self.err: list[str] = []
        self.readers = [threading.Thread(target=self._read, args=(self.proc.stdout, True), daemon=True),
                        threading.Thread(target=self._read, args=(self.proc.stderr, False), daemon=True)]
        for reader in self.readers:
            reader.start()

    def _read(self, stream, timed: bool) -> None:
        for line in stream:
            (self.out.append((time.monotonic(), line)) if timed else self.err.append(line))

    def wait_for(self, ready: Callable[[], bool], limit: float = 300) -> None:
        start = time.monotonic()
        while not ready():
            assert self.proc.poll() is None, f"ended before {ready.__doc__}\n" + self.text()
            assert time.monotonic() - start < limit, f"never reached {ready.__doc__}\n" + self.text()
            time.sleep(0.1)

    def stop(self, signum: int, group: bool, limit: float = 60) -> tuple[int, float, float]:
        """Signal the PID or the group; (exit code, seconds to exit, when the signal was sent)."""
        sent = time.monotonic()
        (os.killpg if group else os.kill)(self.proc.pid, signum)
        try:
            code = self.proc.wait(timeout=limit)
        finally:
            with_children_gone(self.proc)
        for reader in self.readers:
            reader.join(timeout=10)
        return code, time.monotonic() - sent, sent

    def finish(self, limit: float = 600) -> int:
        code = self.proc.wait(timeout=limit)
        for reader in self.readers:
            reader.join(timeout=10)
        return code

    def text(self) -> str:
        return "".join(line for _, line in self.out)[-3000:] + "".join(self.err)[-3000:]


def with_children_gone(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def search_rows(experiment: Path) -> dict[str, list[dict]]:
    return {p.parent.name: result_rows(p) for p in (experiment / "trials").glob("*/result.json")
            if not p.parent.name.endswith(".final")}


def selections(experiment: Path) -> list[Path]:
    return sorted(experiment.glob("*/selection.json"))


def moment_ready(moment: str, events: Path, first: int) -> Callable[[], bool]:
    """Whether the driver is at `moment`, from the searcher's events (`drill_driver.py`): those of the
    experiment's Tune run (since it was last started new), and this driver's own (after line `first`)."""
    def ready() -> bool:
        lines = events.read_text().split("\n")[:-1] if events.is_file() else []  # whole lines only
        new = [line.split() for line in lines[first:]]
        runs = [i for i, line in enumerate(lines) if line == "run new"]  # a run Tune never saved is gone
        seen = [line.split() for line in lines[runs[-1] if runs else 0:]]
        suggested = {e[1]: e[2] for e in seen if e[0] == "suggest"}
        completed = {e[1] for e in seen if e[0] == "complete"}
        if moment == "start":  # a trial suggested, no result yet
            return bool(suggested) and not any(e[0] == "result" for e in seen)
        if moment == "trial":  # a search trial has reported its first epoch in this run and not ended
            return any(e[0] == "result" and suggested.get(e[1]) == "search" and e[1] not in completed for e in new)
        if moment == "all started":  # every search trial started (the last in this run), nothing selected
            searched = [t for t, kind in suggested.items() if kind == "search"]
            return (len(searched) == SAMPLES * len(STUDIES) and any(e[0] == "suggest" for e in new)
                    and not any(e[0] == "selecting" for e in seen))
        if moment == "selecting":
            return any(e[0] == "selecting" for e in new)
        if moment == "last final":  # every final run started, one not ended
            finals = [t for t, kind in suggested.items() if kind == "final"]
            return len(finals) == len(STUDIES) and any(t not in completed for t in finals)
        raise ValueError(moment)
    ready.__doc__ = f"the moment '{moment}' (events after line {first})"
    return ready


def check_stopped(driver: Driver, code: int, seconds: float, sent: float, signum: int, resume: str,
                  experiment: Path, selected_before: list[Path]) -> None:
    word, expected = ("terminated", 143) if signum == signal.SIGTERM else ("interrupted", 130)
    assert code == expected, driver.text()
    assert seconds < 30, seconds
    last = "".join(driver.err).strip().splitlines()[-1]
    assert last.startswith(f"{word} (") and last.endswith(f"continue with: {resume}"), last
    after = [line for at, line in driver.out if at > sent]
    assert not [line for line in after if any(word in line for word in AFTER_SIGNAL)], after
    assert selections(experiment) == selected_before  # nothing selected after the signal
    assert not (experiment / "COMPLETE").exists()


def run_chain(tmp_path: Path, storage: Path, cache_dir: str, stops: list[tuple[str, int, bool]]) -> Path:
    """One experiment, stopped at each (moment, signal, group?) in turn, each time resumed with the command
    it printed; then resumed to the end. Returns the experiment folder."""
    spec = tmp_path / "interrupted.yaml"
    spec.write_text(yaml.safe_dump({**SPEC, "name": "chain"}))
    reports, events = tmp_path / "reports", tmp_path / "events"
    first = ["run_search.py", "--space", str(spec), "--storage", str(storage), "--reports-dir", str(reports),
             "--cache-dir", cache_dir]
    resume = shlex.join(["python", "run_search.py", "search", "--resume", "--name", "chain", "--storage",
                         str(storage), "--reports-dir", str(reports)])
    experiment = storage / "chain"
    argv = first
    for moment, signum, group in stops:
        first_event = len(events.read_text().splitlines()) if events.is_file() else 0
        driver = Driver([sys.executable, DRILL, str(events), "8" if moment == "selecting" else "0", *argv[1:]])
        driver.wait_for(moment_ready(moment, events, first_event))
        selected_before = selections(experiment)
        code, seconds, sent = driver.stop(signum, group)
        check_stopped(driver, code, seconds, sent, signum, resume, experiment, selected_before)
        argv = shlex.split(resume)[1:]  # the printed command, as a shell would split it (+ the cache of the tests)
        argv += ["--cache-dir", cache_dir]
        if moment == "start" and not group:
            moved_and_copied_are_refused(experiment, tmp_path, argv)
    driver = Driver([sys.executable, *argv])
    assert driver.finish() == 0, driver.text()
    assert (experiment / "COMPLETE").is_file()
    rows = search_rows(experiment)
    assert len(rows) == SAMPLES * len(STUDIES)  # every search trial once: none added by the restarts
    for trial, epochs in rows.items():
        assert {r["training_iteration"] for r in epochs} == {1, 2}, (trial, epochs)
    finals = {json.loads((p.parent / "params.json").read_text())["loss_name"]: result_rows(p)
              for p in (experiment / "trials").glob("*.final/result.json")}
    assert sorted(finals) == sorted(STUDIES) and all(rows[-1]["training_iteration"] == 2 for rows in finals.values())
    table = (reports / "chain.md").read_text().split("## Benchmark (test classes)")[1].split("\n\n|")[1]
    for loss, rows in finals.items():  # each study's test Recall@1, in the benchmark table's row of its loss
        row = next(line for line in ("|" + table).splitlines() if f" {loss} " in line)
        assert f" {100 * rows[-1]['test_recall@1']:.1f}% " in row, (loss, row)
    return experiment


def listing(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime for p in sorted(folder.rglob("*"))}


def moved_and_copied_are_refused(experiment: Path, tmp_path: Path, resume: list[str]) -> None:
    """`cp -a` of the interrupted experiment, then `mv` of it: a resume of either elsewhere is one line and
    exit 2 before Ray starts, naming where the experiment was and the command that resumes it there; neither
    folder is written. Moved back, the chain goes on from it."""
    where = resume.index("--storage") + 1
    storage = Path(resume[where])
    other = tmp_path / "elsewhere"
    other.mkdir()
    subprocess.run(["cp", "-a", str(experiment), str(other)], check=True)
    before, copied = listing(experiment), listing(other / experiment.name)
    elsewhere = [*resume[:where], str(other), *resume[where + 1:]]
    out = subprocess.run([sys.executable, *elsewhere], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.startswith(f"error: --resume: {other / experiment.name} is a copy of experiment chain at "
                                 f"{experiment}"), out.stderr
    assert out.stderr.strip().endswith(shlex.join(["python", "run_search.py", "search", "--resume", "--name", "chain",
                                                   "--storage", str(storage)]))
    assert listing(experiment) == before and listing(other / experiment.name) == copied
    shutil.rmtree(other / experiment.name)
    shutil.move(str(experiment), str(other / experiment.name))
    out = subprocess.run([sys.executable, *elsewhere], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith(f"error: --resume: experiment chain was written at {experiment} and is now at "
                                 f"{other / experiment.name}; Tune's saved state names the first folder"), out.stderr
    assert listing(other / experiment.name) == before
    shutil.move(str(other / experiment.name), str(experiment))


MOMENTS = ["start", "trial", "all started", "selecting", "last final"]


def test_every_moment_stopped_by_pid_resumes_to_every_trial_once(tmp_path, cache_dir):
    """SIGINT and SIGTERM alternate; the group gets them in the other chain. The storage's name has a space
    and a non-ASCII letter: the printed command is pasted back through a shell's splitting."""
    storage = tmp_path / "st ü" / "runs"
    stops = [(m, signal.SIGINT if i % 2 == 0 else signal.SIGTERM, False) for i, m in enumerate(MOMENTS)]
    run_chain(tmp_path, storage, cache_dir, stops)


def test_every_moment_stopped_by_group_resumes_to_every_trial_once(tmp_path, cache_dir):
    storage = tmp_path / "runs"
    stops = [(m, signal.SIGTERM if i % 2 == 0 else signal.SIGINT, True) for i, m in enumerate(MOMENTS)]
    run_chain(tmp_path, storage, cache_dir, stops)
