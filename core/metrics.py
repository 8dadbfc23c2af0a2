"""Prometheus metrics of every long-running process, and the endpoint that serves them.

Each role (`feedret serve root|shard|member|consumer`) starts one HTTP endpoint,
`http://<FEEDRET_HOST>:<FEEDRET_METRICS_PORT>/metrics`, before it loads anything
(`start_metrics_server`); 0 turns it off. It exports its own role's metrics
below and the shared ones (build and model info, gRPC), and the client's default
collectors' process CPU, memory, open files and GC.

Every gRPC server counts and times each RPC through `GrpcMetricsInterceptor`
(installed by `feedret.server.grpc_common.build_server`), under the names
other gRPC stacks use (`grpc_server_handled_total`, `grpc_server_handling_seconds`),
with `grpc_code` the Python status name (OK, INVALID_ARGUMENT, UNAVAILABLE, ...).
The servers and the consumer call the metrics below at one place each; a
shard's index size, offsets and counters are read from its state when scraped
(`watch_shard`), so its write path carries no metric calls besides one timer.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping

import grpc
import structlog
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:  # a type only: importing it would load faiss into every process, root and member too
    from feedret.indexer.replica import ShardState

log = structlog.get_logger(__name__)

METRICS_PATH = "/metrics"

# RPCs and apply batches take from well under a millisecond to a second or so.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
# A forward pass over a batch: milliseconds for the tiny model on CPU, seconds for a LLaMA.
EMBED_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


# ---------------------------------------------------------------- every process

BUILD_INFO = Gauge("feedret_build_info", "Always 1: the role this process serves and the feedret version.", ["role", "version"])
MODEL_INFO = Gauge(
    "feedret_model_info",
    "Always 1: the encoder this process embeds with (consumer, member); the two must agree.",
    ["model_version", "backend", "device"],
)

# ---------------------------------------------------------------- gRPC servers

_GRPC_LABELS = ["grpc_type", "grpc_service", "grpc_method"]
GRPC_STARTED = Counter("grpc_server_started_total", "RPCs started on the server.", _GRPC_LABELS)
GRPC_HANDLED = Counter(
    "grpc_server_handled_total", "RPCs completed on the server, by status code.", [*_GRPC_LABELS, "grpc_code"]
)
GRPC_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Time from receiving an RPC to its status, on the server.",
    _GRPC_LABELS,
    buckets=LATENCY_BUCKETS,
)

# ---------------------------------------------------------------- root

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


def observe_replica_attempts(shard: int, attempts: Iterable[tuple[int, str, str]]) -> None:
    for _replica, kind, result in attempts:
        ROOT_REPLICA_ATTEMPTS.labels(shard=str(shard), kind=kind, result=result).inc()


def observe_retrieve(candidates: int, failed_shards: Iterable[int]) -> None:
    """One Retrieve answered (shard failures are counted where they happen)."""
    ROOT_CANDIDATES.observe(candidates)
    if failed_shards:
        ROOT_PARTIAL.inc()

# ---------------------------------------------------------------- shard

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

# ---------------------------------------------------------------- member

MEMBER_CACHE = Counter(
    "feedret_member_cache_lookups_total",
    "Embed requests by cache outcome: hit, miss (embedded, then cached), no_session (no session id: never cached).",
    ["result"],
)
for _result in ("hit", "miss", "no_session"):
    MEMBER_CACHE.labels(result=_result)


def observe_member_cache(*, hit: bool, cacheable: bool) -> None:
    MEMBER_CACHE.labels(result="hit" if hit else "miss" if cacheable else "no_session").inc()


MEMBER_EMBED_SECONDS = Histogram(
    "feedret_member_embed_seconds",
    "One forward pass of the member encoder, for a batch of one or more members (excluding the wait for the model).",
    buckets=LATENCY_BUCKETS,
)
MEMBER_EMBED_BATCH = Histogram(
    "feedret_member_embed_batch_members",
    "Members embedded together in one forward pass: cache misses that queued behind the previous pass.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
MEMBER_CACHE_ENTRIES = Gauge("feedret_member_cache_entries", "Member vectors in the session cache.")

# ---------------------------------------------------------------- consumer

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
        upserts = CounterMetricFamily("feedret_shard_upserts", "Upserts applied.", labels=labels)
        deletes = CounterMetricFamily("feedret_shard_deletes", "Deletes applied.", labels=labels)
        rejected = CounterMetricFamily(
            "feedret_shard_rejected",
            "Post-vector records rejected, by reason: undecodable, no_op, or an unsound vector "
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
            stats = index.info() if index is not None else {}
            indexed.add_metric(shard, stats.get("indexed", 0))
            dimension.add_metric(shard, state.dimension)
            vector_dimension.add_metric(shard, state.vector_dimension)
            applied.add_metric(shard, state.applied_offset)
            if state.end_offset is not None:
                end.add_metric(shard, state.end_offset)
                lag.add_metric(shard, max(state.end_offset - state.applied_offset, 0))
            buffered.add_metric(shard, stats.get("buffered", 0))
            tombstones.add_metric(shard, stats.get("tombstones", 0))
            upserts.add_metric(shard, state.upserts)
            deletes.add_metric(shard, state.deletes)
            for reason, count in sorted(state.rejected_reasons.items()):
                rejected.add_metric([*shard, reason], count)
            evicted.add_metric(shard, stats.get("evicted", 0))
            rebuilds.add_metric(shard, stats.get("rebuilds", 0))
            if index is not None:
                info.add_metric([*shard, stats["index_type"], stats["state"], stats["index_device"], state.model_version], 1)
                if stats["gpu_searches"] or stats["gpu_declined"]:
                    gpu.add_metric([*shard, "answered"], stats["gpu_searches"])
                    gpu.add_metric([*shard, "declined"], stats["gpu_declined"])
        yield from (indexed, dimension, vector_dimension, applied, end, lag, buffered, tombstones)
        yield from (upserts, deletes, rejected, evicted, rebuilds, info, gpu)


_shards = _ShardCollector()
REGISTRY.register(_shards)


def watch_shard(state: ShardState) -> None:
    """Export a shard's index size, offsets and counters, read from its state when scraped."""
    _shards.watch(state)


