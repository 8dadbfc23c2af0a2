"""Collaborative-filtering baselines for `feedret eval`: what a practitioner would try first.

Every baseline is fitted on one period's interactions only (`Training`, built
from the time split's training period) and scores a query from the member's
history at the moment (`history_likes`: their likes strictly before it). No
baseline has a vector per member: a member who first appears after the split,
or who liked more since, is scored from what they did, never from an ID.

- cold-start popularity: training likes counted only while the member had at
  most `max_prior` earlier engagements (what newcomers like);
- item-kNN: cosine between items' training likers, each item voting for its
  `neighbours` most similar items;
- EASE (Steck 2019): the closed-form item-item regression with L2 penalty `lam`;
- ALS (Hu, Koren, Volinsky 2008; the `implicit` package): item factors fitted on
  the training likes, the member's vector solved from their history (fold-in).

Likes are engagements with weight >= like_threshold, taken as binary (the
positives are likes too). Items nobody liked in the training period, every
fresh post among them, carry no signal: their score is `NO_SIGNAL` (-inf)
and `tie_break` puts them after every item a baseline has a score for, in
popularity's order (item id, since their popularity is 0). That is what the
fresh-post segment of the report measures.

Pure: numpy, scipy.sparse and implicit; no I/O. `BASELINES` lists each with the
grid that `feedret eval` tunes on its validation split.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np
import scipy.sparse as sp

from feedret.dataprep.format import Interaction

NO_SIGNAL = -np.inf


class Scorer(Protocol):
    def scores(self, history: sp.csr_matrix) -> np.ndarray:
        """Scores [R, N] for R members' histories (likes, [R, N]); NO_SIGNAL where there is none."""


# ------------------------------------------------------------------ inputs


@dataclass(frozen=True)
class Training:
    """One period's interactions as the baselines see them; columns follow `item_ids` (ascending)."""

    interactions: tuple[Interaction, ...]
    item_ids: np.ndarray  # [N] int64
    likes: sp.csr_matrix  # [M, N] float32, 1 where the member liked the item in the period
    like_threshold: float

    @property
    def known(self) -> np.ndarray:
        """[N] bool: items liked at least once in the period (the only ones with a CF signal)."""
        return np.asarray(self.likes.sum(axis=0)).ravel() > 0

    @property
    def popularity(self) -> np.ndarray:
        return np.asarray(self.likes.sum(axis=0), dtype=np.float64).ravel()


def _binary(rows: Sequence[int], cols: Sequence[int], shape: tuple[int, int]) -> sp.csr_matrix:
    m = sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=shape)
    m.sum_duplicates()
    m.data[:] = 1.0  # a like twice is still a like
    return m


def training(interactions: Sequence[Interaction], item_ids: np.ndarray, like_threshold: float) -> Training:
    """The period's likes as a member x item matrix (members in sorted order; rows are not used by name)."""
    column = {int(i): c for c, i in enumerate(item_ids)}
    members = {m: r for r, m in enumerate(sorted({i.member_id for i in interactions}))}
    liked = [i for i in interactions if i.weight >= like_threshold]
    likes = _binary([members[i.member_id] for i in liked], [column[i.item_id] for i in liked],
                    (len(members), len(item_ids)))
    return Training(tuple(interactions), np.asarray(item_ids, dtype=np.int64), likes, like_threshold)


def history_likes(
    histories: Sequence[Sequence[Interaction]], item_ids: np.ndarray, like_threshold: float
) -> sp.csr_matrix:
    """[R, N] binary: the items each history liked (a query's history: strictly before its moment)."""
    column = {int(i): c for c, i in enumerate(item_ids)}
    rows, cols = [], []
    for r, history in enumerate(histories):
        for h in history:
            if h.weight >= like_threshold:
                rows.append(r)
                cols.append(column[h.item_id])
    return _binary(rows, cols, (len(histories), len(item_ids)))


