"""Root retrieval server: stateless fan-out to every shard under the caller's deadline, then merge.

A shard that fails or misses the deadline costs completeness, not the answer:
the reply carries the other shards' merged top-K with partial=true.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import grpc
import numpy as np
import structlog

from feedret import metrics
from feedret.config import KafkaConfig, RootConfig
from feedret.merge import ShardHits, merge_topk
from feedret.routing import shard_of
from feedret.server.grpc_common import (
    InvalidRequest,
    RpcFailure,
    build_server,
    check_filters,
    check_k,
    query_vector,
    rpc_scope,
    set_serving,
)
from feedret.v1 import feedret_pb2 as pb
from feedret.v1 import feedret_pb2_grpc as pb_grpc

log = structlog.get_logger(__name__)

SERVICE_NAMES = (
    pb.DESCRIPTOR.services_by_name["RetrievalService"].full_name,
    pb.DESCRIPTOR.services_by_name["IndexAdmin"].full_name,
)

# Errors that mean "this shard could not answer", as opposed to "the request is wrong".
_SHARD_DOWN = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


class ConsumerOffsets:
    """Committed offsets of the embedding consumer group, read through the Kafka admin API."""

    def __init__(self, kafka: KafkaConfig) -> None:
        self.kafka = kafka
        self._admin = None
        self._lock = threading.Lock()

    def read(self) -> list[pb.PartitionOffset]:
        from kafka import KafkaAdminClient  # imported late: Stats is rare, start-up is not

        with self._lock:
            try:
                if self._admin is None:
                    self._admin = KafkaAdminClient(
                        bootstrap_servers=self.kafka.bootstrap_servers,
                        client_id="feedret-root-admin",
                        request_timeout_ms=3000,
                    )
                offsets = self._admin.list_group_offsets(self.kafka.consumer_group)
            except Exception as exc:  # noqa: BLE001 - Stats degrades, it does not fail
                log.warning("consumer_offsets_unavailable", error=str(exc))
                self._admin = None
                return []
        group = offsets.get(self.kafka.consumer_group, offsets) if isinstance(offsets, dict) else {}
        return [
            pb.PartitionOffset(topic=tp.topic, partition=tp.partition, offset=om.offset)
            for tp, om in sorted(group.items(), key=lambda kv: (kv[0].topic, kv[0].partition))
        ]


class RootServicer(pb_grpc.RetrievalServiceServicer, pb_grpc.IndexAdminServicer):
    def __init__(self, config: RootConfig, kafka: KafkaConfig) -> None:
        self.config = config
        self.addresses = config.shard_list()
        if not self.addresses:
            raise ValueError("FEEDRET_SHARD_ADDRESSES names no shard")
        opts = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        self.shards = [
            pb_grpc.ShardServiceStub(grpc.insecure_channel(a, options=opts)) for a in self.addresses
        ]
        self.admins = [pb_grpc.IndexAdminStub(grpc.insecure_channel(a, options=opts)) for a in self.addresses]
        self.member = pb_grpc.MemberEmbeddingServiceStub(
            grpc.insecure_channel(config.member_address, options=opts)
        )
        self.consumer_offsets = ConsumerOffsets(kafka)
        # Shard calls are blocking calls made on these long-lived threads. A grpc future
        # (`stub.Search.future`) on a channel with no call in flight starts a new polling
        # thread and waits for it to run, i.e. a thread per shard per request: on a busy
        # 2-core machine that cost ~2 ms of a request (benchmarks/results/search_latency_1m.md).
        self._shard_calls = ThreadPoolExecutor(
            max_workers=max(4, config.grpc_workers * len(self.addresses)), thread_name_prefix="shard-call"
        )
        # Learned from shard answers so wrong-width vectors are refused before fan-out:
        # the width the shards serve, and the model's full width when they serve a
        # Matryoshka prefix of it (such queries are truncated here, before fan-out).
        self.dimension = 0
        self.vector_dimension = 0
        self.model_version = ""

    # ------------------------------------------------------------ Retrieve

    def _deadline(self, context: grpc.ServicerContext) -> float:
        remaining = context.time_remaining()
        if remaining is None or remaining > 1e6:  # no deadline set by the caller
            remaining = self.config.default_timeout_s
        return time.monotonic() + max(remaining - self.config.deadline_margin_s, 0.0)

    def _member_vector(
        self, request: pb.RetrieveRequest, rid: str, deadline: float, context: grpc.ServicerContext
    ) -> tuple[np.ndarray, str]:
        if not request.member.member_id:
            raise InvalidRequest("member.member_id is required")
        try:
            reply = self.member.Embed(
                pb.EmbedRequest(member=request.member, request_id=rid),
                timeout=max(deadline - time.monotonic(), 0.001),
            )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidRequest(exc.details()) from exc
            # Without a member vector there is nothing to search with: say why, keep the code.
            code = exc.code() if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED else grpc.StatusCode.UNAVAILABLE
            raise RpcFailure(code, f"member embedding service ({self.config.member_address}) failed: {exc.details()}") from exc
        return np.asarray(reply.vector, dtype=np.float32), reply.model_version

    def Retrieve(self, request: pb.RetrieveRequest, context: grpc.ServicerContext) -> pb.RetrieveResponse:
        with rpc_scope(context, "Retrieve", request.request_id) as rid:
            deadline = self._deadline(context)
            check_k(request.k, self.config.max_k)
            check_filters(request.filters)
            which = request.WhichOneof("query")
            if which is None:
                raise InvalidRequest("a query needs either member or vector")
            if which == "vector":
                vec = query_vector(request.vector.values, self.dimension, self.vector_dimension)
                model_version = self.model_version
            else:
                vec, model_version = self._member_vector(request, rid, deadline, context)
                vec = query_vector(vec, self.dimension, self.vector_dimension)
            if self.dimension and len(vec) > self.dimension:
                vec = vec[: self.dimension]  # full width, the shards serve a prefix (they re-normalise)
            hits, failed = self._fan_out(vec, request, rid, deadline)
            if not hits:
                # No shard answered: an empty list would read as "nothing to show".
                raise RpcFailure(
                    grpc.StatusCode.UNAVAILABLE if time.monotonic() < deadline else grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"no shard answered (failed: {failed})",
                )
            merged = merge_topk(hits, request.k)
            resp = pb.RetrieveResponse(
                partial=bool(failed),
                model_version=model_version or self.model_version,
                failed_shards=failed,
                request_id=rid,
            )
            resp.candidates.post_ids.extend(merged.post_ids.tolist())
            resp.candidates.scores.extend(merged.scores.tolist())
            resp.candidates.shards.extend(merged.shards.tolist())
            metrics.observe_retrieve(len(merged.post_ids), failed)
            log.info(
                "retrieved",
                query=which,
                k=request.k,
                returned=len(merged.post_ids),
                partial=bool(failed),
                failed_shards=failed,
            )
            return resp

    def _start_search(self, shard: int, search: pb.SearchRequest, deadline: float) -> Future:
        """One shard's Search, started; the future's result() raises grpc.RpcError as the call would.

        The timeout is taken from the deadline when the call starts, not when it was queued.
        """
        stub = self.shards[shard]
        return self._shard_calls.submit(lambda: stub.Search(search, timeout=max(deadline - time.monotonic(), 0.001)))

    def _fan_out(
        self, vec: np.ndarray, request: pb.RetrieveRequest, rid: str, deadline: float
    ) -> tuple[list[ShardHits], list[int]]:
        search = pb.SearchRequest(k=request.k, filters=request.filters, request_id=rid)
        search.vector.extend(vec.tolist())
        calls = [self._start_search(shard, search, deadline) for shard in range(len(self.shards))]
        hits: list[ShardHits] = []
        failed: list[int] = []
        for shard, call in enumerate(calls):
            try:
                reply: pb.SearchResponse = call.result()
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    for other in calls:
                        other.cancel()
                    raise InvalidRequest(exc.details()) from exc
                failed.append(shard)
                metrics.ROOT_SHARD_FAILURES.labels(shard=str(shard), code=exc.code().name).inc()
                log.warning("shard_failed", shard=shard, code=exc.code().name, details=exc.details())
                continue
            if reply.dimension:
                self.dimension = reply.dimension
                self.vector_dimension = reply.vector_dimension
            if reply.model_version:
                self.model_version = reply.model_version
            hits.append(
                ShardHits(
                    shard=shard,
                    post_ids=np.asarray(reply.candidates.post_ids, dtype=np.int64),
                    scores=np.asarray(reply.candidates.scores, dtype=np.float32),
                )
            )
        return hits, failed

    # ------------------------------------------------------------ IndexAdmin

    def Lookup(self, request: pb.LookupRequest, context: grpc.ServicerContext) -> pb.LookupResponse:
        with rpc_scope(context, "Lookup", f"lookup-{request.post_id}"):
            if request.post_id < 0:
                raise InvalidRequest(f"post_id must be >= 0, got {request.post_id}")
            shard = shard_of(request.post_id, len(self.admins))
            try:
                reply = self.admins[shard].Lookup(request, timeout=self.config.default_timeout_s)
            except grpc.RpcError as exc:
                raise RpcFailure(
                    grpc.StatusCode.UNAVAILABLE,
                    f"shard {shard} ({self.addresses[shard]}) did not answer: {exc.details()}",
                ) from exc
            reply.shard = shard
            return reply

    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StatsResponse:
        with rpc_scope(context, "Stats"):
            calls = [a.Stats.future(pb.StatsRequest(), timeout=self.config.default_timeout_s) for a in self.admins]
            resp = pb.StatsResponse()
            for shard, call in enumerate(calls):
                try:
                    part = call.result().shards[0]
                    part.shard = shard
                except grpc.RpcError as exc:
                    part = pb.ShardStats(shard=shard, reachable=False, error=exc.details() or exc.code().name)
                part.address = self.addresses[shard]
                resp.shards.append(part)
                resp.total_indexed += part.indexed
                resp.model_version = resp.model_version or part.model_version
            resp.consumer_offsets.extend(self.consumer_offsets.read())
            return resp


def serve(kafka: KafkaConfig, config: RootConfig, stop: threading.Event) -> None:
    servicer = RootServicer(config, kafka)
    server, health_servicer, port = build_server(
        config.host,
        config.port,
        config.grpc_workers,
        [
            lambda s: pb_grpc.add_RetrievalServiceServicer_to_server(servicer, s),
            lambda s: pb_grpc.add_IndexAdminServicer_to_server(servicer, s),
        ],
        SERVICE_NAMES,
    )
    server.start()
    # The root holds no state: it can serve as soon as it listens.
    set_serving(health_servicer, SERVICE_NAMES, True)
    log.info("root_listening", address=f"{config.host}:{port}", shards=servicer.addresses)
    stop.wait()
    set_serving(health_servicer, SERVICE_NAMES, False)
    server.stop(grace=2).wait()
    log.info("root_stopped")
