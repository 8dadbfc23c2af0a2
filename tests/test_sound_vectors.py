"""Shards index only sound post vectors (finite, non-zero, the right width, unit length), and no
server ever hands out a non-finite score: whatever else lands on `post-vectors` is counted,
logged and skipped, and a post keeps its earlier vector."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
from structlog.testing import capture_logs

from feedret.config import KafkaConfig, ShardConfig
from feedret.indexer.replica import ShardState
from feedret.indexer.vectors import UNIT_NORM_TOLERANCE, VectorProblem, check_vector, check_vectors
from feedret.merge import ShardHits, merge_topk
from feedret.server.grpc_common import fill_candidates
from feedret.server.shard import ShardServicer
from feedret.v1 import feedret_pb2 as pb
from feedret.v1 import feedret_pb2_grpc as pb_grpc

from conftest import free_port, tansu_broker, wait_for

D = 16


def unit(seed: int, n: int = 1, d: int = D) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def e0(scale: float = 1.0, d: int = D) -> np.ndarray:
    """A vector along the first axis: the query below scores it highest of all."""
    v = np.zeros(d, np.float32)
    v[0] = scale
    return v


def upsert(post_id: int, vector, model_version: str = "m1") -> pb.PostVectorEvent:
    return pb.PostVectorEvent(post_id=post_id, op=pb.PostVectorEvent.UPSERT, vector=np.asarray(vector).tolist(),
                              created_at=1e9, lang="en", model_version=model_version)


def bf16(v: np.ndarray) -> np.ndarray:
    """float32 rounded to bfloat16 (8 significant bits, round to nearest even), back in float32."""
    bits = np.ascontiguousarray(v, np.float32).view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return rounded.astype(np.uint32).view(np.float32)


# What a broken model, or any other writer of the topic, can put there.
NAN = e0().copy()
NAN[3] = np.nan
UNSOUND = {
    "nan": (NAN, VectorProblem.NON_FINITE),
    "inf": (e0(np.inf), VectorProblem.NON_FINITE),
    "zero": (np.zeros(D, np.float32), VectorProblem.ZERO),
    "norm-1e30": (e0(1e30), VectorProblem.NOT_UNIT),
    "norm-1.05": (unit(7)[0] * 1.05, VectorProblem.NOT_UNIT),
    "wrong-width": (unit(8, d=D // 2)[0], VectorProblem.WRONG_WIDTH),
}


class Context:
    def abort(self, code, details):
        raise AssertionError(f"{code.name}: {details}")

    def time_remaining(self):
        return None


# ---------------------------------------------------------------- the check itself


@pytest.mark.parametrize("name", list(UNSOUND))
def test_each_kind_of_unsound_vector_is_named(name):
    vector, problem = UNSOUND[name]
    assert check_vector(vector, D) is problem


def test_unit_vectors_pass_also_as_a_float16_or_bfloat16_model_leaves_them():
    vecs = unit(1, n=500, d=1024)
    for rounded in (vecs, vecs.astype(np.float16).astype(np.float32), bf16(vecs)):
        assert check_vectors(rounded) == [None] * 500
    # The tolerance's edge, either side.
    assert check_vector(e0(1 + 0.9 * UNIT_NORM_TOLERANCE), D) is None
    assert check_vector(e0(1 - 1.1 * UNIT_NORM_TOLERANCE), D) is VectorProblem.NOT_UNIT
    assert check_vector([], 0) is VectorProblem.WRONG_WIDTH


# ---------------------------------------------------------------- a shard applying them


def test_a_shard_indexes_only_the_sound_vectors_of_a_mixed_run_and_counts_logs_and_skips_the_rest():
    state = ShardState(config=ShardConfig(shard_id=0, num_shards=1), topic="post-vectors")
    first = unit(100, n=5)
    state.apply([(i, upsert(1 + i, v)) for i, v in enumerate(first)], now=2e9)

    sound_15, new_2, bf16_16 = unit(15)[0], unit(2)[0], bf16(unit(16)[0])
    run = [
        upsert(10, UNSOUND["nan"][0]),
        upsert(11, UNSOUND["inf"][0]),
        upsert(12, UNSOUND["zero"][0]),
        upsert(13, UNSOUND["norm-1e30"][0]),
        upsert(14, UNSOUND["wrong-width"][0]),
        upsert(15, sound_15),
        upsert(16, bf16_16),
        upsert(17, UNSOUND["norm-1.05"][0]),
        upsert(1, UNSOUND["inf"][0], model_version="broken"),  # a bad re-upsert of an indexed post
        upsert(2, new_2),  # a sound one replaces
        upsert(15, UNSOUND["nan"][0], model_version="broken"),  # a bad one after a sound one in the same run
    ]
    with capture_logs() as logs:
        state.apply([(100 + i, ev) for i, ev in enumerate(run)], now=2e9)

    assert sorted(state.index._slot_of.items()[0].tolist()) == [1, 2, 3, 4, 5, 15, 16]
    assert (state.upserts, state.rejected, state.applied_offset) == (8, 8, 100 + len(run))
    assert state.rejected_reasons == {"non_finite": 4, "zero": 1, "not_unit_norm": 2, "wrong_width": 1}
    # The rejected re-upserts changed nothing: posts 1 and 15 keep their sound vectors.
    np.testing.assert_allclose(state.index.lookup(1, include_vector=True).vector, first[0])
    np.testing.assert_allclose(state.index.lookup(15, include_vector=True).vector, sound_15)
    np.testing.assert_allclose(state.index.lookup(2, include_vector=True).vector, new_2)
    assert state.model_version == "m1"  # the model the shard indexes, whatever the rejected ones name

    rejected = {(e["offset"], e["post_id"]): e for e in logs if e["event"] == "vector_rejected"}
    assert sorted(rejected) == [(100, 10), (101, 11), (102, 12), (103, 13), (104, 14), (107, 17), (108, 1), (110, 15)]
    assert rejected[(100, 10)]["reason"] == "non_finite" and rejected[(100, 10)]["earlier_vector"] == "none"
    assert rejected[(103, 13)]["reason"] == "not_unit_norm"
    assert rejected[(103, 13)]["norm"] == pytest.approx(1e30, rel=1e-6)
    assert (rejected[(104, 14)]["width"], rejected[(104, 14)]["expected"]) == (D // 2, D)
    assert rejected[(108, 1)]["earlier_vector"] == "kept" and rejected[(108, 1)]["model_version"] == "broken"
    assert rejected[(110, 15)]["earlier_vector"] == "kept"
    assert all(e["log_level"] == "error" for e in rejected.values())

    # Searches see only sound posts, with finite scores, whatever the query.
    servicer = ShardServicer(state, "in-process")
    for q in (e0(), *unit(3, n=4)):
        reply = servicer.Search(pb.SearchRequest(vector=q.tolist(), k=100), Context())
        assert sorted(reply.candidates.post_ids) == [1, 2, 3, 4, 5, 15, 16]
        assert np.isfinite(reply.candidates.scores).all()


def test_a_first_run_of_only_unsound_vectors_indexes_nothing():
    state = ShardState(config=ShardConfig(shard_id=0, num_shards=1), topic="post-vectors")
    state.apply([(0, upsert(1, UNSOUND["inf"][0])), (1, upsert(2, UNSOUND["zero"][0]))], now=2e9)
    assert len(state.index) == 0 and state.rejected == 2 and state.upserts == 0
    reply = ShardServicer(state, "in-process").Search(pb.SearchRequest(vector=e0().tolist(), k=10), Context())
    assert len(reply.candidates.post_ids) == 0


# ---------------------------------------------------------------- no non-finite score leaves a server


def test_a_reply_never_carries_a_non_finite_score():
    candidates = pb.Candidates()
    fill_candidates(candidates, np.array([1, 2, 3, 4, 5]), np.array([np.inf, 0.9, np.nan, 0.5, -np.inf], np.float32),
                    np.array([0, 1, 0, 1, 0]))
    assert list(candidates.post_ids) == [2, 4]
    assert list(candidates.shards) == [1, 1]
    assert candidates.scores == pytest.approx([0.9, 0.5])


def test_the_root_merge_never_ranks_a_non_finite_score():
    hits = [ShardHits(0, np.array([1, 2, 3], np.int64), np.array([np.inf, 0.8, 0.1], np.float32)),
            ShardHits(1, np.array([4, 5, 6], np.int64), np.array([np.nan, 0.9, -np.inf], np.float32))]
    merged = merge_topk(hits, 10)
    assert merged.post_ids.tolist() == [5, 2, 3]
    assert merged.shards.tolist() == [1, 0, 0]
    assert np.isfinite(merged.scores).all()


# ---------------------------------------------------------------- records on the topic, a real shard server


@pytest.mark.e2e
def test_a_shard_server_reading_the_topic_never_serves_unsound_vectors():
    from kafka import KafkaProducer

    from feedret.server.shard import serve
    from feedret.topics import ensure_topics

    sound = unit(42, n=20)
    sound[:, 0] = np.abs(sound[:, 0])  # the query e0 scores them all above zero
    records = [upsert(1 + i, v) for i, v in enumerate(sound)]
    records += [upsert(100 + i, vector) for i, (vector, _) in enumerate(UNSOUND.values())]
    records.append(upsert(1, UNSOUND["inf"][0]))  # a bad re-upsert of post 1

    with tansu_broker() as bootstrap:
        kafka = KafkaConfig(KAFKA_BOOTSTRAP_SERVERS=bootstrap, vectors_topic="vectors-sound")
        ensure_topics(kafka, num_shards=1)
        producer = KafkaProducer(bootstrap_servers=bootstrap)
        for ev in records:
            producer.send(kafka.vectors_topic, key=str(ev.post_id).encode(), value=ev.SerializeToString(), partition=0)
        producer.flush()
        producer.close()

        port = free_port()
        stop = threading.Event()
        server = threading.Thread(
            target=serve, args=(kafka, ShardConfig(shard_id=0, num_shards=1, port=port, metrics_port=0), stop),
            daemon=True,
        )
        server.start()
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        try:
            admin, search = pb_grpc.IndexAdminStub(channel), pb_grpc.ShardServiceStub(channel)

            def ready() -> bool:
                try:
                    return admin.Stats(pb.StatsRequest(), timeout=2).shards[0].ready
                except grpc.RpcError:
                    return False

            # Ready once everything that was on the partition at start is applied.
            assert wait_for(ready, timeout=60, interval=0.1)
            stats = admin.Stats(pb.StatsRequest(), timeout=2).shards[0]
            assert (stats.indexed, stats.upserts, stats.rejected) == (20, 20, len(UNSOUND) + 1)
            assert stats.applied[0].offset == len(records)

            for q in (e0(), *unit(5, n=5)):
                reply = search.Search(pb.SearchRequest(vector=q.tolist(), k=100), timeout=5)
                assert sorted(reply.candidates.post_ids) == list(range(1, 21))
                assert np.isfinite(reply.candidates.scores).all()
            top = search.Search(pb.SearchRequest(vector=e0().tolist(), k=1), timeout=5).candidates
            assert top.post_ids[0] == 1 + int(np.argmax(sound[:, 0]))  # not the inf or 1e30 vector

            looked = admin.Lookup(pb.LookupRequest(post_id=1, include_vector=True), timeout=2)
            np.testing.assert_allclose(looked.vector, sound[0])  # the bad re-upsert left it alone
            assert not admin.Lookup(pb.LookupRequest(post_id=100 + list(UNSOUND).index("inf")), timeout=2).found
        finally:
            channel.close()
            stop.set()
            server.join(15)
        assert not server.is_alive()


@pytest.mark.parametrize("factory", ["Flat", "HNSW16"])
def test_unsound_vectors_in_a_snapshot_from_before_the_check_are_dropped_when_it_loads(factory):
    from feedret.indexer.shard_index import IndexOptions, ShardIndex

    rng = np.random.default_rng(3)
    vecs = rng.normal(size=(50, 8)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    options = IndexOptions(index_factory=factory, background=False)
    index = ShardIndex(8, options=options)
    index.upsert(list(range(50)), vecs, [1.0] * 50, ["en"] * 50, indexed_at=2.0, model_versions=["m"] * 50)
    meta, sections = index.export_state()
    # What an older shard indexed unchecked: an infinite vector, a zero one, one of norm 1e30.
    slot = {int(pid): i for i, pid in enumerate(sections["post_id"])}
    sections["rows"][slot[3]] = np.inf
    sections["rows"][slot[4]] = 0.0
    sections["rows"][slot[5]] = vecs[5] * 1e30
    restored = ShardIndex.from_state(meta, sections, options)
    assert len(restored) == 47
    assert all(restored.lookup(p) is None for p in (3, 4, 5)) and restored.lookup(6) is not None
    ids, scores = restored.search(vecs[5], 50)
    assert {3, 4, 5}.isdisjoint(ids.tolist()) and np.isfinite(scores).all() and len(ids) == 47
