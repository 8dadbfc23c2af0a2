"""Retrieval metrics against hand-computed values, and the matrix forms against the per-list ones."""

import math

import numpy as np
import pytest

from feedret.evaluation.metrics import (
    PAD,
    ndcg_at_k,
    ndcg_matrix,
    recall_at_k,
    recall_curve,
    recall_matrix,
    relevance,
    topk,
)


def test_recall_at_k_by_hand():
    ranked, positives = [5, 3, 9, 1], {3, 1, 7}
    assert recall_at_k(ranked, positives, 1) == 0.0
    assert recall_at_k(ranked, positives, 2) == pytest.approx(1 / 3)
    assert recall_at_k(ranked, positives, 4) == pytest.approx(2 / 3)
    assert recall_at_k(ranked, positives, 100) == pytest.approx(2 / 3)  # k past the list
    assert recall_at_k(ranked, [], 4) == 0.0


def test_ndcg_at_k_by_hand():
    ranked, positives = [5, 3, 9, 1], {3, 1, 7}
    dcg = 1 / math.log2(3) + 1 / math.log2(5)  # hits at ranks 2 and 4
    ideal = 1 + 1 / math.log2(3) + 1 / math.log2(4)  # three positives at ranks 1..3
    assert ndcg_at_k(ranked, positives, 4) == pytest.approx(dcg / ideal)  # 0.4982
    assert ndcg_at_k(ranked, positives, 4) == pytest.approx(0.49819, abs=1e-5)
    # k smaller than |positives|: the ideal has only k hits.
    assert ndcg_at_k([3, 5], positives, 2) == pytest.approx(1 / (1 + 1 / math.log2(3)))
    assert ndcg_at_k([3, 1, 7], positives, 3) == pytest.approx(1.0)
    assert ndcg_at_k([9, 5], positives, 2) == 0.0


def test_topk_masks_breaks_ties_by_index_and_pads():
    scores = np.array([[0.5, 0.9, 0.5, 0.1, 0.5], [1.0, 1.0, 1.0, 1.0, 1.0]])
    mask = np.array([[True, True, True, True, False], [True] * 5])
    assert topk(scores, mask, 3).tolist() == [[1, 0, 2], [0, 1, 2]]
    assert topk(scores, mask, 7).tolist() == [[1, 0, 2, 3, PAD, PAD, PAD], [0, 1, 2, 3, 4, PAD, PAD]]
    assert topk(scores, None, 2).tolist() == [[1, 0], [0, 1]]
    # The tie at the cut-off goes to the lower indices, whatever partition picked.
    row = np.array([[0.0, 2.0, 1.0, 1.0, 1.0, 1.0, 3.0]])
    assert topk(row, None, 4).tolist() == [[6, 1, 2, 3]]


def test_topk_agrees_with_a_full_stable_sort():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 20, size=(50, 300)).astype(np.float32)  # many ties
    mask = rng.random((50, 300)) > 0.3
    expected = np.argsort(-np.where(mask, scores, -np.inf), axis=1, kind="stable")[:, :40]
    assert (topk(scores, mask, 40) == expected).all()


def test_topk_rejects_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        topk(np.array([[np.nan, 1.0]]), None, 1)
    with pytest.raises(ValueError, match="2-D"):
        topk(np.zeros(3), None, 1)
    with pytest.raises(ValueError, match="mask shape"):
        topk(np.zeros((2, 3)), np.ones((2, 2), bool), 1)


def test_matrix_metrics_equal_the_per_list_ones():
    rng = np.random.default_rng(1)
    q, n, k = 30, 200, 50
    positives = rng.random((q, n)) < 0.03
    positives[0] = False  # a row with no positives scores 0
    positives[1, :60] = True  # more positives than k
    ranked = topk(rng.random((q, n)), rng.random((q, n)) > 0.2, k)
    rel = relevance(ranked, positives)
    n_pos = positives.sum(axis=1)
    recalls = recall_matrix(rel, n_pos, [1, 10, 50])
    ndcg = ndcg_matrix(rel, n_pos, 20)
    curve = recall_curve(rel, n_pos)
    for row in range(q):
        lst = [c for c in ranked[row] if c != PAD]
        pos = set(np.flatnonzero(positives[row]))
        for kk in (1, 10, 50):
            assert recalls[kk][row] == pytest.approx(recall_at_k(lst, pos, kk))
        assert ndcg[row] == pytest.approx(ndcg_at_k(lst, pos, 20))
    assert curve[9] == pytest.approx(recalls[10].mean())
    assert curve.shape == (k,)


def test_relevance_ignores_padding():
    positives = np.array([[True, False, False]])
    assert relevance(np.array([[0, PAD, PAD]]), positives).tolist() == [[True, False, False]]
