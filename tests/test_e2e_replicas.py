"""Two shards with two replicas each (`feedret up --replicas 2`): queries spread over the replicas,
survive a killed or hung replica complete and in time, and a replica that is catching up is not asked."""

from __future__ import annotations

import json
import signal
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from feedret.routing import shard_of
from feedret.server.launcher import is_serving, wait_for_port
from feedret.v1 import feedret_pb2 as pb
from feedret.v1 import feedret_pb2_grpc as pb_grpc

from conftest import sample_lines, scrape, start_stack, wait_for

pytestmark = pytest.mark.e2e

N_POSTS = 200
# No cooldown: rotation alone decides which replica a query asks first, so half the
# queries start on a broken replica and only failover or hedging can save them.
ENV = {"FEEDRET_REPLICA_COOLDOWN_S": "0", "FEEDRET_HEDGE_AFTER_MS": "50"}


@pytest.fixture(scope="module")
def replicated(tmp_path_factory):
    yield from start_stack(tmp_path_factory.mktemp("replicas"), n_posts=N_POSTS, num_shards=2, replicas=2, env=ENV)


def query_vector() -> list[float]:
    v = np.random.default_rng(3).normal(size=128).astype(np.float32)
    return (v / np.linalg.norm(v)).tolist()


def replica_stats(running, shard: int) -> dict[str, pb.ShardStats]:
    return {r.address: r for r in running.client.stats(timeout=5).shards[shard].replicas}


def admin(address: str) -> pb_grpc.IndexAdminStub:
    return pb_grpc.IndexAdminStub(grpc.insecure_channel(address))


def health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status


def hedges(stack) -> float:
    """Successful hedged calls to shard 0, from the root's /metrics."""
    samples = scrape(stack.metrics_urls()["root"])
    key = ("feedret_root_replica_attempts_total", (("kind", "hedge"), ("result", "ok"), ("shard", "0")))
    return samples.get(key, 0.0)


def timed_retrieve(client, k: int, timeout: float):
    started = time.monotonic()
    result = client.retrieve(vector=query_vector(), k=k, timeout=timeout)
    return result, time.monotonic() - started


def test_every_post_is_retrievable_and_queries_spread_over_both_replicas_of_each_shard(replicated):
    running, stack = replicated, replicated.stack

    def replicas_agree() -> bool:
        # The stack is up once each shard's most caught-up replica holds its posts; the
        # other replica reads the same partition on its own and may be a batch behind.
        return all(r.indexed == s.indexed for s in running.client.stats(timeout=5).shards for r in s.replicas)

    assert wait_for(replicas_agree, timeout=30)
    stats = running.client.stats(timeout=5)
    assert stats.total_indexed == N_POSTS
    for shard in stats.shards:
        replicas = list(shard.replicas)
        assert [r.address for r in replicas] == [stack.config.shard_address(shard.shard, r) for r in range(2)]
        # Each replica read the whole partition on its own: both hold every post of the shard.
        assert all(r.reachable and r.ready for r in replicas)
        assert replicas[0].indexed == replicas[1].indexed == shard.indexed > 0
    ids = {json.loads(line)["post_id"] for line in sample_lines(N_POSTS)}
    result = running.client.retrieve(vector=query_vector(), k=N_POSTS, timeout=5)
    assert not result.partial and set(result.post_ids) == ids
    assert all(running.client.lookup(p).found for p in list(ids)[:20])

    before = {s: {a: r.searches for a, r in replica_stats(running, s).items()} for s in (0, 1)}
    for _ in range(20):
        assert not running.client.retrieve(vector=query_vector(), k=10, timeout=2).partial
    for s in (0, 1):
        served = {a: r.searches - before[s][a] for a, r in replica_stats(running, s).items()}
        # Round robin: about 10 each (a hedge under load may add one).
        assert all(n >= 8 for n in served.values()), served


