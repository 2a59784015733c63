"""Retrieval metrics on embeddings: exact cosine k-NN, computed in row chunks.

Memory is N x chunk_size, never N x N, so 20,000 test images at d = 512 evaluate on a small GPU.
The query itself is never its own neighbour; ties are broken by ascending reference index (stable sort),
so results do not depend on the device or the chunk size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class RecallResult:
    """Recall@K per k, and how many queries counted: a query whose class has no other image is excluded."""

    recall: dict[int, float]
    num_queries: int
    num_excluded: int


def knn_recall(
    embeddings: torch.Tensor, labels: torch.Tensor, ks: Iterable[int], chunk_size: int = 1024
) -> RecallResult:
    """Recall@K: the fraction of queries with a same-class image among their k nearest other images."""
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    emb = F.normalize(embeddings.float(), dim=-1)
    labels = labels.to(emb.device)
    n = emb.shape[0]
    max_k = min(ks[-1], n - 1)
    hits = {k: 0 for k in ks}
    counted = 0
    class_sizes = torch.bincount(labels - labels.min()) if n else labels
    for start in range(0, n, chunk_size):
        rows = torch.arange(start, min(start + chunk_size, n), device=emb.device)
        sims = emb[rows] @ emb.t()
        sims[torch.arange(len(rows), device=emb.device), rows] = float("-inf")  # never match yourself
        order = torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :max_k]
        match = labels[order] == labels[rows, None]
        has_positive = class_sizes[labels[rows] - labels.min()] > 1
        counted += int(has_positive.sum())
        first_hit = torch.where(match.any(dim=1), match.float().argmax(dim=1), torch.full_like(rows, n))
        for k in ks:
            hits[k] += int(((first_hit < k) & has_positive).sum())
    recall = {k: (hits[k] / counted if counted else 0.0) for k in ks}
    return RecallResult(recall=recall, num_queries=counted, num_excluded=n - counted)


def recall_at_k(
    embeddings: torch.Tensor, labels: torch.Tensor, ks: Iterable[int], chunk_size: int = 1024
) -> dict[int, float]:
    """`{k: fraction}`; see `knn_recall` for the counts of excluded queries."""
    return knn_recall(embeddings, labels, ks, chunk_size).recall
