"""Prometheus metrics of in-process servers, scraped over HTTP after real gRPC calls.

The registry is the process-wide one (as in production, one role per process),
so every check compares a scrape before and after the calls it makes.
"""

from __future__ import annotations

import importlib
import socket
from pathlib import Path

import grpc
import numpy as np
import pytest
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from feedret.config import MemberConfig, RootConfig, ShardConfig
from feedret.indexer.replica import ShardState
from feedret.members import ActivityItem, MemberProfile
from feedret.metrics import METRICS_PATH, start_metrics_server
from feedret.server import member as member_server
from feedret.server import root as root_server
from feedret.server import shard as shard_server
from feedret.server.grpc_common import build_server
from feedret.server.shard import ShardServicer
from feedret.v1 import feedret_pb2 as pb
from feedret.v1 import feedret_pb2_grpc as pb_grpc

from conftest import free_port, sample, scrape

MODEL = Path(__file__).resolve().parents[1] / "models" / "feedret-tiny-llama"
SHARD_SERVICE = shard_server.SERVICE_NAMES[0]  # feedret.v1.ShardService
N_POSTS = 500
DIM = 16


@pytest.fixture(scope="module")
def metrics_url():
    server = start_metrics_server("127.0.0.1", free_port(), role="test")
    assert server is not None
    yield server.url
    server.stop()


@pytest.fixture
def shard():
    """A shard with N_POSTS applied, served over real gRPC on a free port."""
    state = ShardState(config=ShardConfig(shard_id=0, num_shards=2), topic="post-vectors")
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(N_POSTS, DIM)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    events = [
        (i, pb.PostVectorEvent(post_id=1000 + i, op=pb.PostVectorEvent.UPSERT, vector=v.tolist(),
                               created_at=1e9, lang="en", model_version="m1"))
        for i, v in enumerate(vecs)
    ]
    state.apply(events, now=2e9)
    state.end_offset = N_POSTS + 7  # as the applier would read it from the broker: 7 records behind
    servicer = ShardServicer(state, "in-process")
    server, _, port = build_server(
        "127.0.0.1", 0, 4,
        [lambda s: pb_grpc.add_ShardServiceServicer_to_server(servicer, s),
         lambda s: pb_grpc.add_IndexAdminServicer_to_server(servicer, s)],
        shard_server.SERVICE_NAMES,
    )
    server.start()
    yield f"127.0.0.1:{port}", vecs
    server.stop(0)


