"""One model per index: a shard indexes the vectors of one model (its configured model_version,
or the first vector's) and rejects another's, whose vector space is not comparable; so no
search ever scores a query against two models' posts. Lookup still names the model that
embedded each post, also after a snapshot, including one written before models were kept
per post (which may hold two)."""

from __future__ import annotations

import numpy as np

from feedret.config import ShardConfig
from feedret.indexer import snapshot as snapshots
from feedret.indexer.replica import ShardState
from feedret.indexer.upkeep import Snapshotter
from feedret.server.shard import ShardServicer
from feedret.v1 import feedret_pb2 as pb

D = 8


class Context:
    def abort(self, code, details):
        raise AssertionError(f"{code.name}: {details}")

    def time_remaining(self):
        return None


def upsert(post_id: int, model_version: str) -> pb.PostVectorEvent:
    v = np.random.default_rng(post_id).normal(size=D).astype(np.float32)
    return pb.PostVectorEvent(post_id=post_id, op=pb.PostVectorEvent.UPSERT, vector=(v / np.linalg.norm(v)).tolist(),
                              created_at=1e9, lang="en", model_version=model_version)


def new_state(tmp_path) -> ShardState:
    return ShardState(config=ShardConfig(shard_id=0, num_shards=1, snapshot_dir=str(tmp_path)), topic="post-vectors")


def models(state: ShardState, *post_ids: int) -> list[str]:
    servicer = ShardServicer(state, "in-process")
    replies = [servicer.Lookup(pb.LookupRequest(post_id=p), Context()) for p in post_ids]
    assert all(r.found for r in replies)
    return [r.model_version for r in replies]


def restored(tmp_path) -> ShardState:
    fresh = new_state(tmp_path)
    assert Snapshotter(fresh).load_newest()
    return fresh


def test_a_shard_indexes_one_model_and_rejects_another_models_vectors(tmp_path):
    state = new_state(tmp_path)
    first = upsert(2, "enc-v1")
    # A consumer redeployed with another model into the same topic: its vectors are refused.
    state.apply([(0, upsert(1, "enc-v1")), (1, first), (2, upsert(3, "enc-v2"))], now=2e9)
    assert 3 not in state.index and state.rejected_reasons == {"other_model": 1}
    state.apply([(3, upsert(2, "enc-v2")), (4, upsert(5, "enc-v1"))], now=2e9)
    assert models(state, 1, 2, 5) == ["enc-v1", "enc-v1", "enc-v1"]
    # Post 2 keeps its enc-v1 vector: the rejected upsert changed nothing.
    servicer = ShardServicer(state, "in-process")
    got = servicer.Lookup(pb.LookupRequest(post_id=2, include_vector=True), Context())
    assert np.allclose(got.vector, first.vector)
    stats = servicer.Stats(pb.StatsRequest(), Context()).shards[0]
    assert (stats.model_version, stats.rejected) == ("enc-v1", 2)
    reply = servicer.Search(pb.SearchRequest(vector=first.vector, k=3), Context())
    assert reply.model_version == "enc-v1"
    # A delete needs no model: it removes the post whatever embedded it.
    state.apply([(5, pb.PostVectorEvent(post_id=5, op=pb.PostVectorEvent.DELETE))], now=2e9)
    assert 5 not in state.index

    Snapshotter(state).take("test")
    back = restored(tmp_path)
    assert back.model_version == "enc-v1" and models(back, 1, 2) == ["enc-v1", "enc-v1"]
    back.apply([(6, upsert(4, "enc-v3"))], now=2e9)  # still pinned after the restore
    assert 4 not in back.index

    # A shard configured for the new model takes only its vectors, and skips the old snapshot.
    pinned = ShardState(config=ShardConfig(shard_id=0, num_shards=1, snapshot_dir=str(tmp_path),
                                           model_version="enc-v2"), topic="post-vectors")
    assert not Snapshotter(pinned).load_newest()
    pinned.apply([(0, upsert(1, "enc-v1")), (1, upsert(3, "enc-v2"))], now=2e9)
    assert 1 not in pinned.index and models(pinned, 3) == ["enc-v2"]


def test_a_snapshot_written_before_model_versions_were_kept_per_post_still_loads(tmp_path):
    state = new_state(tmp_path)
    state.apply([(0, upsert(1, "enc-v1")), (1, upsert(2, "enc-v1"))], now=2e9)
    offset, header, sections = state.capture()
    # What the previous code wrote: no per-slot `model` section, no `model_versions` list in the
    # index's meta; the header's model_version was the shard's latest.
    del sections["model"]
    del header["index"]["model_versions"]
    snapshots.write_snapshot(tmp_path, 0, offset, header, sections)

    back = restored(tmp_path)
    assert len(back.index) == 2 and back.model_version == "enc-v1"
    assert models(back, 1, 2) == ["enc-v1", "enc-v1"]  # the best it knows: the shard's model then
    back.apply([(2, upsert(3, "enc-v1"))], now=2e9)
    assert models(back, 1, 2, 3) == ["enc-v1", "enc-v1", "enc-v1"]

    # Written again, it is in the new format, and reads back the same.
    Snapshotter(back).take("test")
    assert models(restored(tmp_path), 1, 2, 3) == ["enc-v1", "enc-v1", "enc-v1"]