def test_with_a_replica_killed_answers_stay_complete_and_in_time(replicated):
    running, stack = replicated, replicated.stack
    before = running.client.retrieve(vector=query_vector(), k=50, timeout=2)
    assert not before.partial
    stack.kill("shard-1-1", signal.SIGKILL)
    try:
        for timeout in [0.5] * 6 + [2.0]:
            after, took = timed_retrieve(running.client, 50, timeout)
            assert not after.partial and list(after.failed_shards) == []
            assert list(after.post_ids) == list(before.post_ids)
            assert took < timeout + 0.05
        on_shard_1 = next(p for p in before.post_ids if shard_of(p, 2) == 1)
        assert running.client.lookup(on_shard_1).found  # Lookup fails over too
        shard_1 = running.client.stats(timeout=5).shards[1]
        assert shard_1.reachable and [r.reachable for r in shard_1.replicas] == [True, False]
    finally:
        stack.start_role("shard-1-1")
        stack.wait_serving(["shard-1-1"], 60)


def test_a_hung_replica_is_hedged_around_within_the_deadline(replicated):
    running, stack = replicated, replicated.stack
    expected = running.client.retrieve(vector=query_vector(), k=30, timeout=2).post_ids
    hung = stack.procs["shard-0-1"]
    hedges_before = hedges(stack)
    hung.send_signal(signal.SIGSTOP)  # port open, never answers
    try:
        took = []
        for _ in range(10):
            result, seconds = timed_retrieve(running.client, 30, 1.0)
            # Without hedging every other query would wait for the hung replica until the
            # deadline and come back partial.
            assert not result.partial and list(result.post_ids) == list(expected)
            assert seconds < 1.0
            took.append(seconds)
        # Half of them were hedged after 50 ms: none came near the deadline.
        assert sorted(took)[len(took) // 2] < 0.5, took
        # ... and the root's metrics say so: hedges to shard 0 that answered.
        assert hedges(stack) - hedges_before >= 4
    finally:
        hung.send_signal(signal.SIGCONT)
    assert wait_for(lambda: replica_stats(running, 0)[stack.config.shard_address(0, 1)].reachable, timeout=10)


def test_a_replica_started_late_is_not_serving_until_it_has_caught_up(replicated):
    running, stack = replicated, replicated.stack
    name, address = "shard-0-1", stack.config.shard_address(0, 1)
    peer = admin(stack.config.shard_address(0, 0)).Stats(pb.StatsRequest(), timeout=5).shards[0]
    stack.kill(name, signal.SIGKILL)
    broker = stack.procs["broker"]
    broker.send_signal(signal.SIGSTOP)  # the new replica cannot read its partition yet
    try:
        stack.start_role(name)
        host, port = address.rsplit(":", 1)
        wait_for_port(host, int(port), 60)
        waited_until = time.monotonic() + 1.5
        while time.monotonic() < waited_until:
            assert health(address) == health_pb2.HealthCheckResponse.NOT_SERVING
            time.sleep(0.1)
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.ShardServiceStub(grpc.insecure_channel(address)).Search(
                pb.SearchRequest(vector=query_vector(), k=5), timeout=2)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "not ready" in err.value.details()
        # The root asks the other replica instead: complete answers meanwhile.
        for _ in range(4):
            assert not running.client.retrieve(vector=query_vector(), k=10, timeout=2).partial
    finally:
        broker.send_signal(signal.SIGCONT)

    # The first time it says SERVING, it holds everything its peer holds.
    assert wait_for(lambda: is_serving(address), timeout=60, interval=0.02)
    caught_up = admin(address).Stats(pb.StatsRequest(), timeout=5).shards[0]
    assert caught_up.ready and caught_up.indexed == peer.indexed
    assert caught_up.applied[0].offset >= peer.applied[0].offset
    before = replica_stats(running, 0)[address].searches
    for _ in range(6):
        assert not running.client.retrieve(vector=query_vector(), k=10, timeout=2).partial
    assert replica_stats(running, 0)[address].searches - before >= 2  # back in rotation