def unwatch_shard(state: ShardState) -> None:
    _shards.unwatch(state)


# ---------------------------------------------------------------- gRPC interceptor


def _rpc_type(handler: grpc.RpcMethodHandler) -> str:
    if handler.request_streaming and handler.response_streaming:
        return "bidi_stream"
    if handler.request_streaming:
        return "client_stream"
    if handler.response_streaming:
        return "server_stream"
    return "unary"


def _final_code(context: grpc.ServicerContext, failed: bool) -> str:
    # context.abort() records its code before raising; an exception without one is
    # what grpc reports as UNKNOWN.
    code = context.code()
    if code is None or (code == grpc.StatusCode.OK and failed):
        return "UNKNOWN" if failed else "OK"
    return code.name if isinstance(code, grpc.StatusCode) else str(code)


class GrpcMetricsInterceptor(grpc.ServerInterceptor):
    """Counts every RPC when it starts and when it ends (by status code) and times it."""

    def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails):
        handler = continuation(handler_call_details)
        if handler is None:
            return None  # unknown method: grpc answers UNIMPLEMENTED itself
        service, _, method = handler_call_details.method.lstrip("/").rpartition("/")
        labels = (_rpc_type(handler), service, method)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _unary(handler.unary_unary, labels),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                _unary(handler.stream_unary, labels),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _streaming(handler.unary_stream, labels),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            _streaming(handler.stream_stream, labels),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _record(labels: tuple[str, str, str], context: grpc.ServicerContext, started: float, failed: bool) -> None:
    GRPC_HANDLED.labels(*labels, _final_code(context, failed)).inc()
    GRPC_SECONDS.labels(*labels).observe(time.perf_counter() - started)


def _unary(behavior: Callable, labels: tuple[str, str, str]) -> Callable:
    def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
        GRPC_STARTED.labels(*labels).inc()
        started = time.perf_counter()
        failed = True
        try:
            reply = behavior(request, context)
            failed = False
            return reply
        finally:
            _record(labels, context, started, failed)

    return wrapped


def _streaming(behavior: Callable, labels: tuple[str, str, str]) -> Callable:
    def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator:
        GRPC_STARTED.labels(*labels).inc()
        started = time.perf_counter()
        failed = True
        try:
            yield from behavior(request, context)
            failed = False
        except GeneratorExit:
            # The caller went away (cancelled, or its deadline passed) mid-stream.
            if context.code() is None:
                context.set_code(grpc.StatusCode.CANCELLED)
            raise
        finally:
            _record(labels, context, started, failed)

    return wrapped


# ---------------------------------------------------------------- endpoint


@dataclass
class MetricsServer:
    host: str
    port: int
    _server: Any

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{METRICS_PATH}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("feedret")
    except PackageNotFoundError:
        return "unknown"


# Every role's metrics are defined in this one module and so registered in every process;
# an endpoint exports the shared ones and its own role's, not every other role's at zero.
_ROLE_PREFIXES = {role: f"feedret_{role}_" for role in ("root", "shard", "member", "consumer")}


class RoleRegistry:
    """The default registry as one role exports it (a registry is anything with `collect`).

    A role that is none of the four (a process hosting several, a test) exports everything.
    """

    def __init__(self, role: str, source: Any = REGISTRY) -> None:
        self.role = role
        self.source = source
        own = _ROLE_PREFIXES.get(role)
        self._others = tuple(p for p in _ROLE_PREFIXES.values() if own is not None and p != own)

    def collect(self) -> Iterator:
        for family in self.source.collect():
            if not family.name.startswith(self._others):
                yield family


def start_metrics_server(host: str, port: int, role: str) -> MetricsServer | None:
    """Serve /metrics on host:port from a daemon thread; None when port is 0 (off) or cannot be bound.

    A port that cannot be bound is logged as an error and the process goes on
    serving without metrics: losing observability must not take retrieval down,
    and Prometheus shows the target as down (`up == 0`).
    """
    BUILD_INFO.labels(role=role, version=_version()).set(1)
    if port == 0:
        log.info("metrics_disabled", reason="FEEDRET_METRICS_PORT=0")
        return None
    try:
        server, _thread = start_http_server(port, addr=host, registry=RoleRegistry(role))
    except OSError as exc:
        log.error(
            "metrics_port_unavailable",
            address=f"{host}:{port}",
            error=str(exc),
            consequence="serving without a metrics endpoint",
            fix="free the port, or set FEEDRET_METRICS_PORT to another port (0 turns metrics off)",
        )
        return None
    bound = MetricsServer(host, server.server_port, server)
    log.info("metrics_listening", url=bound.url)
    return bound
