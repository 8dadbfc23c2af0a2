"""Shard server: applies its partition of the post-vector topic to a faiss index and serves Search.

The partition is read by manual assignment (no consumer group): a shard owns
exactly one partition, and every replica of it reads the whole of it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import grpc
import numpy as np
import structlog
from google.protobuf.message import DecodeError
from kafka import KafkaConsumer, TopicPartition

from feedret import metrics
from feedret.config import GrpcSecurityConfig, KafkaConfig, ShardConfig
from feedret.indexer import snapshot as snapshots
from feedret.logging import Throttle
from feedret.indexer.shard_index import IndexConfigError, IndexOptions, SearchFilter, ShardIndex
from feedret.indexer.batcher import SearchBatcher
from feedret.indexer.vectors import UNIT_NORM_TOLERANCE, VectorProblem, check_vectors, norms_of
from feedret.server.grpc_common import (
    RpcFailure,
    build_server,
    check_filters,
    check_k,
    connection_age_options,
    fill_candidates,
    query_vector,
    rpc_scope,
    set_serving,
)
from feedret.v1 import feedret_pb2 as pb
from feedret.v1 import feedret_pb2_grpc as pb_grpc

log = structlog.get_logger(__name__)

SERVICE_NAMES = (
    pb.DESCRIPTOR.services_by_name["ShardService"].full_name,
    pb.DESCRIPTOR.services_by_name["IndexAdmin"].full_name,
)


@dataclass
class ShardState:
    """The index plus what the shard knows about how far it has read."""

    config: ShardConfig
    topic: str
    index: ShardIndex | None = None
    applied_offset: int = 0  # next offset to read
    end_offset: int | None = None  # the partition's high watermark as of the last fetch (for lag)
    # (applied_offset, post id of the record just before it), assigned as one tuple so a
    # snapshot reads a matching pair: on restore, that record must still be on the partition.
    position: tuple[int, int | None] = (0, None)
    # Set by restore: the applier checks the snapshot's last record before replaying.
    verify_position: bool = False
    upserts: int = 0
    deletes: int = 0
    rejected: int = 0
    # `rejected` by reason (a VectorProblem's value, "undecodable", "no_op"), for logs and counters.
    rejected_reasons: dict[str, int] = field(default_factory=dict)
    # At most 10 vector_rejected lines a second; the counters count every one.
    reject_log: Throttle = field(default_factory=lambda: Throttle(10.0))
    model_version: str = ""  # of the latest vector applied; each post keeps its own in the index
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def dimension(self) -> int:
        """The width served (a Matryoshka prefix when serve_dimension is set)."""
        if self.index is not None:
            return self.index.dimension
        return (self.config.serve_dimension or self.config.dimension) if self.config.dimension else 0

    @property
    def vector_dimension(self) -> int:
        """The width of incoming vectors (the model's)."""
        return self.index.input_dimension if self.index is not None else self.config.dimension

    def _ensure_index(self, dimension: int) -> ShardIndex:
        """The index, created at the first vector's width. IndexConfigError when the config cannot work."""
        if self.index is None:
            self.index = ShardIndex(dimension, options=IndexOptions.from_config(self.config))
            log.info(
                "index_created",
                dimension=dimension,
                serve_dimension=self.index.dimension,
                index_factory=self.config.index_factory,
                index_type=self.index.index_type,
                state=self.index.state,
            )
        return self.index

    def count_rejected(self, reason: str) -> None:
        self.rejected += 1
        self.rejected_reasons[reason] = self.rejected_reasons.get(reason, 0) + 1

    def apply(self, events: list[tuple[int, pb.PostVectorEvent]], now: float) -> None:
        """Apply decoded events in order. Runs of upserts go to faiss in one call.

        Only sound vectors are indexed (feedret.indexer.vectors): anything can write the
        topic, and one NaN, infinite or unnormalised vector would top every result list.
        The rest are counted as rejected, logged and skipped; a post keeps its earlier vector.
        """
        run: list[tuple[int, pb.PostVectorEvent]] = []

        def flush() -> None:
            if not run:
                return
            # The index's width; before the first vector, the run's first one's.
            width = self.vector_dimension or next((len(e.vector) for _, e in run if len(e.vector)), 0)
            fits = [i for i, (_, e) in enumerate(run) if width and len(e.vector) == width]
            row_of = {i: row for row, i in enumerate(fits)}  # position in run -> row of `vectors`
            vectors = np.array([run[i][1].vector for i in fits], dtype=np.float32).reshape(len(fits), width)
            problems = check_vectors(vectors)
            sound: list[int] = []  # positions in run
            sound_ids: set[int] = set()  # posts given a sound vector earlier in this run
            for i, (offset, ev) in enumerate(run):
                problem = problems[row_of[i]] if i in row_of else VectorProblem.WRONG_WIDTH
                if problem is None:
                    sound.append(i)
                    sound_ids.add(ev.post_id)
                    continue
                self.count_rejected(problem.value)
                held = self.reject_log.allow()
                if held is None:
                    continue  # counted; a broken writer at full rate must not flood the log too
                kept = ev.post_id in sound_ids or (self.index is not None and ev.post_id in self.index)
                detail: dict[str, float] = {}
                if problem is VectorProblem.WRONG_WIDTH:
                    detail = {"width": len(ev.vector), "expected": width}
                elif problem is VectorProblem.NOT_UNIT:  # (a NaN norm would not be valid JSON in the log)
                    detail = {"norm": float(norms_of(vectors[row_of[i]][None])[0]), "tolerance": UNIT_NORM_TOLERANCE}
                log.error(
                    "vector_rejected",
                    post_id=ev.post_id,
                    offset=offset,
                    reason=problem.value,
                    model_version=ev.model_version,
                    # A rejected upsert changes nothing: the post's earlier vector, if any, still serves.
                    earlier_vector="kept" if kept else "none",
                    # Rejections counted but not logged since the last line (Throttle).
                    not_logged_before=held,
                    **detail,
                )
            good = [run[i][1] for i in sound]
            rows = [row_of[i] for i in sound]
            run.clear()
            if not width:
                return
            index = self._ensure_index(width)  # even with nothing sound: a bad index config fails now
            if not good:
                return
            index.upsert(
                [e.post_id for e in good],
                vectors if len(rows) == len(vectors) else vectors[rows],
                [e.created_at for e in good],
                [e.lang for e in good],
                indexed_at=now,
                model_versions=[e.model_version for e in good],
            )
            self.upserts += len(good)
            self.model_version = good[-1].model_version

        for offset, ev in events:
            if ev.op == pb.PostVectorEvent.UPSERT:
                run.append((offset, ev))
            elif ev.op == pb.PostVectorEvent.DELETE:
                flush()
                if self.index is not None:
                    self.index.delete([ev.post_id])
                self.deletes += 1
            else:
                self.count_rejected("no_op")
                log.error("vector_event_without_op", post_id=ev.post_id, offset=offset)
        flush()
        if events:
            self.applied_offset = events[-1][0] + 1
            self.position = (self.applied_offset, events[-1][1].post_id)

    # ------------------------------------------------------------ snapshots

    def capture(self) -> tuple[int, dict, dict] | None:
        """(applied offset, header, sections) for a snapshot; None while there is no index.

        The offset is read before the index is copied, so the copy holds at least
        every event before it (maybe some after: replaying those again is harmless,
        upserts and deletes are idempotent and applied in order).
        """
        index = self.index
        if index is None:
            return None
        offset, last_post_id = self.position
        counters = {"upserts": self.upserts, "deletes": self.deletes, "rejected": self.rejected,
                    "rejected_reasons": dict(self.rejected_reasons)}
        model_version = self.model_version
        meta, sections = index.export_state()
        cfg = self.config
        header = {
            "num_shards": cfg.num_shards,
            "topic": self.topic,
            "partition": cfg.shard_id,
            "model_version": model_version,
            "last_post_id": last_post_id,
            "counters": counters,
            "index": meta,
            "written_at": time.time(),
        }
        return offset, header, sections

    def reset(self) -> None:
        """Forget everything: the partition is replayed from its start."""
        self.index = None
        self.applied_offset = 0
        self.position = (0, None)
        self.upserts = self.deletes = self.rejected = 0
        self.rejected_reasons = {}
        self.model_version = ""

    def restore(self, header: dict, sections: dict) -> None:
        """Take over a snapshot's index and position. IndexConfigError when it does not fit this shard."""
        cfg = self.config
        made_for = (header["num_shards"], header["topic"], header["partition"])
        if made_for != (cfg.num_shards, self.topic, cfg.shard_id):
            raise IndexConfigError(f"snapshot of (num_shards, topic, partition) {made_for}")
        meta = header["index"]
        if cfg.dimension and cfg.dimension != meta["input_dimension"]:
            raise IndexConfigError(f"snapshot of {meta['input_dimension']}-d vectors, configured {cfg.dimension}")
        # A snapshot from before model versions were kept per post holds them all as its header's.
        self.index = ShardIndex.from_state(meta, sections, IndexOptions.from_config(cfg),
                                           model_version=header.get("model_version", ""))
        self.applied_offset = int(header["applied_offset"])
        self.position = (self.applied_offset, header.get("last_post_id"))
        self.verify_position = True
        self.model_version = header.get("model_version", "")
        counters = header.get("counters", {})
        self.upserts = counters.get("upserts", 0)
        self.deletes = counters.get("deletes", 0)
        self.rejected = counters.get("rejected", 0)
        self.rejected_reasons = dict(counters.get("rejected_reasons", {}))


class CatchUp:
    """When a replica has caught up with its partition: read up to the end it saw at start.

    The end is the larger of the broker's end offset asked at start (ListOffsets)
    and the high watermark of the first fetch answer. Either alone misleads: the
    embedded broker's ListOffsets reports where the last batch starts, not where
    it ends, and a first poll often returns nothing before any fetch has answered
    (no high watermark yet) however long the backlog is.
    """

    def __init__(self, listed_end: int) -> None:
        self.listed_end = listed_end
        self.target: int | None = None

    def observe(self, position: int, highwater: int | None) -> bool:
        """True once `position` (the next offset to read) has reached the end seen at start."""
        if self.target is None:
            if highwater is None:
                return False  # no fetch has answered yet: the end is not known
            self.target = max(highwater, self.listed_end)
        return position >= self.target


class PartitionApplier(threading.Thread):
    """Reads the shard's post-vector partition from the beginning and applies it.

    on_caught_up runs once, when everything on the partition at start is applied
    (CatchUp): the replica reports SERVING from then on.
    """

    def __init__(
        self,
        kafka: KafkaConfig,
        state: ShardState,
        on_caught_up: Callable[[], None],
        on_fatal: Callable[[str], None] = lambda reason: None,
    ) -> None:
        super().__init__(name=f"applier-{state.config.shard_id}", daemon=True)
        self.kafka = kafka
        self.state = state
        self.on_caught_up = on_caught_up
        self.on_fatal = on_fatal
        self.stop_event = threading.Event()
        self.caught_up = False

    def run(self) -> None:
        cfg = self.state.config
        tp = TopicPartition(self.kafka.vectors_topic, cfg.shard_id)
        while not self.stop_event.is_set():
            try:
                consumer = KafkaConsumer(
                    **self.kafka.client_options(),
                    group_id=None,
                    enable_auto_commit=False,
                    # An offset the topic's retention already dropped (an old snapshot's, or 0):
                    # replay what is left rather than jump to the end and miss it.
                    auto_offset_reset="earliest",
                    max_poll_records=cfg.apply_batch_max,
                    fetch_max_wait_ms=self.kafka.fetch_max_wait_ms,
                    client_id=f"feedret-shard-{cfg.shard_id}",
                )
                consumer.assign([tp])
                if self.state.verify_position:
                    self.verify_snapshot_position(consumer, tp)
                consumer.seek(tp, self.state.applied_offset)
                log.info("applier_started", topic=tp.topic, partition=tp.partition, offset=self.state.applied_offset)
                try:
                    self._loop(consumer, tp)
                finally:
                    consumer.close()
            except IndexConfigError as exc:
                # The configured index cannot serve these vectors: retrying cannot help.
                log.error("index_config_invalid", error=str(exc))
                self.on_fatal(str(exc))
                return
            except Exception:  # noqa: BLE001 - reconnect rather than stop serving
                log.exception("applier_failed_reconnecting")
                self.stop_event.wait(1.0)

    def verify_snapshot_position(self, consumer, tp: TopicPartition, timeout_s: float = 10.0) -> bool:
        """Check that the record a restored snapshot ended on is still on the partition.

        If the topic was deleted and recreated, the snapshot holds posts that are gone
        and its offset means nothing (seeking there could skip new posts): then the
        shard resets and replays from the start. End offsets cannot decide this (the
        embedded broker reports batch starts); the record itself can. False on reset.
        """
        state = self.state
        state.verify_position = False
        offset, post_id = state.position
        if offset == 0 or post_id is None:
            return True  # nothing to compare with (the snapshot ended on an undecodable record)
        consumer.seek(tp, offset - 1)
        found: tuple[int, int | None] | None = None
        deadline = time.monotonic() + timeout_s
        while found is None and time.monotonic() < deadline and not self.stop_event.is_set():
            records = consumer.poll(timeout_ms=200).get(tp, [])
            if records:
                ev = pb.PostVectorEvent()
                try:
                    ev.ParseFromString(records[0].value or b"")
                    found = (records[0].offset, ev.post_id)
                except DecodeError:
                    found = (records[0].offset, None)
        if found == (offset - 1, post_id):
            log.info("snapshot_position_verified", offset=offset, post_id=post_id)
            return True
        log.error("snapshot_not_on_partition", offset=offset, post_id=post_id, found=found)
        state.reset()
        return False

    def _loop(self, consumer: KafkaConsumer, tp: TopicPartition) -> None:
        catch_up = None
        if not self.caught_up:
            catch_up = CatchUp(consumer.end_offsets([tp]).get(tp) or 0)
            log.info("shard_catching_up", offset=self.state.applied_offset, listed_end=catch_up.listed_end)
        while not self.stop_event.is_set():
            polled = consumer.poll(timeout_ms=100)
            records = polled.get(tp, [])
            events: list[tuple[int, pb.PostVectorEvent]] = []
            for rec in records:
                ev = pb.PostVectorEvent()
                try:
                    ev.ParseFromString(rec.value or b"")
                except DecodeError as exc:
                    self.state.count_rejected("undecodable")
                    log.error("vector_record_undecodable", offset=rec.offset, error=str(exc))
                    continue
                events.append((rec.offset, ev))
            self.state.end_offset = consumer.highwater(tp)
            if records:
                with metrics.timed_apply(self.state.config.shard_id, len(records)):
                    self.state.apply(events, time.time())
                # Undecodable records at the tail still advance the position.
                if records[-1].offset + 1 != self.state.applied_offset:  # the tail was undecodable
                    self.state.applied_offset = records[-1].offset + 1
                    self.state.position = (self.state.applied_offset, None)
                log.debug("applied", records=len(records), offset=self.state.applied_offset)
            if catch_up is not None and catch_up.observe(consumer.position(tp), self.state.end_offset):
                catch_up = None
                self.caught_up = True
                self.on_caught_up()


class Sweeper(threading.Thread):
    """Every sweep_interval_s: evict posts past retention, start index rebuilds that are due."""

    def __init__(self, state: ShardState) -> None:
        super().__init__(name=f"sweeper-{state.config.shard_id}", daemon=True)
        self.state = state
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(self.state.config.sweep_interval_s):
            index = self.state.index
            if index is None:
                continue
            try:
                evicted = index.maintain(time.time())
            except Exception:  # noqa: BLE001 - the next sweep tries again
                log.exception("sweep_failed")
                continue
            if evicted:
                log.info("retention_evicted", evicted=evicted, indexed=len(index))


class Snapshotter(threading.Thread):
    """Writes a snapshot every snapshot_interval_s when the shard applied anything since the last."""

    def __init__(self, state: ShardState) -> None:
        super().__init__(name=f"snapshotter-{state.config.shard_id}", daemon=True)
        self.state = state
        self.directory = Path(state.config.snapshot_dir)
        self.stop_event = threading.Event()
        self.last_offset = -1
        self._lock = threading.Lock()

    def run(self) -> None:
        while not self.stop_event.wait(self.state.config.snapshot_interval_s):
            try:
                self.take("scheduled")
            except Exception:  # noqa: BLE001 - the next one tries again; the shard keeps serving
                metrics.SHARD_SNAPSHOT_FAILURES.labels(shard=str(self.state.config.shard_id)).inc()
                log.exception("snapshot_failed")

    def take(self, reason: str) -> Path | None:
        """Write one now unless nothing changed since the last. The path written, or None."""
        with self._lock:
            if self.state.applied_offset == self.last_offset:
                return None
            started = time.monotonic()
            captured = self.state.capture()
            if captured is None:
                return None
            offset, header, sections = captured
            cfg = self.state.config
            path = snapshots.write_snapshot(self.directory, cfg.shard_id, offset, header, sections)
            snapshots.prune(self.directory, cfg.shard_id, cfg.snapshot_keep)
            self.last_offset = offset
            metrics.observe_snapshot(cfg.shard_id, time.monotonic() - started, path.stat().st_size)
            log.info(
                "snapshot_written",
                reason=reason,
                path=str(path),
                offset=offset,
                posts=header["index"]["indexed"],
                bytes=path.stat().st_size,
                seconds=round(time.monotonic() - started, 3),
            )
            return path

    def load_newest(self) -> bool:
        """Restore the newest intact snapshot that fits this shard; False when there is none."""
        cfg = self.state.config
        for path in snapshots.remove_temporaries(self.directory, cfg.shard_id):
            log.warning("snapshot_temporary_removed", path=str(path))
        for path in snapshots.list_snapshots(self.directory, cfg.shard_id):
            started = time.monotonic()
            try:
                header, sections = snapshots.read_snapshot(path)
                self.state.restore(header, sections)
            except (snapshots.CorruptSnapshot, IndexConfigError, KeyError, ValueError, OSError) as exc:
                log.warning("snapshot_skipped", path=str(path), reason=str(exc))
                self.state.index = None
                continue
            self.last_offset = self.state.applied_offset
            log.info(
                "snapshot_loaded",
                path=str(path),
                offset=self.state.applied_offset,
                posts=len(self.state.index),
                seconds=round(time.monotonic() - started, 3),
            )
            return True
        log.info("snapshot_none", directory=str(self.directory))
        return False


def search_filter(filters: pb.Filters, now: float) -> SearchFilter:
    """A request's filters as the index takes them (checked: INVALID_ARGUMENT otherwise)."""
    check_filters(filters)
    return SearchFilter(
        exclude_post_ids=tuple(filters.exclude_post_ids),
        min_created_at=(now - filters.max_age_seconds) if filters.max_age_seconds else None,
        languages=tuple(l.lower() for l in filters.languages),
    )


class ShardServicer(pb_grpc.ShardServiceServicer, pb_grpc.IndexAdminServicer):
    """Search, Lookup and Stats over one replica's index.

    Until `ready` is set (serve() sets it when the applier has caught up) Search and
    Lookup fail with UNAVAILABLE, so a root asks another replica instead of taking
    a half-replayed index's answer as complete. None: ready at once (in-process use,
    where the caller applies the events itself).
    """

    def __init__(self, state: ShardState, address: str, ready: threading.Event | None = None) -> None:
        self.state = state
        self.address = address
        if ready is None:
            ready = threading.Event()
            ready.set()
        self.ready = ready
        self.searches = 0  # answered Search calls, for Stats
        self._searches_lock = threading.Lock()
        # Concurrent searches share one pass over the rows where the index can batch (torch).
        cfg = state.config
        self.batcher = (SearchBatcher(cfg.search_batch_max, name=f"search-batcher-{cfg.shard_id}")
                        if cfg.search_batch_max > 1 else None)
        metrics.watch_shard(state)  # index size, offsets and counters, read when scraped

    def _check_ready(self) -> None:
        if not self.ready.is_set():
            state = self.state
            end = "?" if state.end_offset is None else state.end_offset
            raise RpcFailure(
                grpc.StatusCode.UNAVAILABLE,
                f"shard {state.config.shard_id} replica {self.address} is not ready: catching up with its "
                f"partition (applied offset {state.applied_offset} of {end})",
            )

    def Search(self, request: pb.SearchRequest, context: grpc.ServicerContext) -> pb.SearchResponse:
        state = self.state
        with rpc_scope(context, "Search", request.request_id):
            self._check_ready()
            check_k(request.k, state.config.max_k)
            index = state.index
            vec = query_vector(request.vector, state.dimension, state.vector_dimension)
            filt = search_filter(request.filters, time.time())
            resp = pb.SearchResponse(shard=state.config.shard_id, model_version=state.model_version)
            with self._searches_lock:
                self.searches += 1
            if index is None:
                return resp
            if self.batcher is not None and index.batches_searches:
                remaining = context.time_remaining()
                try:
                    ids, scores = self.batcher.search(index, vec, request.k, filt,
                                                      timeout=remaining if remaining and remaining < 1e6 else None)
                except TimeoutError as exc:
                    raise RpcFailure(grpc.StatusCode.DEADLINE_EXCEEDED, "the search did not finish before the deadline") from exc
            else:
                ids, scores = index.search(vec, request.k, filt)
            fill_candidates(resp.candidates, ids, scores)
            resp.indexed = len(index)
            resp.dimension = index.dimension
            resp.vector_dimension = index.input_dimension
            return resp

    def Lookup(self, request: pb.LookupRequest, context: grpc.ServicerContext) -> pb.LookupResponse:
        state = self.state
        with rpc_scope(context, "Lookup", f"lookup-{request.post_id}"):
            self._check_ready()  # "not found" from a half-replayed index would be a wrong answer
            resp = pb.LookupResponse(shard=state.config.shard_id)
            if state.index is None:
                return resp
            rec = state.index.lookup(request.post_id, include_vector=request.include_vector)
            if rec is None:
                return resp
            resp.found = True
            resp.indexed_at = rec.indexed_at
            resp.created_at = rec.created_at
            resp.lang = rec.lang
            resp.model_version = rec.model_version  # the model that embedded this post, not the latest
            if rec.vector is not None:
                resp.vector.extend(rec.vector.tolist())
            return resp

    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StatsResponse:
        state = self.state
        with rpc_scope(context, "Stats"):
            cfg = state.config
            info = state.index.info() if state.index is not None else {}
            shard = pb.ShardStats(
                shard=cfg.shard_id,
                address=self.address,
                reachable=True,
                indexed=info.get("indexed", 0),
                dimension=state.dimension,
                vector_dimension=state.vector_dimension,
                index_type=info.get("index_type")
                or (cfg.index_factory if cfg.index_backend == "faiss" else f"{cfg.index_backend}-exact"),
                index_state=info.get("state", ""),
                index_device=info.get("index_device", ""),
                buffered=info.get("buffered", 0),
                tombstones=info.get("tombstones", 0),
                evicted=info.get("evicted", 0),
                rebuilds=info.get("rebuilds", 0),
                retention_s=cfg.retention_s,
                upserts=state.upserts,
                deletes=state.deletes,
                rejected=state.rejected,
                model_version=state.model_version,
                error=info.get("error", ""),
                searches=self.searches,
                ready=self.ready.is_set(),
                end_offset=state.end_offset or 0,
            )
            shard.applied.add(topic=state.topic, partition=state.config.shard_id, offset=state.applied_offset)
            return pb.StatsResponse(shards=[shard], total_indexed=shard.indexed, model_version=state.model_version)


def serve(kafka: KafkaConfig, config: ShardConfig, stop: threading.Event, security: GrpcSecurityConfig | None = None) -> None:
    if config.shard_id >= config.num_shards:
        raise ValueError(f"shard_id {config.shard_id} is outside num_shards={config.num_shards}")
    structlog.contextvars.bind_contextvars(shard=config.shard_id)
    state = ShardState(config=config, topic=kafka.vectors_topic)
    snapshotter = Snapshotter(state) if config.snapshot_dir else None
    if snapshotter is not None:
        snapshotter.load_newest()  # then the applier replays the partition from its offset
    if config.dimension and state.index is None:
        state._ensure_index(config.dimension)  # a bad index configuration fails here, before serving
    started = time.monotonic()
    address = f"{config.host}:{config.port}"
    ready = threading.Event()
    servicer = ShardServicer(state, address, ready)
    server, health_servicer, port = build_server(
        config.host,
        config.port,
        config.grpc_workers,
        [
            lambda s: pb_grpc.add_ShardServiceServicer_to_server(servicer, s),
            lambda s: pb_grpc.add_IndexAdminServicer_to_server(servicer, s),
        ],
        SERVICE_NAMES,
        connection_age_options(config.max_connection_age_s),
        security,
        max_concurrent_rpcs=config.max_concurrent_rpcs or None,
    )
    servicer.address = f"{config.host}:{port}"
    fatal: list[str] = []

    def on_fatal(reason: str) -> None:
        fatal.append(reason)
        stop.set()

    applier = PartitionApplier(
        kafka,
        state,
        on_caught_up=lambda: (
            ready.set(),
            set_serving(health_servicer, SERVICE_NAMES, True),
            log.info(
                "shard_ready",
                indexed=len(state.index) if state.index else 0,
                offset=state.applied_offset,
                seconds=round(time.monotonic() - started, 3),
            ),
        ),
        on_fatal=on_fatal,
    )
    sweeper = Sweeper(state)
    server.start()
    applier.start()
    sweeper.start()
    if snapshotter is not None:
        snapshotter.start()
    log.info(
        "shard_listening",
        address=servicer.address,
        partition=config.shard_id,
        topic=kafka.vectors_topic,
        index_factory=config.index_factory,
        index_backend=config.index_backend,
        serve_dimension=config.serve_dimension,
        retention_s=config.retention_s,
    )
    stop.wait()
    set_serving(health_servicer, SERVICE_NAMES, False)
    applier.stop_event.set()
    sweeper.stop_event.set()
    server.stop(grace=2).wait()
    if servicer.batcher is not None:
        servicer.batcher.close()
    applier.join(timeout=5)
    if snapshotter is not None and not fatal:
        snapshotter.stop_event.set()
        try:
            snapshotter.take("shutdown")
        except Exception:  # noqa: BLE001 - the last scheduled snapshot still stands
            log.exception("snapshot_failed")
    log.info("shard_stopped", upserts=state.upserts, deletes=state.deletes)
    if fatal:
        raise SystemExit(f"shard {config.shard_id} cannot serve: {fatal[0]}")
