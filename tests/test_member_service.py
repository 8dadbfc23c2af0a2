"""The member embedding server in-process: real gRPC, the committed tiny encoder, the session cache."""

from __future__ import annotations

import threading
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


def test_a_caller_without_a_deadline_gets_its_vector(member_stub, encoder):
    # gRPC reports "no deadline" as ~9e18 s left, which no wait accepts as a timeout.
    stub, _ = member_stub
    for session in ("", "s-no-deadline"):  # the uncached path and the session path
        reply = stub.Embed(request(session))
        expected = encoder.embed_members([MemberProfile.from_proto(request(session).member)])[0]
        np.testing.assert_allclose(reply.vector, expected, atol=1e-5)


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


# ---------------------------------------------------------------- concurrent requests


class GatedEncoder:
    """The real encoder behind a gate: each forward pass waits until the test opens it,
    so requests can be lined up behind a pass deterministically. Records every pass."""

    def __init__(self, encoder, fail: bool = False) -> None:
        self.encoder = encoder
        self.model_version = encoder.model_version
        self.passes: list[list[str]] = []
        self.started = threading.Event()
        self.gate = threading.Event()
        self.fail = fail

    def embed_members(self, members):
        self.passes.append([m.member_id for m in members])
        self.started.set()
        # Only a bound for a broken test: the test opens the gate once its requests are queued,
        # which on a loaded machine can take far longer than the pass itself.
        self.gate.wait(120)
        if self.fail:
            raise RuntimeError("the accelerator fell over")
        return self.encoder.embed_members(members)


@pytest.fixture
def gated(encoder):
    """(stub, gated encoder, servicer) for a member server whose passes wait on the gate."""
    fake = GatedEncoder(encoder)
    servicer = MemberServicer(MemberConfig(embed_batch_max=8), fake)
    server, _, port = build_server(
        "127.0.0.1", 0, 16, [lambda s: pb_grpc.add_MemberEmbeddingServiceServicer_to_server(servicer, s)], SERVICE_NAMES
    )
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield pb_grpc.MemberEmbeddingServiceStub(channel), fake, servicer
    fake.gate.set()
    channel.close()
    server.stop(0)
    servicer.close()


def member_request(member_id: str, session: str, text: str) -> pb.EmbedRequest:
    req = pb.EmbedRequest(request_id=f"{member_id}-{session}")
    MemberProfile(member_id, session, recent_activity=[ActivityItem(1, text, "liked", 1.0)]).fill_proto(req.member)
    return req


def wait_until(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.005)


def test_misses_queued_behind_a_pass_are_embedded_together_each_as_it_would_be_alone(gated, encoder):
    stub, fake, servicer = gated
    first = stub.Embed.future(member_request("m-0", "s", "Alien (1979)"), timeout=120)
    assert fake.started.wait(60)
    titles = ["Heat (1995)", "Fargo (1996)", "Toy Story (1995)", "Se7en (1995)", "Casino (1995)"]
    queued = [stub.Embed.future(member_request(f"m-{i + 1}", "s", t), timeout=120) for i, t in enumerate(titles)]
    wait_until(lambda: servicer.batcher.pending == len(titles))
    fake.gate.set()
    replies = [first.result()] + [f.result() for f in queued]
    # Two forward passes for six members: the first alone, the five that queued behind it together.
    assert fake.passes[0] == ["m-0"] and sorted(fake.passes[1]) == [f"m-{i}" for i in range(1, 6)]
    for i, (reply, title) in enumerate(zip(replies, ["Alien (1979)"] + titles)):
        alone = encoder.embed_members([MemberProfile.from_proto(member_request(f"m-{i}", "s", title).member)])[0]
        np.testing.assert_allclose(reply.vector, alone, atol=1e-5)
        assert not reply.cached


def test_concurrent_requests_for_one_session_share_one_forward_pass(gated):
    stub, fake, servicer = gated
    pages = [stub.Embed.future(member_request("m-7", "s-7", "Alien (1979)"), timeout=120) for _ in range(6)]
    assert fake.started.wait(60)
    wait_until(lambda: servicer._flights.get(("m-7", "s-7")) is not None
               and servicer._flights[("m-7", "s-7")].waiters == 6)
    fake.gate.set()
    vectors = [list(p.result().vector) for p in pages]
    assert fake.passes == [["m-7"]]
    assert all(v == vectors[0] for v in vectors)
    again = stub.Embed(member_request("m-7", "s-7", "Alien (1979)"), timeout=10)
    assert again.cached and list(again.vector) == vectors[0]


def test_a_request_that_times_out_in_the_queue_is_deadline_exceeded_and_never_embedded(gated):
    stub, fake, servicer = gated
    busy = stub.Embed.future(member_request("m-busy", "s", "Alien (1979)"), timeout=120)
    assert fake.started.wait(60)
    with pytest.raises(grpc.RpcError) as err:
        stub.Embed(member_request("m-late", "s", "Heat (1995)"), timeout=0.3)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    fake.gate.set()
    busy.result()
    wait_until(lambda: servicer.batcher.pending == 0)
    # Dropped from the queue: only the busy member's pass ever ran, and the next try embeds afresh.
    assert fake.passes == [["m-busy"]]
    assert not stub.Embed(member_request("m-late", "s", "Heat (1995)"), timeout=10).cached
    assert fake.passes == [["m-busy"], ["m-late"]]


def test_a_pass_whose_caller_gave_up_still_fills_the_cache(gated):
    stub, fake, servicer = gated
    with pytest.raises(grpc.RpcError) as err:
        stub.Embed(member_request("m-slow", "s-1", "Alien (1979)"), timeout=0.3)  # its pass is running
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    fake.gate.set()
    wait_until(lambda: not servicer._flights)
    # The feed's next page gets the vector without another pass.
    assert stub.Embed(member_request("m-slow", "s-1", "Alien (1979)"), timeout=10).cached
    assert fake.passes == [["m-slow"]]


def test_a_failed_pass_fails_every_request_in_it_and_the_service_goes_on(encoder):
    fake = GatedEncoder(encoder, fail=True)
    servicer = MemberServicer(MemberConfig(), fake)
    server, _, port = build_server(
        "127.0.0.1", 0, 8, [lambda s: pb_grpc.add_MemberEmbeddingServiceServicer_to_server(servicer, s)], SERVICE_NAMES
    )
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.MemberEmbeddingServiceStub(channel)
            futures = [stub.Embed.future(member_request(f"m-{i}", "s", "Alien (1979)"), timeout=120) for i in range(3)]
            assert fake.started.wait(60)
            # The first pass may take one or two of them (they can arrive together); the rest queue.
            wait_until(lambda: servicer.batcher.pending == 3 - len(fake.passes[0]))
            fake.gate.set()
            for f in futures:
                with pytest.raises(grpc.RpcError) as err:
                    f.result()
                assert err.value.code() == grpc.StatusCode.INTERNAL
                assert "fell over" in err.value.details()
            fake.fail = False
            reply = stub.Embed(member_request("m-0", "s", "Alien (1979)"), timeout=10)
            assert not reply.cached and len(reply.vector) == encoder.dim  # nothing of the failure was cached
    finally:
        fake.gate.set()
        server.stop(0)
        servicer.close()
