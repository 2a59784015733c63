"""Query/gallery retrieval (In-Shop Clothes: its queries search its gallery only) against an independent
brute force written in numpy: the full similarity matrix, every row sorted in full by (-similarity rounded by
`neighbours.cells`, index), then Recall@K, MAP@R and R-precision by their definitions. The embeddings are
integer vectors whose cosines are multiples of 1/4, exact in float32 whatever a product's shape or order: many
exact ties, none near a boundary of the tie rule, so the rankings, and with them the results, must agree."""
import numpy as np
import pytest
import torch

from tune_upl.metrics import recall_at_k, retrieval_metrics
from tune_upl.neighbours import cells


def tie_vectors(count: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """Integer vectors of 1 or 4 entries +-s (s in 1..3), no two in the same direction: normalised, each
    entry is +-1 or +-1/2, so every cosine is an exact multiple of 1/4 and many tie exactly."""
    rows, directions = [], set()
    while len(rows) < count:
        row = np.zeros(dim)
        spots = rng.choice(dim, size=rng.choice([1, 4]), replace=False)
        row[spots] = rng.choice([-1, 1], size=len(spots))
        if tuple(row) not in directions:
            directions.add(tuple(row))
            rows.append(row * rng.integers(1, 4))
    return np.array(rows)


def drawn(base: np.ndarray, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`count` rows drawn from `base` (exact duplicates), with the index of the base row of each."""
    which = rng.integers(0, len(base), size=count)
    return base[which], which


def brute_force(queries, query_labels, refs, ref_labels, ks, same_set=False) -> dict:
    """Every query against every reference (itself left out when `same_set`), plainly: a full sort of each
    row by (-cell, index); a query with no relevant reference is excluded."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    g = refs / np.linalg.norm(refs, axis=1, keepdims=True)
    key = cells(torch.from_numpy(q @ g.T)).numpy()
    hits, average_precisions, r_precisions, excluded = {k: 0 for k in ks}, [], [], 0
    for i in range(len(q)):
        candidates = [j for j in range(len(g)) if not (same_set and j == i)]
        order = sorted(candidates, key=lambda j: (-key[i, j], j))
        rel = np.array([ref_labels[j] == query_labels[i] for j in order], dtype=bool)
        r = int(rel.sum())
        if r == 0:
            excluded += 1
            continue
        for k in ks:
            hits[k] += bool(rel[:k].any())
        top = rel[:r]
        precision = np.cumsum(top) / np.arange(1, r + 1)
        average_precisions.append(float((precision * top).sum()) / r)
        r_precisions.append(float(top.sum()) / r)
    counted = len(average_precisions)
    return dict(recall={k: hits[k] / counted for k in ks}, map_at_r=float(np.mean(average_precisions)),
                r_precision=float(np.mean(r_precisions)), num_queries=counted, num_excluded=excluded)


def assert_matches(result, expected) -> None:
    """Recall and counts exactly (the same integers divided alike); the means within 1e-12 (summed in
    another order)."""
    assert result.recall == expected["recall"]
    assert (result.num_queries, result.num_excluded) == (expected["num_queries"], expected["num_excluded"])
    assert result.map_at_r == pytest.approx(expected["map_at_r"], abs=1e-12)
    assert result.r_precision == pytest.approx(expected["r_precision"], abs=1e-12)


def t(array: np.ndarray) -> torch.Tensor:
    """Embeddings as the module gets them: float32 (exact here: small integers)."""
    return torch.from_numpy(array).float()


def gallery_case(num_bases: int, num_queries: int, num_refs: int, num_classes: int, seed: int):
    """Queries and references drawn from one small set of integer vectors, labels arbitrary ints (negative
    and large), mostly the class of the base vector, a third drawn at random: exact ties within and across
    classes."""
    rng = np.random.default_rng(seed)
    base = tie_vectors(num_bases, 8, rng)
    names = rng.choice(np.arange(-500, 5000), size=num_classes, replace=False)

    def side(count):
        emb, which = drawn(base, count, rng)
        classes = which % num_classes
        noisy = rng.random(count) < 1 / 3
        classes[noisy] = rng.integers(0, num_classes, size=int(noisy.sum()))
        return emb, names[classes]

    return (*side(num_queries), *side(num_refs))


@pytest.mark.parametrize("num_bases, num_queries, num_refs, num_classes, ks", [
    (24, 70, 150, 10, (1, 2, 4, 8, 1000)),  # a k beyond the gallery; narrow rows (`top_depth`'s topk path)
    (400, 50, 1200, 300, (1, 2, 4, 8)),  # wide rows: the block-bound path, heavy and light rows
])
def test_gallery_matches_brute_force_at_any_chunk_size(num_bases, num_queries, num_refs, num_classes, ks):
    queries, query_labels, refs, ref_labels = gallery_case(num_bases, num_queries, num_refs, num_classes, seed=5)
    expected = brute_force(queries, query_labels, refs, ref_labels, ks)
    results = [retrieval_metrics(t(queries), torch.from_numpy(query_labels), ks, chunk_size,
                                 references=t(refs), reference_labels=torch.from_numpy(ref_labels))
               for chunk_size in (1, 7, 10_000)]
    assert_matches(results[0], expected)
    assert results[1] == results[0] and results[2] == results[0]  # bit for bit
    assert 0 < results[0].map_at_r <= results[0].r_precision < 1 and results[0].recall[1] < 1
    if ks[-1] > num_refs:  # "any relevant reference at all": every counted query has one
        assert results[0].recall[ks[-1]] == 1.0
    else:  # the block-bound path of `top_depth`: rows at least 64 x depth wide
        r_max = max(int((ref_labels == label).sum()) for label in query_labels)
        assert num_refs // 64 >= max(ks[-1], r_max)


def test_literal_gallery():
    """Four references on the unit circle, worked out by hand; the last query's class has no reference."""
    refs = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]])
    ref_labels = torch.tensor([5, 6, 5, 7])
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6], [1.0, 0.0]])
    query_labels = torch.tensor([7, 5, 6, 8])
    # query 0 (R=1): [0, 1, 2, 3 (hit)]: its only reference is the farthest: first hit at rank 4, AP@R 0, RP 0
    # query 1 (R=2): [3, 2 (hit), 1, 0 (hit)]: top-2 [0, 1]: first hit at rank 2, AP@R (1/2)/2, RP 1/2
    # query 2 (R=1): [1 (hit), 2, 0, 3]: AP@R 1, RP 1; query 3: no reference of class 8, excluded
    result = retrieval_metrics(queries, query_labels, (1, 2, 3, 4, 10),
                               references=refs, reference_labels=ref_labels)
    assert result.recall == {1: 1 / 3, 2: 2 / 3, 3: 2 / 3, 4: 1.0, 10: 1.0}
    assert result.map_at_r == pytest.approx((0 + 0.25 + 1) / 3, abs=1e-15)
    assert result.r_precision == pytest.approx((0 + 0.5 + 1) / 3, abs=1e-15)
    assert (result.num_queries, result.num_excluded) == (3, 1)


