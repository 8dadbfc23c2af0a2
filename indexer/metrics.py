"""A shard's Prometheus metrics (`feedret_shard_*`).

The applier times each applied batch (`timed_apply`) and the snapshotter records each snapshot
(`observe_snapshot`); everything else (index size, offsets, counters, the index's state) is read
from the watched `ShardState` when scraped (`watch_shard`), so the write path carries no metric
calls besides that one timer. Registered when imported, that is by the replica's threads
(`feedret.indexer.applier`, `feedret.indexer.upkeep`) and `feedret.server.shard`; exported by the
shard's endpoint (`feedret.metrics.start_metrics_server`). Loads no grpc.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Iterator

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from feedret.indexer.replica import ShardState
from feedret.indexer.shard_index import IndexInfo
from feedret.metrics import LATENCY_BUCKETS

SHARD_APPLY_SECONDS = Histogram(
    "feedret_shard_apply_seconds",
    "Time to apply one polled batch of post-vector records to the index.",
    ["shard"],
    buckets=LATENCY_BUCKETS,
)
SHARD_APPLY_RECORDS = Histogram(
    "feedret_shard_apply_batch_records",
    "Post-vector records per applied batch.",
    ["shard"],
    buckets=(1, 2, 5, 10, 25, 50, 100, 250, 512, 1000, 2500),
)


@contextlib.contextmanager
def timed_apply(shard_id: int, records: int) -> Iterator[None]:
    """Times one applied batch of post-vector records."""
    started = time.perf_counter()
    yield
    shard = str(shard_id)
    SHARD_APPLY_SECONDS.labels(shard=shard).observe(time.perf_counter() - started)
    SHARD_APPLY_RECORDS.labels(shard=shard).observe(records)


SHARD_SNAPSHOT_SECONDS = Gauge(
    "feedret_shard_snapshot_duration_seconds", "How long the last snapshot written took.", ["shard"]
)
SHARD_SNAPSHOT_BYTES = Gauge("feedret_shard_snapshot_bytes", "Size of the last snapshot written.", ["shard"])
SHARD_SNAPSHOT_TIME = Gauge(
    "feedret_shard_snapshot_last_success_timestamp_seconds",
    "When the last snapshot was written (Unix time); its age is time() minus this.",
    ["shard"],
)
SHARD_SNAPSHOT_FAILURES = Counter("feedret_shard_snapshot_failures_total", "Snapshots that failed to write.", ["shard"])


def observe_snapshot(shard_id: int, seconds: float, size: int) -> None:
    """A snapshot was written."""
    shard = str(shard_id)
    SHARD_SNAPSHOT_SECONDS.labels(shard=shard).set(seconds)
    SHARD_SNAPSHOT_BYTES.labels(shard=shard).set(size)
    SHARD_SNAPSHOT_TIME.labels(shard=shard).set(time.time())


# ---------------------------------------------------------------- shard state, read when scraped


class _ShardCollector:
    """Reads every watched shard's state at scrape time: no metric calls on the write path."""

    def __init__(self) -> None:
        self._states: dict[int, ShardState] = {}
        self._lock = threading.Lock()

    def watch(self, state: ShardState) -> None:
        with self._lock:
            self._states[state.config.shard_id] = state

    def unwatch(self, state: ShardState) -> None:
        with self._lock:
            if self._states.get(state.config.shard_id) is state:
                del self._states[state.config.shard_id]

    def describe(self) -> list:
        return []  # the families depend on the shards watched; collected on demand

    def collect(self) -> Iterator:
        with self._lock:
            states = list(self._states.values())
        labels = ["shard"]
        indexed = GaugeMetricFamily("feedret_shard_indexed_posts", "Posts in the shard's index.", labels=labels)
        dimension = GaugeMetricFamily(
            "feedret_shard_serve_dimension", "Width the shard serves (a Matryoshka prefix, or the model's).", labels=labels
        )
        vector_dimension = GaugeMetricFamily(
            "feedret_shard_vector_dimension", "Width of the incoming post vectors (the model's).", labels=labels
        )
        applied = GaugeMetricFamily(
            "feedret_shard_applied_offset", "Next post-vectors offset the shard will apply.", labels=labels
        )
        end = GaugeMetricFamily(
            "feedret_shard_partition_end_offset",
            "End offset (high watermark) of the shard's post-vectors partition, as of its last fetch.",
            labels=labels,
        )
        lag = GaugeMetricFamily(
            "feedret_shard_partition_lag_records",
            "Post-vector records on the partition not yet applied (end offset minus applied offset).",
            labels=labels,
        )
        buffered = GaugeMetricFamily(
            "feedret_shard_buffered_posts",
            "Posts searched exactly while an approximate index trains or rebuilds.",
            labels=labels,
        )
        tombstones = GaugeMetricFamily(
            "feedret_shard_tombstones", "Deleted posts still in an HNSW index until its next rebuild.", labels=labels
        )
        vector_bytes = GaugeMetricFamily(
            "feedret_shard_vector_bytes",
            "Bytes of vectors the shard's store holds in memory, by codec (float32, float16, int8, binary; "
            "a binary store rescored from disk counts its bits only). An approximate index's own codes are apart.",
            labels=["shard", "codec"],
        )
        upserts = CounterMetricFamily("feedret_shard_upserts", "Upserts applied.", labels=labels)
        deletes = CounterMetricFamily("feedret_shard_deletes", "Deletes applied.", labels=labels)
        rejected = CounterMetricFamily(
            "feedret_shard_rejected",
            "Post-vector records rejected, by reason: undecodable, no_op, other_model (embedded by "
            "another model than the shard indexes), or an unsound vector "
            "(wrong_width, non_finite, zero, not_unit_norm; feedret.indexer.vectors).",
            labels=["shard", "reason"],
        )
        evicted = CounterMetricFamily("feedret_shard_evicted", "Posts evicted by retention.", labels=labels)
        rebuilds = CounterMetricFamily("feedret_shard_rebuilds", "Background index builds completed.", labels=labels)
        info = GaugeMetricFamily(
            "feedret_shard_index_info",
            "Always 1: the index type, its state (exact, buffering, training, ready, rebuilding, failed), "
            "where it searches (cpu, cuda:N) and the model version.",
            labels=["shard", "index_type", "state", "device", "model_version"],
        )
        gpu = CounterMetricFamily(
            "feedret_shard_gpu_copy_searches",
            "Searches of an IVF index's GPU copy: answered there, or declined to the CPU index "
            "(k above 2,048, a narrow filter, too few passing it, a failed copy).",
            labels=["shard", "outcome"],
        )
        for state in states:
            shard = [str(state.config.shard_id)]
            index = state.index
            stats = index.info() if index is not None else IndexInfo()
            indexed.add_metric(shard, stats.indexed)
            dimension.add_metric(shard, state.dimension)
            vector_dimension.add_metric(shard, state.vector_dimension)
            applied.add_metric(shard, state.applied_offset)
            if state.end_offset is not None:
                end.add_metric(shard, state.end_offset)
                lag.add_metric(shard, max(state.end_offset - state.applied_offset, 0))
            buffered.add_metric(shard, stats.buffered)
            tombstones.add_metric(shard, stats.tombstones)
            if index is not None:
                vector_bytes.add_metric([*shard, stats.vector_codec], stats.store_bytes)
            upserts.add_metric(shard, state.upserts)
            deletes.add_metric(shard, state.deletes)
            for reason, count in sorted(state.rejected_reasons.items()):
                rejected.add_metric([*shard, reason], count)
            evicted.add_metric(shard, stats.evicted)
            rebuilds.add_metric(shard, stats.rebuilds)
            if index is not None:
                info.add_metric([*shard, stats.index_type, stats.state, stats.index_device, state.serving_model], 1)
                if stats.gpu_searches or stats.gpu_declined:
                    gpu.add_metric([*shard, "answered"], stats.gpu_searches)
                    gpu.add_metric([*shard, "declined"], stats.gpu_declined)
        yield from (indexed, dimension, vector_dimension, applied, end, lag, buffered, tombstones, vector_bytes)
        yield from (upserts, deletes, rejected, evicted, rebuilds, info, gpu)


_shards = _ShardCollector()
REGISTRY.register(_shards)


def watch_shard(state: ShardState) -> None:
    """Export a shard's index size, offsets and counters, read from its state when scraped."""
    _shards.watch(state)


def unwatch_shard(state: ShardState) -> None:
    _shards.unwatch(state)
