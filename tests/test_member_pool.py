"""The root's member pool: each member has a home pod (its session cache lives there), failover, re-resolution."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import grpc
import pytest

from feedret.affinity import rendezvous_order
from feedret.config import MemberConfig, RootConfig
from feedret.encoder.model import Encoder
from feedret.members import ActivityItem, MemberProfile
from feedret.server.grpc_common import build_server
from feedret.server.member import SERVICE_NAMES, MemberServicer
from feedret.server.member_pool import MemberPool, NoMemberPods
from feedret.shard_targets import parse_member_targets
from feedret.v1 import feedret_pb2 as pb
from feedret.v1 import feedret_pb2_grpc as pb_grpc

from conftest import free_port

MODEL = Path(__file__).resolve().parents[1] / "models" / "feedret-tiny-llama"
PODS = [f"10.0.0.{i}:50052" for i in range(1, 6)]
MEMBERS = [f"member-{i}" for i in range(5000)]


# ------------------------------------------------------------ rendezvous order (pure)


def test_order_is_the_same_whatever_order_the_pods_are_listed_in():
    for m in MEMBERS[:50]:
        assert rendezvous_order(m, PODS) == rendezvous_order(m, list(reversed(PODS))) == rendezvous_order(m, PODS + PODS[:2])
        assert sorted(rendezvous_order(m, PODS)) == sorted(PODS)


def test_members_spread_evenly_over_pods():
    homes = Counter(rendezvous_order(m, PODS)[0] for m in MEMBERS)
    assert set(homes) == set(PODS)
    share = {pod: n / len(MEMBERS) for pod, n in homes.items()}
    assert all(0.15 < s < 0.25 for s in share.values()), share  # 1/5 each, give or take


def test_losing_a_pod_moves_only_its_members_and_they_go_to_their_next_choice():
    before = {m: rendezvous_order(m, PODS) for m in MEMBERS}
    gone = PODS[2]
    after = {m: rendezvous_order(m, [p for p in PODS if p != gone]) for m in MEMBERS}
    for m in MEMBERS:
        if before[m][0] != gone:
            assert after[m][0] == before[m][0], "a member whose pod stayed must keep it (and its warm cache)"
        else:
            assert after[m][0] == before[m][1], "the failover target is the member's second choice"


def test_adding_a_pod_moves_about_one_member_in_n():
    more = PODS + ["10.0.0.9:50052"]
    moved = sum(rendezvous_order(m, PODS)[0] != rendezvous_order(m, more)[0] for m in MEMBERS)
    assert 0.10 < moved / len(MEMBERS) < 0.23  # 1/6 expected
    assert all(rendezvous_order(m, more)[0] in (rendezvous_order(m, PODS)[0], more[-1]) for m in MEMBERS)


@pytest.mark.parametrize(
    "text, error",
    [
        ("member", "has no port"),
        ("a:1||b:2", "expected host:port"),
        ("a:1|a:1", "twice"),
        ("dns:///m:1|a:2", "whole list"),
        ("unix:/tmp/sock", "not supported"),
    ],
)
def test_a_malformed_member_address_is_refused_at_start_naming_it(text, error):
    with pytest.raises(ValueError, match=error):
        parse_member_targets(text)
    with pytest.raises(ValueError, match=error):
        RootConfig(member_address=text)


# ------------------------------------------------------------ discovery (fake DNS)


class FakeDns:
    def __init__(self, answer):
        self.answer = answer
        self.asked = 0

    def __call__(self, host, port):
        self.asked += 1
        if isinstance(self.answer, Exception):
            raise self.answer
        return list(self.answer)


def test_a_dns_pool_follows_the_pods_and_keeps_the_last_good_answer():
    dns = FakeDns(PODS[:2])
    pool = MemberPool("dns:///feedret-member-pods:50052", resolver=dns, resolve_interval_s=3600)
    try:
        assert pool.replicas() == PODS[:2]
        dns.answer = PODS[:3]
        pool.refresh()
        assert pool.replicas() == PODS[:3]
        dns.answer = []  # no ready pod listed for a moment (a rollout): keep calling the last ones
        pool.refresh()
        assert pool.replicas() == PODS[:3]
        dns.answer = OSError("resolver down")
        pool.refresh()
        assert pool.replicas() == PODS[:3]
    finally:
        pool.close()


def test_the_pool_re_resolves_on_its_own():
    dns = FakeDns(PODS[:1])
    pool = MemberPool("dns:///m:50052", resolver=dns, resolve_interval_s=0.05)
    try:
        dns.answer = PODS[:2]
        end = time.monotonic() + 5
        while pool.replicas() != PODS[:2] and time.monotonic() < end:
            time.sleep(0.02)
        assert pool.replicas() == PODS[:2]
    finally:
        pool.close()


def test_a_pool_that_never_resolved_says_so():
    pool = MemberPool("dns:///m:50052", resolver=FakeDns(OSError("NXDOMAIN")), resolve_interval_s=3600)
    try:
        with pytest.raises(NoMemberPods, match="dns:///m:50052"):
            pool.embed(request("m-1", "s"), time.monotonic() + 1)
    finally:
        pool.close()


# ------------------------------------------------------------ real member servers


@pytest.fixture(scope="module")
def encoder():
    return Encoder.from_pretrained(MODEL)


class CountingServicer(MemberServicer):
    calls = 0

    def Embed(self, request, context):
        self.calls += 1
        return super().Embed(request, context)


class MemberPod:
    def __init__(self, encoder):
        self.servicer = CountingServicer(MemberConfig(cache_ttl_s=60), encoder)
        self.server, _, port = build_server(
            "127.0.0.1", 0, 4, [lambda s: pb_grpc.add_MemberEmbeddingServiceServicer_to_server(self.servicer, s)],
            SERVICE_NAMES,
        )
        self.address = f"127.0.0.1:{port}"
        self.server.start()

    def cached_sessions(self) -> set[str]:
        return {member for member, _ in self.servicer._cache.keys()}


@pytest.fixture
def pods(encoder):
    started = [MemberPod(encoder), MemberPod(encoder)]
    yield started
    for pod in started:
        pod.server.stop(0)


def request(member_id: str, session: str) -> pb.EmbedRequest:
    req = pb.EmbedRequest()
    MemberProfile(member_id, session, recent_activity=[ActivityItem(1, "Alien (1979)", "liked", 1.0)]).fill_proto(req.member)
    return req


def test_every_page_of_a_session_hits_the_pod_that_cached_it(pods):
    pool = MemberPool("|".join(p.address for p in pods))
    try:
        members = [f"m-{i}" for i in range(12)]
        first = [pool.embed(request(m, "s1"), time.monotonic() + 10) for m in members]
        assert not any(r.cached for r in first)
        pages = [pool.embed(request(m, "s1"), time.monotonic() + 10) for m in members for _ in range(3)]
        assert all(r.cached for r in pages), "a session's later pages must come from its pod's cache"
        # Both pods serve someone, and no member was embedded on both.
        a, b = (p.cached_sessions() for p in pods)
        assert a and b and not (a & b) and a | b == set(members)
    finally:
        pool.close()


def test_when_the_home_pod_is_down_its_members_are_served_by_the_next(pods):
    pool = MemberPool("|".join(p.address for p in pods))
    try:
        member = "m-failover"
        home, other = (p for p in sorted(pods, key=lambda p: rendezvous_order(member, [q.address for q in pods]).index(p.address)))
        pool.embed(request(member, "s1"), time.monotonic() + 10)
        assert member in home.cached_sessions()
        home.server.stop(0).wait()
        reply = pool.embed(request(member, "s1"), time.monotonic() + 10)
        assert len(reply.vector) > 0 and not reply.cached and member in other.cached_sessions()
    finally:
        pool.close()


def test_an_invalid_request_is_not_retried_on_another_pod(pods):
    pool = MemberPool("|".join(p.address for p in pods))
    try:
        bad = pb.EmbedRequest()  # no member: every pod would refuse it
        with pytest.raises(grpc.RpcError) as err:
            pool.embed(bad, time.monotonic() + 10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert sum(p.servicer.calls for p in pods) == 1
    finally:
        pool.close()


# ------------------------------------------------------------ the root without a member service


def test_a_root_without_a_member_service_says_member_queries_cannot_be_answered():
    import threading

    from feedret.clients.client import FeedretClient
    from feedret.server import root as root_server

    port = free_port()
    config = RootConfig(port=port, metrics_port=0, shard_addresses="127.0.0.1:1", member_address="")
    stop = threading.Event()
    thread = threading.Thread(target=root_server.serve, args=(config, stop),
                              daemon=True)
    thread.start()
    try:
        with FeedretClient(f"127.0.0.1:{port}") as client:
            grpc.channel_ready_future(client._channel).result(timeout=10)
            with pytest.raises(grpc.RpcError) as err:
                client.retrieve(member=MemberProfile("m-1", "s"), k=10, timeout=5)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "FEEDRET_MEMBER_ADDRESS is empty" in err.value.details()
    finally:
        stop.set()
        thread.join(10)
