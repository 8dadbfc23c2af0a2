"""Merging per-shard top-K lists into one global top-K. Pure."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import math

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
    higher score wins and the id appears once. Non-finite scores are never ranked.

    The root runs this on every request (k=2,000 from each shard), so the common
    case is kept cheap: one stable sort by score, ties put in id order run by run,
    and the duplicate removal only when a duplicate exists among the first k.
    """
    if not results:
        empty = np.empty(0)
        return Merged(empty.astype(np.int64), empty.astype(np.float32), empty.astype(np.int32))
    ids = np.concatenate([r.post_ids.astype(np.int64, copy=False) for r in results])
    scores = np.concatenate([r.scores.astype(np.float32, copy=False) for r in results])
    shards = np.concatenate([np.full(len(r.post_ids), r.shard, np.int32) for r in results])
    finite = np.isfinite(scores)
    if not finite.all():  # NaN or inf (a shard of an older version): it would rank first, or anywhere
        ids, scores, shards = ids[finite], scores[finite], shards[finite]
    order = _rank(ids, scores)
    ids, scores, shards = ids[order], scores[order], shards[order]
    # Ranked, the answer is the first k distinct ids. When ids[:k] are already distinct
    # (always, unless a re-shard put a post on two shards) they are that answer.
    if len(results) > 1 and _has_duplicates(ids[:k]):
        _, first = np.unique(ids, return_index=True)
        keep = np.sort(first)
        ids, scores, shards = ids[keep], scores[keep], shards[keep]
    return Merged(ids[:k], scores[:k], shards[:k])


def _rank(ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Positions by score descending, then post id ascending.

    Float32 scores of two shards' top-2,000 nearly always tie somewhere (a few
    pairs), and a lexsort of every candidate cost ~0.4 ms per request at k=2,000.
    One stable argsort by score, then only the tied positions re-sorted by (run, id),
    gives the same order.
    """
    order = np.argsort(-scores, kind="stable")
    ranked = scores[order]
    tie = ranked[1:] == ranked[:-1]  # tie[i]: ranks i and i+1 share a score
    if not tie.any():
        return order
    after = np.concatenate((tie, [False]))  # rank i ties with rank i+1
    before = np.concatenate(([False], tie))  # rank i ties with rank i-1
    tied = np.flatnonzero(after | before)
    run = np.cumsum(after & ~before)[tied]  # runs numbered in rank order, so each keeps its ranks
    members = order[tied]
    order[tied] = members[np.lexsort((ids[members], run))]  # last key is primary
    return order


def _has_duplicates(ids: np.ndarray) -> bool:
    by_id = np.sort(ids)
    return bool(np.any(by_id[1:] == by_id[:-1]))


def shard_depth(k: int, num_shards: int, sigmas: float) -> int:
    """How many candidates to ask each of `num_shards` shards for, for a global top-k.

    Posts go to shards by a hash of their id, so how many of the global top-k one shard
    holds is Binomial(k, 1/S): k/S on average, with standard deviation
    sqrt(k (1/S)(1 - 1/S)). Asking each shard for the mean plus `sigmas` deviations
    (k=2,000 over 2 shards, 5 sigmas: 1,112) loses a true top-k post only when a shard
    holds more than that, about once in 3.5 million shard answers at 5 sigmas, and then
    only posts at the bottom of the top k; each shard searches and sends about its share.
    `sigmas` 0, or a single shard: k. A shard that returned all it was asked for, down to
    a score that still makes the merged top k (or when the merge has fewer than k), may hold
    more: the caller asks it again for k, which keeps the answer exact when shards differ in size.
    """
    if num_shards <= 1 or sigmas <= 0:
        return k
    p = 1.0 / num_shards
    return max(1, min(k, math.ceil(k * p + sigmas * math.sqrt(k * p * (1 - p)))))
