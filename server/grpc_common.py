"""What every feedret gRPC server shares: health, reflection, request validation."""

from __future__ import annotations

import contextlib
import math
import threading
import time
import uuid
from concurrent import futures
from typing import Callable, Iterator, Sequence

import grpc
import numpy as np
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from feedret import members
from feedret.config import GrpcSecurityConfig, MemberLimits
from feedret.grpc_client import MESSAGE_SIZE_OPTIONS
from feedret.logging import Throttle, bound
from feedret.server.grpc_handlers import HandlerCache
from feedret.server.grpc_metrics import GrpcMetricsInterceptor
from feedret.server.grpc_auth import BearerAuthInterceptor, TokenFile
from feedret.server.grpc_security import server_credentials
from feedret.v1 import feedret_pb2 as pb

log = structlog.get_logger(__name__)

# Threads a server with a concurrency limit has beyond it: they refuse the calls over
# the limit and answer health checks and reflection without waiting behind the others.
SPARE_THREADS = 4


class InvalidRequest(ValueError):
    """The caller's fault: becomes INVALID_ARGUMENT with this message."""


class RpcFailure(Exception):
    """Ends an RPC with this status code and message (e.g. UNAVAILABLE when no shard answered).

    Handlers raise it instead of calling context.abort(), whose exception is
    indistinguishable from a bug once it leaves the handler.
    """

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class ServerGroup:
    """The server and, with TLS and a health port, the plaintext health-only server beside it."""

    def __init__(self, main: grpc.Server, health_only: grpc.Server | None = None) -> None:
        self.main = main
        self.health_only = health_only

    def start(self) -> None:
        self.main.start()
        if self.health_only is not None:
            self.health_only.start()

    def stop(self, grace: float | None):
        """Stops both; returns the main server's event, set once it has stopped."""
        if self.health_only is not None:
            self.health_only.stop(grace)
        return self.main.stop(grace)

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self.main.wait_for_termination(timeout)


