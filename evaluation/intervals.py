"""Member bootstrap: a 95% interval on the difference between two systems' mean metric.

Queries from one member are not independent (the same taste, the same history
growing), so resampling queries would understate the uncertainty: a report with
~100 members has ~100 independent units, not 3,000. `MemberBootstrap` draws
members with replacement (all of a drawn member's queries come along, as many
times as the member is drawn) and recomputes the query-weighted mean on each
resample. Two systems compared on the same resamples give a paired interval
on their difference.

Pure numpy; deterministic given the seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

RESAMPLES = 1000
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate (on the queries as they are) and a percentile interval from the resamples."""

    estimate: float
    low: float
    high: float

    def to_json(self) -> dict[str, Any]:
        return {"diff": self.estimate, "low": self.low, "high": self.high}


@dataclass(frozen=True)
class MemberBootstrap:
    """Resamples of members: weights[b, m] is how often member m is drawn in resample b.

    Rows (queries) map to members through `groups`; a resample's mean of a
    per-query value is sum_m w[b, m] * (sum of m's values) / sum_m w[b, m] * (m's query count).
    """

    groups: np.ndarray  # [R] member index of each query row
    weights: np.ndarray  # [B, M] draw counts; each row sums to M
    level: float = LEVEL

    @classmethod
    def draw(cls, members: Sequence[str], resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> MemberBootstrap:
        """`members`: the member of each query row (any hashable ids; order of rows is kept)."""
        if resamples < 1:
            raise ValueError(f"resamples must be >= 1, got {resamples}")
        if not 0 < level < 1:
            raise ValueError(f"level must be in (0, 1), got {level}")
        names, groups = np.unique(np.asarray(members, dtype=object).astype(str), return_inverse=True)
        m = len(names)
        rng = np.random.default_rng(seed)
        draws = rng.integers(0, m, size=(resamples, m)) if m else np.zeros((resamples, 0), dtype=np.int64)
        weights = np.stack([np.bincount(d, minlength=m) for d in draws]).astype(np.float64) if m else np.zeros((resamples, 0))
        return cls(groups=groups.astype(np.int64), weights=weights, level=level)

    @property
    def resamples(self) -> int:
        return self.weights.shape[0]

    def means(self, values: np.ndarray) -> np.ndarray:
        """[B] the query-weighted mean of `values` [R] on each resample."""
        values = np.asarray(values, dtype=np.float64)
        if values.shape != self.groups.shape:
            raise ValueError(f"{values.shape[0] if values.ndim else 0} values for {len(self.groups)} query rows")
        m = self.weights.shape[1]
        sums = np.bincount(self.groups, weights=values, minlength=m)
        counts = np.bincount(self.groups, minlength=m).astype(np.float64)
        return (self.weights @ sums) / (self.weights @ counts)

    def difference(self, values: np.ndarray, reference: np.ndarray) -> Interval:
        """mean(values) - mean(reference), with the percentile interval of that difference over the resamples."""
        values, reference = np.asarray(values, dtype=np.float64), np.asarray(reference, dtype=np.float64)
        estimate = float(values.mean() - reference.mean())
        diffs = self.means(values - reference)
        tail = (1 - self.level) / 2
        low, high = np.quantile(diffs, [tail, 1 - tail])
        return Interval(estimate, float(low), float(high))
