"""A CUDA stand-in beneath torch, for proving the GPU path on a machine without one.

Only torch's C-level CUDA primitives are replaced (`torch._C._cuda_*`, `torch._C._cudart.cudaMemGetInfo`, and
what torch's C init sets: `torch.cuda.default_generators`, `torch.cuda._get_device_properties`), so every
check torch's own Python functions make still runs: `set_per_process_memory_fraction` refuses an index-less
device, an index past the visible count is refused, `is_bf16_supported` reads the capability. It cannot
allocate tensors: a test under it stops where a trial would first put a tensor on the GPU.

This is the one place in the tests that touches `torch._C` or assigns to `torch.cuda`. It needs a torch built
with CUDA (it replaces that build's primitives) and a machine without NVML (before CUDA is initialised, torch
counts devices through NVML first); elsewhere its tests are skipped, saying why.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import pytest
import torch

GIB = 2**30


@dataclass
class FakeProperties:
    """What `torch.cuda.get_device_properties` returns for one fake device (the fields the platform reads)."""

    name: str
    major: int
    minor: int
    total_memory: int
    multi_processor_count: int = 132
    is_integrated: bool = False


@dataclass
class FakeCuda:
    """The node's GPUs as the driver would show them: `physical` devices, of which CUDA_VISIBLE_DEVICES
    (read when counted, as the runtime reads it) leaves some visible. `calls` records every primitive the
    code under test reached, as (name, *arguments)."""

    physical: int = 1
    total_memory: int = 80 * GIB
    free_memory: Optional[int] = None  # cudaMemGetInfo's free (default: all of it)
    capability: tuple[int, int] = (9, 0)
    name: str = "Fake H100"
    peak_allocated: int = 0  # what max_memory_allocated reports
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    current: int = 0

    def visible(self) -> int:
        """The devices CUDA_VISIBLE_DEVICES leaves: every one when unset; else the listed ordinals up to the
        first that does not exist (as the CUDA runtime counts them)."""
        listed = os.environ.get("CUDA_VISIBLE_DEVICES")
        if listed is None:
            return self.physical
        count = 0
        for entry in listed.split(","):
            entry = entry.strip()
            if not entry.isdigit() or int(entry) >= self.physical:
                break
            count += 1
        return count

    def check(self, index: int) -> int:
        if not isinstance(index, int) or not 0 <= index < self.visible():
            raise RuntimeError(f"CUDA error: invalid device ordinal (device {index!r} of {self.visible()} visible)")
        return index

    # ---------------------------------------------------------------- the primitives
    def get_device_count(self) -> int:
        return self.visible()

    def init(self) -> None:
        self.calls.append(("init",))
        if self.visible() == 0:
            raise RuntimeError("No CUDA GPUs are available")
        # what torch's C init sets on torch.cuda (CPU generators stand in for the devices' ones)
        self._patch.setattr(torch.cuda, "default_generators",
                            tuple(torch.Generator() for _ in range(self.visible())), raising=False)
        self._patch.setattr(torch.cuda, "_get_device_properties", self.properties, raising=False)

    def properties(self, index: int) -> FakeProperties:
        self.check(index)
        return FakeProperties(self.name, *self.capability, self.total_memory)

    def get_device(self) -> int:
        return self.current

    def set_device(self, index: int) -> None:
        self.calls.append(("setDevice", index))
        self.current = self.check(index)

    def set_memory_fraction(self, fraction: float, index: int) -> None:
        self.calls.append(("setMemoryFraction", fraction, self.check(index)))

    def reset_peak(self, index: int) -> None:
        self.calls.append(("resetPeakMemoryStats", self.check(index)))

    def memory_stats(self, index: int) -> dict[str, Any]:
        self.check(index)
        return {"allocated_bytes": {"all": {"current": 0, "peak": self.peak_allocated}},
                "reserved_bytes": {"all": {"current": 0, "peak": 0}}}

    def empty_cache(self) -> None:
        self.calls.append(("emptyCache",))

    def mem_get_info(self, index: int) -> tuple[int, int]:
        self.check(index)
        free = self.total_memory if self.free_memory is None else self.free_memory
        return free, self.total_memory

    def named(self, name: str) -> list[tuple[Any, ...]]:
        """The recorded calls of one primitive."""
        return [call for call in self.calls if call[0] == name]

    _patch: pytest.MonkeyPatch = field(default_factory=pytest.MonkeyPatch, repr=False)


def nvml_present() -> bool:
    """Whether the NVIDIA management library loads here (torch asks it for the device count first)."""
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
        return True
    except OSError:
        return False


@contextlib.contextmanager
def fake_cuda(visible_devices: Optional[str] = None, **settings: Any) -> Iterator[FakeCuda]:
    """Torch sees the fake GPUs inside the block, CUDA_VISIBLE_DEVICES set to `visible_devices` (None: unset,
    every device visible); on exit its CUDA state and the variable are as before (not initialised, no cached
    device count, the calls it queues for its initialisation unchanged)."""
    if not hasattr(torch._C, "_cuda_getDeviceCount"):
        pytest.skip("torch is built without CUDA: there are no CUDA primitives to stand in for")
    if nvml_present():
        pytest.skip("NVML is on this machine: torch would count its real GPUs before the stand-in's")
    fake = FakeCuda(**settings)
    queued = list(torch.cuda._queued_calls)
    primitives = {
        "_cuda_getDeviceCount": fake.get_device_count, "_cuda_init": fake.init, "_cuda_getDevice": fake.get_device,
        "_cuda_setDevice": fake.set_device, "_cuda_setMemoryFraction": fake.set_memory_fraction,
        "_cuda_resetPeakMemoryStats": fake.reset_peak, "_cuda_memoryStats": fake.memory_stats,
        "_cuda_emptyCache": fake.empty_cache,
    }
    patch = fake._patch
    if visible_devices is None:
        patch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        patch.setenv("CUDA_VISIBLE_DEVICES", visible_devices)
    try:
        for name, function in primitives.items():
            patch.setattr(torch._C, name, function)
        patch.setattr(torch._C._cudart, "cudaMemGetInfo", fake.mem_get_info)
        patch.setattr(torch.cuda, "_initialized", False)
        patch.setattr(torch.cuda, "_cached_device_count", None)
        yield fake
    finally:
        patch.undo()  # torch's initialised flag and cached device count too
        torch.cuda._queued_calls[:] = queued  # the list torch extends in place when it initialises
