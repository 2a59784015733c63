"""Retrieval metrics on embeddings: exact cosine k-NN, computed in row chunks.

Two layouts. By default (CUB-200, Cars196, SOP) every image is a query against all other images: the
query is never its own neighbour. With `references` (In-Shop Clothes, whose queries search its gallery
only) the queries search the references alone; a query that is also among the references stays there.
Memory is chunk_size x M (M the images searched: all N, or the references), never N x M, so 20,000 test
images at d = 512 evaluate on a small GPU. Neighbours are ranked by their similarity rounded to 2^-14
(6.1e-5), equal ones by ascending index (`neighbours.top_depth`): exact ties stay ties however the matrix
product rounds, so the chunk size, the BLAS library, the CPU and the GPU change no result, except where a
similarity lies within the product's own error (a few float32 units in the last place) of a rounding
boundary (`neighbours` says exactly what is guaranteed). The sums over queries are taken in fixed blocks
(`_block_sums`), so equal rankings give bit-equal results.
A query with nothing to retrieve (no other image of its class; with references, no reference of its class)
is excluded from every mean and counted.

Recall@K is the fraction of queries with a relevant image among their k nearest (with references, a k
beyond their number means any relevant reference at all); MAP@R and R-precision follow Musgrave et al.,
"A Metric Learning Reality Check" (ECCV 2020): with R the number of relevant images (other images of the
query's class; with references, references of its class), R-precision = (relevant among the top R) / R
and MAP@R = (1/R) sum_{i<=R} P(i) rel(i), P(i) the precision at rank i.
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


CHUNK_SIZE = 2048  # queries a matrix product: M x 2048 float32 similarities at a time (164 MB at M = 20,000)


def retrieval_metrics(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    ks: Iterable[int],
    chunk_size: int = CHUNK_SIZE,
    *,
    references: Optional[torch.Tensor] = None,
    reference_labels: Optional[torch.Tensor] = None,
) -> RetrievalResult:
    """Recall@K, MAP@R and R-precision by exact cosine k-NN: each of `embeddings` against all other images, or,
    with `references` and `reference_labels`, against those references only (a query/gallery split).

    Per-query figures stay on the device; the host reads them once, at the end (one sync on a GPU)."""
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    _check_arguments(embeddings, labels, references, reference_labels)
    queries = F.normalize(embeddings.detach().float(), dim=-1)
    device = queries.device
    if references is None:
        _, classes = torch.unique(labels.to(device), return_inverse=True)
        gallery, gallery_classes = queries, classes
        relevant_count = torch.bincount(classes)[classes] - 1  # R: other images of each query's class
    else:
        gallery = F.normalize(references.detach().float().to(device), dim=-1)
        # one mapping for both: a query's class id equals a reference's exactly when their labels are equal
        both = torch.cat([labels.to(device), reference_labels.to(device)])
        names, classes = torch.unique(both, return_inverse=True)
        classes, gallery_classes = classes[:len(queries)], classes[len(queries):]
        # R: references of each query's class
        relevant_count = torch.bincount(gallery_classes, minlength=len(names))[classes]
    candidates = len(gallery) - 1 if references is None else len(gallery)  # neighbours a query can have
    depth = min(max(ks[-1], int(relevant_count.max()) if len(queries) else 0), candidates)
    scores = _per_query_scores(queries, classes, gallery, gallery_classes, relevant_count, depth, chunk_size,
                               same_set=references is None)
    return _summary(*scores, relevant_count > 0, ks)


def _check_arguments(embeddings: torch.Tensor, labels: torch.Tensor, references: Optional[torch.Tensor],
                     reference_labels: Optional[torch.Tensor]) -> None:
    """A mismatch raises here, naming the argument, instead of surfacing as an indexing error or, worse, as
    labels silently paired with the wrong embeddings."""
    if len(labels) != len(embeddings):
        raise ValueError(f"labels has {len(labels)} entries for {len(embeddings)} embeddings: "
                         "one label per embedding")
    if (references is None) != (reference_labels is None):
        given, missing = ("references", "reference_labels")
        if references is None:
            given, missing = missing, given
        raise ValueError(f"{given} was given without {missing}: pass both (queries search the references only) "
                         "or neither (each image searches all other images)")
    if references is None:
        return
    if len(reference_labels) != len(references):
        raise ValueError(f"reference_labels has {len(reference_labels)} entries for {len(references)} "
                         "references: one label per reference")
    if references.shape[-1] != embeddings.shape[-1]:
        raise ValueError(f"references have width {references.shape[-1]} but embeddings have width "
                         f"{embeddings.shape[-1]}: queries and references must be embedded alike")


def _per_query_scores(
    queries: torch.Tensor, classes: torch.Tensor, gallery: torch.Tensor, gallery_classes: torch.Tensor,
    relevant_count: torch.Tensor, depth: int, chunk_size: int, same_set: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each query's rank - 1 of its first relevant neighbour, AP@R and R-precision, from chunks of queries
    against the whole gallery: memory is chunk_size x len(gallery). With `same_set` the gallery is the queries
    themselves and a query is never its own neighbour. One path for both layouts: the same products, ranking
    and arithmetic, so they differ only where the layouts do. A first hit beyond `depth` reads len(gallery):
    no hit for any k <= depth, and a larger k means depth is every neighbour a query has, where each counted
    query has a hit (k beyond the gallery: any relevant image at all)."""
    n, device = len(queries), queries.device
    first_hit = torch.full((n,), len(gallery), dtype=torch.long, device=device)
    average_precision = torch.zeros(n, dtype=torch.float64, device=device)
    r_precision = torch.zeros(n, dtype=torch.float64, device=device)
    if depth < 1:  # no query has a neighbour: none has anything to retrieve
        return first_hit, average_precision, r_precision
    ranks = torch.arange(1, depth + 1, device=device)
    sims_buffer = torch.empty(min(chunk_size, n), len(gallery), device=device)  # reused: no page faults per chunk
    with cpu_products(gallery) as pool:
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            sims = chunk_similarities(queries[start:stop], gallery, sims_buffer[:stop - start], pool)
            if same_set:
                sims[:, start:stop].diagonal().fill_(float("-inf"))  # never match yourself
            order = top_depth(sims, depth)  # each row's first `depth` neighbours by (-rounded similarity, index)
            relevant = gallery_classes[order] == classes[start:stop, None]
            scores = _chunk_scores(relevant, relevant_count[start:stop], ranks, miss=len(gallery))
            first_hit[start:stop], average_precision[start:stop], r_precision[start:stop] = scores
    return first_hit, average_precision, r_precision


