"""Shard server: one replica of a shard, serving Search, Lookup and Stats over gRPC.

The replica itself (its index and offsets, the apply of the partition's vector
events, the applier, sweeper and snapshotter threads) is feedret.indexer's
(replica, applier, upkeep), with no gRPC in it. This module adds the servicer
and `serve`, which starts a replica, reports SERVING once it has caught up with
its partition, and stops it.
"""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import structlog

from feedret.indexer import metrics
from feedret.config import GrpcSecurityConfig, KafkaConfig, ShardConfig
from feedret.indexer.applier import PartitionApplier
from feedret.indexer.batcher import SearchBatcher
from feedret.indexer.replica import ShardState
from feedret.indexer.shard_index import IndexInfo, SearchFilter
from feedret.indexer.upkeep import Snapshotter, Sweeper
from feedret.server.grpc_common import (
    RpcFailure,
    build_server,
    check_filters,
    check_k,
    connection_age_options,
    deadline_remaining,
    fill_candidates,
    query_vector,
    rpc_scope,
    serving,
    set_serving,
)
from feedret.v1 import feedret_pb2 as pb
from feedret.v1 import feedret_pb2_grpc as pb_grpc

log = structlog.get_logger(__name__)

SERVICE_NAMES = (
    pb.DESCRIPTOR.services_by_name["ShardService"].full_name,
    pb.DESCRIPTOR.services_by_name["IndexAdmin"].full_name,
)


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
            resp = pb.SearchResponse(shard=state.config.shard_id, model_version=state.serving_model)
            with self._searches_lock:
                self.searches += 1
            if index is None:
                return resp
            if self.batcher is not None and index.batches_searches:
                # No deadline, or one already past (0 s left: the caller has stopped waiting): no timeout.
                timeout = deadline_remaining(context) or None
                try:
                    ids, scores = self.batcher.search(index, vec, request.k, filt, timeout=timeout)
                except TimeoutError as exc:
                    raise RpcFailure(grpc.StatusCode.DEADLINE_EXCEEDED, "the search did not finish before the deadline") from exc
            else:
                ids, scores = index.search(vec, request.k, filt)
            fill_candidates(resp.candidates, ids, scores)
            resp.indexed = len(index)
            resp.dimension = index.dimension
            resp.vector_dimension = index.input_dimension
            return resp

    def SearchBatch(self, request: pb.SearchBatchRequest, context: grpc.ServicerContext) -> pb.SearchBatchResponse:
        """Every search of the batch in one index call where the widths agree (the torch store
        reads its rows once for all of them), each answered as Search would answer it."""
        state = self.state
        with rpc_scope(context, "SearchBatch", request.searches[0].request_id if request.searches else ""):
            self._check_ready()
            index = state.index
            now = time.time()
            vecs, ks, filts = [], [], []
            for search in request.searches:
                ks.append(check_k(search.k, state.config.max_k))
                vecs.append(query_vector(search.vector, state.dimension, state.vector_dimension))
                filts.append(search_filter(search.filters, now))
            with self._searches_lock:
                self.searches += len(vecs)
            out = pb.SearchBatchResponse()
            if index is None:
                for _ in vecs:
                    out.results.add(shard=state.config.shard_id, model_version=state.serving_model)
                return out
            if vecs and len({len(v) for v in vecs}) == 1:
                found = index.search_batch(np.stack(vecs), ks, filts)
            else:
                found = [index.search(v, k, f) for v, k, f in zip(vecs, ks, filts)]
            for ids, scores in found:
                resp = out.results.add(shard=state.config.shard_id, model_version=state.serving_model,
                                       indexed=len(index), dimension=index.dimension,
                                       vector_dimension=index.input_dimension)
                fill_candidates(resp.candidates, ids, scores)
            return out

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
            info = state.index.info() if state.index is not None else IndexInfo()
            shard = pb.ShardStats(
                shard=cfg.shard_id,
                address=self.address,
                reachable=True,
                indexed=info.indexed,
                dimension=state.dimension,
                vector_dimension=state.vector_dimension,
                index_type=info.index_type
                or (cfg.index_factory if cfg.index_backend == "faiss" else f"{cfg.index_backend}-exact"),
                index_state=info.state,
                index_device=info.index_device,
                vector_codec=info.vector_codec,
                vector_bytes=info.store_bytes,
                buffered=info.buffered,
                tombstones=info.tombstones,
                evicted=info.evicted,
                rebuilds=info.rebuilds,
                retention_s=cfg.retention_s,
                upserts=state.upserts,
                deletes=state.deletes,
                rejected=state.rejected,
                model_version=state.serving_model,
                error=info.error,
                searches=self.searches,
                ready=self.ready.is_set(),
                end_offset=state.end_offset or 0,
            )
            shard.applied.add(topic=state.topic, partition=state.config.shard_id, offset=state.applied_offset)
            return pb.StatsResponse(shards=[shard], total_indexed=shard.indexed, model_version=state.serving_model)


def serve(kafka: KafkaConfig, config: ShardConfig, stop: threading.Event, security: GrpcSecurityConfig | None = None) -> None:
    """Run one replica of shard config.shard_id until `stop` is set.

    Restores the newest snapshot (when snapshot_dir is set), starts the gRPC server
    NOT_SERVING, and the applier, sweeper and snapshotter threads; SERVING once the
    applier has caught up with the partition. SystemExit when the index configuration
    cannot take the partition's vectors.
    """
    if config.shard_id >= config.num_shards:
        raise ValueError(f"shard_id {config.shard_id} is outside num_shards={config.num_shards}")
    structlog.contextvars.bind_contextvars(shard=config.shard_id)
    state = ShardState(config=config, topic=kafka.vectors_topic)
    snapshotter = Snapshotter(state) if config.snapshot_dir else None
    if snapshotter is not None:
        snapshotter.load_newest()  # then the applier replays the partition from its offset
    if config.dimension and state.index is None:
        state.ensure_index(config.dimension)  # a bad index configuration fails here, before serving
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

    def on_caught_up() -> None:
        ready.set()
        set_serving(health_servicer, SERVICE_NAMES, True)
        log.info(
            "shard_ready",
            indexed=len(state.index) if state.index else 0,
            offset=state.applied_offset,
            seconds=round(time.monotonic() - started, 3),
        )

    def on_fatal(reason: str) -> None:
        fatal.append(reason)
        stop.set()

    applier = PartitionApplier(kafka, state, on_caught_up=on_caught_up, on_fatal=on_fatal)
    sweeper = Sweeper(state)
    with serving(server, health_servicer, SERVICE_NAMES, ready=False):  # SERVING once caught up
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
        applier.stop_event.set()
        sweeper.stop_event.set()
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
