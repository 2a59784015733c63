"""Recall@K, MAP@R and R-precision against a brute-force reference, with duplicated points (ties) and
singleton classes; the same answer at any chunk size and however the matrix product rounds (the tie rule:
similarities compared at 2^-14, equal ones by index)."""
import math

import pytest
import torch

from tune_upl import metrics, neighbours
from tune_upl.metrics import recall_at_k, retrieval_metrics, top_depth


def brute_force(emb, labels, ks):
    """Full N x N cosine matrix in float64, neighbours ordered by (-similarity rounded to 2^-14, index), self
    excluded. Returns Recall@K, MAP@R and R-precision written out as in Musgrave et al. 2020."""
    emb = torch.nn.functional.normalize(emb.double(), dim=1)
    sims = (emb @ emb.t()).tolist()
    labels = labels.tolist()
    n, hits, counted, map_sum, rp_sum = len(labels), {k: 0 for k in ks}, 0, 0.0, 0.0
    for i in range(n):
        r = labels.count(labels[i]) - 1
        if r == 0:
            continue
        counted += 1
        order = sorted((j for j in range(n) if j != i), key=lambda j: (-math.floor(sims[i][j] * 2**14 + 0.5), j))
        rel = [labels[j] == labels[i] for j in order]
        for k in ks:
            hits[k] += any(rel[:k])
        precisions = [sum(rel[: idx + 1]) / (idx + 1) for idx in range(r)]
        map_sum += sum(p for p, hit in zip(precisions, rel[:r]) if hit) / r
        rp_sum += sum(rel[:r]) / r
    return {k: hits[k] / counted for k in ks}, map_sum / counted, rp_sum / counted


def test_matches_brute_force_with_duplicates_and_small_chunks():
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(40, 8, generator=gen)
    emb = torch.cat([base, base[:15], base[5:10]])  # exact duplicates (some three times): exact ties
    labels = torch.randint(0, 9, (len(emb),), generator=gen)
    labels[-1] = 99  # a singleton class: excluded from the mean
    ks = (1, 2, 4, 8)
    result = retrieval_metrics(emb, labels, ks, chunk_size=7)
    expected, map_at_r, r_precision = brute_force(emb, labels, ks)
    assert result.num_excluded == 1 and result.num_queries == len(emb) - 1
    for k in ks:
        assert result.recall[k] == pytest.approx(expected[k], abs=1e-12)
    assert result.map_at_r == pytest.approx(map_at_r, abs=1e-9)
    assert result.r_precision == pytest.approx(r_precision, abs=1e-9)
    assert 0 < result.map_at_r <= result.r_precision <= 1
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


def test_map_at_r_literal():
    # Class a = {0, 1, 2}, class b = {3}; b is a singleton and excluded. On a line, cosine order from 0:
    # query 0 (R=2): neighbours [1 (a), 3 (b), 2 (a)] -> top-2 relevance [1, 0]: AP@R = (1/1)/2 = 0.5, RP = 0.5
    emb = torch.tensor([[1.0, 0.0], [0.98, 0.2], [0.0, 1.0], [0.9, 0.44]])
    labels = torch.tensor([0, 0, 0, 1])
    result = retrieval_metrics(emb, labels, (1,))
    # query 1: sims to 0: .98, to 3: .97, to 2: .2 -> [0 (a), 3 (b), 2 (a)]: AP@R 0.5, RP 0.5
    # query 2: sims to 1: .2, to 3: .44, to 0: 0 -> [3 (b), 1 (a), 0 (a)]: top-2 [0, 1]: AP@R (1/2)/2 = .25, RP .5
    assert result.num_queries == 3 and result.num_excluded == 1
    assert result.map_at_r == pytest.approx((0.5 + 0.5 + 0.25) / 3)
    assert result.r_precision == pytest.approx(0.5)


def stable_top(sims, depth):
    return torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :depth]


@pytest.mark.parametrize("depth", [1, 5])
def test_block_bound_path_equals_stable_sort(depth):
    """Wide rows (the block-bound path of `top_depth`): ties inside the top and across the cut, rows tied
    everywhere (sorted in full), -inf, columns past the last block, and rows without ties."""
    gen = torch.Generator().manual_seed(depth)
    n = 64 * depth + 64 * 3 + 5  # 5 columns in no block
    sims = torch.randint(0, 6, (40, n), generator=gen).float()  # exact ties at every depth
    sims[:4] = 0.5  # tied everywhere: more candidate blocks than the bound allows
    sims[4, -3:] = 9.0  # the largest values in the columns past the last block
    sims[5, :] = float("-inf")
    sims[5, 7] = 1.0
    sims[6] = torch.rand(n, generator=gen)  # no ties
    sims[7, ::2] = 5.0  # half the row tied at its maximum
    assert sims.shape[1] // 64 >= depth  # the block path, not the small-matrix fallback
    assert torch.equal(top_depth(sims, depth), stable_top(sims, depth))


