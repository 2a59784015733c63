"""GPU memory arithmetic, without torch: how much of a card a packed trial may hold (`engine.claim_gpu` applies
it in the trial) and how much free memory a node's GPU needs before the first trial (`probe` checks it there,
without importing the trial's modules).
"""
from __future__ import annotations

import math
from typing import Optional

# GPU memory a process holds outside torch's caching allocator: the CUDA context and the kernels it loads
# (cuBLAS, cuDNN), about 0.5-1 GB per process (cuBLAS and cuDNN workspaces are allocated through the
# caching allocator, inside the cap). `scripts/gpu_check.sh` measures it on a real GPU against this figure.
PROCESS_OVERHEAD_BYTES = 2**30
CARD_RESERVE = 0.01  # of the card's memory, kept free for the driver's own allocations: packed trials fill 99%


def memory_cap(gpu_share: float, total_bytes: int) -> Optional[float]:
    """The fraction of the GPU's memory a packed trial's caching allocator may hold: its share of 99% of the
    card less the process overhead, so that `1 / gpu_share` trials, each with its context, fit the card
    together with room for the driver. None for a whole GPU (no neighbour to protect); a share too small to
    hold even the overhead is refused."""
    if gpu_share >= 1:
        return None
    cap = gpu_share * (1 - CARD_RESERVE) - PROCESS_OVERHEAD_BYTES / total_bytes
    if cap <= 0:
        raise ValueError(
            f"resources.gpu {gpu_share:g} of a {total_bytes / 2**30:.1f} GiB GPU is {gpu_share * total_bytes / 2**30:.2f} "
            f"GiB, which leaves no memory for training after the process's {PROCESS_OVERHEAD_BYTES / 2**30:g} GiB "
            "outside torch's allocator (CUDA context, kernels); give each trial a larger share"
        )
    return cap


def trials_per_gpu(gpu_share: float) -> int:
    """How many trials Ray packs onto one GPU at `gpu_share` each (a whole GPU or more: one)."""
    return 1 if gpu_share >= 1 else math.floor(1 / gpu_share + 1e-9)


def free_needed(gpu_share: float, total_bytes: int) -> int:
    """The free memory a GPU needs, as a process that has created its own CUDA context measures it, for the
    trials Ray packs on it: each holds its `memory_cap` plus its context, together 99% of the card for packed
    shares; a whole-GPU trial is given the same 99%. The measuring process's own context (about
    `PROCESS_OVERHEAD_BYTES`) is counted as used, so it is taken off."""
    packed = trials_per_gpu(gpu_share)
    share = min(gpu_share, 1.0) * packed
    return max(0, round(share * (1 - CARD_RESERVE) * total_bytes) - PROCESS_OVERHEAD_BYTES)
