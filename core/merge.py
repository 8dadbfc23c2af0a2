"""Merging per-shard top-K lists into one global top-K. Pure."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class ShardHits:
    shard: int
    post_ids: np.ndarray  # int64
    scores: np.ndarray  # float32, descending


@dataclass(frozen=True)
class Merged:
    post_ids: np.ndarray
    scores: np.ndarray
    shards: np.ndarray


def merge_topk(results: Sequence[ShardHits], k: int) -> Merged:
    """Global top-k by score, ties broken by post id so the order is deterministic.

    A post id can appear in two shards' answers only during a re-shard; the
    higher score wins and the id appears once.

    The root runs this on every request (k=2,000 from each shard), so the common
    case is kept cheap: one stable sort by score, with the two-key sort only when
    some scores tie, and the duplicate removal only when a duplicate exists.
    """
    if not results:
        empty = np.empty(0)
        return Merged(empty.astype(np.int64), empty.astype(np.float32), empty.astype(np.int32))
    ids = np.concatenate([r.post_ids.astype(np.int64, copy=False) for r in results])
    scores = np.concatenate([r.scores.astype(np.float32, copy=False) for r in results])
    shards = np.concatenate([np.full(len(r.post_ids), r.shard, np.int32) for r in results])
    order = np.argsort(-scores, kind="stable")
    ranked = scores[order]
    if len(ranked) > 1 and np.any(ranked[1:] == ranked[:-1]):
        # lexsort: last key is primary -> score descending, then post id ascending.
        order = np.lexsort((ids, -scores))
    ids, scores, shards = ids[order], scores[order], shards[order]
    if len(results) > 1:
        by_id = np.sort(ids)
        if np.any(by_id[1:] == by_id[:-1]):
            _, first = np.unique(ids, return_index=True)
            keep = np.sort(first)
            ids, scores, shards = ids[keep], scores[keep], shards[keep]
    return Merged(ids[:k], scores[:k], shards[:k])