class _Undecodable:
    """A request body that did not parse, carried to the handler so it can say so."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


class DecodeGuard(grpc.ServerInterceptor):
    """A body that does not parse as the request gets INVALID_ARGUMENT saying why.

    grpc-python answers a failed deserialisation itself, with INTERNAL "Exception
    deserializing request!", which reads as a server bug and, counted as one, sets off
    the wrong alerts. Here the deserializer never raises: the failure reaches the
    handler, which refuses the call as the caller's mistake. Unary calls only (all of
    feedret's); health's Watch stream and reflection keep grpc's own handling.
    """

    def __init__(self) -> None:
        self._handlers = HandlerCache(self._guard)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None or handler.request_deserializer is None:
            return handler
        return self._handlers.get(handler_call_details.method, handler)

    @staticmethod
    def _guard(method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        decode, behavior = handler.request_deserializer, handler.unary_unary

        def deserialize(data: bytes):
            try:
                return decode(data)
            except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError, or a recursion limit
                return _Undecodable(f"{type(exc).__name__}: {exc}")

        def guarded(request, context):
            if isinstance(request, _Undecodable):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"the request body is not a valid message for {method}: {request.error}")
            return behavior(request, context)

        return grpc.unary_unary_rpc_method_handler(
            guarded, request_deserializer=deserialize, response_serializer=handler.response_serializer
        )


class ConcurrencyLimit(grpc.ServerInterceptor):
    """At most `limit` calls of `services` handled at once; one more ends at once with RESOURCE_EXHAUSTED.

    Not grpc.server(maximum_concurrent_rpcs=): that counts and refuses every call, so
    a flood of queries would refuse the kubelet's health checks too and get a busy pod
    restarted. Here health checks and reflection are neither counted nor refused. A
    call takes its slot where it starts running and gives it back where it ends, so
    no path (a caller that gives up while the call is queued, a request that does not
    parse) leaks one; build_server gives the server SPARE_THREADS threads beyond the
    limit, so a call over it is refused as it arrives, not after waiting for a thread.
    """

    def __init__(self, limit: int, services: Sequence[str]) -> None:
        if limit < 1:
            raise ValueError(f"a concurrency limit must be at least 1, got {limit}")
        self.limit = limit
        self._prefixes = tuple(f"/{name}/" for name in services)
        self._lock = threading.Lock()
        self._active = 0
        self._log = Throttle(1.0)  # a flood must not flood the logs too
        self._handlers = HandlerCache(self._limited)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        # feedret's methods are all unary; health's Watch stream and reflection pass.
        if handler is None or handler.unary_unary is None or not method.startswith(self._prefixes):
            return handler
        return self._handlers.get(method, handler)

    def _limited(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        behavior = handler.unary_unary

        def limited(request, context):
            if not self._enter(method):
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the server is handling its limit of {self.limit} concurrent calls "
                    "(FEEDRET_MAX_CONCURRENT_RPCS): retry after a backoff, or on another replica",
                )
            try:
                return behavior(request, context)
            finally:
                with self._lock:
                    self._active -= 1

        return grpc.unary_unary_rpc_method_handler(
            limited, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )

    def _enter(self, method: str) -> bool:
        with self._lock:
            if self._active < self.limit:
                self._active += 1
                return True
        # At most a line a second; every refusal is counted in
        # grpc_server_handled_total{grpc_code="RESOURCE_EXHAUSTED"}.
        held = self._log.allow()
        if held is not None:
            log.warning("load_shed", method=method, refused=held + 1, limit=self.limit)
        return False


def build_server(
    host: str,
    port: int,
    workers: int,
    register: Sequence[Callable[[grpc.Server], None]],
    service_names: Sequence[str],
    options: Sequence[tuple[str, object]] = (),
    security: GrpcSecurityConfig | None = None,
    max_concurrent_rpcs: int | None = None,
) -> tuple[ServerGroup, health.HealthServicer, int]:
    """A server with our services plus grpc.health.v1 and reflection. Returns the bound port.

    `options`: further grpc server channel arguments. `security` (enabled): the port speaks
    TLS only, and `security.health_port`, when set, serves the same health status in
    plaintext for the kubelet's probes, with no other service on it; with
    `security.auth_tokens_file`, calls need one of its bearer tokens (health and reflection excepted).
    `max_concurrent_rpcs`: at most that many calls of `service_names` at once, the rest
    refused with RESOURCE_EXHAUSTED (`ConcurrencyLimit`); None: no limit.

    Every RPC is counted and timed for Prometheus (feedret.server.grpc_metrics).
    """
    limit = None if max_concurrent_rpcs is None else ConcurrencyLimit(max_concurrent_rpcs, service_names)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers if limit is None else max(workers, limit.limit + SPARE_THREADS)),
        # Metrics first: calls refused for their token or over the limit are counted too.
        # The limit after the token: callers without one take no slot.
        interceptors=[GrpcMetricsInterceptor()]
        + ([BearerAuthInterceptor(TokenFile(security.auth_tokens_file))] if security is not None and security.auth_tokens_file else [])
        + ([limit] if limit is not None else [])
        + [DecodeGuard()],
        options=[
            *MESSAGE_SIZE_OPTIONS,
            ("grpc.so_reuseport", 0),
            *options,
        ],
    )
    for add in register:
        add(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    if security is not None and security.enabled:
        bound = server.add_secure_port(f"{host}:{port}", server_credentials(security))
    else:
        bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"could not bind {host}:{port}")
    health_only = None
    if security is not None and security.enabled and security.health_port:
        health_only = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_only)
        if health_only.add_insecure_port(f"{host}:{security.health_port}") == 0:
            raise RuntimeError(f"could not bind the health port {host}:{security.health_port}")
    for name in service_names:
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    return ServerGroup(server, health_only), health_servicer, bound


def set_serving(health_servicer: health.HealthServicer, service_names: Sequence[str], serving: bool) -> None:
    status = (
        health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in ["", *service_names]:
        health_servicer.set(name, status)


# Seconds a stopping server gives calls in flight, after it has said NOT_SERVING.
STOP_GRACE_S = 2.0


@contextlib.contextmanager
def serving(
    server: "ServerGroup", health_servicer: health.HealthServicer, service_names: Sequence[str], *, ready: bool = True
) -> Iterator[None]:
    """The life of every feedret gRPC server, around the block that runs it (typically
    until a stop event): started, SERVING at once when `ready` (a shard says it later,
    once it has caught up, with set_serving), and on leaving NOT_SERVING, so that
    balancers and the root stop sending, then stopped with STOP_GRACE_S for calls in flight."""
    server.start()
    if ready:
        set_serving(health_servicer, service_names, True)
    try:
        yield
    finally:
        set_serving(health_servicer, service_names, False)
        server.stop(grace=STOP_GRACE_S).wait()


def rpc_scope(context: grpc.ServicerContext, method: str, request_id: str = "") -> "_RpcScope":
    """`with rpc_scope(context, method, request_id) as rid`: binds the request id (a new
    one when the caller sent none) to every log line; maps failures to gRPC status codes.

    InvalidRequest -> INVALID_ARGUMENT. Anything unexpected -> INTERNAL with the
    error logged: a bad request never takes the server down.
    """
    return _RpcScope(context, method, request_id)


class _RpcScope:
    # A class, not a generator context manager: it wraps every call of every server.
    __slots__ = ("_context", "_method", "_rid", "_started", "_bound")

    def __init__(self, context: grpc.ServicerContext, method: str, request_id: str) -> None:
        self._context, self._method = context, method
        self._rid = request_id or uuid.uuid4().hex[:16]

    def __enter__(self) -> str:
        self._started = time.perf_counter()
        self._bound = bound(request_id=self._rid, method=self._method)
        self._bound.__enter__()
        return self._rid

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if isinstance(exc, Exception):  # the server must outlive any one request
                self._context.abort(*failure_status(exc, self._method))  # grpc's raises
                return True
            return False
        finally:
            log.debug("rpc_done", ms=round((time.perf_counter() - self._started) * 1000, 3))
            self._bound.__exit__()


def failure_status(exc: Exception, method: str) -> tuple[grpc.StatusCode, str]:
    """The status code and message a failed request is answered with, logged once here:
    for a whole call (rpc_scope) and for one request of a batch alike."""
    if isinstance(exc, InvalidRequest):
        log.info("invalid_request", error=str(exc))
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, RpcFailure):
        log.warning("rpc_failed", code=exc.code.name, error=str(exc))
        return exc.code, str(exc)
    log.error("rpc_failed", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"{method} failed: {type(exc).__name__}: {exc}"


# gRPC reports a call without a deadline as one ~9.2e18 s away (INT64_MAX); a real one is never this far.
_NO_DEADLINE_S = 1e6


def deadline_remaining(context: grpc.ServicerContext) -> float | None:
    """Seconds left before the caller's deadline, or None when the caller set none."""
    remaining = context.time_remaining()
    return None if remaining is None or remaining > _NO_DEADLINE_S else remaining


