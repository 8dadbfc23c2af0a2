"""Which shard owns a post: a pure, stable function of the post id."""

from __future__ import annotations

import numpy as np

_MASK = (1 << 64) - 1


def _mix64(x: int) -> int:
    # splitmix64 finaliser: sequential post ids (the common case) spread evenly.
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def shard_of(post_id: int, num_shards: int) -> int:
    if num_shards < 1:
        raise ValueError("num_shards must be >= 1")
    return _mix64(post_id) % num_shards


def shards_of(post_ids: np.ndarray, num_shards: int) -> np.ndarray:
    """Vectorised shard_of for many ids (same answers)."""
    x = post_ids.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x % np.uint64(num_shards)).astype(np.int64)
