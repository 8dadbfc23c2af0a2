"""Lookup names the model that embedded the post itself, not the shard's latest: during a model
rollout a shard holds posts of several, and the answer must survive a snapshot, including one
written before model versions were kept per post."""

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


def test_each_post_is_reported_with_the_model_that_embedded_it_also_after_a_snapshot(tmp_path):
    state = new_state(tmp_path)
    # A rollout: posts 1 and 2 embedded by v1, then 3 by v2, then post 2 re-embedded by v2.
    state.apply([(0, upsert(1, "enc-v1")), (1, upsert(2, "enc-v1")), (2, upsert(3, "enc-v2"))], now=2e9)
    assert models(state, 1, 2, 3) == ["enc-v1", "enc-v1", "enc-v2"]
    state.apply([(3, upsert(2, "enc-v2"))], now=2e9)
    assert models(state, 1, 2, 3) == ["enc-v1", "enc-v2", "enc-v2"]
    # Stats and Search still name the shard's latest.
    assert ShardServicer(state, "in-process").Stats(pb.StatsRequest(), Context()).shards[0].model_version == "enc-v2"

    Snapshotter(state).take("test")
    back = restored(tmp_path)
    assert models(back, 1, 2, 3) == ["enc-v1", "enc-v2", "enc-v2"]
    # It goes on taking posts of yet another model after the restore.
    back.apply([(4, upsert(4, "enc-v3")), (5, upsert(1, "enc-v3"))], now=2e9)
    assert models(back, 1, 2, 3, 4) == ["enc-v3", "enc-v2", "enc-v2", "enc-v3"]


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
    back.apply([(2, upsert(3, "enc-v2"))], now=2e9)
    assert models(back, 1, 2, 3) == ["enc-v1", "enc-v1", "enc-v2"]

    # Written again, it is in the new format, and reads back the same.
    Snapshotter(back).take("test")
    assert models(restored(tmp_path), 1, 2, 3) == ["enc-v1", "enc-v1", "enc-v2"]