def test_queries_whose_class_is_not_in_the_gallery_are_excluded_and_counted():
    queries, query_labels, refs, ref_labels = gallery_case(24, 70, 150, 10, seed=6)
    absent = np.arange(len(queries)) % 5 == 0
    no_reference = 10_000 + np.arange(len(queries)) % 3  # classes no reference has
    query_labels = np.where(absent, no_reference, query_labels)
    ks = (1, 2, 4)
    result = retrieval_metrics(t(queries), torch.from_numpy(query_labels), ks, 9,
                               references=t(refs), reference_labels=torch.from_numpy(ref_labels))
    assert result.num_excluded == int(absent.sum()) == 14
    assert result.num_queries == len(queries) - 14
    assert_matches(result, brute_force(queries, query_labels, refs, ref_labels, ks))
    present = retrieval_metrics(t(queries[~absent]), torch.from_numpy(query_labels[~absent]), ks, 9,
                                references=t(refs), reference_labels=torch.from_numpy(ref_labels))
    assert present.recall == result.recall and present.num_excluded == 0  # the means are over the rest
    assert present.map_at_r == pytest.approx(result.map_at_r, abs=1e-12)
    assert present.r_precision == pytest.approx(result.r_precision, abs=1e-12)
    nothing = retrieval_metrics(t(queries[:5]), torch.full((5,), -1), ks,
                                references=t(refs), reference_labels=torch.from_numpy(ref_labels))
    assert (nothing.num_queries, nothing.num_excluded, nothing.map_at_r, nothing.recall[1]) == (0, 5, 0.0, 0.0)


