"""The experiment folder's layout: every file and folder name the driver writes and the readers read, how
a study's folder is named, and how a trial's state is named.

A leaf module (standard library only): the report, the retrieval tool and the command line find their
files here without importing the code that wrote them (and with it Ray and torch).

Under `<storage>/<name>/`: `search_spec.json` (the resolved spec and overrides: a resume reads it),
`record.json` (code version, packages, hardware, class lists), `optuna.db` (each study's Optuna study),
`warm_start.json` with a `warm_start` spec (each study's warm-start points, resolved once at start),
`<study>/selection.json` per study once it is selected, and `COMPLETE` once everything has run. Every
trial of every study, its final runs included, is in one Tune experiment, `trials/` (a final run's folder
is `<trial id>.final`, a recipe run's `<trial id>.recipe`), whatever the searcher. Each trial folder (named
by its trial id) holds Tune's `params.json`, `result.json` and `checkpoint_*/` folders, each checkpoint our
`state.pt` (and, for a final run, `test_embeddings.pt`). A folder with any other Tune experiment was written by tune_upl
`LAST_READER` or older, which is the last version that reads it (`older_layout`).
"""
from __future__ import annotations

import hashlib
import shlex
from pathlib import Path
from typing import Any, Optional

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"  # an experiment's name: one plain folder name under the storage

# ---------------------------------------------------------------- the driver's files
SPEC_FILE = "search_spec.json"
RECORD_FILE = "record.json"
COMPLETE_FILE = "COMPLETE"
OPTUNA_FILE = "optuna.db"  # each TPE study's Optuna storage, in the experiment's local folder
SELECTION_FILE = "selection.json"  # in each study's folder
UNSELECTABLE_FILE = "unselectable.json"  # instead, in a study's folder where no trial reported the objective
WARM_START_FILE = "warm_start.json"  # each study's warm-start points and their source, resolved once at start
FINAL_RUN_SUFFIX = ".final"  # a final run's folder in RUN_FOLDER: `<trial id>.final`
RECIPE_RUN_SUFFIX = ".recipe"  # a recipe run's (`recipe_runs`: the loss's recipe, retrained and tested)
RUN_FOLDER = "trials"  # the one Tune experiment of a search: every study's trials and final runs
LAST_READER = "0.1.0"  # the last tune_upl that reads experiments in an older layout (a Tune experiment per
# study or per final stage, `grid/`, or trials that do not name their study)
MAIN_STUDY = "main"  # the one study of a spec without `studies`

# ---------------------------------------------------------------- a trial's checkpoint
CHECKPOINT_FILE = "state.pt"
EMBEDDINGS_FILE = "test_embeddings.pt"  # the final model's test database, for the retrieval tool

# ---------------------------------------------------------------- Tune's own files
TUNE_STATE_PATTERN = "experiment_state-*.json"  # present once Tune has saved the experiment
PARAMS_FILE = "params.json"
RESULT_FILE = "result.json"
CHECKPOINT_PREFIX = "checkpoint_"
CHECKPOINT_COLUMN = "checkpoint_dir_name"  # the result.json key naming the epoch's checkpoint folder

# ---------------------------------------------------------------- beside the experiments
MIRRORS_FOLDER = "mirrors"  # under cache_dir: the driver's local mirror of the experiments under a URI
PULLED_FOLDER = "pulled"  # under a mirror: experiments pulled for a report, apart from a running driver's files


def search_command(*words: str, name: str, storage: str, reports_dir: Optional[str] = None,
                   address: Optional[str] = None) -> str:
    """`python run_search.py WORDS --name NAME --storage STORAGE [--reports-dir ...] [--address ...]`, every
    value quoted for a POSIX shell, so that it can be pasted back whatever the folders are called. `storage`
    and `reports_dir` are absolute (or a URI): the command works from any working directory."""
    parts = ["python", "run_search.py", *words, "--name", name, "--storage", storage]
    if reports_dir is not None:
        parts += ["--reports-dir", reports_dir]
    if address is not None:
        parts += ["--address", address]
    return shlex.join(parts)


def driver_lock_name(name: str) -> str:
    """The lock file of experiment `name`'s driver, in the storage folder beside the experiment."""
    return f".{name}.driver.lock"


KEY_BYTES = 200  # a study's key is a folder name (at most 255 bytes on most file systems), and Optuna's study name


def study_key(point: dict[str, Any]) -> str:
    """A study's key and folder name: its `studies` values (`data_name=cub,loss_name=proxy_anchor`), or `main`.
    One folder name whatever the values: `%` and `/` are percent-encoded (`data_path=%2Fdata%2Fcub`), and a
    key longer than KEY_BYTES is cut and ends with a hash of the whole."""
    key = ",".join(f"{k}={_folder_safe(str(v))}" for k, v in point.items()) or MAIN_STUDY
    if len(key.encode()) <= KEY_BYTES:
        return key
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    return key.encode()[: KEY_BYTES - 13].decode(errors="ignore") + "~" + digest


def _folder_safe(value: str) -> str:
    return value.replace("%", "%25").replace("/", "%2F").replace("\0", "%00")