def _chunk_scores(relevant: torch.Tensor, r: torch.Tensor, ranks: torch.Tensor,
                  miss: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A chunk's first-hit ranks (rank - 1; `miss` where no neighbour in `relevant` is), AP@R and R-precision
    from its (queries x depth) relevance of the ranked neighbours, R the relevant images of each query."""
    first_hit = torch.where(relevant.any(dim=1), relevant.float().argmax(dim=1), miss)
    rel_r = relevant & (ranks[None, :] <= r[:, None])
    precision_at_i = rel_r.cumsum(dim=1).double() / ranks[None, :]
    r_safe = r.clamp(min=1).double()
    return first_hit, (precision_at_i * rel_r).sum(dim=1) / r_safe, rel_r.sum(dim=1).double() / r_safe


def _summary(first_hit: torch.Tensor, average_precision: torch.Tensor, r_precision: torch.Tensor,
             valid: torch.Tensor, ks: list[int]) -> RetrievalResult:
    """Means over the queries with something to retrieve (`valid`); the others are counted as excluded."""
    counted = int(valid.sum())
    within = first_hit[None, :] < torch.tensor(ks, device=first_hit.device)[:, None]  # (k, query)
    hits = (within & valid).sum(dim=1).tolist()
    mean = (lambda total: total / counted) if counted else (lambda total: 0.0)
    return RetrievalResult(
        recall={k: mean(h) for k, h in zip(ks, hits)},
        map_at_r=mean(_block_sums(average_precision, valid)),
        r_precision=mean(_block_sums(r_precision, valid)),
        num_queries=counted,
        num_excluded=len(valid) - counted,
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


def recall_at_k(embeddings: torch.Tensor, labels: torch.Tensor, ks: Iterable[int], chunk_size: int = CHUNK_SIZE,
                **gallery: Optional[torch.Tensor]) -> dict[int, float]:
    """`{k: fraction}`: `retrieval_metrics`' recall, with its keywords (`references`, `reference_labels`); see it
    for MAP@R, R-precision and the excluded queries."""
    return retrieval_metrics(embeddings, labels, ks, chunk_size, **gallery).recall
