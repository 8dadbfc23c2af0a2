"""The member embedding server in-process: real gRPC, the committed tiny encoder, the session cache."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from feedret.config import MemberConfig
from feedret.encoder.model import Encoder
from feedret.members import ActivityItem, MemberProfile
from feedret.server.grpc_common import build_server
from feedret.server.member import SERVICE_NAMES, MemberServicer
from feedret.v1 import feedret_pb2 as pb
from feedret.v1 import feedret_pb2_grpc as pb_grpc

MODEL = Path(__file__).resolve().parents[1] / "models" / "feedret-tiny-llama"


@pytest.fixture(scope="module")
def encoder():
    return Encoder.from_pretrained(MODEL)


@pytest.fixture
def member_stub(encoder):
    servicer = MemberServicer(MemberConfig(cache_ttl_s=0.5), encoder)
    server, _, port = build_server(
        "127.0.0.1", 0, 4, [lambda s: pb_grpc.add_MemberEmbeddingServiceServicer_to_server(servicer, s)], SERVICE_NAMES
    )
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield pb_grpc.MemberEmbeddingServiceStub(channel), channel
    channel.close()
    server.stop(0)


def request(session: str, text: str = "Alien (1979)") -> pb.EmbedRequest:
    member = MemberProfile("m-1", session, recent_activity=[ActivityItem(1, text, "liked", 1.0)])
    req = pb.EmbedRequest()
    member.fill_proto(req.member)
    return req


def test_embed_returns_the_encoders_unit_vector(member_stub, encoder):
    stub, _ = member_stub
    reply = stub.Embed(request("s1"), timeout=10)
    expected = encoder.embed_members([MemberProfile.from_proto(request("s1").member)])[0]
    np.testing.assert_allclose(reply.vector, expected, atol=1e-5)
    assert reply.model_version == encoder.model_version and not reply.cached


def test_vector_is_cached_per_member_and_session_until_the_ttl(member_stub):
    stub, _ = member_stub
    first = stub.Embed(request("s2"), timeout=10)
    # Same member and session: the cached vector, even though the activity changed.
    again = stub.Embed(request("s2", text="Heat (1995)"), timeout=10)
    assert again.cached and list(again.vector) == list(first.vector)
    # A new session is embedded afresh.
    other = stub.Embed(request("s3", text="Heat (1995)"), timeout=10)
    assert not other.cached and list(other.vector) != list(first.vector)
    time.sleep(0.6)
    expired = stub.Embed(request("s2", text="Heat (1995)"), timeout=10)
    assert not expired.cached and list(expired.vector) == list(other.vector)


def test_no_session_means_no_caching(member_stub):
    stub, _ = member_stub
    stub.Embed(request(""), timeout=10)
    assert not stub.Embed(request(""), timeout=10).cached


def test_a_member_without_id_is_invalid_argument(member_stub):
    stub, _ = member_stub
    with pytest.raises(grpc.RpcError) as err:
        stub.Embed(pb.EmbedRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "member_id" in err.value.details()


def test_reflection_lists_the_service_and_health(member_stub):
    _, channel = member_stub
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    names = {s.name for r in replies for s in r.list_services_response.service}
    assert {"feedret.v1.MemberEmbeddingService", "grpc.health.v1.Health"} <= names
