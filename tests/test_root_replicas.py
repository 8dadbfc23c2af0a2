"""The root over replicated in-process shard servers (no broker): spread, failover, readiness, Stats.

Each shard has replicas holding the same posts, as replicas reading the same
partition do; a replica can be marked not ready, or be an address nobody serves.
"""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest

from feedret.config import RootConfig, ShardConfig
from feedret.indexer.replica import ShardState
from feedret.routing import shard_of
from feedret.server import root as root_server
from feedret.server import shard as shard_server
from feedret.server.grpc_common import build_server, connection_age_options
from feedret.server.shard import ShardServicer
from feedret.v1 import feedret_pb2 as pb
from feedret.v1 import feedret_pb2_grpc as pb_grpc

from conftest import free_port

DIM = 16
PER_SHARD = 100


class Replicas:
    """shards x replicas servers; each shard holds PER_SHARD posts that route to it (shard_of)."""

    def __init__(self, shards: int = 2, replicas: int = 2) -> None:
        rng = np.random.default_rng(7)
        self.vectors: dict[int, np.ndarray] = {}
        self.servers, self.servicers, self.addresses, self.ids = [], [], [], []
        for shard in range(shards):
            ids = [p for p in range(100 * PER_SHARD) if shard_of(p, shards) == shard][:PER_SHARD]
            vecs = rng.normal(size=(PER_SHARD, DIM)).astype(np.float32)
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
            self.vectors.update(dict(zip(ids, vecs)))
            self.ids.append(ids)
            row_servicers, row_addresses = [], []
            for _ in range(replicas):
                state = ShardState(config=ShardConfig(shard_id=shard, num_shards=shards), topic="post-vectors")
                state.apply([(i, pb.PostVectorEvent(post_id=p, op=pb.PostVectorEvent.UPSERT, vector=v.tolist(),
                                                    created_at=1e9, lang="en", model_version="m1"))
                             for i, (p, v) in enumerate(zip(ids, vecs))], now=2e9)
                ready = threading.Event()
                ready.set()
                servicer = ShardServicer(state, "in-process", ready)
                server, _, port = build_server(
                    "127.0.0.1", 0, 4,
                    [lambda s, sv=servicer: pb_grpc.add_ShardServiceServicer_to_server(sv, s),
                     lambda s, sv=servicer: pb_grpc.add_IndexAdminServicer_to_server(sv, s)],
                    shard_server.SERVICE_NAMES,
                )
                server.start()
                self.servers.append(server)
                row_servicers.append(servicer)
                row_addresses.append(f"127.0.0.1:{port}")
            self.servicers.append(row_servicers)
            self.addresses.append(row_addresses)

    def stop(self) -> None:
        for server in self.servers:
            server.stop(0)


@pytest.fixture
def replicas():
    r = Replicas()
    yield r
    r.stop()


@pytest.fixture
def root_for():
    servers = []

    def start(shard_addresses: str, **config):
        servicer = root_server.RootServicer(
            RootConfig(shard_addresses=shard_addresses, member_address=f"127.0.0.1:{free_port()}", **config),
        )
        server, _, port = build_server("127.0.0.1", 0, 4,
                                       [lambda s: pb_grpc.add_RetrievalServiceServicer_to_server(servicer, s),
                                        lambda s: pb_grpc.add_IndexAdminServicer_to_server(servicer, s)],
                                       root_server.SERVICE_NAMES)
        server.start()
        servers.append(server)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        return pb_grpc.RetrievalServiceStub(channel), pb_grpc.IndexAdminStub(channel)

    yield start
    for server in servers:
        server.stop(0)


def retrieve(stub, vector: np.ndarray, k: int = 20) -> pb.RetrieveResponse:
    return stub.Retrieve(pb.RetrieveRequest(k=k, vector=pb.QueryVector(values=vector.tolist())), timeout=5)


def exact(vectors: dict[int, np.ndarray], q: np.ndarray, k: int) -> list[int]:
    ids = np.array(sorted(vectors))
    return ids[np.argsort(-(np.stack([vectors[i] for i in ids]) @ q), kind="stable")[:k]].tolist()


def spec(addresses: list[list[str]]) -> str:
    return ",".join("|".join(row) for row in addresses)


def test_queries_spread_over_every_replica_and_stats_show_each(replicas, root_for):
    retrieval, admin = root_for(spec(replicas.addresses))
    queries = list(replicas.vectors.values())[:12]
    for q in queries:
        reply = retrieve(retrieval, q)
        assert not reply.partial and list(reply.candidates.post_ids) == exact(replicas.vectors, q, 20)
    assert [[s.searches for s in row] for row in replicas.servicers] == [[6, 6], [6, 6]]
    stats = admin.Stats(pb.StatsRequest(), timeout=5)
    assert stats.total_indexed == 2 * PER_SHARD  # a shard's posts count once, however many replicas hold them
    for shard, entry in enumerate(stats.shards):
        assert entry.address == "|".join(replicas.addresses[shard])
        assert [(r.address, r.searches, r.indexed, r.ready) for r in entry.replicas] == [
            (a, 6, PER_SHARD, True) for a in replicas.addresses[shard]]
        assert entry.searches == 12 and entry.indexed == PER_SHARD and entry.ready


