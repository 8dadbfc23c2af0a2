"""The root's fan-out over in-process shard servers: merged answers, partial replies, and no thread per request.

A grpc future on an idle channel starts a polling thread for each call; the root
runs shard calls on a long-lived pool instead (benchmarks/results/search_latency_1m.md
has what that cost).
"""

from __future__ import annotations

import socket
import threading

import grpc
import numpy as np
import pytest

from feedret.config import KafkaConfig, RootConfig, ShardConfig
from feedret.server import root as root_server
from feedret.server import shard as shard_server
from feedret.server.grpc_common import build_server
from feedret.server.shard import ShardServicer, ShardState
from feedret.v1 import feedret_pb2 as pb
from feedret.v1 import feedret_pb2_grpc as pb_grpc

DIM = 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def two_shards():
    """Two shard servers on free ports; post ids 0..199 on shard 0, 1000..1199 on shard 1."""
    rng = np.random.default_rng(1)
    servers, addresses, vectors = [], [], {}
    for shard in range(2):
        state = ShardState(config=ShardConfig(shard_id=shard, num_shards=2), topic="post-vectors")
        vecs = rng.normal(size=(200, DIM)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        events = [(i, pb.PostVectorEvent(post_id=1000 * shard + i, op=pb.PostVectorEvent.UPSERT, vector=v.tolist(),
                                         created_at=1e9, lang="en", model_version="m1"))
                  for i, v in enumerate(vecs)]
        state.apply(events, now=2e9)
        vectors.update({1000 * shard + i: v for i, v in enumerate(vecs)})
        servicer = ShardServicer(state, "in-process")
        server, _, port = build_server("127.0.0.1", 0, 4, [lambda s, sv=servicer: pb_grpc.add_ShardServiceServicer_to_server(sv, s)],
                                       shard_server.SERVICE_NAMES)
        server.start()
        servers.append(server)
        addresses.append(f"127.0.0.1:{port}")
    yield addresses, vectors
    for server in servers:
        server.stop(0)


def start_root(addresses: list[str]):
    servicer = root_server.RootServicer(
        RootConfig(shard_addresses=",".join(addresses), member_address=f"127.0.0.1:{free_port()}"), KafkaConfig()
    )
    server, _, port = build_server("127.0.0.1", 0, 4,
                                   [lambda s: pb_grpc.add_RetrievalServiceServicer_to_server(servicer, s)],
                                   root_server.SERVICE_NAMES)
    server.start()
    return server, f"127.0.0.1:{port}"


def test_the_root_merges_both_shards_exactly_and_starts_no_thread_per_request(two_shards, monkeypatch):
    addresses, vectors = two_shards
    ids = np.array(sorted(vectors))
    matrix = np.stack([vectors[i] for i in ids])
    server, root = start_root(addresses)
    try:
        with grpc.insecure_channel(root) as channel:
            stub = pb_grpc.RetrievalServiceStub(channel)

            def retrieve(q, k):
                return stub.Retrieve(pb.RetrieveRequest(k=k, vector=pb.QueryVector(values=q.tolist())), timeout=5)

            for q in matrix[:5]:  # warm up: pools and channels
                retrieve(q, 10)
            started = []
            original = threading.Thread.start
            monkeypatch.setattr(threading.Thread, "start", lambda self: (started.append(self.name), original(self))[1])
            for q in matrix[10:40]:
                reply = retrieve(q, 50)
                expected = ids[np.argsort(-(matrix @ q), kind="stable")[:50]]
                assert list(reply.candidates.post_ids) == expected.tolist()
                assert set(reply.candidates.shards) == {0, 1} and not reply.partial
            monkeypatch.undo()
            # The servers' own bounded worker pools may still add a worker; nothing may start per request.
            # (grpc futures started 2 polling threads per request here: 60 in 30 requests).
            assert len(started) < 10, started
    finally:
        server.stop(0)


def test_a_dead_shard_makes_the_reply_partial_and_a_bad_request_is_refused(two_shards):
    addresses, vectors = two_shards
    server, root = start_root([addresses[0], f"127.0.0.1:{free_port()}"])
    try:
        with grpc.insecure_channel(root) as channel:
            stub = pb_grpc.RetrievalServiceStub(channel)
            q = vectors[3]
            reply = stub.Retrieve(pb.RetrieveRequest(k=20, vector=pb.QueryVector(values=q.tolist())), timeout=5)
            assert reply.partial and list(reply.failed_shards) == [1] and reply.candidates.post_ids[0] == 3
            with pytest.raises(grpc.RpcError) as err:  # the shard refuses the width: INVALID_ARGUMENT passes through
                stub.Retrieve(pb.RetrieveRequest(k=20, vector=pb.QueryVector(values=[0.5] * (DIM + 1))), timeout=5)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        server.stop(0)
