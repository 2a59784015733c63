"""The eval suite's peer: faiss's exact flat inner-product index (`faiss.IndexFlatIP`), a benchmark-only
dependency (requirements.txt installs faiss-cpu; the platform never imports it).

faiss-cpu's wheels bundle an OpenBLAS that picks its kernels by CPU model; one that predates the CPU falls
back to generic SSE3 kernels ("Prescott"), 4x slower here (an Intel Xeon of model 207: 9.7 s against 2.5 s
at N = 20,000). So that the peer runs at its best, `load` names the kernels by instruction set
(`OPENBLAS_CORETYPE`, read when faiss loads its OpenBLAS) unless the environment already does.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch


def _coretype() -> Optional[str]:
    """OpenBLAS's name for this CPU's widest kernels: SkylakeX with AVX-512, Haswell with AVX2."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return "SkylakeX" if " avx512f" in flags else "Haswell" if " avx2" in flags else None


def load() -> tuple[Optional[Any], str]:
    """faiss (or None) and a line saying what was loaded, or why not."""
    if "OPENBLAS_CORETYPE" not in os.environ and _coretype():
        os.environ["OPENBLAS_CORETYPE"] = _coretype()
    try:
        import faiss
    except ImportError as error:
        return None, f"faiss is not installed ({error}): `pip install faiss-cpu` adds the k-NN peer's rows"
    faiss.omp_set_num_threads(torch.get_num_threads())
    return faiss, (f"faiss {faiss.__version__}, {torch.get_num_threads()} OpenMP threads (as torch), "
                   f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', 'unset')}")


def search(faiss: Any, x: torch.Tensor, depth: int):
    """An exact flat inner-product index over `x` (float32, normalised, on the CPU), queried with every row
    for `depth + 1` neighbours: the query itself and `depth` others. Returns faiss's (scores, indices)."""
    array = x.numpy()
    index = faiss.IndexFlatIP(array.shape[1])
    index.add(array)
    return index.search(array, depth + 1)


def without_self(indices: Any, depth: int) -> torch.Tensor:
    """Each row's first `depth` neighbours other than the query (faiss ranks it first, except among equal
    similarities, or leaves it out beyond `depth + 1` equal ones)."""
    found = torch.from_numpy(indices)
    others = found != torch.arange(len(found))[:, None]
    keep = torch.sort((~others).to(torch.uint8), dim=1, stable=True).indices[:, :depth]
    return found.gather(1, keep)
