"""What every gRPC client of feedret shares, callers and the root alike: the message size
limit and the bearer token sent on each call. Imports only grpc, so the client library
needs no server code.
"""

from __future__ import annotations

from typing import Callable

import grpc

# Replies carry up to 10,000 candidates per shard, and a batch of queries more: one limit for
# every channel and server, above gRPC's 4 MiB default.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MESSAGE_SIZE_OPTIONS: list[tuple[str, object]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


class _Details(grpc.ClientCallDetails):
    def __init__(self, details, metadata) -> None:
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = metadata
        self.credentials = details.credentials
        self.wait_for_ready = getattr(details, "wait_for_ready", None)
        self.compression = getattr(details, "compression", None)


class BearerTokenClientInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call; the token is asked for per call (rotation)."""

    def __init__(self, token: Callable[[], str]) -> None:
        self.token = token

    def _with_token(self, details):
        metadata = [(k, v) for k, v in (details.metadata or ()) if k != "authorization"]
        metadata.append(("authorization", f"Bearer {self.token()}"))
        return _Details(details, metadata)

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._with_token(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._with_token(client_call_details), request)


def with_token(channel: grpc.Channel, token: Callable[[], str] | None) -> grpc.Channel:
    """`channel` sending `token()` on every call; unchanged when token is None."""
    return channel if token is None else grpc.intercept_channel(channel, BearerTokenClientInterceptor(token))


class AioBearerToken(grpc.aio.UnaryUnaryClientInterceptor):
    """with_token's interceptor for grpc.aio channels, which take interceptors when built."""

    def __init__(self, token: Callable[[], str]) -> None:
        self.token = token

    async def intercept_unary_unary(self, continuation, details, request):
        metadata = [(k, v) for k, v in (details.metadata or ()) if k != "authorization"]
        metadata.append(("authorization", f"Bearer {self.token()}"))
        details = grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                             details.wait_for_ready)
        return await continuation(details, request)