def test_a_replica_catching_up_is_skipped_and_a_dead_one_too(replicas, root_for):
    replicas.servicers[0][1].ready.clear()  # catching up: answers UNAVAILABLE
    dead = f"127.0.0.1:{free_port()}"
    addresses = [replicas.addresses[0], [replicas.addresses[1][0], dead]]
    retrieval, admin = root_for(spec(addresses), replica_cooldown_s=0)  # every other query asks them first
    for q in list(replicas.vectors.values())[:8]:
        reply = retrieve(retrieval, q)
        assert not reply.partial and list(reply.candidates.post_ids) == exact(replicas.vectors, q, 20)
    assert replicas.servicers[0][1].searches == 0 and replicas.servicers[0][0].searches == 8
    for post_id in replicas.ids[0][:3] + replicas.ids[1][:3]:  # Lookup skips them the same way
        assert admin.Lookup(pb.LookupRequest(post_id=post_id), timeout=5).found
    stats = admin.Stats(pb.StatsRequest(), timeout=5)
    assert [(r.reachable, r.ready) for r in stats.shards[0].replicas] == [(True, True), (True, False)]
    assert [(r.reachable, r.ready) for r in stats.shards[1].replicas] == [(True, True), (False, False)]
    assert stats.shards[0].ready and stats.shards[1].reachable and stats.total_indexed == 2 * PER_SHARD


def test_a_shard_with_no_replica_answering_is_partial_and_its_stats_say_why(replicas, root_for):
    for servicer in replicas.servicers[1]:
        servicer.ready.clear()
    retrieval, admin = root_for(spec(replicas.addresses))
    q = replicas.vectors[replicas.ids[0][3]]
    reply = retrieve(retrieval, q)
    assert reply.partial and list(reply.failed_shards) == [1]
    assert list(reply.candidates.post_ids) == exact({i: replicas.vectors[i] for i in replicas.ids[0]}, q, 20)
    with pytest.raises(grpc.RpcError) as err:
        admin.Lookup(pb.LookupRequest(post_id=replicas.ids[1][3]), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "not ready" in err.value.details()
    entry = admin.Stats(pb.StatsRequest(), timeout=5).shards[1]
    assert entry.reachable and not entry.ready and len(entry.replicas) == 2


def test_a_bad_request_is_refused_not_retried_on_other_replicas(replicas, root_for):
    from prometheus_client import REGISTRY

    def searches_started() -> float:
        return REGISTRY.get_sample_value("grpc_server_started_total", {
            "grpc_type": "unary", "grpc_service": shard_server.SERVICE_NAMES[0], "grpc_method": "Search"}) or 0.0

    retrieval, _ = root_for(spec(replicas.addresses))  # a fresh root: it does not know the width yet
    before = searches_started()
    with pytest.raises(grpc.RpcError) as err:  # the shards refuse the width
        retrieval.Retrieve(pb.RetrieveRequest(k=5, vector=pb.QueryVector(values=[0.1] * (DIM + 1))), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and f"the index serves {DIM}" in err.value.details()
    assert searches_started() - before <= 2  # one replica per shard asked; no failover for the caller's mistake


@pytest.mark.parametrize("max_age_s, recycled", [(0.3, True), (0, False)])
def test_shards_end_connections_after_their_max_age_so_a_dns_pool_is_re_resolved(max_age_s, recycled):
    # gRPC re-resolves a target (finds replicas added to a headless Service) only when a
    # connection ends; shards end theirs after FEEDRET_MAX_CONNECTION_AGE_S.
    servicer = ShardServicer(ShardState(config=ShardConfig(), topic="post-vectors"), "in-process")
    server, _, port = build_server("127.0.0.1", 0, 2, [lambda s: pb_grpc.add_IndexAdminServicer_to_server(servicer, s)],
                                   shard_server.SERVICE_NAMES, connection_age_options(max_age_s))
    server.start()
    seen: list[grpc.ChannelConnectivity] = []
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            pb_grpc.IndexAdminStub(channel).Stats(pb.StatsRequest(), timeout=5)
            channel.subscribe(seen.append)
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline and grpc.ChannelConnectivity.IDLE not in seen:
                time.sleep(0.05)
    finally:
        server.stop(0)
    assert (grpc.ChannelConnectivity.IDLE in seen) is recycled, seen
