"""Which post vectors a shard may index: finite, non-zero, the right width, unit length. Pure.

A shard takes `post-vectors` as it comes, and anything can write that topic (a
broken model, a bug in another producer). One NaN or infinite vector scores NaN
or inf against every query and tops every result list; a zero vector, or one far
from unit length, ranks by its length rather than its direction. So the shard
indexes only vectors that pass `check_vectors`, and counts and logs the rest.
"""

from __future__ import annotations

from enum import Enum

import numpy as np

# Post vectors are L2-normalised (feedret.proto, PostVectorEvent.vector). A model run in
# bfloat16 (8 significant bits) leaves norms off by up to ~0.4% (measured: 1,000 random
# 1,024-d vectors normalised in bfloat16, 0.41%; float16, 0.004%); 1% passes those and
# still refuses a vector that was never normalised, whose norm is anything.
UNIT_NORM_TOLERANCE = 1e-2


class VectorProblem(str, Enum):
    """Why a post vector is not indexed (the value goes into logs and counters)."""

    WRONG_WIDTH = "wrong_width"  # empty, or not the index's width
    NON_FINITE = "non_finite"  # a NaN or an infinity
    ZERO = "zero"  # all zeros: no direction
    NOT_UNIT = "not_unit_norm"  # |norm - 1| > UNIT_NORM_TOLERANCE (e.g. 1e30, or never normalised)


def check_vectors(vectors: np.ndarray) -> list[VectorProblem | None]:
    """Per row of a (n, width) batch: what is wrong with it, or None for a sound vector.

    The width is the caller's to check (a batch has one width); the norm is taken in
    float64, so a float32 vector too long to square in float32 (1e30) still has one.
    """
    vectors = np.asarray(vectors)
    if vectors.ndim != 2:
        raise ValueError(f"expected a (n, width) batch, got shape {vectors.shape}")
    # A NaN or infinite component makes the norm NaN or inf, which fails the comparison.
    unit = np.abs(norms_of(vectors) - 1.0) <= UNIT_NORM_TOLERANCE
    problems: list[VectorProblem | None] = [None] * len(vectors)
    for row in np.flatnonzero(~unit):  # only the unsound rows are looked at one by one
        v = vectors[row]
        problems[row] = (
            VectorProblem.NON_FINITE if not np.isfinite(v).all()
            else VectorProblem.ZERO if not v.any()
            else VectorProblem.NOT_UNIT
        )
    return problems


def check_vector(vector, width: int) -> VectorProblem | None:
    """What is wrong with one vector meant for an index of `width` dimensions, or None."""
    vector = np.asarray(vector, dtype=np.float32).reshape(-1)
    if vector.size == 0 or vector.size != width:
        return VectorProblem.WRONG_WIDTH
    return check_vectors(vector.reshape(1, -1))[0]


def norms_of(vectors: np.ndarray) -> np.ndarray:
    """L2 norms of the rows, in float64 (for checks and log lines: no float32 overflow)."""
    v = np.asarray(vectors, dtype=np.float64)
    return np.sqrt(np.einsum("ij,ij->i", v, v))