def check_k(k: int, max_k: int) -> int:
    if k < 1 or k > max_k:
        raise InvalidRequest(f"k must be between 1 and {max_k}, got {k}")
    return k


_FLOAT32_MAX = float(np.finfo(np.float32).max)
_FLOAT32_TINY = float(np.finfo(np.float32).smallest_subnormal)


def query_vector(values: Sequence[float], dimension: int, full_dimension: int = 0) -> np.ndarray:
    """Validate a query vector's width and values; returns float32.

    `dimension` is the width served (0: not known yet); `full_dimension`, when
    larger, is the model's width, also accepted (the index truncates it to its
    Matryoshka prefix).
    """
    vec = np.asarray(values, dtype=np.float32)
    if vec.size == 0:
        raise InvalidRequest("query vector is empty")
    if dimension and vec.size != dimension and vec.size != full_dimension:
        also = f" (or the model's full {full_dimension}, truncated)" if full_dimension > dimension else ""
        raise InvalidRequest(f"query vector has {vec.size} dimensions, the index serves {dimension}{also}")
    # The part the index scores with: a zero one (or one whose float32 norm underflows)
    # ranks every post the same, an arbitrary answer nobody would notice; one too large
    # overflows float32 scores. One sum of squares, in float64 (it cannot overflow there),
    # answers all three and finds NaN and inf too: two numpy calls on every query of every
    # shard, not six. The float32 limits are those np.linalg.norm would meet in float32.
    served = vec[:dimension] if dimension and vec.size > dimension else vec
    square = float(np.square(served, dtype=np.float64).sum())
    if not math.isfinite(square) or (served.size < vec.size and not np.isfinite(vec).all()):
        raise InvalidRequest("query vector contains NaN or infinite values")
    if square < _FLOAT32_TINY:
        what = f"its first {dimension} dimensions are" if served.size < vec.size else "it is"
        raise InvalidRequest(f"query vector has no direction: {what} all zeros, or too small for float32")
    if square > _FLOAT32_MAX:
        raise InvalidRequest("query vector is too large: its norm overflows float32")
    return vec


