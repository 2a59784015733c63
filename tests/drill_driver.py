"""`python tests/drill_driver.py EVENTS PAUSE ARGS...`: the search command line (`run_search.py ARGS`) with
its searcher's events written to the file EVENTS as they happen, one line each (`suggest ID search|final`,
`result ID EPOCH`, `complete ID`, `selecting`, and `run new|restored` as the driver starts or restores
Tune's run), so that a test can signal the driver at a chosen moment
without waiting for Tune to copy results to storage; each selection waits PAUSE seconds first, so that a
signal can land while a study is selected (a moment too short to hit otherwise)."""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tune_upl.multistudy as multistudy  # noqa: E402
import tune_upl.search as search  # noqa: E402
from tune_upl.cli import main  # noqa: E402

events, pause = Path(sys.argv[1]), float(sys.argv[2])
searcher = multistudy.StudySearcher
suggest, on_result, on_complete = searcher.suggest, searcher.on_trial_result, searcher.on_trial_complete
select_trials = multistudy.select_trials
restorable = search.restorable


def log(line: str) -> None:
    with events.open("a") as out:
        out.write(line + "\n")


def logged_suggest(self, trial_id):
    config = suggest(self, trial_id)
    if isinstance(config, dict):
        log(f"suggest {trial_id} {'final' if config.get('final') else 'search'}")
    return config


def logged_result(self, trial_id, result):
    on_result(self, trial_id, result)
    log(f"result {trial_id} {result.get('training_iteration')}")


def logged_complete(self, trial_id, result=None, error=False):
    on_complete(self, trial_id, result, error)
    log(f"complete {trial_id}")


def slow_selection(*args, **kwargs):
    log("selecting")
    time.sleep(pause)
    return select_trials(*args, **kwargs)


def logged_restorable(folder):
    found = restorable(folder)
    log(f"run {'restored' if found else 'new'}")
    return found


search.restorable = logged_restorable
searcher.suggest, searcher.on_trial_result, searcher.on_trial_complete = logged_suggest, logged_result, logged_complete
multistudy.select_trials = slow_selection
sys.exit(main(sys.argv[3:]))
