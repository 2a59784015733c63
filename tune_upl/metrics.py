"""Retrieval metrics on embeddings: exact cosine k-NN, computed in row chunks.

Memory is N x chunk_size, never N x N, so 20,000 test images at d = 512 evaluate on a small GPU.
The query itself is never its own neighbour. Neighbours are ranked by their similarity rounded to
2^-14 (6.1e-5), equal ones by ascending index (`neighbours.top_depth`): exact ties stay ties however the
matrix product rounds, so the chunk size, the BLAS library, the CPU and the GPU change no result, except
where a similarity lies within the product's own error (a few float32 units in the last place) of a
rounding boundary (`neighbours` says exactly what is guaranteed). The sums over queries are taken in fixed
blocks (`_block_sums`), so equal rankings give bit-equal results.
A query whose class has no other image has nothing to retrieve: it is excluded from every mean and counted.

Recall@K is the fraction of queries with a same-class image among their k nearest; MAP@R and
R-precision follow Musgrave et al., "A Metric Learning Reality Check" (ECCV 2020): with R the number
of other images of the query's class, R-precision = (relevant among the top R) / R and
MAP@R = (1/R) sum_{i<=R} P(i) rel(i), P(i) the precision at rank i.
"""
from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits

from tune_upl.neighbours import top_depth

SUM_BLOCK = 1024  # queries per partial sum of MAP@R and R-precision (see `_block_sums`)
SLAB_FLOPS = 2**26  # below this a CPU chunk's product is one call: threads would cost more than they save


@dataclass(frozen=True)
class RetrievalResult:
    """Recall@K per k, MAP@R, R-precision, and how many queries counted."""

    recall: dict[int, float]
    map_at_r: float
    r_precision: float
    num_queries: int
    num_excluded: int

    def as_metrics(self, prefix: str) -> dict[str, float]:
        """Result names as reported to Tune: `val_recall@1`, `val_map@r`, `val_r_precision`."""
        named = {f"{prefix}_recall@{k}": v for k, v in self.recall.items()}
        return {**named, f"{prefix}_map@r": self.map_at_r, f"{prefix}_r_precision": self.r_precision}


def _block_sums(per_query: torch.Tensor, valid: torch.Tensor) -> float:
    """Sum over valid queries, taken in blocks of SUM_BLOCK queries and the block sums added in order: the
    same float64 operations whatever the chunk size, so chunking never changes a result's last bit."""
    sums = [per_query[s:s + SUM_BLOCK][valid[s:s + SUM_BLOCK]].sum() for s in range(0, len(per_query), SUM_BLOCK)]
    return sum(torch.stack(sums).tolist()) if sums else 0.0


def chunk_similarities(rows: torch.Tensor, emb: torch.Tensor, out: torch.Tensor,
                       pool: Optional[ThreadPoolExecutor] = None) -> torch.Tensor:
    """`rows @ emb.T` into `out`. On a GPU (or without `pool`), torch's product. On the CPU, numpy's BLAS (the
    OpenBLAS of numpy's wheels picks its kernels by CPU model: on an AMD EPYC it took 2.2 s for the products
    at N = 20,000, d = 512 on 2 threads, where torch's MKL took 2.5-3.9 s), the rows split into one slab per
    torch thread, each computed single-threaded on a thread of `pool` (see `cpu_products`)."""
    if rows.device.type != "cpu" or pool is None:
        return torch.matmul(rows, emb.t(), out=out)
    a, b, c = rows.numpy(), emb.numpy().T, out.numpy()
    slabs = torch.get_num_threads() if 2 * a.size * b.shape[1] >= SLAB_FLOPS else 1
    edges = np.linspace(0, len(a), slabs + 1).astype(int)
    done = [pool.submit(np.matmul, a[lo:hi], b, out=c[lo:hi]) for lo, hi in zip(edges[:-1], edges[1:]) if hi > lo]
    for future in done:
        future.result()
    return out


CHUNK_SIZE = 2048  # queries a matrix product: N x 2048 float32 similarities at a time (164 MB at N = 20,000)


def retrieval_metrics(
    embeddings: torch.Tensor, labels: torch.Tensor, ks: Iterable[int], chunk_size: int = CHUNK_SIZE
) -> RetrievalResult:
    """Recall@K, MAP@R and R-precision by exact cosine k-NN over all other images.

    Per-query figures stay on the device; the host reads them once, at the end (one sync on a GPU)."""
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    emb = F.normalize(embeddings.detach().float(), dim=-1)
    n, device = emb.shape[0], emb.device
    _, dense = torch.unique(labels.to(device), return_inverse=True)
    others = torch.bincount(dense)[dense] - 1  # R: other images of each query's class
    valid = others > 0
    depth = max(1, min(max(ks[-1], int(others.max()) if n else 1), n - 1))
    first_hit = torch.empty(n, dtype=torch.long, device=device)  # rank - 1 of the first same-class neighbour
    average_precision = torch.empty(n, dtype=torch.float64, device=device)
    r_precision = torch.empty(n, dtype=torch.float64, device=device)
    ranks = torch.arange(1, depth + 1, device=device)
    sims_buffer = torch.empty(min(chunk_size, n), n, device=device)  # reused: no page faults per chunk
    with cpu_products(emb) as pool:
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            sims = chunk_similarities(emb[start:stop], emb, sims_buffer[:stop - start], pool)
            sims[:, start:stop].diagonal().fill_(float("-inf"))  # never match yourself
            order = top_depth(sims, depth)  # each row's first `depth` neighbours by (-rounded similarity, index)
            relevant = dense[order] == dense[start:stop, None]
            first_hit[start:stop] = torch.where(relevant.any(dim=1), relevant.float().argmax(dim=1), n)
            r = others[start:stop]
            rel_r = relevant & (ranks[None, :] <= r[:, None])
            precision_at_i = rel_r.cumsum(dim=1).double() / ranks[None, :]
            r_safe = r.clamp(min=1).double()
            average_precision[start:stop] = (precision_at_i * rel_r).sum(dim=1) / r_safe
            r_precision[start:stop] = rel_r.sum(dim=1).double() / r_safe
    del sims_buffer
    counted = int(valid.sum())
    hits = ((first_hit[None, :] < torch.tensor(ks, device=device)[:, None]) & valid).sum(dim=1).tolist()
    mean = (lambda total: total / counted) if counted else (lambda total: 0.0)
    return RetrievalResult(
        recall={k: mean(h) for k, h in zip(ks, hits)},
        map_at_r=mean(_block_sums(average_precision, valid)),
        r_precision=mean(_block_sums(r_precision, valid)),
        num_queries=counted,
        num_excluded=n - counted,
    )


@contextlib.contextmanager
def cpu_products(emb: torch.Tensor) -> Iterator[Optional[ThreadPoolExecutor]]:
    """For an evaluation on the CPU (float32, as `retrieval_metrics` makes it): a thread per torch thread for
    the products' slabs, numpy's BLAS held to one thread of its own meanwhile (`threadpoolctl`), since BLAS
    threads left spinning after each product slowed the torch operations between products by half; on a
    GPU None (torch's product)."""
    if emb.device.type != "cpu":
        yield None
        return
    with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
        yield pool


def recall_at_k(
    embeddings: torch.Tensor, labels: torch.Tensor, ks: Iterable[int], chunk_size: int = CHUNK_SIZE
) -> dict[int, float]:
    """`{k: fraction}`; see `retrieval_metrics` for MAP@R, R-precision and the excluded queries."""
    return retrieval_metrics(embeddings, labels, ks, chunk_size).recall
