"""The root's Prometheus metrics (`feedret_root_*`): partial replies, shard failures, replica
attempts and hedges, shards asked again, and candidates returned.

Registered when imported, that is by `feedret.server.root`; exported by the root's endpoint
(`feedret.metrics.start_metrics_server`).
"""

from __future__ import annotations

from typing import Iterable

from prometheus_client import Counter, Histogram

ROOT_PARTIAL = Counter(
    "feedret_root_partial_responses_total", "Retrieve replies with partial=true: some shard failed or missed the deadline."
)
ROOT_SHARD_FAILURES = Counter(
    "feedret_root_shard_failures_total",
    "Shard searches the root left out of a reply (the shard failed or was late), by shard and status code.",
    ["shard", "code"],
)
ROOT_CANDIDATES = Histogram(
    "feedret_root_candidates_returned",
    "Candidates in each Retrieve reply.",
    buckets=(0, 1, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10000),
)


ROOT_REPLICA_ATTEMPTS = Counter(
    "feedret_root_replica_attempts_total",
    "Shard replica calls made for Retrieve, by shard, kind (first, failover: after a failure, hedge: beside a "
    "slow call) and how each ended (ok, a status code, overtaken by the other call, late, cancelled). "
    "hedge/first is the hedging overhead.",
    ["shard", "kind", "result"],
)


ROOT_SHARDS_ASKED_AGAIN = Counter(
    "feedret_root_shards_asked_again_total",
    "Shards asked a second time for the full k because their answer to their share of it "
    "(FEEDRET_SHARD_DEPTH_SIGMAS) reached into the merged top k: often means shards of unequal size.",
    ["shard"],
)
ROOT_HEDGES_DENIED = Counter(
    "feedret_root_hedges_denied_total",
    "Hedges that were due (a replica slower than FEEDRET_HEDGE_AFTER_MS) but not sent because the hedge "
    "budget (FEEDRET_HEDGE_BUDGET extra calls per first call) was spent: replicas are slow across the board.",
    ["shard"],
)


ROOT_FLEET_REPLIES = Counter(
    "feedret_root_fleet_replies_total",
    "Retrieve replies by the shard fleet that answered (serving, or next during a model rollout: "
    "FEEDRET_NEXT_SHARD_ADDRESSES; or the fleet's name in FEEDRET_GENERATIONS_FILE) and the model "
    "of the query vector and its candidates.",
    ["fleet", "model_version"],
)


def observe_replica_attempts(shard: int, attempts: Iterable[tuple[int, str, str]]) -> None:
    for _replica, kind, result in attempts:
        ROOT_REPLICA_ATTEMPTS.labels(shard=str(shard), kind=kind, result=result).inc()


def observe_retrieve(candidates: int, failed_shards: Iterable[int]) -> None:
    """One Retrieve answered (shard failures are counted where they happen)."""
    ROOT_CANDIDATES.observe(candidates)
    if failed_shards:
        ROOT_PARTIAL.inc()
