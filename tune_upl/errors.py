"""Every error the platform raises on purpose, in one leaf module that imports nothing of ours.

The command line turns each into one message and exit code 2 without importing the modules that raise
them (so `report` never loads torch or Ray to catch an engine error); every module raises them from here.
"""
from __future__ import annotations


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