def check_filters(
    filters: pb.Filters, max_exclude_post_ids: int | None = None, max_languages: int | None = None
) -> None:
    """Raise InvalidRequest for a negative age or, where limits are given, too many ids or languages."""
    if filters.max_age_seconds < 0:
        raise InvalidRequest(f"filters.max_age_seconds must be >= 0, got {filters.max_age_seconds}")
    if max_exclude_post_ids is not None and len(filters.exclude_post_ids) > max_exclude_post_ids:
        raise InvalidRequest(
            f"filters.exclude_post_ids has {len(filters.exclude_post_ids)} ids, the limit is {max_exclude_post_ids}"
        )
    if max_languages is not None and len(filters.languages) > max_languages:
        raise InvalidRequest(f"filters.languages has {len(filters.languages)} languages, the limit is {max_languages}")


def check_member(member: pb.Member, limits: MemberLimits) -> None:
    """Raise InvalidRequest unless the member is within `limits`, its numbers finite (feedret.members.check_member)."""
    try:
        members.check_member(member, limits)
    except members.InvalidMember as exc:
        raise InvalidRequest(str(exc)) from exc


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        if not n:
            out.append(byte)
            return bytes(out)
        out.append(byte | 0x80)


def fill_candidates(
    candidates: pb.Candidates, post_ids: np.ndarray, scores: np.ndarray, shards: np.ndarray | None = None
) -> None:
    """Append candidates to the packed arrays of a reply, as `extend` would, cheaper.

    At k=2,000, `extend(array.tolist())` of three fields took ~1 ms per reply on the
    benchmark machine. Scores go in as their little-endian float32 bytes and shard
    numbers under 128 as one byte each (both exactly protobuf's packed encoding),
    merged in one parse; post ids, varints of any size, still go through `extend`.

    A non-finite score (NaN, inf: a vector indexed before shards checked them, a query
    whose score overflows float32) is dropped with its candidate: it would rank first
    or nowhere, and no caller can order by it.
    """
    scores = np.asarray(scores, np.float32)
    finite = np.isfinite(scores)
    if not finite.all():
        log.warning("non_finite_scores_dropped", dropped=int(np.count_nonzero(~finite)),
                    post_ids=np.asarray(post_ids)[~finite][:10].tolist())
        post_ids, scores = np.asarray(post_ids)[finite], scores[finite]
        shards = None if shards is None else np.asarray(shards)[finite]
    candidates.post_ids.extend(np.asarray(post_ids, np.int64).tolist())
    parts = []
    raw = np.ascontiguousarray(scores, dtype="<f4").tobytes()
    if raw:
        parts += [b"\x12", _varint(len(raw)), raw]  # field 2 (scores), length-delimited
    if shards is not None and len(shards):
        shards = np.asarray(shards)
        if shards.min() >= 0 and shards.max() < 128:
            raw = shards.astype(np.uint8).tobytes()
            parts += [b"\x1a", _varint(len(raw)), raw]  # field 3 (shards)
        else:
            candidates.shards.extend(shards.astype(np.int64).tolist())
    if parts:
        candidates.MergeFromString(b"".join(parts))


def connection_age_options(max_age_s: float) -> list[tuple[str, int]]:
    """Server options that end each connection after max_age_s (0: none), letting calls in flight finish."""
    if not max_age_s:
        return []
    return [("grpc.max_connection_age_ms", int(max_age_s * 1000)), ("grpc.max_connection_age_grace_ms", 5000)]