def tie_heavy(n=700, classes=120, seed=0):
    """Duplicated points, points on a coarse integer grid (many equal similarities), and singleton classes."""
    gen = torch.Generator().manual_seed(seed)
    grid = torch.randint(-1, 2, (n - 100, 6), generator=gen).float()
    grid[grid.abs().sum(1) == 0] = 1.0
    emb = torch.cat([grid, grid[:100]])  # exact duplicates of the first 100
    labels = torch.arange(n) % classes
    labels[-3:] = torch.tensor([1000, 1001, 1002])  # classes of one image: excluded
    return emb, labels


def test_equals_full_sort_bit_for_bit_at_any_chunk_size():
    """The same floats as sorting every row's rounded similarities in full (stable), whatever the chunk size
    (a one-row product rounds differently from a many-row one, on some BLAS libraries in many entries of
    `tie_heavy`): MAP@R's sums are taken over fixed blocks of queries, not over chunks."""
    from benchmarks.eval import naive_metrics

    emb, labels = tie_heavy()
    ks = (1, 2, 4, 8)
    expected = naive_metrics(emb, labels, ks)
    assert expected.num_excluded == 3 and 0 < expected.map_at_r < expected.r_precision < 1
    for chunk_size in (1, 7, 128, 1000):
        assert retrieval_metrics(emb, labels, ks, chunk_size) == expected, chunk_size
    spread = torch.randn(900, 32, generator=torch.Generator().manual_seed(1))  # real-valued: no ties
    labels = torch.arange(900) % 60
    expected = naive_metrics(spread, labels, ks)
    for chunk_size in (7, 1024):
        assert retrieval_metrics(spread, labels, ks, chunk_size) == expected, chunk_size


def perturbed(sims: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Every similarity moved 1 to 4 units in the last place up or down: what another kernel's rounding does."""
    steps = torch.randint(1, 5, sims.shape, generator=generator) * (2 * torch.randint(0, 2, sims.shape, generator=generator) - 1)
    out = sims.clone()
    for step in range(4):
        out = torch.where(steps > step, torch.nextafter(out, torch.tensor(math.inf)), out)
        out = torch.where(steps < -step, torch.nextafter(out, torch.tensor(-math.inf)), out)
    return out


def with_another_blas(monkeypatch, seed: int) -> None:
    """Every chunk's product rounded as another BLAS library might: a few units in the last place off."""
    generator = torch.Generator().manual_seed(seed)
    product = metrics.chunk_similarities

    def rounded_otherwise(rows, emb, out, pool=None):
        return out.copy_(perturbed(product(rows, emb, out, pool), generator))

    monkeypatch.setattr(metrics, "chunk_similarities", rounded_otherwise)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_product_that_rounds_differently_changes_no_metric(monkeypatch, seed):
    """Stands in for another BLAS, CPU or GPU: the tie-heavy set (exact ties everywhere) and real-valued
    embeddings give the same results when every similarity is a few units in the last place off."""
    emb, labels = tie_heavy()
    spread = torch.randn(900, 32, generator=torch.Generator().manual_seed(1))
    spread_labels = torch.arange(900) % 60
    ks = (1, 2, 4, 8)
    expected = [retrieval_metrics(emb, labels, ks, 128), retrieval_metrics(spread, spread_labels, ks, 128)]
    with_another_blas(monkeypatch, seed)
    assert [retrieval_metrics(emb, labels, ks, 128), retrieval_metrics(spread, spread_labels, ks, 128)] == expected


def test_without_the_rounding_the_same_perturbation_changes_the_metrics(monkeypatch):
    """The test above can fail: compared at a resolution finer than float32 (a broken tie rule: exact
    floats), the tie-heavy set's exact ties are broken by the roundings, and its metrics move."""
    monkeypatch.setattr(neighbours, "RESOLUTION_BITS", 40)
    emb, labels = tie_heavy()
    ks = (1, 2, 4, 8)
    exact = retrieval_metrics(emb, labels, ks, 128)
    with_another_blas(monkeypatch, 0)
    assert retrieval_metrics(emb, labels, ks, 128) != exact
