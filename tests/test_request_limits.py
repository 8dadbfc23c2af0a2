"""Every member query has a cost ceiling: fields over their size limit, or numbers that are
not finite, get INVALID_ARGUMENT naming the field from the member service and from the root,
without waiting for (or costing) a forward pass. Issue #14, finding 4.
"""

from __future__ import annotations

import json

import random
import string
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest

from feedret.config import MemberConfig, MemberLimits, RootConfig, ShardConfig
from feedret.encoder.model import Encoder
from feedret.indexer.replica import ShardState
from feedret.members import ActivityItem, MemberProfile
from feedret.server import root as root_server
from feedret.server import shard as shard_server
from feedret.server.grpc_common import build_server
from feedret.server.member import SERVICE_NAMES as MEMBER_SERVICES
from feedret.server.member import MemberServicer
from feedret.server.shard import ShardServicer
from feedret.v1 import feedret_pb2 as pb
from feedret.v1 import feedret_pb2_grpc as pb_grpc

MODEL = Path(__file__).resolve().parents[1] / "models" / "feedret-tiny-llama"
# The shards' posts must be of the member model's version, or the root will not merge them.
MODEL_VERSION = json.loads((MODEL / "feedret.json").read_text())["model_version"]

# Small limits, so that each case is a few characters over one.
LIMITS = dict(
    max_id_chars=16, max_name_chars=8, max_profile_fields=3, max_profile_chars=40, max_features=3,
    max_activity_items=4, max_activity_chars=50, max_member_chars=150,
)
ISSUE_PROFILE = "x " * 2_500_000  # the 5 MB profile of issue #14


def ordinary(member_id: str = "m-1", session: str = "s-1", **fields) -> MemberProfile:
    base = dict(
        profile={"headline": "film fan"},
        features={"likes": 3.0},
        recent_activity=(ActivityItem(1, "Alien (1979)", "liked", 1.0),),
    )
    base.update(fields)
    return MemberProfile(member_id, session, **base)


