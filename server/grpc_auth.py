"""Bearer tokens on gRPC calls: the server interceptor that checks them (the client side that
sends them is feedret.grpc_client, which clients import without any server code).

Tokens live in files (a mounted Secret), read again whenever the file changes, so a
rotated Secret takes effect without a restart. Health checks and reflection stay open:
the kubelet's probes carry no token.
"""

from __future__ import annotations

import hmac
import os
import threading
from pathlib import Path
from typing import Iterable

import grpc
import structlog

log = structlog.get_logger(__name__)

# Methods callable without a token: probes and service discovery.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class TokenFile:
    """The tokens in a file, one per line (blank lines and '#' comments ignored), reloaded on change."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._tokens: tuple[str, ...] = ()
        self.tokens()  # a missing or empty file fails at start, not on the first call

    def tokens(self) -> tuple[str, ...]:
        st = os.stat(self.path)  # Kubernetes swaps a Secret's files by symlink: follow it
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        with self._lock:
            if stamp != self._stamp:
                tokens = tuple(
                    line.strip() for line in self.path.read_text().splitlines()
                    if line.strip() and not line.lstrip().startswith("#")
                )
                if not tokens:
                    raise ValueError(f"token file {self.path} holds no token")
                if self._stamp is not None:
                    log.info("auth_tokens_reloaded", path=str(self.path), tokens=len(tokens))
                self._stamp, self._tokens = stamp, tokens
            return self._tokens

    def first(self) -> str:
        return self.tokens()[0]


def bearer(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of an `authorization: Bearer <token>` entry, if any."""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value[:7].lower() == "bearer ":
            return value[7:].strip()
    return None


def accepted(token: str | None, tokens: Iterable[str]) -> bool:
    if not token:
        return False
    ok = False
    for candidate in tokens:  # compare with every token, in constant time per comparison
        ok |= hmac.compare_digest(token.encode(), candidate.encode())
    return ok


class BearerAuthInterceptor(grpc.ServerInterceptor):
    """Ends calls without an accepted token with UNAUTHENTICATED, before any handler runs."""

    def __init__(self, tokens: TokenFile) -> None:
        self.tokens = tokens

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        try:
            known = self.tokens.tokens()
        except (OSError, ValueError) as exc:  # the file vanished or was emptied: refuse, keep serving
            log.error("auth_tokens_unreadable", path=str(self.tokens.path), error=str(exc))
            return _deny(handler, grpc.StatusCode.UNAVAILABLE, "the server cannot read its accepted tokens")
        if accepted(bearer(handler_call_details.invocation_metadata), known):
            return handler
        log.info("unauthenticated_call", method=method)
        return _deny(handler, grpc.StatusCode.UNAUTHENTICATED,
                     "missing or unknown bearer token (metadata 'authorization: Bearer <token>')")


def _deny(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    def abort(request, context):
        context.abort(code, message)

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(abort, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
