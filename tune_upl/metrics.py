"""Retrieval metrics on embeddings: exact cosine k-NN, computed in row chunks.

Memory is N x chunk_size, never N x N, so 20,000 test images at d = 512 evaluate on a small GPU.
The query itself is never its own neighbour; ties are broken by ascending reference index (a top-k whose
ties are resolved exactly, see `top_depth`), so results do not depend on the device or the chunk size.
A query whose class has no other image has nothing to retrieve: it is excluded from every mean and counted.

Recall@K is the fraction of queries with a same-class image among their k nearest; MAP@R and
R-precision follow Musgrave et al., "A Metric Learning Reality Check" (ECCV 2020): with R the number
of other images of the query's class, R-precision = (relevant among the top R) / R and
MAP@R = (1/R) sum_{i<=R} P(i) rel(i), P(i) the precision at rank i.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F


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


def top_depth(sims: torch.Tensor, depth: int) -> torch.Tensor:
    """Indices of the `depth` largest entries of each row, ordered by (-value, index): a stable sort's first
    `depth` columns, exactly, without sorting whole rows.

    `topk` picks `depth + 1` values; the first `depth` are reordered by ascending index, then stably by
    value, so ties inside the top keep index order. A row whose `depth`-th and `depth + 1`-th values are
    equal (a tie across the boundary) is sorted in full, since topk may have picked the wrong ones of the
    tie. Extra memory is a few `depth`-wide columns, instead of a full sort's values and int64 indices
    (3x the similarities)."""
    if depth >= sims.shape[1]:
        return torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :depth]
    values, indices = torch.topk(sims, depth + 1, dim=1)  # sorted; one more, to see a tie at the boundary
    tied = values[:, depth] == values[:, depth - 1]
    indices, by_index = indices[:, :depth].sort(dim=1)
    values = values[:, :depth].gather(1, by_index)
    indices = indices.gather(1, values.sort(dim=1, descending=True, stable=True).indices)
    if bool(tied.any()):
        rows = tied.nonzero().squeeze(1)
        indices[rows] = torch.sort(sims[rows], dim=1, descending=True, stable=True).indices[:, :depth]
    return indices


def retrieval_metrics(
    embeddings: torch.Tensor, labels: torch.Tensor, ks: Iterable[int], chunk_size: int = 1024
) -> RetrievalResult:
    """Recall@K, MAP@R and R-precision by exact cosine k-NN over all other images."""
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    emb = F.normalize(embeddings.float(), dim=-1)
    n = emb.shape[0]
    _, dense = torch.unique(labels.to(emb.device), return_inverse=True)
    others = torch.bincount(dense)[dense] - 1  # R: other images of each query's class
    depth = max(1, min(max(ks[-1], int(others.max()) if n else 1), n - 1))
    hits = {k: 0 for k in ks}
    map_sum = rp_sum = 0.0
    counted = 0
    ranks = torch.arange(1, depth + 1, device=emb.device)
    for start in range(0, n, chunk_size):
        rows = torch.arange(start, min(start + chunk_size, n), device=emb.device)
        sims = emb[rows] @ emb.t()
        sims[torch.arange(len(rows), device=emb.device), rows] = float("-inf")  # never match yourself
        order = top_depth(sims, depth)  # each row's first `depth` neighbours by (-similarity, index)
        del sims
        relevant = dense[order] == dense[rows, None]
        r = others[rows]
        valid = r > 0
        counted += int(valid.sum())
        first_hit = torch.where(relevant.any(dim=1), relevant.float().argmax(dim=1), torch.full_like(rows, n))
        for k in ks:
            hits[k] += int(((first_hit < k) & valid).sum())
        within_r = ranks[None, :] <= r[:, None]
        rel_r = relevant & within_r
        precision_at_i = rel_r.cumsum(dim=1).double() / ranks[None, :]
        r_safe = r.clamp(min=1).double()
        map_sum += float(((precision_at_i * rel_r).sum(dim=1) / r_safe)[valid].sum())
        rp_sum += float((rel_r.sum(dim=1).double() / r_safe)[valid].sum())
    mean = (lambda total: total / counted) if counted else (lambda total: 0.0)
    return RetrievalResult(
        recall={k: mean(hits[k]) for k in ks},
        map_at_r=mean(map_sum),
        r_precision=mean(rp_sum),
        num_queries=counted,
        num_excluded=n - counted,
    )


def recall_at_k(
    embeddings: torch.Tensor, labels: torch.Tensor, ks: Iterable[int], chunk_size: int = 1024
) -> dict[int, float]:
    """`{k: fraction}`; see `retrieval_metrics` for MAP@R, R-precision and the excluded queries."""
    return retrieval_metrics(embeddings, labels, ks, chunk_size).recall
