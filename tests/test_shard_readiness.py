"""A shard replica is ready (SERVING, answering Search and Lookup) only once it has caught up with its partition."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest

from feedret.config import KafkaConfig, ShardConfig
from feedret.indexer.applier import CatchUp
from feedret.indexer.replica import ShardState
from feedret.server.grpc_common import RpcFailure
from feedret.indexer.applier import PartitionApplier
from feedret.server.shard import ShardServicer
from feedret.v1 import feedret_pb2 as pb

from conftest import tansu_broker


class Context:
    def abort(self, code, details):
        raise RpcFailure(code, details)

    def time_remaining(self):
        return None  # no deadline, as grpc reports it


def upsert(post_id: int, dim: int = 8) -> pb.PostVectorEvent:
    v = np.random.default_rng(post_id).normal(size=dim).astype(np.float32)
    return pb.PostVectorEvent(post_id=post_id, op=pb.PostVectorEvent.UPSERT, vector=(v / np.linalg.norm(v)).tolist(),
                              created_at=1e9, lang="en", model_version="m1")


# ---------------------------------------------------------------- when "caught up" is


def test_nothing_is_caught_up_before_a_fetch_has_answered():
    # The first polls of a new consumer return nothing while its first fetch is in
    # flight: an empty poll does not mean the backlog is applied.
    catch_up = CatchUp(listed_end=0)
    assert not catch_up.observe(position=0, highwater=None)
    assert catch_up.observe(position=0, highwater=0)  # an empty partition, once the broker said so


def test_the_end_is_the_larger_of_the_listed_end_and_the_first_high_watermark():
    # The embedded broker lists the start of the last batch (8) for a partition ending at 12.
    catch_up = CatchUp(listed_end=8)
    assert not catch_up.observe(position=8, highwater=12)
    assert catch_up.target == 12
    assert not catch_up.observe(position=11, highwater=12)
    assert catch_up.observe(position=12, highwater=12)
    # A listed end past the first fetch's watermark (records landed between the two) is kept.
    catch_up = CatchUp(listed_end=30)
    assert not catch_up.observe(position=20, highwater=20) and catch_up.observe(position=30, highwater=31)


def test_the_end_is_fixed_at_start_so_a_busy_partition_does_not_keep_a_replica_out():
    catch_up = CatchUp(listed_end=100)
    assert not catch_up.observe(position=50, highwater=100)
    assert catch_up.observe(position=100, highwater=250)  # posts kept arriving: still caught up with the start


# ---------------------------------------------------------------- what a replica answers meanwhile


def test_a_replica_not_ready_refuses_search_and_lookup_as_unavailable_but_answers_stats():
    state = ShardState(config=ShardConfig(shard_id=1, num_shards=2), topic="post-vectors")
    state.apply([(i, upsert(100 + i)) for i in range(5)], now=2e9)
    state.end_offset = 40
    ready = threading.Event()
    servicer = ShardServicer(state, "10.0.0.7:50061", ready)
    query = pb.SearchRequest(vector=upsert(100).vector, k=3)

    for call in (lambda: servicer.Search(query, Context()),
                 lambda: servicer.Lookup(pb.LookupRequest(post_id=100), Context())):
        with pytest.raises(RpcFailure) as err:
            call()
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
        assert "shard 1 replica 10.0.0.7:50061 is not ready" in str(err.value)
        assert "applied offset 5 of 40" in str(err.value)
    stats = servicer.Stats(pb.StatsRequest(), Context()).shards[0]
    assert not stats.ready and stats.searches == 0 and stats.indexed == 5
    assert stats.end_offset == 40 and stats.applied[0].offset == 5

    ready.set()
    assert list(servicer.Search(query, Context()).candidates.post_ids)[0] == 100
    assert servicer.Lookup(pb.LookupRequest(post_id=100), Context()).found
    servicer.Search(query, Context())
    stats = servicer.Stats(pb.StatsRequest(), Context()).shards[0]
    assert stats.ready and stats.searches == 2  # Lookup is not a search


def test_in_process_use_without_an_applier_is_ready_at_once():
    state = ShardState(config=ShardConfig(), topic="post-vectors")
    state.apply([(0, upsert(7))], now=2e9)
    servicer = ShardServicer(state, "in-process")
    assert list(servicer.Search(pb.SearchRequest(vector=upsert(7).vector, k=1), Context()).candidates.post_ids) == [7]


# ---------------------------------------------------------------- the applier's loop


class ScriptedConsumer:
    """A partition read through a scripted sequence of polls: "empty" (no fetch answered, or a slow
    one) or a batch size. The high watermark is known once the first batch arrived, as in kafka-python."""

    def __init__(self, n: int, script: list, listed_end: int) -> None:
        from types import SimpleNamespace

        self.records = [SimpleNamespace(offset=i, key=str(i).encode(), value=upsert(i).SerializeToString()) for i in range(n)]
        self.script, self.listed_end = list(script), listed_end
        self.at, self.hw = 0, None

    def end_offsets(self, tps):
        return {tp: self.listed_end for tp in tps}

    def poll(self, timeout_ms):
        step = self.script.pop(0) if self.script else 50
        if step == "empty":
            return {}
        batch = self.records[self.at : self.at + step]
        self.at += len(batch)
        self.hw = len(self.records)
        return {"tp": batch} if batch else {}

    def highwater(self, tp):
        return self.hw

    def position(self, tp):
        return self.at


@pytest.mark.parametrize(
    "script",
    [["empty", "empty", "empty", 50], [50, "empty", 50, "empty", "empty", 50]],
    ids=["first-fetch-slow", "empty-polls-mid-backlog"],
)
def test_empty_polls_before_the_end_do_not_make_a_replica_ready(script):
    n = 400
    state = ShardState(config=ShardConfig(shard_id=0, num_shards=1), topic="post-vectors")
    seen: list[int] = []
    applier = PartitionApplier(KafkaConfig(), state, on_caught_up=lambda: (seen.append(state.applied_offset),
                                                                           applier.stop_event.set()))
    applier._loop(ScriptedConsumer(n, script, listed_end=n - 20), "tp")
    assert seen == [n] and state.upserts == n


# ---------------------------------------------------------------- against a real broker


@pytest.fixture
def broker():
    with tansu_broker() as bootstrap:
        yield KafkaConfig(KAFKA_BOOTSTRAP_SERVERS=bootstrap, vectors_topic="vectors-readiness")


@pytest.mark.e2e
def test_a_replica_turns_ready_only_with_the_whole_backlog_applied(broker):
    from kafka import KafkaProducer

    from feedret.topics import ensure_topics

    ensure_topics(broker, num_shards=1)
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers, linger_ms=5, batch_size=4096)
    n = 1500
    for i in range(n):  # many small batches, so the broker's listed end is far from the real one
        producer.send(broker.vectors_topic, partition=0, value=upsert(i).SerializeToString())
    producer.flush()
    producer.close()

    state = ShardState(config=ShardConfig(shard_id=0, num_shards=1, apply_batch_max=50), topic=broker.vectors_topic)
    seen: list[tuple[int, int]] = []
    done = threading.Event()
    applier = PartitionApplier(
        broker, state, on_caught_up=lambda: (seen.append((state.applied_offset, len(state.index))), done.set())
    )
    applier.start()
    try:
        assert done.wait(60), "never caught up"
        # At the moment it turned ready, every record on the partition at start was applied.
        assert seen == [(n, n)]
    finally:
        applier.stop_event.set()
        applier.join(10)