def test_same_set_excludes_the_query_and_a_gallery_of_the_queries_includes_it():
    """Same-set mode equals the brute force without the query itself; the same images passed as references
    equal it with the query kept: every query finds itself first (duplicates share their class), R grows by
    one and the class of one image is no longer excluded."""
    rng = np.random.default_rng(7)
    base = tie_vectors(31, 8, rng)
    emb, which = drawn(base[:-1], 120, rng)
    labels = which // 3 * 7 - 40  # duplicates share their class; classes hold several base vectors
    emb, labels = np.vstack([emb, base[-1:]]), np.append(labels, 999)  # a class of one image
    ks = (1, 2, 4, 8)
    same_set = [retrieval_metrics(t(emb), torch.from_numpy(labels), ks, chunk_size) for chunk_size in (1, 7, 500)]
    assert same_set[1] == same_set[0] and same_set[2] == same_set[0]
    assert_matches(same_set[0], brute_force(emb, labels, emb, labels, ks, same_set=True))
    assert same_set[0].num_excluded == 1 and same_set[0].recall[1] < 1
    as_gallery = retrieval_metrics(t(emb), torch.from_numpy(labels), ks, 7,
                                   references=t(emb), reference_labels=torch.from_numpy(labels))
    assert_matches(as_gallery, brute_force(emb, labels, emb, labels, ks))
    assert as_gallery.num_excluded == 0 and as_gallery.num_queries == len(emb)
    assert as_gallery.recall == {k: 1.0 for k in ks}
    assert as_gallery.map_at_r > same_set[0].map_at_r


def test_agrees_with_pytorch_metric_learning():
    """Real-valued embeddings (no ties, so any exact k-NN ranks alike); a few query classes absent from the
    gallery, which both leave out."""
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import CustomKNN

    gen = torch.Generator().manual_seed(11)
    centres = torch.randn(30, 16, generator=gen)
    query_labels = torch.randint(0, 33, (90,), generator=gen)  # classes 30-32: no reference
    ref_labels = torch.randint(0, 30, (240,), generator=gen)
    queries = centres[query_labels % 30] + 0.8 * torch.randn(90, 16, generator=gen)
    refs = centres[ref_labels] + 0.8 * torch.randn(240, 16, generator=gen)
    ours = retrieval_metrics(queries, query_labels, (1,), 16, references=refs, reference_labels=ref_labels)
    calculator = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r", "r_precision"),
                                    knn_func=CustomKNN(CosineSimilarity()))
    theirs = calculator.get_accuracy(query=queries, query_labels=query_labels, reference=refs,
                                     reference_labels=ref_labels, ref_includes_query=False)
    assert ours.num_excluded == int((query_labels >= 30).sum()) > 0
    assert ours.recall[1] == pytest.approx(float(theirs["precision_at_1"]), abs=1e-6)
    assert ours.map_at_r == pytest.approx(float(theirs["mean_average_precision_at_r"]), abs=1e-6)
    assert ours.r_precision == pytest.approx(float(theirs["r_precision"]), abs=1e-6)


def test_recall_at_k_passes_the_references_through():
    queries, query_labels, refs, ref_labels = gallery_case(24, 40, 80, 6, seed=8)
    args = (t(queries), torch.from_numpy(query_labels), (1, 4))
    gallery = dict(references=t(refs), reference_labels=torch.from_numpy(ref_labels))
    assert recall_at_k(*args, **gallery) == retrieval_metrics(*args, **gallery).recall
    assert recall_at_k(*args, **gallery) != recall_at_k(*args)


@pytest.mark.parametrize("keywords, message", [
    (dict(references=torch.ones(4, 3)), "references was given without reference_labels"),
    (dict(reference_labels=torch.zeros(4)), "reference_labels was given without references"),
    (dict(references=torch.ones(4, 3), reference_labels=torch.zeros(5)),
     "reference_labels has 5 entries for 4 references"),
    (dict(references=torch.ones(4, 2), reference_labels=torch.zeros(4)),
     "references have width 2 but embeddings have width 3"),
])
def test_bad_references_name_the_argument(keywords, message):
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(torch.ones(6, 3), torch.zeros(6), (1,), **keywords)


def test_labels_of_another_length_than_the_embeddings():
    with pytest.raises(ValueError, match="labels has 5 entries for 6 embeddings"):
        retrieval_metrics(torch.ones(6, 3), torch.zeros(5), (1,))
