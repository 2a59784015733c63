"""Every error the platform raises on purpose, in one leaf module that imports nothing of ours.

The command line turns each into one message and exit code 2 without importing the modules that raise
them (so `report` never loads torch or Ray to catch an engine error); every module raises them from here.
"""
from __future__ import annotations

import shlex


class ConfigError(ValueError):
    """A bad configuration value: the message names the field, the value and what is allowed."""


class SpecError(ValueError):
    """An invalid spec; the message is one line per problem, each naming the key path."""


class ExperimentError(ValueError):
    """An experiment that cannot be started or resumed as asked; the message says what to do instead."""


class StorageError(ValueError):
    """A storage location that cannot be opened; the message names it and what is allowed."""


class DatasetError(RuntimeError):
    """A dataset that is missing, half-prepared or unreadable: the message says which file and what to do."""


class SplitAccessError(RuntimeError):
    """The test classes were asked for outside a final evaluation (hyper-parameters must not see them)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as SIGINT (Tune saves its state and returns early); the search exits 143, not 130."""


class Incomplete(RuntimeError):
    """Tune returned, and the experiment folder lacks a selection or a final run's last epoch and test."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read: names the file."""


class DivergedError(RuntimeError):
    """The training loss became non-finite: the run cannot recover, so it stops instead of wasting epochs."""

    def __init__(self, epoch: int):
        super().__init__(f"the training loss is not finite in epoch {epoch}")
        self.epoch = epoch


class OutOfMemory(RuntimeError):
    """The accelerator ran out of memory: says which batch size and backbone did it."""


class NoGPU(RuntimeError):
    """Ray gave the trial a GPU but its torch sees no CUDA device: names the node and CUDA_VISIBLE_DEVICES
    (a CPU run there would be silently slow and counted as accelerator time)."""


class WeightsMissing(RuntimeError):
    """ImageNet weights files that are not on this machine (and, in the driver, could not be downloaded).

    One message for all of them, built from node-independent facts only (file, URL, folder, the `prepare`
    command), so the driver's error before any trial and a trial's error on a node say the same thing.
    `missing`: (backbone, file path, URL) of each; `reason`: why downloading failed, when it was tried.
    """

    def __init__(self, missing: list[tuple[str, str, str]], reason: str = ""):
        parts = []
        for backbone, path, url in missing:
            folder, _, name = path.rpartition("/")
            command = shlex.join(["python", "run_search.py", "prepare", "--backbone_type", backbone, "--weights_dir",
                                  folder])
            parts.append(f"{backbone} needs {name} in {folder} (from {url}; or run: {command})")
        tried = f" and could not be downloaded ({reason})" if reason else ""
        super().__init__(f"ImageNet weights missing{tried}: {'; '.join(parts)}; or set pretrained to none or a "
                         "weights file")
        self.missing, self.reason = missing, reason

    def __reduce__(self) -> tuple[type, tuple[list[tuple[str, str, str]], str]]:  # Ray pickles a trial's error
        return type(self), (self.missing, self.reason)


def first_line(error: BaseException) -> str:
    """An error's message in one line (its first), or its type's name where it has none: what a trial line,
    a report or a one-line exit shows of it."""
    return (str(error).splitlines() or [""])[0] or type(error).__name__
