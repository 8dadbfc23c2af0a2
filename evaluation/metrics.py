"""Retrieval metrics, pure numpy: recall@K and NDCG@K (binary relevance), and a masked top-K.

Per list: `recall_at_k(ranked, positives, k)` and `ndcg_at_k(ranked, positives, k)`.
Per matrix: `topk(scores, mask, k)` ranks every row at once (ties broken by the
lower column index, so results never depend on sort internals), and
`relevance` / `recall_matrix` / `ndcg_matrix` give the same numbers as the
per-list functions for all rows at once.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

PAD = -1  # a rank position with no candidate (a row had fewer than k)


def _discounts(n: int) -> np.ndarray:
    return 1.0 / np.log2(np.arange(n, dtype=np.float64) + 2.0)


def recall_at_k(ranked: Sequence[int], positives: Iterable[int], k: int) -> float:
    """|top k of ranked ∩ positives| / |positives|; 0 for no positives."""
    pos = set(positives)
    if not pos:
        return 0.0
    return len(pos.intersection(list(ranked)[:k])) / len(pos)


def ndcg_at_k(ranked: Sequence[int], positives: Iterable[int], k: int) -> float:
    """Binary-relevance NDCG: sum over hits of 1/log2(rank + 1), over the best possible for |positives|."""
    pos = set(positives)
    if not pos:
        return 0.0
    top = list(ranked)[:k]
    disc = _discounts(k)
    dcg = sum(disc[r] for r, item in enumerate(top) if item in pos)
    return float(dcg / disc[: min(len(pos), k)].sum())


def topk(scores: np.ndarray, mask: np.ndarray | None, k: int) -> np.ndarray:
    """Column indices [Q, k] of each row's k best scores among mask-true columns, best first.

    Ties go to the lower column index. Rows with fewer than k candidates are
    filled with PAD (-1). Cost: one partition per row plus a sort of k.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D [queries, items], got shape {scores.shape}")
    q, n = scores.shape
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    s = scores.astype(np.float64, copy=True)
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != s.shape:
            raise ValueError(f"mask shape {mask.shape} != scores shape {s.shape}")
        s[~mask] = -np.inf
    kk = min(k, n)
    if kk < n:
        # The kk-th best value per row; everything strictly better is in, ties at it fill up by index.
        kth = (-np.partition(-s, kk - 1, axis=1)[:, kk - 1])[:, None]
        above = s > kth
        need = kk - above.sum(axis=1)
        at = (s == kth) & (np.cumsum(s == kth, axis=1) <= need[:, None])
        keep = above | at
        cols = np.nonzero(keep)[1].reshape(q, kk)
    else:
        cols = np.broadcast_to(np.arange(n), (q, n)).copy()
    vals = np.take_along_axis(s, cols, axis=1)
    # Best first; equal scores by column index (cols are ascending, and the sort is stable).
    order = np.argsort(-vals, axis=1, kind="stable")
    cols = np.take_along_axis(cols, order, axis=1)
    vals = np.take_along_axis(vals, order, axis=1)
    cols[np.isneginf(vals)] = PAD
    if kk < k:
        cols = np.concatenate([cols, np.full((q, k - kk), PAD, dtype=cols.dtype)], axis=1)
    return cols


def relevance(ranked: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """Bool [Q, k]: whether each ranked column is a positive of its row (positives: bool [Q, N])."""
    valid = ranked >= 0
    rows = np.arange(ranked.shape[0])[:, None]
    return valid & positives[rows, np.where(valid, ranked, 0)]


def recall_matrix(rel: np.ndarray, n_positives: np.ndarray, ks: Sequence[int]) -> dict[int, np.ndarray]:
    """Per-row recall@k for each k (rows without positives get 0)."""
    hits = np.cumsum(rel, axis=1)
    denom = np.maximum(n_positives, 1)
    return {k: hits[:, min(k, rel.shape[1]) - 1] / denom for k in ks}


def recall_curve(rel: np.ndarray, n_positives: np.ndarray) -> np.ndarray:
    """Mean recall@k for k = 1 .. rel.shape[1] (index k-1)."""
    return (np.cumsum(rel, axis=1) / np.maximum(n_positives, 1)[:, None]).mean(axis=0)


def ndcg_matrix(rel: np.ndarray, n_positives: np.ndarray, k: int) -> np.ndarray:
    """Per-row binary NDCG@k."""
    k = min(k, rel.shape[1])
    disc = _discounts(k)
    dcg = (rel[:, :k] * disc).sum(axis=1)
    ideal = np.concatenate([[0.0], np.cumsum(disc)])[np.minimum(n_positives, k)]
    return np.where(ideal > 0, dcg / np.where(ideal > 0, ideal, 1.0), 0.0)