def test_rpcs_are_counted_by_method_and_status_code_and_timed(metrics_url, shard):
    address, vecs = shard
    before = scrape(metrics_url)
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.ShardServiceStub(channel)
        for v in vecs[:3]:
            stub.Search(pb.SearchRequest(vector=v.tolist(), k=5), timeout=5)
        with pytest.raises(grpc.RpcError) as err:
            stub.Search(pb.SearchRequest(vector=vecs[0].tolist(), k=0), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # A status set without raising (the health service's NOT_FOUND) is counted too.
        with pytest.raises(grpc.RpcError) as err:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    after = scrape(metrics_url)

    def delta(name, **labels):
        return sample(after, name, **labels) - sample(before, name, **labels)

    search = dict(grpc_type="unary", grpc_service=SHARD_SERVICE, grpc_method="Search")
    assert delta("grpc_server_started_total", **search) == 4
    assert delta("grpc_server_handled_total", **search, grpc_code="OK") == 3
    assert delta("grpc_server_handled_total", **search, grpc_code="INVALID_ARGUMENT") == 1
    assert delta("grpc_server_handling_seconds_count", **search) == 4
    assert 0 < delta("grpc_server_handling_seconds_sum", **search) < 5
    # Buckets are fine-grained below a second: a small in-memory search lands under 250 ms.
    assert delta("grpc_server_handling_seconds_bucket", **search, le="0.25") == 4
    check = dict(grpc_type="unary", grpc_service="grpc.health.v1.Health", grpc_method="Check")
    assert delta("grpc_server_handled_total", **check, grpc_code="NOT_FOUND") == 1


def test_shard_state_is_read_when_scraped(metrics_url, shard):
    samples = scrape(metrics_url)
    assert sample(samples, "feedret_shard_indexed_posts", shard="0") == N_POSTS
    assert sample(samples, "feedret_shard_upserts_total", shard="0") == N_POSTS
    assert sample(samples, "feedret_shard_serve_dimension", shard="0") == DIM
    assert sample(samples, "feedret_shard_applied_offset", shard="0") == N_POSTS
    assert sample(samples, "feedret_shard_partition_lag_records", shard="0") == 7
    assert sample(samples, "feedret_shard_index_info", shard="0", index_type="Flat", state="exact", device="cpu",
                  model_version="m1") == 1
    assert sample(samples, "feedret_build_info", role="test", version=_version()) == 1


def test_rejected_post_vectors_are_counted_by_reason(metrics_url):
    from feedret.indexer import metrics

    state = ShardState(config=ShardConfig(shard_id=7, num_shards=8), topic="post-vectors")
    unit = np.ones(DIM, np.float32) / np.sqrt(DIM)
    bad = [unit, np.full(DIM, np.nan, np.float32), np.zeros(DIM, np.float32), unit * 1e30, unit[:3]]
    state.apply([(i, pb.PostVectorEvent(post_id=i, op=pb.PostVectorEvent.UPSERT, vector=v.tolist(), model_version="m"))
                 for i, v in enumerate(bad)], now=2e9)
    metrics.watch_shard(state)
    try:
        samples = scrape(metrics_url)
    finally:
        metrics.unwatch_shard(state)
    got = {reason: sample(samples, "feedret_shard_rejected_total", shard="7", reason=reason)
           for reason in ("non_finite", "zero", "not_unit_norm", "wrong_width")}
    assert got == {"non_finite": 1, "zero": 1, "not_unit_norm": 1, "wrong_width": 1}
    assert sample(samples, "feedret_shard_indexed_posts", shard="7") == 1


def _version() -> str:
    from importlib.metadata import version

    return version("feedret")


def test_root_counts_partial_replies_failed_shards_and_candidates(metrics_url, shard):
    address, vecs = shard
    dead = f"127.0.0.1:{free_port()}"  # nothing listens: the second shard is down
    servicer = root_server.RootServicer(
        RootConfig(shard_addresses=f"{address},{dead}", member_address=dead)
    )
    server, _, port = build_server(
        "127.0.0.1", 0, 4, [lambda s: pb_grpc.add_RetrievalServiceServicer_to_server(servicer, s)],
        root_server.SERVICE_NAMES,
    )
    server.start()
    try:
        before = scrape(metrics_url)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.RetrievalServiceStub(channel)
            reply = stub.Retrieve(pb.RetrieveRequest(k=20, vector=pb.QueryVector(values=vecs[1].tolist())), timeout=5)
            assert reply.partial and list(reply.failed_shards) == [1] and len(reply.candidates.post_ids) == 20
            # A member query cannot be embedded (no member service): UNAVAILABLE, and it says so.
            member = pb.Member(member_id="m1")
            with pytest.raises(grpc.RpcError) as err:
                stub.Retrieve(pb.RetrieveRequest(k=20, member=member), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        after = scrape(metrics_url)
    finally:
        server.stop(0)

    def delta(name, **labels):
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert delta("feedret_root_partial_responses_total") == 1
    assert delta("feedret_root_shard_failures_total", shard="1", code="UNAVAILABLE") == 1
    assert delta("feedret_root_shard_failures_total", shard="0", code="UNAVAILABLE") == 0
    assert delta("feedret_root_candidates_returned_count") == 1
    assert delta("feedret_root_candidates_returned_sum") == 20
    assert delta("feedret_root_candidates_returned_bucket", le="10.0") == 0
    assert delta("feedret_root_candidates_returned_bucket", le="50.0") == 1
    retrieve = dict(grpc_type="unary", grpc_service=root_server.SERVICE_NAMES[0], grpc_method="Retrieve")
    assert delta("grpc_server_handled_total", **retrieve, grpc_code="OK") == 1
    assert delta("grpc_server_handled_total", **retrieve, grpc_code="UNAVAILABLE") == 1


def test_member_cache_hits_misses_and_embed_latency(metrics_url):
    from feedret.encoder.model import Encoder

    servicer = member_server.MemberServicer(MemberConfig(), Encoder.from_pretrained(MODEL))
    server, _, port = build_server(
        "127.0.0.1", 0, 2, [lambda s: pb_grpc.add_MemberEmbeddingServiceServicer_to_server(servicer, s)],
        member_server.SERVICE_NAMES,
    )
    server.start()

    def request(session: str) -> pb.EmbedRequest:
        req = pb.EmbedRequest()
        MemberProfile("m-metrics", session, recent_activity=[ActivityItem(1, "Alien (1979)")]).fill_proto(req.member)
        return req

    try:
        before = scrape(metrics_url)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.MemberEmbeddingServiceStub(channel)
            assert not stub.Embed(request("s1"), timeout=10).cached
            assert stub.Embed(request("s1"), timeout=10).cached
            assert stub.Embed(request("s1"), timeout=10).cached
            assert not stub.Embed(request(""), timeout=10).cached
        after = scrape(metrics_url)
    finally:
        server.stop(0)

    def delta(name, **labels):
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert delta("feedret_member_cache_lookups_total", result="hit") == 2
    assert delta("feedret_member_cache_lookups_total", result="miss") == 1
    assert delta("feedret_member_cache_lookups_total", result="no_session") == 1
    assert delta("feedret_member_embed_seconds_count") == 2  # the two forward passes, not the hits
    assert delta("feedret_member_embed_batch_members_sum") == 2  # one member each: nothing overlapped
    assert sample(after, "feedret_member_cache_entries") == 1


def test_a_taken_metrics_port_is_logged_and_does_not_stop_the_process():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with structlog.testing.capture_logs() as logs:
            assert start_metrics_server("127.0.0.1", port, role="test") is None
    (event,) = [e for e in logs if e["event"] == "metrics_port_unavailable"]
    assert event["log_level"] == "error" and event["address"] == f"127.0.0.1:{port}"
    assert "FEEDRET_METRICS_PORT" in event["fix"]


def test_port_zero_turns_the_endpoint_off():
    with structlog.testing.capture_logs() as logs:
        assert start_metrics_server("127.0.0.1", 0, role="test") is None
    assert [e["event"] for e in logs] == ["metrics_disabled"]


def test_metrics_path_is_the_conventional_one():
    # The k8s annotations and PodMonitor (tests/test_k8s.py) and the docs name this path.
    assert METRICS_PATH == "/metrics"


# Where each role's metrics live; they register when imported.
ROLE_METRICS = {"root": "feedret.server.root_metrics", "shard": "feedret.indexer.metrics",
                "member": "feedret.server.member_metrics", "consumer": "feedret.consumer.metrics"}


@pytest.mark.parametrize("role", ["root", "shard", "member", "consumer"])
def test_a_process_exports_its_own_roles_metrics_not_every_roles_at_zero(role):
    for module in ROLE_METRICS.values():  # every role's registered, as in a process hosting several
        importlib.import_module(module)
    server = start_metrics_server("127.0.0.1", free_port(), role=role)
    assert server is not None
    try:
        names = {name for name, _ in scrape(server.url)}
    finally:
        server.stop()
    roles = {prefix.split("_")[1] for prefix in ("feedret_root_", "feedret_shard_", "feedret_member_",
                                                  "feedret_consumer_") for name in names if name.startswith(prefix)}
    # A shard's own show once it watches a state (test_shard_state_is_read_when_scraped).
    assert roles == {role} or (role == "shard" and not roles), sorted(
        n for n in names if n.startswith("feedret_") and f"_{role}_" not in n)
    assert "feedret_build_info" in names
    assert any(n.startswith("process_") for n in names)  # the shared process metrics stay