# name -> (member, what the message must say). Each is over exactly one limit of LIMITS.
OVER = {
    "member id": (ordinary("m" * 17), "member.member_id is 17 characters, the limit is 16"),
    "session id": (ordinary(session="s" * 17), "member.session_id is 17 characters, the limit is 16"),
    "profile fields": (ordinary(profile={"a": "1", "b": "2", "c": "3", "d": "4"}),
                       "member.profile has 4 fields, the limit is 3"),
    "profile name": (ordinary(profile={"headlines": "x"}),
                     "member.profile name 'headlines' is 9 characters, the limit is 8"),
    "profile value": (ordinary(profile={"about": "y" * 41}),
                      "member.profile['about'] is 41 characters, the limit is 40"),
    "features": (ordinary(features={"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}),
                 "member.features has 4 features, the limit is 3"),
    "feature name": (ordinary(features={"followers": 1.0}),
                     "member.features name 'followers' is 9 characters, the limit is 8"),
    "feature nan": (ordinary(features={"likes": float("nan")}), "member.features['likes'] must be a finite number, got nan"),
    "feature inf": (ordinary(features={"likes": float("inf")}), "member.features['likes'] must be a finite number, got inf"),
    "feature -inf": (ordinary(features={"likes": float("-inf")}), "member.features['likes'] must be a finite number, got -inf"),
    "activity items": (ordinary(recent_activity=tuple(ActivityItem(i, "t", "liked", i) for i in range(5))),
                       "member.recent_activity has 5 items, the limit is 4"),
    "activity text": (ordinary(recent_activity=(ActivityItem(1, "z" * 51, "liked", 1.0),)),
                      "member.recent_activity[0].text is 51 characters, the limit is 50"),
    "activity action": (ordinary(recent_activity=(ActivityItem(1, "t", "bookmarked", 1.0),)),
                        "member.recent_activity[0].action is 10 characters, the limit is 8"),
    "activity timestamp": (ordinary(recent_activity=(ActivityItem(1, "t", "liked", float("nan")),)),
                           "member.recent_activity[0].timestamp must be a finite number, got nan"),
    # Every field within its own limit, 16 + 16 + 3 x (1 + 40) = 155 together.
    "all together": (ordinary("m" * 16, "s" * 16, profile={k: "v" * 40 for k in "abc"}, features={},
                              recent_activity=()),
                     "member has 155 characters in all (ids, profile, feature names, activity), the limit is 150"),
}
# At every limit at once, 150 characters in all: accepted.
AT_LIMITS = ordinary("m" * 16, "s" * 16, profile={"ab": "v" * 40, "cd": "w" * 40}, features={"abcdefgh": 2.5},
                     recent_activity=(ActivityItem(0, "tt", "shared", 4.0),
                                      *(ActivityItem(i, "t", "liked", float(i)) for i in range(1, 4))))


def embed_request(member: MemberProfile) -> pb.EmbedRequest:
    req = pb.EmbedRequest()
    member.fill_proto(req.member)
    return req


def retrieve_request(member: MemberProfile, k: int = 5) -> pb.RetrieveRequest:
    req = pb.RetrieveRequest(k=k)
    member.fill_proto(req.member)
    return req


def words(n: int, seed: int = 0) -> str:
    """n characters of made-up words: real tokenizer work, unlike one repeated letter."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(2000)]
    out, size = [], 0
    while size < n:
        out.append(rng.choice(vocab))
        size += len(out[-1]) + 1
    return " ".join(out)[:n]


def largest_allowed(limits: MemberLimits, member_id: str, session: str) -> MemberProfile:
    """A member exactly at max_member_chars, as much of it as possible in profile values:
    the text that reaches the tokenizer whole (activity texts may be cut first)."""
    member_id = member_id.ljust(limits.max_id_chars, "-")
    session = session.ljust(limits.max_id_chars, "-")
    budget = limits.max_member_chars - len(member_id) - len(session)
    profile = {}
    while budget > 3 and len(profile) < limits.max_profile_fields:
        name = f"f{len(profile):02d}"
        profile[name] = words(min(limits.max_profile_chars, budget - len(name)), seed=len(profile))
        budget -= len(name) + len(profile[name])
    return MemberProfile(member_id, session, profile=profile)


# ---------------------------------------------------------------- servers


class GatedEncoder:
    """The real encoder behind a gate the test opens; records each pass's member ids."""

    def __init__(self, encoder) -> None:
        self.encoder = encoder
        self.model_version = encoder.model_version
        self.dim = encoder.dim
        self.passes: list[list[str]] = []
        self.started = threading.Event()
        self.gate = threading.Event()

    def embed_members(self, members):
        self.passes.append([m.member_id for m in members])
        self.started.set()
        assert self.gate.wait(30), "the test never opened the gate"
        return self.encoder.embed_members(members)


class CountingMember(MemberServicer):
    """The member service, counting the Embed calls that reach it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls = 0

    def Embed(self, request, context):
        self.calls += 1
        return super().Embed(request, context)


@pytest.fixture(scope="module")
def encoder():
    return Encoder.from_pretrained(MODEL)


def start_member(config: MemberConfig, encoder, max_concurrent_rpcs: int | None = None):
    """(server, address, servicer) of a member service on a free port."""
    servicer = CountingMember(config, encoder)
    server, _, port = build_server(
        "127.0.0.1", 0, 16, [lambda s: pb_grpc.add_MemberEmbeddingServiceServicer_to_server(servicer, s)],
        MEMBER_SERVICES, max_concurrent_rpcs=max_concurrent_rpcs,
    )
    server.start()
    return server, f"127.0.0.1:{port}", servicer


def start_shards(dim: int, sizes=(100, 100), servicer_class=ShardServicer, limits=(None, None)):
    """(servers, addresses, servicers): shard i holds sizes[i] random unit vectors (ids 1000·i + j)."""
    rng = np.random.default_rng(3)
    servers, addresses, servicers = [], [], []
    for shard, (n, limit) in enumerate(zip(sizes, limits)):
        state = ShardState(config=ShardConfig(shard_id=shard, num_shards=len(sizes)), topic="post-vectors")
        vecs = rng.normal(size=(n, dim)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        state.apply([(i, pb.PostVectorEvent(post_id=1000 * shard + i, op=pb.PostVectorEvent.UPSERT, vector=v.tolist(),
                                            created_at=1e9, lang="en", model_version=MODEL_VERSION)) for i, v in enumerate(vecs)],
                    now=2e9)
        servicer = servicer_class(state, "in-process")
        server, _, port = build_server(
            "127.0.0.1", 0, 8, [lambda s, sv=servicer: pb_grpc.add_ShardServiceServicer_to_server(sv, s)],
            shard_server.SERVICE_NAMES, max_concurrent_rpcs=limit,
        )
        server.start()
        servers.append(server)
        addresses.append(f"127.0.0.1:{port}")
        servicers.append(servicer)
    return servers, addresses, servicers


def start_root(shard_addresses, member_address: str, **config):
    """(server, stub) of a root over the shards and the member service."""
    servicer = root_server.RootServicer(
        RootConfig(shard_addresses=",".join(shard_addresses), member_address=member_address, hedge_after_ms=0, **config),
    )
    server, _, port = build_server("127.0.0.1", 0, 8,
                                   [lambda s: pb_grpc.add_RetrievalServiceServicer_to_server(servicer, s)],
                                   root_server.SERVICE_NAMES)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    return server, channel, pb_grpc.RetrievalServiceStub(channel)


def stop_all(root, root_channel, member, member_servicer, shards) -> None:
    """Stop what start_root, start_member and start_shards started."""
    root_channel.close()
    root.stop(0)
    member.stop(0)
    member_servicer.close()
    for s in shards:
        s.stop(0)


@pytest.fixture
def stack(encoder):
    """A member service whose passes wait on a gate, two shards, and a root, all with LIMITS."""
    gated = GatedEncoder(encoder)
    member, member_address, member_servicer = start_member(MemberConfig(**LIMITS), gated)
    shards, shard_addresses, _ = start_shards(encoder.dim)
    root, root_channel, root_stub = start_root(shard_addresses, member_address, **LIMITS)
    member_channel = grpc.insecure_channel(member_address)
    yield pb_grpc.MemberEmbeddingServiceStub(member_channel), root_stub, gated, member_servicer
    gated.gate.set()
    member_channel.close()
    stop_all(root, root_channel, member, member_servicer, shards)


# ---------------------------------------------------------------- member limits


@pytest.mark.parametrize("case", list(OVER))
def test_a_member_over_a_limit_is_refused_by_the_member_service_without_waiting_for_a_pass(stack, case):
    member_stub, _, gated, _ = stack
    # A pass is running and stays running: a refusal must not wait behind it.
    busy = member_stub.Embed.future(embed_request(ordinary("m-busy")), timeout=30)
    assert gated.started.wait(10)
    member, says = OVER[case]
    with pytest.raises(grpc.RpcError) as err:
        member_stub.Embed(embed_request(member), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == says
    assert not busy.done() and gated.passes == [["m-busy"]]  # refused while the pass still ran, never embedded
    gated.gate.set()
    assert len(busy.result().vector) == gated.dim


@pytest.mark.parametrize("case", list(OVER))
def test_a_member_over_a_limit_is_refused_by_the_root_before_it_calls_the_member_service(stack, case):
    _, root_stub, gated, member_servicer = stack
    member, says = OVER[case]
    with pytest.raises(grpc.RpcError) as err:
        root_stub.Retrieve(retrieve_request(member), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == says
    assert member_servicer.calls == 0 and gated.passes == []


def test_a_member_at_every_limit_is_embedded_and_retrieved(stack, encoder):
    member_stub, root_stub, gated, _ = stack
    gated.gate.set()
    reply = member_stub.Embed(embed_request(AT_LIMITS), timeout=30)
    np.testing.assert_allclose(reply.vector, encoder.embed_members([AT_LIMITS])[0], atol=1e-5)
    found = root_stub.Retrieve(retrieve_request(AT_LIMITS, k=5), timeout=30)
    assert len(found.candidates.post_ids) == 5 and not found.partial


def test_with_the_default_limits_the_issues_5_mb_profile_is_refused_by_both(encoder):
    gated = GatedEncoder(encoder)
    member, member_address, member_servicer = start_member(MemberConfig(), gated)
    shards, shard_addresses, _ = start_shards(encoder.dim)
    root, root_channel, root_stub = start_root(shard_addresses, member_address)
    try:
        heavy = ordinary("m-heavy", profile={"about": ISSUE_PROFILE})
        says = "member.profile['about'] is 5000000 characters, the limit is 4096"
        with grpc.insecure_channel(member_address) as channel:
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.MemberEmbeddingServiceStub(channel).Embed(embed_request(heavy), timeout=30)
        assert (err.value.code(), err.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, says)
        with pytest.raises(grpc.RpcError) as err:
            root_stub.Retrieve(retrieve_request(heavy), timeout=30)
        assert (err.value.code(), err.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, says)
        assert gated.passes == []
        # The largest member the defaults allow is embedded.
        gated.gate.set()
        largest = largest_allowed(MemberConfig(), "m-largest", "s-1")
        assert sum(map(len, largest.profile.values())) + len(largest.profile) * 3 + 2 * 256 == MemberConfig().max_member_chars
        assert len(root_stub.Retrieve(retrieve_request(largest), timeout=30).candidates.post_ids) == 5
    finally:
        stop_all(root, root_channel, member, member_servicer, shards)


def test_both_roles_read_the_limits_from_the_same_variables(monkeypatch):
    monkeypatch.setenv("FEEDRET_MAX_PROFILE_CHARS", "100")
    monkeypatch.setenv("FEEDRET_MAX_MEMBER_CHARS", "1000")
    monkeypatch.setenv("FEEDRET_MAX_CONCURRENT_RPCS", "5")
    for config in (MemberConfig(), RootConfig()):
        assert (config.max_profile_chars, config.max_member_chars, config.max_concurrent_rpcs) == (100, 1000, 5)
        assert config.max_activity_chars == 20_000  # the rest keep their defaults
    monkeypatch.setenv("FEEDRET_MAX_EXCLUDE_POST_IDS", "7")
    assert RootConfig().max_exclude_post_ids == 7


# ---------------------------------------------------------------- filters


def test_filters_over_their_limits_are_refused_by_the_root_and_at_them_answered(encoder):
    shards, shard_addresses, _ = start_shards(encoder.dim)
    root, channel, stub = start_root(shard_addresses, "", max_exclude_post_ids=50, max_languages=2)
    query = np.random.default_rng(5).normal(size=encoder.dim).tolist()
    try:
        def retrieve(**filters):
            return stub.Retrieve(pb.RetrieveRequest(k=10, vector=pb.QueryVector(values=query),
                                                    filters=pb.Filters(**filters)), timeout=30)

        for filters, says in [
            (dict(exclude_post_ids=list(range(51))), "filters.exclude_post_ids has 51 ids, the limit is 50"),
            (dict(languages=["en", "de", "fr"]), "filters.languages has 3 languages, the limit is 2"),
        ]:
            with pytest.raises(grpc.RpcError) as err:
                retrieve(**filters)
            assert (err.value.code(), err.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, says)
        reply = retrieve(exclude_post_ids=list(range(50)), languages=["en", "de"])
        assert len(reply.candidates.post_ids) == 10 and not set(reply.candidates.post_ids) & set(range(50))
    finally:
        channel.close()
        root.stop(0)
        for s in shards:
            s.stop(0)


@pytest.mark.parametrize("obj, says", [
    ({"member_id": "m", "recent_activity": "Alien"}, "recent_activity must be an array"),
    ({"member_id": "m", "recent_activities": []}, "unknown field 'recent_activities'"),
    ({"member_id": "m", "features": {"x": "many"}}, "features.x must be a finite number"),
    ({"member_id": 5}, "member_id must be a non-empty string"),
])
def test_member_json_of_the_wrong_shape_names_the_field_for_library_users_too(obj, says):
    from feedret.members import InvalidMember, MemberProfile

    with pytest.raises(InvalidMember, match=says):
        MemberProfile.from_json(obj)
