"""Where experiments live: a local (or shared) folder, or a URI such as `s3://bucket/runs` or
`gs://bucket/runs` (any filesystem pyarrow opens, as Ray Tune does).

With a URI, Tune writes the trial folders and checkpoints there itself. The driver's own files (the spec,
the record, the selections, the Optuna database, `COMPLETE`) are written to a local mirror folder first
(SQLite and atomic renames need a local disk) and pushed to the URI right after each write; `pull` brings an
experiment back down: its driver files before a resume (on this machine or another one), and everything but
the search's checkpoints for a report. `prune_checkpoints` deletes the checkpoints of a study's unselected
trials, on a folder or a URI alike.
"""
from __future__ import annotations

import functools
import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tune_upl.errors import StorageError
from tune_upl.layout import CHECKPOINT_PREFIX, MIRRORS_FOLDER, PARAMS_FILE

SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")



def is_uri(location: str) -> bool:
    return bool(SCHEME.match(location))


def mirror_root(uri: str, cache_dir: str | Path) -> Path:
    """The driver's local folder for the experiments under `uri` (one per URI, in the cache)."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", uri)[:80]
    digest = hashlib.sha1(uri.encode()).hexdigest()[:8]
    return Path(cache_dir).expanduser().resolve() / MIRRORS_FOLDER / f"{readable}-{digest}"


@dataclass(frozen=True)
class Remote:
    """Experiments under one URI, through pyarrow's filesystem layer (what Ray Tune itself uses)."""

    uri: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "uri", self.uri.rstrip("/"))

    @functools.cached_property
    def _opened(self) -> tuple[Any, str]:
        """(pyarrow.fs.FileSystem, path inside it), opened once per Remote."""
        import pyarrow.fs as pafs

        try:
            return pafs.FileSystem.from_uri(self.uri)
        except Exception as error:  # pyarrow raises ArrowInvalid, OSError, ... with its own words
            raise StorageError(f"--storage {self.uri}: cannot open it ({error}); allowed: a local folder, or a "
                               "URI pyarrow opens (s3://bucket/path, gs://bucket/path, hdfs://...)") from None

    def check(self) -> None:
        """Fail before Ray starts when the URI cannot be opened or listed (credentials, bucket, endpoint)."""
        fs, base = self._opened
        try:
            fs.get_file_info(base)
        except Exception as error:
            raise StorageError(f"--storage {self.uri}: cannot reach it ({error}); check the bucket, the "
                               "credentials and (for S3-compatible stores) AWS_ENDPOINT_URL") from None

    def experiment_uri(self, name: str) -> str:
        return f"{self.uri}/{name}"

    def files(self, name: str) -> list[str]:
        """Paths relative to the experiment, of every file under it (none when it does not exist)."""
        import pyarrow.fs as pafs

        fs, base = self._opened
        root = f"{base}/{name}"
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
        return sorted(i.path[len(root) + 1:] for i in infos if i.type == pafs.FileType.File)

    def exists(self, name: str) -> bool:
        """One metadata call (a prefix with objects under it is a directory on object stores)."""
        import pyarrow.fs as pafs

        fs, base = self._opened
        return fs.get_file_info(f"{base}/{name}").type != pafs.FileType.NotFound

    def push(self, local_experiment: Path, relative: str) -> None:
        """Copy one file of the local mirror to the same place under the URI (one object put: atomic)."""
        fs, base = self._opened
        target = f"{base}/{local_experiment.name}/{relative}"
        fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(target) as out:
            out.write((local_experiment / relative).read_bytes())

    def pull(self, name: str, local_experiment: Path, keep: Callable[[str], bool] = lambda relative: True) -> int:
        """Replace the local mirror of experiment `name` with the files under the URI that `keep` accepts;
        returns how many were copied."""
        fs, base = self._opened
        shutil.rmtree(local_experiment, ignore_errors=True)
        copied = 0
        for relative in self.files(name):
            if not keep(relative):
                continue
            target = local_experiment / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(f"{base}/{name}/{relative}") as source:
                target.write_bytes(source.read())
            copied += 1
        return copied



def push_file(remote: Remote, local_experiment: Path, relative: str) -> None:
    """Push one file of the local mirror when it is there (the searcher pushes `optuna.db` and selections
    with this, mid-run: a module-level function, so the searcher holding it pickles)."""
    if (local_experiment / relative).is_file():
        remote.push(local_experiment, relative)


def open_location(location: str) -> tuple[Any, str]:
    """(pyarrow.fs.FileSystem, path inside it) of a local folder or a URI: the layer Ray Tune writes through."""
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(location if is_uri(location) else str(Path(location).resolve()))


def prune_checkpoints(study: str, keep: Callable[[str, dict[str, Any]], bool]) -> int:
    """Delete the checkpoint folders of every trial in the Tune experiment `study` (a folder or a URI) that
    `keep(trial_id, params)` refuses; returns how many were deleted. On a URI each is a delete of the objects
    under its prefix, through pyarrow as Tune itself writes them. Idempotent: a trial without any is skipped."""
    import pyarrow.fs as pafs

    fs, base = open_location(study)
    deleted = 0
    for trial in fs.get_file_info(pafs.FileSelector(base, allow_not_found=True)):
        if trial.type != pafs.FileType.Directory:
            continue
        checkpoints = [c.path for c in fs.get_file_info(pafs.FileSelector(trial.path))
                       if c.type == pafs.FileType.Directory and c.base_name.startswith(CHECKPOINT_PREFIX)]
        if not checkpoints:
            continue
        params_path = f"{trial.path}/{PARAMS_FILE}"
        params = {}
        if fs.get_file_info(params_path).type == pafs.FileType.File:
            with fs.open_input_stream(params_path) as source:
                params = json.loads(source.read())
        if keep(trial.base_name, params):
            continue
        for path in checkpoints:
            fs.delete_dir(path)
            deleted += 1
    return deleted


def writable_folder(path: Path, option: str) -> Path:
    """An unusable `option` folder (a file, a read-only or unwritable folder) is one message before anything
    is written; a missing folder is made later, so its nearest existing parent must take it. Probed by
    writing a temporary file (permissions alone do not tell a read-only file system, nor root's rights).
    Returns that nearest existing folder."""
    import tempfile

    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise StorageError(f"{option} {path}: {existing} is a file, not a folder; allowed: a folder (made if "
                           "missing) whose parents are folders" + (", or a URI" if option == "--storage" else ""))
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise StorageError(f"{option} {path}: cannot write in {existing} ({error.strerror}); allowed: a folder "
                           "this user can write to" + (", or a URI" if option == "--storage" else "")) from None
    return existing