# ---------------------------------------------------------------- what the searcher adds to a trial's config
# The searcher names each trial's study (and a search trial's Optuna trial number, a warm-start trial its
# source) in its config: Tune keeps them through `Tuner.restore` and writes them to `params.json`, so the
# scheduler, the progress lines and every reader take a trial's study from the trial itself. The trainable
# removes them before `make_config`.
STUDY_KEY = "study"
OPTUNA_NUMBER_KEY = "optuna_trial"
WARM_START_KEY = "warm_start"  # a warm-start trial: "<source experiment>/<source study>" (`tune_upl.warm_start`)
# a recipe run (`recipe_runs`): a final run (`final: true`, a `TrialConfig` field) of the loss's recipe
RECIPE_KEY = "recipe"
SEARCH_KEYS = (STUDY_KEY, OPTUNA_NUMBER_KEY, WARM_START_KEY, RECIPE_KEY)


def run_suffix(config: dict[str, Any]) -> str:
    """A trial folder's suffix after its id, by the trial's kind: `.recipe`, `.final`, or none (a search trial)."""
    if config.get(RECIPE_KEY):
        return RECIPE_RUN_SUFFIX
    return FINAL_RUN_SUFFIX if config.get("final") else ""


def trial_fields(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's config without what the searcher added: its `TrialConfig` fields (and Tune's `final`)."""
    return {k: v for k, v in config.items() if k not in SEARCH_KEYS}


def older_layout(name: str, folders: list[str], unnamed: Optional[str] = None) -> Optional[str]:
    """The one line for an experiment in an older layout: Tune experiments in `folders` other than `trials/`
    (one per study or final stage, or `grid/`), or a trial (`unnamed`) that does not name its study."""
    old = sorted(set(folders) - {RUN_FOLDER})
    if not old and unnamed is None:
        return None
    what = f"its Tune runs {', '.join(old)}/" if old else f"trial {unnamed} does not name its study"
    return (f"experiment {name} is in an older layout ({what}); tune_upl {LAST_READER} is the last version that "
            "reports or resumes it: run that version for it, or start the search again with --overwrite")


def driver_file(relative: str) -> bool:
    """What a resume needs of an experiment: the driver's files, not the trial folders Tune restores itself."""
    parts = relative.split("/")
    return len(parts) == 1 or (len(parts) == 2 and parts[1] in (SELECTION_FILE, UNSELECTABLE_FILE))


def report_file(relative: str) -> bool:
    """What a report and the retrieval tool need: all but the search's checkpoints (final and recipe models are
    kept)."""
    parts = relative.split("/")
    return not any(p.startswith(CHECKPOINT_PREFIX) for p in parts) or (
        len(parts) > 1 and parts[1].endswith((FINAL_RUN_SUFFIX, RECIPE_RUN_SUFFIX)))


# ---------------------------------------------------------------- a trial's state
COMPLETED = "completed"
STOPPED_EARLY = "stopped early"  # by ASHA, on a rung
DIVERGED = "diverged"
OUT_OF_MEMORY = "out of memory"
ERRORED = "errored"
UNFINISHED = "unfinished"  # started and not ended: running now or interrupted (Tune saves it as pending)
RUNNING = "running"
PENDING = "pending"
PAUSED = "paused"
# the order states are listed in
STATES = (COMPLETED, STOPPED_EARLY, DIVERGED, OUT_OF_MEMORY, ERRORED, UNFINISHED, RUNNING, PENDING, PAUSED)
OPEN_STATES = (UNFINISHED, RUNNING, PENDING, PAUSED)  # not ended (yet)
STATE_NAMES = {"TERMINATED": COMPLETED, "ERROR": ERRORED, "RUNNING": RUNNING, "PENDING": PENDING, "PAUSED": PAUSED}

# the keys a trial stopped by its own failure adds to its last result
DIVERGED_FLAG = "diverged"
OOM_FLAG = "oom"
NO_GPU_FLAG = "no_gpu"  # Ray gave the trial a GPU its torch could not see: errored, not retried
NO_WEIGHTS_FLAG = "no_weights"  # the node lacks the ImageNet weights file: errored, not retried
GPU_START_FLAG = "gpu_start_failed"  # the trial's start on its GPU raised (memory cap, device, data): errored, not retried
ERROR_KEY = "error"
FAULT_FLAGS = (DIVERGED_FLAG, OOM_FLAG, NO_GPU_FLAG, NO_WEIGHTS_FLAG, GPU_START_FLAG)  # its score is no score


def faulted(result: dict[str, Any]) -> bool:
    """Whether a result is the last of a trial ended by its own failure (its metrics are the worst, not real)."""
    return any(result.get(flag) for flag in FAULT_FLAGS)


def trial_state(status: str, last_result: dict[str, Any], planned_epochs: Any) -> str:
    """A trial's state as users read it: completed, stopped early (ASHA), diverged, out of memory, errored..."""
    if last_result.get(DIVERGED_FLAG):
        return DIVERGED
    if last_result.get(OOM_FLAG):
        return OUT_OF_MEMORY
    if last_result.get(NO_GPU_FLAG) or last_result.get(NO_WEIGHTS_FLAG) or last_result.get(GPU_START_FLAG):
        return ERRORED
    state = STATE_NAMES.get(status, status.lower())
    epochs = last_result.get("training_iteration", 0)
    if state == COMPLETED and isinstance(planned_epochs, int) and epochs < planned_epochs:
        return STOPPED_EARLY
    return state


def error_line(path: Optional[Path]) -> Optional[str]:
    """The last line of a trial's Tune error file (the exception and its message), or None without one:
    what the trial line and the report show, the full traceback staying in the file."""
    if path is None or not path.is_file():
        return None
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "error"