def tie_break(primary: np.ndarray, secondary: np.ndarray) -> np.ndarray:
    """Ordinal scores [R, N] (higher is better, all distinct and finite): by `primary`, ties by `secondary` [N].

    With popularity_scores as `secondary`, every baseline falls back on
    popularity where it cannot tell items apart (an empty history, NO_SIGNAL).
    """
    primary = np.asarray(primary, dtype=np.float64)
    order = np.lexsort((np.broadcast_to(secondary, primary.shape), primary), axis=1)  # worst first
    out = np.empty(primary.shape, dtype=np.float64)
    np.put_along_axis(out, order, np.broadcast_to(np.arange(primary.shape[1], dtype=np.float64), primary.shape), axis=1)
    return out


def _on_known(known: np.ndarray, sub_scores: np.ndarray) -> np.ndarray:
    out = np.full((sub_scores.shape[0], len(known)), NO_SIGNAL, dtype=np.float64)
    out[:, known] = sub_scores
    return out


# ------------------------------------------------------------------ the baselines


@dataclass(frozen=True)
class ColdStartPopularity:
    """The same list for everyone: likes given while the liker was new (at most max_prior earlier engagements)."""

    counts: np.ndarray  # [N]

    def scores(self, history: sp.csr_matrix) -> np.ndarray:
        # No NO_SIGNAL: an item no newcomer liked scores 0 and falls back on popularity in tie_break.
        return np.broadcast_to(self.counts, (history.shape[0], len(self.counts)))


def fit_cold_start_popularity(train: Training, max_prior: int) -> ColdStartPopularity:
    """Count a like when the member had at most `max_prior` engagements before its timestamp (as Moment.prior)."""
    column = {int(i): c for c, i in enumerate(train.item_ids)}
    by_member: dict[str, list[Interaction]] = defaultdict(list)
    for i in train.interactions:
        by_member[i.member_id].append(i)
    counts = np.zeros(len(train.item_ids), dtype=np.float64)
    for log in by_member.values():
        log.sort(key=lambda i: (i.timestamp, i.item_id))
        before = 0  # engagements strictly before the current timestamp
        for n, i in enumerate(log):
            if n and i.timestamp != log[n - 1].timestamp:
                before = n
            if before <= max_prior and i.weight >= train.like_threshold:
                counts[column[i.item_id]] += 1.0
    return ColdStartPopularity(counts)


@dataclass(frozen=True)
class ItemKNN:
    """score(j) = sum over liked items i of sim(i, j), where j is among i's nearest neighbours."""

    known: np.ndarray  # [N] bool
    similarity: sp.csr_matrix  # [K, K] over known items: row i holds i's neighbours

    def scores(self, history: sp.csr_matrix) -> np.ndarray:
        return _on_known(self.known, (history[:, self.known] @ self.similarity).toarray())


def fit_item_knn(train: Training, neighbours: int) -> ItemKNN:
    """Cosine similarity of items' liker sets (over known items), top `neighbours` per item, no self-similarity."""
    known = train.known
    x = train.likes[:, known].toarray()  # [M, K]: a few hundred members, so dense is cheaper than sparse
    co = x.T @ x
    norm = np.sqrt(np.diag(co))
    sim = co / np.outer(norm, norm)
    np.fill_diagonal(sim, 0.0)
    k = min(neighbours, sim.shape[0] - 1)
    if k < 1:
        return ItemKNN(known, sp.csr_matrix(sim.shape, dtype=np.float32))
    cols = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    vals = np.take_along_axis(sim, cols, axis=1)
    rows = np.repeat(np.arange(sim.shape[0]), k)
    keep = vals.ravel() > 0
    similarity = sp.csr_matrix(
        (vals.ravel()[keep].astype(np.float32), (rows[keep], cols.ravel()[keep])), shape=sim.shape
    )
    return ItemKNN(known, similarity)


@dataclass(frozen=True)
class EASE:
    """score = history @ B, B the item-item weights with zero diagonal."""

    known: np.ndarray  # [N] bool
    weights: np.ndarray  # [K, K] float64

    def scores(self, history: sp.csr_matrix) -> np.ndarray:
        return _on_known(self.known, np.asarray(history[:, self.known] @ self.weights))


