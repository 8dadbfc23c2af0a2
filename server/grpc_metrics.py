"""RPC metrics of every gRPC server (root, shard, member), and the interceptor that records them.

`GrpcMetricsInterceptor` (installed by `feedret.server.grpc_common.build_server`) counts and
times each RPC under the names other gRPC stacks use (`grpc_server_started_total`,
`grpc_server_handled_total`, `grpc_server_handling_seconds`), with `grpc_code` the Python status
name (OK, INVALID_ARGUMENT, UNAVAILABLE, ...). They belong to no one role: every process that
serves gRPC exports them beside its own role's (`feedret.metrics.RoleRegistry`).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator

import grpc
from prometheus_client import Counter, Histogram

from feedret.metrics import LATENCY_BUCKETS
from feedret.server.grpc_handlers import HandlerCache

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

    def __init__(self) -> None:
        self._handlers = HandlerCache(self._counted)

    def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails):
        handler = continuation(handler_call_details)
        if handler is None:
            return None  # unknown method: grpc answers UNIMPLEMENTED itself
        return self._handlers.get(handler_call_details.method, handler)

    @staticmethod
    def _counted(full_method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        service, _, method = full_method.lstrip("/").rpartition("/")
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
