"""Member embedding server: member in, vector out, cached per (member id, session id) with a TTL.

Within one session the member's vector does not change, so a feed that pages
through results pays for one forward pass per session, not per page.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass
from typing import Protocol, Sequence

import grpc
import numpy as np
import structlog
from cachetools import TTLCache

from feedret.server import member_metrics
from feedret.config import GrpcSecurityConfig, MemberConfig
from feedret.members import MemberProfile
from feedret.microbatch import MicroBatcher
from feedret.server.grpc_common import (
    InvalidRequest,
    RpcFailure,
    build_server,
    check_member,
    deadline_remaining,
    rpc_scope,
    serving,
)
from feedret.v1 import feedret_pb2 as pb
from feedret.v1 import feedret_pb2_grpc as pb_grpc

log = structlog.get_logger(__name__)

SERVICE_NAMES = (pb.DESCRIPTOR.services_by_name["MemberEmbeddingService"].full_name,)


class MemberEmbedder(Protocol):
    model_version: str

    def embed_members(self, members: Sequence[MemberProfile]) -> np.ndarray: ...


@dataclass
class _Flight:
    """One member's forward pass, queued or running, and how many requests wait for it."""

    future: Future
    waiters: int = 1


class MemberServicer(pb_grpc.MemberEmbeddingServiceServicer):
    def __init__(self, config: MemberConfig, encoder: MemberEmbedder) -> None:
        self.config = config
        self.encoder = encoder
        self._cache: TTLCache = TTLCache(maxsize=config.cache_max_entries, ttl=config.cache_ttl_s)
        # The cache and the flights. Reentrant: a future's callbacks (`_landed`) run in the
        # thread that completes or cancels it, which may hold the lock already.
        self._lock = threading.RLock()
        self._flights: dict[tuple[str, str], _Flight] = {}
        # One worker runs every forward pass (on a CPU, one at a time is faster than several
        # fighting for the cores); misses that queue behind a pass go together in the next.
        self.batcher: MicroBatcher[MemberProfile, list[float]] = MicroBatcher(
            self._embed, config.embed_batch_max, name="member-embed"
        )
        member_metrics.MEMBER_CACHE_ENTRIES.set_function(lambda: len(self._cache))

    def close(self) -> None:
        self.batcher.close()

    def Embed(self, request: pb.EmbedRequest, context: grpc.ServicerContext) -> pb.EmbedResponse:
        with rpc_scope(context, "Embed", request.request_id):
            if not request.HasField("member") or not request.member.member_id:
                raise InvalidRequest("member.member_id is required")
            # Before anything is copied or queued: an oversized member would hold up every
            # member in its forward pass (tokenizing 5 MB took seconds).
            check_member(request.member, self.config)
            member = MemberProfile.from_proto(request.member)
            started = time.perf_counter()
            vector, how = self._vector(member, deadline_remaining(context))
            member_metrics.observe_member_cache(hit=how == "hit", cacheable=bool(member.session_id))
            if how == "hit":
                log.debug("member_cache_hit", member_id=member.member_id)
            else:
                log.info(
                    "member_embedded",
                    member_id=member.member_id,
                    session_id=member.session_id,
                    activity=len(member.recent_activity),
                    shared=how == "shared",
                    ms=round((time.perf_counter() - started) * 1000, 2),
                )
            return pb.EmbedResponse(vector=vector, model_version=self.encoder.model_version, cached=how == "hit")

    def _vector(self, member: MemberProfile, timeout: float | None) -> tuple[list[float], str]:
        """The member's vector and where it came from: "hit" (cache), "shared" (another
        request's pass for the same session) or "embedded"."""
        if not member.session_id:  # no session: nothing says two requests describe the same member
            return self._await(_Flight(self.batcher.submit(member)), timeout), "embedded"
        key = (member.member_id, member.session_id)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                return hit, "hit"
            flight = self._flights.get(key)
            if flight is not None:  # a page fetched in parallel, or a retry: one pass for both
                flight.waiters += 1
                how = "shared"
            else:
                flight = self._flights[key] = _Flight(self.batcher.submit(member))
                flight.future.add_done_callback(lambda fut: self._landed(key, flight))
                how = "embedded"
        return self._await(flight, timeout), how

    def _landed(self, key: tuple[str, str], flight: _Flight) -> None:
        # The cache is filled here, not by the waiting handler, so a pass whose callers
        # gave up still serves the session's next page.
        with self._lock:
            if self._flights.get(key) is flight:
                del self._flights[key]
            if not flight.future.cancelled() and flight.future.exception() is None:
                self._cache[key] = flight.future.result()

    def _await(self, flight: _Flight, timeout: float | None) -> list[float]:
        """The flight's vector; DEADLINE_EXCEEDED after `timeout`, dropping the pass if it is
        still queued and this was its last waiter."""
        try:
            return flight.future.result(timeout=timeout)
        except (TimeoutError, CancelledError) as exc:
            with self._lock:  # held through cancel, so no request joins a flight being dropped
                flight.waiters -= 1
                if flight.waiters == 0:
                    flight.future.cancel()  # if still queued: nobody wants it any more
            raise RpcFailure(grpc.StatusCode.DEADLINE_EXCEEDED, "the member was not embedded before the deadline") from exc

    def _embed(self, members: list[MemberProfile]) -> list[list[float]]:
        with member_metrics.MEMBER_EMBED_SECONDS.time():
            vectors = self.encoder.embed_members(members)
        member_metrics.MEMBER_EMBED_BATCH.observe(len(members))
        return vectors.astype(np.float32).tolist()


def serve(config: MemberConfig, encoder: MemberEmbedder, stop: threading.Event, security: GrpcSecurityConfig | None = None) -> None:
    servicer = MemberServicer(config, encoder)
    # Handlers mostly wait on the batcher: a full batch can only queue behind a running
    # one when there are threads for both (with 8, passes alternated at 4 members each).
    workers = max(config.grpc_workers, 2 * config.embed_batch_max)
    server, health_servicer, port = build_server(
        config.host,
        config.port,
        workers,
        [lambda s: pb_grpc.add_MemberEmbeddingServiceServicer_to_server(servicer, s)],
        SERVICE_NAMES,
        security=security,
        max_concurrent_rpcs=config.max_concurrent_rpcs or workers,
    )
    with serving(server, health_servicer, SERVICE_NAMES):
        log.info("member_listening", address=f"{config.host}:{port}", model_version=encoder.model_version,
                 max_concurrent_rpcs=config.max_concurrent_rpcs or workers)
        stop.wait()
    servicer.close()
    log.info("member_stopped")
