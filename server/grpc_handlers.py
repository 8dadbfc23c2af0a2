"""What our interceptors build around a method's handler, built once per method, not per call."""

from __future__ import annotations

from typing import Callable

import grpc

Build = Callable[[str, grpc.RpcMethodHandler], grpc.RpcMethodHandler]


class HandlerCache:
    """The handler an interceptor wraps around each method's handler, built on its first call.

    grpc runs every interceptor's `intercept_service` on every call, and each of ours
    wrapped the handler in new closures and a new RpcMethodHandler: the same ones every
    time, three per call, in every server. An entry is used while the handler beneath is
    the very object it was built on (generic handlers may hand out another); methods are
    few and fixed, so the cache stops growing at `limit` whatever names callers send.
    Thread-safe: two threads may build the same entry once each, and either is right.
    """

    def __init__(self, build: Build, limit: int = 1024) -> None:
        self._build = build
        self._limit = limit
        self._entries: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def get(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        entry = self._entries.get(method)
        if entry is not None and entry[0] is handler:
            return entry[1]
        wrapped = self._build(method, handler)
        if len(self._entries) < self._limit:
            self._entries[method] = (handler, wrapped)
        return wrapped
