"""Interceptors wrap each method's handler once, and request ids bound per call are set back after it."""

from __future__ import annotations

import grpc
import structlog

from feedret.logging import bound
from feedret.server.grpc_handlers import HandlerCache


def handler(fn):
    return grpc.unary_unary_rpc_method_handler(fn)


def test_a_method_is_wrapped_once_and_again_when_its_handler_changes():
    built = []

    def build(method, h):
        built.append(method)
        return handler(lambda req, ctx: ("wrapped", h.unary_unary(req, ctx)))

    cache = HandlerCache(build)
    search, lookup = handler(lambda req, ctx: "search"), handler(lambda req, ctx: "lookup")
    first = cache.get("/s/Search", search)
    assert cache.get("/s/Search", search) is first
    assert cache.get("/s/Lookup", lookup).unary_unary(None, None) == ("wrapped", "lookup")
    assert built == ["/s/Search", "/s/Lookup"]
    replaced = handler(lambda req, ctx: "search v2")  # a generic handler handing out another object
    assert cache.get("/s/Search", replaced).unary_unary(None, None) == ("wrapped", "search v2")
    assert built == ["/s/Search", "/s/Lookup", "/s/Search"]


def test_unknown_method_names_cannot_grow_the_cache_past_its_limit():
    cache = HandlerCache(lambda method, h: h, limit=3)
    h = handler(lambda req, ctx: None)
    for i in range(100):
        assert cache.get(f"/s/M{i}", h) is h
    assert len(cache._entries) == 3


def test_bound_keys_reach_log_lines_and_are_set_back_after_the_block():
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(role="root", request_id="outer")
    with bound(request_id="r1", method="Retrieve"):
        assert structlog.contextvars.get_contextvars() == {"role": "root", "request_id": "r1", "method": "Retrieve"}
        with bound(request_id="r2"):
            assert structlog.contextvars.get_contextvars()["request_id"] == "r2"
        assert structlog.contextvars.get_contextvars()["request_id"] == "r1"
    assert structlog.contextvars.get_contextvars() == {"role": "root", "request_id": "outer"}
    structlog.contextvars.clear_contextvars()


def test_a_server_counts_and_guards_every_call_with_its_handlers_built_once():
    """The real interceptors of build_server, cached: each call is still counted, and a body
    that does not parse still gets INVALID_ARGUMENT, on the first call and every later one."""
    from feedret.server.grpc_common import build_server
    from feedret.server.grpc_metrics import GRPC_HANDLED
    from feedret.v1 import feedret_pb2 as pb

    def stats(request, context):
        return pb.StatsResponse(total_indexed=7)

    service = grpc.method_handlers_generic_handler("test.Cached", {"Stats": grpc.unary_unary_rpc_method_handler(
        stats, request_deserializer=pb.StatsRequest.FromString, response_serializer=pb.StatsResponse.SerializeToString)})
    server, _, port = build_server("127.0.0.1", 0, 4, [lambda s: s.add_generic_rpc_handlers((service,))],
                                   ["test.Cached"], max_concurrent_rpcs=8)
    server.start()
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        call = channel.unary_unary("/test.Cached/Stats", request_serializer=pb.StatsRequest.SerializeToString,
                                   response_deserializer=pb.StatsResponse.FromString)
        raw = channel.unary_unary("/test.Cached/Stats")
        ok = GRPC_HANDLED.labels("unary", "test.Cached", "Stats", "OK")
        bad = GRPC_HANDLED.labels("unary", "test.Cached", "Stats", "INVALID_ARGUMENT")
        ok_before, bad_before = ok._value.get(), bad._value.get()
        for _ in range(3):
            assert call(pb.StatsRequest(), timeout=5).total_indexed == 7
            try:
                raw(b"\xff\xff\xff", timeout=5)
                raise AssertionError("an undecodable body was answered")
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "not a valid message for /test.Cached/Stats" in exc.details()
        assert ok._value.get() - ok_before == 3
        assert bad._value.get() - bad_before == 3
        channel.close()
    finally:
        server.stop(None)
