"""Another machine's view, for the Python processes of one node of a test's local Ray `Cluster`: put on that
node's PYTHONPATH (the raylet's `env_vars`), it runs at the start of each process there.

- `TUNE_UPL_TEST_HIDE`: folders (os.pathsep-separated) this node does not have: each process enters its own
  mount namespace and mounts `TUNE_UPL_TEST_EMPTY` over each, as a machine whose local disk lacks them would
  look (the files stay there for every other node). Needs the right to unshare mounts (root, or a user
  namespace); `can_hide` tells the tests.
- `TUNE_UPL_TEST_FAKE_GPUS`: the node's torch sees that many GPUs: the CUDA stand-in of `tests/fake_cuda.py`
  (torch's C primitives replaced, its Python checks intact) is installed right after torch is imported.
"""
import ctypes
import importlib.abc
import importlib.util
import os
import sys

CLONE_NEWNS, MS_REC, MS_PRIVATE, MS_BIND = 0x00020000, 0x4000, 1 << 18, 4096


def hide(folders: list[str], empty: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0 or libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        raise OSError(ctypes.get_errno(), f"node view: cannot unshare mounts ({os.strerror(ctypes.get_errno())})")
    for folder in folders:
        if libc.mount(empty.encode(), folder.encode(), None, MS_BIND, None) != 0:
            raise OSError(ctypes.get_errno(), f"node view: cannot hide {folder} ({os.strerror(ctypes.get_errno())})")


class FakeGpusAfterTorch(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when `torch` is first imported, wraps its loader so the stand-in goes in after."""

    def __init__(self, count: int):
        self.count = count
        self.installed = None

    def find_spec(self, name, path=None, target=None):
        if name != "torch":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("torch")
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
            from fake_cuda import fake_cuda

            self.installed = fake_cuda(visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"), physical=self.count)
            self.installed.__enter__()  # kept: a dropped context manager would close and undo it

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("TUNE_UPL_TEST_HIDE"):
    hide(os.environ["TUNE_UPL_TEST_HIDE"].split(os.pathsep), os.environ["TUNE_UPL_TEST_EMPTY"])
if os.environ.get("TUNE_UPL_TEST_FAKE_GPUS"):
    sys.meta_path.insert(0, FakeGpusAfterTorch(int(os.environ["TUNE_UPL_TEST_FAKE_GPUS"])))
