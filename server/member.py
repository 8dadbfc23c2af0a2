"""Member embedding server: member in, vector out, cached per (member id, session id) with a TTL.

Within one session the member's vector does not change, so a feed that pages
through results pays for one forward pass per session, not per page.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol, Sequence

import grpc
import numpy as np
import structlog
from cachetools import TTLCache

from feedret import metrics
from feedret.config import GrpcSecurityConfig, MemberConfig
from feedret.members import MemberProfile
from feedret.server.grpc_common import InvalidRequest, build_server, rpc_scope, set_serving
from feedret.v1 import feedret_pb2 as pb
from feedret.v1 import feedret_pb2_grpc as pb_grpc

log = structlog.get_logger(__name__)

SERVICE_NAMES = (pb.DESCRIPTOR.services_by_name["MemberEmbeddingService"].full_name,)


class MemberEmbedder(Protocol):
    model_version: str

    def embed_members(self, members: Sequence[MemberProfile]) -> np.ndarray: ...


class MemberServicer(pb_grpc.MemberEmbeddingServiceServicer):
    def __init__(self, config: MemberConfig, encoder: MemberEmbedder) -> None:
        self.config = config
        self.encoder = encoder
        self._cache: TTLCache = TTLCache(maxsize=config.cache_max_entries, ttl=config.cache_ttl_s)
        self._cache_lock = threading.Lock()
        # On a CPU, one forward pass at a time is faster than several fighting for the cores.
        self._model_lock = threading.Lock()
        metrics.MEMBER_CACHE_ENTRIES.set_function(lambda: len(self._cache))

    def Embed(self, request: pb.EmbedRequest, context: grpc.ServicerContext) -> pb.EmbedResponse:
        with rpc_scope(context, "Embed", request.request_id):
            if not request.HasField("member") or not request.member.member_id:
                raise InvalidRequest("member.member_id is required")
            member = MemberProfile.from_proto(request.member)
            key = (member.member_id, member.session_id)
            with self._cache_lock:
                hit = self._cache.get(key) if member.session_id else None
            metrics.observe_member_cache(hit=hit is not None, cacheable=bool(member.session_id))
            if hit is not None:
                log.debug("member_cache_hit", member_id=member.member_id)
                return pb.EmbedResponse(vector=hit, model_version=self.encoder.model_version, cached=True)
            started = time.perf_counter()
            with self._model_lock, metrics.MEMBER_EMBED_SECONDS.time():
                vector = self.encoder.embed_members([member])[0].astype(np.float32).tolist()
            if member.session_id:
                with self._cache_lock:
                    self._cache[key] = vector
            log.info(
                "member_embedded",
                member_id=member.member_id,
                session_id=member.session_id,
                activity=len(member.recent_activity),
                ms=round((time.perf_counter() - started) * 1000, 2),
            )
            return pb.EmbedResponse(vector=vector, model_version=self.encoder.model_version, cached=False)


def serve(config: MemberConfig, encoder: MemberEmbedder, stop: threading.Event, security: GrpcSecurityConfig | None = None) -> None:
    servicer = MemberServicer(config, encoder)
    server, health_servicer, port = build_server(
        config.host,
        config.port,
        config.grpc_workers,
        [lambda s: pb_grpc.add_MemberEmbeddingServiceServicer_to_server(servicer, s)],
        SERVICE_NAMES,
        security=security,
    )
    server.start()
    set_serving(health_servicer, SERVICE_NAMES, True)
    log.info("member_listening", address=f"{config.host}:{port}", model_version=encoder.model_version)
    stop.wait()
    set_serving(health_servicer, SERVICE_NAMES, False)
    server.stop(grace=2).wait()
    log.info("member_stopped")
