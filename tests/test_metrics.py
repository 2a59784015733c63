"""Recall@K against a brute-force reference, with duplicated points (ties) and singleton classes."""
import pytest
import torch

from tune_upl.metrics import knn_recall, recall_at_k


def brute_force_recall(emb, labels, ks):
    """Full N x N cosine matrix, neighbours ordered by (-similarity, index), self excluded."""
    emb = torch.nn.functional.normalize(emb.double(), dim=1)
    sims = (emb @ emb.t()).tolist()
    labels = labels.tolist()
    n, hits, counted = len(labels), {k: 0 for k in ks}, 0
    for i in range(n):
        if labels.count(labels[i]) < 2:
            continue
        counted += 1
        order = sorted((j for j in range(n) if j != i), key=lambda j: (-round(sims[i][j], 9), j))
        for k in ks:
            hits[k] += any(labels[j] == labels[i] for j in order[:k])
    return {k: hits[k] / counted for k in ks}


def test_matches_brute_force_with_duplicates_and_small_chunks():
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(40, 8, generator=gen)
    emb = torch.cat([base, base[:15], base[5:10]])  # exact duplicates (some three times): exact ties
    labels = torch.randint(0, 9, (len(emb),), generator=gen)
    labels[-1] = 99  # a singleton class: excluded from the mean
    ks = (1, 2, 4, 8)
    result = knn_recall(emb, labels, ks, chunk_size=7)
    expected = brute_force_recall(emb, labels, ks)
    assert result.num_excluded == 1 and result.num_queries == len(emb) - 1
    for k in ks:
        assert result.recall[k] == pytest.approx(expected[k], abs=1e-12)
    assert recall_at_k(emb, labels, ks, chunk_size=1000) == result.recall


def test_ties_broken_by_ascending_index():
    # Query 0 has two identical neighbours: index 1 (other class) and index 2 (same class).
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 0, 1])
    # query 0 -> [1, 2, 3]: first hit at rank 2; query 1 -> [0, 2, 3]: first hit at rank 3;
    # query 2 -> [0, 1, 3]: hit at rank 1; query 3 -> all at cos 0, index order [0, 1, 2]: hit at rank 2.
    assert recall_at_k(emb, labels, (1, 2, 3)) == {1: 0.25, 2: 0.75, 3: 1.0}


def test_perfect_and_chance_embeddings():
    labels = torch.arange(10).repeat_interleave(5)
    perfect = torch.nn.functional.one_hot(labels, 10).float() + 0.01 * torch.randn(50, 10)
    assert recall_at_k(perfect, labels, (1,))[1] == 1.0
    constant = torch.ones(50, 4)  # every neighbour tied: index order, so only class 0 finds itself first
    assert recall_at_k(constant, labels, (1, 8))[1] == pytest.approx(5 / 50)
    assert recall_at_k(constant, labels, (1, 8))[8] == pytest.approx(10 / 50)  # classes 0 and 1 within 8
