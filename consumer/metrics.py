"""The embedding consumer's Prometheus metrics (`feedret_consumer_*`): micro-batches, posts embedded,
vectors produced, dead letters, lag per owned partition and the last commit.

Registered when imported, that is by `feedret.consumer.service` and `feedret.consumer.lag`;
exported by the consumer's endpoint (`feedret.metrics.start_metrics_server`).
"""

from __future__ import annotations

from typing import Iterable, Mapping

from prometheus_client import Counter, Gauge, Histogram

from feedret.metrics import EMBED_BUCKETS

CONSUMER_EMBEDDED = Counter(
    "feedret_consumer_posts_embedded_total", "Post upserts embedded and acknowledged by the broker."
)
CONSUMER_DELETES = Counter("feedret_consumer_deletes_total", "Post deletes forwarded and acknowledged by the broker.")
CONSUMER_VECTORS = Counter(
    "feedret_consumer_vectors_produced_total",
    "Post-vector events (upserts and deletes) acknowledged by the broker, by post-vectors partition (= shard).",
    ["partition"],
)
CONSUMER_DEAD_LETTERS = Counter(
    "feedret_consumer_dead_letters_total",
    "Records sent to the dead-letter topic, by reason: the field at fault, invalid_json, not_object, too_large, "
    "tombstone, no_key, key_mismatch, unreadable or embed_failed.",
    ["reason"],
)
CONSUMER_BATCHES = Counter("feedret_consumer_batches_total", "Micro-batches embedded, produced and committed.")
CONSUMER_BATCH_FAILURES = Counter(
    "feedret_consumer_batch_failures_total", "Micro-batches that failed and will be processed again."
)
CONSUMER_BATCH_RECORDS = Histogram(
    "feedret_consumer_batch_records", "Records per micro-batch.", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
)
CONSUMER_EMBED_SECONDS = Histogram(
    "feedret_consumer_embed_seconds", "Forward pass over one micro-batch's upserts.", buckets=EMBED_BUCKETS
)
CONSUMER_LAG = Gauge(
    "feedret_consumer_lag_records",
    "Records of a posts partition this consumer owns and has not committed: the partition's end "
    "offset minus the group's committed offset, asked of the broker at most every lag_refresh_ms.",
    ["partition"],
)
CONSUMER_LAST_COMMIT = Gauge(
    "feedret_consumer_last_commit_timestamp_seconds",
    "Unix time of this consumer's last committed batch (0: none yet). A consumer hung inside a "
    "batch fetches nothing, so its lag stops moving; alert on time() minus this while lag > 0.",
)


def observe_consumer_batch(
    *,
    records: int,
    upserts: int,
    deletes: int,
    embed_seconds: float | None,
    partitions: Iterable[int],
    dead_letter_reasons: Iterable[str],
) -> None:
    """One committed micro-batch: what it embedded, produced and dead-lettered."""
    CONSUMER_BATCHES.inc()
    CONSUMER_BATCH_RECORDS.observe(records)
    CONSUMER_EMBEDDED.inc(upserts)
    CONSUMER_DELETES.inc(deletes)
    if embed_seconds is not None:
        CONSUMER_EMBED_SECONDS.observe(embed_seconds)
    for partition in partitions:
        CONSUMER_VECTORS.labels(partition=str(partition)).inc()
    for reason in dead_letter_reasons:
        CONSUMER_DEAD_LETTERS.labels(reason=reason).inc()


def set_consumer_lag(lags: Mapping[int, int]) -> None:
    """Lag per posts partition this consumer owns: end offset minus committed offset (consumer/lag.py)."""
    for partition, lag in lags.items():
        CONSUMER_LAG.labels(partition=str(partition)).set(lag)


def forget_consumer_partitions(partitions: Iterable[int]) -> None:
    """Partitions revoked from this consumer: their lag is now another consumer's to report."""
    for partition in partitions:
        try:
            CONSUMER_LAG.remove(str(partition))
        except KeyError:
            pass