def fit_ease(train: Training, lam: float) -> EASE:
    """B = I - P diag(1/diag(P)), P = (XᵀX + λI)⁻¹, over known items (float64: one K x K inverse)."""
    known = train.known
    x = train.likes[:, known].toarray().astype(np.float64)
    gram = x.T @ x
    gram[np.diag_indices_from(gram)] += lam
    p = np.linalg.inv(gram)
    weights = -p / np.diag(p)[None, :]
    np.fill_diagonal(weights, 0.0)
    return EASE(known, weights)


@dataclass(frozen=True)
class ALS:
    """Item factors from implicit's ALS; a member's factors solved from their history (fold-in)."""

    known: np.ndarray  # [N] bool
    model: Any  # implicit.cpu.als.AlternatingLeastSquares, fitted

    def scores(self, history: sp.csr_matrix) -> np.ndarray:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(1, "blas"):
            # implicit's own fold-in: the exact least-squares user step of its fit, against fixed item factors.
            users = self.model.recalculate_user(np.arange(history.shape[0]), history.astype(np.float32).tocsr())
        s = np.asarray(users, dtype=np.float64) @ np.asarray(self.model.item_factors, dtype=np.float64).T
        s[:, ~self.known] = NO_SIGNAL  # an item nobody liked keeps its random start, not a signal
        return s


def als_threads() -> int:
    """implicit's threads: the CPUs this process may use (its default, 0, means all the machine's)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def fit_als(
    train: Training, factors: int, regularization: float, alpha: float, iterations: int = 15, seed: int = 0,
    threads: int | None = None,
) -> ALS:
    """implicit's CPU ALS on the binary likes (confidence alpha on a like, 1 elsewhere), seeded."""
    try:
        from implicit.cpu.als import AlternatingLeastSquares
        from threadpoolctl import threadpool_limits
    except ImportError as exc:
        raise ImportError(f"the ALS baseline needs the implicit package: pip install -e '.[eval]' ({exc})") from None
    # implicit runs its own threads; BLAS threads inside them would oversubscribe the cores
    # (and it warns when it is built with BLAS threads on).
    with threadpool_limits(1, "blas"):
        model = AlternatingLeastSquares(
            factors=factors, regularization=regularization, alpha=alpha, iterations=iterations,
            random_state=seed, num_threads=threads or als_threads(), calculate_training_loss=False,
        )
        model.fit(train.likes.astype(np.float32).tocsr(), show_progress=False)
    return ALS(train.known, model)


# ------------------------------------------------------------------ the list feedret eval runs


@dataclass(frozen=True)
class Baseline:
    """A baseline, its hyperparameter grid, and the segment its choice is made on (by recall@100)."""

    name: str
    fit: Callable[..., Scorer]  # fit(train, **params)
    grid: tuple[Mapping[str, Any], ...]
    description: str
    select_on: str = "all"
    seeded: bool = False  # fit takes seed= (the run's seed)


def _grid(**axes: Sequence[Any]) -> tuple[dict[str, Any], ...]:
    out: list[dict[str, Any]] = [{}]
    for name, values in axes.items():
        out = [{**g, name: v} for g in out for v in values]
    return tuple(out)


BASELINES: tuple[Baseline, ...] = (
    Baseline(
        "cold-start popularity", fit_cold_start_popularity, _grid(max_prior=[0, 5, 20, 100]),
        "training likes given by members with at most max_prior earlier engagements; ties by popularity",
        select_on="cold_start",
    ),
    Baseline(
        "item-kNN", fit_item_knn, _grid(neighbours=[20, 50, 100, 200, 500]),
        "cosine of items' training likers, top neighbours per item, summed over the member's likes",
    ),
    Baseline(
        "EASE", fit_ease, _grid(lam=[100.0, 250.0, 500.0, 1000.0, 2000.0]),
        "closed-form item-item regression on training likes, L2 penalty lam",
    ),
    Baseline(
        "ALS", fit_als, _grid(factors=[16, 32, 64], regularization=[0.1, 1.0, 10.0], alpha=[1.0, 3.0]),
        "implicit ALS on training likes (15 iterations, seeded), member vector folded in from the history",
        seeded=True,
    ),
)
