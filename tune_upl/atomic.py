"""Build a folder once, safely: generated datasets and prepared caches share this one mechanism.

Why: several processes (trials, nodes, a second search) may ask for the same folder at once, and any
builder may be interrupted. A `filelock.FileLock` on a sibling `<name>.lock` file serialises builders;
a build goes into a temporary sibling `.<name>.tmp-*` that is renamed into place, and its marker file is
written last, so a half-written folder is never taken for a complete one.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Optional

from filelock import FileLock


def write_json(path: Path, data: object) -> None:
    """Write JSON through a temporary sibling and a rename: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def build_once(
    parent: Path,
    name: str,
    build: Callable[[Path], str],
    marker: str = ".complete",
    is_current: Optional[Callable[[Path], bool]] = None,
) -> tuple[Path, bool]:
    """Return (`parent/name`, whether it was built now), building it unless it is complete and current.

    `build(tmp)` fills the existing empty folder `tmp` and returns the marker's text. `is_current(root)`
    (default: the marker exists) decides whether an existing folder can be used as it is; one that
    cannot (half-written, or built from an older source) is replaced.
    """
    parent = Path(parent)
    root = parent / name
    current = is_current or (lambda folder: (folder / marker).is_file())
    if current(root):
        return root, False
    parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(parent / f"{name}.lock")):
        if current(root):  # another process finished while we waited
            return root, False
        # Under the lock nobody else is building: leftovers of crashed or interrupted builds are stale.
        for stale in parent.glob(f".{glob.escape(name)}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp, old = parent / f".{name}.tmp-{tag}", parent / f".{name}.tmp-old-{tag}"
        try:
            tmp.mkdir()
            text = build(tmp)
            (tmp / marker).write_text(text)
            if root.exists():  # half-written or out of date: move it aside, then swap the new one in
                os.replace(root, old)
            os.replace(tmp, root)
        finally:
            for leftover in (tmp, old):
                if leftover.exists():
                    shutil.rmtree(leftover, ignore_errors=True)
    return root, True


def build_file_once(path: Path, write: Callable[[Path], None]) -> bool:
    """Make the file `path` unless it exists; returns whether it was made now.

    `write(tmp)` writes the whole file at the temporary sibling `.<name>.tmp-*`, which is renamed into
    place, so a reader (or a later call) never takes an interrupted download for a complete file. The
    same `<name>.lock` discipline as `build_once`: two processes on one node write it once.
    """
    path = Path(path)
    if path.is_file():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.parent / f".{path.name}.lock")):
        if path.is_file():  # another process finished while we waited
            return False
        for stale in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
            stale.unlink(missing_ok=True)
        tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            write(tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return True
